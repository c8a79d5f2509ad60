"""The provenance an exported or fused ONNX model carries: its ``toolchain.*`` metadata_props as one
typed record, written by ``write_provenance`` and read by ``read_provenance`` (strict). The keys are the
ones the toolchain has always written, so older models read the same."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields

import onnx

from toolchain.core.errors import ToolchainError
from toolchain.core.jsonio import loads_strict

KINDS = ("base", "unfused", "fused")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HASHES = ("checkpoint_sha256", "adapter_sha256", "base_sha256")
_LISTS = ("classes", "fused_weights")
_REMEDY = "re-export the model with `toolchain export` (or fuse it again with `toolchain fuse`)"


@dataclass(frozen=True)
class Provenance:
    """kind: "base", "unfused" or "fused". version: the toolchain that wrote it. checkpoint_sha256 and
    classes: the checkpoint it was exported from (export). adapter_sha256: the adapter in it (unfused,
    fused). base_sha256: the ONNX file it was fused into. adapter_format: "toolchain" or "peft" (fuse).
    fused_weights: the initializers fusion rewrote (fused)."""

    kind: str
    version: str
    checkpoint_sha256: str | None = None
    classes: tuple[str, ...] | None = None
    adapter_sha256: str | None = None
    base_sha256: str | None = None
    adapter_format: str | None = None
    fused_weights: tuple[str, ...] | None = None

    @property
    def fused(self) -> bool:
        return self.kind == "fused"

    def to_metadata(self) -> dict[str, str]:
        """The ``toolchain.*`` metadata_props entries (``toolchain.fused`` = "true" on fused models)."""
        out = {"toolchain.fused": "true"} if self.fused else {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f"toolchain.{f.name}"] = json.dumps(list(value)) if f.name in _LISTS else str(value)
        return out


def write_provenance(model: onnx.ModelProto, provenance: Provenance) -> None:
    """Set the record's entries in the model's metadata_props (``set_metadata``)."""
    set_metadata(model, provenance.to_metadata())


def set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    """Update existing keys in place and append new ones in sorted order (deterministic output)."""
    values = dict(values)
    for p in model.metadata_props:
        if p.key in values:
            p.value = values.pop(p.key)
    for key in sorted(values):
        model.metadata_props.add(key=key, value=values[key])


def read_provenance(model: onnx.ModelProto) -> Provenance | None:
    """The model's provenance; None for a model the toolchain did not write (no ``toolchain.kind``, and not
    marked ``toolchain.fused``: models fused by ``fuse_model`` with bare metadata say only that)."""
    meta = {p.key: p.value for p in model.metadata_props}
    kind = meta.get("toolchain.kind") or ("fused" if meta.get("toolchain.fused") == "true" else None)
    if kind is None:
        return None
    if kind not in KINDS:
        raise ToolchainError(f"model metadata toolchain.kind must be one of {KINDS}", seen=kind[:40], remedy=_REMEDY)
    if (meta.get("toolchain.fused") == "true") != (kind == "fused"):
        raise ToolchainError(
            "model metadata toolchain.fused and toolchain.kind disagree",
            seen=(meta.get("toolchain.fused"), kind),
            remedy=_REMEDY,
        )
    values: dict[str, object] = {"kind": kind, "version": meta.get("toolchain.version", "")}
    for name in (*_HASHES, "adapter_format"):
        values[name] = meta.get(f"toolchain.{name}")
    for name in _HASHES:
        if values[name] is not None and not _HEX64.fullmatch(str(values[name])):
            raise ToolchainError(
                f"model metadata toolchain.{name} is not a SHA-256", seen=str(values[name])[:70], remedy=_REMEDY
            )
    for name in _LISTS:
        text = meta.get(f"toolchain.{name}")
        values[name] = None if text is None else _names(text, name)
    return Provenance(**values)  # type: ignore[arg-type]


def _names(text: str, name: str) -> tuple[str, ...]:
    value = loads_strict(text, f"model metadata toolchain.{name}", _REMEDY)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ToolchainError(
            f"model metadata toolchain.{name} must be a JSON list of names", seen=text[:70], remedy=_REMEDY
        )
    return tuple(value)
