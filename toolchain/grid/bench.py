"""The shift benchmark: (shift, backbone, seed) bases, then one adaptation per (method, rank, user).

Two grids on :func:`toolchain.grid.runner.run_grid`: the bases first (each is pretrained once and
shared by every shift with the same source data), then the adaptations. Results are cached under
``OUT/cache``; ``OUT/rows.jsonl`` holds every finished adaptation and ``OUT/failed.json`` the
failures, and :mod:`toolchain.grid.report` turns the rows into tables, claims and plots.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path
from typing import Any

from toolchain.adapters.methods import get_method, method_ranks
from toolchain.core.errors import ToolchainError
from toolchain.core.fileio import write_bytes_atomic
from toolchain.grid.runner import GridOptions, GridResult, Task, cache_key, check_backend, run_grid
from toolchain.grid.shifts import get_shift
from toolchain.grid.tasks import LAYERS
from toolchain.models.backbones import REVISIONS

# The published benchmark's methods (docs/BENCHMARKS.md): a method added to the registry joins with --methods,
# so the default grid, and the cached runs it is made of, stay the same.
BENCH_METHODS: tuple[str, ...] = ("lora-edge", "lora", "dora", "adapter", "full", "galore", "head", "bitfit")


@dataclass
class ShiftBench:
    """One benchmark grid. ``users`` empty: every target user of each shift. ``hapt``: the HAPT folder."""

    out: str
    hapt: str
    shifts: tuple[str, ...] = ("cross-subject", "unseen-transitions", "cross-dataset")
    backbones: tuple[str, ...] = ("cnn1d", "resnet1d", "mobilenet1d")
    methods: tuple[str, ...] = BENCH_METHODS
    ranks: tuple[int, ...] = (2, 4, 8)
    seeds: tuple[int, ...] = (0, 1, 2)
    users: tuple[int, ...] = ()
    steps: int = 150
    eval_every: int = 10
    batch_size: int = 32
    pretrain_epochs: int = 6
    lean: bool = True
    ray: str | None = None
    workers: int | None = None
    shard: tuple[int, int] = (0, 1)
    collect: bool = False  # only read the cache: the rows other processes or machines finished
    pretrain_only: bool = False  # run (this shard of) the bases and stop: shards then adapt from the shared bases
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def base_task(job: ShiftBench, shift: str, backbone: str, seed: int) -> Task:
    """The base a shift adapts from; shifts with the same source data and held-out users share it."""
    s = get_shift(shift)
    inputs = {
        "source": s.source_spec(job.hapt),
        "held_out": list(s.held_out),
        "backbone": backbone,
        "seed": seed,
        "epochs": job.pretrain_epochs,
    }
    if backbone in REVISIONS:  # the net changed under its name: its earlier bases must not be found
        inputs["backbone_revision"] = REVISIONS[backbone]
    path = Path(job.out) / "bases" / f"{backbone}_s{seed}_{cache_key(inputs)}.pt"
    return Task("toolchain.grid.tasks:pretrain_task", inputs, {"path": str(path)}, produces=(str(path),))


def adapt_tasks(job: ShiftBench, bases: dict[tuple[str, str, int], Task]) -> list[Task]:
    """Seeds outermost: a grid stopped early has whole seeds, not a few runs of each."""
    tasks = []
    for seed, shift, backbone in product(job.seeds, job.shifts, job.backbones):
        base = bases[(shift, backbone, seed)]
        for user, (method, rank) in product(job.users or get_shift(shift).users, method_ranks(job.methods, job.ranks)):
            inputs = {
                "shift": shift,
                "hapt": job.hapt,
                "backbone": backbone,
                "base_key": base.key,
                "method": method,
                "rank": rank,
                "seed": seed,
                "user": user,
                "steps": job.steps,
                "eval_every": job.eval_every,
                "batch_size": job.batch_size,
                "layers": LAYERS.get(backbone, "all"),
                "lean": job.lean,
                **job.extra,
            }
            tasks.append(Task("toolchain.grid.tasks:adapt_task", inputs, {"base": base.context["path"]}))
    return tasks


def check_job(job: ShiftBench) -> None:
    for s in job.shifts:
        get_shift(s)
    for m in job.methods:
        get_method(m)
    if not (Path(job.hapt) / "RawData" / "labels.txt").is_file():
        raise ToolchainError(
            "the shift benchmark needs the UCI HAPT folder",
            seen=job.hapt,
            remedy="pass --hapt FOLDER (the folder that holds RawData/)",
        )
    if job.steps < 1 or job.eval_every < 1 or min(job.ranks, default=1) < 1:
        raise ToolchainError(
            "--steps, --eval-every and --ranks must be at least 1", seen=(job.steps, job.eval_every, job.ranks)
        )


def run_bench(job: ShiftBench) -> tuple[list[dict[str, Any]], GridResult]:
    """Run (or resume) the grid; write rows.jsonl and failed.json; return the rows and the adaptation grid's result."""
    check_job(job)
    check_backend(GridOptions(ray=None if job.collect else job.ray))
    out = Path(job.out)
    (out / "bases").mkdir(parents=True, exist_ok=True)
    bases = {(s, b, seed): base_task(job, s, b, seed) for s in job.shifts for b in job.backbones for seed in job.seeds}
    unique = list({t.key: t for t in bases.values()}.values())
    opts = GridOptions(
        ray=None if job.collect else job.ray, workers=job.workers, progress=job.progress, run_missing=not job.collect
    )
    pre = run_grid(unique, out / "cache", replace(opts, shard=job.shard if job.pretrain_only else (0, 1)), "pretrain")
    if job.pretrain_only:
        return [], pre
    if pre.failed and not job.collect:
        raise ToolchainError(
            "pretraining failed, so nothing can be adapted",
            seen=pre.failed[0]["error"],
            remedy="fix the cause and run again (finished runs are kept)",
        )
    grid = run_grid(adapt_tasks(job, bases), out / "cache", replace(opts, shard=job.shard), "adapt")
    rows = grid.ok
    write_bytes_atomic(out / "rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    write_bytes_atomic(out / "failed.json", json.dumps(grid.failed, indent=1).encode())
    return rows, grid
