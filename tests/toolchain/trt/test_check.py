"""TensorRT's own ONNX parser on every export (TensorRT-RTX's, which runs without a GPU).

Every built-in backbone's base, unfused and fused model must parse, and every fused weight must be
markable refittable; a model with an operator TensorRT lacks is reported by node name, exit 1.
Skipped where neither tensorrt 10.x nor tensorrt_rtx imports (`pip install '.[trt-check]'`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import onnx.inliner
import pytest
import torch

import toolchain.api as tc
from toolchain.cli import main
from toolchain.models.registry import build_model
from toolchain.trt.check import check_model

try:
    from toolchain.trt.runtime import parser_tensorrt

    PARSER = parser_tensorrt()
except Exception as err:
    PARSER = None
    REASON = str(err)

pytestmark = pytest.mark.skipif(PARSER is None, reason="no TensorRT parser importable (pip install '.[trt-check]')")

BACKBONES = [
    ("cnn1d", (6, 64)),
    ("resnet1d", (6, 64)),
    ("mobilenet1d", (6, 64)),
    ("resnet18", (1, 32, 32)),
    ("mobilenetv2", (3, 32, 32)),
]


@pytest.fixture(scope="module", params=BACKBONES, ids=[b for b, _ in BACKBONES])
def exported(request, tmp_path_factory):
    """base, unfused and fused ONNX of a backbone with a non-zero LoRA-Edge update on every conv."""
    name, shape = request.param
    d = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    model = build_model(name, shape[0], 5, spatial_dims=len(shape) - 1).eval()
    adaptation = tc.adapt(model, "lora-edge", rank=2)
    with torch.no_grad():
        for p in adaptation.parameters():
            p.normal_(0, 0.05)
    x = torch.randn(1, *shape)
    adaptation.save(d / "a.safetensors")
    tc.export_onnx(adaptation.base_model(), x, d / "base.onnx")
    tc.export_onnx(model, x, d / "unfused.onnx")
    tc.fuse(d / "base.onnx", d / "a.safetensors", d / "fused.onnx")
    return d


@pytest.mark.parametrize("kind", ["base", "unfused", "fused"])
def test_every_export_parses_in_tensorrt(exported, kind):
    report = check_model(str(exported / f"{kind}.onnx"), PARSER)
    assert report.parsed and not report.problems, report.problems
    assert report.refit_weights and all(report.refit_weights.values()), report.refit_weights


def test_fused_weights_are_refittable_individually(exported):
    meta = {p.key: p.value for p in onnx.load(exported / "fused.onnx").metadata_props}
    report = check_model(str(exported / "fused.onnx"), PARSER)
    assert list(report.refit_weights) == json.loads(meta["toolchain.fused_weights"])
    assert report.refit_mode == "individual"


def test_fused_model_differs_from_base_only_in_weights_and_metadata(exported, capsys):
    assert main(["diff", str(exported / "base.onnx"), str(exported / "fused.onnx"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["initializers"]["changed"]
        and not report["initializers"]["added"]
        and not report["initializers"]["removed"]
    )
    for part in ("nodes", "inputs", "outputs", "value_info"):
        assert not any(report[part].values()), (part, report[part])


def test_an_unsupported_operator_is_named(tmp_path, capsys):
    d = tmp_path
    model = build_model("cnn1d", 6, 5).eval()
    tc.export_onnx(model, torch.randn(1, 6, 64), d / "m.onnx")
    proto = onnx.load(d / "m.onnx")
    node = next(n for n in proto.graph.node if n.op_type == "Relu")
    node.op_type, node.domain, node.name = "FancyRelu", "com.example", "my_fancy_relu"
    proto.opset_import.add(domain="com.example", version=1)
    onnx.save(proto, d / "bad.onnx")
    assert main(["build", str(d / "bad.onnx"), "--check"]) == 1
    out = capsys.readouterr().out
    assert "does NOT parse" in out and "my_fancy_relu" in out and "would NOT build" in out


def test_the_exporters_raw_graph_is_what_tensorrt_refuses(tmp_path):
    """The negative control: without constant folding, the dynamo export's ReduceMean axes come from
    Reshape(Constant, Constant) and TensorRT refuses the model (NVIDIA/TensorRT issues 3467, 4393)."""
    from toolchain.export import ExportOptions, _quiet

    model = build_model("cnn1d", 6, 5).eval()
    with _quiet():
        raw = torch.onnx.export(
            model,
            (torch.randn(1, 6, 64),),
            dynamo=True,
            optimize=False,
            opset_version=18,
            input_names=["x"],
            output_names=["logits"],
        ).model_proto
    # torch 2.5 writes BatchNorm as a local function, which the parser refuses first; inlined (as the
    # toolchain's export does), the reduce axes are what is left to refuse
    from toolchain.graphs.fold import drop_unread_outputs, prune_dead

    raw = onnx.inliner.inline_local_functions(raw)
    prune_dead(raw.graph)  # and its MaxPool's unread index arithmetic and Indices output
    drop_unread_outputs(raw.graph)
    onnx.save(raw, tmp_path / "raw.onnx")
    report = check_model(str(tmp_path / "raw.onnx"), PARSER)
    assert not report.parsed and any(p.op == "ReduceMean" and "constant" in p.error for p in report.problems)
    assert ExportOptions().fold_bn is False


@pytest.mark.skipif(
    PARSER is None or PARSER.name != "tensorrt_rtx", reason="Polygraphy's TensorRT-RTX mode needs tensorrt_rtx"
)
def test_polygraphy_inspect_capability_agrees(exported):
    """Independent of this project's code: Polygraphy's own capability check."""
    env = {**os.environ, "POLYGRAPHY_USE_TENSORRT_RTX": "1"}
    script = shutil.which("polygraphy") or str(Path(sys.executable).parent / "polygraphy")
    run = subprocess.run(
        [script, "inspect", "capability", str(exported / "fused.onnx")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert "Graph is fully supported by TensorRT" in run.stdout + run.stderr
