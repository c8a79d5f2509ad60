"""The adapter file: safetensors tensors plus JSON metadata. Torch-free (see docs/ADAPTER_FORMAT.md).

Reading validates the safetensors header against the file's real size before anything is
allocated, so a header that declares a 100 GB tensor is refused, not loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.adapters import methods
from toolchain.core.errors import ToolchainError
from toolchain.core.fileio import read_regular_file, write_bytes_atomic
from toolchain.core.version import package_version

FORMAT = "toolchain-adapter"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 16 << 20
MAX_ADAPTER_BYTES = 4 << 30
MAX_CHANNELS = 1 << 20
MAX_KERNEL = 1 << 12
MAX_DIMS = 8
MAX_DIM = 1 << 31
MAX_ENTRIES = 1 << 16
MAX_SCALING = 1e6
EXTRA_PREFIX = "extra:"
_DTYPES: dict[str, np.dtype] = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2")}


@dataclass(frozen=True)
class ConvGeometry:
    """What a Conv layer computes besides its weight values."""

    kind: str  # "conv1d" or "conv2d"
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str = "zeros"
    bias: bool = True

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """(C_out, C_in/groups, k1[, k2])."""
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @classmethod
    def from_dict(cls, d: Any) -> ConvGeometry:
        """Parse strictly: integers must be JSON integers (no floats, strings or booleans), in range."""
        d = _obj(d, "geometry")
        kind = _choice(d.get("kind"), "geometry.kind", ("conv1d", "conv2d"))
        nd = 1 if kind == "conv1d" else 2
        pad = d.get("padding")
        geom = cls(
            kind=kind,
            in_channels=_int(d.get("in_channels"), "geometry.in_channels", 1, MAX_CHANNELS),
            out_channels=_int(d.get("out_channels"), "geometry.out_channels", 1, MAX_CHANNELS),
            kernel_size=_ints(d.get("kernel_size"), "geometry.kernel_size", nd, 1, MAX_KERNEL),
            stride=_ints(d.get("stride"), "geometry.stride", nd, 1, MAX_KERNEL),
            padding=_choice(pad, "geometry.padding", ("same", "valid"))
            if isinstance(pad, str)
            else _ints(pad, "geometry.padding", nd, 0, MAX_KERNEL),
            dilation=_ints(d.get("dilation"), "geometry.dilation", nd, 1, MAX_KERNEL),
            groups=_int(d.get("groups"), "geometry.groups", 1, MAX_CHANNELS),
            padding_mode=_choice(
                d.get("padding_mode", "zeros"), "geometry.padding_mode", ("zeros", "reflect", "replicate", "circular")
            ),
            bias=_bool(d.get("bias", True), "geometry.bias"),
        )
        if geom.in_channels % geom.groups or geom.out_channels % geom.groups:
            raise ToolchainError(
                "geometry.groups must divide in_channels and out_channels",
                seen=(geom.in_channels, geom.out_channels, geom.groups),
                remedy=_CORRUPT,
            )
        return geom


@dataclass(frozen=True)
class LayerRecord:
    """One adapted conv layer: where it is, what it was trained against, and its ranks.

    ranks: lora-edge, the TT bond ranks (1, r1, ..., 1); lora/dora, (r,); adapter, (hidden width,).
    """

    name: str
    param: str
    method: str
    geometry: ConvGeometry
    ranks: tuple[int, ...]
    scaling: float
    base_sha256: str

    def tensor_names(self) -> list[str]:
        """Names of this layer's tensors in the file."""
        return methods.tensor_names(self.method, self.name, self.ranks)

    def expected_shapes(self) -> list[tuple[int, ...]]:
        """Shapes its tensors must have, from its geometry and ranks (the method registry's rule)."""
        g = self.geometry
        return methods.get_method(self.method).kind.record_shapes(g.weight_shape, g.groups, self.ranks)


@dataclass(frozen=True)
class ExtraRecord:
    """A trained tensor that replaces a base tensor outright (a head, BatchNorm parameters)."""

    param: str
    shape: tuple[int, ...]
    base_sha256: str | None  # None: the tensor is new, or its shape changed


@dataclass
class Adapter:
    """Everything needed to turn the base model into the adapted one, without torch."""

    method: str
    layers: list[LayerRecord]
    extras: list[ExtraRecord]
    tensors: dict[str, np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)

    def layer_tensors(self, layer: LayerRecord) -> list[np.ndarray]:
        return [self.tensors[n] for n in layer.tensor_names()]

    def extra_tensor(self, extra: ExtraRecord) -> np.ndarray:
        return self.tensors[EXTRA_PREFIX + extra.param]


