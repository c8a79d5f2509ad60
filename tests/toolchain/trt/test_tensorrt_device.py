"""The TensorRT stage on a real TensorRT 10.x and GPU (the Orin Nano, or an x86 host with
tensorrt-cu12==10.3.*): build, check, verify, refit, negative control. Skipped where absent; the same
flows run everywhere against the fake TensorRT in tests/toolchain/trt/test_engine.py."""

import pytest

from toolchain.cli import main
from toolchain.trt.record import read_record
from toolchain.trt.runtime import tensorrt_status

pytestmark = [
    pytest.mark.trt,
    pytest.mark.skipif(
        tensorrt_status() is not None, reason=f"{tensorrt_status()}: needs TensorRT 10.x and an NVIDIA GPU"
    ),
]


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_build_verify_refit_and_negative_control(trt_models, tmp_path, fp16):
    m, plan, refit = trt_models, tmp_path / "m.plan", tmp_path / "m2.plan"
    flags = ["--refit", *(["--fp16"] if fp16 else [])]
    assert main(["build", str(m["fused_le1"]), "-o", str(plan), *flags]) == 0
    assert read_record(plan).engine_check["passed"]

    def verify(model, reference, engine, out):
        return main(
            [
                "verify",
                str(m[model]),
                "--reference",
                str(m[reference]),
                "--engine",
                str(engine),
                "--out-dir",
                str(tmp_path / out),
                "--data",
                "none",
            ]
        )

    assert verify("fused_le1", "unfused_le1", plan, "v1") == 0
    assert main(["refit", str(plan), str(m["fused_le2"]), "-o", str(refit)]) == 0
    assert read_record(refit).precision == ("fp16" if fp16 else "fp32")
    assert verify("fused_le2", "unfused_le2", refit, "v2") == 0
    assert verify("fused_le2", "unfused_le2", plan, "v3") == 1  # the old engine against the new model


def test_bn_adapter_whole_engine_refit(trt_models, tmp_path):
    m, plan, refit = trt_models, tmp_path / "b.plan", tmp_path / "b2.plan"
    assert main(["build", str(m["fused_bit1"]), "-o", str(plan), "--refit"]) == 0
    assert read_record(plan).refit_mode == "all"
    assert main(["refit", str(plan), str(m["fused_bit2"]), "-o", str(refit)]) == 0
    args = [
        "--reference",
        str(m["unfused_bit2"]),
        "--engine",
        str(refit),
        "--out-dir",
        str(tmp_path / "v"),
        "--data",
        "none",
    ]
    assert main(["verify", str(m["fused_bit2"]), *args]) == 0
