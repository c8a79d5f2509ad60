"""A content hash of a weight tensor that PyTorch, ONNX and numpy sides compute identically."""

from __future__ import annotations

import hashlib

import numpy as np


def weight_sha256(array: np.ndarray) -> str:
    """SHA-256 of a float32 tensor's shape and little-endian bytes.

    array: any shape; converted to C-contiguous ``<f4`` first, so a float32 tensor from torch
    (``t.numpy()``) and the same tensor read from an ONNX initializer hash the same.
    Returns 64 lowercase hex digits.
    """
    a = np.ascontiguousarray(array, dtype="<f4")
    h = hashlib.sha256()
    h.update(("x".join(str(d) for d in a.shape) + ";").encode())
    h.update(a.tobytes())
    return h.hexdigest()
