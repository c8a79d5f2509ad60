"""The ``toolchain`` argument parser: every command, its options and their defaults."""

from __future__ import annotations

import argparse
from typing import Any

from toolchain import __version__
from toolchain.adapters.methods import METHODS
from toolchain.commands import (
    GATE_ATTEMPTS,
    cmd_bench,
    cmd_build,
    cmd_compare,
    cmd_demo,
    cmd_diff,
    cmd_export,
    cmd_finetune,
    cmd_fleet,
    cmd_fuse,
    cmd_inspect,
    cmd_pretrain,
    cmd_quantize,
    cmd_refit,
    cmd_verify,
)
from toolchain.data.windows import SPLITS
from toolchain.quantize import CALIBRATION_BATCHES, CALIBRATION_SPLIT, DEFAULT_OPS, FIRST, RECALIBRATE_SPLIT
from toolchain.verify import MIN_AGREEMENT

DESCRIPTION = "The ``toolchain`` command line. Heavy packages (torch, onnxruntime, tensorrt) load per command."


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _train_args(p: argparse.ArgumentParser, lr: float | None, batch: int, epochs: int) -> None:
    g = p.add_argument_group("training")
    g.add_argument(
        "--lr",
        type=float,
        default=lr,
        help=f"Adam learning rate (default {lr if lr else 'per method: 1e-3 for full and galore, else 5e-3'})",
    )
    g.add_argument("--batch-size", type=int, default=batch, help=f"(default {batch})")
    g.add_argument("--epochs", type=int, default=epochs, help=f"passes over the training windows (default {epochs})")
    g.add_argument("--steps", type=int, default=0, help="optimizer steps; overrides --epochs when > 0")
    g.add_argument("--seed", type=int, default=0, help="(default 0)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _dyn(text: str) -> tuple[int, int, int]:
    vals = _ints(text)
    if len(vals) != 3 or not 1 <= vals[0] <= vals[1] <= vals[2]:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, got {text!r}")
    return vals  # type: ignore[return-value]


def _add_graph_commands(sub: Any) -> None:
    p = sub.add_parser("export", help="export base, unfused-adapted or fused ONNX")
    p.add_argument("--checkpoint", default="base.pt", help="(default base.pt)")
    p.add_argument(
        "--adapter", default=None, help="adapter file; without --fuse the auxiliary path is exported as explicit nodes"
    )
    p.add_argument("--model", default=None, help="the model a plain state_dict checkpoint belongs to")
    p.add_argument(
        "--fuse", action="store_true", help="export the base model, then fuse the adapter into its Conv initializers"
    )
    p.add_argument("-o", "--output", default="model.onnx", help="(default model.onnx)")
    p.add_argument("--dynamic-batch", action="store_true", help="a dynamic batch axis (default: fixed batch 1)")
    p.add_argument(
        "--fold-bn",
        action="store_true",
        help="fold BatchNorm into Conv weights (records per-channel scales for fusion)",
    )
    p.add_argument(
        "--input-shape",
        type=_ints,
        default=None,
        help="C,T or C,H,W: needed for a plain state_dict; else overrides the checkpoint's (shape-agnostic "
        "models only)",
    )
    p.add_argument(
        "--exporter",
        default="auto",
        choices=["auto", "dynamo", "torchscript"],
        help="auto: dynamo, then TorchScript if dynamo fails or mismatches PyTorch (default auto)",
    )
    p.add_argument(
        "--check-data",
        default=None,
        help="data spec whose windows or images join the random inputs of the ONNX-vs-PyTorch check (default: "
        "random only)",
    )
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("fuse", help="fuse an adapter into a base ONNX model (no torch needed)")
    p.add_argument("base")
    p.add_argument("adapter")
    p.add_argument("-o", "--output", required=True)
    p.add_argument(
        "--recalibrate",
        default=None,
        metavar="SPEC",
        help="into an INT8 (QDQ) model: re-derive the activation scales on this data (needs onnxruntime)",
    )
    p.add_argument(
        "--recalibrate-split",
        default=RECALIBRATE_SPLIT,
        choices=SPLITS,
        help=f"which windows of --recalibrate (default {RECALIBRATE_SPLIT}: those the adapter was trained on)",
    )
    p.add_argument(
        "--calibration-batches",
        type=int,
        default=CALIBRATION_BATCHES,
        help=f"model batches to calibrate on (default {CALIBRATION_BATCHES})",
    )
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_fuse)

    p = sub.add_parser("quantize", help="explicit INT8 (QDQ) quantization for TensorRT, calibrated on real data")
    p.add_argument("model", help="an FP32 ONNX model (base or fused)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--data", default="watch", help="calibration data spec (default watch)")
    p.add_argument(
        "--split",
        default=CALIBRATION_SPLIT,
        choices=SPLITS,
        help=f"which windows of --data (default {CALIBRATION_SPLIT}: the subjects the base was pretrained on)",
    )
    p.add_argument(
        "--calibration-batches",
        type=int,
        default=CALIBRATION_BATCHES,
        help=f"model batches to calibrate on, spread over the split (default {CALIBRATION_BATCHES})",
    )
    p.add_argument(
        "--ops",
        default=",".join(DEFAULT_OPS),
        help=f"op types whose weights and inputs are quantized (default {','.join(DEFAULT_OPS)}; also Gemm, MatMul)",
    )
    p.add_argument(
        "--exclude",
        default="",
        help="nodes of --ops left float, weights and inputs (TensorRT runs them in FP16/FP32), comma-separated "
        f"names; {FIRST}: the first in graph order, {FIRST}:N the first N (default: none; docs/INT8.md: where it pays)",
    )
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("verify", help="Polygraphy parity of a fused model (and engine) against the unfused reference")
    p.add_argument("model")
    p.add_argument("--reference", required=True, help="the unfused model (toolchain export --adapter without --fuse)")
    p.add_argument("--engine", default=None, help="also compare a TensorRT engine (needs TensorRT)")
    p.add_argument("--data", default="watch", help="real windows from this data spec, or none (default watch)")
    p.add_argument("--real", type=int, default=16, help="real batches (default 16)")
    p.add_argument("--random", type=int, default=8, help="random batches (default 8)")
    p.add_argument(
        "--atol", default=None, help="model vs reference: a number or per output NAME:NUMBER,... (default 1e-4)"
    )
    p.add_argument(
        "--rtol", default=None, help="model vs reference: a number or per output NAME:NUMBER,... (default 1e-4)"
    )
    p.add_argument(
        "--engine-atol",
        default=None,
        help="engine vs reference (default 1e-2 for an fp16 engine, 1e-4 for fp32; required when the engine's "
        "sidecar is missing)",
    )
    p.add_argument("--engine-rtol", default=None, help="engine vs reference (defaults as --engine-atol)")
    p.add_argument(
        "--min-agreement",
        type=float,
        default=MIN_AGREEMENT,
        help=f"an INT8 model vs its FP32 reference: the least top-1 agreement on --data's labelled windows "
        f"(default {MIN_AGREEMENT}); the error statistics are reported beside it",
    )
    p.add_argument(
        "--split", default="all", choices=SPLITS, help="which windows of --data the INT8 agreement uses (default all)"
    )
    p.add_argument("--out-dir", default="verify_out", help="report and Polygraphy RunResults (default verify_out)")
    p.add_argument("--force", action="store_true", help="replace an earlier report in --out-dir")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("bench", help="ONNX Runtime latency, interleaved, with ratios to the first model")
    p.add_argument("model")
    p.add_argument("--vs", nargs="*", default=[], help="other models to time side by side")
    p.add_argument("--provider", default="cpu", help="cpu, cuda or tensorrt (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (default 1)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument(
        "--max-ratio",
        type=float,
        default=None,
        help="latency gate: exit 1 when a --vs model's median over the first model's exceeds this (e.g. 1.05)",
    )
    p.add_argument(
        "--attempts",
        type=int,
        default=None,
        help=f"with --max-ratio: measure again when over the bound, up to this many times (default {GATE_ATTEMPTS})",
    )
    p.add_argument("--force", action="store_true", help="replace an existing --json file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "build", help="build a TensorRT 10.x engine (needs TensorRT and a GPU), or --check a model without a GPU"
    )
    p.add_argument("model")
    p.add_argument(
        "-o", "--output", default=None, help="the engine to write (ENGINE.plan; its record goes to ENGINE.plan.json)"
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="only parse with TensorRT's ONNX parser (TensorRT-RTX where TensorRT is absent): unsupported "
        "nodes, refittable weights; exit 1 if it would not build",
    )
    p.add_argument("--fp16", action="store_true")
    p.add_argument(
        "--int8",
        action="store_true",
        help="an explicitly quantized (QDQ) model from `toolchain quantize`: INT8 from its own scales, no "
        "calibrator (with --fp16, the unquantized layers run in FP16); not with --refit",
    )
    p.add_argument(
        "--refit",
        action="store_true",
        help="refittable engine: the fused weights individually, or the whole engine where BatchNorm parameters "
        "changed",
    )
    p.add_argument("--timing-cache", default=None)
    p.add_argument(
        "--dynamic-batch",
        type=_dyn,
        default=None,
        metavar="MIN,OPT,MAX",
        help="needs a model exported with --dynamic-batch",
    )
    p.add_argument(
        "--workspace-mb",
        type=int,
        default=1024,
        help="builder workspace (default 1024; lower on an 8 GB Orin Nano if the build runs out of memory)",
    )
    p.add_argument(
        "--no-check", action="store_true", help="skip comparing the engine with the ONNX model before writing it"
    )
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("refit", help="update a refittable engine from a model fused on the same base")
    p.add_argument("engine")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument(
        "--no-check", action="store_true", help="skip comparing the refit engine with the ONNX model before writing it"
    )
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_refit)

    p = sub.add_parser("demo", help="the whole pipeline on the embedded default")
    p.add_argument("--out", default="demo_out", help="(default demo_out)")
    p.add_argument("--quick", action="store_true", help="fewer training steps (for tests)")
    p.add_argument(
        "--images",
        action="store_true",
        help="the image pipeline: scikit-learn's digits, clean -> corrupted, ResNet-18-style net",
    )
    p.add_argument("--force", action="store_true", help="reuse a non-empty output folder")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "compare", help="every PEFT method on one backbone: F1, parameters, FLOPs, memory, time to target"
    )
    p.add_argument(
        "--methods",
        default="lora-edge,lora,dora,galore,adapter,bitfit,head,full",
        help="comma-separated (default: all eight)",
    )
    p.add_argument("--backbone", default="cnn1d", help="(default cnn1d)")
    p.add_argument("--data", default="watch", help="(default watch)")
    p.add_argument(
        "--out", default="compare_out", help="results and the resumable cache of finished runs (default compare_out)"
    )
    p.add_argument("--ranks", type=_ints, default=(2, 4, 8), help="ranks of the low-rank methods (default 2,4,8)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    p.add_argument("--eval-every", type=int, default=25, help="steps between F1 evaluations (default 25)")
    p.add_argument(
        "--layers",
        "--targets",
        dest="layers",
        default="all",
        help="conv selection for lora-edge/lora/dora: all, pointwise or a regex (default all; --targets is the "
        "old name)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1, help="how many seeds from --seed on (default 1)")
    p.add_argument(
        "--ray",
        default=None,
        help="run the grid on Ray: auto (start one on this machine) or a cluster address; default: serially here",
    )
    p.add_argument("--workers", type=int, default=None, help="CPUs of a local Ray (--ray auto); default all")
    p.add_argument(
        "--exclude-classes", default="", help="unseen classes: pretrain without these (names or indices), adapt to all"
    )
    p.add_argument("--pretrain-epochs", type=int, default=8, help="(default 8)")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder that is not a compare folder")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "fleet",
        help="one adapter per user from a manifest: finetune, fuse into ONNX and verify each; one summary table",
    )
    p.add_argument("manifest", help='JSON: {"data": "watch", "users": [{"name": "wearer-08", "subjects": [8]}, ...]}')
    p.add_argument("--checkpoint", required=True, help="the pretrained base (from pretrain)")
    p.add_argument("--out", default="fleet_out", help="OUT/NAME/ per user, OUT/summary.md (default fleet_out)")
    p.add_argument("--method", default="lora-edge", choices=METHODS)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--layers", default="all")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ray", default=None, help="auto (a local Ray) or a cluster address; default: one user after another here"
    )
    p.add_argument("--workers", type=int, default=None, help="CPUs of a local Ray (default all)")
    p.add_argument(
        "--int8",
        default=None,
        metavar="BASE.int8.onnx",
        help="the base quantized once (toolchain quantize): each adapter is also fused into it and judged against "
        "the user's fused FP32 model on the user's test windows",
    )
    p.add_argument(
        "--recalibrate",
        action="store_true",
        help="with --int8: re-derive activation scales on each user's adaptation windows",
    )
    p.add_argument(
        "--min-agreement",
        type=float,
        default=MIN_AGREEMENT,
        help=f"with --int8: least top-1 agreement INT8 vs FP32 (default {MIN_AGREEMENT})",
    )
    p.add_argument("--force", action="store_true", help="write into a non-empty folder that is not a fleet folder")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_fleet)

    p = sub.add_parser(
        "diff", help="what differs between two ONNX models (initializers with max |Δ|, nodes, I/O, metadata)"
    )
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--exit-code", action="store_true", help="exit 1 when the models differ")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("inspect", help="say what an adapter, ONNX model or engine file is")
    p.add_argument("file")
    p.set_defaults(func=cmd_inspect)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toolchain", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"toolchain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="train a HAR backbone on the source subjects")
    p.add_argument(
        "--model",
        default="cnn1d",
        help="cnn1d, resnet1d, mobilenet1d (mobilenet1d-relu: its ReLU net before revision 2), resnet18, "
        "mobilenetv2, path/file.py:callable or pkg.mod:callable (default cnn1d)",
    )
    p.add_argument(
        "--data",
        default="watch",
        help="watch (embedded default), hapt:FOLDER, a HAPT folder or file.npz (default watch)",
    )
    p.add_argument(
        "--target-subjects",
        type=_ints,
        default=None,
        help="subjects held out for adaptation (default: the dataset's usual ones)",
    )
    p.add_argument("--out", default="base.pt", help="checkpoint to write (default base.pt)")
    p.add_argument(
        "--exclude-classes",
        default="",
        help="comma-separated class names or indices to leave out (unseen-class studies)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output")
    _train_args(p, 2e-3, 64, 8)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="adapt a checkpoint to target subjects; write an adapter")
    p.add_argument(
        "--checkpoint",
        default="base.pt",
        help="base checkpoint from pretrain, or a plain state_dict of --model's backbone (default base.pt)",
    )
    p.add_argument(
        "--model", default=None, help="the model the checkpoint's weights belong to (needed for a plain state_dict)"
    )
    p.add_argument("--method", default="lora-edge", choices=METHODS, help="adaptation method (default lora-edge)")
    p.add_argument(
        "--rank",
        type=int,
        default=4,
        help="rank: TT rank clipped per bond (lora-edge), LoRA/DoRA rank, GaLore projection rank (default 4)",
    )
    p.add_argument("--scaling", type=float, default=1.0, help="ΔW scale; for lora/dora this is alpha / r (default 1.0)")
    p.add_argument(
        "--reduction",
        type=int,
        default=4,
        help="bottleneck width = channels // reduction for --method adapter (default 4)",
    )
    p.add_argument(
        "--layers",
        "--targets",
        dest="layers",
        default="all",
        help="convs to adapt: all, pointwise, or a regex on module names (default all; --targets is the old name)",
    )
    p.add_argument(
        "--train",
        action="append",
        default=[],
        choices=["head", "bn"],
        help="also train the classifier head or BatchNorm affine (repeatable)",
    )
    p.add_argument(
        "--update-bn-stats", action="store_true", help="let BatchNorm running statistics move (frozen by default)"
    )
    p.add_argument(
        "--reference-path",
        action="store_true",
        help="train on PyTorch's own autograd path instead of the lean one (same gradients, more memory)",
    )
    p.add_argument(
        "--memory-budget",
        default=None,
        help="e.g. 512MB: choose the largest batch whose accounted training memory fits (overrides --batch-size)",
    )
    p.add_argument(
        "--int8-base",
        default=None,
        metavar="BASE.int8.onnx",
        help="this checkpoint's quantized export (toolchain quantize): train with its activation scales fixed, "
        "each quantized conv input fake-quantized, so the adapter fits the INT8 model it will be fused into",
    )
    p.add_argument("--data", default=None, help="data spec (default: the checkpoint's)")
    p.add_argument(
        "--target-subjects",
        type=_ints,
        default=None,
        help="subjects to adapt to (default: those held out at pretraining)",
    )
    p.add_argument(
        "--out",
        default="adapter.safetensors",
        help="adapter to write; metrics go to <name>.metrics.json (default adapter.safetensors)",
    )
    p.add_argument("--force", action="store_true", help="replace existing outputs")
    _train_args(p, None, 32, 15)
    p.set_defaults(func=cmd_finetune)
    _add_graph_commands(sub)
    return parser
