"""`toolchain compare`: every PEFT method on one backbone and dataset, profiled side by side.

Each (method, rank) run starts from the same pretrained base, adapts on the target subjects'
adaptation windows, records macro-F1 on their test windows during training, and is profiled
(parameters, adapter file size, FLOPs and memory of a training step, step time). Finished runs are
cached as JSON in OUT/runs, so an interrupted grid resumes where it stopped.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolchain import __version__
from toolchain.adaptation import HeadChange, extract, make_optimizer, prepare
from toolchain.adapters.adapter_file import save_adapter
from toolchain.adapters.methods import get_method, method_ranks
from toolchain.core.errors import ToolchainError
from toolchain.core.fileio import write_bytes_atomic
from toolchain.data.sources import default_target_subjects, load_data
from toolchain.data.windows import split_subjects, time_split
from toolchain.grid.runner import GridOptions, Task, cache_key, check_backend, run_grid
from toolchain.grid.tasks import adapt_once
from toolchain.models.registry import load_checkpoint
from toolchain.peft.inject import set_train_mode
from toolchain.peft.lean import lean_training
from toolchain.profile import activation_bytes, profile_step
from toolchain.reports import save_figure, write_csv
from toolchain.train import TrainConfig
from toolchain.workflows import PretrainJob, pretrain

TARGET_FRACTION = 0.95


@dataclass
class CompareJob:
    out: str
    methods: tuple[str, ...] = ("lora-edge", "lora", "dora", "galore", "adapter", "bitfit", "head", "full")
    backbone: str = "cnn1d"
    data: str = "watch"
    ranks: tuple[int, ...] = (2, 4, 8)
    steps: int = 300
    eval_every: int = 25
    batch_size: int = 32
    seed: int = 0
    seeds: int = 1  # seeds seed, seed+1, ...: one base and one run of each method per seed
    layers: str = "all"
    pretrain_epochs: int = 8
    exclude_classes: tuple[str, ...] = ()  # unseen classes: pretrain without these, adapt to all
    force: bool = False  # write into a non-empty folder that is not a compare folder
    progress: bool = True
    ray: str | None = None  # None: serially here; "auto": a local Ray; or a Ray cluster address
    workers: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def grid(job: CompareJob) -> list[tuple[str, int]]:
    return method_ranks(job.methods, job.ranks)


def base_inputs(job: CompareJob) -> dict[str, Any]:
    """Everything the pretrained base depends on."""
    return {
        "backbone": job.backbone,
        "data": job.data,
        "pretrain_epochs": job.pretrain_epochs,
        "seed": job.seed,
        "exclude_classes": list(job.exclude_classes),
        "version": __version__,
    }


def run_inputs(job: CompareJob, method: str, rank: int) -> dict[str, Any]:
    """Everything one cached run depends on: its base, the method and every training setting."""
    return {
        **base_inputs(job),
        "method": method,
        "rank": rank,
        "steps": job.steps,
        "eval_every": job.eval_every,
        "batch_size": job.batch_size,
        "layers": job.layers,
        "extra": job.extra,
    }


def ensure_base(job: CompareJob, out: Path) -> Path:
    """The pretrained base of ``job`` (its seed), trained here once and reused."""
    ckpt = out / f"base_{job.backbone}_{cache_key(base_inputs(job))}.pt"
    if not ckpt.is_file():
        pretrain_cfg = TrainConfig(lr=2e-3, epochs=job.pretrain_epochs, seed=job.seed, progress=False)
        pretrain(
            PretrainJob(
                out=str(ckpt),
                model=job.backbone,
                data=job.data,
                train=pretrain_cfg,
                exclude_classes=job.exclude_classes,
            )
        )
    return ckpt


def compare_tasks(job: CompareJob) -> list[Task]:
    """One grid task per (seed, method, rank); each seed's base is pretrained here first."""
    out = Path(job.out)
    (out / "adapters").mkdir(parents=True, exist_ok=True)
    tasks = []
    for seed in range(job.seed, job.seed + job.seeds):
        sjob = replace(job, seed=seed)
        ckpt = ensure_base(sjob, out)
        for method, rank in grid(sjob):
            adapter = out / "adapters" / f"{job.backbone}_{method}_r{rank}_s{seed}.safetensors"
            tasks.append(
                Task(
                    "toolchain.compare:compare_task",
                    run_inputs(sjob, method, rank),
                    {"checkpoint": str(ckpt), "adapter": str(adapter)},
                    (str(adapter),),
                )
            )
    return tasks


