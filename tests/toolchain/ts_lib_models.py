"""Small configurations of the time-series CNNs HAR users bring from tsai, braindecode and pytorch-tcn,
shared by tests/toolchain/test_ts_libs.py and scripts/check_ts_libs.py. Each entry: a factory (it
imports its library when called), the input's shape without the batch (channels, time), the class count.
Inputs are 6 channels (a waist IMU's accelerometer and gyroscope) by 128 samples, 6 classes."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
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
            "ShallowFBCSPNet",
            n_filters_time=8,
            n_filters_spat=8,
            filter_time_length=9,
            pool_time_length=16,
            pool_time_stride=4,
        ),
        "braindecode.Deep4Net": _braindecode(
            "Deep4Net",
            n_filters_time=8,
            n_filters_spat=8,
            filter_time_length=5,
            n_filters_2=8,
            filter_length_2=5,
            n_filters_3=8,
            filter_length_3=5,
            n_filters_4=8,
            filter_length_4=5,
            pool_time_length=2,
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


STAGES = ("adapt", "step0", "train", "save", "export", "fuse", "parity", "parser")


def through_every_stage(model: nn.Module, method: str, x: torch.Tensor, classes: int, work: Path) -> dict[str, Any]:
    """What a new user does with ``model`` through the Python API: adapt, step 0 exact, three training
    steps, save, export base and adapted, fuse, Polygraphy parity of fused vs unfused, TensorRT's parser.
    One row: each stage's verdict ("refused: ..." with the refusal's first line, "CRASH ..." with the
    exception and its last frame), the parity error (max |fused - unfused| over the outputs)."""
    import toolchain.api as tc
    from toolchain.core.errors import ToolchainError
    from toolchain.trt.check import check_model

    row: dict[str, Any] = {"method": method}
    y = torch.arange(len(x)) % classes
    stage = "adapt"
    try:
        with torch.no_grad():
            before = model(x[:2]).clone()
        adaptation = tc.adapt(model, method, rank=2)
        row["adapt"] = f"{len(adaptation.wrapped)} wrapped" if adaptation.wrapped else "ok"
        stage = "step0"
        with torch.no_grad():
            row["step0"] = "exact" if torch.equal(model(x[:2]), before) else "DIFFERS"
        stage = "train"
        opt = adaptation.optimizer()
        with adaptation.training():
            for _ in range(3):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        row["train"] = "ok"
        stage = "save"
        adaptation.save(work / "a.safetensors")
        row["save"] = "ok"
        stage = "export"
        tc.export_onnx(adaptation.base_model(), x[:1], work / "base.onnx")
        tc.export_onnx(model, x[:1], work / "unfused.onnx")
        row["export"] = "ok"
        stage = "fuse"
        tc.fuse(work / "base.onnx", work / "a.safetensors", work / "fused.onnx")
        row["fuse"] = "ok"
        stage = "parity"
        report = tc.verify(work / "fused.onnx", work / "unfused.onnx", work / "v", inputs=x.numpy())
        row["parity_error"] = max(o["max_abs"] for c in report["comparisons"].values() for o in c["outputs"].values())
        row["parity"] = "PASSED" if report["passed"] else "FAILED"
        stage = "parser"
        check = check_model(str(work / "fused.onnx"))
        row["parser"] = "parses" if check.buildable else f"REFUSED ({len(check.problems)} nodes)"
    except ToolchainError as e:
        row[stage] = "refused: " + str(e).splitlines()[0]
    except Exception as e:  # a traceback is a finding: report its last frame
        frame = traceback.extract_tb(e.__traceback__)[-1]
        where = f"{Path(frame.filename).name}:{frame.lineno}"
        row[stage] = f"CRASH {type(e).__name__}: {str(e).splitlines()[0][:160]} ({where})"
    return row


def run_case(name: str, method: str, work: Path) -> dict[str, Any]:
    """``through_every_stage`` on ``MODELS[name]`` built with seed 0, on 8 random inputs."""
    make, shape, classes = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(8, *shape)
    return {"model": name, **through_every_stage(model, method, x, classes, work)}
