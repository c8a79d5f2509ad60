"""Tensor sequences written as plain Splits, so that TensorRT's ONNX parser accepts the graph.

PyTorch's dynamo exporter writes ``torch.split`` / ``chunk`` followed by indexing (braindecode's ATCNet
splits its attention heads that way) as ``SplitToSequence`` and one ``SequenceAt`` per chunk read.
TensorRT has no sequence type and refuses both ops. When the split is static (its sizes are a constant
and the split axis has a static length), every reader of the sequence is a ``SequenceAt`` at a constant
position, and the sequence is not a graph output, the pair means exactly ``Split`` with one output per
chunk: ``split_sequences`` writes that, each chunk read keeping its ``SequenceAt``'s output name. Any
other sequence is left as it is (the parser check then names it). No torch: it runs wherever the graph
stage runs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def split_sequences(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every static SplitToSequence + SequenceAt group written as one Split.
    Node order, names and every other node are kept; the Split takes the SplitToSequence's place."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    if not any(n.op_type == "SplitToSequence" for n in graph.node):
        return out
    consts = _constants(graph)
    dims = _static_dims(out)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    replaced: dict[int, onnx.NodeProto | None] = {}
    for node in graph.node:
        if node.op_type != "SplitToSequence" or node.output[0] in outputs:
            continue
        plan = _plan(node, readers.get(node.output[0], []), consts, dims)
        if plan is None:
            continue
        split, reads, sizes = plan
        replaced[id(node)] = split
        replaced.update({id(r): None for r in reads})
        graph.initializer.append(numpy_helper.from_array(np.asarray(sizes, np.int64), split.input[1]))
    if not replaced:
        return out
    dropped = {i for n in graph.node if id(n) in replaced for i in n.input}
    nodes = [n for n in (replaced.get(id(n), n) for n in graph.node) if n is not None]
    del graph.node[:]
    graph.node.extend(nodes)
    read = {i for n in nodes for i in n.input} | outputs
    orphans = [t for t in graph.initializer if t.name in dropped and t.name not in read]  # split sizes, positions
    for t in orphans:
        graph.initializer.remove(t)
    return out


def _plan(
    node: onnx.NodeProto, reads: list[onnx.NodeProto], consts: dict[str, np.ndarray], dims: dict[str, list[int | None]]
) -> tuple[onnx.NodeProto, list[onnx.NodeProto], list[int]] | None:
    """The Split for ``node``, the SequenceAt nodes it replaces and the chunk lengths, or None where the
    split is not static."""
    sizes = _sizes(node, consts, dims)
    if sizes is None or not reads or any(r.op_type != "SequenceAt" or r.input[1] not in consts for r in reads):
        return None
    count = len(sizes)
    names = [f"{node.output[0]}__chunk{i}" for i in range(count)]
    for r in reads:
        position = int(consts[r.input[1]].reshape(()))
        if not -count <= position < count:
            return None
        names[position % count] = r.output[0]
    if len({r.output[0] for r in reads}) != len(reads) or len(set(names)) != count:
        return None  # two reads of one chunk: left as it is
    split = helper.make_node(
        "Split", [node.input[0], f"{node.output[0]}__sizes"], names, name=node.name, axis=_axis(node)
    )
    split.metadata_props.extend(node.metadata_props)
    return split, reads, sizes


def _sizes(node: onnx.NodeProto, consts: dict[str, np.ndarray], dims: dict[str, list[int | None]]) -> list[int] | None:
    """Chunk lengths along the axis: a 1-D ``split``, or a scalar chunk length over a static axis."""
    keepdims = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
    if len(node.input) < 2 or not node.input[1] or node.input[1] not in consts or keepdims != 1:
        return None
    split = consts[node.input[1]]
    if split.ndim == 1:
        return [int(s) for s in split]
    shape = dims.get(node.input[0])
    if shape is None or split.ndim != 0:
        return None
    length, step = shape[_axis(node) % len(shape)], int(split)
    if length is None or step <= 0:
        return None
    return [step] * (length // step) + ([length % step] if length % step else [])


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer if len(t.dims) <= 1}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return consts


def _static_dims(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Each value's dims as shape inference knows them (None: a symbolic or unknown dim)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    out = {}
    for v in values:
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
    return out
