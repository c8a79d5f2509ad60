"""Build models from a name or ``file.py:callable`` spec, and save / load checkpoints safely."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from toolchain.core.errors import ToolchainError
from toolchain.core.fileio import atomic_path
from toolchain.models.backbones import BACKBONES, LEGACY, LEGACY_BACKBONES, REVISIONS

CHECKPOINT_FORMAT = "toolchain-checkpoint"
MAX_CLASSES = 10_000


class Standardize(nn.Module):
    """Per-channel (x - mean) / std with statistics fitted on the source subjects, kept in the model."""

    mean: Tensor
    std: Tensor

    def __init__(self, channels: int, spatial_dims: int = 1) -> None:
        super().__init__()
        shape = (1, channels) + (1,) * spatial_dims
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class HARModel(nn.Module):
    """A backbone behind the input standardisation, so deployed models take raw sensor windows."""

    def __init__(self, net: nn.Module, channels: int, spatial_dims: int = 1) -> None:
        super().__init__()
        self.norm: Standardize = Standardize(channels, spatial_dims)
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.norm(x))


def build_backbone(spec: str, in_channels: int, num_classes: int, length: int | None = None) -> nn.Module:
    """A built-in name (cnn1d, resnet1d, mobilenet1d), ``path/file.py:callable`` or ``pkg.mod:callable``;
    ``length``: the windows' samples (1-D data), for builders that need it (tsai's seq_len, braindecode's
    n_times)."""
    net = BACKBONES.get(spec) or LEGACY_BACKBONES.get(spec)
    if net is not None:
        return net(in_channels=in_channels, num_classes=num_classes)
    if ":" not in spec:
        raise ToolchainError(
            "unknown backbone", seen=spec, remedy=f"use one of {', '.join(BACKBONES)} or path/to/file.py:callable"
        )
    target, _, attr = spec.rpartition(":")
    module = _import_target(target, spec)
    factory = getattr(module, attr, None)
    if not attr.isidentifier() or not callable(factory):
        raise ToolchainError(
            "model spec does not name a callable",
            seen=spec,
            remedy="point at a function or class that returns an nn.Module",
        )
    from toolchain.models.fit import call_builder, fit_to_data

    model, notes, given = call_builder(factory, spec, in_channels, num_classes, length)
    if not isinstance(model, nn.Module):
        raise ToolchainError("model callable must return a torch.nn.Module", seen=type(model).__name__)
    notes += fit_to_data(model, spec, in_channels, num_classes, told_channels="in_channels" in given)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return model


def _import_target(target: str, spec: str) -> Any:
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ToolchainError("model file does not exist", seen=target)
        mod_spec = importlib.util.spec_from_file_location(f"toolchain_user_model_{path.stem}", path)
        if mod_spec is None or mod_spec.loader is None:
            raise ToolchainError("cannot import model file", seen=target)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as err:  # the user's code: a syntax error, an import that raises, anything
            raise ToolchainError(
                "the model file raised an error while it was imported",
                seen=f"{target}: {type(err).__name__}: {str(err)[:160]}",
                remedy="fix the model file",
            ) from None
        return module
    if not target or not all(part.isidentifier() for part in target.split(".")):
        raise ToolchainError(
            "a model spec is NAME, path/file.py:callable or package.module:callable",
            seen=spec,
            remedy=f"use one of {', '.join(BACKBONES)} or point at a callable",
        )
    try:
        return importlib.import_module(target)
    except Exception as err:  # ImportError, or whatever the module raises at import
        raise ToolchainError(
            "cannot import the model's module",
            seen=f"{spec}: {type(err).__name__}: {str(err)[:160]}",
            remedy="check the module name and that it imports cleanly",
        ) from None


def model_files(spec: str | None) -> list[Path]:
    """The user's source file a ``path/file.py:callable`` spec names, so that no output replaces it."""
    if spec and ":" in spec and spec.rpartition(":")[0].endswith(".py"):
        return [Path(spec.rpartition(":")[0])]
    return []


def build_model(
    spec: str, in_channels: int, num_classes: int, spatial_dims: int = 1, length: int | None = None
) -> HARModel:
    """The full model: standardisation (for 1-D windows or 2-D images) plus backbone; ``length``: the
    windows' samples, passed to third-party builders that take it."""
    return HARModel(build_backbone(spec, in_channels, num_classes, length), in_channels, spatial_dims)


def check_input_shape(shape: object, where: str) -> tuple[int, ...]:
    """(C, T) or (C, H, W), every entry an integer in 1..65536."""
    ok = (
        isinstance(shape, list | tuple)
        and len(shape) in (2, 3)
        and all(type(d) is int and 1 <= d <= 65536 for d in shape)
    )
    if not ok:
        raise ToolchainError(
            "an input shape is C,T (windows) or C,H,W (images), each 1..65536",
            seen=f"{where}: {shape!r}"[:160],
            remedy="pass e.g. --input-shape 6,128 or 3,32,32",
        )
    return tuple(shape)  # type: ignore[arg-type]


