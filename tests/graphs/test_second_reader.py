"""A conv weight read by a second Conv outside its module (a functional conv on the same weight) is
refused by fuse, naming the reader; a module applied twice still fuses into one exact weight. Both
exporters record where each Conv came from (dynamo: name scopes; TorchScript: node names)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import toolchain.api as tc
from toolchain.export import ExportOptions, to_onnx
from toolchain.graphs.onnx_io import save_onnx


class Functional(nn.Module):
    """c2 as a module, and its weight once more through F.conv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.c1(x)
        return (self.c2(y) + F.conv2d(y, self.c2.weight, padding=1)).mean((2, 3))


class Twice(nn.Module):
    """c2 applied twice: both Convs are the adapted module."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(self.c2(self.c1(x))).mean((2, 3))


def _adapter(model: nn.Module, tmp_path, exporter: str):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    save_onnx(to_onnx(model.eval(), (3, 8, 8), ExportOptions(exporter=exporter)).proto, tmp_path / "base.onnx")
    adaptation = tc.adapt(model, method="lora-edge", rank=2, layers="c2")
    with torch.no_grad():
        for p in adaptation.parameters():  # a trained update: ΔG1 no longer zero
            p.normal_(0, 0.1)
    adaptation.save(tmp_path / "adapter.safetensors")
    return x, model


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_functional_second_reader_is_refused(tmp_path, exporter):
    _adapter(Functional(), tmp_path, exporter)
    with pytest.raises(tc.ToolchainError, match="also read by a Conv outside that module") as err:
        tc.fuse(tmp_path / "base.onnx", tmp_path / "adapter.safetensors", tmp_path / "fused.onnx")
    assert "c2" in str(err.value) and not (tmp_path / "fused.onnx").exists()


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_module_applied_twice_fuses_exactly(tmp_path, exporter):
    x, adapted = _adapter(Twice(), tmp_path, exporter)
    tc.fuse(tmp_path / "base.onnx", tmp_path / "adapter.safetensors", tmp_path / "fused.onnx")
    session = ort.InferenceSession(str(tmp_path / "fused.onnx"), providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(None, {"x": x[i : i + 1].numpy()})[0] for i in range(len(x))])
    with torch.no_grad():
        want = adapted.eval()(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
