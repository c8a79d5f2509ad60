"""split_sequences: static SplitToSequence + SequenceAt groups become one Split (what TensorRT parses),
with the same outputs on ONNX Runtime; anything not static is left as it is."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from toolchain.graphs.sequences import split_sequences


def _model(shape, split, axis, positions, keepdims=1, extra_reader=None, seq_output=False):
    """x -> SplitToSequence(split, axis) -> SequenceAt(p) for each position -> Identity outputs."""
    inits = [numpy_helper.from_array(np.asarray(split, np.int64), "split")]
    nodes = [helper.make_node("SplitToSequence", ["x", "split"], ["seq"], name="s", axis=axis, keepdims=keepdims)]
    outputs = []
    for i, p in enumerate(positions):
        inits.append(numpy_helper.from_array(np.asarray(p, np.int64), f"p{i}"))
        nodes.append(helper.make_node("SequenceAt", ["seq", f"p{i}"], [f"c{i}"], name=f"at{i}"))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    if extra_reader:
        nodes.append(helper.make_node(extra_reader, ["seq"], ["n"]))
        outputs.append(helper.make_tensor_value_info("n", TensorProto.INT64, None))
    if seq_output:
        outputs.append(
            helper.make_value_info(
                "seq", helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, None))
            )
        )
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)], outputs, inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10  # what every supported onnxruntime reads (the JetPack stack's reads at most 11)
    return model


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


REWRITTEN = [  # (shape, split, axis, positions)
    ((1, 32, 16), 8, -1, [0, 1]),  # braindecode ATCNet's heads
    ((2, 10, 3), 4, 1, [2, 0, 1]),  # uneven: 4, 4, 2
    ((3, 6), [1, 2, 3], 1, [1, 2]),  # sizes given; chunk 0 unread
    ((4, 6), 2, 0, [-1, 0]),  # a negative position
]


@pytest.mark.parametrize(("shape", "split", "axis", "positions"), REWRITTEN)
def test_static_sequences_become_one_split_with_the_same_outputs(shape, split, axis, positions):
    model = _model(shape, split, axis, positions)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out = split_sequences(model)
    assert [n.op_type for n in out.graph.node if "Sequence" in n.op_type] == []
    assert [n.name for n in out.graph.node if n.op_type == "Split"] == ["s"]
    assert [t.name for t in out.graph.initializer] == ["seq__sizes"]  # the split and the positions dropped
    for got, want in zip(_run(out, x), _run(model, x), strict=True):
        np.testing.assert_array_equal(got, want)


LEFT = {  # what is not static, or not only read by SequenceAt, stays a sequence
    "dynamic axis": dict(shape=("n", 6), split=2, axis=0, positions=[0]),
    "keepdims=0 squeezes": dict(shape=(4, 6), split=1, axis=0, positions=[0], keepdims=0),
    "another reader": dict(shape=(4, 6), split=2, axis=0, positions=[0], extra_reader="SequenceLength"),
    "a graph output": dict(shape=(4, 6), split=2, axis=0, positions=[0], seq_output=True),
}


@pytest.mark.parametrize("case", LEFT)
def test_sequences_that_are_not_static_are_left_as_they_are(case):
    model = _model(**LEFT[case])
    out = split_sequences(model)
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]
