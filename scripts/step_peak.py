"""Peak RSS of single training steps, above the RSS just before each step (Linux: VmHWM reset through
/proc/self/clear_refs), for one checkpoint and method on the lean path (full: PyTorch's own path).

    MALLOC_MMAP_THRESHOLD_=131072 python3 scripts/step_peak.py runs/bench_memory/cnn1d.pt lora-edge 512

Prints the peak of steps 1, 2 and 3: the first step carries one-off allocations (kernel caches, first
buffers); the later ones are the steady state.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from toolchain.adaptation import make_optimizer
from toolchain.data.sources import load_data
from toolchain.models.registry import load_checkpoint
from toolchain.peft.inject import AdaptConfig, inject, set_train_mode
from toolchain.peft.lean import lean_training


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def prepared(
    checkpoint: str, method: str, batch: int, layers: str, data: str
) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    """The checkpoint adapted with ``method`` (rank 4), its optimizer and the first ``batch`` samples."""
    model, _ = load_checkpoint(checkpoint)
    cfg = AdaptConfig(method=method, rank=4, layers=layers)
    inject(model, cfg)
    ds = load_data(data)
    x, y = torch.from_numpy(ds.X[:batch]), torch.from_numpy(ds.y[:batch])
    return model, make_optimizer(model, cfg, 1e-3), x, y


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One optimizer step with BatchNorm frozen, as ``finetune`` trains."""
    set_train_mode(model, False)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_peaks(checkpoint: str, method: str, batch: int, layers: str, data: str, steps: int = 3) -> list[float]:
    model, opt, x, y = prepared(checkpoint, method, batch, layers, data)
    peaks = []
    with lean_training(model, method != "full"):
        for _ in range(steps):
            before = _status_mib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            train_step(model, opt, x, y)
            peaks.append(round(_status_mib("VmHWM") - before, 1))
    return peaks


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("method")
    ap.add_argument("batch", type=int)
    ap.add_argument("--layers", default="all")
    ap.add_argument("--data", default="watch")
    a = ap.parse_args()
    print(
        a.method,
        "step peaks above the pre-step RSS, MiB:",
        step_peaks(a.checkpoint, a.method, a.batch, a.layers, a.data),
    )
