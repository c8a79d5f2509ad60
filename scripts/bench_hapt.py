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
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from toolchain.data.sources import HAPT_TEST_USERS, load_hapt
from toolchain.data.windows import fit_standardization, split_subjects, time_split
from toolchain.models.registry import build_model
from toolchain.peft.inject import AdaptConfig, inject, set_train_mode
from toolchain.train import TrainConfig, count_params, evaluate, train

TARGETS = {"cnn1d": "all", "resnet1d": "all", "mobilenet1d": "pointwise"}


def _done(path: Path) -> set[tuple]:
    if not path.is_file():
        return set()
    return {(r["backbone"], r["seed"], r["user"], r["method"], r["rank"]) for r in map(json.loads, path.read_text().splitlines())}


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    ds = load_hapt(args.data)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _done(out)
    dev = torch.device("cpu")
    for backbone in args.backbones:
        for seed in range(args.seeds):
            source, target = split_subjects(ds, HAPT_TEST_USERS)
            torch.manual_seed(seed)
            base = build_model(backbone, 6, len(ds.classes))
            mean, std = fit_standardization(source)
            base.norm.mean.copy_(torch.from_numpy(mean).view(1, -1, 1))
            base.norm.std.copy_(torch.from_numpy(std).view(1, -1, 1))
            t0 = time.perf_counter()
            train(base, source, TrainConfig(lr=2e-3, epochs=args.pretrain_epochs, seed=seed, progress=False))
            print(f"{backbone} seed {seed}: pretrained in {time.perf_counter() - t0:.0f} s", flush=True)
            for user in HAPT_TEST_USERS:
                adapt, test = time_split(target.take(target.subject == user))
                f1_src, _ = evaluate(base, test, dev)
                jobs = [("source-only", 0)] + [("lora-edge", r) for r in args.ranks] + [("full", 0)]
                for method, rank in jobs:
                    if (backbone, seed, user, method, rank) in done:
                        continue
                    row = _adapt(base, adapt, test, backbone, method, rank, seed, args.epochs, f1_src)
                    row.update(backbone=backbone, seed=seed, user=user)
                    with out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(json.dumps(row), flush=True)


def _adapt(base, adapt, test, backbone, method, rank, seed, epochs, f1_src) -> dict:
    dev = torch.device("cpu")
    if method == "source-only":
        return {"method": method, "rank": 0, "f1": f1_src, "trainable": 0, "total": count_params(base)[1], "seconds": 0.0}
    model = copy.deepcopy(base)
    if method == "lora-edge":
        cfg = AdaptConfig(rank=rank, targets=TARGETS[backbone])
        inject(model, cfg)
        res = train(model, adapt, TrainConfig(lr=5e-3, batch_size=32, epochs=epochs, seed=seed, progress=False), set_mode=lambda m: set_train_mode(m, False))
    else:
        res = train(model, adapt, TrainConfig(lr=1e-3, batch_size=32, epochs=epochs, seed=seed, progress=False), set_mode=lambda m: set_train_mode(m, False))
    trainable, total = count_params(model)
    return {"method": method, "rank": rank, "f1": evaluate(model, test, dev)[0], "f1_source_only": f1_src, "trainable": trainable, "total": total, "seconds": res.seconds}


def summary(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    lines = ["| backbone | method | rank | trainable % | macro-F1 mean | std over users | std over seeds | users x seeds |", "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["backbone"], r["method"], r["rank"]) for r in rows}, key=lambda k: (k[0], ["source-only", "lora-edge", "full"].index(k[1]), k[2]))
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
