"""The fuse pass against the unfused ONNX model and the PyTorch adapted model, over the geometry table."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.geometries import GEOMETRIES
from tests.graphs.helpers import adapted_pair, export_proto, ops, run
from toolchain.core.errors import ToolchainError
from toolchain.graphs.fuse import fuse_model, layer_delta
from toolchain.kernels import delta_weight, suffix_kernel

PROV = {
    "toolchain.fused": "true",
    "toolchain.base_sha256": "b" * 64,
    "toolchain.adapter_sha256": "a" * 64,
    "toolchain.version": "test",
}


@pytest.mark.parametrize("geom_id", list(GEOMETRIES))
def test_fused_matches_unfused_and_torch(geom_id):
    base, adapted, adapter, x = adapted_pair(geom_id)
    base_proto = export_proto(base, x)
    unfused = export_proto(adapted, x)
    fused = fuse_model(base_proto, adapter, PROV)
    onnx.checker.check_model(fused)
    want = adapted(x).detach().numpy()
    np.testing.assert_allclose(run(unfused, x), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run(fused, x), want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(run(base_proto, x), want, atol=1e-3), "a non-zero ΔG1 must change the output"
    assert ops(fused) == ops(base_proto)  # the same nodes in the same order
    assert fused.graph.value_info == base_proto.graph.value_info
    assert [i.name for i in fused.graph.input] == [i.name for i in base_proto.graph.input]
    assert [o.name for o in fused.graph.output] == [o.name for o in base_proto.graph.output]


@pytest.mark.parametrize("geom_id", ["1d-plain", "1d-depthwise", "2d-groups-nobias"])
def test_graph_delta_is_the_reference_delta(geom_id):
    _, adapted, adapter, _ = adapted_pair(geom_id)
    (layer,) = adapter.layers
    delta, *suffix = adapter.layer_tensors(layer)
    ref = delta_weight(delta, suffix_kernel(suffix), layer.scaling)
    np.testing.assert_array_equal(layer_delta(layer, adapter), ref)
    np.testing.assert_allclose(adapted.conv.delta_weight().detach().numpy(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("geom_id", ["1d-plain", "1d-groups2", "1d-depthwise", "2d-plain", "2d-depthwise"])
def test_bn_folded_export_fuses_with_channel_scales(geom_id):
    base, adapted, adapter, x = adapted_pair(geom_id, bn=True)
    folded = export_proto(base, x, fold_bn=True)
    assert "BatchNormalization" not in [op for _, op in ops(folded)], "the optimizer should have folded BN"
    fused = fuse_model(folded, adapter, PROV)
    np.testing.assert_allclose(run(fused, x), adapted(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_bn_folded_without_scales_is_refused():
    base, _, adapter, x = adapted_pair("1d-plain", bn=True)
    folded = export_proto(base, x, fold_bn=True)
    del folded.metadata_props[:]
    with pytest.raises(ToolchainError, match="is not the base weight"):
        fuse_model(folded, adapter, PROV)


def _to_constant_nodes(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    consts = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in out.graph.initializer]
    del out.graph.initializer[:]
    nodes = consts + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def test_weights_as_constant_nodes():
    base, adapted, adapter, x = adapted_pair("1d-stride2-nobias")
    proto = _to_constant_nodes(export_proto(base, x))
    assert not proto.graph.initializer
    fused = fuse_model(proto, adapter, PROV)
    np.testing.assert_allclose(run(fused, x), adapted(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_renamed_initializer_falls_back_to_hash():
    base, adapted, adapter, x = adapted_pair("1d-plain")
    proto = export_proto(base, x)
    for t in proto.graph.initializer:
        if t.name == "conv.weight":
            t.name = "renamed_w"
    for n in proto.graph.node:
        n.input[:] = ["renamed_w" if i == "conv.weight" else i for i in n.input]
    fused = fuse_model(proto, adapter, PROV)
    np.testing.assert_allclose(run(fused, x), adapted(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def _twin_conv(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The base with its Conv applied a second time to the same input: one module, a tied weight."""
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    twin = onnx.NodeProto()
    twin.CopyFrom(conv)
    twin.name, twin.output[0] = "twin", "twin_out"
    proto.graph.node.append(twin)
    proto.graph.output.append(onnx.helper.make_tensor_value_info("twin_out", onnx.TensorProto.FLOAT, None))
    return proto


