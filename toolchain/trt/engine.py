"""`toolchain build` and `toolchain refit`: TensorRT 10.x engines that are right by construction.

Build parses with TensorRT's ONNX parser, marks the fused weights refittable (REFIT_INDIVIDUAL) or,
where one cannot be marked (BatchNormalization parameters, which the parser combines), makes the
whole engine refittable and says so; builds; checks the engine against the ONNX model on a few
batches; then writes the plan and its sidecar record, both atomically. Refit copies precision and
the refittable set from the input plan's record, refuses a model fused on another base or one that
changed weights outside that set, sets every refittable weight through TensorRT's
``OnnxParserRefitter`` (which recomputes BatchNormalization-combined and Constant weights from the
new model), refuses any weight left unset, and checks the refit engine like a new build.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.core.errors import ToolchainError
from toolchain.core.fileio import atomic_path, check_distinct, check_output, sha256_file
from toolchain.trt.check import ModelFacts, model_facts, parse_network, refit_marks, refit_mode
from toolchain.trt.record import (
    EngineRecord,
    check_plan_version,
    read_plan,
    read_record,
    sidecar_path,
    write_record,
)
from toolchain.trt.runtime import last_error, logger, require_tensorrt, trt_errors

FP32_TOL = 1e-4
FP16_TOL = 1e-2
# An INT8 engine against the same QDQ model in ONNX Runtime: both quantize with the same scales, but a
# value on a rounding boundary may land one step apart. Not yet measured on an Orin (docs/DEVICE.md).
INT8_TOL = 1e-1
CHECK_BATCHES = 4


@dataclass(frozen=True)
class BuildOptions:
    fp16: bool = False
    int8: bool = False  # explicit quantization: the model's Q/DQ scales, no calibrator
    refit: bool = False
    timing_cache: str | None = None
    dynamic_batch: tuple[int, int, int] | None = None
    workspace_mb: int = 1024
    check: bool = True  # compare the engine with the ONNX model before writing it (needs onnxruntime)


def tolerance(precision: str) -> float:
    return {"fp16": FP16_TOL, "int8": INT8_TOL}.get(precision, FP32_TOL)


def _check_int8(facts: ModelFacts, opts: BuildOptions) -> None:
    """--int8 exactly for explicitly quantized (QDQ) models, and never with refit (docs/DEVICE.md)."""
    if opts.int8 and not facts.quantized:
        raise ToolchainError(
            "--int8 builds from the model's QuantizeLinear/DequantizeLinear scales, and this model has none",
            seen=facts.path,
            remedy="quantize it first with `toolchain quantize`, or build without --int8",
        )
    if facts.quantized and not opts.int8:
        raise ToolchainError(
            "the model is explicitly quantized (QDQ), so its engine is an INT8 engine",
            seen=facts.path,
            remedy="pass --int8",
        )
    if opts.int8 and opts.refit:
        raise ToolchainError(
            "INT8 engines are rebuilt per adapter, not refitted: TensorRT 10.3 documents no refit of "
            "quantized weights or their scales",
            seen="--int8 --refit",
            remedy="build one INT8 engine per fused model (toolchain build --int8), without --refit",
        )


def _refuse_dynamic_on_static(facts: ModelFacts, opts: BuildOptions) -> None:
    if opts.dynamic_batch and facts.batch is not None:
        raise ToolchainError(
            "--dynamic-batch needs a model with a dynamic batch axis; this one has a fixed batch",
            seen=f"{facts.path}: batch {facts.batch}",
            remedy="re-export with `toolchain export --dynamic-batch`, or build without --dynamic-batch",
        )


def _refit_plan(network: Any, facts: ModelFacts, refit: bool) -> tuple[str, tuple[str, ...], str | None]:
    """(mode, marked weights, a sentence when whole-engine refit replaced individual marking)."""
    if not refit:
        return "none", (), None
    marks = refit_marks(network, facts.refit_candidates)
    mode = refit_mode(marks)
    if mode == "individual":
        for name in marks:
            network.mark_weights_refittable(name)
        return mode, tuple(marks), None
    refused = [n for n, ok in marks.items() if not ok]
    note = (
        f"TensorRT cannot mark {len(refused)} weight(s) individually "
        f"({', '.join(refused[:3])}{', ...' if len(refused) > 3 else ''}: "
        "BatchNormalization parameters are combined by the parser); built with whole-engine refit instead "
        "(export with --fold-bn to keep individual refit)"
    )
    return "all", (), note


def _config(trt: Any, builder: Any, network: Any, facts: ModelFacts, opts: BuildOptions, mode: str) -> Any:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mb << 20)
    if opts.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if opts.int8:  # weakly typed network with Q/DQ layers: explicit quantization, no calibrator is set
        config.set_flag(trt.BuilderFlag.INT8)
    if mode == "individual":
        config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
    elif mode == "all":
        config.set_flag(trt.BuilderFlag.REFIT)
    if opts.dynamic_batch:
        lo, mid, hi = opts.dynamic_batch
        shape = list(network.get_input(0).shape)[1:]
        profile = builder.create_optimization_profile()
        profile.set_shape(facts.input_name, [lo, *shape], [mid, *shape], [hi, *shape])
        config.add_optimization_profile(profile)
    if opts.timing_cache:
        data = Path(opts.timing_cache).read_bytes() if Path(opts.timing_cache).is_file() else b""
        config.set_timing_cache(config.create_timing_cache(data), False)
    return config


def build_engine(
    onnx_path: str, out: str, opts: BuildOptions, *, force: bool = False
) -> tuple[EngineRecord, str | None]:
    """Build, check and write ``out`` and ``out.json``; returns the record and a note on the refit mode."""
    outputs: dict[str, str | os.PathLike[str]] = {"-o": out, "the engine record (-o + .json)": sidecar_path(out)}
    check_distinct(
        {**outputs, **({"--timing-cache": opts.timing_cache} if opts.timing_cache else {})},
        {"the ONNX model": onnx_path},
    )
    check_output(out, [onnx_path, opts.timing_cache], force=force)
    check_output(sidecar_path(out), [onnx_path], force=force)
    if opts.timing_cache and Path(opts.timing_cache).is_dir():
        raise ToolchainError("--timing-cache must name a file", seen=opts.timing_cache, remedy="add a file name")
    trt = require_tensorrt()
    facts = model_facts(onnx_path)
    _refuse_dynamic_on_static(facts, opts)
    _check_int8(facts, opts)
    with trt_errors() as errors:
        builder, network, parser, problems = parse_network(trt, onnx_path)
        if problems:
            p = problems[0]
            raise ToolchainError(
                "TensorRT's ONNX parser refuses the model",
                seen=f"node {p.node} ({p.op}): {p.error}",
                remedy=f"run `toolchain build {onnx_path} --check` for every unsupported node",
            )
        mode, marked, note = _refit_plan(network, facts, opts.refit)
        config = _config(trt, builder, network, facts, opts, mode)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            seen = last_error(errors, "the builder returned nothing")
            raise ToolchainError(
                "TensorRT could not build the engine",
                seen=seen,
                remedy="see the message; on an 8 GB Orin Nano close other GPU users or lower --workspace-mb",
            )
        plan = bytes(serialized)
        if opts.timing_cache:
            _save_timing_cache(config, opts.timing_cache)
    del parser, network, builder
    precision = "int8" if opts.int8 else "fp16" if opts.fp16 else "fp32"
    engine_check = check_engine_bytes(plan, onnx_path, precision, facts) if opts.check else None
    record = EngineRecord(
        kind="build",
        onnx=str(onnx_path),
        onnx_sha256=facts.sha256,
        base_sha256=facts.base_sha256,
        precision=precision,
        refit_mode=mode,
        refittable_weights=marked,
        tensorrt_version=str(trt.__version__),
        plan_sha256=_sha(plan),
        dynamic_batch=opts.dynamic_batch,
        workspace_mb=opts.workspace_mb,
        engine_check=engine_check,
    )
    _write(out, plan, record, force)
    return record, note


def _save_timing_cache(config: Any, path: str) -> None:
    cache = config.get_timing_cache()
    if cache is not None:
        with atomic_path(path) as tmp:
            tmp.write_bytes(bytes(cache.serialize()))


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _write(out: str, plan: bytes, record: EngineRecord, force: bool) -> None:
    """The plan, then its record; a failure writing the record removes the new plan again."""
    with atomic_path(out, force=force) as tmp:
        tmp.write_bytes(plan)
    try:
        write_record(out, record)
    except BaseException:
        Path(out).unlink(missing_ok=True)
        raise


def check_engine_bytes(plan: bytes, onnx_path: str, precision: str, facts: ModelFacts) -> dict[str, Any]:
    """The engine against the ONNX model (ONNX Runtime, CPU) on a few seeded random batches, through
    Polygraphy's Comparator; refuses the engine when they differ beyond the precision's tolerance."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, SimpleCompareFunc

    from toolchain.feeds import sample_batches

    dims = [d or 1 for d in facts.input_shape[1:]]
    feeds = [{facts.input_name: x} for x in sample_batches(facts.batch or 1, dims, None, 0, CHECK_BATCHES)]
    runners = [
        OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["CPUExecutionProvider"]), name="onnx"),
        runner_from_bytes(plan),
    ]
    tol = tolerance(precision)
    with trt_errors() as errors:
        try:
            results = Comparator.run(runners, data_loader=feeds)
        except Exception as err:
            raise ToolchainError(
                "the engine could not be run to check it",
                seen=last_error(errors, f"{type(err).__name__}: {err}"),
                remedy="check the GPU and driver, or pass --no-check",
            ) from None
    ok = bool(Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=tol, rtol=tol)))
    worst = max(
        float(np.abs(np.asarray(b[k], np.float64) - np.asarray(a[k], np.float64)).max())
        for a, b in zip(results[0][1], results[1][1], strict=True)
        for k in a.keys()
    )
    if not ok:
        raise ToolchainError(
            f"the engine differs from the ONNX model beyond the {precision} tolerance {tol}",
            seen=f"max abs error {worst:.3g}",
            remedy="nothing was written; report the model, or build at fp32",
        )
    return {"batches": CHECK_BATCHES, "max_abs": worst, "tolerance": tol, "passed": True}


