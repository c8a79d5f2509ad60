"""CNNs nobody on the project wrote, through every stage: Hugging Face transformers vision CNNs and timm
edge CNNs from config (no weights from a hub; skipped where transformers or timm does not import: timm
needs torchvision, which the CPU torch 2.13.0 here cannot import, so they run in
scripts/check_torch_compat.sh's torch 2.14.1 + torchvision venv), conv subclasses the
wrapper cannot follow (refused), modules whose loaders need state-dict metadata, builders that only
take **kwargs. Step 0 equals the original exactly, lean gradients equal the reference path's in
float64, the export is checked against PyTorch, fusion is exact (Polygraphy)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import toolchain.api as tc
from tests.toolchain.test_lean import _assert_same, _grads
from toolchain.cli import main
from toolchain.core.errors import ToolchainError


def _hf(name: str) -> nn.Module:
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    if (
        name == "mobilenet_v2_tf_padding"
    ):  # reads its conv's stride/kernel_size/dilation at run time (TF "same" padding)
        config = transformers.MobileNetV2Config(num_labels=10, image_size=32, depth_multiplier=0.35, tf_padding=True)
        model = transformers.MobileNetV2ForImageClassification(config)
    elif name == "resnet":
        config = transformers.ResNetConfig(
            num_labels=10, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic"
        )
        model = transformers.ResNetForImageClassification(config)
    else:
        config = transformers.ConvNextConfig(
            num_labels=10, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], image_size=32
        )
        model = transformers.ConvNextForImageClassification(config)

    class Logits(nn.Module):  # the toolchain's models return a tensor
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(pixel_values=x).logits

    return Logits(model).eval()


@pytest.mark.parametrize("name", ["mobilenet_v2_tf_padding", "resnet", "convnext"])
def test_hugging_face_cnns_through_every_stage(name, tmp_path):
    torch.manual_seed(0)
    _through_every_stage(_hf(name), "lora-edge", tmp_path, torch.rand(16, 3, 32, 32))


TIMM = [  # (model, what it exercises)
    ("tf_mobilenetv3_small_minimal_100", "timm's Conv2dSame: TF 'SAME' padding computed in its own forward"),
    ("tf_efficientnet_lite0", "Conv2dSame on depthwise convs"),
    ("mobilenetv3_small_050", "plain convs, hard-swish, squeeze-excite"),
    ("lcnet_050", "PP-LCNet: depthwise separable"),
    ("resnet10t", "ResNet with a tiered stem"),
]


def _timm(name: str) -> nn.Module:
    timm = pytest.importorskip("timm", reason="timm (which needs torchvision) does not import here")
    return timm.create_model(name, pretrained=False, num_classes=10).eval()


def _through_every_stage(model: nn.Module, method: str, tmp_path, x: torch.Tensor) -> None:
    y = torch.arange(len(x)) % 10
    with torch.no_grad():
        before = model(x[:2]).clone()
    adaptation = tc.adapt(model, method, rank=2)
    with torch.no_grad():
        assert torch.equal(model(x[:2]), before), "step 0 is the original model exactly"
    with torch.no_grad():
        for p in adaptation.parameters():
            p.normal_(0, 0.05)
    ref, lean = _grads(model.double(), x[:2].double(), lean=False), _grads(model.double(), x[:2].double(), lean=True)
    _assert_same(ref, lean)
    model.float()
    opt = adaptation.optimizer()
    with adaptation.training():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    adaptation.save(tmp_path / "a.safetensors")
    tc.export_onnx(adaptation.base_model(), x[:1], tmp_path / "base.onnx")
    tc.export_onnx(model, x[:1], tmp_path / "unfused.onnx")
    tc.fuse(tmp_path / "base.onnx", tmp_path / "a.safetensors", tmp_path / "fused.onnx")
    assert tc.verify(tmp_path / "fused.onnx", tmp_path / "unfused.onnx", tmp_path / "v", inputs=x.numpy())["passed"]


@pytest.mark.parametrize("method", ["lora-edge", "lora"])
@pytest.mark.parametrize("name", [n for n, _ in TIMM])
def test_timm_cnns_through_every_stage(name, method, tmp_path):
    torch.manual_seed(0)
    _through_every_stage(_timm(name), method, tmp_path, torch.rand(8, 3, 64, 64))


def test_timm_weight_standardised_convs_are_refused_by_class():
    model = _timm("nf_resnet26")
    with pytest.raises(ToolchainError, match="ScaledStdConv2d"):
        tc.adapt(model, "lora-edge", rank=2)


class SameConv2d(nn.Conv2d):
    """timm's Conv2dSame in miniature: pads dynamically in its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """timm's ScaledStdConv2d in miniature: standardises its weight in _conv_forward."""

    def _conv_forward(self, x, weight, bias):
        w = (weight - weight.mean(dim=(1, 2, 3), keepdim=True)) / (weight.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return super()._conv_forward(x, w, bias)


@pytest.mark.parametrize(
    "conv", [SameConv2d(3, 4, 3, stride=2), StdConv2d(3, 4, 3)], ids=["dynamic-same-padding", "weight-standardisation"]
)
def test_a_conv_subclass_with_its_own_forward_is_refused_by_class(conv):
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(4, 4, 1))
    with pytest.raises(ToolchainError, match=type(conv).__name__):
        tc.adapt(model, "lora-edge", rank=2)
    adaptation = tc.adapt(model, "lora-edge", rank=2, layers=r"^2$")  # the plain conv alone is fine
    assert adaptation.wrapped == ["2"]


class TfSameConv2d(nn.Conv2d):
    """timm's Conv2dSame, written out: TF "SAME" padding from the input size, then a padding-0 conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        ph, pw = (
            max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
            for n, k, s, d in zip((ih, iw), self.kernel_size, self.stride, self.dilation, strict=True)
        )
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


