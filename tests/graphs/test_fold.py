"""graphs.fold: build-time constants become initializers; everything else stays as it was."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from toolchain.graphs.fold import fold_constants


def _model(nodes, inits, out_shape, inputs=(("x", [1, 2, 4]),), outputs=("y",)):
    for i, node in enumerate(nodes):
        node.name = node.name or f"n{i}_{node.op_type}"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, out_shape) for o in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = (
        10  # onnx >= 1.20 defaults to IR 12+, which the last ONNX Runtime for Python 3.10 (1.23) cannot load
    )
    model.metadata_props.add(key="toolchain.kind", value="base")
    return model


def _const(name, value):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value)), name=f"c_{name}")


W = np.random.default_rng(0).standard_normal((3, 2, 1)).astype(np.float32)
CASES = {
    # name: (nodes, initializers, output shape, ops left after folding)
    "reduce axes from Reshape(Constant, Constant)": (
        [
            _const("a", np.array([2], np.int64)),
            _const("s", np.array([1], np.int64)),
            helper.make_node("Reshape", ["a", "s"], ["axes"]),
            helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=1),
        ],
        {},
        [1, 2, 1],
        ["ReduceMean"],
    ),
    "zero conv bias from Expand(CastLike, Shape(W))": (
        [
            helper.make_node("Shape", ["w"], ["ws"], start=0, end=1),
            _const("zero", np.array(0.0, np.float64)),
            helper.make_node("CastLike", ["zero", "x"], ["zf"]),
            helper.make_node("Expand", ["zf", "ws"], ["bias"]),
            helper.make_node("Conv", ["x", "w", "bias"], ["y"], kernel_shape=[1]),
        ],
        {"w": W},
        [1, 3, 4],
        ["Conv"],
    ),
    "shape from Concat(Constant, Constant)": (
        [
            _const("p", np.array([1], np.int64)),
            _const("q", np.array([8], np.int64)),
            helper.make_node("Concat", ["p", "q"], ["shape"], axis=0),
            helper.make_node("Reshape", ["x", "shape"], ["y"]),
        ],
        {},
        [1, 8],
        ["Reshape"],
    ),
    "a weight given as a Constant keeps its name": (
        [_const("w", W), helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[1])],
        {},
        [1, 3, 4],
        ["Conv"],
    ),
    "nothing to fold": ([helper.make_node("Relu", ["x"], ["y"])], {}, [1, 2, 4], ["Relu"]),
    "random ops stay": (
        [
            helper.make_node("RandomNormal", [], ["r"], shape=[1, 2, 4], seed=1.0),
            helper.make_node("Mul", ["x", "r"], ["y"]),
        ],
        {},
        [1, 2, 4],
        ["RandomNormal", "Mul"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fold(case):
    nodes, inits, out_shape, left = CASES[case]
    model = _model(nodes, inits, out_shape)
    onnx.checker.check_model(model, full_check=True)
    folded = fold_constants(model)
    onnx.checker.check_model(folded, full_check=True)
    assert [n.op_type for n in folded.graph.node] == left
    assert {p.key: p.value for p in folded.metadata_props} == {"toolchain.kind": "base"}
    kept = [n.name for n in folded.graph.node]
    assert kept == [n.name for n in model.graph.node if n.name in kept]  # order and names of what is left
    for name, value in inits.items():  # existing initializers keep name and bytes
        t = next(t for t in folded.graph.initializer if t.name == name)
        assert numpy_helper.to_array(t).tobytes() == np.asarray(value).tobytes()
    if case != "random ops stay":
        x = np.random.default_rng(1).standard_normal((1, 2, 4)).astype(np.float32)
        a = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
        b = ort.InferenceSession(folded.SerializeToString()).run(None, {"x": x})[0]
        np.testing.assert_array_equal(a, b)


def test_weight_constant_becomes_initializer_of_that_name():
    nodes, inits, out_shape, _ = CASES["a weight given as a Constant keeps its name"]
    folded = fold_constants(_model(nodes, inits, out_shape))
    assert [t.name for t in folded.graph.initializer] == ["w"]
    np.testing.assert_array_equal(numpy_helper.to_array(folded.graph.initializer[0]), W)


def test_a_graph_output_is_never_folded():
    nodes = [
        _const("c", np.ones((1, 2, 4), np.float32)),
        helper.make_node("Add", ["x", "c"], ["y"]),
        helper.make_node("Identity", ["c"], ["k"]),
    ]
    model = _model(nodes, {}, [1, 2, 4], outputs=("y", "k"))
    folded = fold_constants(model)
    assert "Identity" in [n.op_type for n in folded.graph.node]


def test_the_callers_model_is_untouched():
    nodes, inits, out_shape, _ = CASES["reduce axes from Reshape(Constant, Constant)"]
    model = _model(nodes, inits, out_shape)
    before = model.SerializeToString()
    fold_constants(model)
    assert model.SerializeToString() == before
