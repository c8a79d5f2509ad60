"""Reference weight updates of conv LoRA and DoRA, pure numpy (grouped and depthwise convs included).

Conv LoRA with groups g and rank r: a down conv A of shape (g*r, C_in/g, k1[, k2]) with the layer's
geometry and groups, then a grouped 1x1 up conv B of shape (C_out, r). Output channel o (group
o // (C_out/g)) sees ΔW[o] = scaling * sum_j B[o, j] A[group(o)*r + j].
"""

from __future__ import annotations

import numpy as np

from toolchain.core.errors import ToolchainError


def lora_delta(lora_a: np.ndarray, lora_b: np.ndarray, groups: int, scaling: float = 1.0) -> np.ndarray:
    """ΔW of conv LoRA, shape (C_out, C_in/g, k1[, k2]), float32.

    lora_a: (g*r, C_in/g, k1[, k2]). lora_b: (C_out, r).
    """
    a = np.asarray(lora_a, dtype=np.float32)
    b = np.asarray(lora_b, dtype=np.float32)
    c_out, r = b.shape
    if a.shape[0] != groups * r or c_out % groups:
        raise ToolchainError(
            "LoRA A must be (groups*r, C_in/g, k...) and B (C_out, r) with C_out divisible by groups",
            seen=(a.shape, b.shape, groups),
        )
    a_g = a.reshape(groups, r, -1)  # (g, r, C_in/g * k)
    b_g = b.reshape(groups, c_out // groups, r)  # (g, C_out/g, r)
    delta = np.matmul(b_g, a_g).reshape(c_out, *a.shape[1:])
    return delta if scaling == 1.0 else (np.float32(scaling) * delta).astype(np.float32)


def channel_norm(weight: np.ndarray) -> np.ndarray:
    """L2 norm of each output channel's filter: (C_out, ...) -> (C_out,)."""
    w = np.asarray(weight, dtype=np.float32)
    return np.sqrt(np.sum(w.reshape(len(w), -1).astype(np.float64) ** 2, axis=1)).astype(np.float32)


def dora_weight(
    weight: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray, magnitude: np.ndarray, groups: int, scaling: float = 1.0
) -> np.ndarray:
    """DoRA's merged weight W' = m * (W + ΔW) / ||W + ΔW||, norms per output channel."""
    v = np.asarray(weight, dtype=np.float32) + lora_delta(lora_a, lora_b, groups, scaling)
    norm = channel_norm(v)
    if np.any(norm == 0):
        raise ToolchainError("DoRA needs every output channel of W + ΔW to be non-zero", seen=int(np.sum(norm == 0)))
    shape = (-1,) + (1,) * (v.ndim - 1)
    return (v * (np.asarray(magnitude, dtype=np.float32) / norm).reshape(shape)).astype(np.float32)
