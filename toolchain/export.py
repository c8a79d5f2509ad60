"""PyTorch -> ONNX export of base, unfused-adapted and fused models (`toolchain export`)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import io
import json
import logging
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx.inliner
import torch
from torch import nn

from toolchain.core.errors import ToolchainError
from toolchain.export_check import RANDOM_INPUTS, ExportCheck, against_torch, check_inputs
from toolchain.export_check import record as record_check
from toolchain.graphs.fold import fold_constants
from toolchain.graphs.sequences import split_sequences
from toolchain.kernels import weight_sha256
from toolchain.reparametrized import plain_copy

OPSET = 18


EXPORTERS = ("auto", "dynamo", "torchscript")


@dataclass
class ExportOptions:
    dynamic_batch: bool = False
    fold_bn: bool = False
    batch: int = 1
    exporter: str = "auto"  # auto: dynamo, then the TorchScript-based exporter if dynamo fails or mismatches


@dataclass
class Exported:
    """A checked export: the model, ONNX Runtime vs PyTorch, and what happened on the way."""

    proto: onnx.ModelProto
    check: ExportCheck
    notes: list[str]


def to_onnx(
    model: nn.Module, input_shape: tuple[int, ...], opts: ExportOptions, *, real: np.ndarray | None = None
) -> Exported:
    """Export, fold build-time constants into initializers (so that TensorRT's parser accepts the
    model; conv weights keep their names), and check the result against ``model`` in ONNX Runtime.

    ``exporter`` dynamo uses torch.export; torchscript the TorchScript-based exporter (names and
    BatchNorm kept: no constant folding in torch); auto tries dynamo, then TorchScript, and says so.
    A model no exporter writes right is refused, naming the output, its error and the remedy.
    ``fold_bn`` (dynamo only) runs onnxscript's optimizer, which folds BatchNorm into Conv weights
    *under the same names*; the per-channel scales are recorded.
    """
    if opts.exporter not in EXPORTERS:
        raise ToolchainError(
            "--exporter must be auto, dynamo or torchscript", seen=opts.exporter, remedy="pass --exporter auto"
        )
    if opts.fold_bn and opts.exporter == "torchscript":
        raise ToolchainError(
            "--fold-bn needs the dynamo exporter (it keeps weight names while folding)",
            seen="--exporter torchscript",
            remedy="drop --fold-bn or use --exporter dynamo",
        )
    model = model.eval().cpu()
    plain = plain_copy(model)  # weight-normed or constrained weights exported as their values
    batch = _batch(opts)
    feeds = check_inputs(batch, input_shape, real)
    order = (
        ["dynamo"]
        if opts.fold_bn or opts.exporter == "dynamo"
        else ["torchscript"]
        if opts.exporter == "torchscript"
        else ["dynamo", "torchscript"]
    )
    failures: list[str] = []
    for name in order:
        try:
            proto = split_sequences(fold_constants(_EXPORT[name](plain, input_shape, opts, batch)))
            check = against_torch(model, proto, feeds, name, len(feeds) - RANDOM_INPUTS)
        except ToolchainError:
            raise
        except Exception as err:  # the exporter's own failure, or a model ONNX Runtime cannot run
            failures.append(f"{name} exporter failed ({type(err).__name__}: {_plain(str(err))[:70]}){_hint(name)}")
            continue
        if check.passed:
            _strip_stack_traces(proto)
            if opts.fold_bn:
                scales = fold_scales(plain, proto)
                if scales:
                    proto.metadata_props.add(key="toolchain.weight_scales", value=json.dumps(scales, sort_keys=True))
            record_check(proto, check)
            return Exported(proto, check, [f"{f}; used the {name} exporter instead" for f in failures])
        output, error, bound = check.worst
        failures.append(f"{name} exporter: output {output} differs from PyTorch by {error:.3g} (bound {bound:.3g})")
    raise ToolchainError(
        "no exporter wrote an ONNX model that matches the PyTorch module",
        seen="; ".join(reversed(failures)),
        remedy="nothing was written; replace the op the exporter translates wrongly, or report the module",
    )


def _hint(exporter: str) -> str:
    """A known cause of a dynamo failure: torch < 2.7 with onnxscript >= 0.5.4 (BatchNorm, onnxscript#2651)."""
    if exporter != "dynamo":
        return ""
    try:
        from importlib.metadata import version

        torch_v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
        script_v = tuple(int(p) for p in version("onnxscript").split(".")[:3] if p.isdigit())
    except Exception:  # no onnxscript, or a version string of another shape: no hint
        return ""
    if torch_v < (2, 7) and script_v >= (0, 5, 4):
        return (
            f" [torch {torch.__version__} needs onnxscript < 0.5.4 for its dynamo exporter: "
            "pip install -c constraints/jetpack6.txt 'onnxscript<0.5.4']"
        )
    return ""


def _plain(text: str) -> str:
    """One line without terminal colour codes."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())


def _batch(opts: ExportOptions) -> int:
    return max(opts.batch, 2) if opts.dynamic_batch else opts.batch


def _kwargs(**wanted: Any) -> dict[str, Any]:
    """The keyword arguments this torch's ``torch.onnx.export`` accepts (2.5 lacks optimize and external_data)."""
    accepted = inspect.signature(torch.onnx.export).parameters
    return {k: v for k, v in wanted.items() if k in accepted}


def _dynamo(model: nn.Module, input_shape: tuple[int, ...], opts: ExportOptions, batch: int) -> onnx.ModelProto:
    x = torch.randn(batch, *input_shape)
    dyn = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}} if opts.dynamic_batch else None
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        raise ToolchainError(
            "this torch has no dynamo ONNX exporter",
            seen=torch.__version__,
            remedy="use --exporter torchscript, or torch 2.5 or newer",
        )
    kwargs = _kwargs(
        dynamo=True,
        optimize=opts.fold_bn,
        opset_version=OPSET,
        dynamic_shapes=dyn,
        input_names=["x"],
        output_names=["logits"],
        verbose=False,
        external_data=False,
    )
    with _quiet():
        program = torch.onnx.export(model, (x,), **kwargs)
        if program is None:
            raise ToolchainError("torch.onnx.export returned nothing", seen=type(model).__name__)
        if opts.fold_bn and "optimize" not in kwargs:
            _optimize(program)
    proto = program.model_proto
    if proto.functions:  # torch 2.5's exporter writes BatchNorm as a local function; TensorRT's parser wants ops
        proto = onnx.inliner.inline_local_functions(proto)
    return proto


