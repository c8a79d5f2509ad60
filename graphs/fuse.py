"""Fuse an adapter into the Conv weights of an ONNX model: W' = W + ΔW, nothing else changed.

``fuse_model`` is a ModelProto -> ModelProto pass that rewrites only the values of the fused
initializers (and a classifier head's shape where the adapter grew it) and adds provenance to
``metadata_props``: node order, names, value_info, doc strings and node metadata stay those of the
base model, so ``toolchain diff base.onnx fused.onnx`` lists weights and metadata only. (An
onnx-graphsurgeon import/export round trip re-sorts nodes and drops value_info and node metadata,
which is why the pass edits the proto.) ``fuse_files`` adds reading, hashing while reading,
output validation and an atomic, exclusive write.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx

from toolchain.adapters import methods
from toolchain.adapters.adapter_file import Adapter, ExtraRecord, LayerRecord, load_adapter
from toolchain.core.errors import ToolchainError
from toolchain.core.fileio import check_output
from toolchain.core.version import package_version
from toolchain.graphs.provenance import Provenance, read_provenance, set_metadata, write_provenance
from toolchain.graphs.qdq import (
    QuantizedWeight,
    check_activation_scales,
    integer_kernels,
    quantized_weights,
    refuse_integer,
)
from toolchain.graphs.scopes import belongs_to
from toolchain.graphs.weights import Weight, check_finite, conv_weights, index_weights
from toolchain.kernels import weight_sha256

SCALES_KEY = "toolchain.weight_scales"  # written by `toolchain export --fold-bn`
HEAD_INPUTS: dict[str, tuple[int, ...]] = {"Gemm": (1, 2)}  # a classifier head: Gemm's B (weight) and C (bias)
SHAPE_READERS: dict[str, tuple[int, ...]] = {"Shape": (0,), "Size": (0,)}  # read the shape only, which fusion keeps


def layer_delta(layer: LayerRecord, adapter: Adapter) -> np.ndarray:
    """ΔW of one additive layer (lora-edge, lora): base + ΔW minus base, via the registry."""
    shape = layer.geometry.weight_shape
    return methods.fused_weight(
        layer.method, np.zeros(shape, np.float32), adapter.layer_tensors(layer), layer.geometry.groups, layer.scaling
    )


def read_scales(model: onnx.ModelProto) -> dict[str, dict]:
    raw = next((p.value for p in model.metadata_props if p.key == SCALES_KEY), None)
    if raw is None:
        return {}
    try:
        scales = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise ToolchainError(
            "model metadata toolchain.weight_scales is not valid JSON", seen=raw[:60], remedy="re-export the model"
        ) from None
    if not isinstance(scales, dict):
        raise ToolchainError("model metadata toolchain.weight_scales must be a JSON object", seen=type(scales).__name__)
    return scales


def _folded_scale(layer: LayerRecord, weight: Weight, digest: str, scales: dict[str, dict]) -> np.ndarray | None:
    """The BN-fold scale of a weight whose hash is not the adapter's base, if the export recorded
    this very folded weight (its own hash); None otherwise."""
    entry = scales.get(weight.name)
    if (
        not isinstance(entry, dict)
        or entry.get("base_sha256") != layer.base_sha256
        or entry.get("folded_sha256") != digest
    ):
        return None
    scale = np.asarray(entry.get("scale"), dtype=np.float64)
    if scale.shape != (layer.geometry.out_channels,) or not np.all(np.isfinite(scale)):
        raise ToolchainError(
            "model metadata toolchain.weight_scales has a malformed scale",
            seen=weight.name,
            remedy="re-export the model with `toolchain export --fold-bn`",
        )
    methods.get_method(layer.method).kind.check_fold_scale(layer.name, scale)
    return scale


def _find_weight(
    layer: LayerRecord, convs: dict[str, Weight], scales: dict[str, dict], digests: dict[str, str]
) -> tuple[Weight, np.ndarray | None]:
    """The layer's Conv weight (by name, else by content hash) and its BN-fold scale (None when unscaled)."""
    w = convs.get(layer.param)
    if w is not None:
        shape = tuple(int(d) for d in w.tensor.dims)
        if shape != layer.geometry.weight_shape:
            raise ToolchainError(
                f"layer {layer.name}: the Conv weight's shape does not fit the adapter layer",
                seen=(shape, layer.geometry.weight_shape),
                remedy="fuse into the base model this adapter came from",
            )
        got = _digest(w, digests)
        if got == layer.base_sha256:
            return w, None
        scale = _folded_scale(layer, w, got, scales)
        if scale is not None:
            return w, scale
        raise ToolchainError(
            f"layer {layer.name}: Conv weight {layer.param} is not the base weight the adapter was trained against",
            seen=f"sha256 {got[:12]} vs adapter {layer.base_sha256[:12]}",
            remedy="fuse into the base model this adapter came from (BatchNorm folded? export with `toolchain "
            "export --fold-bn`, which records the fold scales)",
        )
    for other in convs.values():  # names differ: fall back to the content hash
        if (
            tuple(int(d) for d in other.tensor.dims) == layer.geometry.weight_shape
            and _digest(other, digests) == layer.base_sha256
        ):
            return other, None
    raise ToolchainError(
        f"layer {layer.name}: no Conv weight in the model matches the adapter (by name or SHA-256)",
        seen=layer.param,
        remedy="fuse into the base model this adapter came from",
    )


