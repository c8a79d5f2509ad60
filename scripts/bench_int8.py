"""INT8 benchmark: per backbone, fuse each adapter into the one quantized base, against re-quantizing the
fused FP32 model from scratch; agreement and macro-F1 on the target users' test windows; whole-process
cost of `toolchain fuse` into the QDQ model vs the FP32 model; ONNX Runtime CPU latency INT8 vs FP32.

    python scripts/bench_int8.py --out bench_out/int8 [--models cnn1d,resnet1d,...] [--seed N] [--data SPEC] [--quick]

Every step is the CLI a user runs (pretrain, finetune, export, quantize, fuse, bench); the metrics are
``toolchain.verify.task_agreement``. Writes ``results.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import subprocess
import sys
from pathlib import Path

from toolchain.verify import VerifyOptions, task_agreement

MODELS = {  # backbone: (data, pretrain epochs, finetune epochs)
    "cnn1d": ("watch", 8, 15),
    "resnet1d": ("watch", 8, 15),
    "mobilenet1d": ("watch", 8, 15),
    "mobilenet1d-relu": ("watch", 8, 15),  # revision 1 of mobilenet1d, side by side
    "resnet18": ("digits", 4, 4),
    "mobilenetv2": ("digits", 4, 4),
}


def sh(*args: str) -> float:
    """Run a toolchain command under /usr/bin/time; returns the whole-process peak RSS in MB."""
    cmd = ["/usr/bin/time", "-f", "PEAK %M", "toolchain", *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return int(re.findall(r"PEAK (\d+)", res.stderr)[-1]) / 1024


def timed(*args: str, repeats: int = 3) -> tuple[float, float]:
    """(median wall seconds, max peak RSS MB) of a toolchain command, run ``repeats`` times."""
    import time

    walls, peaks = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        peaks.append(sh(*args))
        walls.append(time.perf_counter() - t)
    return sorted(walls)[len(walls) // 2], max(peaks)


def one(model: str, d: Path, quick: bool, seed: int = 0, data_spec: str | None = None) -> dict:
    data, pre, ft = MODELS[model]
    data = data_spec or data
    if quick:
        pre, ft = 1, 2
    d.mkdir(parents=True, exist_ok=True)
    f = {
        k: str(d / v)
        for k, v in dict(
            ckpt="base.pt",
            adapter="adapter.safetensors",
            base="base.onnx",
            fused="fused.onnx",
            base8="base.int8.onnx",
            fused8="fused.int8.onnx",
            recal8="fused.recal.int8.onnx",
            base8x="base.int8-first-float.onnx",
            fused8x="fused.int8-first-float.onnx",
            recal8x="fused.recal.int8-first-float.onnx",
            requant8="fused.requant.int8.onnx",
            requant_t8="fused.requant-target.int8.onnx",
            fused_again="fused.again.onnx",
            qat="adapter.int8-base.safetensors",
            qat_fused="fused.int8-base.onnx",
            qat_fused8="fused.int8-base.int8.onnx",
            lat="latency.json",
        ).items()
    }
    sh(
        "pretrain",
        "--model",
        model,
        "--data",
        data,
        "--epochs",
        str(pre),
        "--out",
        f["ckpt"],
        "--seed",
        str(seed),
        "--force",
        "--no-progress",
    )
    ft_args = ["--checkpoint", f["ckpt"], "--epochs", str(ft), "--seed", str(seed), "--force", "--no-progress"]
    sh("finetune", *ft_args, "--out", f["adapter"])
    sh("export", "--checkpoint", f["ckpt"], "-o", f["base"], "--force")
    sh("fuse", f["base"], f["adapter"], "-o", f["fused"], "--force")
    sh("quantize", f["base"], "-o", f["base8"], "--data", data, "--force")  # once per base, source subjects
    sh("fuse", f["base8"], f["adapter"], "-o", f["fused8"], "--force")
    sh("fuse", f["base8"], f["adapter"], "-o", f["recal8"], "--recalibrate", data, "--force")
    # the first conv left float (quantize --exclude @first), fused into as above
    sh("quantize", f["base"], "-o", f["base8x"], "--data", data, "--exclude", "@first", "--force")
    sh("fuse", f["base8x"], f["adapter"], "-o", f["fused8x"], "--force")
    sh("fuse", f["base8x"], f["adapter"], "-o", f["recal8x"], "--recalibrate", data, "--force")
    sh("quantize", f["fused"], "-o", f["requant8"], "--data", data, "--force")  # from scratch, same calibration
    sh("quantize", f["fused"], "-o", f["requant_t8"], "--data", data, "--split", "target-adapt", "--force")
    # the adapter trained for the INT8 base (finetune --int8-base), fused into it and into the FP32 base
    sh("finetune", *ft_args, "--out", f["qat"], "--int8-base", f["base8"])
    sh("fuse", f["base"], f["qat"], "-o", f["qat_fused"], "--force")
    sh("fuse", f["base8"], f["qat"], "-o", f["qat_fused8"], "--force")
    opts = VerifyOptions(data=data, split="target-test")
    qat = dataclasses.asdict(task_agreement(f["qat_fused8"], f["qat_fused"], opts))
    rows = {
        k: dataclasses.asdict(task_agreement(f[k], f["fused"], opts))
        for k in ("fused8", "recal8", "requant8", "requant_t8", "fused8x", "recal8x")
    }
    fp32_fuse = timed("fuse", f["base"], f["adapter"], "-o", f["fused_again"], "--force")
    int8_fuse = timed("fuse", f["base8"], f["adapter"], "-o", f["fused_again"], "--force")
    sh("bench", f["fused"], "--vs", f["fused8"], f["fused8x"], "--runs", "300", "--json", f["lat"], "--force")
    lat = json.loads(Path(f["lat"]).read_text())["results"]
    return {
        "model": model,
        "seed": seed,
        "data": data,
        "epochs": [pre, ft],
        "agreement": rows,
        "int8_base_adapter": qat,
        "fuse_seconds": {"fp32": fp32_fuse[0], "int8": int8_fuse[0]},
        "fuse_peak_mb": {"fp32": fp32_fuse[1], "int8": int8_fuse[1]},
        "latency_ms": {
            "fp32": lat[0]["median_ms"],
            "int8": lat[1]["median_ms"],
            "ratio": lat[1]["ratio_to_first"],
            "int8_first_float": lat[2]["median_ms"],
        },
    }


def _cell(agreement: dict, route: str) -> str:
    """A route's INT8 macro-F1 and, in brackets, its top-1 agreement with the fused FP32 model."""
    a = agreement[route]
    return f"{a['f1_model']:.4f} ({a['top1_agreement']:.4f})"


