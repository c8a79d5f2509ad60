"""The torch half of each layer kind (``toolchain.adapters.methods.KINDS``): the module that trains it,
how it wraps a conv, how it is rebuilt from an adapter record. Looked up by the method's kind, so
injection, extraction and loading never branch on a method's name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from toolchain.adapters.adapter_file import LayerRecord
from toolchain.adapters.methods import KINDS, MethodSpec, get_method
from toolchain.core.errors import ToolchainError
from toolchain.peft.lora import BottleneckAdapter, LoRAConv
from toolchain.peft.lora_edge import LoRAEdgeConv

WrapFn = Callable[[MethodSpec, Any, int, float], nn.Module]
LoadFn = Callable[[LayerRecord, Any, list[np.ndarray]], nn.Module]


@dataclass(frozen=True)
class TorchKind:
    """module: the wrapper class; inner: its attribute holding the wrapped module; wrap: (spec, conv,
    rank, --scaling) -> wrapper (None for kinds that wrap blocks, not convs); load: (record, target,
    tensors) -> wrapper holding the record's trained values."""

    module: type[nn.Module]
    inner: str
    wrap: WrapFn | None
    load: LoadFn


TORCH_KINDS: dict[str, TorchKind] = {}


def register_torch_kind(name: str, kind: TorchKind) -> None:
    """Register the torch half of the torch-free kind ``name``."""
    if name not in KINDS:
        raise ToolchainError(
            "a torch kind needs a torch-free kind of the same name", seen=name, remedy=f"one of {sorted(KINDS)}"
        )
    TORCH_KINDS[name] = kind


def torch_kind(method: str) -> TorchKind:
    """The torch half of ``method``'s layer kind."""
    spec = get_method(method)
    kind = TORCH_KINDS.get(spec.layer_kind)
    if kind is None:
        raise ToolchainError(
            f"{method} has no adapter layers", seen=method, remedy="record its trained tensors as extras"
        )
    return kind


def wrapper_types() -> tuple[type[nn.Module], ...]:
    return tuple({k.module for k in TORCH_KINDS.values()})


def inner_attribute(module: nn.Module) -> str:
    return next(k.inner for k in TORCH_KINDS.values() if isinstance(module, k.module))


def _lora(dora: bool) -> tuple[WrapFn, LoadFn]:
    def wrap(spec: MethodSpec, conv: Any, rank: int, scaling: float) -> nn.Module:
        return LoRAConv(conv, rank, spec.layer_scale(scaling, rank) * rank, dora=dora, method=spec.name)

    def load(rec: LayerRecord, target: Any, values: list[np.ndarray]) -> nn.Module:
        layer = LoRAConv(target, rec.ranks[0], rec.scaling * rec.ranks[0], dora=dora, method=rec.method)
        layer.load(values)
        return layer

    return wrap, load


def _tt_wrap(spec: MethodSpec, conv: Any, rank: int, scaling: float) -> nn.Module:
    return LoRAEdgeConv.from_pretrained(conv, rank, spec.layer_scale(scaling, rank))


def _tt_load(rec: LayerRecord, target: Any, values: list[np.ndarray]) -> nn.Module:
    delta, *suffix = values
    return LoRAEdgeConv(target, suffix, rec.scaling, delta)


def _bottleneck_load(rec: LayerRecord, target: Any, values: list[np.ndarray]) -> nn.Module:
    layer = BottleneckAdapter(target, rec.geometry.out_channels, len(rec.geometry.kernel_size), rec.ranks[0])
    layer.load(values)
    return layer


register_torch_kind("tt", TorchKind(LoRAEdgeConv, "base", _tt_wrap, _tt_load))
register_torch_kind("lora", TorchKind(LoRAConv, "base", *_lora(dora=False)))
register_torch_kind("dora", TorchKind(LoRAConv, "base", *_lora(dora=True)))
register_torch_kind("bottleneck", TorchKind(BottleneckAdapter, "block", None, _bottleneck_load))