def _digest(w: Weight, digests: dict[str, str]) -> str:
    if w.name not in digests:
        digests[w.name] = w.sha256()
    return digests[w.name]


def _check_consumers(layer: LayerRecord, w: Weight, outputs: set[str]) -> None:
    """Every reader of the weight must be a main-graph Conv kernel with the layer's groups.

    Several Convs may share it (one module applied twice): fusing once serves all. A Conv the exporter
    recorded as another module's call (a functional conv on the same weight) or any other reader, a
    graph output among them, would silently change.
    """
    if w.name in outputs:
        raise ToolchainError(
            f"layer {layer.name}: its weight {w.name} is also a graph output, and fusing would change that output",
            seen=w.name,
            remedy="export the base model without the weight among its outputs",
        )
    others = w.other_consumers({"Conv": (1,), **SHAPE_READERS})
    if others:
        raise ToolchainError(
            f"layer {layer.name}: its weight {w.name} is also read by {others[0].describe()}, and fusing would "
            "change that output",
            seen=[c.describe() for c in others][:4],
            remedy="export the base model so that the conv weight feeds only its Conv nodes",
        )
    # a module registered under two names (tsai's TemporalBlock holds each conv as conv1 and as net.0, which
    # forward calls): the exporter names the weight and its call by the same other path
    owner = w.name.removesuffix(".weight") if w.name.endswith(".weight") else layer.name
    foreign = [
        n for n in w.main_consumers("Conv", 1) if belongs_to(n, layer.name) is False and belongs_to(n, owner) is False
    ]
    if foreign:
        raise ToolchainError(
            f"layer {layer.name}: its weight {w.name} is also read by a Conv outside that module (a functional "
            "conv on the same weight), and fusing would change that Conv too",
            seen=[n.name or "(unnamed)" for n in foreign][:4],
            remedy="give that call a weight of its own, or leave the layer out of the adapter (--layers)",
        )
    for node in w.main_consumers("Conv", 1):
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if group != layer.geometry.groups:
            raise ToolchainError(
                f"layer {layer.name}: Conv group differs from the adapter's",
                seen=(node.name, group, layer.geometry.groups),
                remedy="fuse into the base model this adapter came from",
            )


