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

from kernels.tt import validate_cores
from toolchain.errors import ToolchainError
from toolchain.fileio import write_bytes_atomic

FORMAT = "toolchain-adapter"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 16 << 20
EXTRA_PREFIX = "extra:"
_DTYPES = {"F32": np.dtype("<f4")}


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
    def from_dict(cls, d: dict[str, Any]) -> ConvGeometry:
        pad = d["padding"]
        return cls(
            kind=str(d["kind"]),
            in_channels=int(d["in_channels"]),
            out_channels=int(d["out_channels"]),
            kernel_size=tuple(int(v) for v in d["kernel_size"]),
            stride=tuple(int(v) for v in d["stride"]),
            padding=pad if isinstance(pad, str) else tuple(int(v) for v in pad),
            dilation=tuple(int(v) for v in d["dilation"]),
            groups=int(d["groups"]),
            padding_mode=str(d.get("padding_mode", "zeros")),
            bias=bool(d.get("bias", True)),
        )


@dataclass(frozen=True)
class LayerRecord:
    """One adapted conv layer: where it is, what it was trained against, and its ranks."""

    name: str
    param: str
    method: str
    geometry: ConvGeometry
    ranks: tuple[int, ...]
    scaling: float
    base_sha256: str

    def tensor_names(self) -> list[str]:
        """Names of this layer's tensors in the file."""
        n = self.name
        if self.method == "lora-edge":
            return [f"{n}.delta_g1"] + [f"{n}.core{k}" for k in range(2, len(self.ranks))]
        if self.method in ("lora", "dora"):
            return [f"{n}.lora_A", f"{n}.lora_B"] + ([f"{n}.magnitude"] if self.method == "dora" else [])
        if self.method == "adapter":
            return [f"{n}.down.weight", f"{n}.down.bias", f"{n}.up.weight", f"{n}.up.bias"]
        raise ToolchainError("unknown layer method in adapter", seen=self.method, remedy="upgrade toolchain")

    def expected_shapes(self) -> list[tuple[int, ...]] | None:
        """Shapes its tensors must have (None: checked by the TT core validation instead)."""
        g = self.geometry
        shape = g.weight_shape
        if self.method in ("lora", "dora"):
            (r,) = self.ranks
            out = [(g.groups * r, *shape[1:]), (shape[0], r)]
            return [*out, (shape[0],)] if self.method == "dora" else out
        if self.method == "adapter":
            (h,) = self.ranks
            ones = (1,) * len(g.kernel_size)
            return [(h, g.out_channels, *ones), (h,), (g.out_channels, h, *ones), (g.out_channels,)]
        return None


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
    """Write ``adapter`` atomically as safetensors with JSON metadata."""
    from safetensors.numpy import save

    validate_adapter(adapter)
    from toolchain import __version__

    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "toolchain_version": __version__,
        "method": adapter.method,
        "layers": json.dumps([_layer_to_dict(x) for x in adapter.layers], sort_keys=True),
        "extras": json.dumps([asdict(x) for x in adapter.extras], sort_keys=True),
        "info": json.dumps(adapter.info, sort_keys=True),
    }
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in adapter.tensors.items()}
    meta["content_sha256"] = content_digest(tensors, meta)
    write_bytes_atomic(path, save(tensors, metadata=meta))


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
    if not p.is_file():
        raise ToolchainError("the adapter file does not exist", seen=str(p), remedy="pass the .safetensors file written by `toolchain finetune`")
    data = p.read_bytes()
    header = _parse_header(data, str(p))
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ToolchainError("not a toolchain adapter: safetensors metadata lacks format=toolchain-adapter", seen=str(p), remedy="pass a file written by `toolchain finetune`")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise ToolchainError(f"unsupported adapter format version (this toolchain reads {FORMAT_VERSION})", seen=meta.get("format_version"), remedy="re-export the adapter with this toolchain version")
    base = 8 + int.from_bytes(data[:8], "little")
    tensors = {name: _read_tensor(data, base, name, entry) for name, entry in header.items()}
    try:
        layers = [_layer_from_dict(d) for d in json.loads(meta["layers"])]
        extras = [ExtraRecord(str(d["param"]), tuple(int(v) for v in d["shape"]), d.get("base_sha256")) for d in json.loads(meta["extras"])]
        info = json.loads(meta.get("info", "{}"))
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
        raise ToolchainError("adapter metadata is not valid", seen=f"{type(err).__name__}: {err}", remedy="the file is corrupt; re-export it") from None
    adapter = Adapter(method=str(meta.get("method")), layers=layers, extras=extras, tensors=tensors, info=info if isinstance(info, dict) else {})
    validate_adapter(adapter)
    if not all(isinstance(v, str) for v in meta.values()) or meta.get("content_sha256") != content_digest(tensors, meta):
        raise ToolchainError("adapter content does not match its checksum (content_sha256): the file is corrupt or was edited", seen=str(p), remedy="re-export or re-download the adapter")
    return adapter