def test_weight_shared_by_two_convs_of_one_module_fuses_once():
    base, adapted, adapter, x = adapted_pair("1d-pointwise")
    fused = fuse_model(_twin_conv(export_proto(base, x)), adapter, PROV)
    sess = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"])
    y, twin = sess.run(None, {"x": x.numpy()})
    want = adapted(x).detach().numpy()
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(twin, adapted.conv(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def _extra_reader(proto: onnx.ModelProto, kind: str) -> onnx.ModelProto:
    """Give the conv weight a second, non-Conv reader: a ReduceSum, or a Conv inside an If branch."""
    h = onnx.helper
    if kind == "reducesum":
        node = h.make_node("ReduceSum", ["conv.weight"], ["wsum"], name="wsum", keepdims=0)
        out = h.make_tensor_value_info("wsum", onnx.TensorProto.FLOAT, None)
    else:
        conv = next(n for n in proto.graph.node if n.op_type == "Conv")
        inner = onnx.NodeProto()
        inner.CopyFrom(conv)
        inner.name, inner.output[0] = "inner_conv", "branch_out"
        then = h.make_graph([inner], "then", [], [h.make_tensor_value_info("branch_out", onnx.TensorProto.FLOAT, None)])
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(True), "cond"))
        node = h.make_node("If", ["cond"], ["if_out"], name="if", then_branch=then, else_branch=then)
        out = h.make_tensor_value_info("if_out", onnx.TensorProto.FLOAT, None)
    proto.graph.node.append(node)
    proto.graph.output.append(out)
    return proto


@pytest.mark.parametrize(("kind", "reader"), [("reducesum", "ReduceSum wsum"), ("if", "If if inside a subgraph")])
def test_weight_with_another_reader_is_refused(kind, reader):
    base, _, adapter, x = adapted_pair("1d-pointwise")
    proto = _extra_reader(export_proto(base, x), kind)
    with pytest.raises(ToolchainError, match=f"also read by {reader}"):
        fuse_model(proto, adapter, PROV)


def test_wrong_base_is_refused_with_hashes():
    _, _, adapter, x = adapted_pair("1d-plain")
    other, _, _, _ = adapted_pair("1d-plain", seed=7)
    with pytest.raises(ToolchainError, match=r"not the base weight.*sha256"):
        fuse_model(export_proto(other, x), adapter, PROV)


def test_missing_layer_is_refused():
    base, _, adapter, x = adapted_pair("1d-plain")
    adapter.layers[0] = type(adapter.layers[0])(
        **{**adapter.layers[0].__dict__, "param": "nowhere.weight", "base_sha256": "0" * 64}
    )
    with pytest.raises(ToolchainError, match="no Conv weight in the model matches"):
        fuse_model(export_proto(base, x), adapter, PROV)


def test_already_fused_is_refused():
    base, _, adapter, x = adapted_pair("1d-plain")
    fused = fuse_model(export_proto(base, x), adapter, PROV)
    with pytest.raises(ToolchainError, match="already fused"):
        fuse_model(fused, adapter, PROV)


def test_fusion_is_deterministic():
    base, _, adapter, x = adapted_pair("2d-stride-dil")
    proto = export_proto(base, x)
    a = fuse_model(proto, adapter, PROV).SerializeToString()
    b = fuse_model(proto, adapter, PROV).SerializeToString()
    assert a == b


def test_extras_replace_head_and_new_class_count():
    from torch import nn

    from toolchain.adapters.adapter_file import ExtraRecord

    class WithHead(nn.Module):
        def __init__(self, k):
            super().__init__()
            self.conv = nn.Conv1d(6, 8, 3, padding=1)
            self.head = nn.Linear(8, k)

        def forward(self, x):
            return self.head(self.conv(x).mean(2))

    torch.manual_seed(0)
    base = WithHead(4).eval()
    x = torch.randn(1, 6, 32)
    _, _, adapter, _ = adapted_pair("1d-plain")
    adapter.layers.clear()
    adapter.tensors = {}
    new = WithHead(6).eval()
    new.conv.load_state_dict(base.conv.state_dict())
    for name in ("head.weight", "head.bias"):
        t = dict(new.named_parameters())[name].detach().numpy()
        adapter.extras.append(ExtraRecord(name, t.shape, None))
        adapter.tensors["extra:" + name] = t
    fused = fuse_model(export_proto(base, x), adapter, PROV)
    assert fused.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 6
    np.testing.assert_allclose(run(fused, x), new(x).detach().numpy(), rtol=1e-5, atol=1e-6)
