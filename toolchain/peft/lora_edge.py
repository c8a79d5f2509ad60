"""LoRA-Edge: a conv wrapped with a tensor-train LoRA update of its output-side core.

The base conv and the TT suffix cores G_2..G_d (from TT-SVD of the pretrained kernel) are frozen;
only ΔG1 (C_out x r1), initialised to zero, is trained. Forward adds the auxiliary path
conv(x, suffix kernel, same geometry, r1 channels per group) -> grouped 1x1 conv with ΔG1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolchain.adapters.adapter_file import ConvGeometry
from toolchain.core.errors import ToolchainError
from toolchain.kernels import suffix_kernel, tt_svd, weight_sha256

ConvNd = nn.Conv1d | nn.Conv2d
_CONV_FN = {1: F.conv1d, 2: F.conv2d}


def conv_geometry(conv: nn.Module) -> ConvGeometry:
    """The geometry of an nn.Conv1d / nn.Conv2d, as recorded in adapter files."""
    if not isinstance(conv, nn.Conv1d | nn.Conv2d):
        raise ToolchainError(
            "LoRA-Edge targets must be nn.Conv1d or nn.Conv2d",
            seen=type(conv).__name__,
            remedy="select conv layers only",
        )
    pad = conv.padding if isinstance(conv.padding, str) else tuple(int(p) for p in conv.padding)
    return ConvGeometry(
        kind="conv1d" if isinstance(conv, nn.Conv1d) else "conv2d",
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=tuple(conv.kernel_size),
        stride=tuple(conv.stride),
        padding=pad,
        dilation=tuple(conv.dilation),
        groups=conv.groups,
        padding_mode=conv.padding_mode,
        bias=conv.bias is not None,
    )


def _tf_same_pad(conv: Any, x: Tensor) -> Tensor:
    """TensorFlow's "SAME" padding from the input's size (the odd pixel at the end), as timm's ``pad_same``."""
    pads: list[int] = []
    for i, k, s, d in reversed(list(zip(x.shape[2:], conv.kernel_size, conv.stride, conv.dilation, strict=True))):
        total = max((math.ceil(int(i) / s) - 1) * s + (k - 1) * d + 1 - int(i), 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


def _temporal_pad(
    conv: Any, x: Tensor, inference: bool = False, in_buffer: Any = None, buffer_io: Any = None
) -> Tensor:
    """pytorch-tcn's TemporalConv1d: its ``padder`` (causal or centred, any padding mode, the streaming
    buffer in inference mode) before a padding-0 Conv1d; an ``in_buffer`` is refused as the class does."""
    if in_buffer is not None:
        raise ValueError("pytorch-tcn >= 1.2.2 takes the input buffer as buffer_io, not in_buffer")
    return conv.padder(x, inference=inference, buffer_io=buffer_io)  # type: ignore[no-any-return]


# Conv subclasses whose own forward is "pad the input, then the plain convolution with padding 0": the
# wrappers follow them exactly by padding first (``pre_pad``) and convolving as a plain conv. The function
# takes the keyword arguments the subclass's forward takes.
PRE_PADS: dict[str, Callable[..., Tensor]] = {
    "timm.layers.conv2d_same.Conv2dSame": _tf_same_pad,
    "timm.layers.conv2d_same.Conv2dSameExport": lambda conv, x: conv.pad(x),
    "pytorch_tcn.conv.TemporalConv1d": _temporal_pad,
}


def _crop_causal(conv: Any, y: Tensor) -> Tensor:
    """braindecode's CausalConv1d: padded on both sides by (k - 1)·d, the last (k - 1)·d samples cut."""
    return y[..., : -conv.padding[0]]


# Conv subclasses whose own forward is "the plain convolution, then a crop of its output": a crop is
# linear, so the wrappers apply it to the sum of the frozen conv and the update (``post_crop``).
POST_CROPS: dict[str, Callable[[Any, Tensor], Tensor]] = {
    "braindecode.modules.convolution.CausalConv1d": _crop_causal,
}


def original_class(module: nn.Module) -> type:
    """The module's own class; for a module with ``torch.nn.utils.parametrize`` parametrizations (weight
    norm, max-norm constraints), the class it had before PyTorch subclassed it as ``Parametrized...``."""
    from torch.nn.utils import parametrize

    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def class_path(module: nn.Module) -> str:
    cls = original_class(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def pre_pad(conv: nn.Module, x: Tensor, **kwargs: Any) -> Tensor:
    """``x`` as ``conv``'s own forward pads it before convolving (unchanged for plain convs). ``kwargs``:
    the subclass's own forward arguments (pytorch-tcn's ``inference``); a plain conv takes none."""
    fn = PRE_PADS.get(class_path(conv))
    if fn is None:
        if kwargs:
            raise TypeError(f"{type(conv).__name__}.forward() got unexpected keyword arguments {sorted(kwargs)}")
        return x
    return fn(conv, x, **kwargs)


def run_pre_hooks(conv: nn.Module, x: Tensor, kwargs: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """What calling ``conv`` does before its forward, which the wrappers bypass: its forward pre-hooks, in
    order (the hook-based ``torch.nn.utils.weight_norm`` recomputes the weight from g and v in one)."""
    for key, hook in list(conv._forward_pre_hooks.items()):
        if key in conv._forward_pre_hooks_with_kwargs:
            out = hook(conv, (x,), kwargs)
            if out is not None:
                (x, *_), kwargs = out
        else:
            out = hook(conv, (x,))
            if out is not None:
                x = out[0] if isinstance(out, tuple) else out
    return x, kwargs


def post_crop(conv: nn.Module, y: Tensor) -> Tensor:
    """``y`` as ``conv``'s own forward crops its convolution's output (unchanged for plain convs)."""
    fn = POST_CROPS.get(class_path(conv))
    return y if fn is None else fn(conv, y)


def plain_forward(conv: ConvNd, x: Tensor) -> Tensor:
    """What ``conv(x)`` computes, followed exactly for the ``PRE_PADS`` and ``POST_CROPS`` subclasses too."""
    return post_crop(conv, conv._conv_forward(pre_pad(conv, x), conv.weight, conv.bias))


class ConvAttributes:
    """A drop-in for the conv a wrapper holds as ``base``: model code that reads conv attributes at
    run time (Hugging Face's TF-style padding reads stride, kernel_size, dilation) sees the base conv's."""

    base: ConvNd
    stride = property(lambda self: self.base.stride)
    padding = property(lambda self: self.base.padding)
    dilation = property(lambda self: self.base.dilation)
    groups = property(lambda self: self.base.groups)
    kernel_size = property(lambda self: self.base.kernel_size)
    in_channels = property(lambda self: self.base.in_channels)
    out_channels = property(lambda self: self.base.out_channels)
    padding_mode = property(lambda self: self.base.padding_mode)
    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)


class LoRAEdgeConv(ConvAttributes, nn.Module):
    """A frozen conv plus a trainable TT-LoRA update. ``delta_weight()``, ``merge()``, ``unmerge()``."""

    method = "lora-edge"
    suffix: Tensor

    def __init__(
        self, base: ConvNd, suffix_cores: Sequence[np.ndarray], scaling: float = 1.0, delta_g1: np.ndarray | None = None
    ) -> None:
        super().__init__()
        self.geometry = conv_geometry(base)
        self.base: ConvNd = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.base_sha256 = weight_sha256(base.weight.detach().cpu().numpy())
        self.scaling = float(scaling)
        r1 = int(suffix_cores[0].shape[0])
        self.ranks = (1, r1, *(int(c.shape[2]) for c in suffix_cores))
        dev = base.weight.device
        for k, core in enumerate(suffix_cores, start=2):
            self.register_buffer(f"core{k}", torch.as_tensor(np.asarray(core, dtype=np.float32), device=dev))
        suffix = torch.as_tensor(suffix_kernel(list(suffix_cores)), device=dev)
        self.register_buffer("suffix", suffix, persistent=False)
        init = (
            torch.zeros(base.out_channels, r1)
            if delta_g1 is None
            else torch.as_tensor(np.asarray(delta_g1, dtype=np.float32))
        )
        self.delta_g1 = nn.Parameter(init.to(dev).clone())
        self.merged = False
        self.calls = 0  # forward calls since wrapping: a conv whose parent only reads its weight has none
        self.lean = False  # set by ``toolchain.peft.lean.lean_training``
        self.inference_weight: Tensor | None = None  # set by ``merged_for_inference``

    @classmethod
    def from_pretrained(cls, base: ConvNd, rank: int, scaling: float = 1.0) -> LoRAEdgeConv:
        """TT-SVD the base kernel at ``rank`` and wrap it with ΔG1 = 0."""
        cores = tt_svd(base.weight.detach().cpu().numpy(), rank)
        return cls(base, cores[1:], scaling)

    def suffix_cores(self) -> list[Tensor]:
        return [getattr(self, f"core{k}") for k in range(2, len(self.ranks))]

    def tensors(self) -> list[Tensor]:
        """The adapter-file tensors, in ``LayerRecord.tensor_names()`` order."""
        return [self.delta_g1, *self.suffix_cores()]

    def delta_weight(self) -> Tensor:
        """ΔW = scaling * ΔG1 x_1 suffix, shape (C_out, C_in/g, k1[, k2])."""
        return self.scaling * torch.tensordot(self.delta_g1, self.suffix, dims=([1], [0]))

    def _aux(self, x: Tensor) -> Tensor:
        g = self.base.groups
        # grouped: the suffix kernel serves every group; ungrouped, no repeat (torch 2.5 exports even a
        # repeat by ones as Expand + Tile nodes)
        suffix = self.suffix if g == 1 else self.suffix.repeat((g,) + (1,) * (self.suffix.dim() - 1))
        h = self.base._conv_forward(x, suffix, None)  # same geometry; x already padded (``pre_pad``)
        up = self.delta_g1.reshape(*self.delta_g1.shape, *([1] * (self.suffix.dim() - 2)))
        return _CONV_FN[self.suffix.dim() - 2](h, up, groups=g)

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        """kwargs: what the wrapped conv subclass's own forward takes (pytorch-tcn's ``inference``)."""
        self.calls += 1
        x, kwargs = run_pre_hooks(self.base, x, kwargs)
        x = pre_pad(self.base, x, **kwargs)
        return post_crop(self.base, self._padded_forward(x))

    def _padded_forward(self, x: Tensor) -> Tensor:
        if self.inference_weight is not None and not torch.is_grad_enabled():
            return self.base._conv_forward(x, self.inference_weight, self.base.bias)
        if self.lean_ready() and torch.is_grad_enabled():
            return self._lean_forward(x)
        y = self.base._conv_forward(x, self.base.weight, self.base.bias)
        if self.merged:
            return y
        return y + self.scaling * self._aux(x)

    def lean_ready(self) -> bool:
        return self.lean and not self.merged

    def merged_weight(self) -> Tensor:
        """W + ΔW, what the fused model's Conv holds (the base weight is not touched)."""
        return self.base.weight + self.delta_weight().to(self.base.weight.dtype)

    def _lean_forward(self, x: Tensor) -> Tensor:
        """One conv with W + s·ΔW, keeping the r1-channel projection or x, whichever is smaller.

        A frozen BatchNorm right after it (``lean_training`` pairs them) is folded in exactly:
        scale·(W + s·ΔG1 ×₁ S) = scale·W + s·(scale·ΔG1) ×₁ S, shift added to the bias.
        """
        from toolchain.peft.lean import conv_inputs, fold, folded_bn
        from toolchain.peft.lean_ops import LoRAEdgeConv as LeanFn

        scale, b = fold(folded_bn(self), self.base.bias)
        dg1 = self.delta_g1 if scale is None else self.delta_g1 * scale[:, None]
        xp, conf = conv_inputs(self.base, x, padded=True)
        spatial = [
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip(xp.shape[2:], conf[1], conf[2], self.suffix.shape[2:], conf[0], strict=True)
        ]
        h_numel = self.base.groups * self.ranks[1] * math.prod(spatial)
        keep_x = math.prod(xp.shape[1:]) < h_numel
        return LeanFn.apply(xp, self.base.weight, scale, b, self.suffix, dg1, self.scaling, conf, keep_x)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + ΔW; forward then costs what the base conv costs."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False
