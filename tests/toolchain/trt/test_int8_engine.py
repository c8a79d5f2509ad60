"""INT8 engines: build --int8 from a QDQ model (explicit quantization, no calibrator), no refit of INT8
engines, and TensorRT's own parser on the quantized models."""

from __future__ import annotations

import pytest

from toolchain.cli import main
from toolchain.trt.record import read_record


@pytest.fixture(scope="module")
def int8_models(trt_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("int8_models")
    m = {"base8": d / "base.int8.onnx", "fused8": d / "fused.int8.onnx"}
    assert main(["quantize", str(trt_models["base"]), "-o", str(m["base8"]), "--calibration-batches", "32"]) == 0
    assert main(["fuse", str(m["base8"]), str(trt_models["dir"] / "le1.safetensors"), "-o", str(m["fused8"])]) == 0
    return {**trt_models, **m}


def test_build_int8_sets_the_int8_flag_and_checks_the_engine(fake_trt, int8_models, tmp_path, capsys):
    plan = tmp_path / "m.plan"
    assert main(["build", str(int8_models["fused8"]), "-o", str(plan), "--int8", "--fp16"]) == 0
    record = read_record(plan)
    assert record.precision == "int8" and record.refit_mode == "none"
    assert fake_trt.BUILDS[-1]["flags"] == ["FP16", "INT8"]
    assert record.engine_check["passed"] and record.engine_check["tolerance"] == 0.1
    assert "int8" in capsys.readouterr().out


@pytest.mark.parametrize(
    "model, extra, message",
    [
        ("fused8", [], "pass --int8"),
        ("fused_le1", ["--int8"], "has none"),
        ("fused8", ["--int8", "--refit"], "rebuilt per adapter"),
    ],
)
def test_int8_build_refusals(fake_trt, int8_models, tmp_path, capsys, model, extra, message):
    plan = tmp_path / "m.plan"
    assert main(["build", str(int8_models[model]), "-o", str(plan), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not plan.exists() and not fake_trt.BUILDS


def test_an_int8_engine_is_not_refitted(fake_trt, int8_models, tmp_path, capsys):
    plan, out = tmp_path / "m.plan", tmp_path / "r.plan"
    assert main(["build", str(int8_models["fused8"]), "-o", str(plan), "--int8"]) == 0
    assert main(["refit", str(plan), str(int8_models["fused8"]), "-o", str(out)]) == 2
    assert "rebuilt per adapter" in capsys.readouterr().err and not out.exists()


def _parser():
    try:
        from toolchain.trt.runtime import parser_tensorrt

        return parser_tensorrt()
    except Exception:
        return None


@pytest.mark.skipif(_parser() is None, reason="no TensorRT parser importable (pip install '.[trt-check]')")
@pytest.mark.parametrize("model", ["base8", "fused8"])
def test_quantized_models_parse_in_tensorrt(int8_models, model, capsys):
    assert main(["build", str(int8_models[model]), "--check"]) == 0
    assert "an engine would build" in capsys.readouterr().out
