"""The Python API: adapt your own nn.Module inside your own training loop, then deploy the update.

    import torch
    import toolchain.api as tc

    adaptation = tc.adapt(model, method="lora-edge", rank=4)       # wraps convs; only ΔG1 trains
    opt = adaptation.optimizer()                                     # Adam at the method's default lr
    with adaptation.training():                                      # train mode, frozen BN, lean path
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    adaptation.save("adapter.safetensors")
    tc.export_onnx(adaptation.base_model(), example, "base.onnx")  # the model before adaptation
    tc.export_onnx(model, example, "unfused.onnx")                 # the adapted model, aux path as nodes
    tc.fuse("base.onnx", "adapter.safetensors", "fused.onnx")      # torch-free, exact
    report = tc.verify("fused.onnx", "unfused.onnx", "verify_out", inputs=example_batch_array)

Everything here mirrors a CLI command: ``adapt`` and ``Adaptation.save`` are ``finetune``'s inside,
``export_onnx`` is ``export``, ``fuse`` is ``fuse``, ``verify`` is ``verify``. Torch is imported
when a function that needs it is called.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from toolchain.adapters.adapter_file import Adapter, load_adapter
from toolchain.adapters.methods import METHODS, get_method
from toolchain.core.errors import ToolchainError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "METHODS",
    "Adaptation",
    "Adapter",
    "ToolchainError",
    "adapt",
    "export_onnx",
    "fuse",
    "load_adapter",
    "verify",
]


@dataclass
class Adaptation:
    """An adapted model: which method, what it wrapped, and the base weights it started from."""

    model: nn.Module
    method: str
    rank: int
    scaling: float
    layers: str
    train_groups: tuple[str, ...]
    update_bn_stats: bool
    wrapped: list[str]
    base_state: dict[str, torch.Tensor] = field(repr=False)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters (what an optimizer should get)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def optimizer(self, lr: float | None = None) -> torch.optim.Optimizer:
        """Adam over the trainable parameters at the method's default learning rate (GaLore's for galore)."""
        from toolchain.workflows import make_optimizer

        return make_optimizer(self.model, self._config(), lr if lr is not None else get_method(self.method).lr)

    @contextlib.contextmanager
    def training(self, lean: bool = True) -> Iterator[nn.Module]:
        """Train mode with BatchNorm statistics frozen (unless update_bn_stats), on the lean path
        where the method allows it; eval mode again afterwards."""
        from toolchain.peft.inject import set_train_mode
        from toolchain.peft.lean import lean_training

        set_train_mode(self.model, self.update_bn_stats)
        try:
            with lean_training(self.model, lean and get_method(self.method).base_frozen):
                yield self.model
        finally:
            self.model.eval()

    def adapter(self, info: dict[str, Any] | None = None) -> Adapter:
        """Every tensor that differs from the base, with the base weights' hashes."""
        from toolchain.peft.inject import extract_adapter

        return extract_adapter(self.model, self.base_state, self._config(), dict(info or {}))

    def save(self, path: str | os.PathLike[str], *, force: bool = False, info: dict[str, Any] | None = None) -> Path:
        """Write the adapter file (atomically; an existing file only with ``force``)."""
        from toolchain.adapters.adapter_file import save_adapter
        from toolchain.core.fileio import check_output

        out = check_output(path, force=force)
        save_adapter(self.adapter(info), out)
        return out

    def base_model(self) -> nn.Module:
        """A copy of the model as it was before ``adapt``: wrappers removed, base weights restored."""
        from toolchain.peft.inject import adapter_layers, replace_module
        from toolchain.reparametrized import copy_module

        base = copy_module(self.model)
        for name, layer in adapter_layers(base).items():
            inner = layer.block if layer.method == "adapter" else layer.base
            replace_module(base, name, inner)  # type: ignore[arg-type]
        base.load_state_dict(self.base_state, strict=True)
        return base.eval()

    def _config(self) -> Any:
        from toolchain.peft.inject import AdaptConfig

        return AdaptConfig(
            method=self.method,
            rank=self.rank,
            scaling=self.scaling,
            layers=self.layers,
            train=self.train_groups,
            update_bn_stats=self.update_bn_stats,
        )


