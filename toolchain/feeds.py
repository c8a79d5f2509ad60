"""Input batches for the comparisons (verify, the export check, the engine check): real windows or
images spread over a dataset, then seeded random batches at the real data's scale."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def sample_batches(
    batch: int, shape: Sequence[int], real: np.ndarray | None, n_real: int, n_random: int, seed: int = 0
) -> list[np.ndarray]:
    """``n_real`` batches of ``batch`` rows spread evenly over ``real`` (N, *shape), then ``n_random``
    standard-normal batches scaled by the real data's standard deviation (1 without real data)."""
    out: list[np.ndarray] = []
    scale = 1.0
    if real is not None and len(real) and n_real:
        real = np.asarray(real, dtype=np.float32)
        idx = np.linspace(0, len(real) - 1, n_real * batch).astype(int)
        out += [np.ascontiguousarray(real[idx[i * batch : (i + 1) * batch]]) for i in range(n_real)]
        scale = float(real.std()) or 1.0
    rng = np.random.default_rng(seed)
    out += [(scale * rng.standard_normal((batch, *shape))).astype(np.float32) for _ in range(n_random)]
    return out
