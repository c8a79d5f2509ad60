"""Training-step time of full fine-tuning vs LoRA-Edge, side by side, interleaved (CPU, 1 thread).

python scripts/bench_step_time.py --backbones cnn1d resnet1d mobilenet1d
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from toolchain.models.registry import build_model
from toolchain.peft.inject import AdaptConfig, inject, set_train_mode

CONFIGS = {
    "full": AdaptConfig(method="full"),
    "lora-edge r4 (pointwise convs)": AdaptConfig(rank=4, layers="pointwise"),
    "lora-edge r4 (all convs)": AdaptConfig(rank=4),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["cnn1d", "resnet1d", "mobilenet1d"])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print("| backbone | method | median ms per step | ratio to full |\n|---|---|---|---|")
    for name in a.backbones:
        torch.manual_seed(0)
        base = build_model(name, 6, 6)
        x, y = torch.randn(a.batch, 6, 128), torch.randint(0, 6, (a.batch,))
        runs = {}
        for label, cfg in CONFIGS.items():
            try:
                m = copy.deepcopy(base)
                inject(m, cfg)
            except Exception:  # a backbone without pointwise convs
                continue
            runs[label] = (m, torch.optim.Adam([p for p in m.parameters() if p.requires_grad], 1e-3), [])
        for _ in range(a.steps):
            for m, opt, times in runs.values():
                set_train_mode(m, False)
                t0 = time.perf_counter()
                opt.zero_grad()
                torch.nn.functional.cross_entropy(m(x), y).backward()
                opt.step()
                times.append(time.perf_counter() - t0)
        med = {k: statistics.median(v[3:]) for k, (_, _, v) in runs.items()}
        for k, v in med.items():
            print(f"| {name} | {k} | {1000 * v:.1f} | {v / med['full']:.2f} |")


if __name__ == "__main__":
    main()
