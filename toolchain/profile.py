"""Cost of one training step: FLOPs (forward, backward, optimizer) and memory by category.

FLOPs of forward and backward come from ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per
multiply-add of convs and matmuls; elementwise ops are not counted). The optimizer's matmuls (GaLore's
projections) are counted the same way; its elementwise work is counted as ``ADAM_FLOPS`` per state
element pair (moment updates, bias correction, square root, division, parameter update).

Memory on CPU has no allocator statistics, so it is accounted: parameters (all), gradients (one per
trainable element), optimizer state (the tensors the optimizer holds after a step), and activations
(the distinct tensors autograd saves for backward during one forward pass, found with
``torch.autograd.graph.saved_tensors_hooks``, not counting parameters and buffers themselves).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from toolchain.peft.galore import optimizer_state_bytes

ADAM_FLOPS = 10


@dataclass
class StepProfile:
    forward_flops: int
    backward_flops: int
    optimizer_flops: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    step_seconds: float

    @property
    def total_flops(self) -> int:
        return self.forward_flops + self.backward_flops + self.optimizer_flops

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_flops": self.total_flops}


def conv_backward_flops(
    grad_out_shape: list[int],
    x_shape: list[int],
    w_shape: list[int],
    _bias: Any,
    _stride: Any,
    _padding: Any,
    _dilation: Any,
    transposed: bool,
    _output_padding: Any,
    _groups: int,
    output_mask: list[bool],
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    """Backward of a (grouped) conv: each of grad-input and grad-weight costs what the forward costs.

    torch's own formula (2.13) ignores ``groups`` here and overcounts a grouped conv's backward by
    that factor, a 32x-384x error on the depthwise convs of MobileNet-style nets.
    """
    spatial = x_shape[2:] if transposed else grad_out_shape[2:]
    forward = 2 * grad_out_shape[0] * math.prod(w_shape) * math.prod(spatial)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_flops(fn: Any) -> int:
    """FLOPs of the convs and matmuls ``fn`` runs (2 per multiply-add), groups counted correctly."""
    with FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops}
    ) as counter:
        fn()
    return int(counter.get_total_flops())


def activation_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in one forward pass, beyond the model's
    own parameters and buffers (counted as parameters) and the input batch ``x`` (the caller's, alive
    through the step whatever the method): the intermediate results a method adds."""
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), x]}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(seen.values())


@dataclass
class StepMemory:
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes


def step_memory(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, set_mode: Any = None) -> StepMemory:
    """Memory by category of one real training step on (x, y), without counting FLOPs (cheap enough
    for every finetune). The model and optimizer are updated."""
    (set_mode or nn.Module.train)(model)
    acts = activation_bytes(model, x)
    opt.zero_grad(set_to_none=True)
    nn.CrossEntropyLoss()(model(x), y).backward()
    opt.step()
    return StepMemory(
        param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        grad_bytes=sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
        optimizer_bytes=optimizer_state_bytes(opt),
        activation_bytes=acts,
    )


def profile_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, set_mode: Any = None
) -> StepProfile:
    """Run one real training step on (x, y) and account its cost. The model and optimizer are updated."""
    (set_mode or nn.Module.train)(model)
    loss_fn = nn.CrossEntropyLoss()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt.zero_grad(set_to_none=True)
    holder: dict[str, Tensor] = {}
    fwd = count_flops(lambda: holder.__setitem__("loss", loss_fn(model(x), y)))
    bwd = count_flops(lambda: holder["loss"].backward())
    opt_mm = count_flops(opt.step)
    state_elems = optimizer_state_bytes(opt) // 4
    acts = activation_bytes(model, x)
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    opt.step()
    step_s = time.perf_counter() - t0
    return StepProfile(
        forward_flops=fwd,
        backward_flops=bwd,
        optimizer_flops=opt_mm + ADAM_FLOPS * state_elems // 2,
        param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        grad_bytes=sum(p.numel() * p.element_size() for p in trainable),
        optimizer_bytes=optimizer_state_bytes(opt),
        activation_bytes=acts,
        step_seconds=step_s,
    )
