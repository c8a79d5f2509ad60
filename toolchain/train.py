"""The training loop shared by pretraining and adaptation: Adam, mini-batches, macro-F1 tracking."""

from __future__ import annotations

import math
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from toolchain.core.errors import ToolchainError
from toolchain.data.windows import WindowDataset
from toolchain.metrics import accuracy, macro_f1


@dataclass
class TrainConfig:
    """Optimiser and schedule. ``steps`` (if > 0) overrides ``epochs``."""

    lr: float = 1e-3
    batch_size: int = 64
    epochs: int = 10
    steps: int = 0
    seed: int = 0
    device: str = "cpu"
    weight_decay: float = 0.0
    eval_every: int = 0
    progress: bool = True


@dataclass
class TrainResult:
    steps: int
    seconds: float  # training only: evaluation during training is not counted
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, macro-F1 on eval set)
    history_seconds: list[float] = field(default_factory=list)  # training seconds at each history point


def seed_everything(seed: int) -> None:
    """Seed every generator a run draws from: Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_config(cfg: TrainConfig) -> None:
    """Refuse settings that cannot train: a non-finite or non-positive learning rate, empty batches."""
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ToolchainError("--lr must be a finite number > 0", seen=cfg.lr, remedy="pass e.g. --lr 1e-3")
    for name, value, low in (
        ("--batch-size", cfg.batch_size, 1),
        ("--epochs", cfg.epochs, 1),
        ("--steps", cfg.steps, 0),
    ):
        if type(value) is not int or value < low:
            raise ToolchainError(f"{name} must be an integer >= {low}", seen=value)


def check_finite_params(model: nn.Module) -> None:
    """After training: every parameter finite, or the run diverged and nothing may be written."""
    bad = [n for n, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        raise ToolchainError(
            "training diverged: parameters became NaN or Inf, so nothing was written",
            seen=bad[:3],
            remedy="lower --lr and run again",
        )


def resolve_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ToolchainError(
                "--device cuda asked for, but no CUDA GPU is visible to PyTorch",
                seen=name,
                remedy="use --device cpu, or install a CUDA build of torch on a GPU machine",
            )
        return torch.device(name)
    raise ToolchainError("--device must be cpu or cuda[:N]", seen=name)


@torch.no_grad()
def predict(model: nn.Module, ds: WindowDataset, device: torch.device, batch: int = 512) -> np.ndarray:
    from toolchain.peft.inject import merged_for_inference

    model.eval()
    with torch.no_grad(), merged_for_inference(model):  # no graph; adapted convs cost what fused ones cost
        out = [
            model(torch.from_numpy(ds.X[i : i + batch]).to(device)).argmax(1).cpu().numpy()
            for i in range(0, len(ds), batch)
        ]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def evaluate(model: nn.Module, ds: WindowDataset, device: torch.device) -> tuple[float, float]:
    """(macro-F1, accuracy) on ``ds``."""
    pred = predict(model, ds, device)
    return macro_f1(ds.y, pred, len(ds.classes)), accuracy(ds.y, pred)


def train(
    model: nn.Module,
    data: WindowDataset,
    cfg: TrainConfig,
    *,
    set_mode: Callable[[nn.Module], None] | None = None,
    eval_data: WindowDataset | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> TrainResult:
    """Train the parameters with requires_grad on ``data``; cross-entropy, Adam unless given. The batch
    order comes from its own generator seeded with ``cfg.seed``; the global generators are seeded once
    by the caller (pretrain, the adaptation core), before the draws that initialise the model."""
    if len(data) == 0:
        raise ToolchainError("no training windows", seen=0, remedy="check the subject selection")
    check_config(cfg)
    device = resolve_device(cfg.device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ToolchainError("nothing to train: every parameter is frozen", seen=0)
    opt = optimizer or torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.steps or cfg.epochs * max(1, int(np.ceil(len(data) / cfg.batch_size)))
    X, y = torch.from_numpy(data.X), torch.from_numpy(data.y)
    gen = torch.Generator().manual_seed(cfg.seed)
    loss_fn = nn.CrossEntropyLoss()
    history: list[tuple[int, float]] = []
    history_seconds: list[float] = []  # training seconds (evaluation excluded) at each history point
    bar = _progress(total, cfg.progress)
    start, step, eval_seconds = time.perf_counter(), 0, 0.0
    while step < total:
        for idx in torch.randperm(len(data), generator=gen).split(cfg.batch_size):
            if step >= total:
                break
            (set_mode or nn.Module.train)(model)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(X[idx].to(device)), y[idx].to(device))
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if eval_data is not None and cfg.eval_every and step % cfg.eval_every == 0:
                t_eval = time.perf_counter()
                history_seconds.append(t_eval - start - eval_seconds)
                history.append((step, evaluate(model, eval_data, device)[0]))
                eval_seconds += time.perf_counter() - t_eval
    bar.close()
    check_finite_params(model)
    return TrainResult(
        steps=step, seconds=time.perf_counter() - start - eval_seconds, history=history, history_seconds=history_seconds
    )


def _progress(total: int, enabled: bool):  # type: ignore[no-untyped-def]
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="step", leave=False, dynamic_ncols=True)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; frozen buffers (TT cores) are not parameters."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