def _refit_record(plan: str) -> EngineRecord:
    record = read_record(plan)
    if record is None:
        raise ToolchainError(
            "the engine has no sidecar record, so its precision and refittable weights are unknown",
            seen=str(sidecar_path(plan)),
            remedy="rebuild it with `toolchain build --refit`",
        )
    if record.precision == "int8":
        raise ToolchainError(
            "INT8 engines are rebuilt per adapter, not refitted (TensorRT 10.3 documents no refit of quantized "
            "weights or their scales)",
            seen=f"{plan}: precision int8",
            remedy="build a new engine from the fused INT8 model: toolchain build FUSED.int8.onnx --int8",
        )
    if record.refit_mode == "none":
        raise ToolchainError(
            "the engine is not refittable", seen=plan, remedy="rebuild it with `toolchain build --refit`"
        )
    return record


def check_refit_provenance(record: EngineRecord, facts: ModelFacts) -> None:
    """The new model must be fused on the engine's base, and change only weights the engine can refit."""
    if facts.base_sha256 != record.base_sha256:
        raise ToolchainError(
            "the model was fused on another base than the engine's",
            seen=f"base {facts.base_sha256[:12]} vs the engine's {record.base_sha256[:12]}",
            remedy="fuse the adapter into the base the engine was built from, or build a new engine",
        )
    outside = (
        sorted(set(facts.fused_weights) - set(record.refittable_weights)) if record.refit_mode == "individual" else []
    )
    if outside:
        raise ToolchainError(
            "the model changes weights the engine cannot refit (they would stay stale)",
            seen=outside[:4],
            remedy=f"rebuild with `toolchain build {facts.path} --refit` (it marks the weights this model changes)",
        )


