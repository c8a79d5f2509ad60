"""Where a model's constant tensors live and who reads them, straight from the ModelProto.

A weight is either a graph initializer or the output of a ``Constant`` node. Its consumers are
every (node, input index) in the main graph that names it, plus every node inside a subgraph
(``If``/``Loop``/``Scan`` bodies) that reads it from the outer scope: fusion must see those too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from toolchain.core.errors import ToolchainError
from toolchain.kernels.digest import weight_sha256

FLOAT_TYPES: dict[int, type] = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
}


@dataclass
class Consumer:
    node: onnx.NodeProto
    index: int  # input position; -1 for a read inside a subgraph
    in_subgraph: bool = False

    def describe(self) -> str:
        where = " inside a subgraph" if self.in_subgraph else ""
        return f"{self.node.op_type} {self.node.name or '(unnamed)'}{where}"


@dataclass
class Weight:
    """A constant tensor: its TensorProto (an initializer, or a Constant node's ``value``)."""

    name: str
    tensor: onnx.TensorProto
    consumers: list[Consumer] = field(default_factory=list)

    def values(self) -> np.ndarray:
        """The tensor as numpy (a copy). Raises ToolchainError when its data does not fit its dims."""
        try:
            return numpy_helper.to_array(self.tensor)
        except Exception as err:  # onnx raises ValueError and others for data that does not fit the dims
            raise ToolchainError(
                "an ONNX tensor's data does not match its declared shape",
                seen=f"{self.name}: {str(err)[:100]}",
                remedy="the model is corrupt; re-export it",
            ) from None

    def sha256(self) -> str:
        """``kernels.weight_sha256`` of the values; straight from raw little-endian float32 bytes when
        the tensor stores them so (no copies), else through numpy."""
        t = self.tensor
        if (
            t.data_type == onnx.TensorProto.FLOAT
            and t.HasField("raw_data")
            and t.data_location == onnx.TensorProto.DEFAULT
        ):
            raw = t.raw_data
            if len(raw) == 4 * int(np.prod(t.dims, dtype=np.int64)):
                h = hashlib.sha256(("x".join(str(int(d)) for d in t.dims) + ";").encode())
                h.update(raw)
                return h.hexdigest()
        return weight_sha256(self.values())

    def set_values(self, values: np.ndarray) -> None:
        """Replace the values in place, keeping name, dtype and doc string; the shape may change."""
        dtype = FLOAT_TYPES.get(self.tensor.data_type)
        if dtype is None:
            raise ToolchainError(
                "only float, float16 and double tensors can be rewritten",
                seen=(self.name, onnx.TensorProto.DataType.Name(self.tensor.data_type)),
            )
        arr: np.ndarray = np.asarray(values, dtype=dtype, order="C")  # keeps a 0-d scalar 0-d
        for f in ("float_data", "double_data", "int32_data", "raw_data", "external_data"):
            self.tensor.ClearField(f)
        self.tensor.data_location = onnx.TensorProto.DEFAULT
        del self.tensor.dims[:]
        self.tensor.dims.extend(arr.shape)
        self.tensor.raw_data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()

    def main_consumers(self, op: str, index: int) -> list[onnx.NodeProto]:
        return [c.node for c in self.consumers if not c.in_subgraph and c.node.op_type == op and c.index == index]

    def other_consumers(self, ops: Mapping[str, tuple[int, ...]]) -> list[Consumer]:
        """Consumers that are not one of ``ops`` (op type -> allowed input positions) in the main graph."""
        return [c for c in self.consumers if c.in_subgraph or c.index not in ops.get(c.node.op_type, ())]


def index_weights(graph: onnx.GraphProto) -> dict[str, Weight]:
    """Every constant tensor of the main graph, by name, with its consumers."""
    weights = {t.name: Weight(t.name, t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.output) == 1:
            value = next(
                (a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None
            )
            if value is not None:
                weights[node.output[0]] = Weight(node.output[0], value)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in weights:
                weights[name].consumers.append(Consumer(node, i))
        for name in sorted(_subgraph_reads(node)):
            if name in weights:
                weights[name].consumers.append(Consumer(node, -1, in_subgraph=True))
    return weights


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names read by nodes of ``node``'s subgraphs (at any depth), outer-scope captures included."""
    out: set[str] = set()
    for g in _subgraphs(node):
        for inner in g.node:
            out.update(n for n in inner.input if n)
            out |= _subgraph_reads(inner)
    return out


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def conv_weights(weights: dict[str, Weight]) -> dict[str, Weight]:
    """The weights that feed input 1 (the kernel) of at least one main-graph Conv."""
    return {n: w for n, w in weights.items() if w.main_consumers("Conv", 1)}


def check_finite(graph: onnx.GraphProto) -> None:
    """Refuse NaN or Inf in any float initializer (read without copying where the data is raw)."""
    for t in graph.initializer:
        dtype = FLOAT_TYPES.get(t.data_type)
        if dtype is None:
            continue
        if t.HasField("raw_data"):
            raw = t.raw_data
            if len(raw) % np.dtype(dtype).itemsize:
                raise ToolchainError(
                    "an ONNX initializer's data does not match its declared shape",
                    seen=t.name,
                    remedy="the model is corrupt; re-export it",
                )
            values = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
        else:
            values = Weight(t.name, t).values()
        if values.size != int(np.prod(t.dims, dtype=np.int64)):
            raise ToolchainError(
                "an ONNX initializer's data does not match its declared shape",
                seen=f"{t.name}: {values.size} values for dims {list(t.dims)}",
                remedy="the model is corrupt; re-export it",
            )
        if not np.all(np.isfinite(values)):
            raise ToolchainError(
                "the ONNX model has NaN or Inf values",
                seen=f"initializer {t.name}",
                remedy="fix or re-export the base model",
            )
