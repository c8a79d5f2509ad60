"""Mutate valid adapter and ONNX files and feed them to `toolchain fuse` and `toolchain inspect`.

Run as ``python -m tests.graphs.fuzz_harness OUTDIR CASES SEED``; prints one JSON summary line and
exits 1 if any case raised something other than ToolchainError. Run in a child process so that a
crash (a signal) is seen by the parent instead of killing the test run.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import struct
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from tests.graphs.onnx_builders import build_pair
from toolchain.adapters.adapter_file import ConvGeometry, save_adapter
from toolchain.cli import main


def _header_edit(data: bytes, rng: random.Random) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    name = rng.choice([k for k in header if k != "__metadata__"])
    edit = rng.choice(["shape", "offsets", "dtype", "meta", "drop", "huge_len"])
    if edit == "shape":
        header[name]["shape"] = [rng.choice([-1, 0, 3, 10**12, "x"]) for _ in range(rng.randint(0, 4))]
    elif edit == "offsets":
        header[name]["data_offsets"] = [rng.randint(-5, 10**10), rng.randint(-5, 10**12)]
    elif edit == "dtype":
        header[name]["dtype"] = rng.choice(["F64", "I64", "BOOL", "F16", 7, None])
    elif edit == "meta":
        key = rng.choice(["layers", "extras", "info", "format_version", "method"])
        header["__metadata__"][key] = rng.choice(
            [
                "{",
                "[]",
                "null",
                '[{"name": 1}]',
                "9" * 400,
                '[{"name":"a","param":"b","method":"lora-edge","geometry":{},"ranks":[1],"scaling":1,"base_sha256":"x"}]',
            ]
        )
    elif edit == "drop":
        header.pop(name)
    else:
        return struct.pack("<Q", rng.choice([2**63, 2**40, n + 1])) + data[8:]
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def mutate(data: bytes, rng: random.Random, safetensors: bool) -> tuple[str, bytes]:
    kind = rng.choice(["truncate", "flip", "flip", "splice"] + (["header"] * 3 if safetensors else []))
    if kind == "truncate":
        return kind, data[: rng.randrange(len(data))]
    if kind == "flip":
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "splice":
        i = rng.randrange(len(data))
        return kind, data[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))) + data[
            i + rng.randint(0, 64) :
        ]
    return kind, _header_edit(data, rng)


def run(outdir: Path, cases: int, seed: int) -> dict:
    rng = random.Random(seed)
    geom = ConvGeometry("conv2d", 4, 6, (3, 3), (1, 1), (1, 1), (1, 1), 2, "zeros", True)
    w = np.random.default_rng(seed).standard_normal(geom.weight_shape).astype(np.float32)
    base, _, adapter = build_pair(geom, w, np.zeros(6, np.float32), 4, 0.1, seed)
    good_onnx, good_adapter = outdir / "base.onnx", outdir / "adapter.safetensors"
    onnx.save(base, good_onnx)
    save_adapter(adapter, good_adapter)
    counts: Counter[str] = Counter()
    worst = 0.0
    failures = []
    for i in range(cases):
        target_adapter = i % 2 == 0
        src = good_adapter if target_adapter else good_onnx
        kind, data = mutate(src.read_bytes(), rng, target_adapter)
        bad = outdir / f"bad{i}{src.suffix}"
        bad.write_bytes(data)
        out = outdir / f"out{i}.onnx"
        for argv in (
            ["fuse", str(good_onnx), str(bad), "-o", str(out)]
            if target_adapter
            else ["fuse", str(bad), str(good_adapter), "-o", str(out)],
            ["inspect", str(bad)],
        ):
            t0 = time.perf_counter()
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    rc = main(argv)
            except BaseException as err:
                failures.append(
                    {
                        "case": i,
                        "file": bad.name,
                        "kind": kind,
                        "argv": argv[0],
                        "error": f"{type(err).__name__}: {err}"[:300],
                    }
                )
                rc = -1
            worst = max(worst, time.perf_counter() - t0)
            outcome = "ok" if rc == 0 else "refused" if rc == 2 else "escaped"
            counts[f"{'adapter' if target_adapter else 'onnx'}:{kind}:{argv[0]}:{outcome}"] += 1
        out.unlink(missing_ok=True)
        bad.unlink()
    return {
        "cases": cases,
        "seed": seed,
        "counts": dict(sorted(counts.items())),
        "worst_seconds": worst,
        "failures": failures,
    }


if __name__ == "__main__":
    result = run(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
    print(json.dumps(result))
    sys.exit(1 if result["failures"] else 0)