def validate_adapter(adapter: Adapter) -> None:
    """Check that every layer's tensors exist, have the shapes its geometry and ranks imply, and are finite."""
    for layer in adapter.layers:
        names = layer.tensor_names()
        missing = [n for n in names if n not in adapter.tensors]
        if missing:
            raise ToolchainError("adapter is missing tensors for a layer", seen=missing[:3], remedy="the file is incomplete; re-export it")
        shape = layer.geometry.weight_shape
        expected = layer.expected_shapes()
        if expected is not None:
            got = [tuple(t.shape) for t in adapter.layer_tensors(layer)]
            if got != expected or min(layer.ranks) < 1:
                raise ToolchainError(f"layer {layer.name}: {layer.method} tensor shapes do not fit its geometry and rank", seen=(got, expected), remedy="the file is corrupt; re-export it")
            continue
        if len(layer.ranks) != len(shape) + 1:
            raise ToolchainError(f"layer {layer.name}: ranks must have one more entry than the kernel has modes", seen=(layer.ranks, shape))
        delta, *suffix = adapter.layer_tensors(layer)
        if delta.shape != (shape[0], layer.ranks[1]):
            raise ToolchainError(f"layer {layer.name}: ΔG1 must be (C_out, r1)", seen=(delta.shape, (shape[0], layer.ranks[1])))
        head = np.zeros((1, shape[0], layer.ranks[1]), dtype=np.float32)
        validate_cores([head, *suffix], shape)
        if not math.isfinite(layer.scaling):
            raise ToolchainError(f"layer {layer.name}: scaling must be finite", seen=layer.scaling)
    for extra in adapter.extras:
        key = EXTRA_PREFIX + extra.param
        if key not in adapter.tensors or adapter.tensors[key].shape != extra.shape:
            raise ToolchainError("adapter extra tensor is missing or has the wrong shape", seen=extra.param)
    for name, t in adapter.tensors.items():
        if not np.all(np.isfinite(t)):
            raise ToolchainError("adapter tensor has NaN or Inf values", seen=name, remedy="training diverged; lower the learning rate and retrain")


def _parse_header(data: bytes, where: str) -> dict[str, Any]:
    if len(data) < 8:
        raise ToolchainError("not a safetensors file: shorter than its 8-byte header length", seen=f"{len(data)} bytes in {where}")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise ToolchainError("safetensors header length is larger than the file or the limit", seen=n, remedy="the file is truncated or not an adapter")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ToolchainError("safetensors header is not valid JSON", seen=str(err), remedy="the file is corrupt; re-export it") from None
    if not isinstance(header, dict):
        raise ToolchainError("safetensors header must be a JSON object", seen=type(header).__name__)
    return header


def _read_tensor(data: bytes, base: int, name: str, entry: Any) -> np.ndarray:
    if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES:
        raise ToolchainError("adapter tensors must be float32 (F32)", seen=(name, entry.get("dtype") if isinstance(entry, dict) else entry))
    shape, offs = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and 0 <= d for d in shape)):
        raise ToolchainError("tensor shape must be a list of non-negative integers", seen=(name, shape))
    if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
        raise ToolchainError("tensor data_offsets must be two integers", seen=(name, offs))
    begin, end = offs
    if not 0 <= begin <= end <= len(data) - base or end - begin != math.prod(shape) * 4:
        raise ToolchainError("tensor data lies outside the file or does not match its shape", seen=(name, shape, offs), remedy="the file is truncated or corrupt")
    return np.frombuffer(data, dtype=_DTYPES["F32"], count=math.prod(shape), offset=base + begin).reshape(shape).copy()


def _layer_to_dict(layer: LayerRecord) -> dict[str, Any]:
    d = asdict(layer)
    d["geometry"] = asdict(layer.geometry)
    return d


def _layer_from_dict(d: dict[str, Any]) -> LayerRecord:
    return LayerRecord(
        name=str(d["name"]),
        param=str(d["param"]),
        method=str(d["method"]),
        geometry=ConvGeometry.from_dict(d["geometry"]),
        ranks=tuple(int(r) for r in d["ranks"]),
        scaling=float(d["scaling"]),
        base_sha256=str(d["base_sha256"]),
    )
