"""Load and save ONNX models safely: clear errors, contained external data, validated atomic writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import onnx

from toolchain.core.errors import ToolchainError
from toolchain.core.fileio import atomic_path, read_regular_file

TWO_GB = 2**31 - 1
MAX_ONNX_BYTES = TWO_GB
EXTERNAL_THRESHOLD = 1024  # tensors of at least this many bytes go to external data past 2 GB
_REMEDY = "pass a .onnx file"


def _external_location(tensor: onnx.TensorProto) -> str | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return next((e.value for e in tensor.external_data if e.key == "location"), "")


def check_external_data(model: onnx.ModelProto, folder: Path) -> None:
    """Refuse external-data locations that are absolute or leave ``folder`` (``..``, symlinks)."""
    root = folder.resolve()
    for tensor in _all_tensors(model):
        location = _external_location(tensor)
        if location is None:
            continue
        if not location or "\x00" in location or os.path.isabs(location) or Path(location).drive:
            raise ToolchainError(
                "ONNX external data location must be a relative path inside the model's folder",
                seen=location or "(empty)",
                remedy="re-save the model with its data beside it",
            )
        target = (folder / location).resolve()
        if not target.is_relative_to(root):
            raise ToolchainError(
                "ONNX external data location leaves the model's folder",
                seen=location,
                remedy="re-save the model with its data beside it",
            )
        if not target.is_file():
            raise ToolchainError("ONNX external data file is missing", seen=location)


def external_files(model: onnx.ModelProto, folder: Path) -> list[Path]:
    """The external-data files a model (as stored on disk) reads."""
    return sorted({folder / loc for t in _all_tensors(model) if (loc := _external_location(t))})


def _all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    out = list(model.graph.initializer)
    for node in model.graph.node:
        out += [a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
    return out


def read_model_bytes(path: str | os.PathLike[str]) -> bytes:
    """The bytes of an ONNX file: a regular file of at most 2 GB (FIFOs and devices refused unread)."""
    return read_regular_file(
        Path(path),
        MAX_ONNX_BYTES,
        what="ONNX model file",
        remedy="pass a .onnx file (weights over 2 GB belong in external data)",
    )


def parse_onnx(data: bytes, path: Path) -> onnx.ModelProto:
    """Parse ONNX bytes read from ``path``; external data is checked for containment, not loaded."""
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as err:  # protobuf raises DecodeError and others
        raise ToolchainError(
            "not an ONNX model: the file does not parse", seen=f"{path}: {type(err).__name__}", remedy=_REMEDY
        ) from None
    if not model.graph.node:
        raise ToolchainError("not an ONNX model: the graph has no nodes", seen=str(path), remedy=_REMEDY)
    known = onnx.defs.onnx_opset_version()
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and not 1 <= opset <= known:
        raise ToolchainError(
            f"the model's ONNX opset is outside what this onnx knows (1..{known})",
            seen=f"{path}: opset {opset}",
            remedy="re-export the model at opset 18",
        )
    check_external_data(model, path.parent)
    return model


def load_external(model: onnx.ModelProto, folder: Path) -> onnx.ModelProto:
    """Read a parsed model's external data (after ``check_external_data``) into the proto."""
    try:
        onnx.load_external_data_for_model(model, str(folder))
    except Exception as err:
        raise ToolchainError(
            "ONNX external data cannot be read",
            seen=f"{type(err).__name__}: {str(err)[:160]}",
            remedy="re-save the model with its data beside it",
        ) from None
    return model


