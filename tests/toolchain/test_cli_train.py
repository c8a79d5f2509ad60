"""The training CLI end to end on the embedded default, and its refusals."""

import json
import subprocess
import sys

import onnx
import pytest
import torch

from toolchain.adapters.adapter_file import load_adapter
from toolchain.cli import main
from toolchain.core.fileio import _umask

QUICK = ["--epochs", "1", "--no-progress"]


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "base.pt"
    assert main(["pretrain", "--model", "cnn1d", "--out", str(path), *QUICK]) == 0
    return path


def test_finetune_writes_adapter_and_metrics(base_ckpt, tmp_path):
    out = tmp_path / "adapter.safetensors"
    assert (
        main(
            [
                "finetune",
                "--checkpoint",
                str(base_ckpt),
                "--rank",
                "2",
                "--out",
                str(out),
                "--steps",
                "30",
                "--no-progress",
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "adapter.metrics.json").read_text())
    for key in (
        "method",
        "rank",
        "trainable_params",
        "total_params",
        "trainable_fraction",
        "f1_before",
        "f1_after",
        "accuracy_before",
        "accuracy_after",
        "steps",
        "train_seconds",
        "peak_rss_mb",
    ):
        assert key in metrics
    assert metrics["steps"] == 30 and metrics["method"] == "lora-edge"
    adapter = load_adapter(out)
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not the 0600 of a temporary file
    assert len(adapter.layers) == 3 and all(layer.ranks[1] <= 2 for layer in adapter.layers)
    assert metrics["trainable_params"] == sum(
        adapter.tensors[layer.name + ".delta_g1"].size for layer in adapter.layers
    )


def test_existing_output_needs_force(base_ckpt, tmp_path, capsys):
    out = tmp_path / "a.safetensors"
    out.write_bytes(b"keep me")
    assert main(["finetune", "--checkpoint", str(base_ckpt), "--out", str(out), "--steps", "1", "--no-progress"]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["finetune", "--rank", "0"], "rank must be an integer >= 1"),
        (["finetune", "--targets", "net.head"], "must be a Conv1d or Conv2d"),
        (["finetune", "--targets", "nothing_here"], "no conv layer matches"),
        (["finetune", "--checkpoint", "{mismatch}"], "checkpoint does not fit the model"),
        (["finetune", "--checkpoint", "{garbage}"], "cannot read checkpoint"),
        (["finetune", "--data", "{notfolder}"], "not a HAPT folder"),
        (["pretrain", "--model", "transformer9000"], "unknown backbone"),
        (["pretrain", "--model", "{userfile}:missing"], "does not name a callable"),
        (
            ["finetune", "--device", "cuda"] if not torch.cuda.is_available() else ["finetune", "--device", "tpu"],
            "device",
        ),
    ],
)
def test_bad_input_is_one_clear_line(base_ckpt, tmp_path, capsys, argv, message):
    mismatch = tmp_path / "mismatch.pt"
    payload = torch.load(base_ckpt, weights_only=True)
    payload["model"] = "resnet1d"
    torch.save(payload, mismatch)
    (tmp_path / "garbage.pt").write_bytes(b"\x80not a checkpoint")
    (tmp_path / "notfolder" / "RawData").mkdir(parents=True)
    (tmp_path / "user.py").write_text("x = 1\n")
    subs = {
        "{mismatch}": str(mismatch),
        "{garbage}": str(tmp_path / "garbage.pt"),
        "{notfolder}": str(tmp_path / "notfolder"),
        "{userfile}": str(tmp_path / "user.py"),
    }
    argv = [subs.get(a, a.replace("{userfile}", str(tmp_path / "user.py"))) for a in argv]
    if argv[0] == "finetune" and "--checkpoint" not in argv:
        argv += ["--checkpoint", str(base_ckpt)]
    out = tmp_path / "out.file"
    rc = main([*argv, "--out", str(out), "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out.file*"))