MARKER = "compare.json"


def _check_out(job: CompareJob) -> Path:
    """A new or empty folder, or one an earlier compare wrote (its marker or runs/ cache): anything
    else is the user's and is left alone unless --force."""
    out = Path(job.out)
    if out.exists() and not out.is_dir():
        raise ToolchainError("the compare output must be a folder", seen=str(out), remedy="choose a new folder name")
    ours = (out / MARKER).is_file() or (out / "runs").is_dir()
    if out.is_dir() and any(out.iterdir()) and not ours and not job.force:
        raise ToolchainError(
            "the compare output folder is not empty and is not a compare folder, so its files are left alone",
            seen=str(out),
            remedy="choose a new folder, or pass --force",
        )
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(
        out / MARKER,
        json.dumps({"backbone": job.backbone, "data": job.data, "methods": list(job.methods)}, indent=1).encode(),
    )
    return out


def run_compare(job: CompareJob) -> list[dict[str, Any]]:
    """Every (seed, method, rank) run through the grid runner (Ray or serial); reports in ``job.out``."""
    if job.seeds < 1:
        raise ToolchainError("--seeds must be at least 1", seen=job.seeds)
    opts = GridOptions(ray=job.ray, workers=job.workers, progress=job.progress)
    check_backend(opts)
    grid(job)  # refuses an unknown method or a rank below 1 before any base is pretrained
    out = _check_out(job)
    tasks = compare_tasks(job)
    res = run_grid(tasks, out / "runs", opts, f"compare {job.backbone}")
    write_bytes_atomic(out / "failed.json", json.dumps(res.failed, indent=1).encode())
    rows = res.ok
    for seed in {r["seed"] for r in rows}:
        add_time_to_target([r for r in rows if r["seed"] == seed])
    if rows:
        write_reports(rows, out)
    return rows


def compare_task(inputs: dict[str, Any]) -> dict[str, Any]:
    """One (method, rank, seed) run of a compare grid, from its base checkpoint (a grid task)."""
    base, payload = load_checkpoint(inputs["checkpoint"])
    ds = load_data(inputs["data"])
    head = None  # unseen classes: a head for all of them (known rows kept), trained by every method
    if list(payload["classes"]) != list(ds.classes):
        head = HeadChange(list(payload["classes"]), list(ds.classes))
    _, target = split_subjects(
        ds, (payload.get("pretrain") or {}).get("target_subjects") or default_target_subjects(ds)
    )
    adapt, test = time_split(target)
    return run_one(base, adapt, test, inputs, Path(inputs["adapter"]), head)


def run_one(
    base: torch.nn.Module, adapt: Any, test: Any, inputs: dict[str, Any], adapter_path: Path, head: HeadChange | None
) -> dict[str, Any]:
    """Train one method on ``adapt`` with the adaptation core (the lean path where it applies), profile a
    step on both paths, save the adapter."""
    method, rank, batch = inputs["method"], inputs["rank"], inputs["batch_size"]
    done = adapt_once(
        base,
        adapt,
        test,
        method,
        rank,
        seed=inputs["seed"],
        steps=inputs["steps"],
        eval_every=inputs["eval_every"],
        batch_size=batch,
        layers=inputs["layers"],
        head=head,
    )
    x, y = torch.from_numpy(adapt.X[:batch]), torch.from_numpy(adapt.y[:batch])
    lean = get_method(method).base_frozen  # the path finetune trains on
    probes = {}  # profiled on fresh copies of the prepared base: the trained model stays as trained
    for path in ("lean", "reference"):
        probes[path] = copy.deepcopy(base)
        prepare(probes[path], done.config, inputs["seed"], head)
    with lean_training(probes["lean"], lean):
        prof = profile_step(
            probes["lean"],
            make_optimizer(probes["lean"], done.config, get_method(method).lr),
            x,
            y,
            lambda m: set_train_mode(m, False),
        )
    set_train_mode(probes["reference"], False)
    reference_activations = activation_bytes(probes["reference"], x)
    save_adapter(extract(done.outcome, {"compare": True}), adapter_path)
    return {
        "backbone": inputs["backbone"],
        **done.row,
        "adapter_bytes": adapter_path.stat().st_size,
        "activation_bytes_reference": reference_activations,
        **prof.as_dict(),
    }


