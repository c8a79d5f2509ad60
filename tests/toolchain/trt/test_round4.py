"""Hostile round four, the TensorRT side (through the fake TensorRT 10.3): a timing cache naming an
input or output, records that are not ours read strictly, a plan replaced under its record, a FIFO plan."""

from __future__ import annotations

import json
import os
import threading

import pytest

from toolchain.cli import main


def _build(m, plan, *extra):
    return main(["build", str(m["fused_le1"]), "-o", str(plan), "--refit", *extra])


@pytest.mark.parametrize("target", ["model", "out", "record"])
def test_a_timing_cache_that_names_the_model_or_an_output_is_refused(fake_trt, trt_models, tmp_path, capsys, target):
    model = tmp_path / "fused.onnx"
    model.write_bytes(trt_models["fused_le1"].read_bytes())
    plan = tmp_path / "m.plan"
    cache = {"model": model, "out": plan, "record": tmp_path / "m.plan.json"}[target]
    before = model.read_bytes()
    assert main(["build", str(model), "-o", str(plan), "--timing-cache", str(cache)]) == 2
    err = capsys.readouterr().err
    assert "--timing-cache must not be the same file as" in err and len(err.strip().splitlines()) == 1
    assert model.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["fused.onnx"]


def test_a_timing_cache_of_its_own_is_written(fake_trt, trt_models, tmp_path):
    assert _build(trt_models, tmp_path / "m.plan", "--timing-cache", str(tmp_path / "trt.cache")) == 0
    assert (tmp_path / "trt.cache").is_file()


RECORD_EDITS = {
    # name: (edit of the record dict, or raw text, the words of the error)
    "dynamic_batch with Infinity": ('"dynamic_batch": [Infinity, 1, 1]', "not a JSON number"),
    "dynamic_batch a string": ({"dynamic_batch": "123"}, "dynamic_batch must be null or three integers"),
    "dynamic_batch of floats": ({"dynamic_batch": [1.9, 2.5, 3]}, "dynamic_batch must be null or three integers"),
    "dynamic_batch out of order": ({"dynamic_batch": [8, 2, 4]}, "1 <= min <= opt <= max"),
    "format true": ({"format": True}, "format True"),
    "plan_sha256 not a hash": ({"plan_sha256": "not-a-hash"}, "plan_sha256 must be a SHA-256"),
    "workspace_mb a float": ({"workspace_mb": 1024.0}, "workspace_mb must be a int"),
    "refittable_weights a string": ({"refittable_weights": "w"}, "refittable_weights must be a list"),
    "a missing key": ({"onnx_sha256": None}, "missing keys"),
    "duplicate keys": ('"precision": "fp32", "precision": "fp16"', "duplicate key"),
}


def _tamper(side, edit):
    raw = json.loads(side.read_text())
    if isinstance(edit, dict):
        for k, v in edit.items():
            raw.pop(k) if v is None else raw.__setitem__(k, v)
        side.write_text(json.dumps(raw))
    else:
        side.write_text("{" + edit + ", " + json.dumps(raw)[1:])


@pytest.mark.parametrize("case", list(RECORD_EDITS))
def test_a_record_that_is_not_ours_is_one_line_in_refit_verify_and_inspect(
    fake_trt, trt_models, tmp_path, capsys, case
):
    plan = tmp_path / "m.plan"
    assert _build(trt_models, plan) == 0
    edit, words = RECORD_EDITS[case]
    _tamper(tmp_path / "m.plan.json", edit)
    capsys.readouterr()
    refit = ["refit", str(plan), str(trt_models["fused_le2"]), "-o", str(tmp_path / "x.plan")]
    assert main(refit) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "x.plan").exists()
    verify = ["verify", str(trt_models["fused_le1"]), "--reference", str(trt_models["unfused_le1"])]
    assert main([*verify, "--engine", str(plan), "--out-dir", str(tmp_path / "v"), "--data", "none"]) == 2
    assert words in capsys.readouterr().err
    assert main(["inspect", str(plan)]) == 0
    assert words in json.loads(capsys.readouterr().out)["record_error"]


def test_a_plan_replaced_under_its_record_is_refused(fake_trt, trt_models, tmp_path, capsys):
    plan, other = tmp_path / "m.plan", tmp_path / "o.plan"
    assert _build(trt_models, plan) == 0
    assert main(["build", str(trt_models["fused_bit1"]), "-o", str(other), "--fp16"]) == 0
    plan.write_bytes(other.read_bytes())  # e.g. trtexec --saveEngine over the same path
    capsys.readouterr()
    assert main(["refit", str(plan), str(trt_models["fused_le2"]), "-o", str(tmp_path / "x.plan")]) == 2
    assert "the plan is not the one its record describes" in capsys.readouterr().err
    assert main(["inspect", str(plan)]) == 0
    assert "not the one its record describes" in json.loads(capsys.readouterr().out)["record_error"]


def test_a_fifo_as_the_plan_is_refused_without_hanging(fake_trt, trt_models, tmp_path, capsys):
    plan = tmp_path / "m.plan"
    assert _build(trt_models, plan) == 0
    fifo = tmp_path / "f.plan"
    os.mkfifo(fifo)
    (tmp_path / "f.plan.json").write_bytes((tmp_path / "m.plan.json").read_bytes())
    fired = threading.Event()

    def unblock():  # a reader blocked in open() on the FIFO gets EOF once a writer comes and goes
        if not done.wait(30):
            fired.set()
            with open(fifo, "wb"):
                pass

    done = threading.Event()
    threading.Thread(target=unblock, daemon=True).start()
    refit = ["refit", str(fifo), str(trt_models["fused_le2"]), "-o", str(tmp_path / "x.plan")]
    verify = ["verify", str(trt_models["fused_le1"]), "--reference", str(trt_models["unfused_le1"]), "--engine",
              str(fifo), "--out-dir", str(tmp_path / "v"), "--data", "none", "--engine-atol", "1e-2",
              "--engine-rtol", "1e-2"]  # fmt: skip
    codes = [main(refit), main(verify)]
    done.set()
    assert not fired.is_set(), "reading a FIFO plan blocked"
    assert codes == [2, 2]
    assert "not a regular file" in capsys.readouterr().err


def test_provenance_naming_a_weight_the_graph_lacks_is_refused(trt_models, tmp_path, capsys):
    import onnx

    model = onnx.load(trt_models["fused_le1"])
    prop = next(p for p in model.metadata_props if p.key == "toolchain.fused_weights")
    prop.value = json.dumps([*json.loads(prop.value), "no.such.weight"])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert main(["build", str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert "names weights the graph does not have" in err and "no.such.weight" in err


def test_bench_attempts_without_a_gate_is_refused(trt_models, tmp_path, capsys):
    assert main(["bench", str(trt_models["base"]), "--attempts", "3", "--runs", "5"]) == 2
    assert "--attempts applies to the latency gate, which needs --max-ratio" in capsys.readouterr().err
