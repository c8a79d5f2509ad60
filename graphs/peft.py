"""Hugging Face PEFT LoRA and DoRA adapters on Conv1d/Conv2d layers, read without torch and turned
into a toolchain Adapter against the ONNX model they will be fused into.

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with, per
adapted conv module M, ``base_model.model.M.lora_A.weight`` (r, C_in, k...), ``...lora_B.weight``
(C_out, r, 1...) and for DoRA ``...lora_magnitude_vector`` (1, C_out, 1...). PEFT's merge is
W + s·ΔW with ΔW[o] = Σ_j B[o, j] A[j] and s = alpha / r (alpha / √r with rsLoRA; ``rank_pattern``
and ``alpha_pattern`` per module); DoRA then scales each output channel to m / ||W + s·ΔW||. These
are the toolchain's ``lora`` and ``dora`` updates at groups = 1, so the same kernels fuse them.

PEFT adapters carry no hash of the base weights: a layer is matched by name (``M.weight``, or one
Conv weight whose name ends with ``.M.weight``) and must fit its shape; grouped convs (which PEFT
itself cannot merge), LoRA biases, modules_to_save and non-conv targets are refused.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from toolchain.adapters.adapter_file import Adapter, ConvGeometry, LayerRecord, read_safetensors, validate_adapter
from toolchain.core.errors import ToolchainError
from toolchain.core.fileio import read_regular_file
from toolchain.core.jsonio import loads_strict
from toolchain.core.patterns import compile_user_pattern, fullmatch
from toolchain.graphs.weights import Weight, conv_weights, index_weights

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$"
)
_REMEDY = "fuse a PEFT LoRA/DoRA adapter trained on Conv1d/Conv2d layers (saved with save_pretrained)"


@dataclass
class PeftAdapter:
    config: dict[str, Any]
    modules: dict[str, dict[str, np.ndarray]]  # module -> {"A", "B", "m"}
    sha256: str  # over the config and weights files


def is_peft_dir(path: str | Path) -> bool:
    return Path(path).is_dir()


def load_peft(folder: str | Path) -> PeftAdapter:
    d = Path(folder)
    if not (d / CONFIG).is_file() or not (d / WEIGHTS).is_file():
        raise ToolchainError(
            f"a PEFT adapter folder holds {CONFIG} and {WEIGHTS}",
            seen=str(d),
            remedy="pass the folder written by PeftModel.save_pretrained",
        )
    raw = read_regular_file(d / CONFIG, 1 << 20, what="PEFT adapter config", remedy=_REMEDY)
    config = loads_strict(raw, "PEFT adapter_config.json", _REMEDY)
    _check_config(config)
    _, tensors = read_safetensors(d / WEIGHTS, what="PEFT adapter weights", remedy=_REMEDY, dtypes=("F32", "F16"))
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ToolchainError(
                "the PEFT adapter holds a tensor that is not a conv LoRA/DoRA weight", seen=key, remedy=_REMEDY
            )
        part = {"lora_A.weight": "A", "lora_B.weight": "B"}.get(m.group("part"), "m")
        if value.ndim < 1 or value.size == 0:
            raise ToolchainError(
                "a PEFT adapter tensor is empty or has no dimensions",
                seen=f"{key}: shape {list(value.shape)}",
                remedy=_REMEDY,
            )
        modules.setdefault(m.group("module"), {})[part] = value
    if not modules:
        raise ToolchainError("the PEFT adapter holds no LoRA weights", seen=str(d), remedy=_REMEDY)
    digest = hashlib.sha256(raw + b"\0" + (d / WEIGHTS).read_bytes()).hexdigest()
    return PeftAdapter(config, modules, digest)


def _check_config(c: Any) -> None:
    if not isinstance(c, dict) or c.get("peft_type") != "LORA":
        raise ToolchainError(
            "only PEFT LoRA (and DoRA) adapters can be fused",
            seen=c.get("peft_type") if isinstance(c, dict) else type(c).__name__,
            remedy=_REMEDY,
        )
    rules = [
        ("bias", c.get("bias", "none") == "none", "LoRA bias training changes biases PEFT stores elsewhere"),
        ("lora_bias", not c.get("lora_bias", False), "lora_B biases are not supported"),
        ("modules_to_save", not c.get("modules_to_save"), "modules_to_save replace whole modules"),
        ("r", type(c.get("r")) is int and c["r"] >= 1, "r must be an integer >= 1"),
        (
            "lora_alpha",
            type(c.get("lora_alpha")) in (int, float) and math.isfinite(c["lora_alpha"]),
            "lora_alpha must be a finite number",
        ),
    ]
    for key, ok, why in rules:
        if not ok:
            raise ToolchainError(f"unsupported PEFT adapter_config.json {key}: {why}", seen=c.get(key), remedy=_REMEDY)
    for key, valid, why in (
        ("rank_pattern", _is_rank, "an integer >= 1"),
        ("alpha_pattern", _is_alpha, "a finite number"),
    ):
        patterns = c.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise ToolchainError(f"PEFT {key} must be a JSON object", seen=type(patterns).__name__, remedy=_REMEDY)
        for pattern, value in patterns.items():
            compile_user_pattern(pattern, f"PEFT {key} key", _REMEDY)
            if not valid(value):
                raise ToolchainError(
                    f"PEFT {key} values must be {why} (as lora_alpha and r are)",
                    seen=f"{pattern!r}: {value!r}",
                    remedy=_REMEDY,
                )


def _is_rank(v: Any) -> bool:
    return type(v) is int and v >= 1


def _is_alpha(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module override: the first pattern key that matches the module name's tail
    (keys were checked by compile_user_pattern in _check_config)."""
    for key, value in patterns.items():
        if fullmatch(re.compile(rf"(.*\.)?({key})"), module):
            return value
    return default


