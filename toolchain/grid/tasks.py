"""The runs a grid is made of: pretrain a base, adapt it once. Each is a plain function of a dict
(so Ray can ship it); every value a result depends on is in that dict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from toolchain.adaptation import HeadChange, Outcome
from toolchain.adaptation import adapt as adapt_model
from toolchain.adapters.methods import get_method
from toolchain.data.windows import WindowDataset
from toolchain.grid.shifts import get_shift
from toolchain.models.registry import load_checkpoint
from toolchain.peft.inject import AdaptConfig
from toolchain.train import TrainConfig
from toolchain.workflows import PretrainJob, pretrain

LAYERS = {
    "cnn1d": "all",
    "resnet1d": "all",
    "mobilenet1d": "pointwise",
}  # mobilenet1d: its pointwise convs (depthwise ones are 1-channel)


@dataclass
class Adapted:
    """What one adaptation produced: the core's outcome and the grid's row of it."""

    outcome: Outcome
    row: dict[str, Any]

    @property
    def model(self) -> torch.nn.Module:
        return self.outcome.model

    @property
    def config(self) -> AdaptConfig:
        return self.outcome.config


def adapt_once(
    base: torch.nn.Module,
    adapt: WindowDataset,
    test: WindowDataset,
    method: str,
    rank: int,
    *,
    seed: int,
    steps: int,
    eval_every: int,
    batch_size: int,
    layers: str = "all",
    lean: bool = True,
    head: HeadChange | None = None,
    train_head: bool = False,
) -> Adapted:
    """Adapt a copy of ``base`` with the adaptation core (``head``: new classes), train ``steps`` steps on
    ``adapt`` and record macro-F1 on ``test`` at step 0 and every ``eval_every`` steps (with the training
    seconds so far)."""
    spec = get_method(method)
    cfg = AdaptConfig(method=method, rank=max(rank, 1), layers=layers)
    tc = TrainConfig(lr=spec.lr, batch_size=batch_size, steps=steps, seed=seed, eval_every=eval_every, progress=False)
    out = adapt_model(
        base, adapt, test, cfg, tc, head=head, train_head=train_head, lean=lean, eval_during=True, copy_base=True
    )
    return Adapted(out, grid_row(out, method, rank, seed))


def grid_row(out: Outcome, method: str, rank: int, seed: int) -> dict[str, Any]:
    """One run's row in a grid's results (the keys the cached rows have always had)."""
    res = out.result
    return {
        "method": method,
        "rank": rank,
        "seed": seed,
        "trainable_params": out.trainable_params,
        "total_params": out.total_params,
        "trainable_fraction": out.trainable_fraction,
        "f1_start": out.f1_before,
        "f1_final": out.f1_after,
        "accuracy_final": out.accuracy_after,
        "history": out.history,
        "history_seconds": [0.0, *res.history_seconds],
        "steps": res.steps,
        "train_seconds": res.seconds,
        "seconds_per_step": res.seconds / max(res.steps, 1),
        "fusable": get_method(method).fusable,
        "training_path": out.training_path,
        "adapt_windows": out.adapt_windows,
        "test_windows": out.test_windows,
    }


def pretrain_task(inputs: dict[str, Any]) -> dict[str, Any]:
    """Pretrain ``backbone`` on ``source`` data without the ``held_out`` subjects; the checkpoint
    goes to ``inputs["path"]``."""
    cfg = TrainConfig(lr=2e-3, epochs=inputs["epochs"], seed=inputs["seed"], progress=False)
    job = PretrainJob(
        out=inputs["path"],
        model=inputs["backbone"],
        data=inputs["source"],
        subjects=tuple(inputs["held_out"]),
        train=cfg,
        force=True,
    )
    return pretrain(job)


def adapt_task(inputs: dict[str, Any]) -> dict[str, Any]:
    """Adapt the base at ``inputs["base"]`` to one target user of a shift; one row of results."""
    shift = get_shift(inputs["shift"])
    base, payload = load_checkpoint(inputs["base"])
    adapt, test = shift.target_data(inputs["hapt"], inputs["user"])
    classes = list(adapt.classes)
    head = None  # new classes: a head that has them (known rows kept, or a fresh one), trained by every method
    if shift.head != "keep":
        head = HeadChange(list(payload["classes"]) if shift.head == "expand" else [], classes)
    out = adapt_once(
        base,
        adapt,
        test,
        inputs["method"],
        inputs["rank"],
        seed=inputs["seed"],
        steps=inputs["steps"],
        eval_every=inputs["eval_every"],
        batch_size=inputs["batch_size"],
        layers=inputs["layers"],
        lean=inputs["lean"],
        head=head,
    )
    return {"shift": shift.name, "backbone": inputs["backbone"], "user": inputs["user"], **out.row}
