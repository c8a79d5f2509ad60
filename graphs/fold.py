"""Fold build-time constants into initializers, so that TensorRT's ONNX parser accepts the graph.

PyTorch's dynamo exporter writes reduce axes as ``Reshape(Constant, Constant)``, the bias of a
bias-less conv as ``Expand(CastLike(Constant, x), Expand(Shape(W), ...))``, and shapes as
``Concat(Constant, Constant)``. TensorRT 10.x requires reduce axes (and similar attribute-like
inputs) to be initializers, and refuses the model ("Axis input must resolve to a build-time
constant"; NVIDIA/TensorRT issues 3467 and 4393).

``fold_constants`` is a ModelProto -> ModelProto pass that evaluates, with ONNX's reference
evaluator, every top-level node whose inputs are known at build time and replaces it by an
initializer named as its output. What it keeps: every other node (order, names, attributes, node
metadata), every existing initializer's name and bytes (conv weights above all: fusion and refit
find them by name), graph inputs and outputs, and ``metadata_props``. A graph output is never
folded. ``Constant`` nodes become initializers of the same name, so a weight given as a Constant is
an initializer afterwards. A node that reads a weight's values (a float initializer of more than
one element) is never folded: weights keep their names and their readers. Two rewrites besides, for
torch 2.5's exporter: a Transpose of a 2-D weight read only as Gemm's B is absorbed into the Gemm
(transB flipped), as newer exporters write a Linear head, and nodes and optional outputs nothing
reads (dead code, MaxPool's Indices) are dropped. No torch, no onnxruntime: it runs wherever the
graph stage runs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

FOLD_LIMIT = 1 << 22  # elements: a result larger than this stays a node (a 16 MiB float32 tensor)
NONDETERMINISTIC = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"}
)
TYPE_ONLY = {"CastLike": (1,)}  # inputs of which only the element type is read
SHAPE_OPS = frozenset({"Shape", "Size"})  # nodes that read only their input's (static) shape

Value = np.ndarray
TypeInfo = tuple[int, list[int] | None]  # (elem_type, static dims or None)


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every foldable top-level node replaced by an initializer.

    A node is folded when its domain is ONNX's own, it has no subgraph and is deterministic, none of
    its outputs is a graph output, every input is an initializer or a folded value (CastLike's
    second input and a Shape/Size input need only a static type), and its results have at most
    ``FOLD_LIMIT`` elements of the element type shape inference expects.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    types = _type_info(out)
    consts = _initial_constants(graph)
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 18)
    protected = {o.name for o in graph.output}
    prune_dead(graph)
    drop_unread_outputs(graph)
    _absorb_transposes(graph, protected)
    weights = _weights(graph)
    folded: dict[str, Value] = {}
    keep: list[onnx.NodeProto] = []
    for node in graph.node:
        values = None if _reads_weight(node, weights) else _try_fold(node, consts, types, protected, opset)
        if values is None:
            keep.append(node)
            continue
        consts.update(values)
        folded.update(values)
    if not folded:
        return out
    _rewrite(graph, keep, folded)
    return out


def _weights(graph: onnx.GraphProto) -> set[str]:
    """The model's weights: floating-point initializers of more than one element. A node that reads one
    is never folded, so every weight keeps its name and its readers (torch 2.5's dynamo exporter writes
    a Linear head as Gemm(Transpose(head.weight)): folded, head.weight would vanish into a tensor named
    ``t``, and neither fusion of a trained head nor refit could find it)."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    return {t.name for t in graph.initializer if t.data_type in floats and int(np.prod(t.dims, dtype=np.int64)) > 1}


def prune_dead(graph: onnx.GraphProto) -> None:
    """Drop nodes none of whose outputs is read, until none is left (torch 2.5's exporter leaves an
    inlined BatchNorm's batch statistics and MaxPool's index arithmetic unread), then the
    initializers only they read. ONNX nodes have no side effects, so nothing a reader sees changes."""
    before = _readers(graph.node, graph.output)
    while True:
        read = _readers(graph.node, graph.output)
        live = [n for n in graph.node if any(o and o in read for o in n.output)]
        if len(live) == len(graph.node):
            break
        kept = [onnx.NodeProto() for _ in live]
        for dst, src in zip(kept, live, strict=True):
            dst.CopyFrom(src)
        del graph.node[:]
        graph.node.extend(kept)
    keep = [t for t in graph.initializer if t.name in read or t.name not in before]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    produced = {n for node in graph.node for n in node.output}
    _drop_value_info(graph, {vi.name for vi in graph.value_info} - produced - read)


