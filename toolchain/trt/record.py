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

import hashlib
import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from toolchain.core.errors import ToolchainError
from toolchain.core.fileio import read_regular_file, write_bytes_atomic
from toolchain.core.jsonio import dumps_json, read_json

RECORD_FORMAT = 1
PRECISIONS = ("fp32", "fp16", "int8")
REFIT_MODES = ("none", "individual", "all")  # not refittable; REFIT_INDIVIDUAL on marked weights; whole-engine REFIT
KINDS = ("build", "refit")
HEADER_VERSION_OFFSET = 24
PLAN_MAGIC = b"ftrt"  # the first bytes of every serialized plan (seen on TensorRT 8.x-10.x plans)
MAX_SIDECAR_BYTES = 1 << 20
MAX_PLAN_BYTES = 4 << 30  # an Orin Nano has 8 GB in all; a larger file is no engine of ours
MAX_BATCH = 1 << 16  # the largest batch an optimisation profile may name (export's Dim allows 4096)
SHA256 = re.compile(r"[0-9a-f]{64}")


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
    """The plan's record; None when it has no sidecar; a one-line error when the sidecar is not one
    (read with the strict JSON reader, every field checked) or when the plan beside it is not the
    plan it records (its SHA-256 differs: a plan replaced under its record, say by trtexec)."""
    side = sidecar_path(plan)
    if not side.exists():
        return None
    remedy = "rebuild the engine with `toolchain build` (it writes the sidecar)"
    try:
        raw = read_json(side, "the engine's sidecar", remedy, limit=MAX_SIDECAR_BYTES)
    except ToolchainError as err:  # not JSON, or not strict JSON: say what the file was meant to be
        raise ToolchainError(
            "the engine's sidecar is not a toolchain engine record",
            seen=f"{side}: {err.rule} ({err.seen})",
            remedy=remedy,
        ) from None
    try:
        record = _record(raw)
    except (TypeError, ValueError) as err:
        raise ToolchainError(
            "the engine's sidecar is not a toolchain engine record", seen=f"{side}: {str(err)[:120]}", remedy=remedy
        ) from None
    digest = hashlib.sha256(read_plan(plan)).hexdigest()
    if digest != record.plan_sha256:
        raise ToolchainError(
            "the plan is not the one its record describes (its SHA-256 differs from the record's plan_sha256)",
            seen=f"{plan}: {digest[:12]} vs the record's {record.plan_sha256[:12]}",
            remedy="rebuild the engine with `toolchain build`, or put back the plan the record was written for",
        )
    return record


def _record(raw: object) -> EngineRecord:
    """An EngineRecord from parsed JSON, each field of its exact type (bool is no int, no float is an int)."""
    if not isinstance(raw, dict):
        raise ValueError(f"a JSON object is expected, not {type(raw).__name__}")
    if type(raw.get("format")) is not int or raw["format"] != RECORD_FORMAT:
        raise ValueError(f"format {raw.get('format')!r} (expected {RECORD_FORMAT})")
    known = {f.name for f in fields(EngineRecord)}
    if set(raw) - known:
        raise ValueError(f"unknown keys {sorted(set(raw) - known)}")
    required = {f.name for f in fields(EngineRecord) if f.default is MISSING and f.default_factory is MISSING}
    if required - set(raw):
        raise ValueError(f"missing keys {sorted(required - set(raw))}")
    for name in ("kind", "onnx", "precision", "refit_mode", "tensorrt_version"):
        _exact(raw, name, str)
    for name in ("onnx_sha256", "base_sha256", "plan_sha256", "parent_plan_sha256"):
        value = raw.get(name)
        if value is not None and not (isinstance(value, str) and SHA256.fullmatch(value)):
            raise ValueError(f"{name} must be a SHA-256 (64 hex digits), got {str(value)[:20]!r}")
    weights = raw.get("refittable_weights")
    if not isinstance(weights, list) or not all(isinstance(v, str) for v in weights):
        raise ValueError("refittable_weights must be a list of names")
    _exact(raw, "workspace_mb", int, optional=True)
    if raw.get("workspace_mb", 1) < 1:
        raise ValueError("workspace_mb must be at least 1")
    if raw.get("engine_check") is not None and not isinstance(raw["engine_check"], dict):
        raise ValueError("engine_check must be an object or null")
    return EngineRecord(
        **{**raw, "refittable_weights": tuple(weights), "dynamic_batch": _dynamic_batch(raw.get("dynamic_batch"))}
    )


def _exact(raw: dict, name: str, kind: type, *, optional: bool = False) -> None:
    if optional and raw.get(name) is None:
        return
    if type(raw.get(name)) is not kind:
        raise ValueError(f"{name} must be a {kind.__name__}, got {type(raw.get(name)).__name__}")


def _dynamic_batch(value: object) -> tuple[int, int, int] | None:
    """None, or [min, opt, max] batch sizes: three integers with 1 <= min <= opt <= max <= MAX_BATCH."""
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 3 and all(type(v) is int for v in value)):
        raise ValueError(f"dynamic_batch must be null or three integers [min, opt, max], got {str(value)[:40]}")
    lo, mid, hi = value
    if not 1 <= lo <= mid <= hi <= MAX_BATCH:
        raise ValueError(f"dynamic_batch must have 1 <= min <= opt <= max <= {MAX_BATCH}, got {value}")
    return lo, mid, hi


def read_plan(plan: str | os.PathLike[str]) -> bytes:
    """A plan's bytes: a regular file (a FIFO or a device would hang the reader) of at most MAX_PLAN_BYTES."""
    return read_regular_file(
        Path(plan), MAX_PLAN_BYTES, what="the TensorRT plan", remedy="pass an engine file built by `toolchain build`"
    )


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
    path = Path(plan)
    if not path.is_file():  # a FIFO or a device: never opened (open() on a FIFO blocks)
        return None
    with open(path, "rb") as f:
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
