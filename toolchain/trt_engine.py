"""TensorRT 10.x engines (`toolchain build`, `toolchain refit`) through Polygraphy's TensorRT loaders.

Written against TensorRT 10.3 (JetPack 6.x on the Orin Nano). Everything here imports tensorrt
lazily; where it is missing, the commands say so and how to get it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from toolchain.core.errors import ToolchainError
from toolchain.core.fileio import atomic_path, check_output, sha256_file, write_bytes_atomic

HOWTO = "install TensorRT 10.x: on a Jetson Orin Nano flash JetPack 6.x (it ships TensorRT 10.3 and python3-libnvinfer); on an x86 machine with an NVIDIA GPU `pip install tensorrt`"


@dataclass
class BuildOptions:
    fp16: bool = False
    refit: bool = False
    timing_cache: str | None = None
    dynamic_batch: tuple[int, int, int] | None = None
    workspace_mb: int = 1024


def tensorrt_status() -> str | None:
    """None when TensorRT and a GPU are usable, else a sentence saying what is missing."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed"
    try:
        import tensorrt as trt

        if trt.Builder(trt.Logger(trt.Logger.ERROR)) is None:
            return "TensorRT could not create a builder (no NVIDIA GPU or driver)"
    except Exception as err:  # the PyPI stub raises at import; a missing driver raises at Builder()
        return f"TensorRT is present but unusable ({type(err).__name__}: {str(err)[:120]})"
    return None


def require_tensorrt() -> Any:
    missing = tensorrt_status()
    if missing:
        raise ToolchainError(f"{missing}; build and refit need TensorRT 10.x and an NVIDIA GPU", seen="this machine", remedy=HOWTO)
    import tensorrt as trt

    if int(trt.__version__.split(".")[0]) < 10:
        raise ToolchainError("TensorRT 10.x is required", seen=trt.__version__, remedy=HOWTO)
    return trt


def sidecar_path(plan: str | os.PathLike[str]) -> Path:
    return Path(str(plan) + ".json")


def fused_weight_names(onnx_path: str | os.PathLike[str]) -> list[str]:
    """Initializer names the fuse pass changed (recorded in the fused model's metadata)."""
    from toolchain.graphs.onnx_io import load_onnx

    meta = {p.key: p.value for p in load_onnx(onnx_path).metadata_props}
    return list(json.loads(meta.get("toolchain.fused_weights", "[]")))


def build_engine(onnx_path: str, out: str, opts: BuildOptions, *, force: bool = False) -> dict[str, Any]:
    """Build a serialized engine with Polygraphy's NetworkFromOnnxPath / CreateConfig / EngineBytesFromNetwork."""
    check_output(out, [onnx_path], force=force)
    trt = require_tensorrt()
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, PostprocessConfig, Profile

    refit_names = fused_weight_names(onnx_path) if opts.refit else []
    profiles = None
    if opts.dynamic_batch:
        from toolchain.graphs.onnx_io import input_info

        name, shape = input_info(onnx_path)
        lo, opt, hi = opts.dynamic_batch
        profiles = [Profile().add(name, min=[lo, *shape[1:]], opt=[opt, *shape[1:]], max=[hi, *shape[1:]])]
    # TensorRT 10.0+ can refit chosen weights only (REFIT_INDIVIDUAL + mark_weights_refittable); older: all weights
    individual = bool(refit_names) and hasattr(trt.BuilderFlag, "REFIT_INDIVIDUAL") and hasattr(trt.INetworkDefinition, "mark_weights_refittable")
    config = CreateConfig(
        fp16=opts.fp16,
        refittable=opts.refit and not individual,
        profiles=profiles,
        load_timing_cache=opts.timing_cache if opts.timing_cache and Path(opts.timing_cache).is_file() else None,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: opts.workspace_mb << 20},
    )
    if individual:

        def mark(builder: Any, network: Any, cfg: Any) -> None:
            cfg.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
            for n in refit_names:
                if not network.mark_weights_refittable(n):
                    raise ToolchainError("TensorRT could not mark a fused weight refittable", seen=n)

        config = PostprocessConfig(config, mark)
    engine_bytes = EngineBytesFromNetwork(NetworkFromOnnxPath(onnx_path), config=config, save_timing_cache=opts.timing_cache)()
    with atomic_path(out) as tmp:
        tmp.write_bytes(bytes(engine_bytes))
    info = {
        "onnx": str(onnx_path),
        "onnx_sha256": sha256_file(onnx_path),
        "tensorrt_version": trt.__version__,
        "options": asdict(opts),
        "refittable_weights": refit_names if individual else ("all" if opts.refit else []),
    }
    write_bytes_atomic(sidecar_path(out), (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
    return info


def refit_engine(plan: str, fused_onnx: str, out: str, *, force: bool = False) -> dict[str, Any]:
    """Set *every* refittable weight from the fused model (never on top of an earlier refit), check none is missing."""
    check_output(out, [plan, fused_onnx], force=force)
    trt = require_tensorrt()
    import onnx

    from toolchain.graphs.onnx_io import load_onnx

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(plan).read_bytes())
    if engine is None:
        raise ToolchainError("TensorRT could not deserialize the engine", seen=plan, remedy="rebuild it with this TensorRT version")
    refitter = trt.Refitter(engine, logger)
    names = list(refitter.get_all_weights())
    if not names:
        raise ToolchainError("the engine is not refittable", seen=plan, remedy="build it with `toolchain build --refit`")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in load_onnx(fused_onnx).graph.initializer}
    absent = [n for n in names if n not in inits]
    if absent:
        raise ToolchainError("the fused model lacks weights the engine needs", seen=absent[:4], remedy="refit from a model fused from the same base")
    keep = []
    for n in names:
        keep.append(inits[n].astype(inits[n].dtype, copy=True))
        refitter.set_named_weights(n, trt.Weights(keep[-1]))
    missing = list(refitter.get_missing_weights())
    if missing or not refitter.refit_cuda_engine():
        raise ToolchainError("refit left weights unset or failed", seen=missing[:4])
    with atomic_path(out) as tmp:
        tmp.write_bytes(bytes(engine.serialize()))
    info = {"engine": str(plan), "onnx": str(fused_onnx), "onnx_sha256": sha256_file(fused_onnx), "weights_set": len(names), "tensorrt_version": trt.__version__}
    write_bytes_atomic(sidecar_path(out), (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
    return info


def read_sidecar(plan: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The build sidecar ``ENGINE.json`` as a dict; None when missing or malformed."""
    side = sidecar_path(plan)
    try:
        info = json.loads(side.read_text()) if side.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("options", {}), dict) else None


def engine_precision(plan: str | os.PathLike[str]) -> str | None:
    """ "fp16" or "fp32" from the build sidecar; None when the sidecar is missing or malformed."""
    info = read_sidecar(plan)
    if info is None:
        return None
    return "fp16" if info.get("options", {}).get("fp16") else "fp32"


def engine_runner(plan: str) -> Any:
    """A Polygraphy TrtRunner for an engine file."""
    require_tensorrt()
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    return TrtRunner(EngineFromBytes(BytesFromPath(plan)), name="engine")
