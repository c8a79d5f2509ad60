"""Quantization-aware training of the *base* before adaptation, against the same training in float:
does it make the adapter fused into the INT8 base agree with the FP32 fused model? (Negative result,
docs/BENCHMARKS.md, "mobilenet1d: quantization-aware training of the base".)

    python scripts/int8_qat_base.py DIR --out OUT [--seed 0] [--epochs 1] [--lr 1e-4] [--float-control]

DIR is a folder `scripts/bench_int8.py --models mobilenet1d` wrote (base.pt, base.int8.onnx). Step 1
trains every base weight on the source subjects for EPOCHS at LR, conv weights fake-quantized per output
channel (max |W|/127, straight-through) and conv inputs fake-quantized at the INT8 base's own activation
scales (``toolchain.qat.quantized_inputs``); `--float-control` runs the same training with no fake
quantization. Then the user's CLI, as bench_int8.py runs it: finetune (15 epochs, --seed), export, fuse,
quantize (watch, 256 batches), fuse into the INT8 base with and without `--recalibrate watch`, and
verify both against the FP32 fused model on the 205 target test windows. Prints one line per route.
Writes only under OUT.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from toolchain.data.sources import load_data
from toolchain.data.windows import split_subjects
from toolchain.kernels.quant import channel_scales
from toolchain.models.registry import load_checkpoint, save_checkpoint
from toolchain.qat import QMAX, QMIN, quantized_inputs, read_int8_base
from toolchain.train import TrainConfig, evaluate, seed_everything, train

CPU = torch.device("cpu")


class PerChannelFakeQuant(nn.Module):
    """Symmetric INT8 per output channel at the scales `toolchain fuse` writes (kernels.quant.channel_scales)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s = torch.from_numpy(channel_scales(w.detach().numpy(), axis=0))
        zero = torch.zeros_like(s, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, s, zero, 0, QMIN, QMAX)


def train_base(src: Path, int8: Path, out: Path, epochs: int, lr: float, fake_quant: bool) -> None:
    """Continue training the base on its source subjects, fake-quantized or in float; save to OUT."""
    seed_everything(0)
    model, payload = load_checkpoint(src)
    scales = read_int8_base(int8, model).scales if fake_quant else {}
    source, target = split_subjects(
        load_data(payload.get("data") or "watch"), tuple(payload["pretrain"]["target_subjects"])
    )
    modules = dict(model.named_modules())
    for path in scales:
        parametrize.register_parametrization(modules[path], "weight", PerChannelFakeQuant())
    with quantized_inputs(model, scales):
        train(model, source, TrainConfig(lr=lr, batch_size=64, epochs=epochs, progress=False))
    for path in scales:
        parametrize.remove_parametrizations(modules[path], "weight", leave_parametrized=False)
    print(f"base after training (float): source {evaluate(model, source, CPU)}, target {evaluate(model, target, CPU)}")
    extra = {k: v for k, v in payload.items() if k in ("data", "pretrain")}
    shape = tuple(payload["input_shape"])
    save_checkpoint(model, out, spec=payload["model"], classes=payload["classes"], input_shape=shape, extra=extra)


def cli(*args: str, check: bool = True) -> None:
    subprocess.run(["toolchain", *args], check=check, capture_output=True)


def adapt_and_verify(out: Path, seed: int) -> None:
    """The user's pipeline on the trained base; one line per INT8 route."""
    ckpt, adapter, base, fused, base8 = (
        str(out / n) for n in ("base.pt", "adapter.safetensors", "base.onnx", "fused.onnx", "base.int8.onnx")
    )
    train_args = ["--epochs", "15", "--seed", str(seed), "--no-progress"]
    cli("finetune", "--checkpoint", ckpt, *train_args, "--out", adapter, "--force")
    cli("export", "--checkpoint", ckpt, "-o", base, "--force")
    cli("fuse", base, adapter, "-o", fused, "--force")
    cli("quantize", base, "-o", base8, "--data", "watch", "--force")
    routes = {"fused into the INT8 base": [], "+ --recalibrate watch": ["--recalibrate", "watch"]}
    for i, (name, extra) in enumerate(routes.items()):
        model, vdir = str(out / f"fused{i}.int8.onnx"), out / f"verify{i}"
        cli("fuse", base8, adapter, "-o", model, *extra, "--force")
        data = ["--data", "watch", "--split", "target-test"]
        cli("verify", model, "--reference", fused, *data, "--out-dir", str(vdir), "--force", check=False)
        a = json.loads((vdir / "verify.json").read_text())["agreement"]
        print(
            f"{name}: agreement {a['top1_agreement']:.4f} ({a['flipped']} flips of {a['windows']}), "
            f"macro-F1 INT8 {a['f1_model']:.4f} / FP32 {a['f1_reference']:.4f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path, help="a bench_int8.py mobilenet1d folder (base.pt, base.int8.onnx)")
    ap.add_argument("--out", type=Path, required=True, help="new folder for this run's models")
    ap.add_argument("--seed", type=int, default=0, help="finetune seed (default 0)")
    ap.add_argument("--epochs", type=int, default=1, help="base training epochs (default 1)")
    ap.add_argument("--lr", type=float, default=1e-4, help="base training learning rate (default 1e-4)")
    ap.add_argument("--float-control", action="store_true", help="train the base in float (the control)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train_base(
        args.dir / "base.pt",
        args.dir / "base.int8.onnx",
        args.out / "base.pt",
        args.epochs,
        args.lr,
        fake_quant=not args.float_control,
    )
    adapt_and_verify(args.out, args.seed)


if __name__ == "__main__":
    main()
