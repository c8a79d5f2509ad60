"""INT8-aware adaptation: train an adapter for the quantized base it will be fused into.

``toolchain fuse BASE.int8.onnx ADAPTER`` keeps the base's calibrated activation scales (so the model
keeps its calibration and its engine a refit path), but an adapter trained in float may push the
activations past those ranges, where INT8 clips them (docs/INT8.md: mobilenet1d's last conv input on
100% of the target windows, up to 8x). ``finetune --int8-base BASE.int8.onnx`` trains with every
quantized kernel input fake-quantized at the base's own fixed scale (symmetric INT8, zero point 0,
straight-through gradients: ``torch.fake_quantize_per_tensor_affine``), so the adapter is fitted to the
ranges it will run in. Weights stay float in training: fusion requantizes them per output channel.

The INT8 base must be the quantization of the very checkpoint trained: each quantized weight is found
by its name (the export's parameter path) and must equal the checkpoint's weight bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from toolchain.core.errors import ToolchainError

QMIN, QMAX = -128, 127
REMEDY = "quantize this checkpoint's export: toolchain export --checkpoint CKPT -o base.onnx, then toolchain quantize"


@dataclass(frozen=True)
class Int8Base:
    """What ``--int8-base`` fixes for training: module path -> the scale of its quantized input."""

    path: str
    sha256: str
    scales: Mapping[str, float]

    def info(self) -> dict[str, object]:
        """The adapter's record of the base it was trained for."""
        return {"sha256": self.sha256, "quantized_inputs": len(self.scales)}


def read_int8_base(path: str | os.PathLike[str], model: nn.Module) -> Int8Base:
    """The quantized inputs of ``path`` mapped onto ``model`` (the checkpoint, before injection).

    Raises ToolchainError when ``path`` is not explicitly quantized, has no quantized kernel input, or
    was not quantized from ``model``'s weights."""
    from toolchain.graphs.onnx_io import read_onnx
    from toolchain.graphs.qdq import is_quantized, kernel_input_scales
    from toolchain.graphs.weights import index_weights

    proto, data = read_onnx(path)
    if not is_quantized(proto):
        raise ToolchainError(
            "--int8-base takes an explicitly quantized (QDQ) model", seen=f"{path}: no QuantizeLinear", remedy=REMEDY
        )
    weights = index_weights(proto.graph)
    by_weight = kernel_input_scales(proto.graph, weights)
    if not by_weight:
        raise ToolchainError(
            "--int8-base has no kernel with both its weight and its input quantized", seen=str(path), remedy=REMEDY
        )
    modules = dict(model.named_modules())
    scales: dict[str, float] = {}
    for name, scale in sorted(by_weight.items()):
        module_path = name.removesuffix(".weight")
        module = modules.get(module_path) if name.endswith(".weight") else None
        mine = getattr(module, "weight", None)
        theirs = weights[name].values()
        if not isinstance(mine, torch.Tensor) or not _same(mine, theirs):
            raise ToolchainError(
                "the INT8 base was not quantized from this checkpoint: its quantized weights must be the "
                "checkpoint's, found by parameter path and equal bit for bit",
                seen=f"{path}: {name} " + ("has no module" if mine is None else "differs"),
                remedy=REMEDY,
            )
        scales[module_path] = scale
    return Int8Base(str(path), hashlib.sha256(data).hexdigest(), scales)


def _same(mine: torch.Tensor, theirs: np.ndarray) -> bool:
    value = mine.detach().cpu().numpy()
    return value.shape == theirs.shape and value.dtype == theirs.dtype and value.tobytes() == theirs.tobytes()


def fake_quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x as the INT8 model sees it: round(x / scale) clamped to [-128, 127], times scale (gradient 1 inside
    the range, 0 where clipped)."""
    return torch.fake_quantize_per_tensor_affine(x, scale, 0, QMIN, QMAX)


@contextlib.contextmanager
def quantized_inputs(model: nn.Module, scales: Mapping[str, float] | None) -> Iterator[nn.Module]:
    """Within the block, the input of each module at a path of ``scales`` (after injection: the adapted
    layer, so the frozen conv and the adapter path both see the quantized input) is fake-quantized."""
    if not scales:
        yield model
        return
    modules = dict(model.named_modules())
    missing = sorted(set(scales) - set(modules))
    if missing:
        raise ToolchainError("a quantized input's module is not in the model", seen=missing[:4], remedy=REMEDY)
    handles = [modules[p].register_forward_pre_hook(_hook(s)) for p, s in scales.items()]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def _hook(scale: float) -> Callable[[nn.Module, tuple[object, ...]], tuple[object, ...]]:
    def pre(module: nn.Module, args: tuple[object, ...]) -> tuple[object, ...]:
        x = args[0]
        if not isinstance(x, torch.Tensor):
            return args
        return (fake_quantize(x, scale), *args[1:])

    return pre
