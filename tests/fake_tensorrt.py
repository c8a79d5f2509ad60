"""A fake ``tensorrt`` 10.3 module for tests on machines without TensorRT or a GPU.

Every class and member it defines exists in TensorRT 10.3's Python bindings (checked against
``tests/data/api_surface.json`` when the module is built), and it follows onnx-tensorrt's naming
rules: Conv and Gemm weights, Constant outputs and other initializers keep their ONNX names, while
BatchNormalization's four parameters become combined weights named ``tmp_batch_norm_weight[_N]``
(so ``mark_weights_refittable`` refuses BN parameter names). The builder records its flags and
refuses REFIT together with REFIT_INDIVIDUAL, as TensorRT does. A plan is bytes with TensorRT's
version at offset 24 and a JSON body recording the model, the refittable names with their
prototypes, and the current weight values; ``engine_model`` turns a plan back into the ONNX model it
computes (fp16 plans round their weights to float16), which ``engine_runner`` runs through ONNX
Runtime in place of Polygraphy's TrtRunner. ``Refitter.set_named_weights`` returns False on an
unknown name or a size/type mismatch, and ``get_missing_weights`` reports nothing when nothing was
set, as TensorRT's does.
"""

from __future__ import annotations

import base64
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

VERSION = "10.3.0"
SURFACE = json.loads((Path(__file__).parent / "data" / "api_surface.json").read_text())["tensorrt"]
SUPPORTED_OPS = {
    "Conv",
    "BatchNormalization",
    "Relu",
    "Clip",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "ReduceMean",
    "Gemm",
    "MatMul",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Concat",
    "Constant",
    "Identity",
    "Transpose",
    "Pad",
    "Shape",
    "Gather",
    "Expand",
    "Tile",
    "Cast",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "QuantizeLinear",  # explicit quantization (TensorRT 10.3's parser: INT8 per tensor or per channel)
    "DequantizeLinear",
}
AXES_INPUT = {"ReduceMean": 1, "Squeeze": 1, "Unsqueeze": 1}
SHAPE_INPUTS = {
    "Reshape": (1,),
    "Expand": (1,),
    "Pad": (1, 2),
    "ReduceMean": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
}  # read at parse time, not weights
PLAN_HEADER = 32


class _Enum:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def _enum(name: str, members: list[str]) -> type:
    cls = type(name, (), {m: _Enum(m) for m in members})
    return cls


class ILogger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = (
        _Enum(n) for n in ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")
    )

    def __init__(self, *args: Any) -> None:
        self.min_severity = args[0] if args else ILogger.WARNING

    def log(self, severity: Any, msg: str) -> None:
        pass


class Logger(ILogger):
    pass


BuilderFlag = _enum("BuilderFlag", ["FP16", "INT8", "REFIT", "REFIT_INDIVIDUAL", "STRIP_PLAN", "TF32"])
MemoryPoolType = _enum("MemoryPoolType", ["WORKSPACE"])
DataType = _enum("DataType", ["FLOAT", "HALF", "INT32", "INT64", "BOOL"])
_DTYPES = {1: DataType.FLOAT, 10: DataType.HALF, 6: DataType.INT32, 7: DataType.INT64}


class Weights:
    def __init__(self, a: Any = None) -> None:
        self._a = None if a is None else np.asarray(a)
        self.dtype = (
            DataType.FLOAT
            if self._a is None or self._a.dtype == np.float32
            else DataType.HALF
            if self._a.dtype == np.float16
            else _Enum(str(self._a.dtype))
        )
        self.size = -1 if self._a is None else int(self._a.size)
        self.nbytes = 0 if self._a is None else int(self._a.nbytes)

    def numpy(self) -> np.ndarray:
        return self._a


class ParserError:
    def __init__(self, node: int, name: str, op: str, desc: str) -> None:
        self._v = (node, name, op, desc)

    def node(self) -> int:
        return self._v[0]

    def node_name(self) -> str:
        return self._v[1]

    def node_operator(self) -> str:
        return self._v[2]

    def desc(self) -> str:
        return self._v[3]

    def code(self) -> str:
        return "UNSUPPORTED_NODE"


class _Tensor:
    def __init__(self, name: str, shape: list[int]) -> None:
        self.name, self.shape = name, shape


class INetworkDefinition:
    def __init__(self) -> None:
        self.model: onnx.ModelProto | None = None
        self.weights: dict[str, Any] = {}  # network weight name -> ONNX initializer name, or ("bn", node name)
        self.marked: set[str] = set()
        self.inputs: list[_Tensor] = []

    def mark_weights_refittable(self, name: str) -> bool:
        if name not in self.weights:
            return False
        self.marked.add(name)
        return True

    def unmark_weights_refittable(self, name: str) -> bool:
        self.marked.discard(name)
        return name in self.weights

    def are_weights_marked_refittable(self, name: str) -> bool:
        return name in self.marked

    def get_input(self, index: int) -> _Tensor:
        return self.inputs[index]

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)


