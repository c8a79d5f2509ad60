"""`toolchain verify`: numerical parity of a fused model (or engine) against the unfused reference,
through Polygraphy's Comparator on real windows and random inputs."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.core.errors import ToolchainError
from toolchain.core.fileio import atomic_paths, check_output
from toolchain.core.jsonio import dumps_json
from toolchain.records import Agreement, Comparison, OutputErrors, VerifyReport

FP32_TOL = 1e-4
FP16_TOL = 1e-2
INT8_ENGINE_TOL = 1e-1  # an INT8 engine against its own QDQ model (toolchain.trt.engine.INT8_TOL)
DYNAMIC_BATCH = 64  # rows per run where a model's batch dimension is not fixed
MIN_AGREEMENT = 0.99  # an INT8 model's top-1 agreement with its FP32 reference on labelled real data


@dataclass
class VerifyOptions:
    """Feeds and tolerances. ``atol``/``rtol`` judge the model against the reference (always fp32
    defaults); ``engine_atol``/``engine_rtol`` judge the engine against the reference (default by
    the engine's precision, read from its build sidecar)."""

    data: str | None = "watch"
    real: int = 16
    random: int = 8
    atol: float | dict[str, float] | None = None  # one value, or per output name
    rtol: float | dict[str, float] | None = None
    engine_atol: float | dict[str, float] | None = None
    engine_rtol: float | dict[str, float] | None = None
    seed: int = 0
    force: bool = False
    inputs: np.ndarray | None = None  # real inputs (N, ...) to feed instead of windows from ``data``
    min_agreement: float = MIN_AGREEMENT
    split: str = "all"  # which windows of ``data`` the INT8 agreement is measured on
    subjects: tuple[int, ...] | None = None  # the target subjects ``split`` is taken around; None: the usual

    def check(self) -> None:
        if type(self.real) is not int or self.real < 0:
            raise ToolchainError(
                "--real must be an integer >= 0",
                seen=self.real,
                remedy="pass the number of real-data batches, e.g. --real 16",
            )
        if type(self.random) is not int or self.random < 1:
            raise ToolchainError(
                "--random must be an integer >= 1: random inputs probe the model beyond the data",
                seen=self.random,
                remedy="pass --random 8 or more",
            )
        if not (isinstance(self.min_agreement, int | float) and 0.0 <= self.min_agreement <= 1.0):
            raise ToolchainError(
                "--min-agreement must be a number in [0, 1]", seen=self.min_agreement, remedy="e.g. 0.99"
            )
        for name in ("atol", "rtol", "engine_atol", "engine_rtol"):
            value = getattr(self, name)
            for v in value.values() if isinstance(value, dict) else [value]:
                if v is not None and not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                    raise ToolchainError(
                        f"--{name.replace('_', '-')} must be a finite number >= 0", seen=v, remedy="pass e.g. 1e-4"
                    )


def make_feeds(name: str, shape: list[int | None], opts: VerifyOptions) -> list[dict[str, np.ndarray]]:
    """Real windows from ``opts.data`` (spread over the dataset) and seeded random inputs."""
    from toolchain.feeds import sample_batches

    batch = shape[0] or 1
    real = opts.inputs
    if real is None and opts.data and opts.real:
        from toolchain.data.sources import load_data

        real = load_data(opts.data).X
    if real is not None and opts.real and list(np.shape(real)[1:]) != list(shape[1:]):
        raise ToolchainError(
            "the data's window or image shape does not fit the model input",
            seen=(list(np.shape(real)[1:]), shape[1:]),
            remedy="verify with data of the model's input shape, or --data none",
        )
    dims = [d or 1 for d in shape[1:]]
    return [{name: x} for x in sample_batches(batch, dims, real, opts.real, opts.random, opts.seed)]


def _tolerance(value: float | dict[str, float] | None, default: float) -> float | dict[str, float]:
    """Polygraphy takes a float or a per-output dict; "" keys the default for unnamed outputs."""
    if value is None:
        return default
    if isinstance(value, dict):
        return {"": default, **value}
    return value


def parse_tolerance(text: str) -> float | dict[str, float]:
    """``1e-4`` or ``logits:1e-4,aux:1e-3`` (per output)."""
    try:
        value: float | dict[str, float] = (
            float(text)
            if ":" not in text
            else {k.strip(): float(v) for k, v in (item.rsplit(":", 1) for item in text.split(",") if item)}
        )
    except ValueError:
        raise ToolchainError("a tolerance is a number or NAME:NUMBER[,NAME:NUMBER...]", seen=text) from None
    for v in value.values() if isinstance(value, dict) else [value]:
        if not (math.isfinite(v) and v >= 0):
            raise ToolchainError("a tolerance must be a finite number >= 0", seen=text, remedy="pass e.g. 1e-4")
    return value


def error_stats(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Max and mean absolute and relative error, and the smallest atol (rtol=0) / rtol (atol=0) that pass."""
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    rel = diff / np.maximum(np.abs(ref.astype(np.float64)), 1e-12)
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "max_rel": float(rel.max()),
        "mean_rel": float(rel.mean()),
        "min_passing_atol": float(diff.max()),
        "min_passing_rtol": float(rel.max()),
    }


OUTPUT_FILES = ("verify.json", "inputs.json", "outputs.json")


def _out_dir(out_dir: str, inputs: list[str | None], force: bool) -> Path:
    """Check --out-dir before any work; it is created only once there are results to write."""
    d = Path(out_dir)
    if d.exists() and not d.is_dir():
        raise ToolchainError("--out-dir names a file, not a folder", seen=str(d), remedy="choose a folder path")
    for name in OUTPUT_FILES:
        check_output(d / name, inputs, force=force) if d.is_dir() else None
    return d


def _create(d: Path) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ToolchainError(
            "cannot create --out-dir", seen=f"{d}: {err.strerror or err}", remedy="choose a folder you can write to"
        ) from None


def _engine_tolerance(
    engine: str, opts: VerifyOptions
) -> tuple[float | dict[str, float], float | dict[str, float], str]:
    """(atol, rtol, precision) for engine vs reference: fp16 engines get FP16_TOL unless given."""
    from toolchain.trt.record import read_record

    given = opts.engine_atol is not None and opts.engine_rtol is not None
    try:
        record = read_record(engine)
    except ToolchainError:
        if not given:
            raise
        record = None
    precision = record.precision if record is not None else None
    if precision is None and (opts.engine_atol is None or opts.engine_rtol is None):
        raise ToolchainError(
            "the engine's precision is unknown (it has no sidecar ENGINE.plan.json from `toolchain build`), so "
            "no default tolerance is safe",
            seen=engine,
            remedy="pass --engine-atol and --engine-rtol (1e-2 for fp16 engines), or rebuild it with `toolchain build`",
        )
    default = {"fp16": FP16_TOL, "int8": INT8_ENGINE_TOL}.get(str(precision), FP32_TOL)
    return _tolerance(opts.engine_atol, default), _tolerance(opts.engine_rtol, default), precision or "given"


def verify(
    model: str, reference: str, out_dir: str, *, engine: str | None = None, opts: VerifyOptions | None = None
) -> VerifyReport:
    """Run the reference, the model (and the engine) on the same inputs; judge model vs reference at
    fp32 tolerances and engine vs reference at the engine's own, each pair separately."""
    opts = opts or VerifyOptions()
    opts.check()
    outdir = _out_dir(out_dir, [model, reference, engine], opts.force)
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    from toolchain.graphs.onnx_io import input_of, load_onnx
    from toolchain.graphs.qdq import check_activation_scales, is_quantized
    from toolchain.graphs.weights import index_weights

    G_LOGGER.module_severity = G_LOGGER.WARNING
    model_proto, reference_proto = load_onnx(model), load_onnx(reference)  # each read once
    name, shape = input_of(reference_proto)
    model_input = input_of(model_proto)
    if model_input != (name, shape):
        raise ToolchainError("the model and the reference have different inputs", seen=(model_input, (name, shape)))
    outputs = _same_outputs(model_proto, reference_proto)
    _check_tolerance_names(opts, outputs)
    int8 = is_quantized(model_proto) and not is_quantized(reference_proto)
    for proto in (model_proto, reference_proto):
        if is_quantized(proto):  # a broken scale makes every number after it meaningless
            check_activation_scales(proto.graph, index_weights(proto.graph))
    if int8 and not opts.data:
        raise ToolchainError(
            "an INT8 model is judged against its FP32 reference on labelled real data",
            seen="--data none",
            remedy="pass the data spec the model serves, e.g. --data watch",
        )
    pairs = {"model": (1, _tolerance(opts.atol, FP32_TOL), _tolerance(opts.rtol, FP32_TOL), "int8" if int8 else "fp32")}
    runners = [
        OnnxrtRunner(SessionFromOnnx(str(reference), providers=["CPUExecutionProvider"]), name="reference"),
        OnnxrtRunner(SessionFromOnnx(str(model), providers=["CPUExecutionProvider"]), name="model"),
    ]
    if engine:
        from toolchain.trt.engine import engine_runner

        e_atol, e_rtol, precision = _engine_tolerance(engine, opts)
        runners.append(engine_runner(engine))
        pairs["engine"] = (2, e_atol, e_rtol, precision)
    feeds = make_feeds(name, shape, opts)
    results = Comparator.run(runners, data_loader=feeds)
    stats = _per_output(results)
    comparisons = {}
    for runner, (index, atol, rtol, precision) in pairs.items():
        if runner == "model" and int8:  # judged by task agreement below; the errors are reported, not gated
            errors = {k: OutputErrors(**v) for k, v in stats[runner].items()}
            comparisons[runner] = Comparison("reference", atol, rtol, precision, False, errors)
            continue
        ok = Comparator.compare_accuracy(
            results, comparisons=[(0, index)], compare_func=SimpleCompareFunc(atol=atol, rtol=rtol)
        )
        errors = {k: OutputErrors(**v) for k, v in stats[runner].items()}
        comparisons[runner] = Comparison("reference", atol, rtol, precision, bool(ok), errors)
    agreement = None
    if int8:  # the verdict is the task's: top-1 agreement on labelled data; the errors are reported beside it
        agreement = task_agreement(model, reference, opts)
        comparisons["model"] = dataclasses.replace(comparisons["model"], passed=agreement.passed)
    report = VerifyReport(
        reference=str(reference),
        model=str(model),
        engine=engine,
        iterations=len(feeds),
        real_batches=len(feeds) - opts.random,
        random_inputs=opts.random,
        comparisons=comparisons,
        passed=all(c.passed for c in comparisons.values()),
        inputs=str(outdir / "inputs.json"),
        outputs=str(outdir / "outputs.json"),
        agreement=agreement,
    )
    created = not outdir.exists()
    _create(outdir)
    try:
        with atomic_paths([outdir / f for f in OUTPUT_FILES], force=opts.force) as (
            t_report,
            t_inputs,
            t_outputs,
        ):  # all three or none
            t_report.write_bytes(dumps_json(report.to_dict()))
            save_json(feeds, str(t_inputs))
            results.save(str(t_outputs))
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                outdir.rmdir()
        raise
    return report


def _same_outputs(model: Any, reference: Any) -> list[str]:
    """The model must have the reference's outputs: same names, same count, same shapes."""
    from toolchain.graphs.onnx_io import outputs_of

    got, want = outputs_of(model), outputs_of(reference)
    if got != want:
        raise ToolchainError(
            "the model and the reference have different outputs (names, count or shapes)",
            seen=f"{got[:3]} vs {want[:3]}",
            remedy="compare a fused model with the unfused export of the same model",
        )
    return [n for n, _ in want]


def _check_tolerance_names(opts: VerifyOptions, outputs: list[str]) -> None:
    for option in ("atol", "rtol", "engine_atol", "engine_rtol"):
        value = getattr(opts, option)
        unknown = sorted(set(value) - set(outputs)) if isinstance(value, dict) else []
        if unknown:
            raise ToolchainError(
                f"--{option.replace('_', '-')} names an output the model does not have",
                seen=unknown[:3],
                remedy=f"the outputs are {outputs}",
            )


def _per_output(results: Any) -> dict[str, dict[str, dict[str, float]]]:
    _, ref_iters = results[0]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for runner_name, iters in list(results)[1:]:
        per: dict[str, list[dict[str, float]]] = {}
        for ref_it, it in zip(ref_iters, iters, strict=True):
            for key in ref_it.keys():
                per.setdefault(key, []).append(error_stats(np.asarray(it[key]), np.asarray(ref_it[key])))
        out[runner_name] = {k: _merge(v) for k, v in per.items()}
    return out


def _merge(stats: list[dict[str, float]]) -> dict[str, float]:
    return {
        k: (max(s[k] for s in stats) if k.startswith(("max", "min")) else float(np.mean([s[k] for s in stats])))
        for k in stats[0]
    }


def model_batches(x: np.ndarray, batch_dim: Any) -> Iterator[tuple[np.ndarray, int]]:
    """``x`` (N, ...) in runs of a model input's batch dimension ``batch_dim`` (``DYNAMIC_BATCH`` rows
    where it is not a fixed int), each with its count of real rows: a fixed batch's last run is filled up
    with copies of the last row, whose results the caller drops."""
    fixed = isinstance(batch_dim, int)
    batch = batch_dim if fixed else DYNAMIC_BATCH
    for i in range(0, len(x), batch):
        chunk = x[i : i + batch]
        real = len(chunk)
        if fixed and real < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - real, axis=0)])
        yield chunk, real


