"""`toolchain fleet`: per-user adapters, fused and verified; a failing user does not stop the others."""

import json

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
