"""Every export is checked against the PyTorch module: a wrong translation is refused, a failing
exporter falls back and says so, the numbers land in the report and in metadata_props."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

import toolchain.api as tc
from tests.toolchain import custom_ops
from toolchain.cli import main
from toolchain.core.errors import ToolchainError
from toolchain.export import ExportOptions, to_onnx


def test_a_wrong_translation_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(ToolchainError, match="no exporter wrote an ONNX model that matches") as err:
        tc.export_onnx(custom_ops.Net("twice_wrong"), torch.randn(1, 2, 16), tmp_path / "m.onnx")
    assert "torchscript exporter: output logits differs from PyTorch" in str(
        err.value
    ) and "dynamo exporter failed" in str(err.value)
    assert not (tmp_path / "m.onnx").exists()


def test_the_cli_refuses_a_wrong_export_in_one_line(tmp_path, capsys):
    ck = tmp_path / "wrong.pt"
    torch.save(custom_ops.wrong().state_dict(), ck)
    model = f"{custom_ops.__file__}:wrong"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(ck),
                "--model",
                model,
                "--input-shape",
                "2,16",
                "-o",
                str(tmp_path / "m.onnx"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        "differs from PyTorch by" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "m.onnx").exists()
    )


def test_a_failing_exporter_falls_back_and_says_so():
    exported = to_onnx(custom_ops.Net("twice_right"), (2, 16), ExportOptions())
    assert exported.check.exporter == "torchscript" and exported.check.passed
    assert (
        len(exported.notes) == 1
        and "dynamo exporter failed" in exported.notes[0]
        and "used the torchscript exporter" in exported.notes[0]
    )


def test_a_chosen_exporter_does_not_fall_back():
    with pytest.raises(ToolchainError, match="dynamo exporter failed"):
        to_onnx(custom_ops.Net("twice_right"), (2, 16), ExportOptions(exporter="dynamo"))
    with pytest.raises(ToolchainError, match="--fold-bn needs the dynamo exporter"):
        to_onnx(custom_ops.Net("twice_right"), (2, 16), ExportOptions(exporter="torchscript", fold_bn=True))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    d = tmp_path_factory.mktemp("xc")
    assert main(["pretrain", "--out", str(d / "b.pt"), "--epochs", "1", "--no-progress"]) == 0
    assert (
        main(
            [
                "finetune",
                "--checkpoint",
                str(d / "b.pt"),
                "--out",
                str(d / "a.safetensors"),
                "--steps",
                "10",
                "--no-progress",
            ]
        )
        == 0
    )
    return d


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_both_exporters_write_models_tensorrt_and_fusion_accept(pipeline, tmp_path, capsys, exporter):
    d = pipeline
    base, fused = tmp_path / "base.onnx", tmp_path / "fused.onnx"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(d / "b.pt"),
                "--exporter",
                exporter,
                "--check-data",
                "watch",
                "-o",
                str(base),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"({exporter} exporter, 8 real + 4 random inputs)" in out
    meta = {p.key: p.value for p in onnx.load(base).metadata_props}
    check = json.loads(meta["toolchain.export_check"])
    assert check["passed"] and check["exporter"] == exporter and check["max_abs"]["logits"] <= check["bound"]["logits"]
    assert check["atol"] == 1e-4 and check["real_inputs"] == 8
    assert main(["fuse", str(base), str(d / "a.safetensors"), "-o", str(fused)]) == 0  # conv weights keep their names


def test_the_fused_export_is_checked_against_the_adapted_module(pipeline, tmp_path, monkeypatch, capsys):
    d = pipeline
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(d / "b.pt"),
                "--adapter",
                str(d / "a.safetensors"),
                "--fuse",
                "-o",
                str(tmp_path / "f.onnx"),
            ]
        )
        == 0
    )
    real_fuse = __import__("toolchain.graphs.fuse", fromlist=["fuse_model"]).fuse_model

    def wrong_fuse(proto, adapter, prov):  # a fusion bug: ΔW added twice
        once = real_fuse(proto, adapter, prov)
        for t_once, t_base in zip(once.graph.initializer, proto.graph.initializer, strict=True):
            a, b = onnx.numpy_helper.to_array(t_once), onnx.numpy_helper.to_array(t_base)
            if a.shape == b.shape and a.dtype == b.dtype and not (a == b).all():
                t_once.CopyFrom(onnx.numpy_helper.from_array(2 * a - b, t_once.name))
        return once

    monkeypatch.setattr("toolchain.graphs.fuse.fuse_model", wrong_fuse)
    capsys.readouterr()
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(d / "b.pt"),
                "--adapter",
                str(d / "a.safetensors"),
                "--fuse",
                "-o",
                str(tmp_path / "g.onnx"),
            ]
        )
        == 2
    )
    assert "the fused ONNX model differs from the adapted PyTorch module" in capsys.readouterr().err
    assert not (tmp_path / "g.onnx").exists()


INF, NAN = float("inf"), float("nan")
NON_FINITE_CASES = {
    # name: (onnx output, torch output, passes)
    "equal finite": ([1.0, 2.0], [1.0, 2.0], True),
    "a masked -inf logit on both, the rest off by 1": ([-INF, 2.0, 4.0], [-INF, 1.0, 3.0], False),
    "a masked -inf logit on both, the rest equal": ([-INF, 2.0, 4.0], [-INF, 2.0, 4.0], True),
    "NaN in torch, finite in ONNX": ([0.5, 1.0], [NAN, 1.0], False),
    "finite in torch, NaN in ONNX": ([NAN, 1.0], [0.5, 1.0], False),
    "NaN on both at the same place": ([NAN, 1.0], [NAN, 1.0], True),
    "NaN on both at other places": ([NAN, 1.0], [1.0, NAN], False),
    "infinities of opposite sign": ([INF, 1.0], [-INF, 1.0], False),
    "inf in ONNX only": ([INF, 1.0], [3.0, 1.0], False),
}


@pytest.mark.parametrize("case", list(NON_FINITE_CASES))
def test_non_finite_outputs_must_match_exactly_and_cannot_widen_the_bound(case):
    import numpy as np

    from toolchain.export_check import EXPORT_ATOL, EXPORT_RTOL, output_error

    got, ref, passes = NON_FINITE_CASES[case]
    error, peak = output_error(np.asarray(got, np.float32), np.asarray(ref, np.float32))
    assert np.isfinite(peak)  # the bound comes from the finite values alone
    assert (error <= EXPORT_ATOL + EXPORT_RTOL * peak) is passes


class _MaskedLogit(torch.nn.Module):
    """Logits with class 0 masked to -inf; ``offset`` shifts the others in the ONNX graph only."""

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(2, 3, 3, padding=1)
        self.offset = offset

    def forward(self, x):
        y = self.conv(x).mean(-1)
        mask = torch.tensor([-float("inf"), 0.0, 0.0])
        if torch.onnx.is_in_onnx_export():
            y = y + self.offset
        return y + mask


def test_a_masked_logit_does_not_hide_an_export_that_is_off_elsewhere(tmp_path):
    ok = to_onnx(_MaskedLogit(0.0), (2, 16), ExportOptions(exporter="torchscript"))
    assert ok.check.passed and ok.check.max_abs["logits"] < 1e-5
    with pytest.raises(ToolchainError, match="differs from PyTorch"):
        to_onnx(_MaskedLogit(1.0), (2, 16), ExportOptions(exporter="torchscript"))
