"""The pipeline on torchvision's CNNs (skipped where torchvision does not import, as with the CPU wheel
of torch 2.13.0; `scripts/check_torch_compat.sh` runs the suite on torch 2.14.1 with torchvision).

For each model: adapt with LoRA-Edge, train a few steps on real images (scikit-learn's digits,
3-channel, 32x32), save; export base and unfused (each checked against PyTorch by the export itself);
fuse torch-free; fused = unfused in ONNX Runtime (Polygraphy), and step 0 equal to the original model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import toolchain.api as tc

tv = pytest.importorskip("torchvision.models", reason="torchvision does not import with this torch")

MODELS = ["mobilenet_v3_small", "resnet18", "squeezenet1_1", "shufflenet_v2_x0_5", "efficientnet_b0"]


def _digits(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images[:n].astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(32, 32), mode="bilinear").repeat(1, 3, 1, 1)
    return x, torch.from_numpy(d.target[:n]).long()


@pytest.mark.parametrize("name", MODELS)
def test_torchvision_pipeline(name, tmp_path):
    torch.manual_seed(0)
    model = getattr(tv, name)(weights=None, num_classes=10).eval()
    x, y = _digits()
    with torch.no_grad():
        before = model(x[:4]).clone()
    adaptation = tc.adapt(model, "lora-edge", rank=2)
    with torch.no_grad():
        assert torch.equal(model(x[:4]), before)  # step 0 is the base model exactly
    opt = adaptation.optimizer()
    with adaptation.training():
        for i in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x[i * 16 : (i + 1) * 16]), y[i * 16 : (i + 1) * 16]).backward()
            opt.step()
    model.eval()
    adaptation.save(tmp_path / "a.safetensors")
    tc.export_onnx(adaptation.base_model(), x[:1], tmp_path / "base.onnx", check_inputs=x.numpy())
    tc.export_onnx(model, x[:1], tmp_path / "unfused.onnx", check_inputs=x.numpy())
    tc.fuse(tmp_path / "base.onnx", tmp_path / "a.safetensors", tmp_path / "fused.onnx")
    report = tc.verify(tmp_path / "fused.onnx", tmp_path / "unfused.onnx", tmp_path / "v", inputs=x.numpy())
    assert report["passed"], report["comparisons"]
