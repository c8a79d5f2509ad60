"""Typed records: each is written by one function and read back equal; an edited file is refused in one
line naming the rule (a wrong field, a missing one, a wrong type), never half-read."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import onnx
import pytest

from tests.test_refusals import _good
from toolchain.core.errors import ToolchainError
from toolchain.graphs.fuse import fuse_files
from toolchain.graphs.provenance import Provenance, read_provenance, write_provenance
from toolchain.records import FinetuneMetrics, metrics_from_dict, read_verify_report
from toolchain.verify import VerifyOptions, verify


@pytest.fixture(scope="module")
def verified(tmp_path_factory):
    d = tmp_path_factory.mktemp("verify")
    base, adapter = _good(d)
    fuse_files(base, adapter, d / "fused.onnx")
    report = verify(str(d / "fused.onnx"), str(base), str(d / "v"), opts=VerifyOptions(data=None, random=3))
    return d, report


def test_the_verify_report_reads_back_equal(verified):
    d, report = verified
    assert read_verify_report(d / "v" / "verify.json") == report
    assert report.comparisons["model"].outputs  # per-output errors are records too


def _edit(raw: dict, path: tuple[str, ...], value: object) -> dict:
    out = json.loads(json.dumps(raw))
    target = out
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return out


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("passed",), "yes", "passed must be bool"),
        (("passed",), KeyError, "does not have the record's fields"),
        (("surprise",), 1, "does not have the record's fields"),
        (("iterations",), 2.5, "iterations must be int"),
        (("comparisons",), [], "comparisons must be dict"),
        (("comparisons", "model", "passed"), 1, "passed must be bool"),
        (("comparisons", "model", "extra"), 1, "does not have the record's fields"),
    ],
)
def test_an_edited_verify_report_is_refused(verified, tmp_path, path, value, message):
    _, report = verified
    edited = _edit(report.to_dict(), path, value)
    (tmp_path / "verify.json").write_text(json.dumps(edited))
    with pytest.raises(ToolchainError, match=message):
        read_verify_report(tmp_path / "verify.json")


def test_a_verify_output_missing_a_statistic_is_refused(verified, tmp_path):
    _, report = verified
    raw = report.to_dict()
    name = next(iter(raw["comparisons"]["model"]["outputs"]))
    del raw["comparisons"]["model"]["outputs"][name]["max_abs"]
    (tmp_path / "verify.json").write_text(json.dumps(raw))
    with pytest.raises(ToolchainError, match="a verify output does not have the record's fields"):
        read_verify_report(tmp_path / "verify.json")


METRICS = {f: 0 for f in FinetuneMetrics.__dataclass_fields__} | {
    "method": "lora-edge",
    "layer_selection": "all",
    "training_path": "lean",
    "checkpoint": "b.pt",
    "target_subjects": [1],
    "train_config": {},
    "memory_budget_mb": None,
    "trainable_fraction": 0.01,
}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"rank": "4"}, "rank must be int"),
        ({"rank": True}, "rank must be int"),
        ({"f1_after": None}, "f1_after must be float"),
        ({"target_subjects": "1"}, "target_subjects must be list"),
        ({"new_key": 1}, "does not have the record's fields"),
    ],
)
def test_edited_metrics_are_refused(edit, message):
    assert metrics_from_dict(METRICS) == FinetuneMetrics(**METRICS)
    with pytest.raises(ToolchainError, match=message):
        metrics_from_dict({**METRICS, **edit})


def test_fuse_writes_the_provenance_it_reads(verified):
    d, _ = verified
    prov = read_provenance(onnx.load(d / "fused.onnx"))
    assert prov is not None and prov.fused and prov.kind == "fused"
    assert prov.base_sha256 == hashlib.sha256((d / "base.onnx").read_bytes()).hexdigest()
    assert prov.adapter_sha256 == hashlib.sha256((d / "adapter.safetensors").read_bytes()).hexdigest()
    assert prov.fused_weights and prov.adapter_format == "toolchain"
    assert read_provenance(onnx.load(d / "base.onnx")) is None  # not written by the toolchain


@pytest.mark.parametrize(
    "prov",
    [
        Provenance("base", "0.2.0", checkpoint_sha256="a" * 64, classes=("walk", "sit")),
        Provenance("unfused", "0.2.0", checkpoint_sha256="a" * 64, classes=("0",), adapter_sha256="b" * 64),
        Provenance("fused", "0.2.0", adapter_sha256="b" * 64, base_sha256="c" * 64, fused_weights=("w1", "w2")),
    ],
)
def test_provenance_round_trips(prov, verified):
    model = onnx.load(verified[0] / "base.onnx")
    write_provenance(model, prov)
    assert read_provenance(model) == prov
    assert asdict(read_provenance(model)) == asdict(prov)


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"toolchain.kind": "weird"}, "toolchain.kind must be one of"),
        ({"toolchain.kind": "base", "toolchain.fused": "true"}, "disagree"),
        ({"toolchain.kind": "fused"}, "disagree"),
        ({"toolchain.kind": "base", "toolchain.checkpoint_sha256": "xyz"}, "is not a SHA-256"),
        ({"toolchain.fused": "true", "toolchain.fused_weights": '{"a": 1}'}, "must be a JSON list of names"),
        ({"toolchain.kind": "base", "toolchain.classes": "[1, 2]"}, "must be a JSON list of names"),
        ({"toolchain.kind": "base", "toolchain.classes": '["a", "a",'}, "is not valid JSON"),
    ],
)
def test_malformed_provenance_is_refused(meta, message, verified):
    model = onnx.load(verified[0] / "base.onnx")
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    with pytest.raises(ToolchainError, match=message):
        read_provenance(model)


@pytest.mark.parametrize("kind", ["missing", "folder", "large"])
def test_an_unreadable_record_is_named_once(tmp_path, kind):
    """The file readers' messages name the record as the caller does ("the verify report"), not
    "the the verify report" (the article was added twice)."""
    import toolchain.core.jsonio as jsonio

    path = tmp_path / "verify.json"
    if kind == "folder":
        path.mkdir()
    if kind == "large":
        path.write_text("{}")
    limit = 1 if kind == "large" else jsonio.MAX_JSON_BYTES
    with pytest.raises(ToolchainError) as err:
        jsonio.read_json(path, "the verify report", "re-run toolchain verify", limit=limit)
    assert str(err.value).startswith("the verify report ") and "the the" not in str(err.value)
