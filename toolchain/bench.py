"""`toolchain bench`: ONNX Runtime latency of models measured side by side, interleaved."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from toolchain.core.errors import ToolchainError

MAX_RUNS = 100_000
MAX_THREADS = 256
MAX_ATTEMPTS = 10
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def _session(path: str, provider: str, threads: int) -> Any:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if PROVIDERS[provider] not in available:
        raise ToolchainError(
            "ONNX Runtime provider is not available here",
            seen=provider,
            remedy=f"use one of {[k for k, v in PROVIDERS.items() if v in available]}",
        )
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=[PROVIDERS[provider]])


def bench(
    models: list[str], *, warmup: int = 20, runs: int = 200, provider: str = "cpu", threads: int = 1, seed: int = 0
) -> dict[str, Any]:
    """Median, p90, p99 latency (ms) per model; rounds interleave the models so drift hits all alike.

    Ratios are each model's median over the first model's median.
    """
    from toolchain.graphs.onnx_io import input_info

    for name, value, low, high in (
        ("--runs", runs, 1, MAX_RUNS),
        ("--warmup", warmup, 0, MAX_RUNS),
        ("--threads", threads, 1, MAX_THREADS),
    ):
        if type(value) is not int or not low <= value <= high:
            raise ToolchainError(
                f"{name} must be an integer from {low} to {high}",
                seen=value,
                remedy=f"pass {name} {max(low, 1)} or more, at most {high}",
            )
    if provider not in PROVIDERS:
        raise ToolchainError("unknown provider", seen=provider, remedy=f"use one of {list(PROVIDERS)}")
    infos = [input_info(m) for m in models]
    if len({(n, tuple(s)) for n, s in infos}) != 1:
        raise ToolchainError("bench compares models with the same input", seen=infos)
    name, shape = infos[0]
    x = np.random.default_rng(seed).standard_normal([d or 1 for d in shape]).astype(np.float32)
    sessions = [_session(m, provider, threads) for m in models]
    for s in sessions:
        for _ in range(warmup):
            s.run(None, {name: x})
    times = np.zeros((len(models), runs))
    order = np.arange(len(models))
    rng = np.random.default_rng(seed)
    for r in range(runs):
        rng.shuffle(order)
        for i in order:
            t0 = time.perf_counter_ns()
            sessions[i].run(None, {name: x})
            times[i, r] = (time.perf_counter_ns() - t0) / 1e6
    stats: list[dict[str, Any]] = [
        {
            "model": m,
            "median_ms": float(np.median(t)),
            "p90_ms": float(np.percentile(t, 90)),
            "p99_ms": float(np.percentile(t, 99)),
            "mean_ms": float(t.mean()),
        }
        for m, t in zip(models, times, strict=True)
    ]
    for s in stats:
        s["ratio_to_first"] = s["median_ms"] / stats[0]["median_ms"]
    return {
        "provider": provider,
        "threads": threads,
        "warmup": warmup,
        "runs": runs,
        "input_shape": [d or 1 for d in shape],
        "results": stats,
    }


def gate(models: list[str], max_ratio: float, attempts: int, **kwargs: Any) -> dict[str, Any]:
    """Latency gate for CI: every model's median over the first model's must be <= ``max_ratio``.

    Each attempt measures all models interleaved (machine noise hits them alike); an attempt over
    the bound is measured again, up to ``attempts`` times, and the gate passes on the first attempt
    within it. Returns the last attempt's results with ``gate``: bound, attempts used, passed, and
    the ratios of every attempt.
    """
    if not (isinstance(max_ratio, int | float) and math.isfinite(max_ratio) and max_ratio > 0):
        raise ToolchainError(
            "--max-ratio must be a finite number > 0", seen=max_ratio, remedy="pass e.g. --max-ratio 1.05"
        )
    if type(attempts) is not int or not 1 <= attempts <= MAX_ATTEMPTS:
        raise ToolchainError(
            f"--attempts must be an integer from 1 to {MAX_ATTEMPTS}", seen=attempts, remedy="pass --attempts 3"
        )
    if len(models) < 2:
        raise ToolchainError(
            "--max-ratio needs models to compare with the first", seen=models, remedy="pass --vs FUSED.onnx"
        )
    history: list[list[float]] = []
    for _ in range(attempts):
        res = bench(models, **kwargs)
        history.append([r["ratio_to_first"] for r in res["results"][1:]])
        if max(history[-1]) <= max_ratio:
            break
    res["gate"] = {
        "max_ratio": max_ratio,
        "attempts": len(history),
        "ratios": history,
        "passed": max(history[-1]) <= max_ratio,
    }
    return res
