"""Symmetric INT8 weight quantization: the per-channel scale rule TensorRT's explicit quantization uses.

TensorRT takes INT8 only with zero point 0, so a weight's scale is its per-channel absolute maximum
over the symmetric range [-127, 127]. This is the rule of ONNX Runtime's ``quantize_static``
(``compute_scale_zp`` with ``symmetric=True``: (2 * absmax) / 254 in float64, stored as float32,
and 1.0 for an all-zero channel) and of ModelOpt's max calibration, so a scale recomputed here for a
fused weight is the scale either quantizer would give it.
"""

from __future__ import annotations

import numpy as np

QMAX = 127  # symmetric INT8: [-127, 127], zero point 0


def channel_scales(weight: np.ndarray, axis: int) -> np.ndarray:
    """Per-channel symmetric scales of ``weight``.

    weight: float array of any rank >= 1; axis: the channel axis (0 for Conv, C_out).
    Returns (weight.shape[axis],) float32: max|w| over the other axes, divided by 127 (computed as
    (2 * absmax) / 254 in float64, as ONNX Runtime does), and 1.0 where a channel is all zeros.
    """
    w = np.asarray(weight)
    axis = axis % w.ndim
    other = tuple(i for i in range(w.ndim) if i != axis)
    absmax = np.abs(w).max(axis=other) if other else np.abs(w)
    absmax = absmax.astype(w.dtype if w.dtype.kind == "f" else np.float32)
    scale = (2.0 * absmax.astype(np.float64)) / (2.0 * QMAX)
    tiny = np.finfo(absmax.dtype).tiny
    return np.where(scale < tiny, 1.0, scale).astype(np.float32)


def fake_quantize(weight: np.ndarray, scales: np.ndarray, axis: int) -> np.ndarray:
    """QuantizeLinear then DequantizeLinear with zero point 0: round-half-to-even of w / s, saturated to
    [-128, 127] (ONNX's QuantizeLinear), times s. weight: any shape; scales: (weight.shape[axis],)."""
    w = np.asarray(weight, dtype=np.float32)
    shape = [1] * w.ndim
    shape[axis % w.ndim] = -1
    s = np.asarray(scales, dtype=np.float32).reshape(shape)
    q = np.clip(np.rint(w / s), -128, 127)
    return (q * s).astype(np.float32)