def _fuse_layers(
    graph: onnx.GraphProto, adapter: Adapter, scales: dict[str, dict], chains: dict[str, QuantizedWeight]
) -> list[str]:
    """Resolve every layer's weight (hashes in parallel), then compute the fused weights in parallel.

    A kernel behind QuantizeLinear -> DequantizeLinear is fused in float and its per-channel scales
    are recomputed (``graphs.qdq``); everything else about the quantized graph stays."""
    weights = index_weights(graph)
    integer = integer_kernels(graph, weights) if adapter.layers else []
    if integer:
        raise refuse_integer(integer)
    convs = conv_weights(weights)
    convs.update({n: c.kernel_view() for n, c in chains.items() if c.readers[0].node.op_type == "Conv"})
    named = [convs[x.param] for x in adapter.layers if x.param in convs]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:  # hashlib and numpy release the GIL
        digests = dict(zip([w.name for w in named], pool.map(Weight.sha256, named), strict=True))
        claimed: dict[str, str] = {}
        plan = []
        for layer in adapter.layers:
            w, scale = _find_weight(layer, convs, scales, digests)
            if w.name in claimed:
                raise ToolchainError(
                    "two adapter layers resolve to the same Conv weight",
                    seen=(claimed[w.name], layer.name),
                    remedy="the adapter does not belong to this model",
                )
            claimed[w.name] = layer.name
            _check_consumers(layer, w, {o.name for o in graph.output})
            plan.append((layer, w, scale))
        fused = list(pool.map(lambda item: _fused(item[0], item[1], item[2], adapter), plan))
    for (_, w, _), values in zip(plan, fused, strict=True):
        w.set_values(values)
        if w.name in chains:
            chains[w.name].requantize()
    return [w.name for _, w, _ in plan]


def _fused(layer: LayerRecord, w: Weight, scale: np.ndarray | None, adapter: Adapter) -> np.ndarray:
    fused = methods.fused_weight(
        layer.method,
        w.values().astype(np.float32, copy=False),
        adapter.layer_tensors(layer),
        layer.geometry.groups,
        layer.scaling,
        scale,
    )
    if not np.all(np.isfinite(fused)):
        raise ToolchainError(
            f"layer {layer.name}: the fused weight has NaN or Inf values",
            seen=w.name,
            remedy="check the scaling and the adapter's values; the update overflows float32",
        )
    return fused


def _apply_extras(
    model: onnx.ModelProto, extras: list[ExtraRecord], adapter: Adapter, chains: dict[str, QuantizedWeight]
) -> list[str]:
    weights = index_weights(model.graph)
    weights.update({n: c.kernel_view() for n, c in chains.items()})  # a quantized head: its readers behind DQ
    inits = {t.name for t in model.graph.initializer}
    resized: list[Weight] = []
    names = []
    for extra in extras:
        w = weights.get(extra.param) if extra.param in inits else None
        value = adapter.extra_tensor(extra)
        if w is None and extra.base_sha256 is not None and weight_sha256(value) == extra.base_sha256:
            continue  # unchanged, and not in the graph: a parameter the output does not depend on (tsai's mWDN)
        w = w if w is not None else _extra_by_hash(extra, weights, inits)
        names.append(w.name)
        old_shape = tuple(int(d) for d in w.tensor.dims)
        if old_shape == tuple(value.shape):
            if extra.base_sha256 is None or weight_sha256(w.values()) != extra.base_sha256:
                raise ToolchainError(
                    "a base tensor the adapter replaces differs from the one it was trained against",
                    seen=extra.param,
                    remedy="fuse into the matching base model",
                )
        else:
            _check_head(w, old_shape, tuple(value.shape))
            resized.append(w)
        w.set_values(value)
        if w.name in chains:
            chains[w.name].requantize()
    if resized:
        _resize_outputs(model, resized, chains)
    return names