def add_time_to_target(rows: list[dict[str, Any]]) -> None:
    """Steps and seconds to reach 95% of full fine-tuning's final macro-F1 (None if never)."""
    full = [r["f1_final"] for r in rows if r["method"] == "full"]
    if not full:
        return
    target = TARGET_FRACTION * float(np.mean(full))
    for r in rows:
        hit = next((s for s, f in r["history"] if f >= target), None)
        r["target_f1"] = target
        r["steps_to_target"] = hit
        r["seconds_to_target"] = None if hit is None else hit * r["seconds_per_step"]


COLUMNS = [
    "backbone",
    "method",
    "rank",
    "trainable_params",
    "trainable_fraction",
    "adapter_bytes",
    "f1_start",
    "f1_final",
    "steps_to_target",
    "seconds_to_target",
    "seconds_per_step",
    "forward_flops",
    "backward_flops",
    "optimizer_flops",
    "total_flops",
    "param_bytes",
    "grad_bytes",
    "optimizer_bytes",
    "activation_bytes",
    "activation_bytes_reference",
    "training_path",
    "fusable",
]


def write_reports(rows: list[dict[str, Any]], out: Path) -> None:
    write_csv(out / "results.csv", rows, COLUMNS)
    write_bytes_atomic(out / "results.md", markdown(rows).encode())
    plot(rows, out)


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| method | rank | trainable | % | adapter KiB | F1 start | F1 final | steps to target | s to target "
        "| MFLOP/step | memory MiB (param/grad/opt/act) | act. MiB reference path | fusable |\n"
    )
    head += "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    mib = 1 / (1 << 20)
    lines = [
        f"| {r['method']} | {r['rank'] or '-'} | {r['trainable_params']} | {100 * r['trainable_fraction']:.2f} "
        f"| {r['adapter_bytes'] / 1024:.1f} | {r['f1_start']:.3f} | "
        f"{r['f1_final']:.3f} | "
        f"{r.get('steps_to_target') if r.get('steps_to_target') is not None else 'not reached'} | "
        f"{_fmt(r.get('seconds_to_target'))} | {r['total_flops'] / 1e6:.1f} | "
        f"{r['param_bytes'] * mib:.2f}/{r['grad_bytes'] * mib:.2f}/"
        f"{r['optimizer_bytes'] * mib:.2f}/{r['activation_bytes'] * mib:.2f} | "
        f"{r.get('activation_bytes_reference', r['activation_bytes']) * mib:.2f} | {'yes' if r['fusable'] else 'no'} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _label(r: dict[str, Any]) -> str:
    return f"{r['method']} r{r['rank']}" if r["rank"] else r["method"]


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        h = np.array(r["history"])
        ax.plot(h[:, 0], h[:, 1], label=_label(r))
    if rows and "target_f1" in rows[0]:
        ax.axhline(rows[0]["target_f1"], color="k", ls="--", lw=0.8, label="95% of full FT")
    ax.set(xlabel="step", ylabel="macro-F1 (test windows)", title=f"{rows[0]['backbone']}: F1 during adaptation")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, out / "f1_vs_step.png")

    fig, ax = plt.subplots(figsize=(9, 5))
    labels = [_label(r) for r in rows]
    pos = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    for key in ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes"):
        vals = np.array([r[key] for r in rows]) / (1 << 20)
        ax.bar(
            pos - 0.2,
            vals,
            0.4,
            bottom=bottom,
            label=key.replace("_bytes", "") + (" (lean path)" if key == "activation_bytes" else ""),
        )
        bottom += vals
    ref = np.array(
        [
            r["param_bytes"]
            + r["grad_bytes"]
            + r["optimizer_bytes"]
            + r.get("activation_bytes_reference", r["activation_bytes"])
            for r in rows
        ]
    ) / (1 << 20)
    ax.bar(pos + 0.2, ref, 0.4, color="none", edgecolor="k", hatch="//", label="total on the reference path")
    full = [r for r in rows if r["method"] == "full"]
    if full:
        ax.axhline(bottom[rows.index(full[0])], color="r", ls="--", lw=0.8, label="full fine-tuning")
    ax.set(ylabel="MiB", title="training memory by category (one step): lean vs reference vs full")
    ax.set_xticks(pos, labels, rotation=60)
    ax.legend(fontsize=7)
    save_figure(fig, out / "memory.png")

    fig, ax = plt.subplots(figsize=(7, 5))
    for r in rows:
        ax.scatter(r["trainable_params"], r["f1_final"])
        ax.annotate(_label(r), (r["trainable_params"], r["f1_final"]), fontsize=7)
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="final macro-F1", title="parameters vs F1")
    save_figure(fig, out / "params_vs_f1.png")
