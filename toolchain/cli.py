"""The ``toolchain`` command line. Heavy packages (torch, onnxruntime, tensorrt) load per command."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from toolchain import __version__
from toolchain.adapters.methods import METHODS, get_method
from toolchain.core.errors import ToolchainError
from toolchain.core.fileio import BEFORE_PUBLISH
from toolchain.data.windows import SPLITS
from toolchain.quantize import CALIBRATION_BATCHES, CALIBRATION_SPLIT, DEFAULT_OPS, RECALIBRATE_SPLIT
from toolchain.verify import MIN_AGREEMENT

GATE_ATTEMPTS = 3  # the latency gate measures again up to this many times before failing

Handler = Callable[[argparse.Namespace], int]


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


def _train_config(a: argparse.Namespace) -> Any:
    from toolchain.train import TrainConfig, check_config

    if a.lr is None:
        a.lr = get_method(a.method).lr
    cfg = TrainConfig(
        lr=a.lr,
        batch_size=a.batch_size,
        epochs=a.epochs,
        steps=a.steps,
        seed=a.seed,
        device=a.device,
        progress=not a.no_progress,
    )
    check_config(cfg)
    return cfg


def cmd_pretrain(a: argparse.Namespace) -> int:
    from toolchain.workflows import PretrainJob, pretrain

    excl = tuple(c for c in a.exclude_classes.split(",") if c) if a.exclude_classes else ()
    m = pretrain(
        PretrainJob(
            out=a.out,
            model=a.model,
            data=a.data,
            subjects=a.target_subjects,
            train=_train_config(a),
            force=a.force,
            exclude_classes=excl,
        )
    )
    target = (
        f"target {m['target_subjects']} F1 {m['f1_target']:.3f}"
        if m["f1_target"] is not None
        else "no target subjects held out"
    )
    print(
        f"pretrained {a.model} on subjects {m['source_subjects']}: source F1 {m['f1_source']:.3f}, {target} "
        f"({m['steps']} steps, {m['train_seconds']:.1f} s) -> {a.out}"
    )
    return 0


def cmd_finetune(a: argparse.Namespace) -> int:
    from toolchain.peft.inject import AdaptConfig
    from toolchain.workflows import FinetuneJob, finetune, metrics_path

    adapt = AdaptConfig(
        method=a.method,
        rank=a.rank,
        scaling=a.scaling,
        layers=a.layers,
        train=tuple(a.train),
        update_bn_stats=a.update_bn_stats,
        reduction=a.reduction,
    )
    job = FinetuneJob(
        checkpoint=a.checkpoint,
        out=a.out,
        adapt=adapt,
        data=a.data,
        subjects=a.target_subjects,
        train=_train_config(a),
        force=a.force,
        model=a.model,
        lean=not a.reference_path,
    )
    if a.memory_budget is not None:
        from toolchain.memory import parse_size

        job.memory_budget = parse_size(a.memory_budget)
    m = finetune(job)
    if a.memory_budget is not None:
        print(
            f"memory budget {a.memory_budget}: batch size {m.batch_size} ({m.peak_train_memory_mb:.1f} "
            f"MiB accounted on the {m.training_path} path)"
        )
    print(
        f"{m.method} rank {m.rank}: {m.trainable_params} of {m.total_params} parameters trained "
        f"({100 * m.trainable_fraction:.2f}%), macro-F1 {m.f1_before:.3f} -> {m.f1_after:.3f}, "
        f"accuracy {m.accuracy_before:.3f} -> {m.accuracy_after:.3f} ({m.steps} steps, "
        f"{m.train_seconds:.1f} s)"
    )
    print(f"wrote {a.out} and {metrics_path(a.out)}")
    return 0


def _dyn(text: str) -> tuple[int, int, int]:
    vals = _ints(text)
    if len(vals) != 3 or not 1 <= vals[0] <= vals[1] <= vals[2]:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, got {text!r}")
    return vals  # type: ignore[return-value]


def cmd_export(a: argparse.Namespace) -> int:
    from toolchain.export import ExportOptions, export

    opts = ExportOptions(dynamic_batch=a.dynamic_batch, fold_bn=a.fold_bn, exporter=a.exporter)
    report = export(
        a.checkpoint,
        a.output,
        adapter=a.adapter,
        fuse=a.fuse,
        opts=opts,
        force=a.force,
        model=a.model,
        input_shape=a.input_shape,
        check_data=a.check_data,
    )
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"exported {report['metadata'].get('toolchain.kind')} model -> {a.output}; {report['check'].line()}")
    return 0


def cmd_fuse(a: argparse.Namespace) -> int:
    from toolchain.graphs.fuse import fuse_files

    after = None
    if a.recalibrate:
        from toolchain.quantize import Calibration, recalibrate

        cal = Calibration(a.recalibrate, a.recalibrate_split, a.calibration_batches)
        cal.check()

        def after(model: Any) -> None:
            rec = recalibrate(model, cal)
            print(f"recalibrated activation scales on {rec['windows']} windows of {rec['data']} ({rec['split']})")

    elif a.recalibrate_split != RECALIBRATE_SPLIT or a.calibration_batches != CALIBRATION_BATCHES:
        raise ToolchainError(
            "--recalibrate-split and --calibration-batches need --recalibrate",
            seen=(a.recalibrate_split, a.calibration_batches),
            remedy="add --recalibrate SPEC, or drop them",
        )
    prov = fuse_files(a.base, a.adapter, a.output, force=a.force, after=after)
    print(f"fused {a.adapter} into {a.base} -> {a.output} (adapter sha256 {str(prov.adapter_sha256)[:12]})")
    return 0


def cmd_quantize(a: argparse.Namespace) -> int:
    from toolchain.quantize import Calibration, quantize_file

    ops = tuple(o.strip() for o in a.ops.split(",") if o.strip())
    scheme = quantize_file(
        a.model, a.output, Calibration(a.data, a.split, a.calibration_batches), ops=ops, force=a.force
    )
    cal = scheme["calibration"]
    print(
        f"quantized {a.model} -> {a.output}: INT8 QDQ, {len(scheme['quantized_weights'])} weights per output channel "
        f"({'/'.join(scheme['ops'])}), activations per tensor calibrated on {cal['windows']} windows of "
        f"{cal['data']} ({cal['split']}, sha256 {cal['sha256'][:12]})"
    )
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from toolchain.verify import VerifyOptions, parse_tolerance, verify

    tol = {
        k: parse_tolerance(getattr(a, k)) if getattr(a, k) is not None else None
        for k in ("atol", "rtol", "engine_atol", "engine_rtol")
    }
    opts = VerifyOptions(
        data=None if a.data == "none" else a.data,
        real=a.real,
        random=a.random,
        force=a.force,
        min_agreement=a.min_agreement,
        split=a.split,
    )
    opts.atol, opts.rtol, opts.engine_atol, opts.engine_rtol = (
        tol["atol"],
        tol["rtol"],
        tol["engine_atol"],
        tol["engine_rtol"],
    )
    report = verify(a.model, a.reference, a.out_dir, engine=a.engine, opts=opts)
    for runner, comp in report.comparisons.items():
        for name, st in comp.outputs.items():
            print(
                f"{runner} vs reference, output {name}: max abs {st.max_abs:.3g}, max rel {st.max_rel:.3g} "
                f"(atol {comp.atol}, rtol {comp.rtol}, {comp.precision}): "
                f"{'PASSED' if comp.passed else 'FAILED'}"
            )
    ag = report.agreement
    if ag is not None:
        print(
            f"INT8 model vs FP32 reference on {ag.windows} labelled windows of {ag.data} ({ag.split}): top-1 "
            f"agreement {ag.top1_agreement:.4f} (min {ag.min_agreement}), macro-F1 {ag.f1_model:.4f} vs "
            f"{ag.f1_reference:.4f}: {'PASSED' if ag.passed else 'FAILED'}"
        )
    worst = max(st.max_abs for st in report.comparisons["model"].outputs.values())
    hint = f" --atol {worst * 1.01:.3g} --rtol 1e9" if ag is not None else ""  # INT8: the errors measured
    print(
        f"{'PASSED' if report.passed else 'FAILED'}: report {a.out_dir}/verify.json; re-check with "
        f"polygraphy run {a.model} --onnxrt --load-inputs {report.inputs} --load-outputs {report.outputs}{hint}"
    )
    return 0 if report.passed else 1


def cmd_bench(a: argparse.Namespace) -> int:
    from toolchain.bench import bench, gate
    from toolchain.core.fileio import check_output
    from toolchain.core.jsonio import write_json

    if a.attempts is not None and a.max_ratio is None:
        raise ToolchainError(
            "--attempts applies to the latency gate, which needs --max-ratio",
            seen=f"--attempts {a.attempts} without --max-ratio",
            remedy="add --max-ratio (e.g. 1.05), or drop --attempts",
        )
    a.attempts = GATE_ATTEMPTS if a.attempts is None else a.attempts
    if not 1 <= a.attempts <= 100:
        raise ToolchainError("--attempts must be an integer from 1 to 100", seen=a.attempts, remedy="pass --attempts 3")
    if a.json:
        check_output(a.json, [a.model, *a.vs], force=a.force)
    kwargs = dict(warmup=a.warmup, runs=a.runs, provider=a.provider, threads=a.threads)
    res = (
        gate([a.model, *a.vs], a.max_ratio, a.attempts, **kwargs)
        if a.max_ratio is not None
        else bench([a.model, *a.vs], **kwargs)
    )
    for r in res["results"]:
        print(
            f"{r['model']}: median {r['median_ms']:.4f} ms, p90 {r['p90_ms']:.4f}, p99 {r['p99_ms']:.4f}, ratio "
            f"{r['ratio_to_first']:.3f}"
        )
    if a.json:
        write_json(a.json, res, force=a.force)
    if "gate" not in res:
        return 0
    g = res["gate"]
    worst = max(g["ratios"][-1])
    print(
        f"latency gate {'PASSED' if g['passed'] else 'FAILED'}: worst ratio {worst:.3f} "
        f"{'<=' if g['passed'] else '>'} {g['max_ratio']} (attempt {g['attempts']} of at most {a.attempts})"
    )
    return 0 if g["passed"] else 1


def cmd_diff(a: argparse.Namespace) -> int:
    from toolchain.graphs.diff import diff_models, format_diff
    from toolchain.graphs.onnx_io import load_onnx

    report = diff_models(load_onnx(a.a), load_onnx(a.b))
    if a.json:
        print_json(report)
    else:
        print("\n".join(format_diff(report)))
    return 0 if report["identical"] or not a.exit_code else 1


def cmd_build(a: argparse.Namespace) -> int:
    if a.check:
        from toolchain.trt.check import check_model, format_check

        report = check_model(a.model)
        print("\n".join(format_check(report)))
        return 0 if report.buildable else 1
    if not a.output:
        raise ToolchainError(
            "build needs -o ENGINE.plan (or --check to only check the model)", seen="no -o", remedy="pass -o model.plan"
        )
    if a.workspace_mb < 16 or a.workspace_mb > 1 << 20:
        raise ToolchainError(
            "--workspace-mb must be between 16 and 1048576", seen=a.workspace_mb, remedy="pass e.g. --workspace-mb 1024"
        )
    from toolchain.trt.engine import BuildOptions, build_engine

    opts = BuildOptions(
        fp16=a.fp16,
        int8=a.int8,
        refit=a.refit,
        timing_cache=a.timing_cache,
        dynamic_batch=a.dynamic_batch,
        workspace_mb=a.workspace_mb,
        check=not a.no_check,
    )
    record, note = build_engine(a.model, a.output, opts, force=a.force)
    if note:
        print(note)
    checked = (
        f"; engine vs ONNX max abs {record.engine_check['max_abs']:.3g} (tolerance {record.engine_check['tolerance']})"
        if record.engine_check
        else "; not checked against the ONNX model"
    )
    print(
        f"built TensorRT {record.tensorrt_version} {record.precision} engine (refit: {record.refit_mode}) -> "
        f"{a.output}{checked}"
    )
    return 0


def cmd_refit(a: argparse.Namespace) -> int:
    from toolchain.trt.engine import refit_engine

    record = refit_engine(a.engine, a.model, a.output, force=a.force, check=not a.no_check)
    checked = f"; engine vs ONNX max abs {record.engine_check['max_abs']:.3g}" if record.engine_check else ""
    print(
        f"refit {record.refit_mode} refittable weights of {a.engine} from {a.model} -> {a.output} "
        f"({record.precision}){checked}"
    )
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from toolchain.demo import run_demo

    return run_demo(a.out, quick=a.quick, force=a.force, images=a.images)


def cmd_compare(a: argparse.Namespace) -> int:
    from toolchain.compare import CompareJob, run_compare

    methods = tuple(m for m in a.methods.split(",") if m)
    excl = tuple(c for c in a.exclude_classes.split(",") if c)
    job = CompareJob(
        out=a.out,
        methods=methods,
        backbone=a.backbone,
        data=a.data,
        ranks=a.ranks,
        steps=a.steps,
        eval_every=a.eval_every,
        seed=a.seed,
        seeds=a.seeds,
        layers=a.layers,
        progress=not a.no_progress,
        exclude_classes=excl,
        pretrain_epochs=a.pretrain_epochs,
        ray=a.ray,
        workers=a.workers,
        force=a.force,
    )
    rows = run_compare(job)
    failed = json.loads((Path(a.out) / "failed.json").read_text())
    for f in failed:
        print(
            f"run failed: {f['inputs']['method']} rank {f['inputs']['rank']} seed {f['inputs']['seed']}: {f['error']}",
            file=sys.stderr,
        )
    if not rows:
        return 1
    print(open(f"{a.out}/results.md").read())
    print(
        f"{len(rows)} runs ({len(failed)} failed); results.md, results.csv, f1_vs_step.png, memory.png, "
        f"params_vs_f1.png in {a.out}"
    )
    return 1 if failed else 0


def cmd_fleet(a: argparse.Namespace) -> int:
    from toolchain.fleet import FleetJob, run_fleet
    from toolchain.grid.runner import GridOptions

    opts = GridOptions(ray=a.ray, workers=a.workers, progress=not a.no_progress)
    job = FleetJob(
        manifest=a.manifest,
        checkpoint=a.checkpoint,
        out=a.out,
        method=a.method,
        rank=a.rank,
        layers=a.layers,
        epochs=a.epochs,
        seed=a.seed,
        int8=a.int8,
        recalibrate=a.recalibrate,
        min_agreement=a.min_agreement,
        force=a.force,
        opts=opts,
    )
    rows, res = run_fleet(job)
    print(open(f"{a.out}/summary.md").read())
    ok = sum(r["status"] == "ok" and r["verify_passed"] and r.get("int8_passed", True) for r in rows)
    print(
        f"{ok} of {len(rows)} users adapted, fused and verified ({res.cached} from the cache); summary.md and "
        f"summary.csv in {a.out}"
    )
    return 0 if ok == len(rows) else 1


def cmd_inspect(a: argparse.Namespace) -> int:
    from toolchain.inspect_file import describe

    print_json(describe(a.file))
    return 0


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
    parser = argparse.ArgumentParser(prog="toolchain", description=__doc__)
    parser.add_argument("--version", action="version", version=f"toolchain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="train a HAR backbone on the source subjects")
    p.add_argument(
        "--model",
        default="cnn1d",
        help="cnn1d, resnet1d, mobilenet1d, path/file.py:callable or pkg.mod:callable (default cnn1d)",
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


EXTRAS = {
    "torch": "train",
    "onnxscript": "train",
    "tqdm": "train",
    "seglearn": "train",
    "onnxruntime": "verify",
    "polygraphy": "verify",
    "matplotlib": "plots",
}


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that partial outputs are cleaned up as on Ctrl-C."""


