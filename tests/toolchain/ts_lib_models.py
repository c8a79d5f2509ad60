"""Small configurations of the time-series CNNs HAR users bring from tsai, braindecode and pytorch-tcn,
shared by tests/toolchain/test_ts_libs.py and scripts/check_ts_libs.py. Each entry: a factory (it
imports its library when called), the input's shape without the batch (channels, time), the class count.
Inputs are 6 channels (a waist IMU's accelerometer and gyroscope) by 128 samples, 6 classes."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

C_IN, T, CLASSES = 6, 128, 6
SHAPE = (C_IN, T)


class TimePooled(nn.Module):
    """A sequence model (N, C, L) -> (N, C) by its mean over time, the classifier HAR users put on a TCN."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).mean(-1)


def _tsai(module: str, cls: str, **kw: object) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import importlib

        return getattr(importlib.import_module(f"tsai.models.{module}"), cls)(C_IN, CLASSES, **kw)

    return make


def _braindecode(cls: str, **kw: object) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import braindecode.models as bm

        return getattr(bm, cls)(n_chans=C_IN, n_outputs=CLASSES, n_times=T, **kw)

    return make


def _pytorch_tcn(**kw: object) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from pytorch_tcn import TCN

        return TimePooled(TCN(C_IN, [8, 8], kernel_size=3, output_projection=CLASSES, **kw))

    return make


Factory = tuple[Callable[[], nn.Module], tuple[int, ...], int]

MODELS: dict[str, Factory] = {
    name: (make, SHAPE, CLASSES)
    for name, make in {
        "tsai.InceptionTime": _tsai("InceptionTime", "InceptionTime", nf=8, ks=9),
        "tsai.InceptionTimePlus": _tsai("InceptionTimePlus", "InceptionTimePlus", nf=8, ks=9),
        "tsai.ResNet": _tsai("ResNet", "ResNet"),
        "tsai.ResNetPlus": _tsai("ResNetPlus", "ResNetPlus", nf=8),
        "tsai.XceptionTime": _tsai("XceptionTime", "XceptionTime", nf=4),
        "tsai.FCN": _tsai("FCN", "FCN", layers=[8, 16, 8]),
        "tsai.FCNPlus": _tsai("FCNPlus", "FCNPlus", layers=[8, 16, 8]),
        "tsai.ResCNN": _tsai("ResCNN", "ResCNN"),
        "tsai.OmniScaleCNN": _tsai("OmniScaleCNN", "OmniScaleCNN", seq_len=T, layers=[256, 2048]),
        "tsai.mWDN": _tsai("mWDN", "mWDN", seq_len=T, levels=2, nf=8, ks=9),
        "tsai.xresnet1d18": _tsai("XResNet1d", "xresnet1d18"),
        "tsai.TCN": _tsai("TCN", "TCN", layers=[8, 8], ks=3),
        "tsai.XCM": _tsai("XCM", "XCM", seq_len=T, nf=8),
        "braindecode.ShallowFBCSPNet": _braindecode(
            "ShallowFBCSPNet", n_filters_time=8, n_filters_spat=8, filter_time_length=9, pool_time_length=16,
            pool_time_stride=4,
        ),
        "braindecode.Deep4Net": _braindecode(
            "Deep4Net", n_filters_time=8, n_filters_spat=8, filter_time_length=5, n_filters_2=8, filter_length_2=5,
            n_filters_3=8, filter_length_3=5, n_filters_4=8, filter_length_4=5, pool_time_length=2,
            pool_time_stride=2,
        ),
        "braindecode.BDTCN": _braindecode("BDTCN", n_blocks=2, n_filters=8, kernel_size=3),
        "braindecode.EEGNet": _braindecode("EEGNet", kernel_length=16, depthwise_kernel_length=8),
        "braindecode.EEGInceptionERP": _braindecode("EEGInceptionERP", sfreq=64, n_filters=4),
        "braindecode.ATCNet": _braindecode("ATCNet", sfreq=64, conv_block_n_filters=8, n_windows=2),
        "pytorch-tcn.TCN-weight_norm": _pytorch_tcn(use_norm="weight_norm"),
        "pytorch-tcn.TCN-batch_norm": _pytorch_tcn(use_norm="batch_norm"),
        "pytorch-tcn.TCN-noncausal": _pytorch_tcn(use_norm="weight_norm", causal=False),
    }.items()
}
