"""Prepare, on a host with the `train` extra, the bundle `run_on_orin.sh` runs on the Orin Nano.

One pretrained base (cnn1d on the embedded watch data) and a matrix of cases
{LoRA-Edge on all convs, LoRA-Edge with BatchNorm trained, BitFit} x {default export, --fold-bn}.
Each case folder holds base.onnx, two adapters (seeds 0 and 1) and the unfused exports of both
(references), plus `expect`: `individual` or `all` (the refit mode `build --refit` must choose) or
`refused-at-fuse` (BatchNorm folded at export cannot take trained BN parameters). The device needs
no torch: it fuses, builds, verifies, refits and times from these files.

    python3 scripts/jetson/prepare_bundle.py --out orin_bundle      # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from toolchain.cli import main

ADAPTERS = {"le_all": [], "le_bn": ["--train", "bn"], "bitfit": ["--method", "bitfit"]}
EXPORTS = {"default": [], "foldbn": ["--fold-bn"]}
EXPECT = {
    ("le_all", "default"): "individual",
    ("le_all", "foldbn"): "individual",
    ("le_bn", "default"): "all",
    ("bitfit", "default"): "all",
}


def _run(argv: list[str]) -> None:
    if main(argv) != 0:
        raise BundleError(f"failed: toolchain {' '.join(argv)} (no bundle was left)")


class BundleError(Exception):
    """The bundle cannot be made where asked; the message says why and what to do."""


def prepare(out: Path, epochs: int, steps: int, only: set[str] | None = None) -> list[str]:
    """Make the bundle in a temporary folder beside ``out`` and rename it to ``out`` at the end: a run
    that fails (or is interrupted) leaves no partial bundle, and an existing ``out`` is never touched."""
    if out.exists() or out.is_symlink():
        raise BundleError(f"{out} exists; choose another --out or remove it first (nothing was written)")
    if not out.parent.is_dir():
        raise BundleError(f"the folder {out.parent} does not exist; create it first")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        cases = _prepare(staging, epochs, steps, only)
        staging.rename(out)  # fails if out appeared meanwhile: then nothing of another run is replaced
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return cases


def _prepare(out: Path, epochs: int, steps: int, only: set[str] | None) -> list[str]:
    ckpt = out / "base.pt"
    _run(["pretrain", "--out", str(ckpt), "--epochs", str(epochs), "--no-progress"])
    cases = []
    for adapter, a_args in ADAPTERS.items():
        if only is not None and not any(name.startswith(adapter + "-") for name in only):
            continue
        tensors = out / "adapters" / adapter
        tensors.mkdir(parents=True)
        for seed in (1, 2):
            _run(
                [
                    "finetune",
                    "--checkpoint",
                    str(ckpt),
                    "--out",
                    str(tensors / f"adapter{seed}.safetensors"),
                    "--steps",
                    str(steps),
                    "--seed",
                    str(seed),
                    "--lr",
                    "1e-2",
                    *a_args,
                    "--no-progress",
                ]
            )
        for export, e_args in EXPORTS.items():
            if only is not None and f"{adapter}-{export}" not in only:
                continue
            case = out / f"{adapter}-{export}"
            case.mkdir()
            _run(["export", "--checkpoint", str(ckpt), *e_args, "-o", str(case / "base.onnx")])
            # INT8: the base quantized once here (host side; the device has no quantizer); the device fuses into it
            _run(
                ["quantize", str(case / "base.onnx"), "-o", str(case / "base.int8.onnx"), "--calibration-batches", "64"]
            )
            for seed in (1, 2):
                shutil.copy(tensors / f"adapter{seed}.safetensors", case / f"adapter{seed}.safetensors")
                _run(
                    [
                        "export",
                        "--checkpoint",
                        str(ckpt),
                        "--adapter",
                        str(tensors / f"adapter{seed}.safetensors"),
                        "-o",
                        str(case / f"unfused{seed}.onnx"),
                    ]
                )
            (case / "expect").write_text(EXPECT.get((adapter, export), "refused-at-fuse") + "\n")
            cases.append(case.name)
    shutil.rmtree(out / "adapters")
    (out / "cases.txt").write_text("\n".join(cases) + "\n")
    return cases


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="orin_bundle")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument(
        "--only", default=None, help="comma-separated case names, e.g. le_all-default,bitfit-default (default: all six)"
    )
    a = ap.parse_args()
    try:
        names = prepare(Path(a.out), a.epochs, a.steps, set(a.only.split(",")) if a.only else None)
    except BundleError as err:
        print(f"prepare_bundle.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(names))