OPTIONAL_OUTPUTS = {"MaxPool": 1, "Dropout": 1}  # op -> the outputs it must keep (the rest are optional)


def drop_unread_outputs(graph: onnx.GraphProto) -> None:
    """Drop the optional outputs nothing reads: torch 2.5's dynamo exporter writes MaxPool with its
    Indices output, which TensorRT's parser refuses ("doesn't support more than 1 outputs for MaxPool")."""
    read = _readers(graph.node, graph.output)
    for node in graph.node:
        keep = OPTIONAL_OUTPUTS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if keep is None or len(node.output) <= keep or any(o in read for o in node.output[keep:]):
            continue
        gone = set(node.output[keep:])
        del node.output[keep:]
        _drop_value_info(graph, gone)


def _absorb_transposes(graph: onnx.GraphProto, protected: set[str]) -> None:
    """Gemm(A, Transpose(W)) -> Gemm(A, W, transB flipped), for a 2-D weight W read only as Gemm's B:
    torch 2.5's dynamo exporter writes a Linear head that way, newer ones write Gemm(A, W, transB=1).
    The head's weight then feeds its Gemm directly, under its own name, as fusion and refit expect."""
    weights = {t.name for t in graph.initializer if len(t.dims) == 2}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, i))
    drop = []
    for node in graph.node:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or perm != [1, 0]:
            continue
        if node.input[0] not in weights or node.output[0] in protected:
            continue
        users = readers.get(node.output[0], [])
        if not users or any(u.op_type != "Gemm" or i != 1 for u, i in users):
            continue
        for user, _ in users:
            user.input[1] = node.input[0]
            attr = next((a for a in user.attribute if a.name == "transB"), None)
            if attr is None:
                user.attribute.append(helper.make_attribute("transB", 1))
            else:
                attr.i = 1 - attr.i
        drop.append(node)
    for node in drop:
        graph.node.remove(node)
    _drop_value_info(graph, {n.output[0] for n in drop})


def _reads_weight(node: onnx.NodeProto, weights: set[str]) -> bool:
    """Whether ``node`` reads a weight's values (a Shape or Size of it, a CastLike's type input, do not)."""
    if node.op_type in SHAPE_OPS:
        return False
    type_only = TYPE_ONLY.get(node.op_type, ())
    return any(name in weights for i, name in enumerate(node.input) if i not in type_only)


def _initial_constants(graph: onnx.GraphProto) -> dict[str, Value]:
    """Initializers that are not also graph inputs (an input may override its initializer)."""
    inputs = {i.name for i in graph.input}
    return {
        t.name: numpy_helper.to_array(t)
        for t in graph.initializer
        if t.name not in inputs and t.data_location != onnx.TensorProto.EXTERNAL
    }


def _type_info(model: onnx.ModelProto) -> dict[str, TypeInfo]:
    """Element type and static dims of every value shape inference can type (on a data-less skeleton)."""
    from toolchain.graphs.onnx_io import skeleton

    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(model), strict_mode=False)
    except Exception:  # an uninferable graph folds less, never wrongly
        inferred = model
    info: dict[str, TypeInfo] = {}
    g = inferred.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        tt = vi.type.tensor_type
        if not tt.elem_type:
            continue
        dims = (
            [d.dim_value for d in tt.shape.dim]
            if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim)
            else None
        )
        info[vi.name] = (tt.elem_type, dims)
    for t in model.graph.initializer:
        info[t.name] = (t.data_type, list(t.dims))
    return info