def check_onnx(model: onnx.ModelProto | bytes, where: str, *, full: bool = False) -> None:
    """onnx.checker (with strict shape inference when ``full``), as a ToolchainError."""
    try:
        onnx.checker.check_model(model, full_check=full)
    except Exception as err:
        raise ToolchainError(
            "ONNX model is invalid",
            seen=f"{where}: {type(err).__name__}: {str(err)[:160]}",
            remedy="re-export the model",
        ) from None


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every initializer reduced to name, type and dims (no data copied), but for
    small integer ones (axes, shapes), whose values shape inference needs."""
    sk = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(sk, field, getattr(model, field))
    sk.opset_import.extend(model.opset_import)
    sk.functions.extend(model.functions)
    g, src = sk.graph, model.graph
    g.name = src.name
    for field in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(g, field).extend(getattr(src, field))
    for t in src.initializer:
        if _shape_like(t):  # reduce axes, reshape targets: inference reads their values
            g.initializer.append(t)
        else:
            g.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
    return sk


SKELETON_KEEP = 64  # elements: integer initializers up to this size keep their values in the skeleton


def _shape_like(t: onnx.TensorProto) -> bool:
    count = 1
    for d in t.dims:
        count *= d
    ints = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
    return t.data_type in ints and count <= SKELETON_KEEP and t.data_location != onnx.TensorProto.EXTERNAL


def check_output_model(model: onnx.ModelProto, data: bytes, where: str) -> None:
    """The checker on the serialized model, then strict shape and type inference on a copy without
    tensor data (inference needs dims and types only; on a 91 MB model this takes 1 ms, not 0.9 s)."""
    check_onnx(data, where)
    sk = skeleton(model)
    try:
        onnx.shape_inference.infer_shapes(sk, check_type=True, strict_mode=True)
    except Exception as err:
        raise ToolchainError(
            "the fused model fails ONNX shape inference",
            seen=f"{where}: {type(err).__name__}: {str(err)[:160]}",
            remedy="the base model or adapter does not fit; re-export both",
        ) from None


def load_onnx(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Parse an ONNX file with its external data (contained to its folder) and run the checker."""
    return read_onnx(path)[0]


def read_onnx(path: str | os.PathLike[str]) -> tuple[onnx.ModelProto, bytes]:
    """``load_onnx``, and the bytes of the .onnx file it read (for hashing without a second read)."""
    p = Path(path)
    data = read_model_bytes(p)
    model = parse_onnx(data, p)
    if any(_external_location(t) is not None for t in _all_tensors(model)):
        check_onnx(str(p), str(p))  # type: ignore[arg-type]
        return load_external(model, p.parent), data
    check_onnx(data, str(p))
    return model, data


def save_onnx(
    model: onnx.ModelProto, path: str | os.PathLike[str], *, force: bool = True, validate: bool = False
) -> None:
    """Write ``model`` atomically (exclusively unless ``force``), checking it first when ``validate``.

    Past 2 GB the weights go to ``<name>.data`` beside it: both files are written in a temporary
    folder beside the target and moved into place, the data file first.
    """
    p = Path(path)
    try:
        data: bytes | None = model.SerializeToString()
    except ValueError:  # protobuf refuses messages over 2 GB
        data = None
    if data is not None and len(data) <= TWO_GB:
        if validate:
            check_output_model(model, data, f"fused model for {p}")
        with atomic_path(p, force=force) as tmp:
            tmp.write_bytes(data)
        return
    _save_external(model, p, force=force, validate=validate)


def _save_external(model: onnx.ModelProto, p: Path, *, force: bool, validate: bool) -> None:
    data_name = p.name + ".data"
    if (p.parent / data_name).exists() and not force:
        raise ToolchainError(
            "the output's external data file exists and would be replaced",
            seen=str(p.parent / data_name),
            remedy="pass --force to replace it, or choose another path",
        )
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{p.name[:100]}.", suffix=".partial", dir=p.parent))
    try:
        staged = tmpdir / p.name
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # save_model moves tensors to external data in place: keep the caller's model whole
        onnx.save_model(
            copy,
            str(staged),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=EXTERNAL_THRESHOLD,
        )
        if validate:
            check_onnx(str(staged), f"fused model for {p}", full=True)  # type: ignore[arg-type]
        if (tmpdir / data_name).exists():  # absent when every tensor is under the size threshold
            with atomic_path(p.parent / data_name, force=force) as tmp:
                os.replace(tmpdir / data_name, tmp)
        with atomic_path(p, force=force) as tmp:
            os.replace(staged, tmp)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmpdir)


def input_info(path: str | os.PathLike[str]) -> tuple[str, list[int | None]]:
    """(name, shape) of a model's single input; dynamic dims are None."""
    return input_of(load_onnx(path))


def input_of(model: onnx.ModelProto) -> tuple[str, list[int | None]]:
    """``input_info`` of a loaded model."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ToolchainError(
            "verify and bench expect a model with one input",
            seen=[i.name for i in inputs],
            remedy="export the model with a single input tensor",
        )
    return inputs[0].name, _dims(inputs[0])


def outputs_of(model: onnx.ModelProto) -> list[tuple[str, list[int | None]]]:
    """(name, shape) of every graph output; dynamic dims are None."""
    return [(o.name, _dims(o)) for o in model.graph.output]


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