def _optimize(program: Any) -> None:
    """What ``optimize=True`` does on torch 2.6+ (onnxscript's optimizer on the exported IR: constant
    folding, BatchNorm folded into Conv weights under their names), for torch 2.5, whose export has no
    such option and whose onnxscript hook is a no-op unless an internal flag is set."""
    import onnxscript.optimizer

    onnxscript.optimizer.optimize_ir(program.model)


def _torchscript(model: nn.Module, input_shape: tuple[int, ...], opts: ExportOptions, batch: int) -> onnx.ModelProto:
    x = torch.randn(batch, *input_shape)
    buffer = io.BytesIO()
    axes = {"x": {0: "batch"}, "logits": {0: "batch"}} if opts.dynamic_batch else None
    kwargs = _kwargs(
        dynamo=False,
        opset_version=OPSET,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes=axes,
        do_constant_folding=False,
    )
    with _quiet():
        torch.onnx.export(model, (x,), buffer, **kwargs)  # type: ignore[arg-type]  # no constant folding in torch: it would fold BatchNorm and rename weights
    return onnx.load_from_string(buffer.getvalue())


_EXPORT = {"dynamo": _dynamo, "torchscript": _torchscript}


@contextlib.contextmanager
def _quiet():  # type: ignore[no-untyped-def]
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _strip_stack_traces(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node Python stack traces: they embed local file paths."""
    for node in proto.graph.node:
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)


def fold_scales(model: nn.Module, proto: onnx.ModelProto) -> dict[str, dict[str, object]]:
    """For every conv weight the optimizer rescaled: {param: {base_sha256, folded_sha256, scale}} with
    W_onnx = scale[o] * W[o]. Fusion accepts the scale only for the very folded weight it was
    recorded for (folded_sha256), so a tampered or already fused weight cannot use it."""
    inits = {t.name: t for t in proto.graph.initializer}
    out: dict[str, dict[str, object]] = {}
    for name, p in model.named_parameters():
        conv = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if not name.endswith(".weight") or not isinstance(conv, nn.Conv1d | nn.Conv2d) or name not in inits:
            continue
        base = p.detach().cpu().numpy()
        got = onnx.numpy_helper.to_array(inits[name])
        if got.shape != base.shape or weight_sha256(got) == weight_sha256(base):
            continue
        flat_b, flat_g = base.reshape(len(base), -1).astype(np.float64), got.reshape(len(got), -1).astype(np.float64)
        scale = (flat_b * flat_g).sum(1) / np.maximum((flat_b * flat_b).sum(1), 1e-30)
        if not np.allclose(flat_g, scale[:, None] * flat_b, rtol=1e-4, atol=1e-6 * float(np.abs(flat_g).max() or 1)):
            raise ToolchainError(
                "the exporter changed a conv weight by more than a per-channel scale",
                seen=name,
                remedy="export without --fold-bn",
            )
        out[name] = {
            "base_sha256": weight_sha256(base),
            "folded_sha256": weight_sha256(got),
            "scale": [float(s) for s in scale],
        }
    return out


def _export_shape(net: nn.Module, payload: dict, override: tuple[int, ...] | None) -> tuple[int, ...]:
    """The checkpoint's input shape, or ``override`` where the model runs at that shape (shape-agnostic)."""
    from toolchain.models.registry import check_input_shape

    recorded = payload.get("input_shape")
    if override is None:
        if recorded is None:
            raise ToolchainError(
                "a plain state_dict does not record its input shape",
                seen="no input_shape",
                remedy="pass --input-shape C,T or C,H,W",
            )
        return tuple(recorded)
    shape = check_input_shape(list(override), "--input-shape")
    if recorded is not None and (len(shape) != len(recorded) or shape[0] != recorded[0]):
        raise ToolchainError(
            "--input-shape must keep the checkpoint's channels and number of dims",
            seen=(list(shape), recorded),
            remedy=f"pass {recorded[0]} channels and {len(recorded) - 1} spatial dims",
        )
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, *shape))
    except Exception as err:  # the model's own shape rules (a flatten to a fixed size, a too-short input)
        raise ToolchainError(
            "the model does not run at --input-shape",
            seen=f"{list(shape)}: {type(err).__name__}: {str(err)[:120]}",
            remedy=f"use the shape it was trained on, {recorded}",
        ) from None
    return shape


