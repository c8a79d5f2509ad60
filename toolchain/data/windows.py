"""Windowed IMU datasets: (windows, channels, time) float32 with labels, subjects and segments."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from toolchain.core.errors import ToolchainError

WINDOW = 128
STEP = 64


@dataclass
class WindowDataset:
    """X: (N, C, T) windows or (N, C, H, W) images, float32; y: (N,) int64 class index; subject:
    (N,) int64 (a person, or an image domain); segment: (N,) int64.

    ``segment`` numbers the contiguous labelled recordings in time order; windows inside a segment
    are in time order too, which the time split relies on.
    """

    X: np.ndarray
    y: np.ndarray
    subject: np.ndarray
    segment: np.ndarray
    classes: list[str]
    name: str = "dataset"

    def __post_init__(self) -> None:
        n = len(self.X)
        if self.X.ndim not in (3, 4) or any(len(a) != n for a in (self.y, self.subject, self.segment)):
            raise ToolchainError(
                "a dataset needs X (N, C, T) or (N, C, H, W) and y, subject of length N",
                seen=(self.X.shape, len(self.y), len(self.subject)),
            )
        if n and (self.y.min() < 0 or self.y.max() >= len(self.classes)):
            raise ToolchainError(
                "labels must be class indices 0..K-1", seen=(int(self.y.min()), int(self.y.max())), remedy="relabel y"
            )

    def __len__(self) -> int:
        return len(self.X)

    def take(self, mask: np.ndarray) -> WindowDataset:
        return WindowDataset(
            self.X[mask], self.y[mask], self.subject[mask], self.segment[mask], self.classes, self.name
        )

    def subjects(self) -> list[int]:
        return sorted(int(s) for s in np.unique(self.subject))


def sliding_windows(signal: np.ndarray, size: int = WINDOW, step: int = STEP) -> np.ndarray:
    """Windows of ``size`` samples every ``step`` samples. signal: (T, C) -> (n, C, size) float32."""
    t = signal.shape[0]
    if t < size:
        return np.zeros((0, signal.shape[1], size), dtype=np.float32)
    starts = np.arange(0, t - size + 1, step)
    idx = starts[:, None] + np.arange(size)[None, :]
    return np.ascontiguousarray(signal[idx].transpose(0, 2, 1), dtype=np.float32)


def concat(
    parts: list[tuple[np.ndarray, int, int, int]], classes: list[str], name: str, channels: int
) -> WindowDataset:
    """Stack per-segment windows (windows, label, subject, segment) into one dataset."""
    parts = [p for p in parts if len(p[0])]
    if not parts:
        raise ToolchainError(
            "the data produced no 128-sample windows", seen=name, remedy="check the recordings are long enough"
        )
    X = np.concatenate([p[0] for p in parts])
    rep = [len(p[0]) for p in parts]
    y = np.repeat([p[1] for p in parts], rep).astype(np.int64)
    s = np.repeat([p[2] for p in parts], rep).astype(np.int64)
    g = np.repeat([p[3] for p in parts], rep).astype(np.int64)
    if X.shape[1] != channels:
        raise ToolchainError(f"expected {channels} channels", seen=X.shape[1])
    return WindowDataset(X, y, s, g, classes, name)


def split_subjects(ds: WindowDataset, targets: Iterable[int]) -> tuple[WindowDataset, WindowDataset]:
    """(source, target) by subject id. Every target must be present."""
    tset = sorted({int(t) for t in targets})
    missing = [t for t in tset if t not in ds.subjects()]
    if missing:
        raise ToolchainError("target subjects are not in the data", seen=missing, remedy=f"choose from {ds.subjects()}")
    mask = np.isin(ds.subject, tset)
    return ds.take(~mask), ds.take(mask)


def time_split(ds: WindowDataset, fraction: float = 0.8) -> tuple[WindowDataset, WindowDataset]:
    """Per segment: the first ``fraction`` of windows (time order) to adapt on, the rest to test on.

    One window between the two parts is dropped so that no test sample overlaps an adaptation
    window (50% overlap). Splitting per segment rather than per subject keeps every activity in
    both parts: the recording protocols run the activities in a fixed order.
    """
    if not 0.0 < fraction < 1.0:
        raise ToolchainError("the adaptation fraction must be in (0, 1)", seen=fraction)
    adapt = np.zeros(len(ds), dtype=bool)
    test = np.zeros(len(ds), dtype=bool)
    for seg in np.unique(ds.segment):
        idx = np.flatnonzero(ds.segment == seg)
        cut = int(np.floor(fraction * len(idx)))
        adapt[idx[:cut]] = True
        test[idx[cut + 1 :]] = True
    return ds.take(adapt), ds.take(test)


def fit_standardization(ds: WindowDataset) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over all samples of ``ds`` (the source subjects). Shapes (C,)."""
    axes = (0, *range(2, ds.X.ndim))
    mean = ds.X.mean(axis=axes, dtype=np.float64)
    std = ds.X.std(axis=axes, dtype=np.float64)
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


ADAPT_FRACTION = 0.8  # finetune's default: the first 80% of each target segment adapts, the rest tests
SPLITS = ("all", "source", "target", "target-adapt", "target-test")


def select_split(ds: WindowDataset, split: str, targets: Iterable[int]) -> WindowDataset:
    """``all``; ``source`` (the subjects a base was pretrained on); ``target``; ``target-adapt`` and
    ``target-test`` (the target windows finetune adapts on and holds out for testing, ``time_split``
    at ``ADAPT_FRACTION``)."""
    if split not in SPLITS:
        raise ToolchainError("unknown data split", seen=split, remedy=f"use one of {', '.join(SPLITS)}")
    if split == "all":
        return ds
    source, target = split_subjects(ds, targets)
    if split == "source":
        return source
    if split == "target":
        return target
    adapt, test = time_split(target, ADAPT_FRACTION)
    return adapt if split == "target-adapt" else test
