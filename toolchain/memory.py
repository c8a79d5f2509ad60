"""Training memory by accounting, and the largest batch that fits a memory budget.

The accounting is ``toolchain.profile``'s: parameters + gradients + optimizer state + the tensors
autograd keeps for backward in one forward pass (on the path training will use, lean or reference).
Activations grow linearly with the batch, so two probes (batch 1 and 2) give the per-window cost.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from toolchain.core.errors import ToolchainError
from toolchain.data.windows import WindowDataset
from toolchain.peft.lean import lean_training
from toolchain.profile import step_memory

MIB = 1 << 20
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1 << 10,
    "m": MIB,
    "mb": MIB,
    "g": 1 << 30,
    "gb": 1 << 30,
    "kib": 1 << 10,
    "mib": MIB,
    "gib": 1 << 30,
}


def parse_size(text: str) -> int:
    """``512MB``, ``1.5GiB``, ``800m`` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise ToolchainError(
            "a memory size is a positive number with an optional unit (KB, MB, GB)",
            seen=text,
            remedy="pass e.g. --memory-budget 512MB",
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class MemoryAccount:
    fixed_bytes: int  # parameters, gradients, optimizer state
    activation_base_bytes: int
    activation_per_window_bytes: int

    def at(self, batch: int) -> int:
        return self.fixed_bytes + self.activation_base_bytes + batch * self.activation_per_window_bytes


OptFactory = Callable[[nn.Module], torch.optim.Optimizer]


def account(
    model: nn.Module, make_opt: OptFactory, data: WindowDataset, set_mode: Callable[[nn.Module], None], lean: bool
) -> MemoryAccount:
    """Probe one training step at batch 1 and 2 on copies of ``model`` (the model is not changed)."""
    sizes = []
    for batch in (1, 2):
        probe = copy.deepcopy(model)
        idx = np.arange(batch) % max(len(data), 1)
        x, y = torch.from_numpy(data.X[idx]), torch.from_numpy(data.y[idx])
        with lean_training(probe, lean):
            prof = step_memory(probe, make_opt(probe), x, y, set_mode)
        sizes.append(prof)
    per = max(0, sizes[1].activation_bytes - sizes[0].activation_bytes)
    fixed = sizes[0].param_bytes + sizes[0].grad_bytes + sizes[0].optimizer_bytes
    return MemoryAccount(fixed, max(0, sizes[0].activation_bytes - per), per)


def batch_for_budget(acc: MemoryAccount, budget: int, windows: int) -> int:
    """The largest batch whose accounted memory fits ``budget``, at most the number of windows."""
    room = budget - acc.fixed_bytes - acc.activation_base_bytes
    if room < acc.activation_per_window_bytes:
        raise ToolchainError(
            "the memory budget does not fit even a batch of one window",
            seen=f"budget {budget / MIB:.1f} MiB, needed {acc.at(1) / MIB:.1f} MiB",
            remedy="raise --memory-budget, adapt fewer layers (--layers pointwise) or use a smaller rank",
        )
    return int(min(windows, room // max(acc.activation_per_window_bytes, 1)))
