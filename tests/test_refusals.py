"""Every refusal of hostile or broken input: the message, exit status 2, and no output left behind."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.graphs.onnx_builders import build_pair
from toolchain.adapters.adapter_file import ConvGeometry, save_adapter
from toolchain.cli import main

GEOM = ConvGeometry("conv2d", 4, 6, (3, 3), (1, 1), (1, 1), (1, 1), 2, "zeros", True)


def _good(d: Path, seed: int = 0, bias_fill: float = 0.0) -> tuple[Path, Path]:
    w = np.random.default_rng(seed).standard_normal(GEOM.weight_shape).astype(np.float32)
    base, _, adapter = build_pair(GEOM, w, np.full(6, bias_fill, np.float32), 4, 0.1, seed)
    onnx.save(base, d / "base.onnx")
    save_adapter(adapter, d / "adapter.safetensors")
    return d / "base.onnx", d / "adapter.safetensors"


def _patch(path: Path, offset_from_data: int, raw: bytes) -> None:
    data = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0] + offset_from_data
    data[start : start + len(raw)] = raw
    path.write_bytes(bytes(data))


def _edit_header(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8 : 8 + n].replace(old, new, 1)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + n :])


def _external(d: Path, location: str, make_target: Callable[[Path], None] | None = None) -> Path:
    base, _ = _good(d)
    model = onnx.load(base)
    onnx.save_model(model, d / "ext.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    m = onnx.load(d / "ext.onnx", load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    (d / "ext.onnx").write_bytes(m.SerializeToString())
    if make_target:
        make_target(d)
    return d / "ext.onnx"


def _symlink_out(d: Path) -> None:
    outside = d.parent / f"{d.name}_outside"
    outside.mkdir(exist_ok=True)
    (outside / "w.bin").write_bytes((d / "w.bin").read_bytes())
    (d / "link.bin").symlink_to(outside / "w.bin")


def _fuse(base: Path, adapter: Path, d: Path) -> list[str]:
    return ["fuse", str(base), str(adapter), "-o", str(d / "out.onnx")]


def _fused_model(d: Path) -> Path:
    base, adapter = _good(d)
    assert main(["fuse", str(base), str(adapter), "-o", str(d / "fused.onnx")]) == 0
    return d / "fused.onnx"


def _other_shape(d: Path) -> list[str]:
    base, _ = _good(d)
    other = ConvGeometry("conv2d", 4, 8, (3, 3), (1, 1), (1, 1), (1, 1), 2, "zeros", True)
    w = np.random.default_rng(0).standard_normal(other.weight_shape).astype(np.float32)
    _, _, adapter = build_pair(other, w, None, 4, 0.1, 0)
    save_adapter(adapter, d / "other.safetensors")
    return _fuse(base, d / "other.safetensors", d)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def _pickle_ckpt(d: Path) -> list[str]:
    import torch

    torch.save({"format": "toolchain-checkpoint", "evil": _Evil()}, d / "evil.pt")
    return ["export", "--checkpoint", str(d / "evil.pt"), "-o", str(d / "out.onnx")]


CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "output equals input": (
        lambda d: ["fuse", *map(str, _good(d)), "-o", str(d / "base.onnx")],
        "must not be one of the inputs",
    ),
    "existing output without --force": (
        lambda d: (d / "out.onnx").write_bytes(b"x") and _fuse(*_good(d), d),
        "pass --force",
    ),
    "truncated adapter": (
        lambda d: (lambda b, a: (a.write_bytes(a.read_bytes()[:-40]), _fuse(b, a, d))[1])(*_good(d)),
        "truncated or corrupt",
    ),
    "bit-flipped adapter data": (
        lambda d: (lambda b, a: (_patch(a, 5, b"\x01"), _fuse(b, a, d))[1])(*_good(d)),
        "does not match its checksum",
    ),
    "adapter that is an ONNX file": (lambda d: (lambda b, a: _fuse(b, b, d))(*_good(d)), "not an adapter"),
    "ONNX that is an adapter file": (lambda d: (lambda b, a: _fuse(a, a, d))(*_good(d)), "not an ONNX model"),
    "header declares a 100 GB tensor": (
        lambda d: (lambda b, a: (_edit_header(a, b'"shape":[6,', b'"shape":[6000000000,'), _fuse(b, a, d))[1])(
            *_good(d)
        ),
        "list of at most 8 integers in 0..2147483648",
    ),
    "header declares a negative size": (
        lambda d: (lambda b, a: (_edit_header(a, b'"shape":[6,', b'"shape":[-6,'), _fuse(b, a, d))[1])(*_good(d)),
        "list of at most 8 integers in 0..2147483648",
    ),
    "NaN in the adapter": (
        lambda d: (lambda b, a: (_patch(a, 0, np.float32(np.nan).tobytes()), _fuse(b, a, d))[1])(*_good(d)),
        "NaN or Inf",
    ),
    "dtype that is not float32": (
        lambda d: (lambda b, a: (_edit_header(a, b'"F32"', b'"F64"'), _fuse(b, a, d))[1])(*_good(d)),
        "must be float32",
    ),
    "metadata that is not JSON": (
        lambda d: (lambda b, a: (_edit_header(a, b'"extras":"[]"', b'"extras":"[[["'), _fuse(b, a, d))[1])(*_good(d)),
        "'extras' is not valid JSON",
    ),
    "adapter for a different layer shape": (_other_shape, "shape does not fit the adapter layer"),
    "wrong base model": (lambda d: [*_fuse(_good(d / "other", seed=9)[0], _good(d)[1], d)], "is not the base weight"),
    "already fused": (lambda d: _fuse(_fused_model(d), d / "adapter.safetensors", d), "already fused"),
    "non-finite value in the ONNX model": (
        lambda d: _fuse(*_good(d, bias_fill=float("inf")), d),
        "the ONNX model has NaN or Inf",
    ),
    "external data with an absolute path": (
        lambda d: _fuse(_external(d, "/etc/hostname"), d / "adapter.safetensors", d),
        "must be a relative path",
    ),
    "external data leaving the folder": (
        lambda d: _fuse(_external(d, "../w.bin"), d / "adapter.safetensors", d),
        "leaves the model's folder",
    ),
    "external data through a symlink": (
        lambda d: _fuse(_external(d, "link.bin", _symlink_out), d / "adapter.safetensors", d),
        "leaves the model's folder",
    ),
    "truncated ONNX": (
        lambda d: (lambda b, a: (b.write_bytes(b.read_bytes()[:100]), _fuse(b, a, d))[1])(*_good(d)),
        "not an ONNX model",
    ),
    "pickled checkpoint": (lambda d: _pickle_ckpt(d), "cannot read checkpoint"),
}


def run_refused(
    setup: Callable[[Path], list[str]], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> pytest.CaptureResult[str]:
    """Run the command ``setup`` builds; assert exit 2, ``message`` on stderr, no traceback, no new
    file and no input changed. Returns what was printed, for further checks."""
    (tmp_path / "x").mkdir()
    (tmp_path / "other").mkdir()
    argv = setup(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.is_fifo()}
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2, captured
    assert message in captured.err, captured.err
    assert "Traceback" not in captured.err
    after = {p for p in tmp_path.rglob("*") if p.is_file() and not p.is_fifo()}
    assert after == set(before), f"new files appeared: {after - set(before)}"
    assert all(p.read_bytes() == b for p, b in before.items()), "an input was changed"
    return captured


@pytest.mark.parametrize("case", list(CASES))
def test_refusal(case, tmp_path, capsys):
    captured = run_refused(*CASES[case], tmp_path, capsys)
    assert "unpickled!" not in captured.out
