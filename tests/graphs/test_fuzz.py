"""Fuzz `toolchain fuse` and `toolchain inspect` with mutated adapter and ONNX files."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mutated_files_only_raise_toolchain_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tests.graphs.fuzz_harness", str(tmp_path), "600", "1234"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode in (0, 1), f"the harness crashed (signal?) rc={proc.returncode}: {proc.stderr[-2000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failures"] == [], result["failures"][:5]
    refused = sum(v for k, v in result["counts"].items() if k.endswith(":refused"))
    assert refused > 1000, result["counts"]  # most mutations must be caught, not silently accepted
    assert result["worst_seconds"] < 10
