"""Put adapter layers into any nn.Module, freeze the rest, and move adapters to and from files."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from kernels import weight_sha256
from toolchain.adapter_file import Adapter, ExtraRecord, LayerRecord
from toolchain.errors import ToolchainError
from toolchain.peft.lora_edge import LoRAEdgeConv

TARGET_CHOICES = ("all", "pointwise")
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class AdaptConfig:
    """What to adapt and what else to train.

    targets: "all" convs, "pointwise" (1x1, groups=1) convs, or a regex searched in module names.
    train: extra parameter groups to train: "head" (the last nn.Linear), "bn" (BatchNorm affine).
    update_bn_stats: let BatchNorm running statistics move during adaptation (frozen by default).
    """

    method: str = "lora-edge"
    rank: int = 4
    scaling: float = 1.0
    targets: str = "all"
    train: tuple[str, ...] = field(default_factory=tuple)
    update_bn_stats: bool = False


def select_targets(model: nn.Module, targets: str) -> list[str]:
    """Names of the conv modules that ``targets`` selects. Raises if none, or if a non-conv matches."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv1d | nn.Conv2d)}
    if targets == "all":
        names = list(convs)
    elif targets == "pointwise":
        names = [n for n, m in convs.items() if all(k == 1 for k in m.kernel_size) and m.groups == 1]
    else:
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise ToolchainError("--targets must be all, pointwise or a valid regex", seen=targets, remedy=str(err)) from None
        matched = [n for n, m in model.named_modules() if n and pattern.search(n) and not _inside_match(n, pattern)]
        bad = [n for n in matched if n not in convs and not any(c.startswith(n + ".") for c in convs)]
        if bad:
            raise ToolchainError("a LoRA target must be a Conv1d or Conv2d module", seen=f"{bad[0]} ({type(model.get_submodule(bad[0])).__name__})", remedy="narrow --targets to conv layers")
        names = [n for n in convs if any(n == m or n.startswith(m + ".") for m in matched)]
    if not names:
        raise ToolchainError("no conv layer matches the target selection", seen=targets, remedy="use --targets all, pointwise or a regex naming conv modules")
    return names


def _inside_match(name: str, pattern: re.Pattern[str]) -> bool:
    parts = name.split(".")
    return any(pattern.search(".".join(parts[:i])) for i in range(1, len(parts)))


def inject(model: nn.Module, config: AdaptConfig) -> list[str]:
    """Wrap the selected convs with LoRA-Edge layers in place; freeze all else but ``config.train``."""
    if config.method != "lora-edge":
        raise ToolchainError("unknown adaptation method", seen=config.method, remedy="use --method lora-edge")
    names = select_targets(model, config.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        conv = model.get_submodule(name)
        _replace(model, name, LoRAEdgeConv.from_pretrained(conv, config.rank, config.scaling))  # type: ignore[arg-type]
    unfreeze_extras(model, config.train)
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
        else:
            raise ToolchainError("unknown --train group", seen=group, remedy="use head and/or bn")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def set_train_mode(model: nn.Module, update_bn_stats: bool) -> None:
    """model.train(), but BatchNorm keeps its running statistics unless ``update_bn_stats``."""
    model.train()
    if not update_bn_stats:
        for m in model.modules():
            if isinstance(m, _BN):
                m.eval()


def adapter_layers(model: nn.Module) -> dict[str, LoRAEdgeConv]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRAEdgeConv)}


def base_name(adapted_name: str) -> str:
    """The base model's name for a parameter of the adapted model (drops the wrapper's ``base.``)."""
    return re.sub(r"(^|\.)base\.", r"\1", adapted_name)


