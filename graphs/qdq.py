"""Explicitly quantized (QDQ) weights: find them, check their layout, requantize a rewritten weight.

The layout fusion understands is the one TensorRT 10 builds INT8 engines from and that both
``toolchain quantize`` (ONNX Runtime, ``AddQDQPairToWeight``) and NVIDIA ModelOpt write: the float
weight stays an initializer and feeds QuantizeLinear -> DequantizeLinear, symmetric INT8 per output
channel (zero point 0), whose output is the kernel of one Conv (or Gemm head)::

    W (float32) -> QuantizeLinear(scale, zp) -> DequantizeLinear(scale, zp) -> Conv input 1

Because the float W is kept, fusion forms W' = W + ΔW exactly and recomputes only that weight's
per-channel scales (``kernels.quant.channel_scales``); activation scales are left as calibrated.
Any other layout of a kernel (per-tensor, asymmetric, INT4, a shared DQ or scale, INT8 weights
stored without the float ones) is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from toolchain.core.errors import ToolchainError
from toolchain.graphs.weights import Consumer, Weight
from toolchain.kernels.quant import channel_scales

KERNEL_INPUTS: dict[str, int] = {"Conv": 1, "Gemm": 1, "MatMul": 1}  # op -> the weight's input position
INT8 = onnx.TensorProto.INT8
REMEDY = "quantize the FP32 model with `toolchain quantize` (float weights behind Q->DQ, INT8 per output channel)"


@dataclass
class QuantizedWeight:
    """One weight chain W -> QuantizeLinear -> DequantizeLinear -> kernel readers."""

    weight: Weight
    scale: Weight
    zero_point: Weight
    axis: int  # normalised, 0 <= axis < weight rank
    quantize: onnx.NodeProto
    dequantize: onnx.NodeProto
    readers: list[Consumer]  # main-graph consumers of the DequantizeLinear output

    def kernel_view(self) -> Weight:
        """The float weight as fusion sees it: its readers are the DQ output's, so the Conv/Gemm
        consumer rules of the FP32 pass apply unchanged."""
        return Weight(self.weight.name, self.weight.tensor, list(self.readers))

    def requantize(self) -> None:
        """Recompute the scales (and zero points' shape) from the weight's current values."""
        values = self.weight.values()
        self.scale.set_values(channel_scales(values, self.axis))
        zeros = np.zeros(values.shape[self.axis], np.int8)
        t = self.zero_point.tensor
        if tuple(t.dims) == zeros.shape:
            return  # the zero points (all 0, checked) stay as stored
        for f in ("int32_data", "raw_data", "external_data"):
            t.ClearField(f)
        t.data_location = onnx.TensorProto.DEFAULT
        del t.dims[:]
        t.dims.extend(zeros.shape)
        t.raw_data = zeros.tobytes()


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output if o}


def _reader_index(graph: onnx.GraphProto) -> dict[str, list[Consumer]]:
    index: dict[str, list[Consumer]] = {}
    for n in graph.node:
        for i, x in enumerate(n.input):
            if x:
                index.setdefault(x, []).append(Consumer(n, i))
    return index


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _fail(rule: str, chain: str, seen: object) -> ToolchainError:
    return ToolchainError(f"quantized weight {chain}: {rule}", seen=seen, remedy=REMEDY)


def _kernel_axis(reader: Consumer, rank: int) -> int:
    """The output-channel axis of the weight for its reader: 0 for Conv, Gemm's N axis, MatMul's last."""
    if reader.node.op_type == "Gemm":
        return 0 if _attr(reader.node, "transB", 0) else 1
    if reader.node.op_type == "MatMul":
        return rank - 1
    return 0


def quantized_weights(graph: onnx.GraphProto, weights: dict[str, Weight]) -> dict[str, QuantizedWeight]:
    """Every kernel reached through DequantizeLinear, by the float weight's name, each checked.

    Raises ToolchainError for a kernel layout fusion cannot keep exact (see the module doc); a
    kernel stored as an INT8 initializer is checked for shape here and refused by ``refuse_integer``.
    """
    producers, index = _producers(graph), _reader_index(graph)
    outputs = {o.name for o in graph.output}
    chains: dict[str, QuantizedWeight] = {}
    for dq in graph.node:
        if dq.op_type != "DequantizeLinear" or not dq.input:
            continue
        readers = index.get(dq.output[0], [])
        if not any(KERNEL_INPUTS.get(r.node.op_type) == r.index for r in readers):
            continue  # an activation's DQ
        if dq.input[0] in weights:
            _check_integer_kernel(dq, weights)
            continue
        q = producers.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in weights:
            continue
        chain = _chain(q, dq, weights, readers)
        if chain.weight.name in chains:
            raise _fail("is quantized by two QuantizeLinear nodes", chain.weight.name, q.name)
        _check_chain(chain, index, outputs)
        chains[chain.weight.name] = chain
    return chains


def _chain(
    q: onnx.NodeProto, dq: onnx.NodeProto, weights: dict[str, Weight], readers: list[Consumer]
) -> QuantizedWeight:
    name = q.input[0]
    w = weights[name]
    if len(q.input) < 3 or len(dq.input) < 3 or not q.input[2] or not dq.input[2]:
        raise _fail("has no zero point (QuantizeLinear then yields UINT8, which TensorRT refuses)", name, q.name)
    if q.input[1] != dq.input[1] or q.input[2] != dq.input[2]:
        raise _fail(
            "QuantizeLinear and DequantizeLinear use different scales or zero points",
            name,
            (list(q.input[1:]), list(dq.input[1:])),
        )
    scale, zp = weights.get(q.input[1]), weights.get(q.input[2])
    if scale is None or zp is None:
        raise _fail("its scale or zero point is not a constant", name, list(q.input[1:]))
    rank = len(w.tensor.dims)
    axis = _attr(q, "axis", 1)
    if not -rank <= axis < rank or _attr(dq, "axis", 1) != axis:
        raise _fail(
            "the quantization axis is out of range or differs between Q and DQ",
            name,
            (axis, _attr(dq, "axis", 1), rank),
        )
    return QuantizedWeight(w, scale, zp, axis % rank, q, dq, readers)


def _check_chain(c: QuantizedWeight, index: dict[str, list[Consumer]], outputs: set[str]) -> None:
    name = c.weight.name
    if c.weight.tensor.data_type != onnx.TensorProto.FLOAT:
        raise _fail("the float weight must be float32", name, onnx.TensorProto.DataType.Name(c.weight.tensor.data_type))
    if _attr(c.quantize, "block_size", 0) or _attr(c.quantize, "output_dtype", INT8) != INT8:
        raise _fail("blocked or non-INT8 quantization", name, c.quantize.name)
    if c.zero_point.tensor.data_type != INT8:
        kind = onnx.TensorProto.DataType.Name(c.zero_point.tensor.data_type)
        raise _fail("weights must be INT8 (UINT8 is asymmetric, INT4 is not supported)", name, kind)
    scale, zp = c.scale.values(), c.zero_point.values()
    channels = int(c.weight.tensor.dims[c.axis])
    if scale.ndim == 0 or (scale.size == 1 and channels != 1):
        raise _fail("per-tensor weight scales (fusion recomputes per output channel)", name, scale.shape)
    if scale.shape != (channels,) or zp.shape != scale.shape:
        raise _fail(
            "scale and zero point must have one value per channel of the axis", name, (scale.shape, zp.shape, channels)
        )
    if scale.dtype != np.float32 or not np.all(np.isfinite(scale)) or not np.all(scale > 0):
        bad = str(scale.dtype) if scale.dtype != np.float32 else scale[~(np.isfinite(scale) & (scale > 0))][:4]
        raise _fail("scales must be finite, positive float32", name, bad)
    if np.any(zp != 0):
        raise _fail("zero points must be 0 (symmetric; TensorRT takes no other)", name, zp[zp != 0][:4])
    for r in c.readers:
        want = KERNEL_INPUTS.get(r.node.op_type)
        if want != r.index or _kernel_axis(r, len(c.weight.tensor.dims)) != c.axis:
            raise _fail(
                "its DequantizeLinear output must feed only kernels, quantized along the output channel",
                name,
                (r.describe(), r.index, c.axis),
            )
    if len(c.readers) != 1 or c.dequantize.output[0] in outputs:
        raise _fail(
            "its DequantizeLinear is shared by several nodes or is a graph output",
            name,
            [r.describe() for r in c.readers][:4],
        )
    own = {id(c.quantize), id(c.dequantize)}
    for t, allowed in (
        (c.weight.name, {id(c.quantize)}),
        (c.scale.name, own),
        (c.zero_point.name, own),
        (c.quantize.output[0], {id(c.dequantize)}),
    ):
        others = [r.node.name or r.node.op_type for r in index.get(t, []) if id(r.node) not in allowed]
        if others or t in outputs:
            raise _fail(
                f"{t} is also read outside its Q->DQ pair, and requantizing would change that reader",
                name,
                others[:4] or "a graph output",
            )


def _check_integer_kernel(dq: onnx.NodeProto, weights: dict[str, Weight]) -> None:
    """A kernel stored as integers (another quantizer's layout): its data must fit its scales."""
    w = weights[dq.input[0]]
    values = w.values()
    scale = weights.get(dq.input[1]) if len(dq.input) > 1 else None
    if scale is None:
        raise _fail("its DequantizeLinear has no constant scale", w.name, dq.name)
    s = scale.values()
    axis = _attr(dq, "axis", 1)
    if s.size > 1 and (not -values.ndim <= axis < values.ndim or s.shape != (values.shape[axis],)):
        raise _fail(
            "the INT8 initializer's shape does not fit its per-channel scales", w.name, (values.shape, s.shape, axis)
        )


def integer_kernels(graph: onnx.GraphProto, weights: dict[str, Weight]) -> list[str]:
    """Kernels stored as integer initializers feeding DequantizeLinear (no float weight to fuse into)."""
    out, index = [], _reader_index(graph)
    for dq in graph.node:
        if dq.op_type == "DequantizeLinear" and dq.input and dq.input[0] in weights:
            if any(KERNEL_INPUTS.get(r.node.op_type) == r.index for r in index.get(dq.output[0], [])):
                out.append(dq.input[0])
    return out


def refuse_integer(names: list[str]) -> ToolchainError:
    return ToolchainError(
        "the model stores its quantized weights as INT8 initializers, so the float base weights an adapter "
        "was trained against are gone and W + ΔW cannot be formed exactly",
        seen=names[:4],
        remedy=REMEDY,
    )


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether the graph has QuantizeLinear or DequantizeLinear nodes (explicit quantization)."""
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def activation_quantizers(graph: onnx.GraphProto, weights: dict[str, Weight]) -> list[onnx.NodeProto]:
    """The QuantizeLinear nodes of activations (their input is computed, not a constant), each with a
    constant scalar scale: the per-tensor scales calibration sets. Every activation Q and DQ scale is
    checked (``check_activation_scales``)."""
    check_activation_scales(graph, weights)
    return [q for q in graph.node if q.op_type == "QuantizeLinear" and q.input and q.input[0] not in weights]


def _activation_nodes(graph: onnx.GraphProto, weights: dict[str, Weight]) -> list[onnx.NodeProto]:
    """The QuantizeLinear and DequantizeLinear nodes of activations: not a weight's Q, nor a DQ of a
    stored constant or of a weight's Q."""
    weight_q = {n.output[0] for n in graph.node if n.op_type == "QuantizeLinear" and n.input and n.input[0] in weights}
    return [
        n
        for n in graph.node
        if n.op_type in ("QuantizeLinear", "DequantizeLinear")
        and n.input
        and n.input[0] not in weights
        and n.input[0] not in weight_q
    ]


def check_activation_scales(graph: onnx.GraphProto, weights: dict[str, Weight]) -> None:
    """Refuse an activation QuantizeLinear/DequantizeLinear whose scale is not one constant, finite,
    positive float32 (with a zero, negative, NaN or Inf scale every value it quantizes is wrong, and no
    engine or calibration record can be trusted) or whose zero point is not one constant INT8 0."""
    for n in _activation_nodes(graph, weights):
        scale = weights.get(n.input[1]) if len(n.input) > 1 else None
        where = f"activation {n.input[0]} ({n.op_type} {n.name or '?'})"
        if scale is None or scale.values().size != 1:
            raise ToolchainError(
                f"{where}: an activation needs one constant per-tensor scale",
                seen=n.input[1] if len(n.input) > 1 else "no scale input",
                remedy=REMEDY,
            )
        value = scale.values()
        if value.dtype != np.float32 or not (np.isfinite(value).all() and (value > 0).all()):
            raise ToolchainError(
                f"{where}: activation scales must be finite, positive float32",
                seen=f"{scale.name} = {value.reshape(-1)[0]!r} ({value.dtype})",
                remedy="the model was edited or corrupted; " + REMEDY,
            )
        _check_activation_zero_point(n, weights, where)


def _check_activation_zero_point(n: onnx.NodeProto, weights: dict[str, Weight], where: str) -> None:
    """TensorRT takes symmetric INT8 only: an activation's zero point must be a constant INT8 0 (without
    one, QuantizeLinear yields UINT8; an asymmetric UINT8 layout is ONNX Runtime's default, not TensorRT's)."""
    zp = weights.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
    values = zp.values() if zp is not None else None
    if zp is None or values is None or zp.tensor.data_type != INT8 or values.size != 1 or np.any(values != 0):
        seen = "no zero point (UINT8)"
        if zp is not None and values is not None:
            kind = onnx.TensorProto.DataType.Name(zp.tensor.data_type)
            seen = f"{zp.name} = {values.reshape(-1)[:4].tolist()} ({kind})"
        raise ToolchainError(
            f"{where}: activations must be symmetric INT8, one constant zero point 0 (TensorRT takes no other)",
            seen=seen,
            remedy="quantize with `toolchain quantize` (symmetric INT8) instead of an asymmetric UINT8 layout",
        )


def kernel_input_scales(graph: onnx.GraphProto, weights: dict[str, Weight]) -> dict[str, float]:
    """For each kernel (Conv, Gemm, MatMul) with a quantized weight and a quantized input: the float
    weight's name -> the per-tensor scale of that input, the activation range the INT8 model keeps.
    Every chain and every activation scale is checked first."""
    chains = quantized_weights(graph, weights)
    check_activation_scales(graph, weights)
    producers = _producers(graph)
    out: dict[str, float] = {}
    for name, chain in chains.items():
        kernel = chain.readers[0].node
        dq = producers.get(kernel.input[0])
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] not in weights:
            out[name] = float(weights[dq.input[1]].values().reshape(-1)[0])
    return out


def dequantized(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every QuantizeLinear -> DequantizeLinear pair removed (readers of the DQ output read
    the Q input): the float model whose activations calibration measures."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    producers = _producers(out.graph)
    rename: dict[str, str] = {}
    paired: set[str] = set()
    for node in out.graph.node:
        q = producers.get(node.input[0]) if node.op_type == "DequantizeLinear" and node.input else None
        if q is not None and q.op_type == "QuantizeLinear":
            rename[node.output[0]] = q.input[0]
            paired.add(q.output[0])
    index = _reader_index(out.graph)
    dropped = {q for q in paired if all(r.node.op_type == "DequantizeLinear" for r in index.get(q, []))}
    keep = [
        n
        for n in out.graph.node
        if not (n.op_type == "QuantizeLinear" and n.output[0] in dropped)
        and not (n.op_type == "DequantizeLinear" and n.output[0] in rename and n.input[0] in dropped)
    ]
    kept = {o for n in keep for o in n.output}
    rename = {k: v for k, v in rename.items() if k not in kept}
    del out.graph.node[:]
    out.graph.node.extend(keep)
    for node in out.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for o in out.graph.output:
        if o.name in rename:
            raise ToolchainError("a DequantizeLinear output is a graph output", seen=o.name, remedy=REMEDY)
    read = {x for n in out.graph.node for x in n.input} | {o.name for o in out.graph.output}
    unread = [t for t in out.graph.initializer if t.name not in read]
    for t in unread:  # the pairs' scales and zero points
        out.graph.initializer.remove(t)
    return out


def set_activation_scale(scale: Weight, absmax: float) -> None:
    """The symmetric per-tensor scale of an activation whose calibrated max |x| is ``absmax``."""
    value = channel_scales(np.asarray([absmax], np.float32), 0)
    scale.set_values(value.reshape(tuple(int(d) for d in scale.tensor.dims)))
