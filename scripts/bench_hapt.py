"""HAPT cross-subject benchmark for the training stage (issue: LoRA-Edge vs full fine-tuning).

Pretrain on UCI-HAR's 21 training users; for each of the 9 test users adapt on the first 80% of
each labelled segment's windows (time order) and test on the rest. Source-only, LoRA-Edge at
ranks 2/4/8 and full fine-tuning, per backbone and seed. Rows go to a JSON-lines file as they
finish (re-running skips finished rows); ``--summary`` prints the Markdown table.

    python scripts/bench_hapt.py --data ../shared/data/HAPT --out runs/bench_hapt.jsonl
    python scripts/bench_hapt.py --out runs/bench_hapt.jsonl --summary
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from toolchain.core.methods import METHODS, get_method
from toolchain.data.sources import HAPT_TEST_USERS
from toolchain.peft.inject import AdaptConfig
from toolchain.train import TrainConfig
from toolchain.workflows import FinetuneJob, PretrainJob, finetune, pretrain

LAYERS = {"cnn1d": "all", "resnet1d": "all", "mobilenet1d": "pointwise"}


def _done(path: Path) -> set[tuple]:
    if not path.is_file():
        return set()
    return {(r["backbone"], r["seed"], r["user"], r["method"], r["rank"], r.get("path", "lean")) for r in map(json.loads, path.read_text().splitlines())}


def run(args: argparse.Namespace) -> None:
    """The same `pretrain` and `finetune` that the CLI runs, one adaptation per (user, method, rank)."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = out.with_suffix("")  # checkpoints and adapters beside the results
    work.mkdir(parents=True, exist_ok=True)
    done = _done(out)
    data = f"hapt:{args.data}"
    for backbone in args.backbones:
        for seed in range(args.seeds):
            ckpt = work / f"base_{backbone}_s{seed}.pt"
            if not ckpt.is_file():
                t0 = time.perf_counter()
                pretrain(PretrainJob(out=str(ckpt), model=backbone, data=data, subjects=HAPT_TEST_USERS, train=TrainConfig(lr=2e-3, epochs=args.pretrain_epochs, seed=seed, progress=False)))
                print(f"{backbone} seed {seed}: pretrained in {time.perf_counter() - t0:.0f} s", flush=True)
            for user in HAPT_TEST_USERS:
                for method, rank in [(m, r) for m in args.methods for r in (args.ranks if m in ("lora-edge", "lora", "dora") else [0])]:
                    if (backbone, seed, user, method, rank, args.path) in done:
                        continue
                    row = _adapt(ckpt, work, data, backbone, method, rank, seed, user, args.epochs, args.path == "lean")
                    with out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(json.dumps(row), flush=True)


def _adapt(ckpt: Path, work: Path, data: str, backbone: str, method: str, rank: int, seed: int, user: int, epochs: int, lean: bool) -> dict:
    adapter = work / f"{backbone}_s{seed}_u{user}_{method}_r{rank}.safetensors"
    adapt = AdaptConfig(method=method, rank=max(rank, 1), layers=LAYERS[backbone])
    job = FinetuneJob(checkpoint=str(ckpt), out=str(adapter), adapt=adapt, data=data, subjects=(user,), force=True, lean=lean)
    job.train = TrainConfig(lr=get_method(method).lr, batch_size=32, epochs=epochs, seed=seed, progress=False)
    m = finetune(job)
    return {
        "backbone": backbone,
        "seed": seed,
        "user": user,
        "method": method,
        "rank": rank,
        "f1": m["f1_after"],
        "f1_source_only": m["f1_before"],
        "trainable": m["trainable_params"],
        "total": m["total_params"],
        "seconds": m["train_seconds"],
        "path": m["training_path"],
    }


def summary(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    lines = ["| backbone | method | rank | trainable % | macro-F1 mean | std over users | std over seeds | users x seeds |", "|---|---|---|---|---|---|---|---|"]
    rows += [{**r, "method": "source-only", "rank": 0, "f1": r["f1_source_only"], "trainable": 0} for r in rows if r["method"] == "full"]
    order = ["source-only", *METHODS]
    keys = sorted({(r["backbone"], r["method"], r["rank"]) for r in rows}, key=lambda k: (k[0], order.index(k[1]), k[2]))
    rows = [{**r, "method": r["method"] + (" (reference path)" if r.get("path") == "reference" and r["method"] not in ("full", "source-only") else "")} for r in rows]
    keys = sorted({(r["backbone"], r["method"], r["rank"]) for r in rows}, key=lambda k: (k[0], order.index(k[1].split(" ")[0]), k[1], k[2]))
    for b, m, rk in keys:
        sel = [r for r in rows if (r["backbone"], r["method"], r["rank"]) == (b, m, rk)]
        f1 = np.array([r["f1"] for r in sel])
        per_seed = [np.mean([r["f1"] for r in sel if r["seed"] == s]) for s in sorted({r["seed"] for r in sel})]
        per_user = [np.mean([r["f1"] for r in sel if r["user"] == u]) for u in sorted({r["user"] for r in sel})]
        frac = 100 * sel[0]["trainable"] / sel[0]["total"]
        lines.append(f"| {b} | {m} | {rk or '-'} | {frac:.2f} | {f1.mean():.3f} | {np.std(per_user):.3f} | {np.std(per_seed):.3f} | {len(sel)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/HAPT")
    ap.add_argument("--out", default="runs/bench_hapt.jsonl")
    ap.add_argument("--backbones", nargs="+", default=["cnn1d", "resnet1d", "mobilenet1d"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--methods", nargs="+", default=["lora-edge", "full"], choices=METHODS)
    ap.add_argument("--path", default="lean", choices=["lean", "reference"], help="training path of frozen-base methods (default lean)")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--pretrain-epochs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--summary", action="store_true")
    args = ap.parse_args()
    if args.summary:
        print(summary(Path(args.out)))
    else:
        run(args)


if __name__ == "__main__":
    main()
