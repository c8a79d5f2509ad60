"""Built-in backbones: 1-D HAR nets for (batch, channels, time) windows (cnn1d, resnet1d,
mobilenet1d) and 2-D image nets sized for 32x32 input (resnet18, mobilenetv2)."""

from __future__ import annotations

from torch import Tensor, nn


def _conv_bn(
    cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv1d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm1d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class CNN1D(nn.Module):
    """A plain 1D CNN: three Conv-BN-ReLU blocks with pooling, global average pool, linear head."""

    def __init__(self, in_channels: int = 6, num_classes: int = 6, width: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(in_channels, width, 7),
            nn.MaxPool1d(2),
            _conv_bn(width, width * 2, 5),
            nn.MaxPool1d(2),
            _conv_bn(width * 2, width * 2, 3),
        )
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(width * 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


class ResBlock1D(nn.Module):
    """T-ResNet block (Wang et al., 2017): convs with kernels 7, 5, 3 (odd, for symmetric padding)
    and a 1x1 shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 7)
        self.conv2 = _conv_bn(cout, cout, 5)
        self.conv3 = _conv_bn(cout, cout, 3, act=None)
        self.shortcut = _conv_bn(cin, cout, 1, act=None) if cin != cout else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


class ResNet1D(nn.Module):
    """1D ResNet in the T-ResNet style: three residual blocks (64, 128, 128 channels)."""

    def __init__(
        self, in_channels: int = 6, num_classes: int = 6, widths: tuple[int, int, int] = (64, 128, 128)
    ) -> None:
        super().__init__()
        chans = [in_channels, *widths]
        self.blocks = nn.Sequential(*[ResBlock1D(chans[i], chans[i + 1]) for i in range(len(widths))])
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.blocks(x)).flatten(1))


class InvertedResidual1D(nn.Module):
    """MobileNetV2 block: 1x1 expand (``act``), depthwise k3 (``act``), 1x1 linear projection, residual
    when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, act: type[nn.Module] = nn.ReLU6) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.expand = _conv_bn(cin, hidden, 1, act=act)
        self.depthwise = _conv_bn(hidden, hidden, 3, stride=stride, groups=hidden, act=act)
        self.project = _conv_bn(hidden, cout, 1, act=None)

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.use_res else y


class MobileNet1D(nn.Module):
    """A 1D MobileNetV2 (Sandler et al., 2018): inverted residuals with ReLU6 after the stem, every
    expansion, every depthwise conv and the last 1x1 conv, linear projections. ReLU6 bounds each
    activation, so its per-tensor INT8 scale is at most 6/127 (docs/INT8.md: the INT8 model agrees with
    the FP32 one on more target windows than with ReLU)."""

    SETTINGS = ((16, 1, 1), (24, 2, 4), (24, 1, 4), (32, 2, 4), (32, 1, 4), (64, 2, 4), (64, 1, 4))
    ACT: type[nn.Module] = nn.ReLU6

    def __init__(self, in_channels: int = 6, num_classes: int = 6, stem: int = 16, last: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(in_channels, stem, 3, act=self.ACT)]
        cin = stem
        for cout, stride, expand in self.SETTINGS:
            layers.append(InvertedResidual1D(cin, cout, stride, expand, act=self.ACT))
            cin = cout
        layers.append(_conv_bn(cin, last, 1, act=self.ACT))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(last, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


class MobileNet1DReLU(MobileNet1D):
    """``mobilenet1d`` as it was before backbone revision 2: ReLU where MobileNetV2 has ReLU6. The
    weights are laid out the same, so a checkpoint records the revision it was trained with and one
    without it (written before the change) is loaded as this net."""

    ACT = nn.ReLU


def _conv_bn2d(
    cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: nn.Module | None = None
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


class BasicBlock2D(nn.Module):
    """ResNet basic block: two 3x3 convs and a (1x1, strided) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn2d(cin, cout, 3, stride, act=nn.ReLU())
        self.conv2 = _conv_bn2d(cout, cout, 3)
        self.shortcut = _conv_bn2d(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18's layout (4 stages x 2 basic blocks) for 32x32 images: a 3x3 stem without pooling,
    as in the CIFAR variants; ``width`` 64 is the original, 16 (the default) fits a CPU or an Orin Nano."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.stem = _conv_bn2d(in_channels, width, 3, act=nn.ReLU())
        blocks, cin = [], width
        for i, w in enumerate(widths):
            blocks += [BasicBlock2D(cin, w, 1 if i == 0 else 2), BasicBlock2D(w, w, 1)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.blocks(self.stem(x))).flatten(1))


class InvertedResidual2D(nn.Module):
    """MobileNetV2 block: 1x1 expand (ReLU6), 3x3 depthwise (ReLU6), 1x1 linear projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = [_conv_bn2d(cin, hidden, 1, act=nn.ReLU6())] if expand != 1 else []
        layers += [_conv_bn2d(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6()), _conv_bn2d(hidden, cout, 1)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return x + y if self.use_res else y


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al., 2018) for 32x32 images: stride-1 stem, a shortened block table
    (expansion, channels, repeats, stride) and width multiplier ``width``."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 2, 2), (6, 64, 2, 2), (6, 96, 1, 1))

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0, last: int = 256) -> None:
        super().__init__()
        stem = max(8, int(32 * width))
        layers: list[nn.Module] = [_conv_bn2d(in_channels, stem, 3, act=nn.ReLU6())]
        cin = stem
        for t, c, n, s in self.SETTINGS:
            cout = max(8, int(c * width))
            for i in range(n):
                layers.append(InvertedResidual2D(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(_conv_bn2d(cin, last, 1, act=nn.ReLU6()))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(last, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


BACKBONES: dict[str, type[nn.Module]] = {
    "cnn1d": CNN1D,
    "resnet1d": ResNet1D,
    "mobilenet1d": MobileNet1D,
    "resnet18": ResNet18,
    "mobilenetv2": MobileNetV2,
}
SPATIAL_DIMS = {"cnn1d": 1, "resnet1d": 1, "mobilenet1d": 1, "resnet18": 2, "mobilenetv2": 2}
# Built-in nets whose layers changed while their weights kept their names and shapes: the revision a
# checkpoint records, and the net that an older revision of the name still builds.
REVISIONS = {"mobilenet1d": 2}
LEGACY: dict[tuple[str, int], str] = {("mobilenet1d", 1): "mobilenet1d-relu"}
LEGACY_BACKBONES: dict[str, type[nn.Module]] = {"mobilenet1d-relu": MobileNet1DReLU}
