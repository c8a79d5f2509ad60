"""Fuse an adapter into the Conv weight initializers of an ONNX graph: W' = W + ΔW.

``fuse_adapter`` is a pure Graph -> Graph pass over onnx-graphsurgeon's IR; ``fuse_files`` adds
file handling and provenance. Nodes, op types, inputs and outputs stay those of the base graph.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from kernels import delta_weight, dora_weight, lora_delta, suffix_kernel, weight_sha256
from toolchain.adapter_file import Adapter, ExtraRecord, LayerRecord, load_adapter
from toolchain.errors import ToolchainError
from toolchain.fileio import check_output, sha256_file

SCALES_KEY = "toolchain.weight_scales"  # written by `toolchain export --fold-bn`
PROVENANCE = ("toolchain.fused", "toolchain.base_sha256", "toolchain.adapter_sha256", "toolchain.version")


@dataclass
class WeightSlot:
    """Where a weight lives: an initializer (gs.Constant) or a Constant node's output."""

    tensor: gs.Tensor
    consumers: list[gs.Node]

    @property
    def name(self) -> str:
        return self.tensor.name

    def values(self) -> np.ndarray:
        if isinstance(self.tensor, gs.Constant):
            return np.asarray(self.tensor.values)
        return np.asarray(self.tensor.inputs[0].attrs["value"].values)

    def set_values(self, values: np.ndarray) -> None:
        if isinstance(self.tensor, gs.Constant):
            self.tensor.values = values
        else:
            self.tensor.inputs[0].attrs["value"] = gs.Constant(self.tensor.name + "_value", values)


def layer_delta(layer: LayerRecord, adapter: Adapter) -> np.ndarray:
    """ΔW of one additive layer (lora-edge, lora) from the adapter's tensors (the kernels' reference)."""
    if layer.method == "lora-edge":
        delta, *suffix = adapter.layer_tensors(layer)
        return delta_weight(delta, suffix_kernel(suffix), layer.scaling)
    a, b = adapter.layer_tensors(layer)[:2]
    return lora_delta(a, b, layer.geometry.groups, layer.scaling)


