"""Lean vs reference training path: memory two ways and step time, every method x backbone.

1. Accounting (toolchain.profile): parameters + gradients + optimizer state + saved activations of
   one training step at batch 512, lean and reference path, and full fine-tuning.
2. Whole-process peak RSS: `toolchain finetune --batch-size 512 --steps 3` in a fresh process per
   (backbone, method, path), read with wait4's rusage, minus the same run with --method head
   (no backward through the convs), so data loading and evaluation cancel out.
3. Step time, interleaved: one thread, batch 64, every configuration steps once per round in a
   shuffled order; the median over rounds, as a ratio to full fine-tuning's.

    python scripts/bench_lean.py --out runs/bench_lean.json            # all three (about 20 min here)
    python scripts/bench_lean.py --out runs/bench_lean.json --summary  # Markdown tables
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from toolchain.adapters.methods import METHODS, get_method
from toolchain.data.sources import load_data
from toolchain.memory import MIB
from toolchain.models.registry import build_model
from toolchain.peft.inject import AdaptConfig, inject, set_train_mode
from toolchain.peft.lean import lean_training
from toolchain.profile import step_memory
from toolchain.workflows import make_optimizer

BACKBONES = {"cnn1d": "all", "resnet1d": "all", "mobilenet1d": "pointwise"}


def _model(backbone: str, method: str, layers: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(backbone, 6, 7)
    inject(model, AdaptConfig(method=method, rank=4, layers=layers))
    return model


def _paths(method: str) -> list[str]:
    return ["lean", "reference"] if get_method(method).base_frozen else ["reference"]


def accounting(batch: int) -> list[dict]:
    ds = load_data("watch")
    x, y = torch.from_numpy(ds.X[:batch]), torch.from_numpy(ds.y[:batch] % 7)
    rows = []
    for backbone, layers in BACKBONES.items():
        for method in METHODS:
            for path in _paths(method):
                model = _model(backbone, method, layers)
                opt = make_optimizer(model, AdaptConfig(method=method, rank=4), get_method(method).lr)
                with lean_training(model, path == "lean"):
                    mem = step_memory(model, opt, x, y, lambda m: set_train_mode(m, False))
                rows.append(
                    {
                        "backbone": backbone,
                        "method": method,
                        "path": path,
                        "total_mib": mem.total_bytes / MIB,
                        "activation_mib": mem.activation_bytes / MIB,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


# Linux carries a process's peak-RSS mark into a forked child, so a child of this (large) process
# would report at least this process's size. A small launcher spawns the command and reads wait4's
# rusage for it: its own size (about 13 MiB) is the floor instead.
LAUNCHER = (
    "import os, sys; pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ); _, st, ru = "
    "os.wait4(pid, 0); print(ru.ru_maxrss, os.waitstatus_to_exitcode(st))"
)


def _peak_rss(argv: list[str]) -> float:
    """Peak RSS (MiB) of a fresh process running ``argv``."""
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], capture_output=True, text=True, check=True)
    kib, rc = proc.stdout.split()[-2:]
    if rc != "0":
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr[-500:]}")
    return int(kib) / 1024.0


def peak_rss(batch: int, steps: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for backbone, layers in BACKBONES.items():
            ckpt = f"{d}/{backbone}.pt"
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "toolchain.cli",
                    "pretrain",
                    "--model",
                    backbone,
                    "--steps",
                    "5",
                    "--out",
                    ckpt,
                    "--no-progress",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )

            def run(method: str, path: str, ckpt: str = ckpt, layers: str = layers) -> float:
                argv = [
                    sys.executable,
                    "-m",
                    "toolchain.cli",
                    "finetune",
                    "--checkpoint",
                    ckpt,
                    "--method",
                    method,
                    "--layers",
                    layers,
                    "--rank",
                    "4",
                    "--batch-size",
                    str(batch),
                ]
                argv += ["--steps", str(steps), "--out", f"{d}/a.safetensors", "--force", "--no-progress"] + (
                    ["--reference-path"] if path == "reference" else []
                )
                return _peak_rss(argv)

            head = statistics.median(run("head", "lean") for _ in range(2))
            for method in METHODS:
                for path in _paths(method):
                    rss = run(method, path)
                    rows.append(
                        {
                            "backbone": backbone,
                            "method": method,
                            "path": path,
                            "peak_rss_mib": rss,
                            "above_head_mib": rss - head,
                            "head_mib": head,
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def step_time(batch: int, rounds: int) -> list[dict]:
    torch.set_num_threads(1)
    ds = load_data("watch")
    x, y = torch.from_numpy(ds.X[:batch]), torch.from_numpy(ds.y[:batch] % 7)
    rows = []
    for backbone, layers in BACKBONES.items():
        configs = {(m, p): _model(backbone, m, layers) for m in METHODS for p in _paths(m)}
        opts = {k: make_optimizer(m, AdaptConfig(method=k[0], rank=4), get_method(k[0]).lr) for k, m in configs.items()}
        times: dict[tuple[str, str], list[float]] = {k: [] for k in configs}
        loss_fn = torch.nn.CrossEntropyLoss()
        order = list(configs)
        for r in range(rounds + 2):  # two warm-up rounds
            random.Random(r).shuffle(order)
            for key in order:
                model = configs[key]
                with lean_training(model, key[1] == "lean"):
                    set_train_mode(model, False)
                    t0 = time.perf_counter()
                    opts[key].zero_grad(set_to_none=True)
                    loss_fn(model(x), y).backward()
                    opts[key].step()
                    if r >= 2:
                        times[key].append(time.perf_counter() - t0)
        full = statistics.median(times[("full", "reference")])
        for (method, path), t in times.items():
            rows.append(
                {
                    "backbone": backbone,
                    "method": method,
                    "path": path,
                    "median_ms": 1000 * statistics.median(t),
                    "ratio_to_full": statistics.median(t) / full,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def summary(res: dict) -> str:
    full_acc = {r["backbone"]: r["total_mib"] for r in res["accounting"] if r["method"] == "full"}
    full_rss = {r["backbone"]: r["above_head_mib"] for r in res.get("peak_rss", []) if r["method"] == "full"}
    rss = {(r["backbone"], r["method"], r["path"]): r for r in res.get("peak_rss", [])}
    st = {(r["backbone"], r["method"], r["path"]): r for r in res.get("step_time", [])}
    lines = [
        "| backbone | method | path | accounted MiB (x full) | activations MiB | peak RSS above head-only MiB "
        "(x full) | step ms, 1 thread (x full) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["accounting"]:
        key = (r["backbone"], r["method"], r["path"])
        p, s = rss.get(key), st.get(key)
        rss_txt = f"{p['above_head_mib']:.0f} ({p['above_head_mib'] / full_rss[r['backbone']]:.2f})" if p else "-"
        st_txt = f"{s['median_ms']:.1f} ({s['ratio_to_full']:.2f})" if s else "-"
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {r['total_mib']:.1f} "
            f"({r['total_mib'] / full_acc[r['backbone']]:.2f}) | {r['activation_mib']:.1f} | {rss_txt} | {st_txt} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_lean.json")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--step-batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--parts", default="accounting,peak_rss,step_time")
    ap.add_argument("--summary", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    if a.summary:
        print(summary(json.loads(out.read_text())))
        return
    res = json.loads(out.read_text()) if out.is_file() else {}
    for part in a.parts.split(","):
        res[part] = {
            "accounting": lambda: accounting(a.batch),
            "peak_rss": lambda: peak_rss(a.batch, a.steps),
            "step_time": lambda: step_time(a.step_batch, a.rounds),
        }[part]()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
    print(summary(res))


if __name__ == "__main__":
    main()
