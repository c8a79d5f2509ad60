"""TensorRT engines: build, verify against the fused ONNX, refit. Needs TensorRT 10.x and a GPU."""

import json

import pytest

from toolchain.cli import main
from toolchain.trt_engine import tensorrt_status

pytestmark = [pytest.mark.trt, pytest.mark.skipif(tensorrt_status() is not None, reason=f"{tensorrt_status()}: needs TensorRT 10.x and an NVIDIA GPU")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("trt")
    ck, a1, a2 = d / "base.pt", d / "a1.safetensors", d / "a2.safetensors"
    assert main(["pretrain", "--out", str(ck), "--epochs", "1", "--no-progress"]) == 0
    for seed, a in ((0, a1), (1, a2)):
        assert main(["finetune", "--checkpoint", str(ck), "--out", str(a), "--steps", "20", "--seed", str(seed), "--no-progress"]) == 0
    out = {"dir": d}
    for name, args in {"unfused1": ["--adapter", str(a1)], "fused1": ["--adapter", str(a1), "--fuse"], "unfused2": ["--adapter", str(a2)], "fused2": ["--adapter", str(a2), "--fuse"]}.items():
        out[name] = d / f"{name}.onnx"
        assert main(["export", "--checkpoint", str(ck), *args, "-o", str(out[name])]) == 0
    return out


def test_build_verify_and_refit(models):
    d = models["dir"]
    plan = d / "m.plan"
    assert main(["build", str(models["fused1"]), "-o", str(plan), "--refit"]) == 0
    assert json.loads((d / "m.plan.json").read_text())["refittable_weights"]
    assert main(["verify", str(models["fused1"]), "--reference", str(models["unfused1"]), "--engine", str(plan), "--out-dir", str(d / "v1")]) == 0
    refit = d / "m2.plan"
    assert main(["refit", str(plan), str(models["fused2"]), "-o", str(refit)]) == 0
    assert main(["verify", str(models["fused2"]), "--reference", str(models["unfused2"]), "--engine", str(refit), "--out-dir", str(d / "v2")]) == 0