def int8_base_table(results: list[dict]) -> str:
    """The adapter trained for the INT8 base (finetune --int8-base) beside the plain one."""
    lines = [
        "| model | plain adapter: F1 FP32 fused / INT8 fused (agreement) | --int8-base adapter: F1 FP32 fused / "
        "INT8 fused (agreement) |",
        "|---|---|---|",
    ]
    for r in results:
        a, q = r["agreement"]["fused8"], r["int8_base_adapter"]
        lines.append(
            f"| {r['model']} | {a['f1_reference']:.4f} / {a['f1_model']:.4f} ({a['top1_agreement']:.4f}) | "
            f"{q['f1_reference']:.4f} / {q['f1_model']:.4f} ({q['top1_agreement']:.4f}) |"
        )
    return "\n".join(lines)


def first_float_table(results: list[dict]) -> str:
    """The base quantized with its first conv left float (quantize --exclude @first) beside all-INT8."""
    lines = [
        "| model | seed | F1 FP32 fused | all INT8: fused (agreement) / + recalibrate | first conv float: fused "
        "(agreement) / + recalibrate | ORT ms all INT8 / first float |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        a = r["agreement"]
        cell = functools.partial(_cell, a)
        lines.append(
            f"| {r['model']} | {r['seed']} | {a['fused8']['f1_reference']:.4f} | {cell('fused8')} / {cell('recal8')} | "
            f"{cell('fused8x')} / {cell('recal8x')} | {r['latency_ms']['int8']:.4f} / "
            f"{r['latency_ms']['int8_first_float']:.4f} |"
        )
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    head = (
        "| model | windows | F1 FP32 fused | F1 INT8 fused into quantized base (agreement) | + recalibrate | "
        "re-quantized from scratch (agreement) | re-quantized on target | fuse s INT8/FP32 | fuse MB INT8/FP32 | "
        "ORT ms FP32 / INT8 |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in results:
        a = r["agreement"]
        cell = functools.partial(_cell, a)
        lines.append(
            f"| {r['model']} | {a['fused8']['windows']} | {a['fused8']['f1_reference']:.4f} | {cell('fused8')} | "
            f"{cell('recal8')} | {cell('requant8')} | {cell('requant_t8')} | "
            f"{r['fuse_seconds']['int8']:.2f} / {r['fuse_seconds']['fp32']:.2f} | "
            f"{r['fuse_peak_mb']['int8']:.0f} / {r['fuse_peak_mb']['fp32']:.0f} | "
            f"{r['latency_ms']['fp32']:.4f} / {r['latency_ms']['int8']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_out/int8")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--seed", type=int, default=0, help="pretrain and finetune seed (default 0)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--data", default=None, help="data spec for every model instead of its own (e.g. hapt:FOLDER)")
    a = ap.parse_args()
    results = []
    for m in a.models.split(","):
        results.append(one(m, Path(a.out) / m, a.quick, a.seed, a.data))
        print(json.dumps(results[-1]), flush=True)
    Path(a.out, "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    print(int8_base_table(results))
    print(first_float_table(results))


if __name__ == "__main__":
    main()