@pytest.mark.parametrize("method", ["lora-edge", "lora", "dora"])
def test_a_pre_padding_conv_subclass_is_followed_exactly(method, tmp_path, monkeypatch):
    """The mechanism timm's Conv2dSame goes through (``PRE_PADS``), on odd sizes and strides 2 and 1."""
    from toolchain.peft import lora_edge

    monkeypatch.setitem(lora_edge.PRE_PADS, lora_edge.class_path(TfSameConv2d(1, 1, 1)), lora_edge._tf_same_pad)
    torch.manual_seed(0)
    model = nn.Sequential(
        TfSameConv2d(3, 8, 3, stride=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        TfSameConv2d(8, 8, 5, groups=8),
        nn.ReLU(),
        nn.Conv2d(8, 10, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).eval()
    _through_every_stage(model, method, tmp_path, torch.rand(8, 3, 33, 31))
    assert TfSameConv2d(3, 8, 3, stride=2, padding=1).padding == (1, 1)  # own padding too: refused below
    with pytest.raises(ToolchainError, match="TfSameConv2d"):
        tc.adapt(nn.Sequential(TfSameConv2d(3, 8, 3, stride=2, padding=1)), "lora-edge", rank=2)


class Versioned(nn.Module):
    """Like torchvision's MNASNet: its loader needs the state dict's version metadata."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        if local_metadata.get("version") is None:
            raise ValueError("version should be set to 1 or 2 instead of None")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


def test_base_model_keeps_state_dict_metadata():
    model = Versioned()
    original = copy.deepcopy(model)
    adaptation = tc.adapt(model, "lora-edge", rank=2)
    with torch.no_grad():
        for p in adaptation.parameters():
            p.normal_()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(adaptation.base_model()(x), original(x), rtol=0, atol=0)


def test_wrapped_conv_answers_conv_attributes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1, groups=1))
    tc.adapt(model, "lora", rank=2)
    wrapped = model[0]
    assert (
        wrapped.stride,
        wrapped.padding,
        wrapped.kernel_size,
        wrapped.in_channels,
        wrapped.out_channels,
        wrapped.groups,
    ) == ((2, 2), (1, 1), (3, 3), 3, 4, 1)
    assert wrapped.weight is wrapped.base.weight and wrapped.padding_mode == "zeros"


BUILDER = """
from torch import nn

class Net(nn.Module):
    def __init__(self, num_classes=1000, width=8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))

def build(**kwargs):  # like torchvision's and timm's builders: everything through **kwargs
    return Net(**{k: v for k, v in kwargs.items() if k != "weights"})

def fixed():  # takes nothing: a 3-channel, 1000-class model
    return Net()
"""


@pytest.mark.parametrize("callable_name", ["build", "fixed"])
def test_a_kwargs_builder_from_the_cli_is_fitted_to_the_data(tmp_path, capsys, callable_name):
    (tmp_path / "zoo.py").write_text(BUILDER)
    out = tmp_path / "m.pt"
    assert (
        main(
            [
                "pretrain",
                "--model",
                f"{tmp_path / 'zoo.py'}:{callable_name}",
                "--data",
                "digits",
                "--epochs",
                "1",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "filters summed over the colour channels" in err  # 3-channel first conv on 1-channel digits
    if callable_name == "fixed":
        assert "classifier 1000 -> 10 outputs" in err
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(out),
                "--model",
                f"{tmp_path / 'zoo.py'}:{callable_name}",
                "-o",
                str(tmp_path / "m.onnx"),
            ]
        )
        == 0
    )


def test_a_first_conv_that_cannot_be_fitted_is_refused(tmp_path, capsys):
    (tmp_path / "zoo.py").write_text(BUILDER)
    assert (
        main(
            ["pretrain", "--model", f"{tmp_path / 'zoo.py'}:fixed", "--data", "watch", "--out", str(tmp_path / "m.pt")]
        )
        == 2
    )
    assert "first conv takes 3 channels; the data has 6" in capsys.readouterr().err
