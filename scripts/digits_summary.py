"""Markdown for docs/BENCHMARKS.md from `scripts/bench_digits.sh`'s compare folders: the per-method
tables and the two papers' claims re-checked on image CNNs.

    python scripts/digits_summary.py runs/digits
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SCENARIOS = {
    "shift": "digits shift: clean source half -> the other half corrupted (severity 3)",
    "unseen": "unseen classes: pretrain on digits 0-7, adapt to 0-9 (the head grows)",
}


def rows(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((folder / "runs").glob("*.json"))]


def _first_step(history: list[list[float]], target: float) -> float | None:
    return next((step for step, f1 in history if f1 >= target), None)


def claims(rs: list[dict]) -> str:
    steps_used = max(
        {r["steps"] for r in rs}, key=[r["steps"] for r in rs].count
    )  # the grid's setting; older cached runs differ
    by = {r["method"]: r for r in rs if r["steps"] == steps_used}
    full, edge = by.get("full"), by.get("lora-edge")
    if not (full and edge):
        return "incomplete"
    frac = 100 * edge["trainable_fraction"]
    gap = 100 * (full["f1_final"] - edge["f1_final"]) / full["f1_final"]
    act = edge["activation_bytes"] / full["activation_bytes"]
    flops = edge["total_flops"] / full["total_flops"]
    target = 0.95 * full["f1_final"]
    steps = _first_step(edge["history"], target), _first_step(full["history"], target)
    speed = f"LoRA-Edge at step {steps[0]}, full at step {steps[1]}" + (
        f" ({steps[1] / steps[0]:.1f}x)" if all(steps) else ""
    )
    parts = [
        f"trainable {frac:.2f}% ({'<=' if frac <= 1.49 else '>'} 1.49%)",
        f"F1 {edge['f1_final']:.3f} vs full {full['f1_final']:.3f} ({'within' if gap <= 4.7 else 'not within'} "
        f"4.7%: {gap:+.1f}%)",
        f"steps to 95% of full's final F1: {speed}",
        f"activations {act:.2f}x, FLOPs/step {flops:.2f}x of full",
    ]
    return "; ".join(parts)


def main(root: str) -> None:
    for scenario, title in SCENARIOS.items():
        for folder in sorted(Path(root).glob(f"{scenario}_*")):
            md = folder / "results.md"
            if not md.is_file():
                continue
            print(f"#### {folder.name.split('_', 1)[1]}: {title}\n")
            print(md.read_text().strip() + "\n")
            print(f"LoRA-Edge against full fine-tuning here: {claims(rows(folder))}.\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/digits")
