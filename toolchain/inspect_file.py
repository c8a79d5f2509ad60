"""`toolchain inspect`: what an adapter, ONNX model or engine file is, without torch or a GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolchain.core.errors import ToolchainError
from toolchain.core.fileio import sha256_file


def describe(path: str) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        return _peft(p)
    if not p.is_file():
        raise ToolchainError("file does not exist", seen=str(p))
    with open(p, "rb") as f:
        head = f.read(16)
    if p.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        return _adapter(p)
    if p.suffix in (".plan", ".engine"):
        return _engine(p)
    return _onnx(p)


def _adapter(p: Path) -> dict[str, Any]:
    from toolchain.adapters.adapter_file import FORMAT_VERSION, load_adapter
    from toolchain.adapters.methods import get_method

    a = load_adapter(p)
    return {
        "kind": "adapter",
        "file": str(p),
        "sha256": sha256_file(p),
        "method": a.method,
        "format_version": FORMAT_VERSION,
        "info": a.info,
        "layers": [
            {
                "name": x.name,
                "param": x.param,
                "ranks": list(x.ranks),
                "weight_shape": list(x.geometry.weight_shape),
                "groups": x.geometry.groups,
                "base_sha256": x.base_sha256,
            }
            for x in a.layers
        ],
        "extras": [e.param for e in a.extras],
        "trained_values": int(sum(t.size for k, t in a.tensors.items() if ".core" not in k)),
        "fusable": get_method(a.method).fusable,
    }


def _peft(p: Path) -> dict[str, Any]:
    from toolchain.graphs.peft import load_peft

    a = load_peft(p)
    c = a.config
    return {
        "kind": "peft-adapter",
        "folder": str(p),
        "sha256": a.sha256,
        "method": "dora" if c.get("use_dora") else "lora",
        "r": c.get("r"),
        "lora_alpha": c.get("lora_alpha"),
        "use_rslora": bool(c.get("use_rslora")),
        "modules": {m: {k: list(v.shape) for k, v in parts.items()} for m, parts in sorted(a.modules.items())},
        "fusable_into": "the ONNX export of the model it was trained on (matched by module name and shape)",
    }


def _onnx(p: Path) -> dict[str, Any]:
    from toolchain.graphs.onnx_io import load_onnx

    m = load_onnx(p)
    meta = {x.key: x.value for x in m.metadata_props}
    from toolchain.graphs.provenance import read_provenance

    prov = read_provenance(m)
    inits = {t.name for t in m.graph.initializer}

    def io(values: Any) -> list[dict[str, Any]]:
        return [
            {
                "name": v.name,
                "shape": [
                    d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim
                ],
            }
            for v in values
            if v.name not in inits
        ]

    return {
        "kind": "onnx",
        "file": str(p),
        "sha256": sha256_file(p),
        "fused": bool(prov and prov.fused),
        "exported_as": meta.get("toolchain.kind"),
        "base_sha256": prov.base_sha256 if prov else None,
        "adapter_sha256": prov.adapter_sha256 if prov else None,
        "toolchain_version": prov.version if prov else None,
        "opset": [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")],
        "ir_version": m.ir_version,
        "inputs": io(m.graph.input),
        "outputs": io(m.graph.output),
        "nodes": len(m.graph.node),
    }


def _engine(p: Path) -> dict[str, Any]:
    from dataclasses import asdict

    from toolchain.trt.record import read_plan_version, read_record, sidecar_path

    side = sidecar_path(p)
    try:
        record, problem = read_record(p), None
    except ToolchainError as err:  # describe the engine anyway, and say what is wrong with its record
        record, problem = None, str(err)
    return {
        "kind": "tensorrt-engine",
        "file": str(p),
        "sha256": sha256_file(p),
        "bytes": p.stat().st_size,
        "tensorrt_version": read_plan_version(p),
        "record": asdict(record) if record is not None else None,
        "record_file": str(side) if side.is_file() else None,
        "record_error": problem,
        "note": "the TensorRT version is read from the plan's header (bytes 24-26); a plan loads only in that "
        "TensorRT release",
    }
