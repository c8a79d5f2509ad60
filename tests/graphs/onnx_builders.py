"""Build base and unfused LoRA-Edge ONNX graphs directly with onnx.helper: an independent reference
for the fuse pass that does not go through the PyTorch exporter (fast enough for property tests)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from toolchain.adapters.adapter_file import Adapter, ConvGeometry, LayerRecord
from toolchain.kernels import suffix_kernel, tt_svd, weight_sha256


def conv_attrs(g: ConvGeometry) -> dict:
    pads = list(g.padding) * 2 if not isinstance(g.padding, str) else None
    return {
        "strides": list(g.stride),
        "dilations": list(g.dilation),
        "group": g.groups,
        "pads": pads,
        "kernel_shape": list(g.kernel_size),
    }


def build_pair(
    g: ConvGeometry, w: np.ndarray, bias: np.ndarray | None, rank: int, delta_scale: float, seed: int
) -> tuple[onnx.ModelProto, onnx.ModelProto, Adapter]:
    """(base model, unfused model with the auxiliary path as nodes, adapter) for one conv."""
    cores = tt_svd(w, rank)
    r1 = cores[0].shape[2]
    dg1 = (np.random.default_rng(seed).standard_normal((g.out_channels, r1)) * delta_scale).astype(np.float32)
    rec = LayerRecord("conv", "conv.weight", "lora-edge", g, (1, *(c.shape[2] for c in cores)), 1.0, weight_sha256(w))
    adapter = Adapter("lora-edge", [rec], [], dict(zip(rec.tensor_names(), [dg1, *cores[1:]], strict=True)), {})
    suffix = suffix_kernel(cores[1:])
    rep = np.tile(suffix, (g.groups,) + (1,) * (suffix.ndim - 1))
    up = dg1.reshape(g.out_channels, r1, *([1] * len(g.kernel_size)))
    attrs = {k: v for k, v in conv_attrs(g).items() if v is not None}
    base_inputs = ["x", "conv.weight"] + (["conv.bias"] if bias is not None else [])
    inits = [numpy_helper.from_array(w, "conv.weight")] + (
        [numpy_helper.from_array(bias, "conv.bias")] if bias is not None else []
    )
    spatial = [16] * len(g.kernel_size)
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, g.in_channels, *spatial])
    out_sp = [
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, p, d, k, s in zip(spatial, g.padding, g.dilation, g.kernel_size, g.stride, strict=True)
    ]
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, g.out_channels, *out_sp])

    def model(nodes: list, extra_inits: list) -> onnx.ModelProto:
        m = helper.make_model(
            helper.make_graph(nodes, "g", [x_info], [y_info], inits + extra_inits),
            opset_imports=[helper.make_opsetid("", 18)],
        )
        m.ir_version = 10
        return m

    base = model([helper.make_node("Conv", base_inputs, ["y"], name="conv", **attrs)], [])
    up_attrs = {"group": g.groups}
    unfused = model(
        [
            helper.make_node("Conv", base_inputs, ["main"], name="conv", **attrs),
            helper.make_node("Conv", ["x", "suffix"], ["h"], name="aux_down", **attrs),
            helper.make_node("Conv", ["h", "up"], ["aux"], name="aux_up", **up_attrs),
            helper.make_node("Add", ["main", "aux"], ["y"], name="add"),
        ],
        [numpy_helper.from_array(rep.astype(np.float32), "suffix"), numpy_helper.from_array(up, "up")],
    )
    return base, unfused, adapter