def extract_adapter(model: nn.Module, base_state: dict[str, torch.Tensor], config: AdaptConfig, info: dict[str, object]) -> Adapter:
    """Every tensor that differs from the base: ΔG1 and suffix cores per layer, plus trained extras."""
    layers, tensors = [], {}
    for name, layer in adapter_layers(model).items():
        rec = LayerRecord(name=name, param=f"{name}.weight", method=layer.method, geometry=layer.geometry, ranks=layer.ranks, scaling=layer.scaling, base_sha256=layer.base_sha256)
        values = [layer.delta_g1, *layer.suffix_cores()]
        tensors.update({k: v.detach().cpu().numpy().astype(np.float32) for k, v in zip(rec.tensor_names(), values, strict=True)})
        layers.append(rec)
    extras = []
    for pname, t in _trained_extras(model, config):
        base_t = base_state.get(pname)
        same_shape = base_t is not None and tuple(base_t.shape) == tuple(t.shape)
        digest = weight_sha256(base_t.cpu().numpy()) if base_t is not None and same_shape else None
        extras.append(ExtraRecord(param=pname, shape=tuple(t.shape), base_sha256=digest))
        tensors["extra:" + pname] = t.detach().cpu().numpy().astype(np.float32)
    return Adapter(method=config.method, layers=layers, extras=extras, tensors=tensors, info=info)


def _trained_extras(model: nn.Module, config: AdaptConfig) -> list[tuple[str, torch.Tensor]]:
    out: list[tuple[str, torch.Tensor]] = [(base_name(n), p) for n, p in model.named_parameters() if p.requires_grad and not n.endswith("delta_g1")]
    if config.update_bn_stats:
        for n, m in model.named_modules():
            if isinstance(m, _BN) and m.running_mean is not None and m.running_var is not None:
                out += [(base_name(f"{n}.running_mean"), m.running_mean), (base_name(f"{n}.running_var"), m.running_var)]
    return out


def apply_adapter(model: nn.Module, adapter: Adapter) -> None:
    """Load an adapter into a base model in place (unmerged), checking every base weight's hash."""
    params = dict(model.named_parameters())
    for rec in adapter.layers:
        try:
            conv = model.get_submodule(rec.name)
        except AttributeError:
            raise ToolchainError("adapter layer is not in the model", seen=rec.name, remedy="use the base checkpoint the adapter was trained from") from None
        got = weight_sha256(conv.weight.detach().cpu().numpy()) if isinstance(conv, nn.Conv1d | nn.Conv2d) else None
        if got != rec.base_sha256:
            raise ToolchainError(
                f"layer {rec.name}: the base weight differs from the one the adapter was trained against",
                seen=f"sha256 {str(got)[:12]} vs adapter {rec.base_sha256[:12]}",
                remedy="use the matching base checkpoint",
            )
        delta, *suffix = adapter.layer_tensors(rec)
        _replace(model, rec.name, LoRAEdgeConv(conv, suffix, rec.scaling, delta))  # type: ignore[arg-type]
    state = dict(model.state_dict())
    for extra in adapter.extras:
        _set_extra(model, params, state, extra, adapter.extra_tensor(extra))


def _set_extra(model: nn.Module, params: dict[str, nn.Parameter], state: dict[str, torch.Tensor], extra: ExtraRecord, value: np.ndarray) -> None:
    target: torch.Tensor | None = params.get(extra.param)
    if target is None:
        target = state.get(extra.param)
    if target is None:
        raise ToolchainError("adapter extra tensor names no tensor of the model", seen=extra.param)
    if tuple(target.shape) != tuple(value.shape):
        _resize_linear(model, extra.param, value.shape)
        target = dict(model.named_parameters())[extra.param]
    with torch.no_grad():
        target.copy_(torch.as_tensor(value))


def _resize_linear(model: nn.Module, pname: str, shape: tuple[int, ...]) -> None:
    """A head trained for other classes: swap in an nn.Linear of the adapter's shape."""
    mod_name = pname.rpartition(".")[0]
    mod = model.get_submodule(mod_name)
    if not isinstance(mod, nn.Linear):
        raise ToolchainError("adapter tensor shape does not fit the model", seen=(pname, shape))
    out_features = shape[0]
    _replace(model, mod_name, nn.Linear(mod.in_features, out_features, bias=mod.bias is not None))
