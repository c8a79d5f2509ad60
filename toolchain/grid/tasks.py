"""The runs a grid is made of: pretrain a base, adapt it once. Each is a plain function of a dict
(so Ray can ship it); every value a result depends on is in that dict."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from toolchain.adapters.methods import get_method
from toolchain.data.windows import WindowDataset
from toolchain.grid.shifts import get_shift
from toolchain.models.registry import load_checkpoint
from toolchain.peft.inject import AdaptConfig, inject, set_train_mode
from toolchain.peft.lean import lean_training
from toolchain.train import TrainConfig, count_params, evaluate, seed_everything, train
from toolchain.workflows import PretrainJob, expand_head, make_optimizer, pretrain

LAYERS = {
    "cnn1d": "all",
    "resnet1d": "all",
    "mobilenet1d": "pointwise",
}  # mobilenet1d: its pointwise convs (depthwise ones are 1-channel)


@dataclass
class Adapted:
    """What one adaptation produced: the trained model, its config and its record."""

    model: torch.nn.Module
    config: AdaptConfig
    row: dict[str, Any]


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
    train_head: bool = False,
) -> Adapted:
    """Inject ``method`` into a copy of ``base``, train ``steps`` steps on ``adapt`` and record
    macro-F1 on ``test`` at step 0 and every ``eval_every`` steps (with the training seconds so far)."""
    seed_everything(seed)
    model = copy.deepcopy(base)
    spec = get_method(method)
    extra = ("head",) if train_head and spec.base_frozen and "head" not in spec.implied_groups else ()
    cfg = AdaptConfig(method=method, rank=max(rank, 1), layers=layers, train=extra)
    inject(model, cfg)
    trainable, total = count_params(model)
    f1_0 = evaluate(model, test, torch.device("cpu"))[0]
    lean = lean and spec.base_frozen
    tc = TrainConfig(lr=spec.lr, batch_size=batch_size, steps=steps, seed=seed, eval_every=eval_every, progress=False)
    with lean_training(model, lean):
        res = train(
            model,
            adapt,
            tc,
            set_mode=lambda m: set_train_mode(m, False),
            eval_data=test,
            optimizer=make_optimizer(model, cfg, spec.lr),
        )
    f1, acc = evaluate(model, test, torch.device("cpu"))
    row = {
        "method": method,
        "rank": rank,
        "seed": seed,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": trainable / total,
        "f1_start": f1_0,
        "f1_final": f1,
        "accuracy_final": acc,
        "history": [[0, f1_0], *[list(h) for h in res.history]],
        "history_seconds": [0.0, *res.history_seconds],
        "steps": res.steps,
        "train_seconds": res.seconds,
        "seconds_per_step": res.seconds / max(res.steps, 1),
        "fusable": spec.fusable,
        "training_path": "lean" if lean else "reference",
        "adapt_windows": len(adapt),
        "test_windows": len(test),
    }
    return Adapted(model, cfg, row)


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
    seed_everything(inputs["seed"])  # a new head's rows are drawn here
    if shift.head != "keep":  # new classes: a head that has them (known rows kept), trained by every method
        expand_head(base, list(payload["classes"]) if shift.head == "expand" else [], classes)
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
        train_head=shift.head != "keep",
    )
    return {"shift": shift.name, "backbone": inputs["backbone"], "user": inputs["user"], **out.row}