def first_outputs(model: str, x: np.ndarray) -> np.ndarray:
    """The first output for every row of ``x``, batched at the model's batch size (``model_batches``)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    out = [np.asarray(session.run(None, {inp.name: chunk})[0])[:real] for chunk, real in model_batches(x, inp.shape[0])]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def predictions(model: str, x: np.ndarray) -> np.ndarray:
    """The first output's argmax over axis 1 for every row of ``x`` (``first_outputs``)."""
    out = first_outputs(model, x)
    return out.argmax(axis=1) if len(out) else np.zeros(0, np.int64)


def task_agreement(model: str, reference: str, opts: VerifyOptions) -> Agreement:
    """Top-1 agreement and macro-F1 of ``model`` and ``reference`` on the labelled windows of
    ``opts.data`` (``opts.split`` of it), every window once, and where the quantized ``model``'s
    activations leave their INT8 range on those windows or stay far inside it (``toolchain.saturation``);
    which windows flip (``toolchain.flips``)."""
    from toolchain.data.sources import load_split
    from toolchain.flips import flip_fields
    from toolchain.metrics import accuracy, macro_f1
    from toolchain.saturation import ranges

    ds = load_split(str(opts.data), opts.split, opts.subjects)
    x = np.ascontiguousarray(ds.X, dtype=np.float32)
    out, ref_out = first_outputs(model, x), first_outputs(reference, x)
    if not len(out):
        raise ToolchainError("no labelled windows to measure agreement on", seen=(opts.data, opts.split, len(x)))
    got, ref = out.argmax(axis=1), ref_out.argmax(axis=1)
    y, k = ds.y, len(ds.classes)
    top1 = float(np.mean(got == ref))
    clipped, coarse = ranges(model, x)
    return Agreement(
        data=str(opts.data),
        split=opts.split,
        windows=len(got),
        top1_agreement=top1,
        min_agreement=float(opts.min_agreement),
        f1_model=macro_f1(y, got, k),
        f1_reference=macro_f1(y, ref, k),
        accuracy_model=accuracy(y, got),
        accuracy_reference=accuracy(y, ref),
        passed=top1 >= opts.min_agreement,
        saturation=clipped,
        coarse=coarse,
        **flip_fields(out, ref_out),
    )
