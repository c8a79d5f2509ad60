"""Summarise `toolchain compare` results across backbones against the two papers' claims.

python scripts/compare_summary.py runs/compare_hapt_*      # prints Markdown
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

PEFT = ("lora-edge", "lora", "dora", "adapter", "bitfit")


def load(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((folder / "runs").glob("*.json"))]


def mem(r: dict) -> int:
    return r["param_bytes"] + r["grad_bytes"] + r["optimizer_bytes"] + r["activation_bytes"]


def summarise(rows: list[dict], fraction: float = 0.95) -> list[str]:
    full = next((r for r in rows if r["method"] == "full"), None)
    if full is None:
        return ["(no full fine-tuning run yet)"]
    target = fraction * full["f1_final"]
    for r in rows:
        r["steps_to_target"] = next((s for s, f in r["history"] if f >= target), None)
    b = rows[0]["backbone"]
    out = [
        f"**{b}**, target {100 * fraction:.0f}% of full fine-tuning's F1 = {target:.3f} (full: macro-F1 "
        f"{full['f1_final']:.3f}, {mem(full) / 2**20:.2f} MiB, "
        f"{full['total_flops'] / 1e6:.0f} MFLOP per step; source model F1 {full['f1_start']:.3f})",
        "",
    ]
    savings = [1 - mem(r) / mem(full) for r in rows if r["method"] in PEFT]
    no_act = [
        1 - (mem(r) - r["activation_bytes"]) / (mem(full) - full["activation_bytes"])
        for r in rows
        if r["method"] in PEFT
    ]
    out.append(
        f"- memory saved by PEFT methods vs full: mean {100 * np.mean(savings):.1f}% of the training-step "
        f"total, {100 * np.mean(no_act):.1f}% of parameters + gradients + optimizer state"
    )
    ad = next((r for r in rows if r["method"] == "adapter"), None)
    if ad:
        out.append(
            f"- bottleneck adapter: step FLOPs {100 * (1 - ad['total_flops'] / full['total_flops']):.1f}% below full; "
            f"optimizer FLOPs {100 * (1 - ad['optimizer_flops'] / max(full['optimizer_flops'], 1)):.1f}% below"
        )
    for r in rows:
        if r["method"] != "lora-edge":
            continue
        same_rank = next((x for x in rows if x["method"] == "lora" and x["rank"] == r["rank"]), None)
        s_edge = r.get("steps_to_target")

        def ratio(other: dict | None, s: int | None = s_edge) -> str:
            so = other.get("steps_to_target") if other else None
            return "n/a" if not s or not so else f"{so / s:.2f}x"

        out.append(
            f"- LoRA-Edge r{r['rank']}: {100 * r['trainable_fraction']:.2f}% trained, F1 {r['f1_final']:.3f} "
            f"({100 * (full['f1_final'] - r['f1_final']) / full['f1_final']:.1f}% below full), steps to target "
            f"{s_edge}; "
            f"speed-up in steps vs full {ratio(full)}, vs LoRA r{r['rank']} {ratio(same_rank)}"
        )
    return out


def main() -> None:
    for folder in sys.argv[1:]:
        rows = load(Path(folder))
        for fraction in (0.95, 0.99):
            if rows:
                print("\n".join(summarise(rows, fraction)), "\n")


if __name__ == "__main__":
    main()
