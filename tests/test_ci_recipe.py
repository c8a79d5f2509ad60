"""The CPU job of docs/CI.md, run as written: its commands between `begin: cpu-gate` and `end: cpu-gate`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from toolchain.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _job() -> str:
    text = (ROOT / "docs" / "CI.md").read_text()
    block = re.search(r"# begin: cpu-gate\n(.*?)# end: cpu-gate", text, re.S)
    assert block, "docs/CI.md lost its cpu-gate block"
    return "\n".join(line.strip() for line in block.group(1).splitlines())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("ci")
    (d / "models").mkdir()
    assert main(["pretrain", "--out", str(d / "models" / "base.pt"), "--epochs", "1", "--no-progress"]) == 0
    assert (
        main(
            [
                "finetune",
                "--checkpoint",
                str(d / "models" / "base.pt"),
                "--out",
                str(d / "models" / "adapter.safetensors"),
                "--steps",
                "10",
                "--no-progress",
            ]
        )
        == 0
    )
    return d


def _run(cwd: Path, job: str, max_ratio: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "CKPT": "models/base.pt",
        "ADAPTER": "models/adapter.safetensors",
        "MAX_RATIO": max_ratio,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    return subprocess.run(["bash", "-c", job], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_cpu_job_passes_on_a_good_adapter(models):
    run = _run(models, _job(), "1.5")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    for name in ("base.onnx", "unfused.onnx", "fused.onnx", "bench.json", "verify/verify.json"):
        assert (models / "deploy" / name).is_file(), name
    assert (
        "an engine would build" in run.stdout and "latency gate PASSED" in run.stdout and "PASSED: report" in run.stdout
    )


def test_the_latency_gate_fails_the_job_for_a_slower_model(models):
    job = (
        _job()
        .replace("--vs deploy/fused.onnx", "--vs deploy/unfused.onnx")
        .replace("mkdir -p deploy", "rm -rf deploy && mkdir -p deploy")
    )
    run = _run(models, job, "1.05")  # the unfused model runs the auxiliary path: 1.2-1.7x the base here
    assert run.returncode == 1 and "latency gate FAILED" in run.stdout, run.stdout[-2000:]