_OURS = tuple(
    str(Path(p).resolve())
    for p in (
        Path(__file__).parent,
        Path(__file__).parent / "core",
        Path(__file__).parent / "kernels",
        Path(__file__).parent / "adapters",
        Path(__file__).parent / "graphs",
    )
)
_STDLIB = str(Path(contextlib.__file__).resolve().parent)
RETRY_S = 0.05


def _safe_to_raise(frame: Any) -> bool:
    """True when every frame on the stack is this package's or the standard library's: an exception
    raised now cannot be swallowed by a bare ``except:`` in third-party code (Polygraphy's lazy
    importer did that, and verify went on to print PASSED, then crashed)."""
    while frame is not None and frame.f_code is not main.__code__:  # the frames main() called
        name = (
            str(Path(frame.f_code.co_filename).resolve()) if not frame.f_code.co_filename.startswith("<") else _STDLIB
        )
        if not (name.startswith(_OURS) or (name.startswith(_STDLIB) and "site-packages" not in name)):
            return False
        frame = frame.f_back
    return True


_DEFERRED: list[bool] = []  # a SIGTERM arrived inside third-party code and is not raised yet


def _on_sigterm(signum: int, frame: Any) -> None:
    """Raise Terminated where that is safe; inside third-party code, look again every 50 ms (SIGALRM)."""
    if _safe_to_raise(frame):
        _raise_terminated()
    _DEFERRED[:] = [True]
    signal.signal(signal.SIGALRM, _on_sigterm)
    signal.setitimer(signal.ITIMER_REAL, RETRY_S)