def _extra_by_hash(extra: ExtraRecord, weights: dict[str, Weight], inits: set[str]) -> Weight:
    """An extra whose name the exporter did not keep (a module registered under two names, as tsai's
    TemporalBlock holds conv1 again as net.0): the one initializer of its shape holding its base tensor."""
    found = []
    if extra.base_sha256 is not None:
        found = [
            w
            for name, w in weights.items()
            if name in inits
            and tuple(int(d) for d in w.tensor.dims) == tuple(extra.shape)
            and w.sha256() == extra.base_sha256
        ]
    if len(found) == 1:
        return found[0]
    raise ToolchainError(
        "adapter tensor has no initializer of that name in the model"
        + (f", and {len(found)} initializers hold its base values" if found else " or with its base values"),
        seen=extra.param,
        remedy="fuse into the base model this adapter came from; BatchNorm folded at export (--fold-bn) cannot "
        "take trained BN parameters: export without --fold-bn",
    )


def _check_head(w: Weight, old: tuple[int, ...], new: tuple[int, ...]) -> None:
    """Only a classifier head (a Gemm's weight or bias) may change shape, and only its class axis."""
    others = w.other_consumers(HEAD_INPUTS)
    if others or not w.consumers:
        raise ToolchainError(
            "only a classifier head may change shape: this tensor is not (only) a Gemm weight or bias",
            seen=(w.name, old, new, [c.describe() for c in others][:2]),
            remedy="fuse into the base model this adapter came from",
        )
    transposed = all(
        next((a.i for a in c.node.attribute if a.name == "transB"), 0) == 1 for c in w.consumers if c.index == 1
    )
    axis = 0 if (len(old) == 1 or transposed) else 1
    if len(old) != len(new) or any(o != n for i, (o, n) in enumerate(zip(old, new, strict=True)) if i != axis):
        raise ToolchainError(
            "adapter tensor shape does not fit the model (only a head's class count may change)",
            seen=(w.name, old, new),
        )


def _resize_outputs(model: onnx.ModelProto, resized: list[Weight], chains: dict[str, QuantizedWeight]) -> None:
    """New class count: the heads' Gemm outputs (graph outputs, value_info) and the tensors' own value_info."""
    classes: dict[str, int] = {}
    for w in resized:
        for c in w.consumers:
            transposed = next((a.i for a in c.node.attribute if a.name == "transB"), 0) == 1
            n = int(w.tensor.dims[0] if (c.index == 2 or transposed) else w.tensor.dims[1])
            if classes.setdefault(c.node.output[0], n) != n:
                raise ToolchainError(
                    "a head's weight and bias disagree on the class count",
                    seen=(c.node.name, classes[c.node.output[0]], n),
                    remedy="the adapter is corrupt; re-export it",
                )
    shapes = {w.name: list(w.tensor.dims) for w in resized}
    for w in resized:  # a quantized head's Q and DQ outputs have the weight's shape too
        if w.name in chains:
            shapes |= dict.fromkeys(
                [chains[w.name].quantize.output[0], chains[w.name].dequantize.output[0]], shapes[w.name]
            )
    for vi in [*model.graph.output, *model.graph.value_info]:
        dims = vi.type.tensor_type.shape.dim
        if vi.name in classes and len(dims) == 2:
            dims[1].Clear()
            dims[1].dim_value = classes[vi.name]
        elif vi.name in shapes and len(dims) == len(shapes[vi.name]):
            for d, n in zip(dims, shapes[vi.name], strict=True):
                d.Clear()
                d.dim_value = n


def fuse_model(model: onnx.ModelProto, adapter: Adapter, provenance: dict[str, str]) -> onnx.ModelProto:
    """A copy of ``model`` with the adapter fused; only initializer values and metadata_props change."""
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    changed = fuse_in_place(fused, adapter, provenance.get("toolchain.adapter_sha256", ""))
    set_metadata(fused, {**provenance, "toolchain.fused_weights": json.dumps(changed)})
    return fused


