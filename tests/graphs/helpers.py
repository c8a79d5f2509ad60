"""Build base / unfused / fused ONNX models for a single-conv model from the geometry table."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from tests.geometries import make_conv
from toolchain.adapters.adapter_file import Adapter
from toolchain.export import ExportOptions, to_onnx
from toolchain.peft.inject import AdaptConfig, extract_adapter, inject


class OneConv(nn.Module):
    def __init__(self, conv: nn.Module, bn: bool = False) -> None:
        super().__init__()
        self.conv = conv
        self.bn = (
            (nn.BatchNorm1d if isinstance(conv, nn.Conv1d) else nn.BatchNorm2d)(conv.out_channels)
            if bn
            else nn.Identity()
        )

    def forward(self, x):
        return self.bn(self.conv(x))


def adapted_pair(
    geom_id: str, *, bn: bool = False, seed: int = 0
) -> tuple[nn.Module, nn.Module, Adapter, torch.Tensor]:
    """(base model, adapted model with non-zero ΔG1, its adapter, an input)."""
    conv, x, rank = make_conv(geom_id, seed)
    base = OneConv(conv, bn).eval()
    if bn:
        with torch.no_grad():
            base.bn.weight.uniform_(-2, 2)  # negative scales too
            base.bn.running_var.uniform_(0.5, 2)
            base.bn.running_mean.uniform_(-1, 1)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    adapted = OneConv(make_conv(geom_id, seed)[0], bn).eval()
    adapted.load_state_dict(state)
    cfg = AdaptConfig(rank=rank)
    inject(adapted, cfg)
    with torch.no_grad():
        adapted.conv.delta_g1.copy_(torch.randn_like(adapted.conv.delta_g1) * 0.5)
    return base, adapted.eval(), extract_adapter(adapted, state, cfg, {}), x


def export_proto(model: nn.Module, x: torch.Tensor, fold_bn: bool = False) -> onnx.ModelProto:
    """Export through the toolchain's exporter, whatever the input rank."""
    opts = ExportOptions(fold_bn=fold_bn, batch=x.shape[0])
    return to_onnx(model, tuple(x.shape[1:]), opts).proto


def run(proto: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def ops(proto: onnx.ModelProto) -> list[tuple[str, str]]:
    return [(n.name, n.op_type) for n in proto.graph.node]
