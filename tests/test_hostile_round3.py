"""Hostile inputs, round three (issue R1-R42): each case is one line on stderr, exit status 2, no
traceback, no new file and no input changed (``run_refused``); cases that need more follow the table.
R1, R11, R12 (image folders) are in tests/toolchain/test_images.py; R41 and the --layers regexes in
tests/toolchain/test_inject.py; the cache records (R21-R23) in tests/toolchain/grid/test_runner.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from safetensors.numpy import save_file

from tests.test_refusals import _external, _fuse, _good, run_refused
from toolchain.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _peft(d: Path, config: dict | str, tensors: dict | None = None) -> list[str]:
    """A PEFT LoRA folder for module "conv" (4 -> 6 channels, 3x3, r 2) with ``config`` merged in."""
    base, _ = _good(d)
    folder = d / "peft"
    folder.mkdir()
    body = config if isinstance(config, str) else json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config})
    (folder / "adapter_config.json").write_text(body)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 4, 3, 3)).astype(np.float32), rng.standard_normal((6, 2, 1, 1)).astype(np.float32)
    tensors = tensors or {"base_model.model.conv.lora_A.weight": a, "base_model.model.conv.lora_B.weight": b}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return _fuse(base, folder, d)


def _weight_as_output(d: Path) -> list[str]:
    base, adapter = _good(d)
    model = onnx.load(base)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    w = next(t for t in model.graph.initializer if t.name == conv.input[1])
    model.graph.output.append(onnx.helper.make_tensor_value_info(w.name, w.data_type, list(w.dims)))
    onnx.save(model, d / "base_out.onnx")
    return _fuse(d / "base_out.onnx", adapter, d)


def _nul_location(d: Path, command: str) -> list[str]:
    ext = _external(d, "w\x00.bin")
    return _fuse(ext, d / "adapter.safetensors", d) if command == "fuse" else ["inspect", str(ext)]


def _opset(d: Path) -> list[str]:
    base, adapter = _good(d)
    model = onnx.load(base)
    model.opset_import[0].version = 99
    onnx.save(model, d / "op99.onnx")
    return _fuse(d / "op99.onnx", adapter, d)


def _manifest(d: Path, text: str) -> list[str]:
    (d / "m.json").write_text(text)
    (d / "ck.pt").write_bytes(b"x")
    return ["fleet", str(d / "m.json"), "--checkpoint", str(d / "ck.pt"), "--out", str(d / "fleet_out")]


def _npz(d: Path, **arrays: np.ndarray) -> Path:
    np.savez(d / "data.npz", **arrays)
    return d / "data.npz"


def _one_class(d: Path) -> list[str]:
    rng = np.random.default_rng(0)
    path = _npz(
        d,
        X=rng.standard_normal((40, 6, 32)).astype(np.float32),
        y=np.zeros(40, np.int64),
        subject=np.repeat([1, 2], 20),
    )
    return ["pretrain", "--data", str(path), "--out", str(d / "x.pt"), "--epochs", "1", "--no-progress"]


def _short_windows(d: Path) -> list[str]:
    rng = np.random.default_rng(0)
    path = _npz(
        d, X=rng.standard_normal((40, 6, 2)).astype(np.float32), y=np.tile([0, 1], 20), subject=np.repeat([1, 2], 20)
    )
    return ["pretrain", "--data", str(path), "--out", str(d / "x.pt"), "--epochs", "1", "--no-progress"]


def _huge_npz_header(d: Path) -> list[str]:
    path = _npz(d, X=np.zeros((2, 6, 8), np.float32), y=np.array([0, 1]), subject=np.array([1, 2]))
    import zipfile

    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members["X.npy"] = _npy_with_shape(members["X.npy"], (2_000_000, 6, 800_000))
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    return ["pretrain", "--data", str(path), "--out", str(d / "x.pt"), "--epochs", "1", "--no-progress"]


def _npy_with_shape(data: bytes, shape: tuple[int, ...]) -> bytes:
    """An .npy whose header declares ``shape`` (the data stays tiny)."""
    n = int.from_bytes(data[8:10], "little")
    header = data[10 : 10 + n].decode("latin1")
    import re

    header = re.sub(r"'shape': \([^)]*\)", f"'shape': {shape}", header).rstrip()
    header = header + " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    return data[:8] + len(header).to_bytes(2, "little") + header.encode("latin1") + data[10 + n :]


def _same_in_out(d: Path) -> list[str]:
    rng = np.random.default_rng(0)
    path = _npz(
        d, X=rng.standard_normal((40, 6, 32)).astype(np.float32), y=np.tile([0, 1], 20), subject=np.repeat([1, 2], 20)
    )
    return ["pretrain", "--data", str(path), "--out", str(path), "--force", "--epochs", "1", "--no-progress"]


def _compare_onto_user_folder(d: Path) -> list[str]:
    (d / "mine").mkdir()
    (d / "mine" / "results.md").write_text("my notes\n")
    return ["compare", "--out", str(d / "mine"), "--methods", "head", "--steps", "5"]


CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "R2 compare onto a user's folder": (_compare_onto_user_folder, "not a compare folder"),
    "R3 weight is a graph output": (_weight_as_output, "is also a graph output"),
    "R4 alpha_pattern invalid regex": (
        lambda d: _peft(d, {"alpha_pattern": {"conv(": 8}}),
        "not a valid regular expression",
    ),
    "R4 alpha_pattern null value": (
        lambda d: _peft(d, {"alpha_pattern": {"conv": None}}),
        "alpha_pattern values must be a finite number",
    ),
    "R4 alpha_pattern list value": (
        lambda d: _peft(d, {"alpha_pattern": {"conv": [8]}}),
        "alpha_pattern values must be a finite number",
    ),
    "R30 alpha_pattern value as a string": (
        lambda d: _peft(d, {"alpha_pattern": {"conv": "32"}}),
        "alpha_pattern values must be a finite number",
    ),
    "R30 rank_pattern value zero": (
        lambda d: _peft(d, {"rank_pattern": {"conv": 0}}),
        "rank_pattern values must be an integer >= 1",
    ),
    "R5 catastrophic alpha_pattern": (lambda d: _peft(d, {"alpha_pattern": {"(a+)+$": 8}}), "exponential time"),
    "R6 rank-0 tensors": (
        lambda d: _peft(
            d,
            {},
            {
                "base_model.model.conv.lora_A.weight": np.array(1.0, np.float32),
                "base_model.model.conv.lora_B.weight": np.array(1.0, np.float32),
            },
        ),
        "no dimensions",
    ),
    "R7 NUL in external data location (fuse)": (
        lambda d: _nul_location(d, "fuse"),
        "relative path inside the model's folder",
    ),
    "R7 NUL in external data location (inspect)": (
        lambda d: _nul_location(d, "inspect"),
        "relative path inside the model's folder",
    ),
    "R13 windows too short for the model": (_short_windows, "cannot run on the data"),
    "R15 seed past 2**32": (
        lambda d: ["pretrain", "--seed", str(2**40), "--out", str(d / "x.pt")],
        "--seed must be an integer from 0 to 4294967295",
    ),
    "R15 negative seed (finetune)": (
        lambda d: ["finetune", "--seed", "-1", "--out", str(d / "x.safetensors")],
        "--seed must be an integer",
    ),
    "R16 adapter reduction 0": (
        lambda d: ["finetune", "--method", "adapter", "--reduction", "0", "--out", str(d / "x.safetensors")],
        "--reduction must be an integer from 1",
    ),
    "R17 verify --real huge": (
        lambda d: ["verify", "a.onnx", "--reference", "b.onnx", "--real", "1000000000"],
        "--real must be an integer from 0 to 10000",
    ),
    "R17 verify --random huge": (
        lambda d: ["verify", "a.onnx", "--reference", "b.onnx", "--random", "100000000"],
        "--random must be an integer from 1 to 10000",
    ),
    "R18 manifest nested 100,000 deep": (
        lambda d: _manifest(d, "[" * 100_000 + "]" * 100_000),
        "nested deeper than 64 levels",
    ),
    "R24 fleet user named cache": (
        lambda d: _manifest(d, json.dumps({"data": "watch", "users": [{"name": "cache"}]})),
        "none of ['cache', 'fleet.json', 'summary.csv', 'summary.md']",
    ),
    "R25 pretrain output is its data": (_same_in_out, "must not be one of the inputs"),
    "R28 npz header declares a huge array": (_huge_npz_header, "declares"),
    "R31 one-class data": (_one_class, "at least two classes"),
    "R33 scaling inf": (
        lambda d: ["finetune", "--scaling", "inf", "--out", str(d / "x.safetensors")],
        "--scaling must be a finite number",
    ),
    "R34 manifest with two users keys": (
        lambda d: _manifest(d, '{"data": "watch", "users": [{"name": "a"}], "users": [{"name": "b"}]}'),
        "duplicate key 'users'",
    ),
    "R35 fleet --layers regex checked first": (
        lambda d: [*_manifest(d, json.dumps({"data": "watch", "users": [{"name": "a"}]})), "--layers", "("],
        "not a valid regular expression",
    ),
    "R36 compare --steps 0": (
        lambda d: ["compare", "--steps", "0", "--out", str(d / "c")],
        "--steps must be an integer from 1",
    ),
    "R36 compare --eval-every -1": (
        lambda d: ["compare", "--eval-every", "-1", "--out", str(d / "c")],
        "--eval-every must be an integer from 1",
    ),
    "R37 opset 99 base": (_opset, "opset is outside what this onnx knows"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_round3_refusal(case, tmp_path, capsys):
    run_refused(*CASES[case], tmp_path, capsys)


def test_r38_manifest_errors_name_the_field_not_the_content(tmp_path, capsys):
    secret = "my-private-notes-about-this-user"
    argv = _manifest(tmp_path, json.dumps({"data": "watch", "users": [{"name": "a", "comment": secret}]}))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "manifest user 0" in err and secret not in err


def test_r40_tolerance_for_an_output_the_model_lacks(tmp_path, capsys):
    base, adapter = _good(tmp_path)
    assert main(["fuse", str(base), str(adapter), "-o", str(tmp_path / "f.onnx")]) == 0
    argv = [
        "verify",
        str(tmp_path / "f.onnx"),
        "--reference",
        str(base),
        "--data",
        "none",
        "--atol",
        "nosuchoutput:1",
        "--out-dir",
        str(tmp_path / "v"),
    ]
    assert main(argv) == 2
    assert "names an output the model does not have" in capsys.readouterr().err and not (tmp_path / "v").exists()


def test_r8_verify_refuses_models_with_other_outputs_before_writing(tmp_path, capsys):
    base, _ = _good(tmp_path)
    model = onnx.load(base)
    model.graph.output[0].name = "renamed"
    model.graph.node[-1].output[0] = "renamed"
    onnx.save(model, tmp_path / "other.onnx")
    assert (
        main(
            [
                "verify",
                str(tmp_path / "other.onnx"),
                "--reference",
                str(base),
                "--data",
                "none",
                "--out-dir",
                str(tmp_path / "v"),
            ]
        )
        == 2
    )
    assert "different outputs" in capsys.readouterr().err and not (tmp_path / "v").exists()


@pytest.mark.parametrize("delay", [0.2, 0.5, 0.9, 1.4])
def test_r9_sigterm_during_verify_leaves_nothing_and_never_passes(tmp_path, delay):
    """SIGTERM at several moments of a verify run: all three files or none, never PASSED without
    them. Exit 143 when main() handled the signal; -15 when it landed before main() installed its
    handler (during imports) or after main() had returned (the files were whole by then)."""
    base, adapter = _good(tmp_path)
    assert main(["fuse", str(base), str(adapter), "-o", str(tmp_path / "f.onnx")]) == 0
    out = tmp_path / "v"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "toolchain.cli",
            "verify",
            str(tmp_path / "f.onnx"),
            "--reference",
            str(tmp_path / "f.onnx"),
            "--data",
            "none",
            "--random",
            "50",
            "--out-dir",
            str(out),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    files = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert proc.returncode in (0, 143, -signal.SIGTERM), (proc.returncode, stderr[-500:])
    assert files in ([], ["inputs.json", "outputs.json", "verify.json"]), files
    if proc.returncode == 143:
        assert files == [] and "PASSED" not in stdout and "terminated" in stderr
    if not files:
        assert "PASSED" not in stdout
    if proc.returncode == 0:
        assert files


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ("1 1 5 x 1232\n", "must hold numbers only"),
        (b"1 1 5 \xff\xfe 1232\n", "must hold numbers only"),
        ("1 1 5 250.5 1232\n", "whole numbers"),
        ("1 1 5 -3 1232\n", "whole numbers"),
        ("1 1 5 1232 250\n", "first sample <= last"),
        ("1 1 5 nan 1232\n", "NaN or Inf"),
    ],
)
def test_r10_r32_hapt_labels_are_refused_not_coerced(tmp_path, capsys, labels, message):
    raw = tmp_path / "hapt" / "RawData"
    raw.mkdir(parents=True)
    (raw / "labels.txt").write_bytes(labels if isinstance(labels, bytes) else labels.encode())
    run_refused(
        lambda d: ["pretrain", "--data", f"hapt:{tmp_path / 'hapt'}", "--out", str(d / "x.pt")],
        message,
        tmp_path,
        capsys,
    )


def test_r14_pretrain_on_everything(tmp_path, capsys):
    assert (
        main(["pretrain", "--target-subjects", "", "--epochs", "1", "--out", str(tmp_path / "all.pt"), "--no-progress"])
        == 0
    )
    assert "no target subjects held out" in capsys.readouterr().out and (tmp_path / "all.pt").is_file()


def test_r26_a_full_disk_while_writing_a_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    import torch

    def full(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: file "
            "write failed"
        )

    monkeypatch.setattr(torch, "save", full)
    assert main(["pretrain", "--epochs", "1", "--out", str(tmp_path / "x.pt"), "--no-progress"]) == 2
    assert "cannot write the checkpoint" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_r27_r39_api_refuses_wrong_use():
    import torch

    import toolchain.api as tc
    from toolchain.core.errors import ToolchainError

    net = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3), torch.nn.ReLU())
    tc.adapt(net, "lora-edge", rank=2)
    with pytest.raises(ToolchainError, match="already adapted"):
        tc.adapt(net, "lora", rank=2)
    with pytest.raises(ToolchainError, match=r"takes a torch\.nn\.Module"):
        tc.adapt(None)  # type: ignore[arg-type]
    for bad in (np.zeros((0, 2, 8), np.float32), np.array([["a", "b"]])):
        with pytest.raises(ToolchainError, match="numeric array"):
            tc.verify("a.onnx", "b.onnx", "out", inputs=bad)


def test_r11_a_png_text_chunk_past_pillows_limit_is_one_line(tmp_path, capsys):
    from PIL import Image, PngImagePlugin

    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / cls / "ok.png")
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * (PngImagePlugin.MAX_TEXT_CHUNK + 10), zip=True)  # inflates past the limit
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / "a" / "bomb.png", pnginfo=info)
    run_refused(
        lambda d: [
            "pretrain",
            "--model",
            "resnet18",
            "--data",
            f"imagefolder:{tmp_path / 'imgs'}",
            "--out",
            str(d / "x.pt"),
        ],
        "cannot read an image",
        tmp_path,
        capsys,
    )


def test_r42_fleet_on_a_full_disk_leaves_no_empty_folder(tmp_path, capsys, monkeypatch):
    import toolchain.fleet as fleet

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    argv = _manifest(tmp_path, json.dumps({"data": "watch", "users": [{"name": "a"}]}))
    monkeypatch.setattr(fleet, "write_bytes_atomic", full)
    assert main(argv) == 2
    assert "No space left on device" in capsys.readouterr().err and not (tmp_path / "fleet_out").exists()
