"""fused.onnx is base.onnx with only the fused initializers' values and metadata_props changed."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from tests.graphs.helpers import adapted_pair, export_proto, run
from tests.test_refusals import _good
from toolchain.cli import main
from toolchain.core.errors import ToolchainError
from toolchain.core.fileio import atomic_path
from toolchain.graphs.diff import diff_models
from toolchain.graphs.fuse import fuse_model
from toolchain.graphs.onnx_io import save_onnx
from toolchain.models.backbones import BACKBONES, SPATIAL_DIMS
from toolchain.peft.inject import AdaptConfig, extract_adapter, inject

PROV = {
    "toolchain.fused": "true",
    "toolchain.base_sha256": "b" * 64,
    "toolchain.adapter_sha256": "a" * 64,
    "toolchain.version": "test",
}


def _adapted_backbone(name: str) -> tuple[onnx.ModelProto, nn.Module, object, torch.Tensor]:
    torch.manual_seed(0)
    channels = 6 if SPATIAL_DIMS[name] == 1 else 3
    base = BACKBONES[name](in_channels=channels, num_classes=5).eval()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = BACKBONES[name](in_channels=channels, num_classes=5).eval()
    model.load_state_dict(state)
    cfg = AdaptConfig(method="lora-edge", rank=4, scaling=0.5, train=("head",))
    inject(model, cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(1, 6, 64) if SPATIAL_DIMS[name] == 1 else torch.randn(1, 3, 32, 32)
    return export_proto(base, x), model.eval(), extract_adapter(model, state, cfg, {}), x


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_fused_differs_from_base_only_in_fused_weights_and_metadata(name):
    base, adapted, adapter, x = _adapted_backbone(name)
    fused = fuse_model(base, adapter, PROV)
    report = diff_models(base, fused)
    changed = {e["name"] for e in report["initializers"]["changed"]}
    assert changed == set(json.loads(dict((p.key, p.value) for p in fused.metadata_props)["toolchain.fused_weights"]))
    assert all(e["max_abs_delta"] > 0 for e in report["initializers"]["changed"])
    for section in ("nodes", "inputs", "outputs", "value_info"):
        assert not any(report[section][k] for k in ("added", "removed", "changed")), (section, report[section])
    assert not report["nodes"]["order_changed"]
    assert (
        set(report["metadata"]["added"]) >= {"toolchain.fused", "toolchain.fused_weights"}
        and not report["metadata"]["removed"]
    )
    assert [n.SerializeToString() for n in fused.graph.node] == [
        n.SerializeToString() for n in base.graph.node
    ]  # node metadata and doc strings too
    np.testing.assert_allclose(run(fused, x), adapted(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_diff_cli_lists_changed_initializers(tmp_path, capsys):
    base, adapter = _good(tmp_path)
    assert main(["fuse", str(base), str(adapter), "-o", str(tmp_path / "fused.onnx")]) == 0
    capsys.readouterr()
    assert main(["diff", str(base), str(tmp_path / "fused.onnx"), "--exit-code"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("initializer conv.weight:") and "max |Δ|" in line for line in lines), lines
    assert "metadata added: toolchain.fused" in lines
    assert not any(line.startswith(("nodes", "inputs", "outputs", "value_info")) for line in lines), lines
    assert main(["diff", str(base), str(base)]) == 0
    assert capsys.readouterr().out.strip() == "identical"


def test_tampered_folded_weight_is_refused_despite_recorded_scales():
    base, _, adapter, x = adapted_pair("1d-plain", bn=True)
    folded = export_proto(base, x, fold_bn=True)
    fuse_model(folded, adapter, PROV)  # the genuine folded model fuses
    w = next(t for t in folded.graph.initializer if t.name == "conv.weight")
    arr = onnx.numpy_helper.to_array(w).copy()
    arr[0] += 0.5
    w.CopyFrom(onnx.numpy_helper.from_array(arr, "conv.weight"))
    with pytest.raises(ToolchainError, match="is not the base weight"):
        fuse_model(folded, adapter, PROV)


def test_fused_folded_model_with_provenance_stripped_does_not_fuse_twice():
    base, _, adapter, x = adapted_pair("1d-plain", bn=True)
    fused = fuse_model(export_proto(base, x, fold_bn=True), adapter, PROV)
    keep = [p for p in fused.metadata_props if not p.key.startswith("toolchain.fused") and p.key not in PROV]
    del fused.metadata_props[:]
    fused.metadata_props.extend(keep)
    with pytest.raises(ToolchainError, match="is not the base weight"):
        fuse_model(fused, adapter, PROV)


def test_old_opset_model_fuses_into_a_valid_model_or_is_refused(tmp_path, capsys):
    base, adapter = _good(tmp_path)
    m = onnx.load(base)
    m.ir_version = 3
    del m.opset_import[:]
    m.opset_import.append(onnx.helper.make_opsetid("", 7))
    onnx.save(m, tmp_path / "old.onnx")
    rc = main(["fuse", str(tmp_path / "old.onnx"), str(adapter), "-o", str(tmp_path / "f.onnx")])
    if rc == 0:
        onnx.checker.check_model(onnx.load(tmp_path / "f.onnx"), full_check=True)
    else:
        assert rc == 2 and not (tmp_path / "f.onnx").exists()
        assert "invalid" in capsys.readouterr().err


def test_exclusive_create_loses_to_a_file_that_appeared_meanwhile(tmp_path):
    target = tmp_path / "out.onnx"
    with (
        pytest.raises(ToolchainError, match="appeared while this command ran"),
        atomic_path(target, force=False) as tmp,
    ):
        tmp.write_bytes(b"mine")
        target.write_bytes(b"theirs")  # another run finished first
    assert target.read_bytes() == b"theirs"
    assert list(tmp_path.glob("*.partial")) == []


def test_external_data_save_is_atomic_and_repeatable(tmp_path, monkeypatch):
    import toolchain.graphs.onnx_io as io

    base, _ = _good(tmp_path)
    model = onnx.load(base)
    monkeypatch.setattr(io, "TWO_GB", 100)  # take the large-model path with a small model
    monkeypatch.setattr(io, "EXTERNAL_THRESHOLD", 16)
    out = tmp_path / "big.onnx"
    save_onnx(model, out, force=False, validate=True)
    with pytest.raises(ToolchainError, match="pass --force"):
        save_onnx(model, out, force=False)
    save_onnx(model, out, force=True)
    assert (tmp_path / "big.onnx.data").is_file()
    assert list(tmp_path.glob(".*partial*")) == []
    loaded = onnx.load(out)
    np.testing.assert_array_equal(
        onnx.numpy_helper.to_array(loaded.graph.initializer[0]), onnx.numpy_helper.to_array(model.graph.initializer[0])
    )
