"""The engine record (sidecar) and the plan-header version reader."""

from __future__ import annotations

import json

import pytest

from toolchain.core.errors import ToolchainError
from toolchain.trt.record import EngineRecord, check_plan_version, plan_version, read_record, write_record

# The first 32 bytes of two real TensorRT plans (mnist.engine and mnist.trt in the public repository
# onjackay/model-deploy-tutorial, built in May 2024 with CUDA 12.5, i.e. TensorRT 10.0.1): the magic
# "ftrt", then major, minor, patch at offsets 24, 25 and 26.
REAL_HEADERS = [
    bytes.fromhex("667472740000000001000000000000004c400500000000000a00010672747274"),
    bytes.fromhex("6674727400000000010000000000000064400500000000000a00010672747274"),
]


@pytest.mark.parametrize("header", REAL_HEADERS)
def test_real_plan_headers(header):
    assert header[:4] == b"ftrt" and plan_version(header) == "10.0.1"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"", None),
        (b"ftrt" + bytes(20), None),
        (b"ftrt" + bytes(20) + bytes([10, 3, 0]), "10.3.0"),
        (bytes(24) + bytes([10, 3, 0]), None),
        (b"ftrt" + bytes(20) + bytes([200, 1, 1]), None),
        (b"ftrt" + bytes(20) + bytes([7, 1, 0]), None),
    ],
)
def test_plan_version_table(header, expected):
    assert plan_version(header) == expected


def test_check_plan_version(tmp_path):
    plan = tmp_path / "m.plan"
    plan.write_bytes(REAL_HEADERS[0] + b"rest")
    check_plan_version(plan, "10.0.1.6")
    with pytest.raises(ToolchainError, match=r"built by TensorRT 10\.0\.1; this machine has TensorRT 10\.3\.0"):
        check_plan_version(plan, "10.3.0")
    plan.write_bytes(b"not a plan")
    with pytest.raises(ToolchainError, match="not a TensorRT plan"):
        check_plan_version(plan, "10.3.0")


def _record(**kw):
    base = dict(
        kind="build",
        onnx="m.onnx",
        onnx_sha256="a" * 64,
        base_sha256="b" * 64,
        precision="fp16",
        refit_mode="individual",
        refittable_weights=("w",),
        tensorrt_version="10.3.0",
        plan_sha256="c" * 64,
    )
    return EngineRecord(**{**base, **kw})


PLAN = b"ftrt plan bytes"


def test_record_round_trip(tmp_path):
    import hashlib

    (tmp_path / "m.plan").write_bytes(PLAN)
    record = _record(
        dynamic_batch=(1, 4, 8), engine_check={"max_abs": 1e-3}, plan_sha256=hashlib.sha256(PLAN).hexdigest()
    )
    write_record(tmp_path / "m.plan", record)
    assert read_record(tmp_path / "m.plan") == record
    assert read_record(tmp_path / "none.plan") is None


@pytest.mark.parametrize(
    "content",
    [
        "{broken",
        "[]",
        json.dumps({"format": 2}),
        json.dumps({**json.loads(_record().to_json()), "precision": "int4"}),
        json.dumps({**json.loads(_record().to_json()), "extra": 1}),
        json.dumps({**json.loads(_record().to_json()), "refittable_weights": [1]}),
        json.dumps({**json.loads(_record().to_json()), "onnx_sha256": 5}),
    ],
)
def test_malformed_records_are_one_line_errors(tmp_path, content):
    (tmp_path / "m.plan.json").write_text(content)
    with pytest.raises(ToolchainError, match="not a toolchain engine record"):
        read_record(tmp_path / "m.plan")


def test_record_rejects_unknown_values():
    with pytest.raises(ValueError, match="refit_mode"):
        _record(refit_mode="some")