def save_checkpoint(
    model: HARModel,
    path: str | os.PathLike[str],
    *,
    spec: str,
    classes: list[str],
    input_shape: tuple[int, ...],
    extra: dict[str, Any],
) -> None:
    """Write a checkpoint (tensors and plain data only, loadable with weights_only=True) atomically."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        "model": spec,
        **({"backbone_revision": REVISIONS.get(spec, 1)} if spec in BACKBONES else {}),
        "in_channels": int(model.norm.mean.shape[1]),
        "input_shape": [int(d) for d in input_shape],
        "classes": list(classes),
        "state_dict": state,
        **extra,
    }
    with atomic_path(path) as tmp:
        try:  # through a file object: a path would name the archive after the random temporary file
            with open(tmp, "wb") as fh:  # (the same model would then give other bytes on every save)
                torch.save(payload, fh)
        except (RuntimeError, OSError) as err:  # torch's writer ("PytorchStreamWriter failed") or the file's
            raise ToolchainError(
                "cannot write the checkpoint",
                seen=f"{path}: {' '.join(str(err).split())[:120]}",
                remedy="check free space and permissions",
            ) from None


def load_checkpoint(
    path: str | os.PathLike[str], model_spec: str | None = None, input_shape: tuple[int, ...] | None = None
) -> tuple[HARModel, dict[str, Any]]:
    """Load a checkpoint with ``weights_only=True`` and rebuild its model. Returns (model, payload).

    ``payload["input_shape"]`` is the (C, T) or (C, H, W) the model was trained on: recorded at
    pretrain; for a plain state_dict, ``input_shape`` (None until the data or --input-shape gives it);
    checkpoints from before it was recorded used (C, 128) windows.
    """
    p = Path(path)
    if not p.is_file():
        raise ToolchainError(
            "checkpoint file does not exist", seen=str(p), remedy="run `toolchain pretrain --out base.pt` first"
        )
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file
        raise ToolchainError(
            "cannot read checkpoint (loaded with weights_only=True)",
            seen=f"{p}: {type(err).__name__}",
            remedy="pass a checkpoint written by `toolchain pretrain`",
        ) from None
    if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return _from_state_dict(payload, model_spec, p, input_shape)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ToolchainError(
            "not a toolchain checkpoint", seen=str(p), remedy="pass a checkpoint written by `toolchain pretrain`"
        )
    validate_payload(payload, p)
    if model_spec is None and not builtin(payload["model"]):
        raise ToolchainError(
            "the checkpoint names user code as its model; a checkpoint may name only built-in backbones, so "
            "user code runs only when you pass it",
            seen=f"{p}: model {payload['model']!r}",
            remedy=f"pass --model {payload['model']} if you trust that code",
        )
    spec = trained_as(payload, model_spec, p)
    if builtin(spec):
        payload["model"] = spec  # what the adapter records as its checkpoint's model
    payload["input_shape"] = list(check_input_shape(payload.get("input_shape", [payload["in_channels"], 128]), str(p)))
    if payload["input_shape"][0] != payload["in_channels"]:
        raise ToolchainError(
            "checkpoint input_shape and in_channels disagree",
            seen=(payload["input_shape"], payload["in_channels"]),
            remedy="pass a checkpoint written by `toolchain pretrain`",
        )
    shape = payload["input_shape"]
    model = build_model(
        spec, payload["in_channels"], len(payload["classes"]), len(shape) - 1, shape[1] if len(shape) == 2 else None
    )
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1:3] or [str(err)[:200]]
        raise ToolchainError(
            "checkpoint does not fit the model",
            seen=f"{spec}: {' '.join(x.strip() for x in first)}",
            remedy="pass the --model the checkpoint was trained with",
        ) from None
    return model, payload


def builtin(spec: str | None) -> bool:
    """A built-in backbone's name, current or legacy."""
    return spec in BACKBONES or spec in LEGACY_BACKBONES


