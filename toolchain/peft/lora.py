"""Conv LoRA (as in PEFT) and DoRA layers, with grouped and depthwise convs supported.

LoRA: a randomly initialised down conv A with the layer's kernel geometry and groups (r channels per
group), a zero-initialised grouped 1x1 up conv B, scaling alpha / r. DoRA adds a trained
per-output-channel magnitude m, initialised to ||W||: W' = m * (W + ΔW) / ||W + ΔW||.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolchain.adapters.adapter_file import ConvGeometry
from toolchain.core.errors import ToolchainError
from toolchain.kernels import weight_sha256
from toolchain.peft.lora_edge import ConvAttributes, ConvNd, conv_geometry, post_crop, pre_pad, run_pre_hooks

_CONV_FN = {1: F.conv1d, 2: F.conv2d}


class LoRAConv(ConvAttributes, nn.Module):
    """A frozen conv plus LoRA (``dora=False``) or DoRA (``dora=True``)."""

    def __init__(
        self, base: ConvNd, rank: int, alpha: float | None = None, dora: bool = False, method: str | None = None
    ) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ToolchainError("LoRA rank must be an integer >= 1", seen=rank, remedy="use --rank 1 or more")
        self.method = method or ("dora" if dora else "lora")  # the registry name it was made for
        self.geometry = conv_geometry(base)
        self.base: ConvNd = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.base_sha256 = weight_sha256(base.weight.detach().cpu().numpy())
        self.rank = rank
        self.scaling = float(alpha if alpha is not None else rank) / rank
        g, w = base.groups, base.weight
        self.lora_A = nn.Parameter(torch.empty(g * rank, *w.shape[1:], device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(base.out_channels, rank, device=w.device))
        self.magnitude = nn.Parameter(w.detach().flatten(1).norm(dim=1).clone()) if dora else None
        self.merged = False
        self.calls = 0  # forward calls since wrapping: a conv whose parent only reads its weight has none
        self.lean = False  # set by ``toolchain.peft.lean.lean_training``
        self.inference_weight: Tensor | None = None  # set by ``merged_for_inference``
        self._unmerged_weight: Tensor | None = None

    @property
    def ranks(self) -> tuple[int, ...]:
        return (self.rank,)

    def delta_weight(self) -> Tensor:
        """ΔW = scaling * B A per group, shape (C_out, C_in/g, k1[, k2])."""
        g, r = self.base.groups, self.rank
        a = self.lora_A.reshape(g, r, -1)
        b = self.lora_B.reshape(g, -1, r)
        return self.scaling * torch.bmm(b, a).reshape(self.base.weight.shape)

    def lean_ready(self) -> bool:
        """LoRA (not DoRA: its weight norm needs the full update) has a lean function."""
        return self.lean and self.magnitude is None and not self.merged

    def dora_weight(self) -> Tensor:
        assert self.magnitude is not None
        v = self.base.weight + self.delta_weight()
        norm = v.flatten(1).norm(dim=1)
        return v * (self.magnitude / norm).reshape(-1, *([1] * (v.dim() - 1)))

    def merged_weight(self) -> Tensor:
        """W + ΔW (DoRA: m·(W + ΔW)/||W + ΔW||), what the fused model's Conv holds (the base is not touched)."""
        return self.dora_weight() if self.magnitude is not None else self.base.weight + self.delta_weight()

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        """kwargs: what the wrapped conv subclass's own forward takes (pytorch-tcn's ``inference``)."""
        self.calls += 1
        x, kwargs = run_pre_hooks(self.base, x, kwargs)
        x = pre_pad(self.base, x, **kwargs)
        return post_crop(self.base, self._padded_forward(x))

    def _padded_forward(self, x: Tensor) -> Tensor:
        if self.inference_weight is not None and not torch.is_grad_enabled():
            return self.base._conv_forward(x, self.inference_weight, self.base.bias)
        if self.merged:
            return self.base._conv_forward(x, self.base.weight, self.base.bias)
        if self.lean_ready() and torch.is_grad_enabled():
            from toolchain.peft.lean import conv_inputs, fold, folded_bn
            from toolchain.peft.lean_ops import LoRAConv as LeanFn

            scale, b = fold(folded_bn(self), self.base.bias)  # a frozen BN after it, folded in
            up = self.lora_B if scale is None else self.lora_B * scale[:, None]
            xp, conf = conv_inputs(self.base, x, padded=True)
            return LeanFn.apply(xp, self.base.weight, scale, b, self.lora_A, up, self.scaling, conf)
        if self.magnitude is not None:
            return self.base._conv_forward(x, self.dora_weight(), self.base.bias)
        h = self.base._conv_forward(x, self.lora_A, None)
        up = self.lora_B.reshape(*self.lora_B.shape, *([1] * (self.lora_A.dim() - 2)))
        aux = _CONV_FN[self.lora_A.dim() - 2](h, up, groups=self.base.groups)
        return self.base._conv_forward(x, self.base.weight, self.base.bias) + self.scaling * aux

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        self._unmerged_weight = self.base.weight.detach().clone()
        new = self.dora_weight() if self.magnitude is not None else self.base.weight + self.delta_weight()
        self.base.weight.copy_(new)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged and self._unmerged_weight is not None:
            self.base.weight.copy_(self._unmerged_weight)
            self.merged = False

    def tensors(self) -> list[Tensor]:
        """The adapter-file tensors, in ``LayerRecord.tensor_names()`` order."""
        out: list[Tensor] = [self.lora_A, self.lora_B]
        return [*out, self.magnitude] if self.magnitude is not None else out

    def load(self, values: list[np.ndarray]) -> None:
        with torch.no_grad():
            for p, v in zip(self.tensors(), values, strict=True):
                p.copy_(torch.as_tensor(v))


class BottleneckAdapter(nn.Module):
    """A residual bottleneck after a block: y = block(x) + up(relu(down(block(x)))); up starts at zero.

    It adds layers, so it cannot be fused into the base model's Conv weights.
    """

    method = "adapter"
    scaling = 1.0
    base_sha256 = ""  # it wraps a block, not one weight

    def __init__(self, block: nn.Module, channels: int, dims: int, hidden: int) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.block = block
        for p in block.parameters():
            p.requires_grad_(False)
        self.hidden = max(1, hidden)
        self.channels, self.dims = channels, dims
        self.down = conv(channels, self.hidden, 1)
        self.up = conv(self.hidden, channels, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)  # type: ignore[arg-type]

    @property
    def ranks(self) -> tuple[int, ...]:
        return (self.hidden,)

    @property
    def geometry(self) -> ConvGeometry:
        """A record's geometry: C -> C channels at 1x1 (what the bottleneck's convs act on)."""
        d = self.dims
        kind = "conv1d" if d == 1 else "conv2d"
        return ConvGeometry(
            kind, self.channels, self.channels, (1,) * d, (1,) * d, (0,) * d, (1,) * d, 1, "zeros", True
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return y + self.up(torch.relu(self.down(y)))

    def tensors(self) -> list[Tensor]:
        return [self.down.weight, self.down.bias, self.up.weight, self.up.bias]  # type: ignore[list-item]

    def load(self, values: list[np.ndarray]) -> None:
        with torch.no_grad():
            for p, v in zip(self.tensors(), values, strict=True):
                p.copy_(torch.as_tensor(v))