def export(
    checkpoint: str,
    out: str,
    *,
    adapter: str | None = None,
    fuse: bool = False,
    opts: ExportOptions | None = None,
    force: bool = False,
    model: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    check_data: str | None = None,
) -> dict[str, Any]:
    """`toolchain export`: base model, unfused adapted model, or base exported then fused in ONNX.
    Every written model has been checked against PyTorch (for ``fuse``: the fused model against the
    adapted module). Returns the model's metadata, the check and any notes."""
    from toolchain import __version__
    from toolchain.adapters.adapter_file import load_adapter
    from toolchain.core.fileio import check_output, sha256_file
    from toolchain.graphs.fuse import fuse_model
    from toolchain.graphs.onnx_io import save_onnx
    from toolchain.graphs.provenance import Provenance, write_provenance
    from toolchain.models.registry import load_checkpoint
    from toolchain.peft.inject import apply_adapter

    opts = opts or ExportOptions()
    check_output(out, [checkpoint, adapter], force=force)
    if fuse and adapter is None:
        raise ToolchainError("--fuse needs --adapter", seen="no adapter", remedy="pass --adapter adapter.safetensors")
    net, payload = load_checkpoint(checkpoint, model, input_shape)
    shape = _export_shape(net, payload, input_shape)
    real = _real_inputs(check_data, shape)
    ad = load_adapter(adapter) if adapter else None
    kind = "base"
    if ad is not None and not fuse:
        apply_adapter(net, ad)
        kind = "unfused"
    exported = to_onnx(net, shape, opts, real=real)
    proto, check = exported.proto, exported.check
    prov = Provenance(
        kind=kind,
        version=__version__,
        checkpoint_sha256=sha256_file(checkpoint),
        classes=tuple(payload["classes"]),
        adapter_sha256=sha256_file(str(adapter)) if ad is not None and not fuse else None,
    )
    write_provenance(proto, prov)
    if ad is not None and fuse:  # the base as a plain export writes it, then the graph pass
        fused = dataclasses.replace(
            prov,
            kind="fused",
            base_sha256=hashlib.sha256(proto.SerializeToString()).hexdigest(),
            adapter_sha256=sha256_file(str(adapter)),
        )
        proto = fuse_model(proto, ad, fused.to_metadata())
        check = _check_fused(net, ad, proto, check.exporter, check_inputs(_batch(opts), shape, real))
    onnx.checker.check_model(proto)
    save_onnx(proto, out, force=force)
    return {"metadata": {p.key: p.value for p in proto.metadata_props}, "check": check, "notes": exported.notes}


def _real_inputs(spec: str | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if spec is None:
        return None
    from toolchain.data.sources import load_data

    x = load_data(spec).X
    if tuple(x.shape[1:]) != tuple(shape):
        raise ToolchainError(
            "--check-data does not fit the model's input shape",
            seen=(list(x.shape[1:]), list(shape)),
            remedy="pass data of the model's input shape, or leave --check-data out",
        )
    return x


def _check_fused(
    net: nn.Module, adapter: Any, proto: onnx.ModelProto, exporter: str, feeds: list[np.ndarray]
) -> ExportCheck:
    """The fused ONNX model against the adapted PyTorch module (the aux path, unmerged)."""
    import copy

    from toolchain.peft.inject import apply_adapter

    adapted = copy.deepcopy(net)
    apply_adapter(adapted, adapter)
    check = against_torch(adapted, proto, feeds, exporter, len(feeds) - RANDOM_INPUTS)
    if not check.passed:
        out, err, bound = check.worst
        raise ToolchainError(
            "the fused ONNX model differs from the adapted PyTorch module",
            seen=f"output {out}: max abs {err:.3g} (bound {bound:.3g})",
            remedy="export the unfused model instead and report the adapter",
        )
    record_check(proto, check)
    return check
