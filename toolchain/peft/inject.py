"""Put PEFT methods into any nn.Module, freeze the rest, and move adapters to and from files.

Methods: lora-edge (TT-LoRA), lora, dora, adapter (bottleneck), full, galore (full-rank weights,
low-rank gradients: an optimizer, see ``galore.py``), head, bitfit.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from toolchain.adapters.adapter_file import Adapter, ExtraRecord, LayerRecord
from toolchain.adapters.methods import DEFAULT_METHOD, METHODS, get_method
from toolchain.core.errors import ToolchainError
from toolchain.kernels import weight_sha256
from toolchain.peft.kinds import inner_attribute, torch_kind, wrapper_types
from toolchain.peft.lora import BottleneckAdapter, LoRAConv
from toolchain.peft.lora_edge import POST_CROPS, PRE_PADS, LoRAEdgeConv, class_path, original_class

__all__ = ["METHODS", "AdaptConfig", "apply_adapter", "extract_adapter", "inject"]
TARGET_CHOICES = ("all", "pointwise")
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
Wrapper = LoRAEdgeConv | LoRAConv | BottleneckAdapter  # for type hints; the kinds' table is what is read


@dataclass
class AdaptConfig:
    """What to adapt and what else to train.

    layers: "all" convs, "pointwise" (1x1, groups=1) convs, or a regex searched in module names;
    for ``adapter``, "all" means the blocks of the model's longest nn.Sequential.
    scaling: ΔW scale for lora-edge; for lora/dora, alpha = scaling * rank (PEFT's alpha / r).
    train: extra parameter groups to train: "head" (the last nn.Linear), "bn" (BatchNorm affine).
    update_bn_stats: let BatchNorm running statistics move during adaptation (frozen by default).
    reduction: bottleneck width = channels // reduction for ``adapter``.
    """

    method: str = DEFAULT_METHOD
    rank: int = 4
    scaling: float = 1.0
    layers: str = "all"
    train: tuple[str, ...] = field(default_factory=tuple)
    update_bn_stats: bool = False
    reduction: int = 4


def select_layers(model: nn.Module, layers: str) -> list[str]:
    """Names of the conv modules that ``layers`` selects. Raises if none, or if a non-conv matches."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv1d | nn.Conv2d)}
    if layers == "all":
        names = list(convs)
    elif layers == "pointwise":
        names = [n for n, m in convs.items() if all(k == 1 for k in m.kernel_size) and m.groups == 1]
    else:
        matched = _regex_modules(model, layers)
        bad = [n for n in matched if n not in convs and not any(c.startswith(n + ".") for c in convs)]
        if bad:
            raise ToolchainError(
                "a LoRA target must be a Conv1d or Conv2d module",
                seen=f"{bad[0]} ({type(model.get_submodule(bad[0])).__name__})",
                remedy="narrow --layers to conv layers",
            )
        names = [n for n in convs if any(n == m or n.startswith(m + ".") for m in matched)]
    if not names:
        raise ToolchainError(
            "no conv layer matches the --layers selection",
            seen=layers,
            remedy="use --layers all, pointwise or a regex naming conv modules",
        )
    for name in names:
        check_followable(name, model.get_submodule(name))
    return names


_PLAIN = {nn.Conv1d: nn.Conv1d, nn.Conv2d: nn.Conv2d}


def check_followable(name: str, conv: nn.Module) -> None:
    """A Conv subclass with its own forward or _conv_forward (timm's ScaledStdConv2d standardises its
    weight) computes something the wrapper cannot follow exactly: refused, naming the class, rather than
    trained silently wrong. Subclasses that only pad their input first (timm's Conv2dSame, pytorch-tcn's
    TemporalConv1d) are followed exactly (``lora_edge.PRE_PADS``) when their own padding is 0, and those
    that only crop their output (braindecode's CausalConv1d) too (``lora_edge.POST_CROPS``). A
    parametrized weight (weight norm, a max-norm constraint) is frozen, so its value is what adapts."""
    plain = next((c for c in _PLAIN if isinstance(conv, c)), None)
    if plain is None:
        return
    path = class_path(conv)
    if path in PRE_PADS and all(p == 0 for p in conv.padding) and conv.padding_mode == "zeros":  # type: ignore[union-attr]
        return
    if path in POST_CROPS:
        return
    cls = original_class(conv)
    own = [m for m in ("forward", "_conv_forward") if getattr(cls, m) is not getattr(plain, m)]
    if own:
        raise ToolchainError(
            f"layer {name} is a {path}, a {plain.__name__} with its own {own[0]}, which adaptation cannot "
            "follow exactly",
            seen=name,
            remedy="leave such layers out with --layers (a regex on the other convs), or replace them by plain convs",
        )


def _regex_modules(model: nn.Module, selection: str) -> list[str]:
    from toolchain.core.patterns import compile_user_pattern, search

    pattern = compile_user_pattern(
        selection, "--layers", "pass all, pointwise or a regex on module names, e.g. 'features\\.(0|2)'"
    )
    return [n for n, _ in model.named_modules() if n and search(pattern, n) and not _inside_match(n, pattern)]


def _inside_match(name: str, pattern: re.Pattern[str]) -> bool:
    from toolchain.core.patterns import search

    parts = name.split(".")
    return any(search(pattern, ".".join(parts[:i])) for i in range(1, len(parts)))


def select_blocks(model: nn.Module, blocks: str) -> dict[str, tuple[int, int]]:
    """Blocks to put bottleneck adapters after: name -> (output channels, spatial dims)."""
    if blocks == "all":
        seqs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Sequential)]
        seqs = [(n, m) for n, m in seqs if sum(_has_conv(c) for c in m.children()) >= 2]
        if not seqs:
            raise ToolchainError(
                "found no nn.Sequential of conv blocks to put adapters after",
                seen=type(model).__name__,
                remedy="name the blocks with --layers REGEX",
            )
        name, seq = max(seqs, key=lambda nm: sum(_has_conv(c) for c in nm[1].children()))
        names = [f"{name}.{c}" if name else c for c, m in seq.named_children() if _has_conv(m)]
    else:
        names = _regex_modules(model, blocks)
    shapes = _output_shapes(model, names)
    found = {n: (s[1], len(s) - 2) for n, s in shapes.items() if len(s) in (3, 4)}
    if not found:
        raise ToolchainError("no selected block outputs a (batch, channels, ...) feature map", seen=blocks)
    return found


