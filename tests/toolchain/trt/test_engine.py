"""Build, refit and verify against the fake TensorRT 10.3: each defect the review found, as a test."""

from __future__ import annotations

import hashlib
import json

import onnx
import pytest
from onnx import numpy_helper

from toolchain.cli import main
from toolchain.trt.record import read_record

CONVS = ["net.features.0.0.weight", "net.features.2.0.weight", "net.features.4.0.weight"]


def _build(m, model, plan, *extra):
    return main(["build", str(m[model]), "-o", str(plan), *extra])


def _verify(m, model, reference, plan, out):
    return main(
        [
            "verify",
            str(m[model]),
            "--reference",
            str(m[reference]),
            "--engine",
            str(plan),
            "--out-dir",
            str(out),
            "--data",
            "none",
            "--random",
            "4",
        ]
    )


def test_build_marks_fused_weights_individually(fake_trt, trt_models, tmp_path, capsys):
    plan = tmp_path / "m.plan"
    assert _build(trt_models, "fused_le1", plan, "--refit", "--fp16") == 0
    record = read_record(plan)
    assert record.precision == "fp16" and record.refit_mode == "individual" and record.kind == "build"
    assert list(record.refittable_weights) == json.loads(
        {p.key: p.value for p in onnx.load(trt_models["fused_le1"]).metadata_props}["toolchain.fused_weights"]
    )
    assert set(CONVS) <= set(record.refittable_weights)
    assert fake_trt.BUILDS[-1]["flags"] == ["FP16", "REFIT_INDIVIDUAL"]
    assert record.engine_check["passed"] and record.engine_check["max_abs"] < 1e-2
    assert "fp16" in capsys.readouterr().out


def test_refit_keeps_precision_and_the_refit_engine_verifies(fake_trt, trt_models, tmp_path):
    plan, refit = tmp_path / "m.plan", tmp_path / "m2.plan"
    assert _build(trt_models, "fused_le1", plan, "--refit", "--fp16") == 0
    assert main(["refit", str(plan), str(trt_models["fused_le2"]), "-o", str(refit)]) == 0
    record = read_record(refit)
    assert record.kind == "refit" and record.precision == "fp16" and record.refit_mode == "individual"
    assert record.refittable_weights == read_record(plan).refittable_weights and record.parent_plan_sha256
    assert _verify(trt_models, "fused_le2", "unfused_le2", refit, tmp_path / "v_new") == 0  # judged at fp16's 1e-2
    # negative control: the old engine against the new model must fail
    assert _verify(trt_models, "fused_le2", "unfused_le2", plan, tmp_path / "v_old") == 1


def test_refit_refuses_a_model_fused_on_another_base(fake_trt, trt_models, tmp_path, capsys):
    plan = tmp_path / "m.plan"
    assert _build(trt_models, "fused_le1", plan, "--refit") == 0
    capsys.readouterr()
    assert main(["refit", str(plan), str(trt_models["fused_other"]), "-o", str(tmp_path / "x.plan")]) == 2
    assert "fused on another base" in capsys.readouterr().err
    assert not (tmp_path / "x.plan").exists() and not (tmp_path / "x.plan.json").exists()


def test_refit_refuses_weights_outside_the_refittable_set(fake_trt, trt_models, tmp_path, capsys):
    plan = tmp_path / "m.plan"
    assert _build(trt_models, "fused_le1", plan, "--refit") == 0
    capsys.readouterr()
    assert main(["refit", str(plan), str(trt_models["fused_bn"]), "-o", str(tmp_path / "x.plan")]) == 2
    err = capsys.readouterr().err
    assert "cannot refit (they would stay stale)" in err and "rebuild with" in err and "Traceback" not in err


@pytest.mark.parametrize("fused", ["fused_bit1", "fused_bn"])
def test_bn_touching_adapters_build_whole_engine_refit_and_say_so(fake_trt, trt_models, tmp_path, capsys, fused):
    plan = tmp_path / "m.plan"
    assert _build(trt_models, fused, plan, "--refit") == 0
    out = capsys.readouterr().out
    assert "whole-engine refit" in out and "--fold-bn" in out
    assert read_record(plan).refit_mode == "all" and fake_trt.BUILDS[-1]["flags"] == ["REFIT"]


def test_whole_engine_refit_recomputes_batchnorm_weights(fake_trt, trt_models, tmp_path):
    plan, refit = tmp_path / "m.plan", tmp_path / "m2.plan"
    assert _build(trt_models, "fused_bit1", plan, "--refit") == 0
    assert main(["refit", str(plan), str(trt_models["fused_bit2"]), "-o", str(refit)]) == 0
    assert _verify(trt_models, "fused_bit2", "unfused_bit2", refit, tmp_path / "v") == 0
    assert _verify(trt_models, "fused_bit2", "unfused_bit2", plan, tmp_path / "v_old") == 1


def test_refit_rejects_a_weight_of_another_shape(fake_trt, trt_models, tmp_path, capsys):
    plan = tmp_path / "m.plan"
    assert _build(trt_models, "fused_le1", plan, "--refit") == 0
    model = onnx.load(trt_models["fused_le1"])
    for t in model.graph.initializer:  # a conv grown by one output channel: the engine cannot take it
        if t.name == CONVS[0]:
            a = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(__import__("numpy").concatenate([a, a[:1]]), t.name))
    grown = tmp_path / "grown.onnx"
    onnx.save(model, grown)
    capsys.readouterr()
    assert main(["refit", str(plan), str(grown), "-o", str(tmp_path / "x.plan")]) == 2
    err = capsys.readouterr().err
    assert "does not fit the engine" in err and CONVS[0] in err


