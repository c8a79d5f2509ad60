"""The training stage's two jobs: pretrain on source subjects, adapt to target subjects."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kernels import tt_ranks
from toolchain.adapter_file import save_adapter
from toolchain.data.sources import default_targets, load_data
from toolchain.data.windows import fit_standardization, split_subjects, time_split
from toolchain.errors import ToolchainError
from toolchain.fileio import check_output, write_bytes_atomic
from toolchain.models.registry import build_model, load_checkpoint, save_checkpoint
from toolchain.peft.inject import AdaptConfig, extract_adapter, inject, set_train_mode
from toolchain.train import TrainConfig, count_params, evaluate, peak_rss_mb, resolve_device, train

DEFAULT_DATA = "watch"
PRETRAIN_DEFAULTS = TrainConfig(lr=2e-3, batch_size=64, epochs=8)
FINETUNE_DEFAULTS = TrainConfig(lr=5e-3, batch_size=32, epochs=15)


@dataclass
class PretrainJob:
    out: str
    model: str = "cnn1d"
    data: str = DEFAULT_DATA
    targets: tuple[int, ...] | None = None
    train: TrainConfig = field(default_factory=lambda: copy.copy(PRETRAIN_DEFAULTS))
    force: bool = False


@dataclass
class FinetuneJob:
    checkpoint: str
    out: str
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    data: str | None = None
    targets: tuple[int, ...] | None = None
    train: TrainConfig = field(default_factory=lambda: copy.copy(FINETUNE_DEFAULTS))
    adapt_fraction: float = 0.8
    force: bool = False


def metrics_path(adapter_out: str | os.PathLike[str]) -> Path:
    """``adapter.safetensors`` -> ``adapter.metrics.json`` beside it."""
    p = Path(adapter_out)
    return p.with_name(p.name.removesuffix(".safetensors") + ".metrics.json")


def pretrain(job: PretrainJob) -> dict[str, Any]:
    """Train a backbone on the source subjects; write the checkpoint. Returns its metrics."""
    check_output(job.out, force=job.force)
    ds = load_data(job.data)
    targets = job.targets or default_targets(ds)
    source, target = split_subjects(ds, targets)
    model = build_model(job.model, ds.X.shape[1], len(ds.classes))
    mean, std = fit_standardization(source)
    model.norm.mean.copy_(torch.from_numpy(mean).view(1, -1, 1))
    model.norm.std.copy_(torch.from_numpy(std).view(1, -1, 1))
    result = train(model, source, job.train)
    dev = resolve_device(job.train.device)
    f1_src, acc_src = evaluate(model, source, dev)
    f1_tgt, acc_tgt = evaluate(model, target, dev)
    metrics = {
        "model": job.model,
        "data": job.data,
        "source_subjects": source.subjects(),
        "target_subjects": list(targets),
        "steps": result.steps,
        "train_seconds": result.seconds,
        "f1_source": f1_src,
        "accuracy_source": acc_src,
        "f1_target": f1_tgt,
        "accuracy_target": acc_tgt,
    }
    save_checkpoint(model.cpu(), job.out, spec=job.model, classes=ds.classes, extra={"data": job.data, "pretrain": metrics})
    return metrics


def finetune(job: FinetuneJob) -> dict[str, Any]:
    """Adapt a checkpoint to the target subjects; write the adapter and its metrics JSON."""
    if job.adapt.method == "lora-edge":
        tt_ranks((1, 1), job.adapt.rank)  # validates the rank before any work
    out, mpath = check_output(job.out, [job.checkpoint], force=job.force), metrics_path(job.out)
    check_output(mpath, [job.checkpoint], force=job.force)
    model, payload = load_checkpoint(job.checkpoint)
    ds = load_data(job.data or payload["data"])
    if list(ds.classes) != list(payload["classes"]):
        raise ToolchainError("the data's classes differ from the checkpoint's", seen=(ds.classes, payload["classes"]), remedy="finetune on data with the classes the base model was trained on")
    targets = job.targets or tuple(payload["pretrain"]["target_subjects"])
    _, target = split_subjects(ds, targets)
    adapt_set, test_set = time_split(target, job.adapt_fraction)
    dev = resolve_device(job.train.device)
    model.to(dev)
    f1_before, acc_before = evaluate(model, test_set, dev)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    layers = inject(model, job.adapt)
    trainable, total = count_params(model)
    result = train(model, adapt_set, job.train, set_mode=lambda m: set_train_mode(m, job.adapt.update_bn_stats))
    f1_after, acc_after = evaluate(model, test_set, dev)
    metrics = {
        "method": job.adapt.method,
        "rank": job.adapt.rank,
        "targets": job.adapt.targets,
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
        "peak_rss_mb": peak_rss_mb(),
        "target_subjects": list(targets),
        "adapt_windows": len(adapt_set),
        "test_windows": len(test_set),
        "checkpoint": str(job.checkpoint),
        "train_config": asdict(job.train),
    }
    info = {"rank": job.adapt.rank, "targets": job.adapt.targets, "checkpoint_model": payload["model"], "classes": list(ds.classes)}
    adapter = extract_adapter(model.cpu(), {k: v.cpu() for k, v in base_state.items()}, job.adapt, info)
    save_adapter(adapter, out)
    write_bytes_atomic(mpath, (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode())
    return metrics
