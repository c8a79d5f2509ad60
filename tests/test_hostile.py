"""The hostile cases of the deployment review (D1-D22): each is one line on stderr, exit status 2,
no traceback, no new file and no input changed. Cases that need more than a CLI call follow the table."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tests.graphs.onnx_builders import build_pair
from tests.test_refusals import GEOM, _edit_header, _fuse, _good, run_refused
from toolchain.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write_header(path: Path, header: dict | bytes, body: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _edit_layer(d: Path, edit: Callable[[dict], None]) -> list[str]:
    """Edit the first layer's JSON record in the adapter's metadata (the checksum is checked after parsing)."""
    base, adapter = _good(d)
    header, body = _header(adapter)
    layers = json.loads(header["__metadata__"]["layers"])
    edit(layers[0])
    header["__metadata__"]["layers"] = json.dumps(layers)
    _write_header(adapter, header, body)
    return _fuse(base, adapter, d)


def _set(path: list[str], value: object) -> Callable[[dict], None]:
    def edit(rec: dict) -> None:
        target = rec
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def _layers_text(d: Path, old: str, new: str) -> list[str]:
    """Replace text inside the (decoded) layers JSON, for tokens json.dumps cannot write (1e400, NaN)."""
    base, adapter = _good(d)
    header, body = _header(adapter)
    text = header["__metadata__"]["layers"]
    assert old in text, text
    header["__metadata__"]["layers"] = text.replace(old, new, 1)
    _write_header(adapter, header, body)
    return _fuse(base, adapter, d)


def _raw_edit(d: Path, old: bytes, new: bytes) -> list[str]:
    base, adapter = _good(d)
    _edit_header(adapter, old, new)
    return _fuse(base, adapter, d)


def _duplicate_key(d: Path, key: bytes) -> list[str]:
    base, adapter = _good(d)
    header, body = _header(adapter)
    raw = json.dumps(header).encode()
    name = key if key != b"tensor" else json.dumps(next(k for k in header if k != "__metadata__")).encode()
    item = b"%s:%s" % (name, json.dumps(header[json.loads(name)]).encode())
    _write_header(adapter, raw[:-1] + b"," + item + b"}", body)
    return _fuse(base, adapter, d)


def _offsets(d: Path, mode: str) -> list[str]:
    base, adapter = _good(d)
    header, body = _header(adapter)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    if mode == "overlap":
        a, b = header[names[0]], header[names[1]]
        if a["data_offsets"][1] - a["data_offsets"][0] == b["data_offsets"][1] - b["data_offsets"][0]:
            b["data_offsets"] = list(a["data_offsets"])
        else:
            b["data_offsets"] = [b["data_offsets"][0] - 4, b["data_offsets"][1] - 4]
        _write_header(adapter, header, body)
    else:
        _write_header(adapter, header, body + b"\0" * 16)
    return _fuse(base, adapter, d)


def _no_layers(d: Path) -> list[str]:
    base, adapter = _good(d)
    header, _ = _header(adapter)
    header = {"__metadata__": {**header["__metadata__"], "layers": "[]"}}
    _write_header(adapter, header, b"")
    return _fuse(base, adapter, d)


def _ckpt(d: Path, **fields: object) -> list[str]:
    payload = {
        "format": "toolchain-checkpoint",
        "version": 1,
        "model": "cnn1d",
        "in_channels": 6,
        "classes": ["a", "b"],
        "state_dict": {},
        "pretrain": {},
    }
    payload.update(fields)
    torch.save(payload, d / "ck.pt")
    return ["export", "--checkpoint", str(d / "ck.pt"), "-o", str(d / "out.onnx")]


def _npz(d: Path, **arrays: object) -> list[str]:
    n = 4
    base = {"X": np.zeros((n, 6, 16), np.float32), "y": np.arange(n) % 2, "subject": np.arange(n)}
    base.update(arrays)  # type: ignore[arg-type]
    np.savez(d / "data.npz", **{k: v for k, v in base.items() if v is not None})
    return ["pretrain", "--data", str(d / "data.npz"), "--out", str(d / "m.pt"), "--steps", "1", "--no-progress"]


def _bomb(d: Path) -> list[str]:
    import zipfile

    with zipfile.ZipFile(d / "bomb.npz", "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, arr in (
            ("X", np.zeros((1, 6, 16), np.float32)),
            ("y", np.zeros(1, np.int64)),
            ("subject", np.zeros(1, np.int64)),
        ):
            with z.open(name + ".npy", "w") as f:
                np.lib.format.write_array(f, arr)
        with z.open("pad.npy", "w", force_zip64=True) as f:  # 5 GiB of zeros, a few MB compressed
            chunk = b"\0" * (1 << 24)
            for _ in range(320):
                f.write(chunk)
    return ["pretrain", "--data", str(d / "bomb.npz"), "--out", str(d / "m.pt"), "--steps", "1", "--no-progress"]


def _user_spec(d: Path, code: str, attr: str = "build") -> list[str]:
    (d / "net.py").write_text(code)
    return ["pretrain", "--model", f"{d / 'net.py'}:{attr}", "--out", str(d / "m.pt"), "--steps", "1", "--no-progress"]


def _verify_models(d: Path) -> tuple[Path, Path]:
    w = np.random.default_rng(0).standard_normal(GEOM.weight_shape).astype(np.float32)
    base, unfused, _ = build_pair(GEOM, w, None, 4, 0.1, 0)
    onnx.save(base, d / "base.onnx")
    onnx.save(unfused, d / "unfused.onnx")
    return d / "base.onnx", d / "unfused.onnx"


def _verify(d: Path, *extra: str) -> list[str]:
    base, unfused = _verify_models(d)
    return ["verify", str(base), "--reference", str(unfused), "--data", "none", "--out-dir", str(d / "v"), *extra]


def _verify_existing(d: Path) -> list[str]:
    argv = _verify(d)
    (d / "v").mkdir()
    (d / "v" / "verify.json").write_text("{}")
    return argv


def _bench_existing(d: Path) -> list[str]:
    base, _ = _verify_models(d)
    (d / "b.json").write_text("{}")
    return ["bench", str(base), "--runs", "2", "--json", str(d / "b.json")]


def _fifo(d: Path) -> list[str]:
    _, adapter = _good(d)
    os.mkfifo(d / "fifo.onnx")
    return _fuse(d / "fifo.onnx", adapter, d)


def _extra_resize(d: Path, param: str, shape: list[int]) -> list[str]:
    """An adapter extra with base_sha256 null that resizes a conv tensor (only a head may change shape)."""
    base, adapter = _good(d, bias_fill=0.5)
    header, body = _header(adapter)
    meta = header["__metadata__"]
    meta["extras"] = json.dumps([{"param": param, "shape": shape, "base_sha256": None}])
    start = len(body)
    header["extra:" + param] = {
        "dtype": "F32",
        "shape": shape,
        "data_offsets": [start, start + 4 * int(np.prod(shape))],
    }
    body += np.ones(shape, np.float32).tobytes()
    from toolchain.adapters.adapter_file import content_digest

    tensors = {
        k: np.frombuffer(body, np.float32, int(np.prod(v["shape"])), v["data_offsets"][0]).reshape(v["shape"])
        for k, v in header.items()
        if k != "__metadata__"
    }
    meta["content_sha256"] = content_digest(tensors, meta)
    _write_header(adapter, header, body)
    return _fuse(base, adapter, d)


def _external_base(d: Path) -> list[str]:
    base, adapter = _good(d)
    onnx.save_model(onnx.load(base), d / "ext.onnx", save_as_external_data=True, location="ext.bin", size_threshold=0)
    return ["fuse", str(d / "ext.onnx"), str(adapter), "-o", str(d / "ext.bin"), "--force"]


CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "D1 checkpoint names a module callable": (lambda d: _ckpt(d, model="os:abort"), "may name only built-in backbones"),
    "D1 checkpoint names a file beside it": (
        lambda d: ((d / "evil.py").write_text("raise SystemExit('ran')"), _ckpt(d, model=f"{d / 'evil.py'}:build"))[1],
        "may name only built-in backbones",
    ),
    "D2 bench --json over an existing file": (_bench_existing, "pass --force"),
    "D2 verify --out-dir over an earlier report": (_verify_existing, "pass --force"),
    "D3 fuse a FIFO": (_fifo, "not a regular file"),
    "D3 fuse /dev/zero": (lambda d: _fuse(Path("/dev/zero"), _good(d)[1], d), "not a regular file"),
    "D5 extra resizes a conv bias": (
        lambda d: _extra_resize(d, "conv.bias", [8]),
        "only a classifier head may change shape",
    ),
    "D5 extra resizes a conv weight": (
        lambda d: _extra_resize(d, "conv.weight", [6, 2, 3, 4]),
        "only a classifier head may change shape",
    ),
    "D8 groups 0": (
        lambda d: _edit_layer(d, _set(["geometry", "groups"], 0)),
        "geometry.groups must be an integer in 1..",
    ),
    "D8 rank 1e400": (
        lambda d: _layers_text(d, '"ranks": [1, ', '"ranks": [1e400, '),
        "layer.ranks must be an integer",
    ),
    "D8 in_channels 1e400": (
        lambda d: _layers_text(d, '"in_channels": 4', '"in_channels": 1e400'),
        "geometry.in_channels must be an integer",
    ),
    "D8 deeply nested JSON": (
        lambda d: _edit_layer(d, _set(["geometry"], json.loads("[" * 50 + "]" * 50))),
        "geometry must be a JSON object",
    ),
    "D8 recursion-deep JSON": (
        lambda d: _raw_edit(d, b'"extras":"[]"', b'"extras":"' + b"[" * 100000 + b'"'),
        "'extras' is not valid JSON",
    ),
    "D8 shape [2**64, 0]": (
        lambda d: _raw_edit(d, b'"shape":[6,', b'"shape":[18446744073709551616,0,'),
        "list of at most 8 integers",
    ),
    "D8 70 dims": (
        lambda d: _raw_edit(d, b'"shape":[6,', b'"shape":[' + b"1," * 70 + b"6,"),
        "list of at most 8 integers",
    ),
    "D8 booleans as dims": (lambda d: _raw_edit(d, b'"shape":[6,', b'"shape":[true,'), "list of at most 8 integers"),
    "float rank": (
        lambda d: _edit_layer(d, lambda r: r.update(ranks=[1.0, *r["ranks"][1:]])),
        "layer.ranks must be an integer",
    ),
    "kernel_size as a string": (
        lambda d: _edit_layer(d, _set(["geometry", "kernel_size"], "33")),
        "geometry.kernel_size must be a list",
    ),
    "scaling as a string": (lambda d: _edit_layer(d, _set(["scaling"], "1e3")), "layer.scaling must be a JSON number"),
    "scaling true": (lambda d: _edit_layer(d, _set(["scaling"], True)), "layer.scaling must be a JSON number"),
    "D14 scaling NaN": (lambda d: _layers_text(d, '"scaling": 1.0', '"scaling": NaN'), "is not valid JSON"),
    "D22 scaling 1e39": (lambda d: _edit_layer(d, _set(["scaling"], 1e39)), "scaling must be finite and at most"),
    "no layers and no extras": (_no_layers, "changes nothing"),
    "D20 duplicate tensor key": (lambda d: _duplicate_key(d, b"tensor"), "duplicate key"),
    "D20 duplicate __metadata__": (lambda d: _duplicate_key(d, b'"__metadata__"'), "duplicate key"),
    "D20 overlapping offsets": (lambda d: _offsets(d, "overlap"), "overlaps another tensor or leaves a gap"),
    "D20 unreferenced bytes": (lambda d: _offsets(d, "trailing"), "bytes no tensor owns"),
    "D9 adapter is a folder without PEFT files": (
        lambda d: _fuse(_good(d)[0], d / "x", d),
        "a PEFT adapter folder holds adapter_config.json",
    ),
    "D9 over-long output name": (
        lambda d: ["fuse", *map(str, _good(d)), "-o", str(d / ("n" * 250 + ".onnx"))],
        "too long",
    ),
    "D9 verify --out-dir is a file": (
        lambda d: ((d / "f").write_text("x"), _verify(d, "--out-dir", str(d / "f")))[1],
        "names a file, not a folder",
    ),
    "D9 demo --out is a file": (
        lambda d: ((d / "f").write_text("x"), ["demo", "--out", str(d / "f")])[1],
        "names a file, not a folder",
    ),
    "D11 model file with a syntax error": (
        lambda d: _user_spec(d, "def build(:\n"),
        "raised an error while it was imported",
    ),
    "D11 model file whose import raises": (
        lambda d: _user_spec(d, "import no_such_module_xyz\n"),
        "raised an error while it was imported",
    ),
    "D11 callable that raises": (
        lambda d: _user_spec(d, "def build(**kw):\n    raise RuntimeError('boom')\n"),
        "callable raised an error",
    ),
    "D11 spec ':build'": (
        lambda d: ["pretrain", "--model", ":build", "--out", str(d / "m.pt"), "--steps", "1"],
        "a model spec is NAME",
    ),
    "D12 string X": (lambda d: _npz(d, X=np.array([["a"] * 16] * 6 * 4).reshape(4, 6, 16)), "X must be numeric"),
    "D12 C = 0": (lambda d: _npz(d, X=np.zeros((4, 0, 16), np.float32)), "C >= 1"),
    "D12 T = 1": (lambda d: _npz(d, X=np.zeros((4, 6, 1), np.float32)), "T (H, W) >= 2"),
    "D12 empty arrays": (
        lambda d: _npz(d, X=np.zeros((0, 6, 16), np.float32), y=np.zeros(0, int), subject=np.zeros(0, int)),
        "N >= 1",
    ),
    "D12 2-D y": (lambda d: _npz(d, y=np.zeros((4, 2), int)), "y must be 1-D"),
    "D12 huge label": (lambda d: _npz(d, y=np.array([0, 1, 0, 10**12])), "labels must be class indices"),
    "D12 zip bomb": (_bomb, "expands to more than"),
    "D13 classes missing": (lambda d: _ckpt(d, classes=None), "'classes' must be"),
    "D13 in_channels 'six'": (lambda d: _ckpt(d, in_channels="six"), "'in_channels' must be"),
    "D13 in_channels -1": (lambda d: _ckpt(d, in_channels=-1), "'in_channels' must be"),
    "D13 state_dict a list": (lambda d: _ckpt(d, state_dict=[1, 2]), "'state_dict' must be"),
    "D14 --lr inf": (lambda d: ["pretrain", "--lr", "inf", "--out", str(d / "m.pt")], "--lr must be a finite number"),
    "D14 float labels": (lambda d: _npz(d, y=np.array([0.0, 1.5, 0.0, 1.0])), "y must hold integers"),
    "D14 NaN subject ids": (lambda d: _npz(d, subject=np.array([0.0, np.nan, 1.0, 2.0])), "subject must hold integers"),
    "D18 --force onto the base's external data": (_external_base, "or a file they use"),
    "D21 -o newdir/": (
        lambda d: ["fuse", *map(str, _good(d)), "-o", str(d / "newdir") + "/"],
        "must name a file, not a folder",
    ),
    "verify --atol nan": (lambda d: _verify(d, "--atol", "nan"), "finite number >= 0"),
    "verify --atol -1": (lambda d: _verify(d, "--atol", "-1"), "finite number >= 0"),
    "verify --real -1": (lambda d: _verify(d, "--real", "-1"), "--real must be an integer from 0 to 10000"),
    "verify --random 0": (lambda d: _verify(d, "--random", "0"), "--random must be an integer from 1 to 10000"),
    "bench --runs 0": (
        lambda d: ["bench", str(_verify_models(d)[0]), "--runs", "0"],
        "--runs must be an integer from 1 to 100000",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile(case, tmp_path, capsys):
    captured = run_refused(*CASES[case], tmp_path, capsys)
    assert "Warning" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1, captured.err


def test_verify_that_fails_before_running_leaves_no_out_dir(tmp_path, capsys):
    assert main(_verify(tmp_path, "--data", "digits:9")) == 2
    assert "digits severity must be 1..5" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_missing_extra_is_one_line_naming_the_extra(tmp_path):
    base, unfused = _verify_models(tmp_path)
    argv = ["verify", str(base), "--reference", str(unfused), "--data", "none", "--out-dir", str(tmp_path / "v")]
    code = f"import sys; sys.modules['polygraphy'] = None; from toolchain.cli import main; sys.exit(main({argv!r}))"
    proc = _run(code)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'toolchain[verify]'" in proc.stderr and "Traceback" not in proc.stderr


def test_inspect_into_a_closed_pipe_is_quiet(tmp_path):
    _, adapter = _good(tmp_path)
    proc = subprocess.run(
        f"{sys.executable} -m toolchain.cli inspect {adapter} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.stdout.strip() == "{" and "Traceback" not in proc.stderr and "Error" not in proc.stderr


def test_malformed_engine_sidecar_is_reported_not_raised(tmp_path, capsys):
    (tmp_path / "e.plan").write_bytes(b"not an engine")
    (tmp_path / "e.plan.json").write_text("{broken")
    assert main(["inspect", str(tmp_path / "e.plan")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (
        info["record"] is None
        and "not a toolchain engine record" in info["record_error"]
        and info["tensorrt_version"] is None
    )


def test_fp16_engine_without_sidecar_needs_explicit_tolerances(tmp_path):
    from toolchain.core.errors import ToolchainError
    from toolchain.verify import VerifyOptions, _engine_tolerance

    (tmp_path / "e.plan").write_bytes(b"engine")
    with pytest.raises(ToolchainError, match="precision is unknown"):
        _engine_tolerance(str(tmp_path / "e.plan"), VerifyOptions())
    import hashlib

    from toolchain.trt.record import EngineRecord, write_record

    plan_sha = hashlib.sha256(b"engine").hexdigest()
    record = EngineRecord("build", "m.onnx", "0" * 64, "0" * 64, "fp16", "none", (), "10.3.0", plan_sha)
    write_record(tmp_path / "e.plan", record)
    assert _engine_tolerance(str(tmp_path / "e.plan"), VerifyOptions())[:2] == (1e-2, 1e-2)
    assert _engine_tolerance(str(tmp_path / "e.plan"), VerifyOptions(engine_atol=0.5, engine_rtol=0.5))[:2] == (
        0.5,
        0.5,
    )
    (tmp_path / "e.plan.json").write_text(json.dumps({"options": {"fp16": True}}))  # a sidecar from before the record
    with pytest.raises(ToolchainError, match="not a toolchain engine record"):
        _engine_tolerance(str(tmp_path / "e.plan"), VerifyOptions())
