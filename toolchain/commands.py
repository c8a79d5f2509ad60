"""What each ``toolchain`` command does with its parsed arguments (one ``cmd_*`` per command); the
parser is ``toolchain.cli_parser``, the entry point and error handling ``toolchain.cli``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from toolchain.adapters.methods import get_method
from toolchain.core.errors import ToolchainError
from toolchain.quantize import CALIBRATION_BATCHES, RECALIBRATE_SPLIT

GATE_ATTEMPTS = 3  # the latency gate measures again up to this many times before failing


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
        int8_base=a.int8_base,
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
    if a.int8_base:
        print(f"trained for the INT8 base {a.int8_base}: its quantized conv inputs fake-quantized at their scales")
    print(f"wrote {a.out} and {metrics_path(a.out)}")
    return 0


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
    exclude = tuple(e.strip() for e in a.exclude.split(",") if e.strip())
    cal = Calibration(a.data, a.split, a.calibration_batches)
    scheme = quantize_file(a.model, a.output, cal, ops=ops, exclude=exclude, force=a.force)
    record = scheme["calibration"]
    kept = f", {len(scheme['excluded'])} left float ({', '.join(scheme['excluded'])})" if scheme["excluded"] else ""
    print(
        f"quantized {a.model} -> {a.output}: INT8 QDQ, {len(scheme['quantized_weights'])} weights per output channel "
        f"({'/'.join(scheme['ops'])}){kept}, activations per tensor calibrated on {record['windows']} windows of "
        f"{record['data']} ({record['split']}, sha256 {record['sha256'][:12]})"
    )
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from toolchain.flips import summary as flips_summary
    from toolchain.saturation import HEAVY, coarse_summary
    from toolchain.saturation import heavy as saturation_heavy
    from toolchain.saturation import summary as saturation_summary
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
        print(f"INT8 model: {flips_summary(ag)}")
        print(f"INT8 model: {saturation_summary(ag.saturation)}")
        print(f"INT8 model: {coarse_summary(ag.coarse)}")
        if not ag.passed and saturation_heavy(ag.saturation):
            print(
                f"remedy: activations clipped on {100 * HEAVY:.0f}% of the windows or more are out of the base's "
                "calibration; fuse again with --recalibrate on the user's adaptation data (docs/INT8.md)"
            )
        if not ag.passed and ag.coarse:
            print(
                "remedy: activations that reach at most half their INT8 range here were calibrated on data with "
                "larger values; fuse again with --recalibrate on the user's adaptation data, or, for the model's "
                "input, quantize the base with --exclude @first (docs/INT8.md)"
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


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))
