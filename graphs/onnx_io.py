"""Load and save ONNX models safely: clear errors, contained external data, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from toolchain.errors import ToolchainError
from toolchain.fileio import atomic_path

TWO_GB = 2**31 - 1
MAX_ONNX_BYTES = TWO_GB


def check_external_data(model: onnx.ModelProto, folder: Path) -> None:
    """Refuse external-data locations that are absolute or leave ``folder`` (``..``, symlinks)."""
    root = folder.resolve()
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not location or os.path.isabs(location) or Path(location).drive:
            raise ToolchainError("ONNX external data location must be a relative path inside the model's folder", seen=location or "(empty)", remedy="re-save the model with its data beside it")
        target = (folder / location).resolve()
        if not target.is_relative_to(root):
            raise ToolchainError("ONNX external data location leaves the model's folder", seen=location, remedy="re-save the model with its data beside it")
        if not target.is_file():
            raise ToolchainError("ONNX external data file is missing", seen=location)


def _all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    out = list(model.graph.initializer)
    for node in model.graph.node:
        out += [a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
    return out


def load_onnx(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Parse an ONNX file with its external data (contained to its folder) and run the checker."""
    p = Path(path)
    if not p.is_file():
        raise ToolchainError("ONNX model file does not exist", seen=str(p))
    if p.stat().st_size > MAX_ONNX_BYTES:
        raise ToolchainError("ONNX file is larger than protobuf allows (2 GB); weights over that belong in external data", seen=p.stat().st_size)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as err:  # protobuf raises DecodeError and others
        raise ToolchainError("not an ONNX model: the file does not parse", seen=f"{p}: {type(err).__name__}", remedy="pass a .onnx file") from None
    if not model.graph.node:
        raise ToolchainError("not an ONNX model: the graph has no nodes", seen=str(p), remedy="pass a .onnx file")
    check_external_data(model, p.parent)
    try:
        onnx.checker.check_model(str(p))
        onnx.load_external_data_for_model(model, str(p.parent))
    except Exception as err:
        raise ToolchainError("ONNX model is invalid", seen=f"{p}: {type(err).__name__}: {str(err)[:160]}", remedy="re-export the model") from None
    return model


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Write ``model`` atomically; weights go to ``<name>.data`` beside it when it exceeds 2 GB."""
    p = Path(path)
    try:
        data = model.SerializeToString()
    except ValueError:  # protobuf refuses messages over 2 GB
        data = None
    with atomic_path(p) as tmp:
        if data is not None and len(data) <= TWO_GB:
            tmp.write_bytes(data)
        else:
            data_name = p.name + ".data"
            # the temporary file sits beside ``path``, so the data file lands beside it too
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
