"""`toolchain verify`: numerical parity of a fused model (or engine) against the unfused reference,
through Polygraphy's Comparator on real windows and random inputs."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.errors import ToolchainError
from toolchain.fileio import atomic_path, write_bytes_atomic

FP32_TOL = 1e-4
FP16_TOL = 1e-2


@dataclass
class VerifyOptions:
    data: str | None = "watch"
    real: int = 16
    random: int = 8
    atol: float | dict[str, float] | None = None  # one value, or per output name
    rtol: float | dict[str, float] | None = None
    seed: int = 0


def input_info(path: str | os.PathLike[str]) -> tuple[str, list[int | None]]:
    """(name, shape) of a model's single input; dynamic dims are None."""
    from graphs.onnx_io import load_onnx

    model = load_onnx(path)
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ToolchainError("verify and bench expect a model with one input", seen=[i.name for i in inputs])
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    return inputs[0].name, dims


def make_feeds(name: str, shape: list[int | None], opts: VerifyOptions) -> list[dict[str, np.ndarray]]:
    """Real windows from ``opts.data`` (spread over the dataset) and seeded random inputs."""
    batch = shape[0] or 1
    feeds: list[dict[str, np.ndarray]] = []
    if opts.data and opts.real:
        from toolchain.data.sources import load_data

        ds = load_data(opts.data)
        if list(ds.X.shape[1:]) != list(shape[1:]):
            raise ToolchainError("the data's window shape does not fit the model input", seen=(ds.X.shape[1:], shape[1:]))
        idx = np.linspace(0, len(ds) - 1, opts.real * batch).astype(int)
        feeds += [{name: ds.X[idx[i * batch : (i + 1) * batch]]} for i in range(opts.real)]
        scale = float(ds.X.std())
    else:
        scale = 1.0
    rng = np.random.default_rng(opts.seed)
    dims = [batch, *[d or 1 for d in shape[1:]]]
    feeds += [{name: (scale * rng.standard_normal(dims)).astype(np.float32)} for _ in range(opts.random)]
    return feeds


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
        if ":" not in text:
            return float(text)
        return {k.strip(): float(v) for k, v in (item.rsplit(":", 1) for item in text.split(",") if item)}
    except ValueError:
        raise ToolchainError("a tolerance is a number or NAME:NUMBER[,NAME:NUMBER...]", seen=text) from None


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


def verify(model: str, reference: str, out_dir: str, *, engine: str | None = None, opts: VerifyOptions | None = None) -> dict[str, Any]:
    """Run both models (and the engine) on the same inputs; compare each against the reference."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, CompareFunc
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING
    opts = opts or VerifyOptions()
    name, shape = input_info(reference)
    if input_info(model) != (name, shape):
        raise ToolchainError("the model and the reference have different inputs", seen=(input_info(model), (name, shape)))
    feeds = make_feeds(name, shape, opts)
    runners = [
        OnnxrtRunner(SessionFromOnnx(str(reference), providers=["CPUExecutionProvider"]), name="reference"),
        OnnxrtRunner(SessionFromOnnx(str(model), providers=["CPUExecutionProvider"]), name="model"),
    ]
    fp16 = False
    if engine:
        from toolchain.trt_engine import engine_runner

        runner, fp16 = engine_runner(engine)
        runners.append(runner)
    default = FP16_TOL if fp16 else FP32_TOL
    atol, rtol = _tolerance(opts.atol, default), _tolerance(opts.rtol, default)
    results = Comparator.run(runners, data_loader=feeds)
    outdir = Path(out_dir)
    outdir.mkdir(parents=True, exist_ok=True)
    with atomic_path(outdir / "inputs.json") as tmp:
        save_json(feeds, str(tmp))
    with atomic_path(outdir / "outputs.json") as tmp:
        results.save(str(tmp))
    accuracy = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol))
    report = {
        "reference": str(reference),
        "model": str(model),
        "engine": engine,
        "atol": atol,
        "rtol": rtol,
        "iterations": len(feeds),
        "real_windows": opts.real if opts.data else 0,
        "random_inputs": opts.random,
        "comparisons": _per_output(results),
        "passed": bool(accuracy),
        "inputs": str(outdir / "inputs.json"),
        "outputs": str(outdir / "outputs.json"),
    }
    write_bytes_atomic(outdir / "verify.json", (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    return report


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
    return {k: (max(s[k] for s in stats) if k.startswith(("max", "min")) else float(np.mean([s[k] for s in stats]))) for k in stats[0]}
