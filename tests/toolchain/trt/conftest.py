"""Models for the TensorRT stage (one small pipeline on the embedded default) and the fake TensorRT."""

from __future__ import annotations

import pytest

from toolchain.cli import main

Q = ["--no-progress"]


def _export(ckpt, out, *args):
    assert main(["export", "--checkpoint", str(ckpt), *args, "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def trt_models(tmp_path_factory):
    """base.pt; adapters: LoRA-Edge (two seeds), LoRA-Edge with BN trained, BitFit (two seeds); their
    fused and unfused exports; a base pretrained with another seed and a model fused on it."""
    d = tmp_path_factory.mktemp("trt_models")
    ck, other = d / "base.pt", d / "other.pt"
    assert main(["pretrain", "--out", str(ck), "--epochs", "1", *Q]) == 0
    assert main(["pretrain", "--out", str(other), "--epochs", "1", "--seed", "1", *Q]) == 0
    adapters = {
        "le1": ["--seed", "0"],
        "le2": ["--seed", "1"],
        "bn": ["--train", "bn"],
        "bit1": ["--method", "bitfit", "--seed", "0"],
        "bit2": ["--method", "bitfit", "--seed", "1"],
    }
    m = {"dir": d, "ckpt": ck, "base": _export(ck, d / "base.onnx")}
    for name, args in adapters.items():
        a = d / f"{name}.safetensors"
        assert (
            main(["finetune", "--checkpoint", str(ck), "--out", str(a), "--steps", "15", "--lr", "2e-2", *args, *Q])
            == 0
        )
        m[f"fused_{name}"] = _export(ck, d / f"fused_{name}.onnx", "--adapter", str(a), "--fuse")
        m[f"unfused_{name}"] = _export(ck, d / f"unfused_{name}.onnx", "--adapter", str(a))
    a = d / "other.safetensors"
    assert main(["finetune", "--checkpoint", str(other), "--out", str(a), "--steps", "5", *Q]) == 0
    m["fused_other"] = _export(other, d / "fused_other.onnx", "--adapter", str(a), "--fuse")
    m["dynamic"] = _export(ck, d / "dynamic.onnx", "--dynamic-batch")
    return m


@pytest.fixture
def fake_trt(monkeypatch):
    """The fake tensorrt 10.3 module as ``tensorrt``, with engines run through ONNX Runtime."""
    from tests import fake_tensorrt
    from toolchain.trt import engine, runtime

    fake_tensorrt.BUILDS.clear()
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", fake_tensorrt.install())
    runtime.tensorrt_status.cache_clear()
    monkeypatch.setattr(runtime, "_LOGGERS", {})
    monkeypatch.setattr(engine, "runner_from_bytes", fake_tensorrt.engine_runner)
    yield fake_tensorrt
    runtime.tensorrt_status.cache_clear()
