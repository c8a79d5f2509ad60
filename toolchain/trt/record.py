"""The engine sidecar ``ENGINE.plan.json``: one typed record for build and refit, and the plan header.

A serialized TensorRT plan starts with the magic "ftrt" and carries the version that built it in
bytes 24, 25 and 26 (major, minor, patch; NVIDIA/TensorRT issue 3073); a plan loads only in that same TensorRT.
The sidecar carries
what the plan cannot: the precision it was built at (verify's tolerance), which weights are
refittable, and the provenance (the ONNX it came from and the base that ONNX was fused on), so that
refit can refuse a model fused on another base. Refit copies precision and the refittable set from
its input's record. No TensorRT import: ``toolchain inspect`` reads both on any machine.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from toolchain.core.errors import ToolchainError
from toolchain.core.fileio import write_bytes_atomic
from toolchain.core.jsonio import dumps_json

RECORD_FORMAT = 1
PRECISIONS = ("fp32", "fp16")
REFIT_MODES = ("none", "individual", "all")  # not refittable; REFIT_INDIVIDUAL on marked weights; whole-engine REFIT
KINDS = ("build", "refit")
HEADER_VERSION_OFFSET = 24
PLAN_MAGIC = b"ftrt"  # the first bytes of every serialized plan (seen on TensorRT 8.x-10.x plans)
MAX_SIDECAR_BYTES = 1 << 20


@dataclass(frozen=True)
class EngineRecord:
    """What a plan is: how it was built (or refit) and from which model."""

    kind: str
    onnx: str
    onnx_sha256: str
    base_sha256: str  # the base the ONNX was fused on (its own SHA-256 for a model that is not fused)
    precision: str
    refit_mode: str
    refittable_weights: tuple[str, ...]
    tensorrt_version: str
    plan_sha256: str
    dynamic_batch: tuple[int, int, int] | None = None
    workspace_mb: int = 1024
    parent_plan_sha256: str | None = None  # for a refit: the plan it was refit from
    engine_check: dict[str, Any] | None = field(default=None, compare=False)  # engine vs ONNX after build/refit
    format: int = RECORD_FORMAT

    def __post_init__(self) -> None:
        for name, allowed in (("kind", KINDS), ("precision", PRECISIONS), ("refit_mode", REFIT_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    def to_json(self) -> bytes:
        return dumps_json(asdict(self))


def sidecar_path(plan: str | os.PathLike[str]) -> Path:
    return Path(str(plan) + ".json")


def write_record(plan: str | os.PathLike[str], record: EngineRecord) -> None:
    write_bytes_atomic(sidecar_path(plan), record.to_json())


def read_record(plan: str | os.PathLike[str]) -> EngineRecord | None:
    """The plan's record; None when it has no sidecar; a one-line error when the sidecar is not one."""
    side = sidecar_path(plan)
    if not side.exists():
        return None
    remedy = "rebuild the engine with `toolchain build` (it writes the sidecar)"
    try:
        if not side.is_file() or side.stat().st_size > MAX_SIDECAR_BYTES:
            raise ValueError("not a regular file of at most 1 MiB")
        raw = json.loads(side.read_bytes())
        if not isinstance(raw, dict) or raw.get("format") != RECORD_FORMAT:
            raise ValueError(
                f"format {raw.get('format') if isinstance(raw, dict) else type(raw).__name__} (expected "
                f"{RECORD_FORMAT})"
            )
        known = {f.name for f in fields(EngineRecord)}
        if set(raw) - known:
            raise ValueError(f"unknown keys {sorted(set(raw) - known)}")
        raw["refittable_weights"] = tuple(_strings(raw.get("refittable_weights")))
        if raw.get("dynamic_batch") is not None:
            raw["dynamic_batch"] = tuple(int(v) for v in raw["dynamic_batch"])
        record = EngineRecord(**raw)
        _check_types(record)
        return record
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, TypeError, ValueError) as err:
        raise ToolchainError(
            "the engine's sidecar is not a toolchain engine record", seen=f"{side}: {str(err)[:120]}", remedy=remedy
        ) from None


def _strings(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("refittable_weights must be a list of names")
    return value


def _check_types(record: EngineRecord) -> None:
    for name in ("onnx", "onnx_sha256", "base_sha256", "tensorrt_version", "plan_sha256"):
        if not isinstance(getattr(record, name), str):
            raise ValueError(f"{name} must be a string")
    if not isinstance(record.workspace_mb, int):
        raise ValueError("workspace_mb must be an integer")


def plan_version(header: bytes) -> str | None:
    """'major.minor.patch' of the TensorRT that serialized a plan, from its header; None when the
    bytes are too short, lack the plan magic "ftrt", or do not look like a TensorRT 8-11 plan."""
    if len(header) < HEADER_VERSION_OFFSET + 3 or header[:4] != PLAN_MAGIC:
        return None
    major, minor, patch = header[HEADER_VERSION_OFFSET : HEADER_VERSION_OFFSET + 3]
    if not 8 <= major <= 11:
        return None
    return f"{major}.{minor}.{patch}"


def read_plan_version(plan: str | os.PathLike[str]) -> str | None:
    with open(plan, "rb") as f:
        return plan_version(f.read(HEADER_VERSION_OFFSET + 3))


def same_release(plan_version_text: str, tensorrt_version: str) -> bool:
    """A plan loads only in the TensorRT major.minor.patch that built it."""
    return plan_version_text.split(".")[:3] == tensorrt_version.split(".")[:3]


def check_plan_version(plan: str | os.PathLike[str], tensorrt_version: str) -> None:
    """Refuse a plan whose header names another TensorRT release than the one installed."""
    found = read_plan_version(plan)
    if found is None:
        raise ToolchainError(
            "the file is not a TensorRT plan (its header names no TensorRT version)",
            seen=str(plan),
            remedy="pass an engine built by `toolchain build`",
        )
    if not same_release(found, tensorrt_version):
        raise ToolchainError(
            f"the engine was built by TensorRT {found}; this machine has TensorRT {tensorrt_version}, which "
            "cannot load it",
            seen=str(plan),
            remedy="rebuild the engine here with `toolchain build` (engines are tied to the TensorRT release "
            "and GPU that built them)",
        )
