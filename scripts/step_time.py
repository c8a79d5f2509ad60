"""Median CPU time of one lean-path training step (1 thread; `time.process_time`, so other load on the
machine counts less than in wall time), for comparing two versions of the code side by side:

    git worktree add /tmp/old <rev>
    for i in 1 2 3; do
      PYTHONPATH=/tmp/old python3 scripts/step_time.py runs/bench_memory/cnn1d.pt lora-edge 512
      python3 scripts/step_time.py runs/bench_memory/cnn1d.pt lora-edge 512
    done

16 steps on the first ``batch`` samples of ``--data``; the first 2 are dropped as warm-up.
"""

from __future__ import annotations

import argparse
import time

import torch
from step_peak import prepared, train_step  # scripts/ is on the path when run as python3 scripts/step_time.py

from toolchain.peft.lean import lean_training


def step_seconds(checkpoint: str, method: str, batch: int, data: str, layers: str, steps: int = 16) -> float:
    torch.set_num_threads(1)
    model, opt, x, y = prepared(checkpoint, method, batch, layers, data)
    times = []
    with lean_training(model, method != "full"):
        for _ in range(steps):
            t0 = time.process_time()
            train_step(model, opt, x, y)
            times.append(time.process_time() - t0)
    kept = sorted(times[2:])
    return kept[len(kept) // 2]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("method")
    ap.add_argument("batch", type=int)
    ap.add_argument("--data", default="watch")
    ap.add_argument("--layers", default="all")
    a = ap.parse_args()
    print(f"{a.method}: median step {1e3 * step_seconds(a.checkpoint, a.method, a.batch, a.data, a.layers):.1f} ms CPU")
