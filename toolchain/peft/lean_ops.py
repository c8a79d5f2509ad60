"""Autograd functions that keep for backward only what their gradients need.

PyTorch's convolution saves its input even when the weight is frozen (its derivative formula covers
all inputs), ReLU saves its float output and max-pooling int64 indices. Here:

- ``FrozenConv``: y = conv(x, W) + b with W frozen keeps nothing: grad_x needs only W.
- ``LoRAEdgeConv``: y = conv(x, W + s·ΔG1 ×₁ S) + b (one merged conv) keeps the r1-channel
  projection h = conv(x, S) (grad ΔG1 = s·Σ grad_y ⊗ h) or x itself, whichever is smaller.
- ``LoRAConv``: y = conv(x, W + s·B·A) + b keeps x and the r-channel projection h = conv(x, A).
- ``MaskedClamp``: ReLU / ReLU6 keeping a bit-packed mask (1 bit per element); ``WindowMax``: non-overlapping max
  pooling keeping uint8 window positions; ``FrozenLinear``: a frozen linear layer keeping nothing.

Everything kept goes through ``ctx.save_for_backward``, so ``saved_tensors_hooks`` (the memory
accounting in ``toolchain.profile``) sees it. Shapes: x (B, C_in, *spatial), W (C_out, C_in/g, *k).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Conf = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]  # stride, padding, dilation, groups
_CONV = {1: F.conv1d, 2: F.conv2d}


def conv(x: Tensor, w: Tensor, b: Tensor | None, conf: Conf) -> Tensor:
    stride, padding, dilation, groups = conf
    return _CONV[w.dim() - 2](x, w, b, stride, padding, dilation, groups)


def conv_grad_input(shape: torch.Size, w: Tensor, g: Tensor, conf: Conf) -> Tensor:
    """grad_x of conv(x, w) for grad_y = g, from x's shape alone: the transposed conv, with the output
    padding that restores x's size. (aten's convolution_backward with an expanded placeholder input
    materialises an input-sized buffer; this does not.)"""
    stride, padding, dilation, groups = conf
    k = w.shape[2:]
    extra = [
        n - ((o - 1) * s - 2 * p + d * (kk - 1) + 1)
        for n, o, s, p, d, kk in zip(shape[2:], g.shape[2:], stride, padding, dilation, k, strict=True)
    ]
    fn = F.conv_transpose1d if len(k) == 1 else F.conv_transpose2d
    return fn(g, w, None, stride, padding, tuple(extra), groups, dilation)


def conv_grad_weight(x: Tensor, w: Tensor, g: Tensor, conf: Conf) -> Tensor:
    """grad_w of conv(x, w) for grad_y = g."""
    stride, padding, dilation, groups = conf
    return torch.ops.aten.convolution_backward(
        g, x, w, None, stride, padding, dilation, False, [0] * len(stride), groups, (False, True, False)
    )[1]


def bias_grad(g: Tensor) -> Tensor:
    return g.sum(dim=[0, *range(2, g.dim())])


def group_outer(g: Tensor, h: Tensor, groups: int) -> Tensor:
    """Σ_{batch, space} g[:, o] h[:, group(o)·r + j] -> (C_out, r) for a grouped 1x1 up-projection.

    One batched matmul over (batch, group) with h transposed as a view: an einsum here permutes g into
    a contiguous copy, a transient as large as the layer's output gradient."""
    b, c_out = g.shape[:2]
    r = h.shape[1] // groups
    gg = g.reshape(b * groups, c_out // groups, -1)
    hh = h.reshape(b * groups, r, -1)
    return torch.bmm(gg, hh.transpose(1, 2)).reshape(b, c_out, r).sum(0)


def group_up_transpose(g: Tensor, up: Tensor, groups: int) -> Tensor:
    """grad of h through the grouped 1x1 up-projection ``up`` (C_out, r): (B, g·r, *space)."""
    b, c_out = g.shape[:2]
    r = up.shape[1]
    if groups == 1:  # a matmul reads g in place; the einsum would permute a copy of it
        return torch.matmul(up.T, g.reshape(b, c_out, -1)).reshape(b, r, *g.shape[2:])
    gg = g.reshape(b, groups, c_out // groups, -1)
    uu = up.reshape(groups, c_out // groups, r)
    return torch.einsum("bgol,goj->bgjl", gg, uu).reshape(b, groups * r, *g.shape[2:])


def tt_delta(dg1: Tensor, suffix: Tensor) -> Tensor:
    """ΔW = ΔG1 ×₁ S: (C_out, r1) x (r1, C_in/g, *k) -> (C_out, C_in/g, *k)."""
    return (dg1 @ suffix.reshape(suffix.shape[0], -1)).reshape(dg1.shape[0], *suffix.shape[1:])


def lora_delta(a: Tensor, b: Tensor, groups: int) -> Tensor:
    """ΔW = B·A per group: A (g·r, C_in/g, *k), B (C_out, r) -> (C_out, C_in/g, *k)."""
    r = b.shape[1]
    return torch.bmm(b.reshape(groups, -1, r), a.reshape(groups, r, -1)).reshape(b.shape[0], *a.shape[1:])


def scaled(w: Tensor, scale: Tensor | None) -> Tensor:
    """The weight with a folded BatchNorm's per-output-channel scale (``w`` itself without one). The ops
    keep ``w`` (the frozen parameter, no copy) and ``scale``, and recompute this in backward: a scaled
    copy of every frozen weight would otherwise stay alive until backward."""
    return w if scale is None else w * scale.reshape((-1,) + (1,) * (w.dim() - 1))


RECIPE = "_lean_standardized_from"  # tensor attribute: ((raw, mean, std), version) with tensor = (raw - mean) / std


def mark_standardized(y: Tensor, raw: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Note on ``y`` that it is (raw - mean) / std, so an op that needs ``y`` in backward can keep
    ``raw`` (the caller's batch, alive anyway) and recompute ``y`` bit for bit instead of keeping a copy."""
    setattr(y, RECIPE, ((raw, mean, std), y._version))
    return y


def keep_input(x: Tensor) -> tuple[Tensor, ...]:
    """What to save for ``x``: its recipe's (raw, mean, std) where it has one and x has not been changed in
    place since (its version counter), else x itself."""
    recipe = getattr(x, RECIPE, None)
    return recipe[0] if recipe is not None and recipe[1] == x._version else (x,)


def restore_input(kept: tuple[Tensor, ...]) -> Tensor:
    """``keep_input``'s inverse."""
    if len(kept) == 1:
        return kept[0]
    raw, mean, std = kept
    return (raw - mean) / std  # the same ops as the standardisation itself: bit-identical


class FrozenConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, scale: Tensor | None, b: Tensor | None, conf: Conf) -> Tensor:
        ctx.save_for_backward(w, scale)
        ctx.conf, ctx.shape = conf, x.shape
        return conv(x, scaled(w, scale), b, conf)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, None, Tensor | None, None]:
        w, scale = ctx.saved_tensors
        gx = conv_grad_input(ctx.shape, scaled(w, scale), g, ctx.conf) if ctx.needs_input_grad[0] else None
        return gx, None, None, bias_grad(g) if ctx.needs_input_grad[3] else None, None


class LoRAEdgeConv(torch.autograd.Function):
    """Merged forward with W + s·ΔW; keeps h = conv(x, S repeated per group) or x (``keep_x``)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        w: Tensor,
        scale: Tensor | None,
        b: Tensor | None,
        suffix: Tensor,
        dg1: Tensor,
        scaling: float,
        conf: Conf,
        keep_x: bool,
    ) -> Tensor:
        groups = conf[3]
        if keep_x:
            ctx.save_for_backward(w, scale, suffix, dg1, *keep_input(x))
        else:
            h = conv(x, suffix.repeat(groups, *([1] * (suffix.dim() - 1))), None, conf)
            ctx.save_for_backward(w, scale, suffix, dg1, h)
        ctx.conf, ctx.shape, ctx.scaling, ctx.keep_x = conf, x.shape, scaling, keep_x
        return conv(x, scaled(w, scale) + scaling * tt_delta(dg1, suffix), b, conf)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Any, ...]:
        w, scale, suffix, dg1, *kept = ctx.saved_tensors
        s, conf = ctx.scaling, ctx.conf
        w_eff = scaled(w, scale) + s * tt_delta(dg1, suffix)
        gx = conv_grad_input(ctx.shape, w_eff, g, conf) if ctx.needs_input_grad[0] else None
        gdg1 = None
        if ctx.needs_input_grad[5]:
            if ctx.keep_x:  # grad of ΔW contracted with the suffix: ΔW[o] = Σ_j ΔG1[o, j] S[j]
                gw = conv_grad_weight(restore_input(tuple(kept)), w_eff, g, conf)
                gdg1 = s * gw.reshape(gw.shape[0], -1) @ suffix.reshape(suffix.shape[0], -1).T
            else:
                gdg1 = s * group_outer(g, kept[0], conf[3])
        gb = bias_grad(g) if ctx.needs_input_grad[3] else None
        return gx, None, None, gb, None, gdg1, None, None, None


class LoRAConv(torch.autograd.Function):
    """Conv LoRA, merged forward with W + s·B·A; keeps x (for grad A) and h = conv(x, A) (for grad B)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        w: Tensor,
        scale: Tensor | None,
        b: Tensor | None,
        lora_a: Tensor,
        lora_b: Tensor,
        scaling: float,
        conf: Conf,
    ) -> Tensor:
        h = conv(x, lora_a, None, conf)
        ctx.save_for_backward(w, scale, lora_a, lora_b, h, *keep_input(x))
        ctx.conf, ctx.scaling = conf, scaling
        return conv(x, scaled(w, scale) + scaling * lora_delta(lora_a, lora_b, conf[3]), b, conf)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Any, ...]:
        w, scale, a, b_up, h, *kept = ctx.saved_tensors
        x = restore_input(tuple(kept))
        s, conf = ctx.scaling, ctx.conf
        groups = conf[3]
        w_eff = scaled(w, scale) + s * lora_delta(a, b_up, groups)
        gx = conv_grad_input(x.shape, w_eff, g, conf) if ctx.needs_input_grad[0] else None
        gb_up = s * group_outer(g, h, groups) if ctx.needs_input_grad[5] else None
        ga = conv_grad_weight(x, a, group_up_transpose(g, s * b_up, groups), conf) if ctx.needs_input_grad[4] else None
        gbias = bias_grad(g) if ctx.needs_input_grad[3] else None
        return gx, None, None, gbias, ga, gb_up, None, None


class FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        ctx.save_for_backward(w)
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        (w,) = ctx.saved_tensors
        gb = g.reshape(-1, g.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return (g @ w if ctx.needs_input_grad[0] else None), None, gb


MASK_CHUNK = 1 << 17  # elements per chunk (a multiple of 8) when a ReLU mask is packed or applied on the CPU


def pack_bits(mask: Tensor) -> Tensor:
    """A boolean tensor as 1 bit per element: (ceil(numel / 8),) uint8, bit i of byte j = element 8j + i
    (MemFLoRA's point: a ReLU's backward needs one bit, not a byte). numpy's packbits on the CPU."""
    flat = mask.reshape(-1)
    if flat.device.type == "cpu":
        return torch.from_numpy(np.packbits(flat.numpy(), bitorder="little"))
    return _pack_torch(flat)


def pack_clamp_mask(x: Tensor, upper: float | None) -> Tensor:
    """``pack_bits(0 < x (< upper))`` without a full-size boolean tensor: on the CPU the mask is built and
    packed ``MASK_CHUNK`` elements at a time (a cache-sized transient; also faster than one pass)."""
    flat = x.detach().reshape(-1)
    if flat.device.type != "cpu":
        return pack_bits(_clamp_mask(flat, upper))
    n = flat.numel()
    packed = np.empty((n + 7) // 8, dtype=np.uint8)
    for start in range(0, n, MASK_CHUNK):
        chunk = _clamp_mask(flat[start : start + MASK_CHUNK], upper).numpy()
        packed[start // 8 : (start + chunk.size + 7) // 8] = np.packbits(chunk, bitorder="little")
    return torch.from_numpy(packed)


def masked_grad(g: Tensor, packed: Tensor) -> Tensor:
    """g where the packed mask's bit is set, 0 elsewhere. On the CPU chunk by chunk: a float-bool product
    over the whole tensor first copies the mask to g's dtype (as many bytes as g itself)."""
    if g.device.type != "cpu":
        return g * unpack_bits(packed, g.shape)
    out = torch.empty(g.shape, dtype=g.dtype)
    flat_g, flat_out, bits = g.reshape(-1), out.view(-1), packed.numpy()
    n = flat_g.numel()
    for start in range(0, n, MASK_CHUNK):
        stop = min(n, start + MASK_CHUNK)
        mask = np.unpackbits(bits[start // 8 : (stop + 7) // 8], count=stop - start, bitorder="little")
        torch.mul(flat_g[start:stop], torch.from_numpy(mask.view(np.bool_)), out=flat_out[start:stop])
    return out


def _clamp_mask(x: Tensor, upper: float | None) -> Tensor:
    """Where the clamp's gradient passes, as PyTorch's ReLU / ReLU6 backward decide it: not (x <= 0 or
    x >= upper), so a NaN passes its gradient (x > 0 would stop it)."""
    stop = x <= 0 if upper is None else (x <= 0) | (x >= upper)
    return stop.logical_not_()


def unpack_bits(packed: Tensor, shape: torch.Size) -> Tensor:
    """``pack_bits``'s inverse: the boolean tensor of ``shape``."""
    n = math.prod(shape)
    if packed.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(packed.numpy(), count=n, bitorder="little").view(np.bool_)).view(shape)
    return _unpack_torch(packed, n).view(shape)


def _pack_torch(flat: Tensor) -> Tensor:
    """The same packing in torch ops (any device)."""
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    eight = flat.view(torch.uint8).view(-1, 8)
    packed = eight[:, 0].clone()
    for i in range(1, 8):
        packed |= eight[:, i] << i
    return packed


def _unpack_torch(packed: Tensor, n: int) -> Tensor:
    bits = torch.empty((packed.numel(), 8), dtype=torch.bool, device=packed.device)
    for i in range(8):
        bits[:, i] = (packed >> i) & 1
    return bits.view(-1)[:n]


class MaskedClamp(torch.autograd.Function):
    """clamp(x, 0, upper) keeping a bit-packed mask of where the gradient passes (ReLU: upper None)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, upper: float | None) -> Tensor:
        ctx.save_for_backward(pack_clamp_mask(x, upper))
        ctx.shape = x.shape
        return x.clamp(0, upper)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        (packed,) = ctx.saved_tensors
        return masked_grad(g, packed), None


class WindowMax(torch.autograd.Function):
    """Max pooling with kernel = stride, no padding or dilation, keeping each window's argmax as uint8.

    x (B, C, *spatial) -> (B, C, *spatial // k); trailing samples that fill no window are dropped,
    as nn.MaxPool does. The first maximum of a window wins, as in PyTorch's kernels.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, k: tuple[int, ...]) -> Tensor:
        windows, out_shape = _windows(x, k)
        values = windows[..., 0]
        idx = torch.zeros(values.shape, dtype=torch.uint8)
        for j in range(1, windows.shape[-1]):  # strict > keeps the first maximum; no int64 indices
            better = windows[..., j] > values
            values = torch.where(better, windows[..., j], values)
            idx.masked_fill_(better, j)
        ctx.save_for_backward(idx)
        ctx.shape, ctx.k = x.shape, k
        return values.reshape(out_shape)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        (idx,) = ctx.saved_tensors
        k, shape = ctx.k, ctx.shape
        b, c, outs = shape[0], shape[1], [n // kk for n, kk in zip(shape[2:], k, strict=True)]
        positions = torch.arange(math.prod(k), dtype=torch.uint8)
        flat = torch.where(idx.unsqueeze(-1) == positions, g.reshape(*idx.shape, 1), 0.0)
        if len(k) == 1:
            grad = flat.reshape(b, c, outs[0] * k[0])
        else:
            grad = (
                flat.reshape(b, c, outs[0], outs[1], k[0], k[1])
                .permute(0, 1, 2, 4, 3, 5)
                .reshape(b, c, outs[0] * k[0], outs[1] * k[1])
            )
        pad = [p for n, used in reversed(list(zip(shape[2:], grad.shape[2:], strict=True))) for p in (0, n - used)]
        return (F.pad(grad, pad) if any(pad) else grad), None


def _windows(x: Tensor, k: tuple[int, ...]) -> tuple[Tensor, tuple[int, ...]]:
    b, c = x.shape[:2]
    outs = [n // kk for n, kk in zip(x.shape[2:], k, strict=True)]
    if len(k) == 1:
        w = x[..., : outs[0] * k[0]].reshape(b, c, outs[0], k[0])
    else:
        w = (
            x[..., : outs[0] * k[0], : outs[1] * k[1]]
            .reshape(b, c, outs[0], k[0], outs[1], k[1])
            .permute(0, 1, 2, 4, 3, 5)
            .reshape(b, c, outs[0], outs[1], k[0] * k[1])
        )
    return w, (b, c, *outs)
