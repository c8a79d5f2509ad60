"""Tables, the LoRA-Edge paper's claims and plots from the shift benchmark's rows.

Every comparison is paired: a method's run is compared with full fine-tuning's run on the same
(shift, backbone, seed, user). "Steps to X%" is the first evaluation step at which the run's
macro-F1 reaches X% of full fine-tuning's final macro-F1 on that same user; seconds likewise, in
training seconds (evaluation excluded). A speed-up is full fine-tuning's steps (seconds) over the
method's, as a geometric mean over the pairs in which both reached the target.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.adapters.methods import METHODS
from toolchain.core.fileio import write_bytes_atomic
from toolchain.reports import save_figure

FRACTIONS = (0.90, 0.95, 0.99)
PAPER_MAX_TRAINED = 1.49  # % of parameters
PAPER_MAX_GAP = 4.7  # F1 points below full fine-tuning
PAPER_SPEEDUP = (1.4, 3.8)

Row = dict[str, Any]


def label(r: Row) -> str:
    return f"{r['method']} r{r['rank']}" if r["rank"] else r["method"]


def _group(r: Row) -> tuple[Any, ...]:
    return (r["shift"], r["backbone"], r["seed"], r["user"])


def reach(r: Row, target: float) -> tuple[float | None, float | None]:
    """(step, training seconds) of the first evaluation at which macro-F1 >= target."""
    for (step, f1), sec in zip(r["history"], r["history_seconds"], strict=True):
        if f1 >= target:
            return step, sec
    return None, None


def paired(rows: list[Row]) -> list[tuple[Row, Row]]:
    """(run, full fine-tuning's run on the same shift, backbone, seed and user)."""
    full = {_group(r): r for r in rows if r["method"] == "full"}
    return [(r, full[_group(r)]) for r in rows if _group(r) in full]


def _gmean(xs: Iterable[float]) -> float | None:
    xs = [x for x in xs if x > 0]
    return float(np.exp(np.mean(np.log(xs)))) if xs else None


def _ratio(full: float, method: float) -> float:
    """full / method; both at step 0 (the base already there) is 1, the method alone at 0 is capped."""
    if method == 0:
        return 1.0 if full == 0 else 1e9
    return full / method


def summarise(rows: list[Row]) -> list[Row]:
    """One line per (shift, backbone, method, rank): F1, gap to full, reach and speed-ups."""
    cells: dict[tuple[Any, ...], list[tuple[Row, Row]]] = defaultdict(list)
    for r, f in paired(rows):
        cells[(r["shift"], r["backbone"], r["method"], r["rank"])].append((r, f))
    order = {m: i for i, m in enumerate(METHODS)}
    out = []
    for (shift, backbone, method, rank), pairs in sorted(
        cells.items(), key=lambda kv: (kv[0][0], kv[0][1], order.get(kv[0][2], 99), kv[0][3])
    ):
        line: Row = {
            "shift": shift,
            "backbone": backbone,
            "method": method,
            "rank": rank,
            "runs": len(pairs),
            "seeds": len({r["seed"] for r, _ in pairs}),
        }
        line["trained_pct"] = 100 * float(np.mean([r["trainable_fraction"] for r, _ in pairs]))
        line["f1_source"] = float(np.mean([f["f1_start"] for _, f in pairs]))
        line["f1"] = float(np.mean([r["f1_final"] for r, _ in pairs]))
        line["f1_std_users"] = float(
            np.std(
                [np.mean([r["f1_final"] for r, _ in pairs if r["user"] == u]) for u in {r["user"] for r, _ in pairs}]
            )
        )
        seeds = sorted({r["seed"] for r, _ in pairs})
        line["f1_std_seeds"] = (
            float(np.std([np.mean([r["f1_final"] for r, _ in pairs if r["seed"] == s]) for s in seeds]))
            if len(seeds) > 1
            else None
        )
        line["gap_points"] = 100 * float(np.mean([f["f1_final"] - r["f1_final"] for r, f in pairs]))
        for frac in FRACTIONS:
            hits = [(reach(r, frac * f["f1_final"]), reach(f, frac * f["f1_final"])) for r, f in pairs]
            pct = round(frac * 100)
            line[f"reached_{pct}"] = float(np.mean([h[0] is not None for h, _ in hits]))
            both = [
                (h[0], h[1], g[0], g[1])
                for h, g in hits
                if h[0] is not None and h[1] is not None and g[0] is not None and g[1] is not None
            ]
            line[f"steps_{pct}"] = float(np.median([b[0] for b in both])) if both else None
            line[f"seconds_{pct}"] = float(np.median([b[1] for b in both])) if both else None
            line[f"speedup_steps_{pct}"] = _gmean(_ratio(b[2], b[0]) for b in both)
            line[f"speedup_seconds_{pct}"] = _gmean(_ratio(b[3], b[1]) for b in both)
        out.append(line)
    return out


def _f(v: float | None, fmt: str = ".3f") -> str:
    if v is None:
        return "-"
    return "inf" if v >= 1e8 else format(v, fmt)


def summary_table(lines: list[Row]) -> str:
    head = (
        "| shift | backbone | method | trained % | runs (seeds) | F1 | std users | std seeds | gap to full (pts) "
        "| reached 90/95/99% | median steps to 95% | median s to 95% | speed-up vs full, steps 90/95/99% | "
        "speed-up, seconds 95% |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = []
    for x in lines:
        name = f"{x['method']} r{x['rank']}" if x["rank"] else x["method"]
        reached = "/".join(f"{100 * x[f'reached_{p}']:.0f}%" for p in (90, 95, 99))
        speed = "/".join(_f(x[f"speedup_steps_{p}"], ".2f") for p in (90, 95, 99))
        body.append(
            f"| {x['shift']} | {x['backbone']} | {name} | {x['trained_pct']:.2f} | {x['runs']} ({x['seeds']}) | "
            f"{x['f1']:.3f} | {x['f1_std_users']:.3f} | {_f(x['f1_std_seeds'])} "
            f"| {x['gap_points']:+.1f} | {reached} | {_f(x['steps_95'], '.0f')} | {_f(x['seconds_95'], '.2f')} "
            f"| {speed} | {_f(x['speedup_seconds_95'], '.2f')} |"
        )
    return head + "\n".join(body) + "\n"


PIVOT_COLUMNS = (
    "lora-edge r2",
    "lora-edge r4",
    "lora-edge r8",
    "lora r4",
    "dora r4",
    "galore r4",
    "adapter",
    "bitfit",
    "head",
    "full",
)


def pivot(lines: list[Row], key: str, fmt: str = ".3f", source: bool = False) -> str:
    """One line per (shift, backbone), one column per method (rank 4 for the low-rank ones)."""
    cells = {(x["shift"], x["backbone"], f"{x['method']} r{x['rank']}" if x["rank"] else x["method"]): x for x in lines}
    groups = sorted({(x["shift"], x["backbone"]) for x in lines})
    cols = [c for c in PIVOT_COLUMNS if any((g[0], g[1], c) in cells for g in groups)]
    head = ["shift", "backbone", *(["source-only"] if source else []), *cols]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        vals = [_f(cells[(g[0], g[1], c)][key], fmt) if (g[0], g[1], c) in cells else "" for c in cols]
        src = (
            [_f(cells[(g[0], g[1], "full")]["f1_source"], fmt)]
            if source and (g[0], g[1], "full") in cells
            else ([""] if source else [])
        )
        out.append("| " + " | ".join([g[0], g[1], *src, *vals]) + " |")
    return "\n".join(out) + "\n"


def coverage_table(rows: list[Row]) -> str:
    """Runs per (shift, backbone, seed) against the method configurations that the same backbone
    and seed ran on any shift (a grid stopped early shows its missing runs)."""
    cells: dict[tuple[Any, ...], set[tuple[Any, ...]]] = defaultdict(set)
    expected: dict[tuple[Any, ...], set[str]] = defaultdict(set)
    for r in rows:
        cells[(r["shift"], r["backbone"], r["seed"])].add((r["user"], label(r)))
        expected[(r["backbone"], r["seed"])].add(label(r))
    lines = [
        "| shift | backbone | seed | users | method configurations | runs | complete |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in sorted(cells):
        users = {u for u, _ in cells[k]}
        n, want = len(cells[k]), len(users) * len(expected[(k[1], k[2])])
        lines.append(
            f"| {k[0]} | {k[1]} | {k[2]} | {len(users)} | {len(expected[(k[1], k[2])])} | {n} | "
            f"{'yes' if n == want else f'no ({want - n} missing)'} |"
        )
    return "\n".join(lines) + "\n"


def claims(lines: list[Row]) -> str:
    """The LoRA-Edge paper's three claims, per shift and backbone, for LoRA-Edge at each rank."""
    out = [
        "| shift | backbone | LoRA-Edge rank | trained % (claim <= 1.49) | gap to full, F1 pts (claim <= 4.7) | "
        "speed-up to 95% of full, steps (claim 1.4-3.8x) | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in lines:
        if x["method"] != "lora-edge":
            continue
        c1 = x["trained_pct"] <= PAPER_MAX_TRAINED
        c2 = x["gap_points"] <= PAPER_MAX_GAP
        s = x["speedup_steps_95"]
        c3 = s is not None and s >= PAPER_SPEEDUP[0] and x["reached_95"] >= 0.5
        verdict = ", ".join(
            f"{n} {'held' if ok else 'not held'}" for n, ok in (("params", c1), ("accuracy", c2), ("speed", c3))
        )
        out.append(
            f"| {x['shift']} | {x['backbone']} | {x['rank']} | {x['trained_pct']:.2f} | {x['gap_points']:+.1f} "
            f"| {_f(s, '.2f')} (reached {100 * x['reached_95']:.0f}%) | {verdict} |"
        )
    return "\n".join(out) + "\n"


def plot_curves(rows: list[Row], shift: str, path: Path) -> None:
    """F1 against steps (top) and training seconds (bottom), mean over users and seeds, per backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["shift"] == shift]
    backbones = sorted({r["backbone"] for r in sel})
    fig, axes = plt.subplots(2, len(backbones), figsize=(5 * len(backbones), 8), squeeze=False)
    for j, b in enumerate(backbones):
        by: dict[str, list[Row]] = defaultdict(list)
        for r in sel:
            if r["backbone"] == b and (r["rank"] in (0, 4)):
                by[label(r)].append(r)
        for name, rs in sorted(by.items()):
            steps = np.array([s for s, _ in rs[0]["history"]])
            f1 = np.mean([[f for _, f in r["history"]] for r in rs if len(r["history"]) == len(steps)], axis=0)
            sec = np.mean([r["history_seconds"] for r in rs if len(r["history_seconds"]) == len(steps)], axis=0)
            style = {"lw": 2.2} if name.startswith(("lora-edge", "full")) else {"lw": 1, "alpha": 0.8}
            axes[0, j].plot(steps, f1, label=name, **style)
            axes[1, j].plot(sec, f1, label=name, **style)
        axes[0, j].set(title=f"{shift}: {b}", xlabel="step", ylabel="macro-F1 (test windows)")
        axes[1, j].set(xlabel="training seconds (1 thread)", ylabel="macro-F1")
    axes[0, 0].legend(fontsize=7)
    save_figure(fig, path, dpi=90)


def write_report(rows: list[Row], out: Path, plot_rows: list[Row] | None = None) -> None:
    """OUT/summary.md (coverage, per-method table, claims) and OUT/f1_<shift>.png (from
    ``plot_rows`` if given: curves against seconds are only comparable from one machine)."""
    out.mkdir(parents=True, exist_ok=True)
    lines = summarise(rows)
    text = "## Coverage\n\n" + coverage_table(rows)
    text += "\n## Final macro-F1 (mean over users and seeds)\n\n" + pivot(lines, "f1", source=True)
    text += "\n## Speed-up to 95% of full fine-tuning's final F1, in steps (geometric mean over pairs)\n\n" + pivot(
        lines, "speedup_steps_95", ".2f"
    )
    text += "\n## Speed-up to 95%, in training seconds\n\n" + pivot(lines, "speedup_seconds_95", ".2f")
    text += "\n## Methods\n\n" + summary_table(lines) + "\n## LoRA-Edge claims\n\n" + claims(lines)
    write_bytes_atomic(out / "summary.md", text.encode())
    plot_rows = rows if plot_rows is None else plot_rows
    for shift in sorted({r["shift"] for r in plot_rows}):
        plot_curves(plot_rows, shift, out / f"f1_{shift}.png")