def _import_onnx(network: INetworkDefinition, model: onnx.ModelProto) -> list[ParserError]:
    """onnx-tensorrt's import, reduced to what the tests need: supported ops, constant axes, weight names."""
    inits = {t.name for t in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    bn_count = 0
    for i, node in enumerate(model.graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OPS:
            return [
                ParserError(
                    i,
                    node.name,
                    node.op_type,
                    'creator && "Plugin not found, are the plugin name, version, and namespace correct?"',
                )
            ]
        axes = AXES_INPUT.get(node.op_type)
        if axes is not None and len(node.input) > axes and node.input[axes] and node.input[axes] not in inits:
            return [
                ParserError(
                    i,
                    node.name,
                    node.op_type,
                    "Assertion failed: Axis input must resolve to a build-time constant (an initializer or a "
                    "constant-foldable subgraph)!",
                )
            ]
        if node.op_type == "BatchNormalization" and all(x in inits for x in node.input[1:5]):
            network.weights[f"tmp_batch_norm_weight{'_' + str(bn_count) if bn_count else ''}"] = ("bn", node.name)
            bn_count += 1
            continue
        for k, x in enumerate(node.input):
            if (x in inits or x in consts) and k not in SHAPE_INPUTS.get(node.op_type, ()):
                network.weights[x] = x
        if node.op_type == "Constant":
            network.weights[node.output[0]] = node.output[0]
    network.model = model
    network.inputs = [
        _Tensor(v.name, [d.dim_value for d in v.type.tensor_type.shape.dim])
        for v in model.graph.input
        if v.name not in inits
    ]
    return []


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: Any) -> None:
        self.network, self.errors = network, []

    def parse_from_file(self, model: str) -> bool:
        self.errors = _import_onnx(self.network, onnx.load(model))
        return not self.errors

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> ParserError:
        return self.errors[index]

    def supports_operator(self, op_name: str) -> bool:
        return op_name in SUPPORTED_OPS


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:
        self.shapes[input] = (list(min), list(opt), list(max))


class ITimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = data or b"fake timing cache"

    def serialize(self) -> bytes:
        return self.data


class IBuilderConfig:
    def __init__(self) -> None:
        self.flags_set: set[str] = set()
        self.profiles: list[IOptimizationProfile] = []
        self.pool: dict[str, int] = {}
        self.cache: ITimingCache | None = None

    def set_flag(self, flag: _Enum) -> None:
        self.flags_set.add(flag.name)

    def set_memory_pool_limit(self, pool: _Enum, pool_size: int) -> None:
        self.pool[pool.name] = pool_size

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache:
        return ITimingCache(serialized_timing_cache)

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        self.cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self.cache


BUILDS: list[dict[str, Any]] = []  # every build's flags, for the tests to read


class Builder:
    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition()

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> bytes | None:
        BUILDS.append(
            {
                "flags": sorted(config.flags_set),
                "marked": sorted(network.marked),
                "profiles": [p.shapes for p in config.profiles],
            }
        )
        if {"REFIT", "REFIT_INDIVIDUAL"} <= config.flags_set:
            self.logger.log(ILogger.ERROR, "IBuilderConfig: kREFIT and kREFIT_INDIVIDUAL cannot both be set")
            return None
        if "REFIT" in config.flags_set:
            refittable = list(network.weights)
        elif "REFIT_INDIVIDUAL" in config.flags_set:
            refittable = sorted(network.marked)
        else:
            refittable = []
        model = network.model
        assert model is not None
        return _plan(model, {n: network.weights[n] for n in refittable}, "FP16" in config.flags_set)


def _b64(a: np.ndarray) -> dict[str, Any]:
    return {
        "dtype": str(a.dtype),
        "shape": list(a.shape),
        "data": base64.b64encode(np.ascontiguousarray(a).tobytes()).decode(),
    }


def _unb64(d: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["data"]), dtype=d["dtype"]).reshape(d["shape"]).copy()


def _values(model: onnx.ModelProto, source: Any) -> dict[str, np.ndarray]:
    """The ONNX initializers one network weight stands for."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    consts = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in model.graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
    }
    if isinstance(source, list | tuple):
        node = next(n for n in model.graph.node if n.name == source[1])
        return {x: inits[x] for x in node.input[1:5]}
    return {source: inits[source] if source in inits else consts[source]}


def _plan(model: onnx.ModelProto, refittable: dict[str, Any], fp16: bool) -> bytes:
    body = {
        "model": base64.b64encode(model.SerializeToString()).decode(),
        "fp16": fp16,
        "refittable": {name: list(src) if isinstance(src, tuple) else src for name, src in refittable.items()},
        "values": {name: {k: _b64(v) for k, v in _values(model, src).items()} for name, src in refittable.items()},
    }
    header = bytearray(PLAN_HEADER)
    header[0:4] = b"ftrt"
    header[24:27] = bytes(int(v) for v in VERSION.split(".")[:3])
    return bytes(header) + json.dumps(body).encode()


def read_plan(plan: bytes) -> dict[str, Any]:
    return json.loads(plan[PLAN_HEADER:])


def engine_model(plan: bytes) -> onnx.ModelProto:
    """The ONNX model a fake plan computes: the built graph with the engine's current weights."""
    body = read_plan(plan)
    model = onnx.load_from_string(base64.b64decode(body["model"]))
    current = {k: _unb64(v) for per in body["values"].values() for k, v in per.items()}
    for t in model.graph.initializer:
        a = current.get(t.name, numpy_helper.to_array(t))
        if body["fp16"] and a.dtype == np.float32:
            a = a.astype(np.float16).astype(np.float32)
        t.CopyFrom(numpy_helper.from_array(a, t.name))
    return model


