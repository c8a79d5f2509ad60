"""`toolchain bench`: ONNX Runtime latency of models measured side by side, interleaved."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from toolchain.core.errors import ToolchainError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def _session(path: str, provider: str, threads: int) -> Any:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if PROVIDERS[provider] not in available:
        raise ToolchainError("ONNX Runtime provider is not available here", seen=provider, remedy=f"use one of {[k for k, v in PROVIDERS.items() if v in available]}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=[PROVIDERS[provider]])


def bench(models: list[str], *, warmup: int = 20, runs: int = 200, provider: str = "cpu", threads: int = 1, seed: int = 0) -> dict[str, Any]:
    """Median, p90, p99 latency (ms) per model; rounds interleave the models so drift hits all alike.

    Ratios are each model's median over the first model's median.
    """
    from toolchain.graphs.onnx_io import input_info

    for name, value, low in (("--runs", runs, 1), ("--warmup", warmup, 0), ("--threads", threads, 1)):
        if type(value) is not int or value < low:
            raise ToolchainError(f"{name} must be an integer >= {low}", seen=value, remedy=f"pass {name} {max(low, 1)} or more")
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
        {"model": m, "median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)), "p99_ms": float(np.percentile(t, 99)), "mean_ms": float(t.mean())}
        for m, t in zip(models, times, strict=True)
    ]
    for s in stats:
        s["ratio_to_first"] = s["median_ms"] / stats[0]["median_ms"]
    return {"provider": provider, "threads": threads, "warmup": warmup, "runs": runs, "input_shape": [d or 1 for d in shape], "results": stats}
