"""`toolchain quantize`: explicit INT8 (QDQ) post-training quantization for TensorRT, and the
activation recalibration `toolchain fuse --recalibrate` runs on a fused quantized model.

The quantizer is ONNX Runtime's ``quantize_static`` (docs/INT8.md says why not ModelOpt), set to the
layout TensorRT 10 builds explicitly quantized engines from and that fusion keeps exact:

- weights: INT8, symmetric (zero point 0), per output channel, the float weight kept as an
  initializer behind QuantizeLinear -> DequantizeLinear (``AddQDQPairToWeight``);
- activations: INT8, symmetric, per tensor, Q/DQ on the quantized ops' inputs only, calibrated
  by max |x| (MinMax) on real windows or images;
- biases stay float (TensorRT's parser refuses ONNX Runtime's int32 bias DQ).

Needs onnxruntime (the ``quantize`` extra); no torch.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.core.errors import ToolchainError

QUANT_KEY = "toolchain.quantization"
DEFAULT_OPS = ("Conv",)  # the classifier head stays float unless asked: see docs/INT8.md
QUANTIZABLE_OPS = ("Conv", "Gemm", "MatMul")
CALIBRATION_BATCHES = 256
CALIBRATION_SPLIT = "source"  # the base model's own domain: the subjects it was pretrained on
RECALIBRATE_SPLIT = "target-adapt"  # fuse --recalibrate: the target windows the adapter was trained on
FIRST = "@first"  # --exclude: the first node of --ops in graph order (the net's first conv); @first:N the first N


@dataclass
class Calibration:
    """Where calibration inputs come from: a data spec, a split of it, and how many model batches."""

    data: str = "watch"
    split: str = CALIBRATION_SPLIT
    batches: int = CALIBRATION_BATCHES
    subjects: tuple[int, ...] | None = None  # the target subjects the split is taken around; None: the usual

    def check(self) -> None:
        if type(self.batches) is not int or self.batches < 1:
            raise ToolchainError(
                "--calibration-batches must be an integer >= 1",
                seen=self.batches,
                remedy="e.g. --calibration-batches 256",
            )


def _ort() -> Any:
    try:
        import onnxruntime
        import onnxruntime.quantization
    except ImportError:
        raise ToolchainError(
            "quantization needs ONNX Runtime",
            seen="onnxruntime not installed",
            remedy='pip install "toolchain[quantize]"',
        ) from None
    return onnxruntime


def calibration_inputs(cal: Calibration, shape: list[int | None]) -> tuple[list[np.ndarray], dict[str, Any]]:
    """``cal.batches`` batches of the model's batch size, spread evenly over the split (at most every
    window once), and the record of what was used (spec, split, counts, SHA-256 of the inputs)."""
    from toolchain.data.sources import load_split
    from toolchain.kernels import weight_sha256

    cal.check()
    ds = load_split(cal.data, cal.split, cal.subjects)
    if list(ds.X.shape[1:]) != [d or -1 for d in shape[1:]]:
        raise ToolchainError(
            "the calibration data's window or image shape does not fit the model input",
            seen=(list(ds.X.shape[1:]), shape[1:]),
            remedy="calibrate with data of the model's input shape (--data)",
        )
    batch = shape[0] or 32
    n = min(cal.batches, len(ds) // batch)
    if n < 1:
        raise ToolchainError(
            "too few windows for one calibration batch", seen=(cal.data, cal.split, len(ds)), remedy="use more data"
        )
    idx = np.linspace(0, len(ds) - 1, n * batch).round().astype(int)
    x = np.ascontiguousarray(ds.X[idx], dtype=np.float32)
    record = {
        "data": cal.data,
        "split": cal.split,
        "batches": n,
        "batch_size": batch,
        "windows": int(n * batch),
        "sha256": weight_sha256(x),
        "method": "minmax",
    } | ({"subjects": list(cal.subjects)} if cal.subjects is not None else {})
    return [x[i * batch : (i + 1) * batch] for i in range(n)], record


def _reader(name: str, batches: list[np.ndarray]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.items = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.items, None)
            return None if x is None else {name: x}

    return Reader()


def _first(entry: str, names: list[str]) -> list[str]:
    """``@first`` -> the first name, ``@first:N`` -> the first N; any other entry is a name."""
    if entry != FIRST and not entry.startswith(FIRST + ":"):
        return [entry]
    count = entry[len(FIRST) + 1 :] if entry != FIRST else "1"
    if not (count.isdigit() and count.isascii() and int(count) >= 1):
        raise ToolchainError(
            f"--exclude {FIRST}:N takes a whole number N >= 1", seen=entry, remedy=f"e.g. --exclude {FIRST}:4"
        )
    return names[: int(count)]


def excluded_nodes(model: Any, exclude: tuple[str, ...], ops: tuple[str, ...]) -> list[str]:
    """The node names ``--exclude`` leaves float: each a node of ``ops`` (``@first``: the first of them in
    graph order, ``@first:N`` the first N), at least one of them still quantized."""
    names = [n.name for n in model.graph.node if n.op_type in ops]
    chosen = [name for e in exclude for name in _first(e, names)]
    unknown = [e for e in chosen if e not in names]
    if unknown:
        raise ToolchainError(
            f"--exclude names nodes of --ops ({','.join(ops)}) by name, or {FIRST}[:N]",
            seen=f"{unknown[0]!r} is not one; the model has {len(names)}: {', '.join(names[:4])}"
            + (", ..." if len(names) > 4 else ""),
            remedy=f"pass --exclude {FIRST} or {FIRST}:N, or names as onnx.load(MODEL).graph.node has them",
        )
    if names and set(chosen) >= set(names):
        raise ToolchainError(
            "--exclude leaves nothing to quantize",
            seen=f"all {len(names)} nodes of {','.join(ops)}",
            remedy="exclude fewer nodes",
        )
    return sorted(set(chosen), key=names.index)


def _run_quantizer(model: Any, name: str, batches: list[np.ndarray], ops: tuple[str, ...], exclude: list[str]) -> Any:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    own = onnx.ModelProto()
    own.CopyFrom(model)  # quantize_static moves the weights of the model it is given to external data
    with tempfile.TemporaryDirectory(prefix="toolchain-quantize-") as tmp:
        out = Path(tmp) / "model.int8.onnx"
        quantize_static(
            own,
            str(out),
            _reader(name, batches),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(ops),
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=exclude,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "AddQDQPairToWeight": True,
                "QuantizeBias": False,
                "OpTypesToExcludeOutputQuantization": list(QUANTIZABLE_OPS),
            },
        )
        return onnx.load(str(out))


def quantize_model(
    model: Any, cal: Calibration, ops: tuple[str, ...] = DEFAULT_OPS, exclude: tuple[str, ...] = ()
) -> Any:
    """A QDQ copy of the float ``model`` (ModelProto), with ``toolchain.quantization`` recorded;
    ``exclude``: nodes left float, weights and inputs (``--exclude``; TensorRT runs them in FP16 or FP32)."""
    from toolchain.graphs.onnx_io import input_of
    from toolchain.graphs.provenance import set_metadata
    from toolchain.graphs.qdq import is_quantized, quantized_weights
    from toolchain.graphs.weights import index_weights

    ort = _ort()
    bad = [o for o in ops if o not in QUANTIZABLE_OPS]
    if not ops or bad:
        raise ToolchainError("--ops takes Conv, Gemm and MatMul", seen=bad or ops, remedy="e.g. --ops Conv,Gemm")
    if is_quantized(model):
        raise ToolchainError(
            "the model is already quantized (it has QuantizeLinear/DequantizeLinear nodes)",
            seen=sorted({n.op_type for n in model.graph.node if "Quant" in n.op_type}),
            remedy="quantize the FP32 model",
        )
    skipped = excluded_nodes(model, exclude, ops)
    name, shape = input_of(model)
    batches, record = calibration_inputs(cal, shape)
    meta = {p.key: p.value for p in model.metadata_props}
    quiet = logging.getLogger()  # quantize_static logs a pre-processing hint on the root logger
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        q = _run_quantizer(model, name, batches, ops, skipped)
    finally:
        quiet.setLevel(level)
    chains = quantized_weights(q.graph, index_weights(q.graph))  # the layout fusion needs, checked
    record = {
        "format": "qdq",
        "weights": "int8 symmetric per output channel, float weights behind QuantizeLinear",
        "activations": "int8 symmetric per tensor",
        "ops": list(ops),
        "quantized_weights": sorted(chains),
        "excluded": skipped,
        "quantizer": f"onnxruntime {ort.__version__} quantize_static",
        "calibration": record,
    }
    set_metadata(q, {k: v for k, v in meta.items() if k.startswith("toolchain.")} | {QUANT_KEY: json.dumps(record)})
    return q


def quantize_file(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cal: Calibration,
    *,
    ops: tuple[str, ...] = DEFAULT_OPS,
    exclude: tuple[str, ...] = (),
    force: bool = False,
) -> dict[str, Any]:
    """`toolchain quantize`: read, quantize, validate, write atomically; returns the scheme record."""
    from toolchain.core.fileio import check_output
    from toolchain.data.sources import data_files
    from toolchain.graphs.onnx_io import external_files, read_onnx, save_onnx

    check_output(out, [model, *data_files(cal.data)], force=force)
    proto, _ = read_onnx(model)
    check_output(out, [model, *data_files(cal.data)], force=force, related=external_files(proto, Path(model).parent))
    q = quantize_model(proto, cal, ops, exclude)
    save_onnx(q, out, force=force, validate=True)
    return read_scheme(q) or {}


def read_scheme(model: Any) -> dict[str, Any] | None:
    """The ``toolchain.quantization`` record of a model, or None."""
    raw = next((p.value for p in model.metadata_props if p.key == QUANT_KEY), None)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise ToolchainError(f"model metadata {QUANT_KEY} is not valid JSON", seen=raw[:60]) from None
    return value if isinstance(value, dict) else None


def activation_ranges(model: Any, tensors: list[str], batches: list[np.ndarray]) -> dict[str, float]:
    """max |x| of each named tensor of the float ``model`` over the batches (ONNX Runtime, CPU)."""
    import onnx

    ort = _ort()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    present = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in present:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # measure the tensors as named
    session = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    ranges = dict.fromkeys(tensors, 0.0)
    for x in batches:
        values = session.run(tensors, {name: x})
        for t, v in zip(tensors, values, strict=True):
            ranges[t] = max(ranges[t], float(np.abs(v).max(initial=0.0)))
    return ranges


def recalibrate(model: Any, cal: Calibration) -> dict[str, Any]:
    """Re-derive every activation scale of the quantized ``model`` in place on ``cal``'s inputs
    (weights and their scales are kept). Returns the calibration record, also added to the
    model's ``toolchain.quantization``."""
    from toolchain.graphs.onnx_io import input_of
    from toolchain.graphs.provenance import set_metadata
    from toolchain.graphs.qdq import activation_quantizers, dequantized, set_activation_scale
    from toolchain.graphs.weights import index_weights

    weights = index_weights(model.graph)
    quantizers = activation_quantizers(model.graph, weights)
    if not quantizers:
        raise ToolchainError(
            "--recalibrate needs a model with quantized activations",
            seen="no activation QuantizeLinear",
            remedy="quantize the base with `toolchain quantize` first",
        )
    batches, record = calibration_inputs(cal, input_of(model)[1])
    tensors = sorted({q.input[0] for q in quantizers})
    ranges = activation_ranges(dequantized(model), tensors, batches)
    for q in quantizers:
        set_activation_scale(weights[q.input[1]], ranges[q.input[0]])
    scheme = read_scheme(model) or {}
    set_metadata(model, {QUANT_KEY: json.dumps({**scheme, "recalibration": record})})
    return record