def fuse_in_place(model: onnx.ModelProto, adapter: Adapter, adapter_sha256: str) -> list[str]:
    """Fuse into ``model`` itself (no copy); returns the names of the rewritten tensors. Metadata
    is left to the caller. On an error the model may be partly rewritten: discard it."""
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("toolchain.fused") == "true":
        same = meta.get("toolchain.adapter_sha256") == adapter_sha256
        raise ToolchainError(
            "the model is already fused" + (" with this very adapter" if same else " with another adapter"),
            seen=f"fused with adapter sha256 {meta.get('toolchain.adapter_sha256', '?')[:12]}, this adapter "
            f"{adapter_sha256[:12] or '?'}",
            remedy="fuse into the unfused base model (toolchain export without --adapter)",
        )
    spec = methods.get_method(adapter.method)
    if adapter.layers and not spec.fusable:
        raise ToolchainError(
            f"{spec.name} layers add nodes, so they cannot be fused into Conv weights",
            seen=f"{len(adapter.layers)} blocks, e.g. {adapter.layers[0].name}",
            remedy="deploy the unfused export (toolchain export --adapter FILE, without --fuse) and measure its "
            "cost with toolchain bench",
        )
    weights = index_weights(model.graph)
    chains = quantized_weights(model.graph, weights)  # checks every QDQ kernel first
    check_activation_scales(model.graph, weights)  # kept as calibrated, so they must be usable
    check_finite(model.graph)
    changed = _fuse_layers(model.graph, adapter, read_scales(model), chains)
    return changed + _apply_extras(model, adapter.extras, adapter, chains)


def fuse_files(
    base: str | os.PathLike[str],
    adapter_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    after: Callable[[onnx.ModelProto], None] | None = None,
) -> Provenance:
    """`toolchain fuse`: read (hashing while parsing), fuse, validate the output, write it atomically.

    ``adapter_path`` is a toolchain adapter file or a PEFT adapter folder (``toolchain.graphs.peft``).
    ``after`` edits the fused model before it is written (``fuse --recalibrate``: activation scales).
    """
    from toolchain.graphs import peft
    from toolchain.graphs.onnx_io import external_files, load_external, parse_onnx, read_model_bytes, save_onnx

    adapter_path = Path(adapter_path)
    is_peft = peft.is_peft_dir(adapter_path)
    related = [Path(adapter_path) / peft.CONFIG, Path(adapter_path) / peft.WEIGHTS] if is_peft else []
    check_output(out, [base, adapter_path], force=force, related=related)
    peft_adapter = peft.load_peft(adapter_path) if is_peft else None
    adapter = None if is_peft else load_adapter(adapter_path)
    adapter_sha256 = (
        peft_adapter.sha256 if peft_adapter else hashlib.sha256(Path(adapter_path).read_bytes()).hexdigest()
    )
    data = read_model_bytes(base)
    with ThreadPoolExecutor(max_workers=1) as pool:  # hashlib releases the GIL: hash the file while fusing
        base_hash = pool.submit(lambda: hashlib.sha256(data).hexdigest())
        model = parse_onnx(data, Path(base))
        check_output(
            out, [base, adapter_path], force=force, related=[*related, *external_files(model, Path(base).parent)]
        )
        load_external(model, Path(base).parent)
        adapter = adapter or peft.peft_to_adapter(peft_adapter, model)  # type: ignore[arg-type]
        base_prov = read_provenance(model)
        changed = fuse_in_place(model, adapter, adapter_sha256)
        provenance = Provenance(
            kind="fused",
            version=package_version(),
            checkpoint_sha256=base_prov.checkpoint_sha256 if base_prov else None,
            classes=base_prov.classes if base_prov else None,
            adapter_sha256=adapter_sha256,
            base_sha256=base_hash.result(),
            adapter_format="peft" if is_peft else "toolchain",
            fused_weights=tuple(changed),
        )
    if after is not None:
        after(model)
    write_provenance(model, provenance)
    save_onnx(model, Path(out), force=force, validate=True)
    return provenance
