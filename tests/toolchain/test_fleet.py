"""`toolchain fleet`: per-user adapters, fused and verified; a failing user does not stop the others."""

import json

import numpy as np
import pytest

from toolchain.cli import main
from toolchain.core.errors import ToolchainError
from toolchain.fleet import read_manifest


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    ck = tmp_path_factory.mktemp("fleet") / "base.pt"
    assert main(["pretrain", "--out", str(ck), "--epochs", "1", "--no-progress"]) == 0
    return ck


def test_fleet_adapts_fuses_verifies_and_reports_failures(tmp_path, base, capsys):
    manifest = tmp_path / "m.json"
    users = [
        {"name": "wearer-08", "subjects": [8]},
        {"name": "ghost", "subjects": [99]},
        {"name": "wearer-10", "subjects": [10]},
    ]
    manifest.write_text(json.dumps({"data": "watch", "users": users}))
    out = tmp_path / "fleet"
    args = ["fleet", str(manifest), "--checkpoint", str(base), "--out", str(out), "--epochs", "2", "--no-progress"]
    assert main(args) == 1, "one user failed"
    summary = (out / "summary.md").read_text()
    assert "| ghost | failed |" in summary and "target subjects are not in the data" in summary
    assert not (out / "ghost").exists(), "a failed user leaves no folder behind"
    for name in ("wearer-08", "wearer-10"):
        report = json.loads((out / name / "verify" / "verify.json").read_text())
        assert report["passed"] and report["comparisons"]["model"]["outputs"]
        assert {p.name for p in (out / name).iterdir()} >= {
            "adapter.safetensors",
            "fused.onnx",
            "unfused.onnx",
            "base.onnx",
            "verify",
        }
    rows = (out / "summary.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["wearer-08", "ghost", "wearer-10"], "manifest order"
    stamp = (out / "wearer-08" / "fused.onnx").stat().st_mtime_ns
    assert main(args) == 1
    assert (out / "wearer-08" / "fused.onnx").stat().st_mtime_ns == stamp, "finished users come from the cache"
    assert "(2 from the cache)" in capsys.readouterr().out
    (out / "wearer-10" / "fused.onnx").write_bytes(
        b"truncated"
    )  # R23: a damaged output is not "verified (from the cache)"
    (out / "wearer-08" / "fused.onnx").unlink()
    assert main(args) == 1
    assert "(0 from the cache)" in capsys.readouterr().out
    assert json.loads((out / "wearer-10" / "verify" / "verify.json").read_text())["passed"]


def test_fleet_leaves_a_foreign_folder_alone(tmp_path, base):
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"data": "watch", "users": [{"name": "a", "subjects": [8]}]}))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert (
        main(["fleet", str(manifest), "--checkpoint", str(base), "--out", str(tmp_path / "mine"), "--no-progress"]) == 2
    )
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("[]", "non-empty list 'users'"),
        ('{"users": []}', "non-empty list 'users'"),
        ('{"users": [{"name": "a"}]}', "has no data"),
        ('{"data": "watch", "users": [{"name": "../up"}]}', "names must be unique"),
        ('{"data": "watch", "users": [{"name": "a"}, {"name": "a"}]}', "names must be unique"),
        ('{"data": "watch", "users": [{"name": "a", "subjects": "8"}]}', "list of integers"),
        ('{"data": "watch", "users": [{"name": "a", "subjects": [true]}]}', "list of integers"),
        ('{"data": "watch", "users": [{"name": "a", "device": 1}]}', "only the keys"),
        ('{"data": "watch", "users": [', "not valid JSON"),
    ],
)
def test_bad_manifests_are_refused(tmp_path, doc, message):
    p = tmp_path / "m.json"
    p.write_text(doc)
    with pytest.raises(ToolchainError, match=message.replace("(", r"\(")):
        read_manifest(str(p))


