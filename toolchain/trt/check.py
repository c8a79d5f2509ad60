"""`toolchain build MODEL --check`: would TensorRT build this model, and which weights could refit?

Parses with TensorRT's own ONNX parser (10.x where installed, else TensorRT-RTX, which needs no GPU),
lists every node the parser cannot take with its name, operator and the parser's error, and says
which weights a refittable build marks (``mark_weights_refittable``) and whether each can be
marked. BatchNormalization parameters cannot be: the parser combines them into new weights.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx

from toolchain.core.errors import ToolchainError
from toolchain.graphs.onnx_io import read_onnx
from toolchain.graphs.provenance import read_provenance
from toolchain.graphs.qdq import check_activation_scales, is_quantized
from toolchain.graphs.weights import index_weights
from toolchain.trt.runtime import TensorRT, logger, parser_tensorrt


@dataclass(frozen=True)
class ModelFacts:
    """What build, refit and check read from an ONNX model: its hash, its base's, the weights fusion changed."""

    path: str
    sha256: str
    base_sha256: str
    fused_weights: tuple[str, ...]
    refit_candidates: tuple[str, ...]  # the fused weights, or every Conv weight of a model that is not fused
    batch: int | None  # the input's batch dim (None: dynamic)
    input_name: str
    input_shape: tuple[int | None, ...]  # dynamic dims are None
    initializers: dict[str, tuple[int, int]]  # name -> (element count, ONNX data type), for refit's prototype check
    quantized: bool = False  # explicit INT8: QuantizeLinear/DequantizeLinear nodes


def model_facts(path: str | os.PathLike[str]) -> ModelFacts:
    """Everything build, refit and check need from an ONNX model, from one read of the file."""
    model, data = read_onnx(path)
    prov = read_provenance(model)
    fused = list(prov.fused_weights or ()) if prov else []
    sha = hashlib.sha256(data).hexdigest()
    inits = {t.name: (int(np.prod(t.dims, dtype=np.int64)), t.data_type) for t in model.graph.initializer}
    convs = tuple(
        dict.fromkeys(
            n.input[1] for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inits
        )
    )
    _check_fused_names(
        path, fused, set(inits) | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    )
    inputs = [i for i in model.graph.input if i.name not in inits]
    dims = (
        tuple(d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim)
        if inputs
        else ()
    )
    batch = dims[0] if dims else None
    base = (prov.base_sha256 if prov else None) or sha
    quantized = is_quantized(model)
    if quantized:  # an engine built on a zero, negative or NaN scale computes garbage
        check_activation_scales(model.graph, index_weights(model.graph))
    return ModelFacts(
        str(path),
        sha,
        base,
        tuple(fused),
        tuple(fused) or convs,
        batch,
        inputs[0].name if inputs else "",
        dims,
        inits,
        quantized,
    )


def _check_fused_names(path: str | os.PathLike[str], fused: list[str], weights: set[str]) -> None:
    """The provenance's fused weights must be weights of this graph: a name it lacks would be taken for a
    weight the parser combined (BatchNorm) and plan whole-engine refit for a model that is not what it says."""
    missing = [name for name in fused if name not in weights]
    if missing:
        raise ToolchainError(
            "the model's provenance (toolchain.fused_weights) names weights the graph does not have",
            seen=f"{path}: {missing[:3]}",
            remedy="fuse again with `toolchain fuse` (the metadata does not belong to this graph)",
        )


@dataclass(frozen=True)
class NodeProblem:
    node: str
    op: str
    error: str


@dataclass(frozen=True)
class CheckReport:
    model: str
    tensorrt: str
    parsed: bool
    problems: tuple[NodeProblem, ...]
    refit_weights: dict[str, bool]  # name -> whether TensorRT can mark it refittable individually
    refit_mode: str  # what `build --refit` would do: individual, all (whole engine) or none (unparsed)

    @property
    def buildable(self) -> bool:
        return self.parsed

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "buildable": self.buildable}


def parse_network(trt: Any, path: str | os.PathLike[str]) -> tuple[Any, Any, Any, list[NodeProblem]]:
    """(builder, network, parser, problems): TensorRT's ONNX parser on ``path``."""
    log = logger(trt)
    builder = trt.Builder(log)
    if builder is None:
        raise ToolchainError("TensorRT could not create a builder", seen=str(path), remedy="check the NVIDIA driver")
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, log)
    ok = parser.parse_from_file(os.fspath(path))
    problems = [] if ok else [_problem(parser.get_error(i)) for i in range(parser.num_errors)]
    if not ok and not problems:
        problems = [NodeProblem("?", "?", "the parser failed without an error message")]
    return builder, network, parser, problems


def _problem(err: Any) -> NodeProblem:
    return NodeProblem(
        str(err.node_name()) or f"#{err.node()}",
        str(err.node_operator()) or "?",
        " ".join(str(err.desc()).split())[:300],
    )


def unsupported_nodes(parser: Any, path: str | os.PathLike[str]) -> list[NodeProblem]:
    """Every node whose operator the parser does not support at all (``supports_operator``), beyond
    the first failure the parse reports."""
    model = onnx.load(os.fspath(path), load_external_data=False)
    out, ops = [], {}
    for i, node in enumerate(model.graph.node):
        key = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        if key not in ops:
            ops[key] = bool(parser.supports_operator(node.op_type)) and node.domain in ("", "ai.onnx", "trt")
        if not ops[key]:
            out.append(NodeProblem(node.name or f"#{i}", key, "this TensorRT has no importer for the operator"))
    return out


def refit_marks(network: Any, names: tuple[str, ...]) -> dict[str, bool]:
    """Try ``mark_weights_refittable`` on each name; unmark again (the check changes nothing)."""
    marks = {}
    for name in names:
        marks[name] = bool(network.mark_weights_refittable(name))
        if marks[name]:
            network.unmark_weights_refittable(name)
    return marks


def refit_mode(marks: dict[str, bool]) -> str:
    """individual when every weight can be marked; else the whole engine is refittable."""
    return "individual" if marks and all(marks.values()) else "all"


def check_model(path: str, found: TensorRT | None = None) -> CheckReport:
    found = found or parser_tensorrt()
    facts = model_facts(path)
    builder, network, parser, problems = parse_network(found.module, path)  # all three kept alive together
    if problems:
        listed = unsupported_nodes(parser, path)
        seen = {p.node for p in problems}
        problems += [p for p in listed if p.node not in seen]
        return CheckReport(path, found.label, False, tuple(problems), {}, "none")
    marks = refit_marks(network, facts.refit_candidates)
    del parser, network, builder
    return CheckReport(path, found.label, True, (), marks, refit_mode(marks))


def format_check(report: CheckReport) -> list[str]:
    lines = [f"{report.model}: {'parses' if report.parsed else 'does NOT parse'} with {report.tensorrt}'s ONNX parser"]
    lines += [f"  unsupported node {p.node} ({p.op}): {p.error}" for p in report.problems]
    if report.parsed:
        for name, ok in report.refit_weights.items():
            how_marked = (
                "can be marked individually"
                if ok
                else "cannot be marked (BatchNormalization parameters are combined by the parser)"
            )
            lines.append(f"  refittable weight {name}: {how_marked}")
        how = {
            "individual": "REFIT_INDIVIDUAL on the weights above",
            "all": "whole-engine REFIT (some weights cannot be marked individually)",
        }
        lines.append(f"  build --refit would use {how[report.refit_mode]}")
    lines.append("  an engine would build" if report.buildable else "  an engine would NOT build")
    return lines
