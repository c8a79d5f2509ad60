"""Fuzz `toolchain fuse` and `toolchain inspect` with mutated adapter and ONNX files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _fuzz(tmp_path, cases: int, seed: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.graphs.fuzz_harness", str(tmp_path), str(cases), str(seed)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode in (0, 1), f"the harness crashed (signal?) rc={proc.returncode}: {proc.stderr[-2000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failures"] == [], result["failures"][:5]
    assert result["worst_seconds"] < 10
    return result


def test_mutated_files_only_raise_toolchain_errors_quick(tmp_path):
    result = _fuzz(tmp_path, 80, 4321)
    refused = sum(v for k, v in result["counts"].items() if k.endswith(":refused"))
    assert refused > 100, result["counts"]


@pytest.mark.slow
def test_mutated_files_only_raise_toolchain_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tests.graphs.fuzz_harness", str(tmp_path), "600", "1234"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode in (0, 1), f"the harness crashed (signal?) rc={proc.returncode}: {proc.stderr[-2000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failures"] == [], result["failures"][:5]
    refused = sum(v for k, v in result["counts"].items() if k.endswith(":refused"))
    assert refused > 1000, result["counts"]  # most mutations must be caught, not silently accepted
    assert result["worst_seconds"] < 10