def _try_fold(
    node: onnx.NodeProto, consts: dict[str, Value], types: dict[str, TypeInfo], protected: set[str], opset: int
) -> dict[str, Value] | None:
    if (
        node.domain not in ("", "ai.onnx")
        or node.op_type in NONDETERMINISTIC
        or any(o in protected for o in node.output)
    ):
        return None
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        return None
    if node.op_type in SHAPE_OPS:
        return _fold_shape(node, types)
    feeds = _feeds(node, consts, types)
    if feeds is None:
        return None
    return _evaluate(node, feeds, types, opset)


def _feeds(node: onnx.NodeProto, consts: dict[str, Value], types: dict[str, TypeInfo]) -> dict[str, Value] | None:
    feeds: dict[str, Value] = {}
    for index, name in enumerate(node.input):
        if not name:
            return None  # an omitted optional input: leave such nodes to the runtime
        if name in consts:
            feeds[name] = consts[name]
        elif index in TYPE_ONLY.get(node.op_type, ()) and name in types:
            feeds[name] = np.empty((0,), helper.tensor_dtype_to_np_dtype(types[name][0]))
        else:
            return None
    return feeds


def _fold_shape(node: onnx.NodeProto, types: dict[str, TypeInfo]) -> dict[str, Value] | None:
    """Shape (with start/end) and Size of an input whose dims are all static."""
    dims = types.get(node.input[0], (0, None))[1] if node.input else None
    if dims is None:
        return None
    if node.op_type == "Size":
        return {node.output[0]: np.array(int(np.prod(dims, dtype=np.int64)), np.int64)}
    attrs = {a.name: a.i for a in node.attribute}
    rank = len(dims)
    start, end = attrs.get("start", 0), attrs.get("end", rank)
    start, end = (min(max(v + rank if v < 0 else v, 0), rank) for v in (start, end))
    return {node.output[0]: np.array(dims[start:end], np.int64)}


def _evaluate(
    node: onnx.NodeProto, feeds: dict[str, Value], types: dict[str, TypeInfo], opset: int
) -> dict[str, Value] | None:
    from onnx.reference import ReferenceEvaluator

    try:
        results = ReferenceEvaluator(node, opsets={"": opset}).run(None, feeds)
    except Exception:  # an op the reference evaluator lacks, or inputs it refuses: keep the node
        return None
    values: dict[str, Value] = {}
    for name, value in zip(node.output, results, strict=False):
        if not name:
            continue
        value = np.asarray(value)
        expected = types.get(name)
        if value.size > FOLD_LIMIT or (
            expected is not None and helper.np_dtype_to_tensor_dtype(value.dtype) != expected[0]
        ):
            return None
        values[name] = value
    return values


def _rewrite(graph: onnx.GraphProto, keep: list[onnx.NodeProto], folded: dict[str, Value]) -> None:
    """Drop folded nodes, add initializers for folded values still read, drop initializers and
    value_info that only folded nodes read."""
    before = _readers(graph.node, graph.output)
    kept_nodes = [onnx.NodeProto() for _ in keep]
    for dst, src in zip(kept_nodes, keep, strict=True):
        dst.CopyFrom(src)
    del graph.node[:]
    graph.node.extend(kept_nodes)
    read = _readers(graph.node, graph.output)
    existing = [t for t in graph.initializer if t.name in read or t.name not in before]
    del graph.initializer[:]
    graph.initializer.extend(existing)
    names = {t.name for t in existing}
    graph.initializer.extend(
        numpy_helper.from_array(v, name) for name, v in folded.items() if name in read and name not in names
    )
    _drop_value_info(graph, set(folded))


def _drop_value_info(graph: onnx.GraphProto, gone: set[str]) -> None:
    """Remove the value_info of values that no longer exist."""
    if gone:
        keep = [vi for vi in graph.value_info if vi.name not in gone]
        del graph.value_info[:]
        graph.value_info.extend(keep)


def _readers(nodes: object, outputs: object) -> set[str]:
    """Every value name a node (or a subgraph of it, at any depth) or a graph output reads."""
    names = {o.name for o in outputs}  # type: ignore[attr-defined]
    stack = list(nodes)  # type: ignore[call-overload]
    while stack:
        node = stack.pop()
        names.update(node.input)
        for a in node.attribute:
            for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                stack.extend(g.node)
                names.update(o.name for o in g.output)
    return names