def trained_as(payload: dict[str, Any], model_spec: str | None, path: Path) -> str:
    """The model spec to build for a checkpoint: ``model_spec`` where given, else its ``model``; a
    built-in name recorded at an older ``backbone_revision`` builds the legacy net of that revision
    (``mobilenet1d`` without one: ``mobilenet1d-relu``), also when ``--model`` repeats the name.
    Another built-in ``model_spec`` than that net is refused: ``mobilenet1d`` and ``mobilenet1d-relu``
    take each other's weights, and would run them with the wrong activations."""
    name, revision = payload["model"], payload.get("backbone_revision", 1)
    net = name
    if name in BACKBONES:
        newest = REVISIONS.get(name, 1)
        if type(revision) is not int or not 1 <= revision <= newest:
            raise ToolchainError(
                f"checkpoint field 'backbone_revision' of {name} must be an integer in 1..{newest}",
                seen=f"{path}: {revision!r}"[:160],
                remedy="a newer toolchain wrote it: upgrade"
                if type(revision) is int and revision > newest
                else "pass a checkpoint written by `toolchain pretrain`",
            )
        net = LEGACY.get((name, revision), name)
    if model_spec is not None and model_spec not in (name, net):
        if builtin(model_spec) and builtin(net):
            raise ToolchainError(
                f"the checkpoint was trained as the built-in {net}, not {model_spec}",
                seen=f"{path}: model {name!r}, backbone_revision {revision!r}",
                remedy=f"drop --model, or pass --model {net}",
            )
        return model_spec
    if net != name and model_spec != net:
        print(f"note: {path} was trained as {name} revision {revision}: loading it as {net}", file=sys.stderr)
    return net


def validate_payload(payload: dict[str, Any], path: Path) -> None:
    """The fields a toolchain checkpoint must have, with their types: refuse anything else."""
    rules = [
        ("model", isinstance(payload.get("model"), str) and bool(payload.get("model")), "a non-empty string"),
        (
            "in_channels",
            type(payload.get("in_channels")) is int and 1 <= payload["in_channels"] <= 4096,
            "an integer in 1..4096",
        ),
        (
            "classes",
            isinstance(payload.get("classes"), list)
            and 2 <= len(payload["classes"]) <= MAX_CLASSES
            and all(isinstance(c, str) for c in payload["classes"]),
            f"a list of 2..{MAX_CLASSES} strings",
        ),
        (
            "state_dict",
            isinstance(payload.get("state_dict"), dict)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload["state_dict"].items()),
            "a dict of tensors",
        ),
        ("pretrain", isinstance(payload.get("pretrain", {}), dict), "a dict"),
    ]
    for field, ok, want in rules:
        if not ok:
            raise ToolchainError(
                f"checkpoint field {field!r} must be {want}",
                seen=f"{path}: {type(payload.get(field)).__name__} {payload.get(field)!r}"[:160],
                remedy="pass a checkpoint written by `toolchain pretrain`",
            )
    for name, t in payload["state_dict"].items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ToolchainError(
                "checkpoint has NaN or Inf values",
                seen=f"{path}: {name}",
                remedy="training diverged: retrain with a lower --lr",
            )


def _from_state_dict(
    state: dict[str, torch.Tensor], model_spec: str | None, path: Path, input_shape: tuple[int, ...] | None
) -> tuple[HARModel, dict[str, Any]]:
    """A plain state_dict for the backbone of ``--model`` (inputs taken as already standardised).

    Channels come from the first conv kernel, classes from the last matrix (the classifier).
    """
    if not model_spec:
        raise ToolchainError(
            "a plain state_dict needs the model it belongs to",
            seen=str(path),
            remedy="pass --model NAME, path/file.py:callable or pkg.mod:callable",
        )
    kernels = [v for v in state.values() if v.dim() >= 3]
    matrices = [v for v in state.values() if v.dim() == 2]
    if not kernels or not matrices:
        raise ToolchainError(
            "cannot tell input channels and classes from this state_dict (no conv kernel or no classifier matrix)",
            seen=str(path),
        )
    in_channels, num_classes = int(kernels[0].shape[1]), int(matrices[-1].shape[0])
    spatial_dims = kernels[0].dim() - 2
    if input_shape is not None:
        input_shape = check_input_shape(list(input_shape), "--input-shape")
        if input_shape[0] != in_channels or len(input_shape) - 1 != spatial_dims:
            raise ToolchainError(
                "--input-shape does not fit the state_dict's first conv",
                seen=(input_shape, tuple(kernels[0].shape)),
                remedy=f"pass {in_channels} channels and {spatial_dims} spatial dims",
            )
    length = input_shape[1] if input_shape is not None and len(input_shape) == 2 else None
    model = build_model(model_spec, in_channels, num_classes, spatial_dims, length)
    try:
        model.net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1:3] or [str(err)[:200]]
        raise ToolchainError(
            "checkpoint does not fit the model",
            seen=f"{model_spec}: {' '.join(x.strip() for x in first)}",
            remedy="pass the --model the weights belong to",
        ) from None
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        "model": model_spec,
        "in_channels": in_channels,
        "input_shape": list(input_shape) if input_shape is not None else None,
        "classes": [str(i) for i in range(num_classes)],
        "data": None,
        "pretrain": {"target_subjects": None},
        "plain_state_dict": True,
    }
    return model, payload
