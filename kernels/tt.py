"""Tensor-train math for conv kernels, after TensorLy's ``_tt.py``: small pure numpy functions.

A conv kernel W has modes n = (C_out, C_in/groups, k1[, k2]). Its TT decomposition is a list of d
cores, core k of shape (r_k, n_k, r_{k+1}) with r_0 = r_d = 1. LoRA-Edge trains only a delta of
the first (output-side) core; the others, contracted, form the frozen *suffix kernel*.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import numpy as np

from toolchain.core.errors import ToolchainError


def tt_ranks(shape: Sequence[int], rank: int) -> tuple[int, ...]:
    """Bond ranks (r_0, ..., r_d) for one target rank, clipped per bond to what the sizes allow.

    shape: the d modes n_0..n_{d-1}. r_0 = r_d = 1 and r_k = min(rank, r_{k-1} n_{k-1},
    n_k ... n_{d-1}), so r_1 <= min(C_out, C_in/g * k1 * k2) for a conv kernel.
    """
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank < 1:
        raise ToolchainError(
            "TT rank must be an integer >= 1", seen=rank, remedy="use --rank 1 or more (2, 4, 8 are usual)"
        )
    dims = [int(n) for n in shape]
    if len(dims) < 2 or min(dims) < 1:
        raise ToolchainError("a TT decomposition needs at least 2 modes, each >= 1", seen=tuple(dims))
    ranks = [1]
    for k in range(1, len(dims)):
        ranks.append(min(int(rank), ranks[-1] * dims[k - 1], prod(dims[k:])))
    ranks.append(1)
    return tuple(ranks)


def tt_svd(tensor: np.ndarray, rank: int) -> list[np.ndarray]:
    """TT-SVD, left to right: cores G_k of shape (r_k, n_k, r_{k+1}), float32.

    tensor: shape (n_0, ..., n_{d-1}), d >= 2. Singular vectors get a fixed sign (the entry of
    largest magnitude in each left vector is positive) so the result does not depend on LAPACK's
    sign choice. At full rank, ``tt_reconstruct(tt_svd(W, r))`` equals W to rounding.
    """
    w = np.asarray(tensor, dtype=np.float64)
    ranks = tt_ranks(w.shape, rank)
    if not np.all(np.isfinite(w)):
        raise ToolchainError(
            "cannot decompose a kernel with NaN or Inf values", seen="non-finite weight", remedy="check the checkpoint"
        )
    cores: list[np.ndarray] = []
    rest = w
    for k, n in enumerate(w.shape[:-1]):
        mat = rest.reshape(ranks[k] * n, -1)
        u, s, vt = np.linalg.svd(mat, full_matrices=False)
        r = ranks[k + 1]
        u, vt = _fix_signs(u[:, :r], vt[:r])
        cores.append(u.reshape(ranks[k], n, r).astype(np.float32))
        rest = s[:r, None] * vt
    cores.append(rest.reshape(ranks[-2], w.shape[-1], 1).astype(np.float32))
    return cores


def _fix_signs(u: np.ndarray, vt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip (u[:, j], vt[j]) pairs so the largest-magnitude entry of u[:, j] is positive."""
    pivots = np.argmax(np.abs(u), axis=0)
    signs = np.sign(u[pivots, np.arange(u.shape[1])])
    signs[signs == 0] = 1.0
    return u * signs, vt * signs[:, None]


def tt_reconstruct(cores: Sequence[np.ndarray]) -> np.ndarray:
    """Contract all cores back to the full tensor of shape (n_0, ..., n_{d-1})."""
    validate_cores(cores)
    full = np.asarray(cores[0], dtype=np.float64)
    for core in cores[1:]:
        full = np.tensordot(full, np.asarray(core, dtype=np.float64), axes=(-1, 0))
    return full.reshape(full.shape[1:-1]).astype(np.float32)


def validate_cores(cores: Sequence[np.ndarray], shape: Sequence[int] | None = None) -> None:
    """Check a list of TT cores: 3-D, r_0 = r_d = 1, bonds agree, finite, modes equal ``shape``.

    Raises ToolchainError naming the first core that breaks a rule.
    """
    if len(cores) < 2:
        raise ToolchainError("a TT decomposition has at least 2 cores", seen=len(cores))
    for k, core in enumerate(cores):
        if np.ndim(core) != 3:
            raise ToolchainError(f"TT core {k} must be 3-D (r_k, n_k, r_k+1)", seen=np.shape(core))
        if not np.all(np.isfinite(core)):
            raise ToolchainError(
                f"TT core {k} has NaN or Inf values",
                seen="non-finite values",
                remedy="the adapter file is corrupt; re-export it",
            )
    if cores[0].shape[0] != 1 or cores[-1].shape[2] != 1:
        raise ToolchainError("the outer TT ranks must be 1", seen=(cores[0].shape[0], cores[-1].shape[2]))
    for k in range(len(cores) - 1):
        if cores[k].shape[2] != cores[k + 1].shape[0]:
            raise ToolchainError(
                f"TT bond {k + 1} does not match between cores {k} and {k + 1}",
                seen=(cores[k].shape, cores[k + 1].shape),
            )
    if shape is not None and tuple(c.shape[1] for c in cores) != tuple(shape):
        raise ToolchainError(
            "TT core modes do not match the kernel shape", seen=(tuple(c.shape[1] for c in cores), tuple(shape))
        )


def suffix_kernel(suffix_cores: Sequence[np.ndarray]) -> np.ndarray:
    """Contract the frozen cores G_2..G_d into the suffix kernel of shape (r_1, C_in/g, k1[, k2]).

    suffix_cores: cores 2..d, the first of shape (r_1, n_2, r_2), the last (r_{d-1}, n_d, 1).
    """
    if len(suffix_cores) < 1:
        raise ToolchainError("the suffix needs at least one TT core", seen=0)
    r1 = suffix_cores[0].shape[0]
    identity = np.eye(r1, dtype=np.float32).reshape(1, r1, r1)  # a first core that keeps r_1 open
    return tt_reconstruct([identity, *suffix_cores])


def delta_weight(delta_g1: np.ndarray, suffix: np.ndarray, scaling: float = 1.0) -> np.ndarray:
    """The reference ΔW = scaling * (ΔG1 x_1 suffix), shape (C_out, C_in/g, k1[, k2]), float32.

    delta_g1: (C_out, r_1). suffix: (r_1, C_in/g, k1[, k2]) from ``suffix_kernel``.
    """
    d = np.asarray(delta_g1, dtype=np.float32)
    s = np.asarray(suffix, dtype=np.float32)
    if d.ndim != 2 or s.ndim < 2 or d.shape[1] != s.shape[0]:
        raise ToolchainError("ΔG1 (C_out, r1) and the suffix (r1, ...) must share r1", seen=(d.shape, s.shape))
    out = (d @ s.reshape(s.shape[0], -1)).reshape(d.shape[0], *s.shape[1:])
    return out if scaling == 1.0 else (np.float32(scaling) * out).astype(np.float32)
