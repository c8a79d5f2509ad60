"""The lean training path: frozen layers that keep for backward only what gradients need.

``lean_training(model)`` switches, for the duration of a ``with`` block, every plain Conv1d/Conv2d,
Linear, BatchNorm, ReLU/ReLU6, MaxPool and global AdaptiveAvgPool module to a subclass whose
forward uses ``lean_ops`` where that is exact, and PyTorch's own forward otherwise (a trainable
weight, BatchNorm in training mode or with trainable affine, overlapping pooling windows). LoRA-Edge
and LoRA layers switch to their merged, lean functions. Parameters, buffers and state_dict keys do
not change, so the reference path is the same model outside the block.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolchain.models.registry import Standardize
from toolchain.peft import lean_ops
from toolchain.peft.lean_ops import Conf


def conv_inputs(conv: nn.Conv1d | nn.Conv2d, x: Tensor, *, padded: bool = False) -> tuple[Tensor, Conf]:
    """x padded as the conv pads it when the padding is a string or not zeros (or in its own forward, for the
    ``PRE_PADS`` subclasses, unless ``padded``: the caller already did), and the numeric geometry."""
    from toolchain.peft.lora_edge import pre_pad

    x = x if padded else pre_pad(conv, x)
    nd = conv.weight.dim() - 2
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        pads = list(conv._reversed_padding_repeated_twice)
        if any(pads):
            x = F.pad(x, pads, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
        padding: tuple[int, ...] = (0,) * nd
    else:
        padding = tuple(int(p) for p in conv.padding)
    return x, (tuple(conv.stride), padding, tuple(conv.dilation), conv.groups)


def _frozen(*params: Tensor | None) -> bool:
    return not any(p is not None and p.requires_grad for p in params)


def bn_is_frozen(bn: nn.Module) -> bool:
    """Eval-mode BatchNorm with running statistics and a frozen affine: a fixed per-channel affine."""
    return (
        not bn.training
        and getattr(bn, "running_var", None) is not None
        and _frozen(getattr(bn, "weight", None), getattr(bn, "bias", None))
    )


def bn_affine(bn: Any) -> tuple[Tensor, Tensor]:
    """(scale, shift) with bn(x) = x · scale + shift per channel, for a frozen BatchNorm."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale + (bn.bias if bn.bias is not None else 0)
    return scale, shift


def lean_applies(conv: nn.Module) -> bool:
    """Whether ``conv``'s forward takes its lean function now (so a following BN may be folded in)."""
    if not torch.is_grad_enabled():
        return False
    if isinstance(conv, nn.Conv1d | nn.Conv2d):
        return type(conv) in (LeanConv1d, LeanConv2d) and not conv.weight.requires_grad
    return bool(getattr(conv, "lean", False)) and getattr(conv, "lean_ready", lambda: False)()


def folded_bn(conv: nn.Module) -> nn.Module | None:
    """The BatchNorm right after ``conv`` that its lean forward applies too, or None."""
    bn = conv.__dict__.get("_lean_bn")
    return bn if bn is not None and bn_is_frozen(bn) and lean_applies(conv) else None


def fold(bn: nn.Module | None, b: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """(scale, b·scale + shift) for a folded BN; (None, b) without one. The weight is scaled inside the
    lean ops (``lean_ops.scaled``), which keep the frozen weight itself, not a scaled copy."""
    if bn is None:
        return None, b
    scale, shift = bn_affine(bn)
    return scale, shift + (b * scale if b is not None else 0)


class _LeanConv:
    weight: Tensor
    bias: Tensor | None

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.requires_grad or not torch.is_grad_enabled():
            return super().forward(x)  # type: ignore[misc]
        scale, b = fold(folded_bn(self), self.bias)  # type: ignore[arg-type]
        x, conf = conv_inputs(self, x)  # type: ignore[arg-type]
        return lean_ops.FrozenConv.apply(x, self.weight, scale, b, conf)


class LeanConv1d(_LeanConv, nn.Conv1d):
    pass


class LeanConv2d(_LeanConv, nn.Conv2d):
    pass


class LeanLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        if self.weight.requires_grad or not torch.is_grad_enabled():
            return super().forward(x)
        return lean_ops.FrozenLinear.apply(x, self.weight, self.bias)


class _LeanBatchNorm:
    """Eval-mode BatchNorm with frozen affine: y = x·scale + shift per channel, keeping nothing of x."""

    training: bool
    track_running_stats: bool
    running_mean: Tensor | None
    running_var: Tensor | None
    eps: float

    def forward(self, x: Tensor) -> Tensor:
        conv = self.__dict__.get("_lean_conv")
        if conv is not None and folded_bn(conv) is self:
            return x  # the conv before it already applied this BN
        if not bn_is_frozen(self):  # type: ignore[arg-type]
            return super().forward(x)  # type: ignore[misc]
        scale, shift = bn_affine(self)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.reshape(shape), x, scale.reshape(shape))