def adapt(
    model: nn.Module,
    method: str = "lora-edge",
    rank: int = 4,
    *,
    layers: str = "all",
    scaling: float = 1.0,
    train: Sequence[str] = (),
    update_bn_stats: bool = False,
) -> Adaptation:
    """Put ``method`` into ``model`` in place and freeze the rest (``toolchain finetune``'s step).

    layers: "all" convs, "pointwise" (1x1) convs or a regex on module names. scaling: ΔW scale
    (lora/dora: alpha / r). train: extra groups to train ("head", "bn").
    """
    from torch import nn

    from toolchain.adaptation import prepare
    from toolchain.peft.inject import AdaptConfig, adapter_layers

    if not isinstance(model, nn.Module):
        raise ToolchainError("adapt takes a torch.nn.Module", seen=type(model).__name__, remedy="pass your model")
    _check_weights(model)
    if adapter_layers(model):
        raise ToolchainError(
            "the model is already adapted",
            seen=type(model).__name__,
            remedy="adapt a fresh copy of the base model (Adaptation.base_model())",
        )
    spec = get_method(method)
    state = model.state_dict()
    base_state = OrderedDict((k, v.detach().clone()) for k, v in state.items())
    base_state._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]  # version info some modules' loaders need (torchvision's MNASNet)
    cfg = AdaptConfig(
        method=spec.name, rank=rank, scaling=scaling, layers=layers, train=tuple(train), update_bn_stats=update_bn_stats
    )
    cfg, wrapped = prepare(model, cfg, seed=None)
    return Adaptation(model, spec.name, rank, scaling, layers, tuple(train), update_bn_stats, wrapped, base_state)


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    fold_bn: bool = False,
    dynamic_batch: bool = False,
    force: bool = False,
    exporter: str = "auto",
    check_inputs: np.ndarray | None = None,
) -> Path:
    """``toolchain export`` for any module: opset 18, input named ``x``, output ``logits``; the shape of
    ``example`` (batch included) fixes the input shape. The written model is checked against
    ``model`` in ONNX Runtime on ``check_inputs`` (N, ...) and random inputs, and refused when it
    differs beyond float32 tolerance; the check is in its ``toolchain.export_check`` metadata."""
    from toolchain.core.fileio import check_output
    from toolchain.export import ExportOptions, to_onnx
    from toolchain.graphs.onnx_io import check_onnx, save_onnx

    out = check_output(path, force=force)
    if example.dim() < 2 or int(example.shape[0]) < 1:
        raise ToolchainError(
            "the example must be a batch of at least one input (N >= 1, then the input's shape)",
            seen=list(example.shape),
            remedy="pass e.g. x[:1]",
        )
    opts = ExportOptions(dynamic_batch=dynamic_batch, fold_bn=fold_bn, batch=int(example.shape[0]), exporter=exporter)
    with _restored(model):
        proto = to_onnx(model, tuple(example.shape[1:]), opts, real=check_inputs).proto
    check_onnx(proto, str(out))
    save_onnx(proto, out, force=force)
    return out


def _check_weights(model: nn.Module) -> None:
    """Adaptation trains in float32 on materialised weights: a half, bfloat16 or meta-device model
    would fail at its first step with a PyTorch error, so it is refused here, naming a tensor."""
    import torch

    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise ToolchainError(
                "the model's weights are not materialised (meta device)",
                seen=name,
                remedy="load real weights first (e.g. model.to_empty(device='cpu') then load_state_dict)",
            )
        if t.is_floating_point() and t.dtype != torch.float32:
            raise ToolchainError(
                "adaptation needs float32 weights",
                seen=f"{name}: {str(t.dtype).replace('torch.', '')}",
                remedy="call model.float() before adapt (export and fusion are float32 too)",
            )


@contextlib.contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
    """Export runs the module in eval mode on the CPU; give it back as it came (each submodule's train
    or eval mode, its device), so a user exporting once per epoch trains on unchanged."""
    modes = [(m, m.training) for m in model.modules()]
    placed = [
        (m, name, t.device)
        for m in model.modules()
        for name, t in [*m._parameters.items(), *m._buffers.items()]
        if t is not None
    ]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for m, name, device in placed:  # parameters keep their identity (an optimizer holds them)
            param, buffer = m._parameters.get(name), m._buffers.get(name)
            if param is not None and param.device != device:
                param.data = param.data.to(device)
            elif param is None and buffer is not None and buffer.device != device:
                m._buffers[name] = buffer.to(device)


def fuse(
    base: str | os.PathLike[str], adapter: str | os.PathLike[str], out: str | os.PathLike[str], *, force: bool = False
) -> dict[str, str]:
    """``toolchain fuse``: a toolchain adapter file or a PEFT adapter folder into base.onnx's Conv weights.
    Returns the fused model's provenance as its metadata holds it (``toolchain.*`` keys)."""
    from toolchain.graphs.fuse import fuse_files

    return fuse_files(base, adapter, out, force=force).to_metadata()


def verify(
    model: str | os.PathLike[str],
    reference: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    inputs: np.ndarray | None = None,
    data: str | None = None,
    real: int = 16,
    random: int = 8,
    atol: float | None = None,
    rtol: float | None = None,
    engine: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """``toolchain verify``: Polygraphy's Comparator on ``inputs`` (N, ...) split into batches of the
    model's batch size, or real windows from ``data``, plus ``random`` random inputs. Returns the report as
    ``verify.json`` holds it (``toolchain.records.VerifyReport.to_dict()``: ``report["passed"]``, ...)."""
    from toolchain.verify import VerifyOptions
    from toolchain.verify import verify as run

    if inputs is not None:
        inputs = np.asarray(inputs)
        if inputs.dtype.kind not in "fiu" or inputs.ndim < 2 or len(inputs) == 0:
            raise ToolchainError(
                "verify inputs must be a numeric array (N, ...) with N >= 1",
                seen=f"dtype {inputs.dtype}, shape {inputs.shape}",
                remedy="pass real windows or images as float32",
            )
    opts = VerifyOptions(
        data=data,
        real=real if (data or inputs is not None) else 0,
        random=random,
        atol=atol,
        rtol=rtol,
        force=force,
        inputs=inputs,
    )
    return run(str(model), str(reference), str(out_dir), engine=engine, opts=opts).to_dict()