def test_refit_needs_the_sidecar_and_a_refittable_engine(fake_trt, trt_models, tmp_path, capsys):
    plan = tmp_path / "m.plan"
    assert _build(trt_models, "fused_le1", plan) == 0
    assert main(["refit", str(plan), str(trt_models["fused_le2"]), "-o", str(tmp_path / "a.plan")]) == 2
    assert "not refittable" in capsys.readouterr().err
    (tmp_path / "m.plan.json").unlink()
    assert main(["refit", str(plan), str(trt_models["fused_le2"]), "-o", str(tmp_path / "b.plan")]) == 2
    assert "no sidecar record" in capsys.readouterr().err


def test_a_plan_from_another_tensorrt_is_refused(fake_trt, trt_models, tmp_path, capsys):
    plan = tmp_path / "m.plan"
    assert _build(trt_models, "fused_le1", plan, "--refit") == 0
    data = bytearray(plan.read_bytes())
    data[24:27] = bytes([10, 7, 0])
    plan.write_bytes(bytes(data))
    side = tmp_path / "m.plan.json"  # the record such a plan comes with: its own hash
    record = json.loads(side.read_text())
    side.write_text(json.dumps({**record, "plan_sha256": hashlib.sha256(bytes(data)).hexdigest()}))
    capsys.readouterr()
    assert main(["refit", str(plan), str(trt_models["fused_le2"]), "-o", str(tmp_path / "x.plan")]) == 2
    assert "built by TensorRT 10.7.0" in capsys.readouterr().err
    assert _verify(trt_models, "fused_le1", "unfused_le1", plan, tmp_path / "v") == 2
    assert "10.7.0" in capsys.readouterr().err
    assert main(["inspect", str(plan)]) == 0
    assert json.loads(capsys.readouterr().out)["tensorrt_version"] == "10.7.0"


def test_dynamic_batch(fake_trt, trt_models, tmp_path, capsys):
    assert _build(trt_models, "fused_le1", tmp_path / "s.plan", "--dynamic-batch", "1,4,8") == 2
    assert "fixed batch" in capsys.readouterr().err and not (tmp_path / "s.plan").exists()
    assert _build(trt_models, "dynamic", tmp_path / "d.plan", "--dynamic-batch", "1,4,8") == 0
    (shapes,) = fake_trt.BUILDS[-1]["profiles"][0].values()
    assert [s[0] for s in shapes] == [1, 4, 8]


def test_builder_failure_is_one_line_with_tensorrt_error(fake_trt, trt_models, tmp_path, capsys, monkeypatch):
    def out_of_memory(self, network, config):
        self.logger.log(
            fake_trt.ILogger.ERROR, "Requested amount of GPU memory (9000000000 bytes) could not be allocated"
        )
        return None

    monkeypatch.setattr(fake_trt.Builder, "build_serialized_network", out_of_memory)
    assert _build(trt_models, "fused_le1", tmp_path / "m.plan") == 2
    err = capsys.readouterr().err
    assert "could not build" in err and "could not be allocated" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.plan").exists()


def test_parser_refusal_names_the_node(fake_trt, trt_models, tmp_path, capsys):
    model = onnx.load(trt_models["fused_le1"])
    node = next(n for n in model.graph.node if n.op_type == "Relu")
    node.op_type, node.domain = "MyRelu", "com.example"
    model.opset_import.add(domain="com.example", version=1)
    bad = tmp_path / "bad.onnx"
    onnx.save(model, bad)
    assert main(["build", str(bad), "-o", str(tmp_path / "m.plan")]) == 2
    err = capsys.readouterr().err
    assert "parser refuses" in err and node.name in err and "--check" in err


def test_engine_that_differs_from_the_model_is_not_written(fake_trt, trt_models, tmp_path, capsys, monkeypatch):
    real = fake_trt.engine_model

    def broken(plan):
        model = real(plan)
        t = model.graph.initializer[0]
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.5, t.name))
        return model

    monkeypatch.setattr(fake_trt, "engine_model", broken)
    assert _build(trt_models, "fused_le1", tmp_path / "m.plan") == 2
    assert "differs from the ONNX model" in capsys.readouterr().err
    assert not (tmp_path / "m.plan").exists() and not (tmp_path / "m.plan.json").exists()


def test_malformed_sidecar_is_one_line(fake_trt, trt_models, tmp_path, capsys):
    plan = tmp_path / "m.plan"
    assert _build(trt_models, "fused_le1", plan, "--refit") == 0
    (tmp_path / "m.plan.json").write_text('{"format": 1, "precision": "fp8"}')
    capsys.readouterr()
    assert main(["refit", str(plan), str(trt_models["fused_le2"]), "-o", str(tmp_path / "x.plan")]) == 2
    assert "not a toolchain engine record" in capsys.readouterr().err
    assert main(["inspect", str(plan)]) == 0
    assert "not a toolchain engine record" in json.loads(capsys.readouterr().out)["record_error"]


def test_trt_11_and_rtx_are_refused_for_builds(monkeypatch, trt_models, tmp_path, capsys):
    from tests import fake_tensorrt
    from toolchain.trt import runtime

    module = fake_tensorrt.install()
    monkeypatch.setattr(module, "__version__", "11.0.0")
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", module)
    runtime.tensorrt_status.cache_clear()
    try:
        assert _build(trt_models, "fused_le1", tmp_path / "m.plan") == 2
        err = capsys.readouterr().err
        assert "11.x" in err and "tensorrt-cu12==10.3" in err
    finally:
        runtime.tensorrt_status.cache_clear()
