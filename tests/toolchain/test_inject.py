import pytest
import torch
from torch import nn

from toolchain.core.errors import ToolchainError
from toolchain.models.backbones import BACKBONES
from toolchain.peft.inject import AdaptConfig, adapter_layers, inject, select_layers, set_train_mode


class TinyConv2dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, groups=8, padding=1),
            nn.Conv2d(8, 16, 1),
        )
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ("all", ["features.0", "features.3", "features.4"]),
        ("pointwise", ["features.4"]),
        (r"features\.[03]$", ["features.0", "features.3"]),
        ("features", ["features.0", "features.3", "features.4"]),
    ],
)
def test_target_selection(targets, expected):
    assert select_layers(TinyConv2dNet(), targets) == expected


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ("head", "must be a Conv1d or Conv2d"),
        ("nomatch", "no conv layer matches"),
        ("(", "not a valid regular expression"),
        ("(a+)+$", "exponential time"),
        (".*.*.*.*x", "more than 3 repeats"),
    ],
)
def test_bad_targets(targets, message):
    with pytest.raises(ToolchainError, match=message):
        select_layers(TinyConv2dNet(), targets)


def test_inject_conv2d_model_freezes_all_but_delta_and_head():
    torch.manual_seed(0)
    model = TinyConv2dNet().eval()
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    names = inject(model, AdaptConfig(rank=4, train=("head",)))
    assert names == ["features.0", "features.3", "features.4"]
    assert torch.equal(model.eval()(x), before)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        "features.0.delta_g1",
        "features.3.delta_g1",
        "features.4.delta_g1",
        "head.bias",
        "head.weight",
    ]


def test_bn_stats_frozen_unless_asked():
    model = TinyConv2dNet()
    inject(model, AdaptConfig(rank=2))
    bn = model.features[1]
    mean = bn.running_mean.clone()
    set_train_mode(model, update_bn_stats=False)
    model(torch.randn(4, 3, 8, 8) + 3)
    assert torch.equal(bn.running_mean, mean)
    set_train_mode(model, update_bn_stats=True)
    model(torch.randn(4, 3, 8, 8) + 3)
    assert not torch.equal(bn.running_mean, mean)


@pytest.mark.parametrize(("name", "targets"), [("cnn1d", "all"), ("resnet1d", "all"), ("mobilenet1d", "pointwise")])
def test_backbones_inject_and_train_fraction(name, targets):
    model = BACKBONES[name]()
    layers = inject(model, AdaptConfig(rank=4, layers=targets))
    assert len(adapter_layers(model)) == len(layers) > 0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert 0 < trainable / total < 0.1  # depthwise-separable nets are small, so LoRA costs them more
    out = model(torch.randn(3, 6, 128))
    out.sum().backward()
    assert all(m.delta_g1.grad is not None for m in adapter_layers(model).values())


def test_mobilenet_pointwise_only_skips_depthwise():
    model = BACKBONES["mobilenet1d"]()
    inject(model, AdaptConfig(rank=4, layers="pointwise"))
    for m in adapter_layers(model).values():
        assert m.base.kernel_size == (1,) and m.base.groups == 1