def _check_prototypes(refitter: Any, facts: ModelFacts) -> None:
    """Every refittable weight the ONNX model names must match its prototype in count and type."""
    dtypes = {1: "FLOAT", 10: "HALF", 16: "BF16", 6: "INT32", 7: "INT64", 3: "INT8", 2: "UINT8", 9: "BOOL"}
    for name in refitter.get_all_weights():
        if name not in facts.initializers:
            continue
        count, data_type = facts.initializers[name]
        proto = refitter.get_weights_prototype(name)
        expected = getattr(proto.dtype, "name", str(proto.dtype)).split(".")[-1]
        if proto.size != count or dtypes.get(data_type, "?") != expected:
            raise ToolchainError(
                "a weight of the new model does not fit the engine",
                seen=f"{name}: {count} values of {dtypes.get(data_type, data_type)}, the engine expects "
                f"{proto.size} of {expected}",
                remedy="a changed shape (e.g. a head grown for new classes) needs a new engine: `toolchain build`",
            )


def refit_engine(plan: str, fused_onnx: str, out: str, *, force: bool = False, check: bool = True) -> EngineRecord:
    """Refit ``plan`` from ``fused_onnx`` into ``out`` (every refittable weight, never on top of an earlier refit)."""
    check_distinct(
        {"-o": out, "the engine record (-o + .json)": sidecar_path(out)},
        {"the plan": plan, "the fused ONNX model": fused_onnx, "the plan's record": sidecar_path(plan)},
    )
    check_output(out, [plan, fused_onnx], force=force)
    check_output(sidecar_path(out), [plan, fused_onnx, sidecar_path(plan)], force=force)
    record = _refit_record(plan)
    trt = require_tensorrt()
    check_plan_version(plan, str(trt.__version__))
    facts = model_facts(fused_onnx)
    check_refit_provenance(record, facts)
    log = logger(trt)
    with trt_errors() as errors:
        engine = trt.Runtime(log).deserialize_cuda_engine(read_plan(plan))
        if engine is None:
            raise ToolchainError(
                "TensorRT could not deserialize the engine",
                seen=last_error(errors, plan),
                remedy="rebuild it with this TensorRT version",
            )
        refitter = trt.Refitter(engine, log)
        _check_prototypes(refitter, facts)
        parser_refitter = trt.OnnxParserRefitter(refitter, log)
        if not parser_refitter.refit_from_file(os.fspath(fused_onnx)):
            detail = "; ".join(
                str(parser_refitter.get_error(i).desc()) for i in range(parser_refitter.num_errors)
            ) or last_error(errors, "no detail")
            raise ToolchainError(
                "TensorRT's ONNX refitter rejected the model's weights",
                seen=detail[:300],
                remedy="refit from a model fused on the engine's base, or rebuild",
            )
        missing = list(refitter.get_missing_weights())
        if missing:
            raise ToolchainError(
                "refit left refittable weights unset",
                seen=missing[:4],
                remedy="refit from a model fused on the engine's base, or rebuild",
            )
        if not refitter.refit_cuda_engine():
            raise ToolchainError(
                "TensorRT could not refit the engine",
                seen=last_error(errors, "refit_cuda_engine returned False"),
                remedy="rebuild the engine",
            )
        data = bytes(engine.serialize())
    engine_check = check_engine_bytes(data, fused_onnx, record.precision, facts) if check else None
    new = replace(
        record,
        kind="refit",
        onnx=str(fused_onnx),
        onnx_sha256=facts.sha256,
        plan_sha256=_sha(data),
        parent_plan_sha256=sha256_file(plan),
    )
    new = replace(new, engine_check=engine_check, tensorrt_version=str(trt.__version__))
    _write(out, data, new, force)
    return new


def engine_runner(plan: str) -> Any:
    """A Polygraphy TrtRunner for an engine file built by the installed TensorRT."""
    trt = require_tensorrt()
    check_plan_version(plan, str(trt.__version__))
    return runner_from_bytes(read_plan(plan))


def runner_from_bytes(plan: bytes) -> Any:
    """A Polygraphy TrtRunner (named "engine") over serialized plan bytes."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    return TrtRunner(EngineFromBytes(plan), name="engine")