def save_adapter(adapter: Adapter, path: str | os.PathLike[str]) -> None:
    """Write ``adapter`` atomically as safetensors with JSON metadata; the same adapter gives the same bytes."""
    validate_adapter(adapter)

    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "toolchain_version": package_version(),
        "method": adapter.method,
        "layers": json.dumps([_layer_to_dict(x) for x in adapter.layers], sort_keys=True),
        "extras": json.dumps([asdict(x) for x in adapter.extras], sort_keys=True),
        "info": json.dumps(adapter.info, sort_keys=True),
    }
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in adapter.tensors.items()}
    meta["content_sha256"] = content_digest(tensors, meta)
    write_bytes_atomic(path, serialize_safetensors(tensors, meta))


def serialize_safetensors(tensors: dict[str, np.ndarray], meta: dict[str, str]) -> bytes:
    """The safetensors layout with keys in sorted order: 8-byte little-endian header length, the JSON
    header padded with spaces to a multiple of 8, then the float32 tensors back to back. (The
    safetensors library writes its metadata map in a per-process random order, so the same adapter
    written twice differed in its bytes.)"""
    header: dict[str, Any] = {"__metadata__": dict(sorted(meta.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        blob = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)


def content_digest(tensors: dict[str, np.ndarray], meta: dict[str, str]) -> str:
    """SHA-256 over every tensor (name, shape, bytes) and every metadata entry but this one.

    An integrity check against bit flips and truncation, not a signature: whoever can write the
    file can recompute it.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = np.ascontiguousarray(tensors[name], dtype="<f4")
        h.update(f"{name}|{list(t.shape)}|".encode())
        h.update(t.tobytes())
    h.update(json.dumps({k: v for k, v in meta.items() if k != "content_sha256"}, sort_keys=True).encode())
    return h.hexdigest()


def load_adapter(path: str | os.PathLike[str]) -> Adapter:
    """Read and validate an adapter file. Raises ToolchainError for anything that is not one."""
    p = Path(path)
    meta, tensors = read_safetensors(
        p, what="adapter file", remedy="pass the .safetensors file written by `toolchain finetune`"
    )
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ToolchainError(
            "not a toolchain adapter: safetensors metadata lacks format=toolchain-adapter",
            seen=str(p),
            remedy="pass a file written by `toolchain finetune`",
        )
    if not all(isinstance(v, str) for v in meta.values()):
        raise ToolchainError(
            "safetensors metadata values must all be strings",
            seen=sorted(k for k, v in meta.items() if not isinstance(v, str))[:3],
            remedy=_CORRUPT,
        )
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise ToolchainError(
            f"unsupported adapter format version (this toolchain reads {FORMAT_VERSION})",
            seen=meta.get("format_version"),
            remedy="re-export the adapter with this toolchain version",
        )
    method = methods.get_method(meta.get("method", "")).name
    layers = [_layer_from_dict(d, method) for d in _list(_json(meta, "layers"), "layers")]
    extras = [_extra_from_dict(d) for d in _list(_json(meta, "extras"), "extras")]
    info = _json(meta, "info") if "info" in meta else {}
    adapter = Adapter(
        method=method, layers=layers, extras=extras, tensors=tensors, info=info if isinstance(info, dict) else {}
    )
    validate_adapter(adapter)
    if meta.get("content_sha256") != content_digest(tensors, meta):
        raise ToolchainError(
            "adapter content does not match its checksum (content_sha256): the file is corrupt or was edited",
            seen=str(p),
            remedy="re-export or re-download the adapter",
        )
    return adapter


def read_safetensors(
    p: Path, *, what: str, remedy: str, dtypes: tuple[str, ...] = ("F32",)
) -> tuple[dict[str, Any] | None, dict[str, np.ndarray]]:
    """(metadata, float32 tensors) of a safetensors file, read strictly: bounded size, no duplicate
    keys, byte ranges that tile the data section exactly, shapes that match, only ``dtypes``."""
    data = read_regular_file(p, MAX_ADAPTER_BYTES, what=what, remedy=remedy)
    header = _parse_header(data, str(p))
    meta = header.pop("__metadata__", None)
    base = 8 + int.from_bytes(data[:8], "little")
    _check_tiling(header, len(data) - base)
    return meta, {name: _read_tensor(data, base, name, entry, dtypes) for name, entry in header.items()}


def validate_adapter(adapter: Adapter) -> None:
    """Check every layer's tensors (present, shaped as geometry and ranks imply), extras, finiteness."""
    spec = methods.get_method(adapter.method)
    if not adapter.layers and not adapter.extras:
        raise ToolchainError(
            "the adapter changes nothing: it has no layers and no extra tensors",
            seen=adapter.method,
            remedy="re-export the adapter from a finetune run",
        )
    if adapter.layers and not spec.kind.per_layer:
        raise ToolchainError(
            f"{spec.name} adapters carry extras only, not layers", seen=len(adapter.layers), remedy=_CORRUPT
        )
    names = [x.name for x in adapter.layers]
    if len(set(names)) != len(names):
        raise ToolchainError(
            "two adapter layers have the same name",
            seen=sorted({n for n in names if names.count(n) > 1})[:3],
            remedy=_CORRUPT,
        )
    for layer in adapter.layers:
        _validate_layer(layer, adapter)
    for extra in adapter.extras:
        key = EXTRA_PREFIX + extra.param
        if key not in adapter.tensors or adapter.tensors[key].shape != extra.shape:
            raise ToolchainError(
                "adapter extra tensor is missing or has the wrong shape", seen=extra.param, remedy=_CORRUPT
            )
    expected = {n for x in adapter.layers for n in x.tensor_names()} | {EXTRA_PREFIX + e.param for e in adapter.extras}
    stray = sorted(set(adapter.tensors) - expected)
    if stray:
        raise ToolchainError("adapter holds tensors that no layer or extra names", seen=stray[:3], remedy=_CORRUPT)
    for name, t in adapter.tensors.items():
        if not np.all(np.isfinite(t)):
            raise ToolchainError(
                "adapter tensor has NaN or Inf values",
                seen=name,
                remedy="training diverged; lower the learning rate and retrain",
            )


def _validate_layer(layer: LayerRecord, adapter: Adapter) -> None:
    if layer.method != adapter.method:
        raise ToolchainError(
            f"layer {layer.name}: its method differs from the adapter's",
            seen=(layer.method, adapter.method),
            remedy=_CORRUPT,
        )
    if not math.isfinite(layer.scaling) or abs(layer.scaling) > MAX_SCALING:
        raise ToolchainError(
            f"layer {layer.name}: scaling must be finite and at most {MAX_SCALING:g} in magnitude",
            seen=layer.scaling,
            remedy=_CORRUPT,
        )
    names = layer.tensor_names()
    missing = [n for n in names if n not in adapter.tensors]
    if missing:
        raise ToolchainError(
            "adapter is missing tensors for a layer", seen=missing[:3], remedy="the file is incomplete; re-export it"
        )
    got = [tuple(adapter.tensors[n].shape) for n in names]
    expected = layer.expected_shapes()
    if got != expected:
        raise ToolchainError(
            f"layer {layer.name}: {layer.method} tensor shapes do not fit its geometry and ranks",
            seen=(got, expected),
            remedy=_CORRUPT,
        )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ToolchainError(
            "JSON object has a duplicate key", seen=sorted({k for k in keys if keys.count(k) > 1})[:3], remedy=_CORRUPT
        )
    return dict(pairs)


def _loads(text: str | bytes, what: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as err:
        raise ToolchainError(
            f"{what} is not valid JSON", seen=f"{type(err).__name__}: {str(err)[:80]}", remedy=_CORRUPT
        ) from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _json(meta: dict[str, str], key: str) -> Any:
    if key not in meta:
        raise ToolchainError("adapter metadata lacks an entry", seen=key, remedy=_CORRUPT)
    return _loads(meta[key], f"adapter metadata {key!r}")


def _parse_header(data: bytes, where: str) -> dict[str, Any]:
    if len(data) < 8:
        raise ToolchainError(
            "not a safetensors file: shorter than its 8-byte header length", seen=f"{len(data)} bytes in {where}"
        )
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise ToolchainError(
            "safetensors header length is larger than the file or the limit",
            seen=n,
            remedy="the file is truncated or not an adapter",
        )
    header = _loads(data[8 : 8 + n], "safetensors header")
    if not isinstance(header, dict):
        raise ToolchainError("safetensors header must be a JSON object", seen=type(header).__name__)
    return header


def _check_tiling(header: dict[str, Any], size: int) -> None:
    """Tensor byte ranges must tile the data section exactly: no overlap, no gap, no trailing bytes."""
    spans = []
    for name, entry in header.items():
        offs = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
            raise ToolchainError("tensor data_offsets must be two integers", seen=(name, offs), remedy=_CORRUPT)
        spans.append((offs[0], offs[1], name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos or end < begin:
            raise ToolchainError(
                "tensor data overlaps another tensor or leaves a gap", seen=(name, [begin, end]), remedy=_CORRUPT
            )
        pos = end
    if pos != size:
        raise ToolchainError(
            "the data section holds bytes no tensor owns, or is too short",
            seen=(pos, size),
            remedy="the file is truncated or corrupt",
        )


def _read_tensor(data: bytes, base: int, name: str, entry: Any, dtypes: tuple[str, ...] = ("F32",)) -> np.ndarray:
    if not isinstance(entry, dict) or entry.get("dtype") not in dtypes:
        also = " or float16 (F16)" if "F16" in dtypes else ""
        raise ToolchainError(
            f"adapter tensors must be float32 (F32){also}",
            seen=(name, entry.get("dtype") if isinstance(entry, dict) else entry),
            remedy="save the adapter in float32",
        )
    dtype = _DTYPES[entry["dtype"]]
    shape = entry.get("shape")
    if not (
        isinstance(shape, list) and len(shape) <= MAX_DIMS and all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)
    ):
        raise ToolchainError(
            f"tensor shape must be a list of at most {MAX_DIMS} integers in 0..{MAX_DIM}",
            seen=(name, shape),
            remedy=_CORRUPT,
        )
    begin, end = entry["data_offsets"]
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise ToolchainError(
            "tensor data does not match its shape",
            seen=(name, shape, [begin, end]),
            remedy="the file is truncated or corrupt",
        )
    return (
        np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=base + begin).reshape(shape).astype(np.float32)
    )


def _layer_to_dict(layer: LayerRecord) -> dict[str, Any]:
    d = asdict(layer)
    d["geometry"] = asdict(layer.geometry)
    return d


def _layer_from_dict(d: Any, method: str) -> LayerRecord:
    d = _obj(d, "layer")
    return LayerRecord(
        name=_str(d.get("name"), "layer.name"),
        param=_str(d.get("param"), "layer.param", allow_empty=method == "adapter"),
        method=_choice(d.get("method"), "layer.method", METHOD_NAMES),
        geometry=ConvGeometry.from_dict(d.get("geometry")),
        ranks=_ints(d.get("ranks"), "layer.ranks", None, 1, MAX_CHANNELS),
        scaling=_float(d.get("scaling"), "layer.scaling"),
        base_sha256=_sha(d.get("base_sha256"), "layer.base_sha256", allow_empty=method == "adapter"),
    )


def _extra_from_dict(d: Any) -> ExtraRecord:
    d = _obj(d, "extra")
    digest = d.get("base_sha256")
    return ExtraRecord(
        param=_str(d.get("param"), "extra.param"),
        shape=_ints(d.get("shape"), "extra.shape", None, 0, MAX_DIM),
        base_sha256=None if digest is None else _sha(digest, "extra.base_sha256"),
    )


_CORRUPT = "the adapter file is corrupt or hand-edited; re-export it with `toolchain finetune`"
METHOD_NAMES = methods.METHODS


def _obj(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ToolchainError(f"adapter metadata: {what} must be a JSON object", seen=type(v).__name__, remedy=_CORRUPT)
    return v


def _list(v: Any, what: str) -> list[Any]:
    if not isinstance(v, list) or len(v) > MAX_ENTRIES:
        raise ToolchainError(
            f"adapter metadata: {what} must be a JSON list of at most {MAX_ENTRIES} entries",
            seen=type(v).__name__,
            remedy=_CORRUPT,
        )
    return v


def _int(v: Any, what: str, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise ToolchainError(f"adapter metadata: {what} must be an integer in {lo}..{hi}", seen=v, remedy=_CORRUPT)
    return v


def _ints(v: Any, what: str, n: int | None, lo: int, hi: int) -> tuple[int, ...]:
    if not isinstance(v, list) or (n is not None and len(v) != n) or len(v) > MAX_DIMS:
        raise ToolchainError(
            f"adapter metadata: {what} must be a list of {n if n is not None else f'at most {MAX_DIMS}'} integers",
            seen=v,
            remedy=_CORRUPT,
        )
    return tuple(_int(x, what, lo, hi) for x in v)


def _float(v: Any, what: str) -> float:
    if type(v) not in (int, float):
        raise ToolchainError(f"adapter metadata: {what} must be a JSON number", seen=v, remedy=_CORRUPT)
    return float(v)


def _bool(v: Any, what: str) -> bool:
    if type(v) is not bool:
        raise ToolchainError(f"adapter metadata: {what} must be true or false", seen=v, remedy=_CORRUPT)
    return v


def _str(v: Any, what: str, allow_empty: bool = False) -> str:
    if not isinstance(v, str) or len(v) > 1024 or (not v and not allow_empty):
        raise ToolchainError(
            f"adapter metadata: {what} must be a non-empty string of at most 1024 characters", seen=v, remedy=_CORRUPT
        )
    return v


def _choice(v: Any, what: str, choices: tuple[str, ...]) -> str:
    if v not in choices or not isinstance(v, str):
        raise ToolchainError(f"adapter metadata: {what} must be one of {', '.join(choices)}", seen=v, remedy=_CORRUPT)
    return str(v)


def _sha(v: Any, what: str, allow_empty: bool = False) -> str:
    if allow_empty and v == "":
        return ""
    if not isinstance(v, str) or len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise ToolchainError(f"adapter metadata: {what} must be 64 lowercase hex digits", seen=v, remedy=_CORRUPT)
    return v
