"""Third-party model builders from the CLI (``--model torchvision.models:mobilenet_v2``), made to fit
the data by stated rules.

Calling: a builder is called with the input channels, the classes and (1-D windows) the window's
samples only where its signature names them, under its own names (``ARGUMENT_NAMES``: tsai's c_in,
c_out, seq_len; braindecode's n_chans, n_outputs, n_times); where it only takes ``**kwargs``
(torchvision, timm) it is called with ``num_classes`` and
``weights=None`` where accepted, else with nothing, and what was left out is said. Fitting, after
the call:
- the classifier: the last ``nn.Linear`` whose outputs differ from the data's classes is replaced
  by a new ``nn.Linear(in_features, classes)``;
- the input: a first conv taking 3 channels on 1-channel data keeps its learnt filters summed over
  the input channels (what a grey image fed to all three channels would give); any other mismatch is
  refused, naming the remedy.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from toolchain.core.errors import ToolchainError

# What builders call the input channels, the classes and the window's samples: torchvision and timm,
# tsai (c_in, c_out, seq_len), braindecode (n_chans, n_outputs, n_times), pytorch-tcn (num_inputs).
ARGUMENT_NAMES: dict[str, tuple[str, ...]] = {
    "in_channels": ("in_channels", "c_in", "n_chans", "in_chans", "num_inputs"),
    "num_classes": ("num_classes", "c_out", "n_outputs", "n_classes"),
    "length": ("seq_len", "n_times"),
}


def named_arguments(params: dict[str, inspect.Parameter], values: dict[str, int | None]) -> dict[str, Any]:
    """The builder's own name for each known argument its signature has (the first alias it names)."""
    out = {}
    for what, value in values.items():
        name = next((n for n in ARGUMENT_NAMES[what] if n in params), None)
        if name is not None and value is not None:
            out[name] = value
    return out


def call_builder(
    factory: Any, spec: str, in_channels: int, num_classes: int, length: int | None = None
) -> tuple[nn.Module, list[str], set[str]]:
    """(model, notes, given): the builder called with the arguments it takes, under its own names for
    them; ``given``: which of in_channels, num_classes and length it was told (``ARGUMENT_NAMES`` keys)."""
    try:
        params: dict[str, inspect.Parameter] = dict(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        params = {}
    named = named_arguments(params, {"in_channels": in_channels, "num_classes": num_classes, "length": length})
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    attempts: list[dict[str, Any]] = [named]
    if var_kw:
        attempts = [
            {**named, "num_classes": num_classes, "weights": None},
            {**named, "num_classes": num_classes},
            named,
        ]
    notes: list[str] = []
    last: Exception | None = None
    for kwargs in attempts:
        try:
            model = factory(**kwargs)
        except TypeError as err:  # an argument the builder's chain does not take
            last = err
            continue
        except Exception as err:  # the user's code
            raise ToolchainError(
                "the model callable raised an error",
                seen=f"{spec}: {type(err).__name__}: {str(err)[:160]}",
                remedy="fix the model code or the arguments it needs",
            ) from None
        given = {w for w, names in ARGUMENT_NAMES.items() if set(names) & set(kwargs)}
        omitted = [w for w in ("in_channels", "num_classes") if w not in given]
        if omitted:
            notes.append(
                f"{spec} was called without {', '.join(omitted)} (it does not take them); the model is fitted "
                "to the data instead"
            )
        return model, notes, given
    raise ToolchainError(
        "the model callable refused every call",
        seen=f"{spec}: {type(last).__name__}: {str(last)[:160]}",
        remedy="wrap it in a function of in_channels and num_classes",
    )


def fit_to_data(
    model: nn.Module, spec: str, in_channels: int, num_classes: int, told_channels: bool = False
) -> list[str]:
    """Replace the classifier and adapt the first conv by the rules above; returns what was done. A
    builder told the channels (``told_channels``) lays out its own input: braindecode's EEG models take
    (N, C, T) as a one-channel image, their first conv has 1 input channel, and that is kept."""
    notes = []
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv1d | nn.Conv2d)]
    if convs and convs[0][1].in_channels != in_channels and not told_channels:
        name, conv = convs[0]
        if conv.in_channels == 3 and in_channels == 1 and conv.groups == 1:
            ctor: Any = type(conv)
            new: Any = ctor(
                1,
                conv.out_channels,
                conv.kernel_size,
                conv.stride,
                conv.padding,
                conv.dilation,
                1,
                conv.bias is not None,
                conv.padding_mode,
            )
            with torch.no_grad():
                new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
                if conv.bias is not None:
                    new.bias.copy_(conv.bias)
            _replace(model, name, new)
            notes.append(f"{name}: 3 input channels -> 1, its filters summed over the colour channels")
        else:
            raise ToolchainError(
                f"{spec}'s first conv takes {conv.in_channels} channels; the data has {in_channels}",
                seen=name,
                remedy="pick data with that many channels, or a builder that takes in_channels",
            )
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears and linears[-1][1].out_features != num_classes:
        name, head = linears[-1]
        _replace(model, name, nn.Linear(head.in_features, num_classes, bias=head.bias is not None))
        notes.append(f"{name}: classifier {head.out_features} -> {num_classes} outputs (new weights)")
    return notes


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