class LeanBatchNorm1d(_LeanBatchNorm, nn.BatchNorm1d):
    pass


class LeanBatchNorm2d(_LeanBatchNorm, nn.BatchNorm2d):
    pass


class LeanReLU(nn.ReLU):
    def forward(self, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        return lean_ops.MaskedClamp.apply(x, None)


class LeanReLU6(nn.ReLU6):
    def forward(self, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        return lean_ops.MaskedClamp.apply(x, 6.0)


class _LeanMaxPool:
    kernel_size: Any
    stride: Any
    padding: Any
    dilation: Any
    ceil_mode: bool
    return_indices: bool

    def _window(self, nd: int) -> tuple[int, ...] | None:
        k = _tuple(self.kernel_size, nd)
        s = _tuple(self.stride if self.stride else self.kernel_size, nd)
        plain = (
            _tuple(self.padding, nd) == (0,) * nd
            and _tuple(self.dilation, nd) == (1,) * nd
            and not self.ceil_mode
            and not self.return_indices
        )
        return k if plain and k == s and int(torch.tensor(k).prod()) <= 255 else None

    def forward(self, x: Tensor) -> Tensor:
        k = self._window(x.dim() - 2)
        if k is None or not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)  # type: ignore[misc]
        return lean_ops.WindowMax.apply(x, k)


class LeanMaxPool1d(_LeanMaxPool, nn.MaxPool1d):
    pass


class LeanMaxPool2d(_LeanMaxPool, nn.MaxPool2d):
    pass


class _LeanGlobalPool:
    output_size: Any

    def forward(self, x: Tensor) -> Tensor:
        if set(_tuple(self.output_size, x.dim() - 2)) != {1}:
            return super().forward(x)  # type: ignore[misc]
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)  # keeps only the shape for backward


class LeanAdaptiveAvgPool1d(_LeanGlobalPool, nn.AdaptiveAvgPool1d):
    pass


class LeanAdaptiveAvgPool2d(_LeanGlobalPool, nn.AdaptiveAvgPool2d):
    pass


class LeanStandardize(Standardize):
    """The input standardisation, its output marked as recomputable from the caller's batch: a first conv
    that needs its input in backward (LoRA-Edge keeping x, LoRA's A) keeps the batch, not a copy."""

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        return lean_ops.mark_standardized(y, x, self.mean, self.std) if torch.is_grad_enabled() else y


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, tuple | list) else (int(v),) * n


LEAN_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: LeanConv1d,
    nn.Conv2d: LeanConv2d,
    nn.Linear: LeanLinear,
    nn.BatchNorm1d: LeanBatchNorm1d,
    nn.BatchNorm2d: LeanBatchNorm2d,
    nn.ReLU: LeanReLU,
    nn.ReLU6: LeanReLU6,
    nn.MaxPool1d: LeanMaxPool1d,
    nn.MaxPool2d: LeanMaxPool2d,
    nn.AdaptiveAvgPool1d: LeanAdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d: LeanAdaptiveAvgPool2d,
    Standardize: LeanStandardize,
}


@contextlib.contextmanager
def lean_training(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Within the block, ``model`` trains on the lean path (exactly the same gradients)."""
    if not enabled:
        yield model
        return
    swapped: list[tuple[nn.Module, type[nn.Module]]] = []
    flagged: list[nn.Module] = []
    for m in model.modules():
        lean = LEAN_CLASSES.get(type(m))
        if lean is not None:
            swapped.append((m, type(m)))
            m.__class__ = lean
        if hasattr(m, "lean"):
            setattr(m, "lean", True)  # noqa: B010
            flagged.append(m)
    pairs = _conv_bn_pairs(model)
    for conv, bn in pairs:  # plain attributes, not submodules: state_dict and modules() stay the same
        conv.__dict__["_lean_bn"], bn.__dict__["_lean_conv"] = bn, conv
    try:
        yield model
    finally:
        for m, cls in swapped:
            m.__class__ = cls
        for m in flagged:
            setattr(m, "lean", False)  # noqa: B010
        for conv, bn in pairs:
            conv.__dict__.pop("_lean_bn", None)
            bn.__dict__.pop("_lean_conv", None)


def _conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(conv, BN) where the BN directly follows the conv inside an nn.Sequential (its only reader)."""
    pairs: list[tuple[nn.Module, nn.Module]] = []
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for a, b in itertools.pairwise(seq.children()):
            if isinstance(b, nn.BatchNorm1d | nn.BatchNorm2d) and (
                isinstance(a, nn.Conv1d | nn.Conv2d) or hasattr(a, "lean_ready")
            ):
                pairs.append((a, b))
    return pairs