def _has_conv(m: nn.Module) -> bool:
    return any(isinstance(x, nn.Conv1d | nn.Conv2d) for x in m.modules())


def _output_shapes(model: nn.Module, names: list[str]) -> dict[str, tuple[int, ...]]:
    first = next(m for m in model.modules() if isinstance(m, nn.Conv1d | nn.Conv2d))
    spatial = (32, 32) if isinstance(first, nn.Conv2d) else (128,)
    x = torch.zeros(1, first.in_channels, *spatial)
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Any:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:  # returns None: the output is kept
            if isinstance(out, torch.Tensor):
                shapes.setdefault(name, tuple(out.shape))

        return hook

    hooks = [model.get_submodule(n).register_forward_hook(record(n)) for n in names]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return shapes


def inject(model: nn.Module, config: AdaptConfig) -> list[str]:
    """Apply ``config.method`` in place: wrap layers where the method does, and set requires_grad."""
    spec = get_method(config.method)
    for p in model.parameters():
        p.requires_grad_(not spec.base_frozen)
    if not spec.base_frozen:
        return []
    names: list[str] = []
    if spec.wraps_convs:
        names = select_layers(model, config.layers)
        for name in names:
            wrap = torch_kind(spec.name).wrap
            assert wrap is not None  # every conv-wrapping kind has one
            replace_module(model, name, wrap(spec, model.get_submodule(name), config.rank, config.scaling))
    elif spec.kind.per_layer:  # kinds that wrap blocks
        blocks = "all" if config.layers in TARGET_CHOICES else config.layers  # "pointwise" selects convs, not blocks
        for name, (channels, dims) in select_blocks(model, blocks).items():
            replace_module(
                model,
                name,
                BottleneckAdapter(model.get_submodule(name), channels, dims, max(1, channels // config.reduction)),
            )
            names.append(name)
    unfreeze_extras(model, tuple(sorted(set(config.train) | set(spec.implied_groups))))
    return names


def unfreeze_extras(model: nn.Module, groups: tuple[str, ...]) -> None:
    """Make the requested extra parameter groups trainable."""
    for group in groups:
        if group == "head":
            linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ToolchainError("--train head needs an nn.Linear classifier", seen="no nn.Linear in the model")
            for p in linears[-1].parameters():
                p.requires_grad_(True)
        elif group == "bn":
            for m in model.modules():
                if isinstance(m, _BN):
                    for p in m.parameters():
                        p.requires_grad_(True)
        elif group == "bias":
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.requires_grad_(True)
        else:
            raise ToolchainError("unknown --train group", seen=group, remedy="use head and/or bn")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted submodule path ``name`` and wherever else the model holds the same
    module: tsai's TemporalBlock registers each conv twice (``conv1`` and ``net.0``, the one its forward
    calls), and replacing only the first name would leave the called one unadapted."""
    old = model.get_submodule(name)
    holders = [(p, c) for p in model.modules() for c, m in p._modules.items() if m is old]  # before any change
    for parent, child in holders:
        setattr(parent, child, new)


def set_train_mode(model: nn.Module, update_bn_stats: bool) -> None:
    """model.train(), but BatchNorm keeps its running statistics unless ``update_bn_stats``."""
    model.train()
    if not update_bn_stats:
        for m in model.modules():
            if isinstance(m, _BN):
                m.eval()


@contextlib.contextmanager
def merged_for_inference(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, forward passes without grad run each conv wrapper as one conv with its merged
    weight: what the fused model computes and costs (no auxiliary path, no extra full-width tensors).
    The base weights are not touched; with grad enabled (training, export) nothing changes."""
    layers = [m for m in adapter_layers(model).values() if hasattr(m, "merged_weight") and not m.merged]
    with torch.no_grad():
        for m in layers:
            m.inference_weight = m.merged_weight()  # type: ignore[operator, union-attr]
    try:
        yield model
    finally:
        for m in layers:
            m.inference_weight = None  # type: ignore[union-attr]


def adapter_layers(model: nn.Module) -> dict[str, Wrapper]:
    kinds = wrapper_types()
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}  # type: ignore[misc]


