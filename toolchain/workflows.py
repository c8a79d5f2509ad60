"""The training stage's two jobs: pretrain on source subjects, adapt to target subjects."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from toolchain.adapters.adapter_file import save_adapter
from toolchain.adapters.methods import check_rank, get_method
from toolchain.core.errors import ToolchainError
from toolchain.core.fileio import check_output, write_bytes_atomic
from toolchain.data.sources import data_files, default_target_subjects, load_data
from toolchain.data.windows import WindowDataset, fit_standardization, split_subjects, time_split
from toolchain.memory import MIB, account, batch_for_budget
from toolchain.models.registry import build_model, load_checkpoint, model_files, save_checkpoint
from toolchain.peft.galore import GaLoreAdam
from toolchain.peft.inject import AdaptConfig, extract_adapter, inject, set_train_mode
from toolchain.peft.lean import lean_training
from toolchain.train import TrainConfig, count_params, evaluate, peak_rss_mb, resolve_device, seed_everything, train

DEFAULT_DATA = "watch"
PRETRAIN_DEFAULTS = TrainConfig(lr=2e-3, batch_size=64, epochs=8)
FINETUNE_DEFAULTS = TrainConfig(lr=5e-3, batch_size=32, epochs=15)


@dataclass
class PretrainJob:
    out: str
    model: str = "cnn1d"
    data: str = DEFAULT_DATA
    subjects: tuple[int, ...] | None = None  # held out for adaptation; None: the dataset's usual ones
    train: TrainConfig = field(default_factory=lambda: copy.copy(PRETRAIN_DEFAULTS))
    force: bool = False
    exclude_classes: tuple[str, ...] = ()


@dataclass
class FinetuneJob:
    checkpoint: str
    out: str
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    data: str | None = None
    subjects: tuple[int, ...] | None = None  # to adapt to; None: those held out at pretraining
    train: TrainConfig = field(default_factory=lambda: copy.copy(FINETUNE_DEFAULTS))
    adapt_fraction: float = 0.8
    force: bool = False
    model: str | None = None  # needed for a plain state_dict checkpoint; rebuilds a toolchain one otherwise
    lean: bool = True  # the lean training path for methods whose base weights stay frozen
    memory_budget: int | None = None  # bytes: pick the largest batch whose accounted memory fits


def metrics_path(adapter_out: str | os.PathLike[str]) -> Path:
    """``adapter.safetensors`` -> ``adapter.metrics.json`` beside it."""
    p = Path(adapter_out)
    return p.with_name(p.name.removesuffix(".safetensors") + ".metrics.json")


def probe(model: nn.Module, x: np.ndarray, spec: str) -> None:
    """Run the model once on two real windows before training: a model that cannot take the data
    (windows too short for its pooling, images into a 1-D backbone) is one line, not a traceback."""
    try:
        with torch.no_grad():
            model.eval()(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    except Exception as err:  # the model's own shape rules
        seen = f"{spec} on input {list(x.shape[1:])}: {type(err).__name__}: {' '.join(str(err).split())[:120]}"
        raise ToolchainError(
            "the model cannot run on the data",
            seen=seen,
            remedy="choose a model for this input shape, or longer windows",
        ) from None


def pretrain(job: PretrainJob) -> dict[str, Any]:
    """Train a backbone on the source subjects; write the checkpoint. Returns its metrics."""
    check_output(job.out, [*data_files(job.data), *model_files(job.model)], force=job.force)
    seed_everything(job.train.seed)  # the seed fixes the initial weights too, not only the batches
    ds = load_data(job.data)
    subjects = job.subjects if job.subjects is not None else default_target_subjects(ds)  # () holds out nobody
    if job.exclude_classes:
        ds = drop_classes(ds, job.exclude_classes)
    source, target = split_subjects(ds, subjects)
    if len(np.unique(source.y)) < 2:
        raise ToolchainError(
            "pretraining needs at least two classes in the source subjects' data",
            seen=f"classes present: {sorted(set(source.y.tolist()))}",
            remedy="add windows of other classes",
        )
    model = build_model(job.model, ds.X.shape[1], len(ds.classes), ds.X.ndim - 2)
    probe(model, source.X[:2], job.model)
    mean, std = fit_standardization(source)
    model.norm.mean.copy_(torch.from_numpy(mean).view(model.norm.mean.shape))
    model.norm.std.copy_(torch.from_numpy(std).view(model.norm.std.shape))
    result = train(model, source, job.train)
    dev = resolve_device(job.train.device)
    f1_src, acc_src = evaluate(model, source, dev)
    f1_tgt, acc_tgt = evaluate(model, target, dev) if len(target) else (None, None)
    metrics = {
        "model": job.model,
        "data": job.data,
        "source_subjects": source.subjects(),
        "target_subjects": list(subjects),
        "steps": result.steps,
        "train_seconds": result.seconds,
        "f1_source": f1_src,
        "accuracy_source": acc_src,
        "f1_target": f1_tgt,
        "accuracy_target": acc_tgt,
    }
    save_checkpoint(
        model.cpu(),
        job.out,
        spec=job.model,
        classes=ds.classes,
        input_shape=tuple(ds.X.shape[1:]),
        extra={"data": job.data, "pretrain": metrics},
    )
    return metrics


def drop_classes(ds: WindowDataset, names: tuple[str, ...]) -> WindowDataset:
    """Remove the windows of ``names`` (class names or indices) and renumber the remaining classes."""
    drop = {ds.classes[int(n)] if n.isdigit() and int(n) < len(ds.classes) else n for n in names}
    unknown = drop - set(ds.classes)
    if unknown or len(drop) >= len(ds.classes) - 1:
        raise ToolchainError(
            "--exclude-classes must name existing classes and leave at least two",
            seen=sorted(unknown) or sorted(drop),
            remedy=f"choose from {ds.classes}",
        )
    keep = [c for c in ds.classes if c not in drop]
    remap = np.array([keep.index(c) if c in keep else -1 for c in ds.classes])
    mask = remap[ds.y] >= 0
    out = ds.take(mask)
    return WindowDataset(out.X, remap[out.y], out.subject, out.segment, keep, ds.name)


def expand_head(model: torch.nn.Module, old: list[str], new: list[str]) -> None:
    """A classifier for ``new`` classes from one for ``old`` (a subset): known rows are copied."""
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    head = torch.nn.Linear(linear.in_features, len(new), bias=linear.bias is not None)
    with torch.no_grad():
        head.weight.mul_(0.1)
        for i, name in enumerate(old):
            head.weight[new.index(name)] = linear.weight[i]
            if head.bias is not None and linear.bias is not None:
                head.bias[new.index(name)] = linear.bias[i]
    name = next(n for n, m in model.named_modules() if m is linear)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, head)


def finetune(job: FinetuneJob) -> dict[str, Any]:
    """Adapt a checkpoint to the target subjects; write the adapter and its metrics JSON."""
    check_rank(job.adapt.method, job.adapt.rank)
    inputs: list[str | os.PathLike[str]] = [job.checkpoint, *data_files(job.data), *model_files(job.model)]
    out, mpath = check_output(job.out, inputs, force=job.force), metrics_path(job.out)
    check_output(mpath, inputs, force=job.force)
    seed_everything(job.train.seed)  # LoRA's random A and a grown head's rows are drawn below
    model, payload = load_checkpoint(job.checkpoint, job.model)
    ds = load_data(job.data or payload.get("data") or DEFAULT_DATA)
    if payload.get("input_shape") is None:  # a plain state_dict: the data says
        payload["input_shape"] = list(ds.X.shape[1:])
    if list(ds.X.shape[1:]) != list(payload["input_shape"]):
        raise ToolchainError(
            "the data's window or image shape differs from the shape the model was trained on",
            seen=f"data {list(ds.X.shape[1:])}, checkpoint {payload['input_shape']}",
            remedy="adapt on data of the checkpoint's input shape (resample or resize it)",
        )
    if payload.get("plain_state_dict") and len(payload["classes"]) == len(ds.classes):
        payload["classes"] = list(ds.classes)  # a plain state_dict has class indices only
    old_classes = list(payload["classes"])
    new_classes = old_classes != list(ds.classes)
    if new_classes and not set(old_classes) < set(ds.classes):
        raise ToolchainError(
            "the data's classes are neither the checkpoint's nor a superset of them",
            seen=(ds.classes, old_classes),
            remedy="finetune on data with the classes the base model was trained on (or more)",
        )
    subjects = job.subjects or tuple(
        (payload.get("pretrain") or {}).get("target_subjects") or default_target_subjects(ds)
    )
    _, target = split_subjects(ds, subjects)
    adapt_set, test_set = time_split(target, job.adapt_fraction)
    dev = resolve_device(job.train.device)
    model.to(dev)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    adapt_cfg = job.adapt
    if new_classes:  # unseen classes: a head that has them, trained
        expand_head(model, old_classes, list(ds.classes))
        model.to(dev)
        if get_method(adapt_cfg.method).base_frozen and "head" not in get_method(adapt_cfg.method).implied_groups:
            adapt_cfg = dataclasses.replace(adapt_cfg, train=tuple(sorted({*adapt_cfg.train, "head"})))
    f1_before, acc_before = evaluate(model, test_set, dev)
    layers = inject(model, adapt_cfg)
    trainable, total = count_params(model)
    lean = job.lean and get_method(adapt_cfg.method).base_frozen
    set_mode = lambda m: set_train_mode(m, adapt_cfg.update_bn_stats)  # noqa: E731
    acc = account(
        model, lambda m: make_optimizer(m, adapt_cfg, job.train.lr, job.train.weight_decay), adapt_set, set_mode, lean
    )
    train_cfg = job.train
    if job.memory_budget is not None:
        train_cfg = dataclasses.replace(train_cfg, batch_size=batch_for_budget(acc, job.memory_budget, len(adapt_set)))
    opt = make_optimizer(
        model, adapt_cfg, job.train.lr, job.train.weight_decay
    )  # finetune used to drop TrainConfig.weight_decay
    with lean_training(model, lean):
        result = train(model, adapt_set, train_cfg, set_mode=set_mode, optimizer=opt)
    f1_after, acc_after = evaluate(model, test_set, dev)
    metrics = {
        "method": job.adapt.method,
        "rank": job.adapt.rank,
        "layer_selection": job.adapt.layers,
        "layers": len(layers),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": trainable / total,
        "f1_before": f1_before,
        "f1_after": f1_after,
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "steps": result.steps,
        "train_seconds": result.seconds,
        "training_path": "lean" if lean else "reference",
        "batch_size": train_cfg.batch_size,
        "memory_budget_mb": job.memory_budget / MIB if job.memory_budget else None,
        "peak_train_memory_mb": acc.at(train_cfg.batch_size) / MIB,
        "peak_rss_mb": peak_rss_mb(),
        "target_subjects": list(subjects),
        "adapt_windows": len(adapt_set),
        "test_windows": len(test_set),
        "checkpoint": str(job.checkpoint),
        "train_config": asdict(train_cfg),
    }
    info = {
        "rank": job.adapt.rank,
        "layers": job.adapt.layers,
        "checkpoint_model": payload["model"],
        "classes": list(ds.classes),
    }
    adapter = extract_adapter(model.cpu(), {k: v.cpu() for k, v in base_state.items()}, adapt_cfg, info)
    save_adapter(adapter, out)
    metrics["adapter_bytes"] = out.stat().st_size
    write_bytes_atomic(mpath, (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode())
    return metrics


def make_optimizer(
    model: torch.nn.Module, cfg: AdaptConfig, lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """Adam over the trainable parameters (with ``weight_decay``, TrainConfig's); GaLore's projected Adam
    for ``galore``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ToolchainError("nothing to train: every parameter is frozen", seen=cfg.method)
    if get_method(cfg.method).optimizer == "galore":
        if weight_decay:
            raise ToolchainError(
                "galore's optimizer has no weight decay", seen=weight_decay, remedy="train galore with weight_decay 0"
            )
        return GaLoreAdam(params, lr=lr, rank=cfg.rank)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
