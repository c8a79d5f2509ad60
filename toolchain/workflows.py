"""The training stage's two jobs: pretrain on source subjects, adapt to target subjects."""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from toolchain.adaptation import HeadChange, Outcome, adapt, expand_head, extract, make_optimizer
from toolchain.adapters.adapter_file import save_adapter
from toolchain.adapters.methods import check_rank
from toolchain.core.errors import ToolchainError
from toolchain.core.fileio import check_output
from toolchain.data.sources import data_files, default_target_subjects, load_data
from toolchain.data.windows import ADAPT_FRACTION, WindowDataset, fit_standardization, split_subjects, time_split
from toolchain.memory import MIB
from toolchain.models.registry import build_model, load_checkpoint, model_files, save_checkpoint
from toolchain.peft.inject import AdaptConfig
from toolchain.qat import read_int8_base
from toolchain.records import FinetuneMetrics, write_metrics
from toolchain.train import TrainConfig, evaluate, peak_rss_mb, resolve_device, seed_everything, train

__all__ = ["FinetuneJob", "PretrainJob", "expand_head", "finetune", "make_optimizer", "metrics_path", "pretrain"]

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
    adapt_fraction: float = ADAPT_FRACTION
    force: bool = False
    model: str | None = None  # needed for a plain state_dict checkpoint; rebuilds a toolchain one otherwise
    lean: bool = True  # the lean training path for methods whose base weights stay frozen
    memory_budget: int | None = None  # bytes: pick the largest batch whose accounted memory fits
    int8_base: str | None = None  # a QDQ model of this checkpoint: train with its activation scales (qat.py)


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
    length = ds.X.shape[2] if ds.X.ndim == 3 else None
    model = build_model(job.model, ds.X.shape[1], len(ds.classes), ds.X.ndim - 2, length)
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


def finetune(job: FinetuneJob) -> FinetuneMetrics:
    """Adapt a checkpoint to the target subjects; write the adapter and its metrics JSON."""
    check_rank(job.adapt.method, job.adapt.rank)
    inputs: list[str | os.PathLike[str]] = [job.checkpoint, *data_files(job.data), *model_files(job.model)]
    inputs += [job.int8_base] if job.int8_base else []
    out, mpath = check_output(job.out, inputs, force=job.force), metrics_path(job.out)
    check_output(mpath, inputs, force=job.force)
    model, payload = load_checkpoint(job.checkpoint, job.model)
    int8 = read_int8_base(job.int8_base, model) if job.int8_base else None
    ds = load_data(job.data or payload.get("data") or DEFAULT_DATA)
    head = _head_change(ds, payload)
    subjects = job.subjects or tuple(
        (payload.get("pretrain") or {}).get("target_subjects") or default_target_subjects(ds)
    )
    _, target = split_subjects(ds, subjects)
    adapt_set, test_set = time_split(target, job.adapt_fraction)
    outcome = adapt(
        model,
        adapt_set,
        test_set,
        job.adapt,
        job.train,
        head=head,
        lean=job.lean,
        memory_budget=job.memory_budget,
        account_memory=True,
        quantized=int8.scales if int8 else None,
    )
    info: dict[str, object] = {
        "rank": job.adapt.rank,
        "layers": job.adapt.layers,
        "checkpoint_model": payload["model"],
        "classes": list(ds.classes),
    }
    if int8:
        info["int8_base"] = int8.info()
    save_adapter(extract(outcome, info), out)
    metrics = finetune_metrics(outcome, job, list(subjects), out.stat().st_size)
    write_metrics(mpath, metrics)
    return metrics


def finetune_metrics(outcome: Outcome, job: FinetuneJob, subjects: list[int], adapter_bytes: int) -> FinetuneMetrics:
    """The metrics record of one finetune (keys as ``<adapter>.metrics.json`` has always had them)."""
    peak = outcome.peak_train_memory_bytes
    return FinetuneMetrics(
        method=job.adapt.method,
        rank=job.adapt.rank,
        layer_selection=job.adapt.layers,
        layers=len(outcome.layers),
        trainable_params=outcome.trainable_params,
        total_params=outcome.total_params,
        trainable_fraction=outcome.trainable_fraction,
        f1_before=outcome.f1_before,
        f1_after=outcome.f1_after,
        accuracy_before=outcome.accuracy_before,
        accuracy_after=outcome.accuracy_after,
        steps=outcome.result.steps,
        train_seconds=outcome.result.seconds,
        training_path=outcome.training_path,
        batch_size=outcome.train.batch_size,
        memory_budget_mb=job.memory_budget / MIB if job.memory_budget else None,
        peak_train_memory_mb=peak / MIB if peak is not None else None,
        peak_rss_mb=peak_rss_mb(),
        target_subjects=subjects,
        adapt_windows=outcome.adapt_windows,
        test_windows=outcome.test_windows,
        checkpoint=str(job.checkpoint),
        train_config=asdict(outcome.train),
        adapter_bytes=adapter_bytes,
    )


def _head_change(ds: WindowDataset, payload: dict[str, Any]) -> HeadChange | None:
    """The checkpoint's classes against the data's: None (the same), a grown head, or a refusal."""
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
    if old_classes == list(ds.classes):
        return None
    if not set(old_classes) < set(ds.classes):
        raise ToolchainError(
            "the data's classes are neither the checkpoint's nor a superset of them",
            seen=(ds.classes, old_classes),
            remedy="finetune on data with the classes the base model was trained on (or more)",
        )
    return HeadChange(old_classes, list(ds.classes))