def new_weight(layer: LayerRecord, adapter: Adapter, base: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """The fused weight. ``scale``: per-output-channel BatchNorm fold factors already in ``base``."""
    shape = (-1,) + (1,) * (base.ndim - 1)
    if layer.method == "dora":
        a, b, m = adapter.layer_tensors(layer)
        if scale is None:
            return dora_weight(base, a, b, m, layer.geometry.groups, layer.scaling)
        if np.any(scale == 0):
            raise ToolchainError(
                f"layer {layer.name}: a BatchNorm fold scale is 0, so the unfolded weight cannot be recovered for DoRA", seen=int(np.sum(scale == 0)), remedy="export without --fold-bn"
            )
        unfolded = (base / scale.reshape(shape)).astype(np.float32)
        return (dora_weight(unfolded, a, b, m, layer.geometry.groups, layer.scaling) * scale.reshape(shape)).astype(np.float32)
    delta = layer_delta(layer, adapter)
    if delta.shape != base.shape:
        raise ToolchainError(f"layer {layer.name}: ΔW shape does not match the Conv weight", seen=(delta.shape, base.shape))
    if scale is not None:
        delta = (delta * scale.reshape(shape)).astype(np.float32)
    return (base + delta).astype(base.dtype)


def weight_slots(graph: gs.Graph, op: str = "Conv", index: int = 1) -> dict[str, WeightSlot]:
    """Constant weights feeding input ``index`` of every ``op`` node, by tensor name."""
    slots: dict[str, WeightSlot] = {}
    for node in graph.nodes:
        if node.op != op or len(node.inputs) <= index:
            continue
        t = node.inputs[index]
        is_const_node = isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "Constant" and "value" in t.inputs[0].attrs
        if isinstance(t, gs.Constant) or is_const_node:
            slots.setdefault(t.name, WeightSlot(t, [])).consumers.append(node)
    return slots


def _digests(slots: list[WeightSlot]) -> dict[str, str]:
    """SHA-256 of each slot's values; hashlib releases the GIL, so threads hash in parallel."""
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return dict(zip([s.name for s in slots], pool.map(lambda s: weight_sha256(s.values()), slots), strict=True))


def _find_slot(layer: LayerRecord, slots: dict[str, WeightSlot], scales: dict[str, dict], digests: dict[str, str]) -> tuple[WeightSlot, np.ndarray | None]:
    """The layer's Conv weight and its per-channel BN-fold scale (None when unscaled)."""
    slot = slots.get(layer.param)
    if slot is not None and tuple(slot.values().shape) != layer.geometry.weight_shape:
        raise ToolchainError(
            f"layer {layer.name}: the Conv weight's shape does not fit the adapter layer",
            seen=(tuple(slot.values().shape), layer.geometry.weight_shape),
            remedy="fuse into the base model this adapter came from",
        )
    if slot is not None:
        got = digests[slot.name]
        if got == layer.base_sha256:
            return slot, None
        entry = scales.get(layer.param)
        if entry and entry.get("base_sha256") == layer.base_sha256:
            return slot, np.asarray(entry["scale"], dtype=np.float64)
        raise ToolchainError(
            f"layer {layer.name}: Conv weight {layer.param} is not the base weight the adapter was trained against",
            seen=f"sha256 {got[:12]} vs adapter {layer.base_sha256[:12]}",
            remedy="fuse into the base model this adapter came from (BatchNorm folded? export with `toolchain export --fold-bn`, which records the fold scales)",
        )
    for other in slots.values():  # names differ: fall back to the content hash
        if other.name not in digests:
            digests.update(_digests([s for s in slots.values() if s.name not in digests]))
        if digests[other.name] == layer.base_sha256:
            return other, None
    raise ToolchainError(f"layer {layer.name}: no Conv weight in the model matches the adapter (by name or SHA-256)", seen=layer.param, remedy="fuse into the base model this adapter came from")


def _check_consumers(layer: LayerRecord, slot: WeightSlot) -> None:
    if len(slot.consumers) > 1:
        raise ToolchainError(
            f"layer {layer.name}: its weight {slot.name} feeds {len(slot.consumers)} Conv nodes, and fusing would change all of them",
            seen=[n.name for n in slot.consumers][:4],
            remedy="export the base model without weight sharing or deduplication",
        )
    geom, node = layer.geometry, slot.consumers[0]
    if int(node.attrs.get("group", 1)) != geom.groups:
        raise ToolchainError(f"layer {layer.name}: Conv group differs from the adapter's", seen=(node.attrs.get("group", 1), geom.groups))


def fuse_adapter(graph: gs.Graph, adapter: Adapter, scales: dict[str, dict] | None = None, changed: list[str] | None = None) -> gs.Graph:
    """Add every layer's ΔW (scaled per output channel where BatchNorm was folded) and apply extras.

    ``changed``, when given, receives the names of the tensors that were rewritten.
    """
    changed = [] if changed is None else changed
    unfusable = [x.name for x in adapter.layers if x.method == "adapter"]
    if unfusable:
        raise ToolchainError(
            "bottleneck adapters add layers, so they cannot be fused into Conv weights",
            seen=f"{len(unfusable)} adapter blocks, e.g. {unfusable[0]}",
            remedy="deploy the unfused export (toolchain export --adapter FILE, without --fuse) and measure its cost with toolchain bench",
        )
    slots = weight_slots(graph)
    digests = _digests([slots[x.param] for x in adapter.layers if x.param in slots])
    claimed: dict[str, str] = {}
    for layer in adapter.layers:
        slot, scale = _find_slot(layer, slots, scales or {}, digests)
        if slot.name in claimed:
            raise ToolchainError("two adapter layers resolve to the same Conv weight", seen=(claimed[slot.name], layer.name))
        claimed[slot.name] = layer.name
        _check_consumers(layer, slot)
        fused = new_weight(layer, adapter, slot.values(), scale)
        if not np.all(np.isfinite(fused)):
            raise ToolchainError(f"layer {layer.name}: the fused weight has NaN or Inf values", seen=slot.name, remedy="check the base model and the adapter; neither may hold non-finite values")
        slot.set_values(fused)
        changed.append(slot.name)
    for extra in adapter.extras:
        _apply_extra(graph, extra, adapter.extra_tensor(extra))
        changed.append(extra.param)
    return graph.cleanup().toposort()


def _apply_extra(graph: gs.Graph, extra: ExtraRecord, value: np.ndarray) -> None:
    tensor = graph.tensors().get(extra.param)
    if not isinstance(tensor, gs.Constant):
        raise ToolchainError(
            "adapter tensor has no initializer of that name in the model", seen=extra.param, remedy="BatchNorm folded at export cannot take trained BN parameters: export without --fold-bn"
        )
    old = np.asarray(tensor.values)
    if extra.base_sha256 is not None and weight_sha256(old) != extra.base_sha256:
        raise ToolchainError("a base tensor the adapter replaces differs from the one it was trained against", seen=extra.param, remedy="fuse into the matching base model")
    if old.shape != value.shape:
        _resize_head(graph, extra.param, old.shape, value.shape)
    tensor.values = value.astype(old.dtype)


def _resize_head(graph: gs.Graph, name: str, old: tuple[int, ...], new: tuple[int, ...]) -> None:
    """A classifier with other classes: only the output-feature axis may change; fix output shapes."""
    if len(old) != len(new) or old[1:] != new[1:]:
        raise ToolchainError("adapter tensor shape does not fit the model (only a head's class count may change)", seen=(name, old, new))
    for out in graph.outputs:
        if out.shape is not None and len(out.shape) == 2 and out.shape[1] == old[0]:
            out.shape = [out.shape[0], new[0]]


def read_scales(model: onnx.ModelProto) -> dict[str, dict]:
    raw = next((p.value for p in model.metadata_props if p.key == SCALES_KEY), None)
    if raw is None:
        return {}
    try:
        scales = json.loads(raw)
    except json.JSONDecodeError:
        raise ToolchainError("model metadata toolchain.weight_scales is not valid JSON", seen=raw[:60], remedy="re-export the model") from None
    if not isinstance(scales, dict):
        raise ToolchainError("model metadata toolchain.weight_scales must be a JSON object", seen=type(scales).__name__)
    return scales


def _check_finite(model: onnx.ModelProto) -> None:
    for t in model.graph.initializer:
        if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            continue
        try:
            values = onnx.numpy_helper.to_array(t)
        except Exception as err:  # data that does not fit the declared dims
            raise ToolchainError("an ONNX initializer's data does not match its declared shape", seen=f"{t.name}: {str(err)[:100]}", remedy="the model is corrupt; re-export it") from None
        if not np.all(np.isfinite(values)):
            raise ToolchainError("the ONNX model has NaN or Inf values", seen=f"initializer {t.name}", remedy="fix or re-export the base model")


def fuse_model(model: onnx.ModelProto, adapter: Adapter, provenance: dict[str, str]) -> onnx.ModelProto:
    """ModelProto in, fused ModelProto out, with the base's IR version, opset and metadata kept."""
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("toolchain.fused") == "true":
        same = meta.get("toolchain.adapter_sha256") == provenance.get("toolchain.adapter_sha256")
        raise ToolchainError(
            "the model is already fused" + (" with this very adapter" if same else " with another adapter"),
            seen=f"fused with adapter sha256 {meta.get('toolchain.adapter_sha256', '?')[:12]}, this adapter {provenance.get('toolchain.adapter_sha256', '?')[:12]}",
            remedy="fuse into the unfused base model (toolchain export without --adapter)",
        )
    _check_finite(model)
    changed: list[str] = []
    try:
        graph = fuse_adapter(gs.import_onnx(model), adapter, read_scales(model), changed)
        fused = gs.export_onnx(graph, do_type_check=True)
    except ToolchainError:
        raise
    except Exception as err:  # a malformed graph can trip onnx-graphsurgeon in many ways
        raise ToolchainError("cannot rewrite this ONNX graph", seen=f"{type(err).__name__}: {str(err)[:160]}", remedy="check the model with onnx.checker and re-export it") from None
    fused.ir_version = model.ir_version
    del fused.opset_import[:]
    fused.opset_import.extend(model.opset_import)
    fused.producer_name, fused.producer_version = model.producer_name, model.producer_version
    meta.update(provenance)
    meta["toolchain.fused_weights"] = json.dumps(changed)
    for key in sorted(meta):
        fused.metadata_props.add(key=key, value=meta[key])
    return fused


def fuse_files(base: str | os.PathLike[str], adapter_path: str | os.PathLike[str], out: str | os.PathLike[str], *, force: bool = False) -> dict[str, str]:
    """`toolchain fuse`: read, fuse, check, write atomically. Returns the provenance written."""
    from graphs.onnx_io import load_onnx, save_onnx
    from toolchain import __version__

    check_output(out, [base, adapter_path], force=force)
    with ThreadPoolExecutor(max_workers=1) as pool:  # hash the base file while it is parsed
        base_hash = pool.submit(sha256_file, base)
        model = load_onnx(base)
        adapter = load_adapter(adapter_path)
        provenance = {
            "toolchain.fused": "true",
            "toolchain.base_sha256": base_hash.result(),
            "toolchain.adapter_sha256": sha256_file(adapter_path),
            "toolchain.kind": "fused",
            "toolchain.version": __version__,
        }
    fused = fuse_model(model, adapter, provenance)  # same nodes as the checked base; only values changed
    save_onnx(fused, Path(out))
    return provenance