def base_names(model: nn.Module) -> dict[str, str]:
    """Adapted-model parameter/buffer name -> the base model's name (drops the wrappers' inner segment)."""
    prefixes = {f"{n}.{inner_attribute(m)}.": f"{n}." for n, m in adapter_layers(model).items()}
    out = {}
    for name in [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]:
        base = name
        for old, new in prefixes.items():
            if base.startswith(old):
                base = new + base[len(old) :]
        out[name] = base
    return out


def extract_adapter(
    model: nn.Module, base_state: dict[str, torch.Tensor], config: AdaptConfig, info: dict[str, object]
) -> Adapter:
    """Every tensor that differs from the base: each wrapper's tensors, plus trained extras."""
    layers, tensors = [], {}
    check_called(model)
    for name, layer in adapter_layers(model).items():
        rec = _record(name, layer)
        tensors.update(
            {
                k: v.detach().cpu().numpy().astype(np.float32)
                for k, v in zip(rec.tensor_names(), layer.tensors(), strict=True)
            }
        )
        layers.append(rec)
    extras = []
    for pname, t in _trained_extras(model, config):
        base_t = base_state.get(pname)
        same_shape = base_t is not None and tuple(base_t.shape) == tuple(t.shape)
        digest = weight_sha256(base_t.cpu().numpy()) if base_t is not None and same_shape else None
        extras.append(ExtraRecord(param=pname, shape=tuple(t.shape), base_sha256=digest))
        tensors["extra:" + pname] = t.detach().cpu().numpy().astype(np.float32)
    return Adapter(method=config.method, layers=layers, extras=extras, tensors=tensors, info=info)


def check_called(model: nn.Module) -> None:
    """After the model has run, every adapted conv must have been called as a module. A conv whose parent
    only reads its weight (braindecode's CombinedConv merges conv_time and conv_spat into one kernel in
    its own forward) never calls the wrapper, so its update never trained and the exported graph holds
    no Conv with that weight: refused, naming the layer and its parent, rather than saved as a no-op."""
    layers = {n: m for n, m in adapter_layers(model).items() if hasattr(m, "calls")}
    idle = [n for n, m in layers.items() if m.calls == 0]
    if not idle or len(idle) == len(layers):  # not run yet (a step-0 adapter): nothing to judge
        return
    parent = idle[0].rpartition(".")[0]
    owner = type(model.get_submodule(parent)) if parent else type(model)
    raise ToolchainError(
        f"adapted layer {idle[0]} was never called while the model ran ({len(idle)} of {len(layers)} such "
        f"layers): its parent {owner.__module__}.{owner.__qualname__} reads its weight instead of calling it, "
        "so its update cannot train or fuse",
        seen=", ".join(idle[:4]) + (" ..." if len(idle) > 4 else ""),
        remedy="leave these layers out with --layers (a regex on the other convs)",
    )


