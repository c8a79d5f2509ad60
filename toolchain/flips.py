"""Which windows an INT8 model flips against its FP32 reference, and how sure the reference was there.

An agreement measured on a few hundred windows is a binomial estimate: 0.99 on 205 windows allows 2
flips, and its 95% interval is several flips wide. ``verify`` of an INT8 model reports that interval
(Wilson's score interval) and, for the flipped windows, the reference's own top-1 minus top-2 output
margin beside the median margin of all windows, so a failed gate says whether the INT8 model flips the
reference's least confident windows (near-ties, where any perturbation flips them) or confident ones
(clipping or a real loss; ``toolchain.saturation`` says which activations). It changes no verdict.
Torch-free; numpy only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from toolchain.records import Agreement

MAX_LISTED = 50  # flipped windows listed by index in verify.json (the count and the rank cover all of them)
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval


def wilson_interval(agree: int, windows: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion of ``agree`` out of ``windows`` (> 0)."""
    p = agree / windows
    denom = 1.0 + z * z / windows
    centre = (p + z * z / (2 * windows)) / denom
    half = z * math.sqrt(p * (1.0 - p) / windows + z * z / (4.0 * windows * windows)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def top2_margins(outputs: np.ndarray) -> np.ndarray:
    """(N, K[, ...]) -> (N,): top-1 minus top-2 over axis 1, the least over any further axes (a window
    is as sure as its least sure position); zeros where K < 2."""
    if outputs.ndim < 2 or outputs.shape[1] < 2:
        return np.zeros(len(outputs), np.float64)
    top = np.sort(np.asarray(outputs, np.float64), axis=1)
    margin = top[:, -1] - top[:, -2]
    return margin.reshape(len(outputs), -1).min(axis=1)


def _differs(model: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per argmax position over axis 1: whether the two outputs' top-1 differ."""
    return np.not_equal(np.asarray(model).argmax(axis=1), np.asarray(reference).argmax(axis=1))


def _rows(diff: np.ndarray) -> np.ndarray:
    """(N, ...) -> (N,): whether any position of a row differs."""
    return np.asarray(diff.reshape(len(diff), -1).any(axis=1))


def flipped_rows(model: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(N,) bool: rows whose argmax over axis 1 differs anywhere."""
    return _rows(_differs(model, reference))


def flip_fields(model: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """The ``Agreement`` fields on flips, from both models' first outputs (N, K[, ...]): the 95% interval
    of the agreement over every argmax position, the flipped windows (a window flips where any position
    differs; the reference's most confident first: those are not near-ties; at most ``MAX_LISTED``), the
    reference's margin on each, the median margin of all windows, and the share of all windows whose
    margin is at most the largest flipped one (None without flips)."""
    diff = _differs(model, reference)
    margins = top2_margins(reference)
    flipped = np.flatnonzero(_rows(diff))
    order = flipped[np.argsort(-margins[flipped], kind="stable")]
    worst = float(margins[flipped].max()) if len(flipped) else None
    return {
        "interval": list(wilson_interval(int(diff.size - diff.sum()), diff.size)) if diff.size else [],
        "flipped": len(flipped),
        "flipped_windows": [int(i) for i in order[:MAX_LISTED]],
        "flipped_margins": [float(margins[i]) for i in order[:MAX_LISTED]],
        "margin_median": float(np.median(margins)) if len(margins) else None,
        "flipped_margin_rank": float(np.mean(margins <= worst)) if worst is not None else None,
    }


def summary(ag: Agreement) -> str:
    """One line for ``verify``: how many windows flip, the interval, and how sure the reference was."""
    lo, hi = ag.interval or (float("nan"), float("nan"))
    head = f"{ag.flipped} of {ag.windows} windows flip (95% interval of the agreement {lo:.4f}-{hi:.4f})"
    if not ag.flipped or not ag.flipped_margins or ag.margin_median is None or ag.flipped_margin_rank is None:
        return head
    return (
        f"{head}; the FP32 reference's top-2 margin on them at most {ag.flipped_margins[0]:.3g} "
        f"(median of all windows {ag.margin_median:.3g}): every flip is among the reference's "
        f"{100 * ag.flipped_margin_rank:.1f}% least confident windows"
    )
