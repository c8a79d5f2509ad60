"""Image data and 2-D models through every stage; input shapes other than (6, 128)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from toolchain.cli import main
from toolchain.data.images import CORRUPTIONS, corrupt, load_digits_shift, load_image_folder
from toolchain.data.sources import default_target_subjects, load_data


def test_digits_shift_is_real_disjoint_and_graded():
    ds = load_digits_shift(3)
    assert ds.X.shape[1:] == (1, 32, 32) and ds.X.dtype == np.float32
    assert 0.0 <= ds.X.min() and ds.X.max() <= 1.0
    assert sorted(set(ds.subject.tolist())) == [0, 1, 2, 3, 4] and ds.classes == [str(i) for i in range(10)]
    n_src = int((ds.subject == 0).sum())
    assert n_src + 4 * int((ds.subject == 1).sum()) == len(ds) and abs(n_src - 1797 // 2) <= 1
    assert default_target_subjects(ds) == (1, 2, 3, 4)
    clean = ds.X[ds.subject == 0][:, 0]
    src_keys = {im.tobytes() for im in clean}
    # the target half holds other scans: its blur at severity 1 matches no clean source image
    assert not src_keys & {im.tobytes() for im in load_digits_shift(1).X[ds.subject == 2][:, 0]}
    base = clean[:50]
    for kind in CORRUPTIONS:
        dev = [float(np.abs(corrupt(base, kind, s, 0) - base).mean()) for s in (1, 3, 5)]
        assert dev[0] < dev[1] < dev[2], (kind, dev)


def test_image_folder_with_domains(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for domain in ("day", "night"):
        for cls in ("cat", "dog"):
            (tmp_path / domain / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(
                    tmp_path / domain / cls / f"{i}.png"
                )
    ds = load_image_folder(tmp_path, 16)
    assert ds.X.shape == (12, 3, 16, 16) and ds.classes == ["cat", "dog"]
    assert sorted(set(ds.subject.tolist())) == [0, 1]
    assert load_data(f"imagefolder:{tmp_path}:8").X.shape == (12, 3, 8, 8)


def _npz(path, shape, n=96, classes=3, subjects=4):
    rng = np.random.default_rng(0)
    y = np.arange(n) % classes
    X = rng.standard_normal((n, *shape)).astype(np.float32) + y.reshape(-1, *[1] * len(shape))
    np.savez(path, X=X, y=y, subject=np.arange(n) % subjects)
    return str(path)


@pytest.mark.parametrize(
    ("shape", "model"), [((6, 200), "cnn1d"), ((3, 20, 28), "resnet18"), ((1, 24, 16), "mobilenetv2")]
)
def test_other_input_shapes_through_pretrain_export_verify(tmp_path, shape, model):
    data = _npz(tmp_path / "d.npz", shape)
    ck, ad = tmp_path / "b.pt", tmp_path / "a.safetensors"
    assert (
        main(
            [
                "pretrain",
                "--model",
                model,
                "--data",
                data,
                "--out",
                str(ck),
                "--steps",
                "3",
                "--batch-size",
                "16",
                "--no-progress",
            ]
        )
        == 0
    )
    assert torch.load(ck, weights_only=True)["input_shape"] == list(shape)
    assert (
        main(
            [
                "finetune",
                "--checkpoint",
                str(ck),
                "--out",
                str(ad),
                "--steps",
                "3",
                "--batch-size",
                "8",
                "--no-progress",
            ]
        )
        == 0
    )
    for kind, extra in (("base", []), ("unfused", ["--adapter", str(ad)]), ("fused", ["--adapter", str(ad), "--fuse"])):
        assert main(["export", "--checkpoint", str(ck), *extra, "-o", str(tmp_path / f"{kind}.onnx")]) == 0
    dims = [d.dim_value for d in onnx.load(tmp_path / "fused.onnx").graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, *shape]
    assert (
        main(
            [
                "verify",
                str(tmp_path / "fused.onnx"),
                "--reference",
                str(tmp_path / "unfused.onnx"),
                "--data",
                data,
                "--out-dir",
                str(tmp_path / "v"),
                "--real",
                "4",
                "--random",
                "2",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "v" / "verify.json").read_text())["real_batches"] == 4


def test_finetune_refuses_data_of_another_shape(tmp_path, capsys):
    ck = tmp_path / "b.pt"
    assert (
        main(
            [
                "pretrain",
                "--data",
                _npz(tmp_path / "d.npz", (6, 200)),
                "--out",
                str(ck),
                "--steps",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    rc = main(
        [
            "finetune",
            "--checkpoint",
            str(ck),
            "--data",
            _npz(tmp_path / "e.npz", (6, 150)),
            "--out",
            str(tmp_path / "a.safetensors"),
            "--steps",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 2 and "differs from the shape the model was trained on" in capsys.readouterr().err
    rc = main(["export", "--checkpoint", str(ck), "--input-shape", "6,150", "-o", str(tmp_path / "m.onnx")])
    assert rc == 0, "cnn1d pools globally, so another length is a valid explicit override"
    assert main(["export", "--checkpoint", str(ck), "--input-shape", "3,150", "-o", str(tmp_path / "n.onnx")]) == 2


@pytest.mark.slow
def test_digits_pipeline_with_real_images_as_verify_feeds(tmp_path):
    ck, ad = tmp_path / "b.pt", tmp_path / "a.safetensors"
    assert (
        main(
            [
                "pretrain",
                "--model",
                "resnet18",
                "--data",
                "digits",
                "--exclude-classes",
                "8,9",
                "--out",
                str(ck),
                "--steps",
                "20",
                "--no-progress",
            ]
        )
        == 0
    )
    assert main(["finetune", "--checkpoint", str(ck), "--out", str(ad), "--steps", "10", "--no-progress"]) == 0
    for kind, extra in (("unfused", ["--adapter", str(ad)]), ("fused", ["--adapter", str(ad), "--fuse"])):
        assert main(["export", "--checkpoint", str(ck), *extra, "-o", str(tmp_path / f"{kind}.onnx")]) == 0
    out = onnx.load(tmp_path / "fused.onnx").graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in out] == [1, 10], "unseen classes 8 and 9 reach the fused model"
    assert (
        main(
            [
                "verify",
                str(tmp_path / "fused.onnx"),
                "--reference",
                str(tmp_path / "unfused.onnx"),
                "--data",
                "digits",
                "--out-dir",
                str(tmp_path / "v"),
                "--real",
                "6",
                "--random",
                "2",
            ]
        )
        == 0
    )


@pytest.mark.parametrize(
    ("mode", "dark", "bright", "peak"), [("I;16", 1000, 60000, 65535), ("I", 300, 40000, 65535), ("L", 10, 250, 255)]
)
def test_high_bit_depth_images_keep_their_range(tmp_path, mode, dark, bright, peak):
    """16-bit PNGs used to be clipped to 255 by convert("L"): two classes became identical (R1)."""
    from PIL import Image

    from toolchain.data.images import load_image_folder

    for cls, value in (("dark", dark), ("bright", bright)):
        (tmp_path / cls).mkdir()
        dtype = {"I;16": np.uint16, "I": np.int32, "L": np.uint8}[mode]
        im = Image.fromarray(np.full((8, 8), value, dtype))
        assert im.mode == mode
        im.save(
            tmp_path / cls / "a.png", format="TIFF" if mode == "I" else "PNG"
        )  # PNG cannot hold mode I; the loader reads content, not names
    ds = load_image_folder(tmp_path, size=8)
    by_class = {ds.classes[c]: float(ds.X[ds.y == c].mean()) for c in range(2)}
    assert by_class["dark"] == pytest.approx(dark / peak, abs=1e-4) and by_class["bright"] == pytest.approx(
        bright / peak, abs=1e-4
    )


def test_float_images_outside_unit_range_are_refused(tmp_path):
    from PIL import Image

    from toolchain.core.errors import ToolchainError
    from toolchain.data.images import load_image_folder

    (tmp_path / "c").mkdir()
    Image.fromarray(np.full((8, 8), 7.5, np.float32)).save(tmp_path / "c" / "a.png", format="TIFF")
    with pytest.raises(ToolchainError, match="pixel range is not known"):
        load_image_folder(tmp_path, size=8)


def test_decoded_size_is_bounded_before_decoding(tmp_path):
    from PIL import Image

    from toolchain.core.errors import ToolchainError
    from toolchain.data import images

    (tmp_path / "c").mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "c" / f"{i}.png")
    old = images.MAX_DECODED_BYTES
    try:
        images.MAX_DECODED_BYTES = 3 * 3 * 64 * 64 * 4 - 1
        with pytest.raises(ToolchainError, match="decoded images would take more than"):
            images.load_image_folder(tmp_path, size=64)
    finally:
        images.MAX_DECODED_BYTES = old
