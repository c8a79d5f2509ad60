"""The Python API on a user's own nn.Module in the user's own training loop."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import toolchain.api as tc


class UserNet(nn.Module):
    """Not a toolchain model: a plain module the user already has."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
        )
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    return torch.randn(n, 1, 12, 12, generator=g) + y.view(-1, 1, 1, 1).float(), y


@pytest.mark.parametrize("method", ["lora-edge", "lora", "dora", "bitfit", "full"])
def test_adapt_train_save_fuse_verify(tmp_path, method):
    torch.manual_seed(0)
    model = UserNet().eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    adaptation = tc.adapt(model, method=method, rank=2, scaling=0.5)
    opt = adaptation.optimizer()
    x, y = _data()
    with adaptation.training():
        for i in range(0, 64, 16):
            opt.zero_grad()
            F.cross_entropy(model(x[i : i + 16]), y[i : i + 16]).backward()
            opt.step()
    assert not model.training
    base = adaptation.base_model()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in original.items()), (
        "base_model() is the model before adapt"
    )
    adaptation.save(tmp_path / "a.safetensors")
    example = x[:1]
    tc.export_onnx(base, example, tmp_path / "base.onnx")
    tc.export_onnx(model, example, tmp_path / "unfused.onnx")
    tc.fuse(tmp_path / "base.onnx", tmp_path / "a.safetensors", tmp_path / "fused.onnx")
    report = tc.verify(
        tmp_path / "fused.onnx", tmp_path / "unfused.onnx", tmp_path / "v", inputs=x.numpy(), real=8, random=2
    )
    assert report["passed"] and report["real_batches"] == 8
    assert tc.load_adapter(tmp_path / "a.safetensors").method == method
    with pytest.raises(tc.ToolchainError, match="pass --force"):
        adaptation.save(tmp_path / "a.safetensors")


def test_lean_training_in_the_api_matches_the_reference_path():
    results = []
    for lean in (False, True):
        torch.manual_seed(0)
        model = UserNet().eval()
        adaptation = tc.adapt(model, method="lora-edge", rank=2, train=("head",))
        opt = adaptation.optimizer()
        x, y = _data()
        with adaptation.training(lean=lean):
            for i in range(0, 64, 16):
                opt.zero_grad()
                F.cross_entropy(model(x[i : i + 16]), y[i : i + 16]).backward()
                opt.step()
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for k in results[0]:
        np.testing.assert_allclose(results[1][k].numpy(), results[0][k].numpy(), rtol=1e-4, atol=1e-6)


def test_api_refuses_an_unknown_method():
    with pytest.raises(tc.ToolchainError, match="unknown adaptation method"):
        tc.adapt(UserNet(), method="lorax")


def test_api_module_is_typed():
    import importlib.resources

    assert importlib.resources.files("toolchain").joinpath("py.typed").is_file()
    assert onnx is not None


def _small():
    return torch.nn.Sequential(
        torch.nn.Conv1d(2, 4, 3, padding=1),
        torch.nn.BatchNorm1d(4),
        torch.nn.Dropout(0.5),
        torch.nn.AdaptiveAvgPool1d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    )


def test_export_onnx_gives_the_module_back_in_the_mode_it_came(tmp_path):
    model = _small().train()
    model[1].eval()  # a user's own mix: BN frozen, the rest training
    params = list(model.parameters())
    tc.export_onnx(model, torch.randn(1, 2, 16), tmp_path / "m.onnx")
    assert model.training and model[2].training and not model[1].training
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))  # an optimizer's tensors


def test_export_onnx_refuses_an_empty_batch(tmp_path):
    with pytest.raises(tc.ToolchainError, match="at least one input"):
        tc.export_onnx(_small(), torch.randn(0, 2, 16), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_adapt_refuses_weights_that_are_not_float32(dtype):
    with pytest.raises(tc.ToolchainError, match="adaptation needs float32 weights"):
        tc.adapt(_small().to(dtype))


def test_adapt_refuses_a_meta_model():
    with torch.device("meta"):
        model = _small()
    with pytest.raises(tc.ToolchainError, match="not materialised"):
        tc.adapt(model)
