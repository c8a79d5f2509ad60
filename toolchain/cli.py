"""The ``toolchain`` command line. Heavy packages (torch, onnxruntime, tensorrt) load per command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from toolchain import __version__
from toolchain.errors import ToolchainError

Handler = Callable[[argparse.Namespace], int]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _train_args(p: argparse.ArgumentParser, lr: float, batch: int, epochs: int) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=float, default=lr, help=f"Adam learning rate (default {lr})")
    g.add_argument("--batch-size", type=int, default=batch, help=f"(default {batch})")
    g.add_argument("--epochs", type=int, default=epochs, help=f"passes over the training windows (default {epochs})")
    g.add_argument("--steps", type=int, default=0, help="optimizer steps; overrides --epochs when > 0")
    g.add_argument("--seed", type=int, default=0, help="(default 0)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _train_config(a: argparse.Namespace) -> Any:
    from toolchain.train import TrainConfig

    for name in ("lr", "batch_size", "epochs"):
        if getattr(a, name) <= 0:
            raise ToolchainError(f"--{name.replace('_', '-')} must be > 0", seen=getattr(a, name))
    return TrainConfig(lr=a.lr, batch_size=a.batch_size, epochs=a.epochs, steps=a.steps, seed=a.seed, device=a.device, progress=not a.no_progress)


def cmd_pretrain(a: argparse.Namespace) -> int:
    from toolchain.workflows import PretrainJob, pretrain

    m = pretrain(PretrainJob(out=a.out, model=a.model, data=a.data, targets=a.target_subjects, train=_train_config(a), force=a.force))
    print(f"pretrained {a.model} on subjects {m['source_subjects']}: source F1 {m['f1_source']:.3f}, "
          f"target {m['target_subjects']} F1 {m['f1_target']:.3f} ({m['steps']} steps, {m['train_seconds']:.1f} s) -> {a.out}")
    return 0


def cmd_finetune(a: argparse.Namespace) -> int:
    from toolchain.peft.inject import AdaptConfig
    from toolchain.workflows import FinetuneJob, finetune, metrics_path

    adapt = AdaptConfig(method=a.method, rank=a.rank, scaling=a.scaling, targets=a.targets, train=tuple(a.train), update_bn_stats=a.update_bn_stats)
    job = FinetuneJob(checkpoint=a.checkpoint, out=a.out, adapt=adapt, data=a.data, targets=a.target_subjects, train=_train_config(a), force=a.force)
    m = finetune(job)
    print(f"{m['method']} rank {m['rank']}: {m['trainable_params']} of {m['total_params']} parameters trained "
          f"({100 * m['trainable_fraction']:.2f}%), macro-F1 {m['f1_before']:.3f} -> {m['f1_after']:.3f}, "
          f"accuracy {m['accuracy_before']:.3f} -> {m['accuracy_after']:.3f} ({m['steps']} steps, {m['train_seconds']:.1f} s)")
    print(f"wrote {a.out} and {metrics_path(a.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toolchain", description=__doc__)
    parser.add_argument("--version", action="version", version=f"toolchain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="train a HAR backbone on the source subjects")
    p.add_argument("--model", default="cnn1d", help="cnn1d, resnet1d, mobilenet1d, path/file.py:callable or pkg.mod:callable (default cnn1d)")
    p.add_argument("--data", default="watch", help="watch (embedded default), hapt:FOLDER, a HAPT folder or file.npz (default watch)")
    p.add_argument("--target-subjects", type=_ints, default=None, help="subjects held out for adaptation (default: the dataset's usual ones)")
    p.add_argument("--out", default="base.pt", help="checkpoint to write (default base.pt)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    _train_args(p, 2e-3, 64, 8)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="adapt a checkpoint to target subjects; write an adapter")
    p.add_argument("--checkpoint", default="base.pt", help="base checkpoint from pretrain (default base.pt)")
    p.add_argument("--method", default="lora-edge", help="adaptation method (default lora-edge)")
    p.add_argument("--rank", type=int, default=4, help="TT rank, clipped per bond (default 4)")
    p.add_argument("--scaling", type=float, default=1.0, help="ΔW scale (default 1.0)")
    p.add_argument("--targets", default="all", help="convs to adapt: all, pointwise, or a regex on module names (default all)")
    p.add_argument("--train", action="append", default=[], choices=["head", "bn"], help="also train the classifier head or BatchNorm affine (repeatable)")
    p.add_argument("--update-bn-stats", action="store_true", help="let BatchNorm running statistics move (frozen by default)")
    p.add_argument("--data", default=None, help="data spec (default: the checkpoint's)")
    p.add_argument("--target-subjects", type=_ints, default=None, help="subjects to adapt to (default: those held out at pretraining)")
    p.add_argument("--out", default="adapter.safetensors", help="adapter to write; metrics go to <name>.metrics.json (default adapter.safetensors)")
    p.add_argument("--force", action="store_true", help="replace existing outputs")
    _train_args(p, 5e-3, 32, 15)
    p.set_defaults(func=cmd_finetune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2; no tracebacks for them."""
    args = build_parser().parse_args(argv)
    try:
        handler: Handler = args.func
        return handler(args)
    except ToolchainError as err:
        print(f"toolchain {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"toolchain {args.command}: interrupted; no partial output was left", file=sys.stderr)
        return 130


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
