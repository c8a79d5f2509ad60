"""Reparametrized weights (weight norm, spectral norm, max-norm constraints) written as their values.

A weight-normed conv (``torch.nn.utils.parametrizations.weight_norm`` in pytorch-tcn and braindecode's
TCN, the older hook-based ``torch.nn.utils.weight_norm`` in tsai's TCN) or a constrained one
(braindecode's ``Conv2dWithConstraint``: a ``parametrize`` max-norm) computes its weight from other
tensors at every call. Exported as it is, the ONNX graph computes the weight too; folding that into an
initializer gives a name and bits that match nothing the adapter recorded, and fusion refuses it. The
deployed model needs only the value: ``plain_copy`` exports a copy whose every reparametrized weight is
a plain parameter of the same name holding exactly the value the module's forward uses.
"""

from __future__ import annotations

import copy

from torch import nn


def _weight_hooks(module: nn.Module) -> list[tuple[str, str]]:
    """(kind, weight name) of the hook-based reparametrizations on ``module`` (torch.nn.utils.weight_norm,
    torch.nn.utils.spectral_norm)."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    found = []
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm):
            found.append(("weight_norm", hook.name))
        elif isinstance(hook, SpectralNorm):
            found.append(("spectral_norm", hook.name))
    return found


def reparametrized(model: nn.Module) -> list[str]:
    """Qualified names of the weights ``model`` computes from other tensors at each call."""
    from torch.nn.utils import parametrize

    names = []
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if parametrize.is_parametrized(module):
            names += [f"{dot}{t}" for t in module.parametrizations]  # type: ignore[union-attr]
        names += [f"{dot}{t}" for _, t in _weight_hooks(module)]
    return names


def plain_copy(model: nn.Module) -> nn.Module:
    """``model`` itself when no weight is reparametrized; otherwise a copy with each reparametrized
    weight replaced by a parameter of the same name holding its current value (eval mode: spectral
    norm's power iteration does not step). The original is untouched: PyTorch's own
    ``remove_parametrizations`` edits the ``Parametrized...`` class, which a deep copy shares."""
    if not reparametrized(model):
        return model
    from torch.nn.utils import parametrize, remove_spectral_norm, remove_weight_norm

    plain = copy_module(model).eval()
    for module in plain.modules():
        if parametrize.is_parametrized(module):
            _unparametrize(module)
        for kind, name in _weight_hooks(module):
            (remove_weight_norm if kind == "weight_norm" else remove_spectral_norm)(module, name)
    return plain


def copy_module(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also for a model with hook-based weight norm, whose computed weight (a
    non-leaf tensor attribute) deepcopy refuses (pytorch/pytorch#103001): the copy gets a detached clone,
    which its pre-forward hook recomputes from the copied g and v at every call, as in the original."""
    memo: dict[int, object] = {}
    for module in model.modules():
        for _, name in _weight_hooks(module):
            value = getattr(module, name, None)
            if value is not None and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def _unparametrize(module: nn.Module) -> None:
    """``remove_parametrizations(leave_parametrized=True)`` for every tensor, on this instance only."""
    import torch

    values = {}
    with torch.no_grad():
        for name in module.parametrizations:  # type: ignore[union-attr]
            originals = module.parametrizations[name].parameters()  # type: ignore[index, union-attr]
            values[name] = (getattr(module, name).detach().clone(), any(p.requires_grad for p in originals))
    module.__class__ = type(module).__bases__[0]
    del module._modules["parametrizations"]
    for name, (value, grad) in values.items():
        module.register_parameter(name, nn.Parameter(value, requires_grad=grad))