def test_user_model_callable(tmp_path):
    (tmp_path / "mynet.py").write_text(
        "from torch import nn\n"
        "def build(in_channels, num_classes):\n"
        "    return nn.Sequential(nn.Conv1d(in_channels, 16, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool1d(1), "
        "nn.Flatten(), nn.Linear(16, num_classes))\n"
    )
    ckpt = tmp_path / "m.pt"
    spec = f"{tmp_path / 'mynet.py'}:build"
    assert main(["pretrain", "--model", spec, "--out", str(ckpt), "--steps", "3", "--no-progress"]) == 0
    # the checkpoint names user code: it runs only when the user passes --model again
    assert (
        main(
            [
                "finetune",
                "--checkpoint",
                str(ckpt),
                "--out",
                str(tmp_path / "a.safetensors"),
                "--steps",
                "3",
                "--no-progress",
            ]
        )
        == 2
    )
    assert not (tmp_path / "a.safetensors").exists()
    assert (
        main(
            [
                "finetune",
                "--checkpoint",
                str(ckpt),
                "--model",
                spec,
                "--out",
                str(tmp_path / "a.safetensors"),
                "--steps",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    assert [layer.name for layer in load_adapter(tmp_path / "a.safetensors").layers] == ["net.0"]


def test_console_script_exit_status_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "toolchain.cli", "finetune", "--checkpoint", str(tmp_path / "none.pt")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "checkpoint file does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_plain_state_dict_with_model_spec(tmp_path):
    """A user's own backbone and weights (a plain state_dict), adapted and exported through --model."""
    (tmp_path / "userbb.py").write_text(
        "from torch import nn\n"
        "def build(in_channels=6, num_classes=7):\n"
        "    return nn.Sequential(nn.Conv1d(in_channels, 12, 5, padding=2), nn.ReLU(), nn.Conv1d(12, 12, 3, "
        "padding=1), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(12, num_classes))\n"
    )
    spec = f"{tmp_path / 'userbb.py'}:build"
    import importlib.util

    mod_spec = importlib.util.spec_from_file_location("userbb", tmp_path / "userbb.py")
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    torch.manual_seed(0)
    torch.save(mod.build().state_dict(), tmp_path / "weights.pt")
    ad = tmp_path / "a.safetensors"
    assert (
        main(
            [
                "finetune",
                "--checkpoint",
                str(tmp_path / "weights.pt"),
                "--model",
                spec,
                "--out",
                str(ad),
                "--steps",
                "5",
                "--no-progress",
            ]
        )
        == 0
    )
    assert [layer.name for layer in load_adapter(ad).layers] == ["net.0", "net.2"]
    export = [
        "export",
        "--checkpoint",
        str(tmp_path / "weights.pt"),
        "--model",
        spec,
        "--adapter",
        str(ad),
        "--fuse",
        "-o",
        str(tmp_path / "f.onnx"),
    ]
    assert main(export) == 2, "a plain state_dict records no input shape"
    assert main([*export, "--input-shape", "6,200"]) == 0
    dims = [d.dim_value for d in onnx.load(tmp_path / "f.onnx").graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 6, 200]
    assert (
        main(
            [
                "finetune",
                "--checkpoint",
                str(tmp_path / "weights.pt"),
                "--out",
                str(tmp_path / "b.safetensors"),
                "--steps",
                "1",
                "--no-progress",
            ]
        )
        == 2
    )


def test_finetune_honours_weight_decay(tmp_path):
    """TrainConfig.weight_decay used to be dropped on the finetune path (issue 19): the optimizer finetune
    builds now carries it, and it changes the trained adapter."""
    from toolchain.peft.inject import AdaptConfig
    from toolchain.train import TrainConfig
    from toolchain.workflows import FinetuneJob, PretrainJob, finetune, pretrain

    ck = tmp_path / "b.pt"
    pretrain(PretrainJob(out=str(ck), train=TrainConfig(lr=2e-3, epochs=1, progress=False)))
    out = {}
    for wd in (0.0, 0.5):
        a = tmp_path / f"a{wd}.safetensors"
        finetune(
            FinetuneJob(
                checkpoint=str(ck),
                out=str(a),
                adapt=AdaptConfig(rank=2),
                train=TrainConfig(lr=5e-3, steps=10, weight_decay=wd, progress=False),
            )
        )
        out[wd] = a.read_bytes()
    assert out[0.0] != out[0.5]