def _record(name: str, layer: Wrapper) -> LayerRecord:
    return LayerRecord(
        name=name,
        param=f"{name}.weight" if get_method(layer.method).wraps_convs else "",
        method=layer.method,
        geometry=layer.geometry,
        ranks=layer.ranks,
        scaling=layer.scaling,
        base_sha256=layer.base_sha256,
    )


def _trained_extras(model: nn.Module, config: AdaptConfig) -> list[tuple[str, torch.Tensor]]:
    names = base_names(model)
    wrapped = {
        f"{n}.{p}"
        for n, m in adapter_layers(model).items()
        for p, t in m.named_parameters()
        if any(t is x for x in m.tensors())
    }
    out: list[tuple[str, torch.Tensor]] = [
        (names[n], p) for n, p in model.named_parameters() if p.requires_grad and n not in wrapped
    ]
    if config.update_bn_stats:
        for n, m in model.named_modules():
            if isinstance(m, _BN) and m.running_mean is not None and m.running_var is not None:
                out += [(names[f"{n}.running_mean"], m.running_mean), (names[f"{n}.running_var"], m.running_var)]
    return out


def apply_adapter(model: nn.Module, adapter: Adapter) -> None:
    """Load an adapter into a base model in place (unmerged), checking every base weight's hash."""
    for rec in adapter.layers:
        try:
            target = model.get_submodule(rec.name)
        except AttributeError:
            raise ToolchainError(
                "adapter layer is not in the model",
                seen=rec.name,
                remedy="use the base checkpoint the adapter was trained from",
            ) from None
        values = adapter.layer_tensors(rec)
        if get_method(rec.method).wraps_convs:
            _check_base(rec, target)
        replace_module(model, rec.name, torch_kind(rec.method).load(rec, target, values))
    to_adapted = {v: k for k, v in base_names(model).items()}
    for extra in adapter.extras:
        _set_extra(model, extra, adapter.extra_tensor(extra), to_adapted.get(extra.param, extra.param))


def _check_base(rec: LayerRecord, target: nn.Module) -> None:
    got = weight_sha256(target.weight.detach().cpu().numpy()) if isinstance(target, nn.Conv1d | nn.Conv2d) else None
    if got != rec.base_sha256:
        raise ToolchainError(
            f"layer {rec.name}: the base weight differs from the one the adapter was trained against",
            seen=f"sha256 {str(got)[:12]} vs adapter {rec.base_sha256[:12]}",
            remedy="use the matching base checkpoint",
        )


def _set_extra(model: nn.Module, extra: ExtraRecord, value: np.ndarray, key: str) -> None:
    """Copy an extra tensor into the parameter or buffer ``key`` of the (adapted) model."""
    target: torch.Tensor | None = dict(model.named_parameters()).get(key)
    if target is None:
        target = dict(model.named_buffers()).get(key)
    if target is None:
        raise ToolchainError("adapter extra tensor names no tensor of the model", seen=extra.param)
    if tuple(target.shape) != tuple(value.shape):
        _resize_linear(model, key, value.shape)
        target = dict(model.named_parameters())[key]
    with torch.no_grad():
        target.copy_(torch.as_tensor(value))


def _resize_linear(model: nn.Module, pname: str, shape: tuple[int, ...]) -> None:
    """A head trained for other classes: swap in an nn.Linear of the adapter's shape."""
    mod_name = pname.rpartition(".")[0]
    mod = model.get_submodule(mod_name)
    if not isinstance(mod, nn.Linear):
        raise ToolchainError("adapter tensor shape does not fit the model", seen=(pname, shape))
    replace_module(model, mod_name, nn.Linear(mod.in_features, shape[0], bias=mod.bias is not None))