def engine_runner(plan: bytes) -> Any:
    """An ONNX Runtime runner over what the fake engine computes, named "engine" like the TrtRunner."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    return OnnxrtRunner(
        SessionFromOnnx(engine_model(plan).SerializeToString(), providers=["CPUExecutionProvider"]), name="engine"
    )


class ICudaEngine:
    def __init__(self, plan: bytes) -> None:
        self.body = read_plan(plan)

    @property
    def refittable(self) -> bool:
        return bool(self.body["refittable"])

    def serialize(self) -> bytes:
        header = bytearray(PLAN_HEADER)
        header[0:4] = b"ftrt"
        header[24:27] = bytes(int(v) for v in VERSION.split(".")[:3])
        return bytes(header) + json.dumps(self.body).encode()


class Runtime:
    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> ICudaEngine | None:
        if bytes(serialized_engine[24:27]) != bytes(int(v) for v in VERSION.split(".")[:3]):
            self.logger.log(ILogger.ERROR, "Serialization assertion: version tag does not match")
            return None
        return ICudaEngine(serialized_engine)


class Refitter:
    def __init__(self, engine: ICudaEngine, logger: Any) -> None:
        self.engine, self.logger, self.pending = engine, logger, {}

    def get_all_weights(self) -> list[str]:
        return list(self.engine.body["refittable"])

    def get_weights_prototype(self, weights_name: str) -> Weights:
        per = self.engine.body["values"].get(weights_name)
        if per is None:
            return Weights()
        w = Weights(np.zeros(sum(int(np.prod(v["shape"])) for v in per.values()), np.float32))
        return w

    def set_named_weights(self, name: str, weights: Any, *location: Any) -> bool:
        per = self.engine.body["values"].get(name)
        if per is None or not isinstance(weights, dict | Weights):
            self.logger.log(ILogger.ERROR, f"{name}: not a refittable weight")
            return False
        new = weights if isinstance(weights, dict) else {next(iter(per)): weights.numpy()}
        for key, value in new.items():
            if (
                key not in per
                or np.asarray(value).size != int(np.prod(per[key]["shape"]))
                or np.asarray(value).dtype != np.float32
            ):
                self.logger.log(ILogger.ERROR, f"{name}: weights of the wrong count or type")
                return False
        self.pending[name] = {k: _b64(np.asarray(v, np.float32).reshape(per[k]["shape"])) for k, v in new.items()}
        return True

    def get_missing_weights(self) -> list[str]:
        return []  # TensorRT lists partners of weights that were set; individually refittable weights have none

    def refit_cuda_engine(self) -> bool:
        self.engine.body["values"].update(self.pending)
        self.pending = {}
        return True


class OnnxParserRefitter:
    """Sets every refittable weight the ONNX model provides; BN-combined weights from their node."""

    def __init__(self, refitter: Refitter, logger: Any) -> None:
        self.refitter, self.errors = refitter, []

    def refit_from_file(self, model: str) -> bool:
        m = onnx.load(model)
        for name, source in self.refitter.engine.body["refittable"].items():
            src = source
            if isinstance(source, list):
                node = next((n for n in m.graph.node if n.name == source[1]), None)
                if node is None:
                    self.errors.append(
                        ParserError(-1, source[1], "BatchNormalization", "node not found in the refit model")
                    )
                    return False
            try:
                values = _values(m, src)
            except (KeyError, StopIteration):
                continue  # weights the model does not provide stay for get_missing_weights
            ok = self.refitter.set_named_weights(
                name, values if isinstance(source, list) else Weights(next(iter(values.values())))
            )
            if not ok:
                self.errors.append(ParserError(-1, name, "?", f"Failed to set weights {name}"))
                return False
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> ParserError:
        return self.errors[index]


def _check_surface() -> None:
    """Every public name this fake defines must exist in TensorRT 10.3's bindings."""
    classes = SURFACE["classes"]
    for name, obj in list(globals().items()):
        if name.startswith("_") or not isinstance(obj, type) or name in ("Any", "Path") or obj.__module__ != __name__:
            continue
        assert name in classes, f"fake tensorrt defines {name}, which TensorRT 10.3 does not have"
        members = [m for m in vars(obj) if not m.startswith("_")]
        for m in members:
            assert m in classes[name], f"fake tensorrt {name}.{m} is not in TensorRT 10.3's {name}"


_check_surface()


def install() -> types.ModuleType:
    """This module, ready to stand in sys.modules as ``tensorrt`` (the caller puts it there)."""
    module = sys.modules[__name__]
    module.__version__ = VERSION  # type: ignore[attr-defined]
    return module