def _raise_terminated() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)
    _DEFERRED.clear()
    raise Terminated()


def _before_publish() -> None:
    """A SIGTERM deferred while third-party code wrote the staged files is raised before they are
    published, so an interrupted run leaves none of them (not all of them and exit 143)."""
    if _DEFERRED:
        _raise_terminated()


# Every count and size an option can set, bounded before anything is allocated: (low, high).
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "seed": (0, 2**32 - 1),
    "seeds": (1, 1000),
    "epochs": (1, 100_000),
    "pretrain_epochs": (1, 100_000),
    "steps": (0, 10_000_000),
    "batch_size": (1, 65_536),
    "reduction": (1, 4096),
    "real": (0, 10_000),
    "random": (1, 10_000),
    "eval_every": (1, 1_000_000),
    "workers": (1, 4096),
}
COMMAND_BOUNDS: dict[str, dict[str, tuple[int, int]]] = {
    "compare": {"steps": (1, 10_000_000)}
}  # compare trains a fixed number of steps
FLOAT_BOUNDS: dict[str, tuple[float, float]] = {"lr": (1e-12, 10.0), "scaling": (-1e4, 1e4)}


def check_bounds(a: argparse.Namespace) -> None:
    """One place that bounds every numeric option (a huge --random, a seed past 2**32, --scaling inf)."""
    for name, (low, high) in {**INT_BOUNDS, **COMMAND_BOUNDS.get(a.command, {})}.items():
        value = getattr(a, name, None)
        if value is not None and not (type(value) is int and low <= value <= high):
            raise ToolchainError(
                f"--{name.replace('_', '-')} must be an integer from {low} to {high}",
                seen=value,
                remedy=f"pass --{name.replace('_', '-')} within that range",
            )
    for name, (f_low, f_high) in FLOAT_BOUNDS.items():
        number = getattr(a, name, None)
        if number is not None and not (math.isfinite(number) and f_low <= number <= f_high):
            raise ToolchainError(
                f"--{name} must be a finite number from {f_low:g} to {f_high:g}",
                seen=number,
                remedy="pass e.g. --scaling 1.0" if name == "scaling" else "pass e.g. --lr 5e-3",
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2; no tracebacks for them."""
    args = build_parser().parse_args(argv)
    name = f"toolchain {args.command}"
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    previous_alarm = signal.getsignal(signal.SIGALRM)
    _DEFERRED.clear()
    BEFORE_PUBLISH.append(_before_publish)
    try:
        check_bounds(args)
        handler: Handler = args.func
        code = handler(args)
        _before_publish()  # a SIGTERM still deferred when the command ends: never exit 0 past it
        return code
    except ToolchainError as err:
        return _fail(name, str(err), 2)
    except ModuleNotFoundError as err:
        root = (err.name or "").split(".")[0]
        if root not in EXTRAS:
            raise
        return _fail(
            name,
            f"needs the optional package {root}, which is not installed; install it with: pip install "
            f"'toolchain[{EXTRAS[root]}]'",
            2,
        )
    except BrokenPipeError:  # e.g. `toolchain inspect x | head -1`: the reader left
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as err:  # the environment, not the input: a full disk, a vanished folder
        return _fail(
            name, f"{err.strerror or err}: {err.filename or ''}; check the path, its permissions and free space", 2
        )
    except KeyboardInterrupt:
        return _fail(name, "interrupted; no partial output was left", 130)
    except Exception as err:
        if type(err).__name__ != "PolygraphyException":
            raise
        return _fail(name, f"Polygraphy failed: {' '.join(str(err).split())[:300]}", 2)
    except Terminated:
        return _fail(name, "terminated; no partial output was left", 143)
    finally:
        BEFORE_PUBLISH.remove(_before_publish)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_alarm)
        signal.signal(signal.SIGTERM, previous)


def _fail(name: str, message: str, code: int) -> int:
    with contextlib.suppress(OSError):
        print(f"{name}: error: {message}", file=sys.stderr)
    return code


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