@pytest.mark.parametrize(
    "argv",
    [
        ["fleet", "M", "--checkpoint", "CK", "--rank", "0"],
        ["fleet", "M", "--checkpoint", "CK", "--rank", "-3"],
        ["compare", "--ranks", "0"],
    ],
)
def test_a_rank_no_layer_can_use_is_refused_before_any_output(tmp_path, base, argv, capsys):
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"data": "watch", "users": [{"name": "a", "subjects": [8]}]}))
    argv = [{"M": str(manifest), "CK": str(base)}.get(a, a) for a in argv]
    assert main([*argv, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "--rank must be an integer >= 1" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def base8(base, tmp_path_factory):
    """The base exported and quantized once (the source subjects' windows calibrate it)."""
    d = tmp_path_factory.mktemp("fleet8")
    assert main(["export", "--checkpoint", str(base), "-o", str(d / "base.onnx")]) == 0
    assert main(["quantize", str(d / "base.onnx"), "-o", str(d / "base.int8.onnx"), "--calibration-batches", "32"]) == 0
    return d / "base.int8.onnx"


def _run_session(path, x):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name, batch = s.get_inputs()[0].name, s.get_inputs()[0].shape[0]
    step = batch if isinstance(batch, int) else len(x)
    rows = [s.run(None, {name: x[i : i + step]})[0] for i in range(0, len(x) - len(x) % step, step)]
    return np.concatenate(rows).argmax(axis=1), len(x) - len(x) % step


def test_fleet_int8_fuses_every_adapter_into_the_one_quantized_base(tmp_path, base, base8, capsys):
    import onnx

    from toolchain.data.sources import load_split
    from toolchain.graphs.qdq import is_quantized

    manifest = tmp_path / "m.json"
    manifest.write_text(
        json.dumps({"data": "watch", "users": [{"name": "w8", "subjects": [8]}, {"name": "w9", "subjects": [9]}]})
    )
    out = tmp_path / "fleet"
    args = ["fleet", str(manifest), "--checkpoint", str(base), "--out", str(out), "--epochs", "2", "--no-progress"]
    rc = main([*args, "--int8", str(base8), "--min-agreement", "0.5"])
    text = capsys.readouterr().out
    assert rc == 0 and "INT8 vs FP32 fused (target test)" in text
    for name, subject in (("w8", 8), ("w9", 9)):
        d = out / name
        assert is_quantized(onnx.load(str(d / "fused.int8.onnx")))
        again = tmp_path / f"{name}.int8.onnx"  # the same bytes as `toolchain fuse` into the quantized base
        assert main(["fuse", str(base8), str(d / "adapter.safetensors"), "-o", str(again)]) == 0
        assert again.read_bytes() == (d / "fused.int8.onnx").read_bytes()
        record = json.loads((d / "int8.json").read_text())
        ds = load_split("watch", "target-test", (subject,))  # this user's held-out windows, measured here again
        x = np.ascontiguousarray(ds.X, dtype=np.float32)
        got, n = _run_session(d / "fused.int8.onnx", x)
        ref, _ = _run_session(d / "fused.onnx", x)
        assert record["subjects"] == [subject] and record["windows"] == len(ds) and not record["recalibrated"]
        assert n == len(ds) and record["top1_agreement"] == pytest.approx(float(np.mean(got == ref)))
    rows = (out / "summary.csv").read_text().splitlines()
    assert "int8_agreement" in rows[0] and len(rows) == 3
    stamp = (out / "w8" / "fused.int8.onnx").stat().st_mtime_ns
    assert main([*args, "--int8", str(base8), "--min-agreement", "0.5"]) == 0
    assert (out / "w8" / "fused.int8.onnx").stat().st_mtime_ns == stamp, "the INT8 outputs come from the cache"
    assert main([*args, "--int8", str(base8), "--min-agreement", "0.5", "--recalibrate"]) == 0
    record = json.loads((out / "w8" / "int8.json").read_text())
    assert record["recalibrated"], "recalibration is part of the cache key: the users ran again"
    scheme = json.loads(
        {p.key: p.value for p in onnx.load(str(out / "w8" / "fused.int8.onnx")).metadata_props}[
            "toolchain.quantization"
        ]
    )
    assert scheme["recalibration"]["split"] == "target-adapt" and scheme["recalibration"]["subjects"] == [8]


@pytest.mark.parametrize(
    ("which", "extra", "message"),
    [
        ("fp32", [], "--int8 must be a quantized model"),
        ("missing", [], "--int8 is not a file"),
        ("other", [], "--int8 must be the quantized base of --checkpoint"),
        (None, ["--recalibrate"], "--recalibrate needs --int8"),
        ("int8", ["--min-agreement", "1.5"], "--min-agreement must be a number in [0, 1]"),
    ],
)
def test_fleet_int8_refusals_come_before_any_output(tmp_path, base, base8, capsys, which, extra, message):
    import onnx

    other = tmp_path / "other.int8.onnx"
    m = onnx.load(str(base8))
    for p in m.metadata_props:
        if p.key == "toolchain.checkpoint_sha256":
            p.value = "0" * 64
    onnx.save(m, str(other))
    paths = {"fp32": base8.parent / "base.onnx", "missing": tmp_path / "nope.onnx", "other": other, "int8": base8}
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"data": "watch", "users": [{"name": "a", "subjects": [8]}]}))
    argv = ["fleet", str(manifest), "--checkpoint", str(base), "--out", str(tmp_path / "out"), "--no-progress"]
    argv += (["--int8", str(paths[which])] if which else []) + extra
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
