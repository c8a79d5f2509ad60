"""Hugging Face PEFT LoRA and DoRA adapters on Conv1d/Conv2d, fused torch-free and checked with
Polygraphy against PEFT's own merged model exported to ONNX."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from tests.graphs.helpers import export_proto
from toolchain.cli import main

peft = pytest.importorskip("peft", reason="peft is in the dev extra")


class Net1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(6, 16, 5, padding=2),
            nn.ReLU(),
            nn.Conv1d(16, 24, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(24, 24, 1),
        )
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        return self.head(self.features(x).mean(2))


class Net2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, (3, 5), padding=(1, 2))
        self.block = nn.Sequential(
            nn.ReLU(), nn.Conv2d(12, 16, 3, stride=2, padding=1, bias=False), nn.ReLU(), nn.Conv2d(16, 16, 1)
        )
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


CASES = {
    "conv1d-lora": (Net1d, (2, 6, 40), ["features.0", "features.2", "features.4"], {}),
    "conv1d-dora-rslora": (Net1d, (2, 6, 40), ["features.0", "features.2"], {"use_dora": True, "use_rslora": True}),
    "conv2d-lora-alpha-pattern": (
        Net2d,
        (2, 3, 12, 16),
        ["stem", "block.1", "block.3"],
        {"alpha_pattern": {"block.1": 32}},
    ),
    "conv2d-dora": (Net2d, (2, 3, 12, 16), ["stem", "block.3"], {"use_dora": True}),
}


def _peft_pair(case: str, tmp_path):
    cls, shape, targets, extra = CASES[case]
    torch.manual_seed(0)
    base = cls().eval()
    x = torch.randn(*shape)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **extra)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.mul_(0.3)
    pm.save_pretrained(tmp_path / "peft")
    merged = pm.merge_and_unload().eval()
    onnx.save(export_proto(base, x), tmp_path / "base.onnx")
    onnx.save(export_proto(merged, x), tmp_path / "merged.onnx")
    return tmp_path / "peft", x


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_fuses_like_peft_merges(case, tmp_path, capsys):
    folder, _ = _peft_pair(case, tmp_path)
    assert main(["fuse", str(tmp_path / "base.onnx"), str(folder), "-o", str(tmp_path / "fused.onnx")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(folder)]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["kind"] == "peft-adapter" and sorted(described["modules"]) == sorted(CASES[case][2])
    meta = {p.key: p.value for p in onnx.load(tmp_path / "fused.onnx").metadata_props}
    assert meta["toolchain.adapter_format"] == "peft" and len(json.loads(meta["toolchain.fused_weights"])) == len(
        CASES[case][2]
    )
    capsys.readouterr()
    argv = [
        "verify",
        str(tmp_path / "fused.onnx"),
        "--reference",
        str(tmp_path / "merged.onnx"),
        "--data",
        "none",
        "--random",
        "8",
        "--out-dir",
        str(tmp_path / "v"),
    ]
    assert main(argv) == 0, capsys.readouterr()
    report = json.loads((tmp_path / "v" / "verify.json").read_text())
    assert report["comparisons"]["model"]["atol"] == 1e-4 and report["passed"]
    base_err = main(
        [
            "verify",
            str(tmp_path / "base.onnx"),
            "--reference",
            str(tmp_path / "merged.onnx"),
            "--data",
            "none",
            "--out-dir",
            str(tmp_path / "w"),
        ]
    )
    assert base_err == 1, "the adapter must change the model, or the check above proves nothing"


def test_peft_on_a_grouped_conv_is_refused(tmp_path, capsys):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv1d(8, 8, 3, padding=1, groups=2), nn.Conv1d(8, 4, 1)).eval()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)
        )
    pm.save_pretrained(tmp_path / "peft")
    onnx.save(export_proto(base, torch.randn(1, 8, 16)), tmp_path / "base.onnx")
    assert main(["fuse", str(tmp_path / "base.onnx"), str(tmp_path / "peft"), "-o", str(tmp_path / "f.onnx")]) == 2
    assert "grouped or depthwise conv cannot be merged" in capsys.readouterr().err
    assert not (tmp_path / "f.onnx").exists()


def test_peft_on_a_linear_layer_or_other_model_is_refused(tmp_path, capsys):
    folder, _ = _peft_pair("conv1d-lora", tmp_path)
    other = Net2d().eval()
    onnx.save(export_proto(other, torch.randn(1, 3, 12, 16)), tmp_path / "other.onnx")
    assert main(["fuse", str(tmp_path / "other.onnx"), str(folder), "-o", str(tmp_path / "f.onnx")]) == 2
    assert "no (or no unique) Conv weight" in capsys.readouterr().err
    torch.manual_seed(0)
    pm = peft.get_peft_model(Net1d(), peft.LoraConfig(r=2, target_modules=["head"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "lin")
    assert main(["fuse", str(tmp_path / "base.onnx"), str(tmp_path / "lin"), "-o", str(tmp_path / "g.onnx")]) == 2
    assert "no (or no unique) Conv weight" in capsys.readouterr().err


def test_peft_reader_is_strict_about_its_files(tmp_path, capsys):
    folder, _ = _peft_pair("conv1d-lora", tmp_path)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "bias": "all"}))
    assert main(["fuse", str(tmp_path / "base.onnx"), str(folder), "-o", str(tmp_path / "f.onnx")]) == 2
    assert "bias" in capsys.readouterr().err
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data + b"\0" * 8)
    assert main(["fuse", str(tmp_path / "base.onnx"), str(folder), "-o", str(tmp_path / "f.onnx")]) == 2
    assert "bytes no tensor owns" in capsys.readouterr().err
    assert np.all([not p.name.endswith(".partial") for p in tmp_path.iterdir()])
