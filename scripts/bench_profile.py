"""Per-step cost of every PEFT method on the three backbones (no training): FLOPs and memory by category.

python scripts/bench_profile.py --rank 4 --batch 32
"""

from __future__ import annotations

import argparse
import copy

import torch

from toolchain.adapters.methods import METHODS, get_method
from toolchain.models.registry import build_model
from toolchain.peft.inject import AdaptConfig, inject, set_train_mode
from toolchain.profile import profile_step
from toolchain.workflows import make_optimizer

TARGETS = {"cnn1d": "all", "resnet1d": "all", "mobilenet1d": "pointwise"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
    torch.set_num_threads(1)
    mib = 1 / 2**20
    print(
        "| backbone | method | trainable % | MFLOP fwd / bwd / opt | memory MiB param / grad / opt / act | "
        "total MiB | saved vs full (total) | saved vs full (without activations) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in ("cnn1d", "resnet1d", "mobilenet1d"):
        torch.manual_seed(0)
        base = build_model(name, 6, 6)
        x, y = torch.randn(a.batch, 6, 128), torch.randint(0, 6, (a.batch,))
        rows = {}
        for method in METHODS:
            m = copy.deepcopy(base)
            cfg = AdaptConfig(method=method, rank=a.rank, layers=TARGETS[name])
            inject(m, cfg)
            frac = sum(p.numel() for p in m.parameters() if p.requires_grad) / sum(p.numel() for p in m.parameters())
            rows[method] = (
                frac,
                profile_step(
                    m, make_optimizer(m, cfg, get_method(method).lr), x, y, lambda mm: set_train_mode(mm, False)
                ),
            )
        full = rows["full"][1]
        full_tot = full.param_bytes + full.grad_bytes + full.optimizer_bytes + full.activation_bytes
        full_noact = full_tot - full.activation_bytes
        for method, (frac, p) in rows.items():
            tot = p.param_bytes + p.grad_bytes + p.optimizer_bytes + p.activation_bytes
            print(
                f"| {name} | {method} | {100 * frac:.2f} | {p.forward_flops / 1e6:.0f} / "
                f"{p.backward_flops / 1e6:.0f} / {p.optimizer_flops / 1e6:.2f} | "
                f"{p.param_bytes * mib:.2f} / {p.grad_bytes * mib:.2f} / {p.optimizer_bytes * mib:.2f} / "
                f"{p.activation_bytes * mib:.2f} | {tot * mib:.2f} | "
                f"{100 * (1 - tot / full_tot):.1f}% | {100 * (1 - (tot - p.activation_bytes) / full_noact):.1f}% |"
            )


if __name__ == "__main__":
    main()
