"""The shift benchmark on real data: cross-subject, unseen postural transitions, cross-dataset.

For each shift, backbone and seed a base is pretrained; then every method (at each rank) adapts it
to each target user for a fixed number of steps, macro-F1 on the user's test windows recorded every
``--eval-every`` steps with the training seconds so far. Runs are cached in OUT/cache (an
interrupted grid resumes); ``--ray auto`` runs them as Ray tasks (1 CPU, 1 torch thread each);
``--shard I/N`` splits the grid between N processes or machines sharing OUT; ``--report`` writes
the tables, the LoRA-Edge claims and the plots from the cache.

    python scripts/bench_shifts.py --hapt ../shared/data/HAPT --out runs/shifts --ray auto
    python scripts/bench_shifts.py --hapt ../shared/data/HAPT --out runs/shifts --report docs/shifts
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from toolchain.adapters.methods import METHODS
from toolchain.core.errors import ToolchainError
from toolchain.grid.bench import BENCH_METHODS, ShiftBench, run_bench
from toolchain.grid.runner import parse_shard
from toolchain.grid.shifts import SHIFTS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hapt", default="../shared/data/HAPT", help="the UCI HAPT folder (holds RawData/)")
    ap.add_argument("--out", default="runs/shifts")
    ap.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=list(SHIFTS))
    ap.add_argument("--backbones", nargs="+", default=["cnn1d", "resnet1d", "mobilenet1d"])
    ap.add_argument("--methods", nargs="+", default=list(BENCH_METHODS), choices=METHODS)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, first-seed+1, ...")
    ap.add_argument("--users", type=int, nargs="*", default=[], help="default: every target user of each shift")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--pretrain-epochs", type=int, default=6)
    ap.add_argument("--ray", default=None, help="auto: start Ray locally; or a cluster address")
    ap.add_argument("--workers", type=int, default=None, help="CPUs of a local Ray (default: all)")
    ap.add_argument(
        "--shard", default="0/1", help="I/N: run this process's share of the runs (those whose key is I modulo N)"
    )
    ap.add_argument("--pretrain-only", action="store_true", help="run (this shard of) the bases and stop")
    ap.add_argument("--collect", action="store_true", help="run nothing: gather the cached runs into OUT/rows.jsonl")
    ap.add_argument(
        "--report", metavar="DIR", help="write tables, claims and plots from OUT/rows.jsonl (or --rows) to DIR and stop"
    )
    ap.add_argument(
        "--rows",
        nargs="+",
        default=None,
        help="with --report: rows.jsonl files; each (shift, backbone, seed) comes whole from the first file "
        "having it; plots: the first file",
    )
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def merge_rows(paths: list[str], job: ShiftBench) -> list[dict]:
    """The rows of ``paths`` within the job's selection. Each (shift, backbone, seed) comes whole from
    the first file that has it: its runs share one base, and pairs must not mix bases."""
    owner: dict[tuple, str] = {}
    rows = []
    for path in paths:
        for r in map(json.loads, Path(path).read_text().splitlines()):
            group = (r["shift"], r["backbone"], r["seed"])
            wanted = (
                r["shift"] in job.shifts
                and r["backbone"] in job.backbones
                and r["method"] in job.methods
                and r["seed"] in job.seeds
            )
            if wanted and owner.setdefault(group, path) == path:
                rows.append(r)
    return rows


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        job = ShiftBench(
            out=a.out,
            hapt=a.hapt,
            shifts=tuple(a.shifts),
            backbones=tuple(a.backbones),
            methods=tuple(a.methods),
            ranks=tuple(a.ranks),
            seeds=tuple(range(a.first_seed, a.first_seed + a.seeds)),
            users=tuple(a.users),
            steps=a.steps,
            eval_every=a.eval_every,
            pretrain_epochs=a.pretrain_epochs,
            ray=a.ray,
            workers=a.workers,
            shard=parse_shard(a.shard),
            pretrain_only=a.pretrain_only,
            collect=a.collect,
            progress=not a.no_progress,
        )
        if a.report:
            from toolchain.grid.report import write_report

            files = a.rows or [str(Path(a.out) / "rows.jsonl")]
            write_report(
                merge_rows(files, job), Path(a.report), merge_rows(files[:1], job)
            )  # plots: the first file's machine only
            return 0
        rows, grid = run_bench(job)
    except ToolchainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"{len(rows)} runs ({grid.ran} ran, {grid.cached} cached, {len(grid.failed)} failed) in "
        f"{grid.seconds:.0f} s on {grid.backend}"
    )
    return 1 if grid.failed else 0


if __name__ == "__main__":
    sys.exit(main())