def _find_conv(module: str, convs: dict[str, Weight]) -> Weight:
    name = f"{module}.weight"
    if name in convs:
        return convs[name]
    tails = [w for n, w in convs.items() if n.endswith("." + name)]
    if len(tails) != 1:
        raise ToolchainError(
            "a PEFT-adapted module has no (or no unique) Conv weight in the model",
            seen=f"{module}: {len(tails)} candidates",
            remedy="fuse into the ONNX export of the model the adapter was trained on",
        )
    return tails[0]


def _geometry(w: Weight, node: onnx.NodeProto) -> ConvGeometry:
    dims = [int(d) for d in w.tensor.dims]
    attrs = {a.name: a for a in node.attribute}
    nd = len(dims) - 2
    groups = attrs["group"].i if "group" in attrs else 1
    if groups != 1:
        raise ToolchainError(
            "PEFT LoRA on a grouped or depthwise conv cannot be merged (PEFT refuses it too)",
            seen=(w.name, groups),
            remedy="target ungrouped convs with PEFT",
        )
    ints = lambda key, default: tuple(int(v) for v in attrs[key].ints) if key in attrs and attrs[key].ints else default  # noqa: E731
    return ConvGeometry(
        kind="conv1d" if nd == 1 else "conv2d",
        in_channels=dims[1],
        out_channels=dims[0],
        kernel_size=tuple(dims[2:]),
        stride=ints("strides", (1,) * nd),
        padding=ints("pads", (0,) * 2 * nd)[:nd],
        dilation=ints("dilations", (1,) * nd),
        groups=1,
        bias=len(node.input) > 2 and bool(node.input[2]),
    )


def peft_to_adapter(peft: PeftAdapter, model: onnx.ModelProto) -> Adapter:
    """The toolchain Adapter (method lora or dora) that PEFT's merge corresponds to, on ``model``'s convs."""
    c = peft.config
    method = "dora" if c.get("use_dora") else "lora"
    convs = conv_weights(index_weights(model.graph))
    layers, tensors = [], {}
    for module, parts in sorted(peft.modules.items()):
        need = {"A", "B", "m"} if method == "dora" else {"A", "B"}
        if set(parts) != need:
            raise ToolchainError(
                f"PEFT module {module} lacks or has extra tensors for {method}", seen=sorted(parts), remedy=_REMEDY
            )
        w = _find_conv(module, convs)
        geom = _geometry(w, w.main_consumers("Conv", 1)[0])
        a, b = parts["A"], parts["B"]
        r = int(a.shape[0])
        if (
            tuple(a.shape) != (r, *geom.weight_shape[1:])
            or tuple(b.shape[:2]) != (geom.out_channels, r)
            or any(d != 1 for d in b.shape[2:])
        ):
            raise ToolchainError(
                f"PEFT module {module}: lora_A / lora_B shapes do not fit the Conv weight",
                seen=(a.shape, b.shape, geom.weight_shape),
                remedy="fuse into the model the adapter was trained on",
            )
        alpha = _pattern(c.get("alpha_pattern") or {}, module, c["lora_alpha"])
        scaling = float(alpha) / (math.sqrt(r) if c.get("use_rslora") else r)
        name = module
        tensors[f"{name}.lora_A"] = a.astype(np.float32)
        tensors[f"{name}.lora_B"] = b.reshape(geom.out_channels, r).astype(np.float32)
        if method == "dora":
            m = parts["m"]
            expected = (
                1,
                geom.out_channels,
                *([1] * (len(geom.weight_shape) - 2)),
            )  # PEFT's conv magnitude: (1, C_out, 1[, 1])
            if tuple(m.shape) != expected:
                raise ToolchainError(
                    f"PEFT module {module}: the DoRA magnitude must have PEFT's shape {list(expected)}",
                    seen=list(m.shape),
                    remedy=_REMEDY,
                )
            tensors[f"{name}.magnitude"] = m.reshape(geom.out_channels).astype(np.float32)
        layers.append(LayerRecord(name, w.name, method, geom, (r,), scaling, w.sha256()))
    adapter = Adapter(
        method,
        layers,
        [],
        tensors,
        {
            "source": "peft",
            "peft_config": {k: c.get(k) for k in ("r", "lora_alpha", "use_dora", "use_rslora", "target_modules")},
        },
    )
    validate_adapter(adapter)
    return adapter
