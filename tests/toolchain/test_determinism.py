"""A seed determines a run on a given machine: the same command twice gives identical weights."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from toolchain.adapters.adapter_file import load_adapter
from toolchain.cli import main
from toolchain.kernels import delta_weight, suffix_kernel
from toolchain.peft.lora_edge import LoRAEdgeConv


def test_pretrain_twice_gives_identical_weights(tmp_path):
    for name in ("a.pt", "b.pt"):
        assert main(["pretrain", "--steps", "40", "--seed", "3", "--out", str(tmp_path / name), "--no-progress"]) == 0
    a = torch.load(tmp_path / "a.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert main(["pretrain", "--steps", "40", "--seed", "4", "--out", str(tmp_path / "c.pt"), "--no-progress"]) == 0
    c = torch.load(tmp_path / "c.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(a[k], c[k]) for k in a), "another seed must give another model"


def test_finetune_with_random_init_twice_gives_identical_adapters(tmp_path):
    assert main(["pretrain", "--steps", "5", "--out", str(tmp_path / "base.pt"), "--no-progress"]) == 0
    for name in ("a", "b"):
        argv = [
            "finetune",
            "--checkpoint",
            str(tmp_path / "base.pt"),
            "--method",
            "lora",
            "--rank",
            "2",
            "--steps",
            "5",
            "--out",
            str(tmp_path / f"{name}.safetensors"),
            "--no-progress",
        ]
        assert main(argv) == 0
    a, b = load_adapter(tmp_path / "a.safetensors"), load_adapter(tmp_path / "b.safetensors")
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        np.testing.assert_array_equal(a.tensors[k], b.tensors[k], err_msg=k)


def test_lora_edge_forward_applies_the_scaling():
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 8, 5, padding=2, bias=True)
    layer = LoRAEdgeConv.from_pretrained(conv, 3, scaling=0.37)
    with torch.no_grad():
        layer.delta_g1.normal_()
    x = torch.randn(2, 6, 20)
    cores = [c.numpy() for c in layer.suffix_cores()]
    ref_delta = delta_weight(layer.delta_g1.detach().numpy(), suffix_kernel(cores), 0.37)
    want = F.conv1d(x, conv.weight + torch.from_numpy(ref_delta), conv.bias, padding=2)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    unscaled = F.conv1d(x, conv.weight + torch.from_numpy(ref_delta / 0.37), conv.bias, padding=2)
    assert not torch.allclose(layer(x), unscaled, atol=1e-3), "the scaling must reach the forward"


def test_finetune_twice_writes_byte_identical_adapters(tmp_path):
    assert main(["pretrain", "--steps", "5", "--out", str(tmp_path / "base.pt"), "--no-progress"]) == 0
    for name in ("a", "b"):
        assert (
            main(
                [
                    "finetune",
                    "--checkpoint",
                    str(tmp_path / "base.pt"),
                    "--steps",
                    "3",
                    "--out",
                    str(tmp_path / f"{name}.safetensors"),
                    "--no-progress",
                ]
            )
            == 0
        )
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    from safetensors.numpy import load_file

    ours = load_adapter(tmp_path / "a.safetensors").tensors
    assert {k: v.shape for k, v in load_file(tmp_path / "a.safetensors").items()} == {
        k: v.shape for k, v in ours.items()
    }, "the safetensors library reads it too"
