"""`toolchain diff A.onnx B.onnx`: what differs between two ONNX models, structurally and in values.

Initializers are compared by name (changed values with max |Δ|, changed shape or dtype, added,
removed); nodes by name, op type, inputs, outputs and attributes (added, removed, and whether the
order of the common nodes changed); graph inputs and outputs by name and type; value_info,
doc strings, node metadata and model metadata_props by key.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from toolchain.graphs.weights import Weight


def _node_key(i: int, n: onnx.NodeProto) -> str:
    return n.name or f"#{i}:{n.op_type}"


def _node_sig(n: onnx.NodeProto) -> tuple[Any, ...]:
    attrs = tuple(sorted((a.name, a.SerializeToString()) for a in n.attribute))
    meta = tuple(sorted((p.key, p.value) for p in n.metadata_props))
    return (n.op_type, n.domain, tuple(n.input), tuple(n.output), attrs, n.doc_string, meta)


def _io(values: Any) -> dict[str, str]:
    return {v.name: str(v.type).replace("\n", " ") for v in values}


def _keyed_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[str]]:
    return {
        "added": sorted(set(b) - set(a)),
        "removed": sorted(set(a) - set(b)),
        "changed": sorted(k for k in set(a) & set(b) if a[k] != b[k]),
    }


def _initializers(a: onnx.GraphProto, b: onnx.GraphProto) -> dict[str, Any]:
    ta, tb = {t.name: t for t in a.initializer}, {t.name: t for t in b.initializer}
    changed = []
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        if x.SerializeToString() == y.SerializeToString():
            continue
        entry: dict[str, Any] = {"name": name}
        if list(x.dims) != list(y.dims) or x.data_type != y.data_type:
            entry.update(shape=[list(x.dims), list(y.dims)], dtype=[x.data_type, y.data_type])
        else:
            va, vb = Weight(name, x).values(), Weight(name, y).values()
            delta = np.abs(vb.astype(np.float64) - va.astype(np.float64)) if va.dtype.kind in "fiu" else np.zeros(1)
            entry.update(
                max_abs_delta=float(delta.max()) if delta.size else 0.0,
                values_changed=int(np.count_nonzero(delta)) if delta.size else 0,
            )
        changed.append(entry)
    return {"added": sorted(set(tb) - set(ta)), "removed": sorted(set(ta) - set(tb)), "changed": changed}


def _nodes(a: onnx.GraphProto, b: onnx.GraphProto) -> dict[str, Any]:
    na = {_node_key(i, n): _node_sig(n) for i, n in enumerate(a.node)}
    nb = {_node_key(i, n): _node_sig(n) for i, n in enumerate(b.node)}
    common = [k for k in na if k in nb]
    order_b = [k for k in nb if k in na]
    out: dict[str, Any] = dict(_keyed_diff(na, nb))
    out["order_changed"] = common != order_b
    return out


def diff_models(a: onnx.ModelProto, b: onnx.ModelProto) -> dict[str, Any]:
    """A JSON-ready description of what changes from ``a`` to ``b``; ``identical`` when nothing does."""
    report: dict[str, Any] = {
        "initializers": _initializers(a.graph, b.graph),
        "nodes": _nodes(a.graph, b.graph),
        "inputs": _keyed_diff(_io(a.graph.input), _io(b.graph.input)),
        "outputs": _keyed_diff(_io(a.graph.output), _io(b.graph.output)),
        "value_info": _keyed_diff(_io(a.graph.value_info), _io(b.graph.value_info)),
        "metadata": _keyed_diff({p.key: p.value for p in a.metadata_props}, {p.key: p.value for p in b.metadata_props}),
        "opset": [[(o.domain, o.version) for o in m.opset_import] for m in (a, b)]
        if list(a.opset_import) != list(b.opset_import)
        else [],
        "ir_version": [a.ir_version, b.ir_version] if a.ir_version != b.ir_version else [],
        "doc_string_changed": a.graph.doc_string != b.graph.doc_string or a.doc_string != b.doc_string,
    }
    report["identical"] = not any(_nonempty(v) for v in report.values())
    return report


def _nonempty(v: Any) -> bool:
    if isinstance(v, dict):
        return any(_nonempty(x) for x in v.values())
    return bool(v)


def format_diff(report: dict[str, Any]) -> list[str]:
    """Human-readable lines, one per difference."""
    if report["identical"]:
        return ["identical"]
    lines = []
    ini = report["initializers"]
    for e in ini["changed"]:
        if "shape" in e:
            lines.append(f"initializer {e['name']}: shape {e['shape'][0]} -> {e['shape'][1]}")
        else:
            lines.append(
                f"initializer {e['name']}: {e['values_changed']} values changed, max |Δ| {e['max_abs_delta']:.3g}"
            )
    lines += [f"initializer added: {n}" for n in ini["added"]] + [f"initializer removed: {n}" for n in ini["removed"]]
    for section in ("nodes", "inputs", "outputs", "value_info", "metadata"):
        for kind in ("added", "removed", "changed"):
            lines += [f"{section} {kind}: {n}" for n in report[section][kind]]
    if report["nodes"]["order_changed"]:
        lines.append("node order changed")
    if report["opset"]:
        lines.append(f"opset {report['opset'][0]} -> {report['opset'][1]}")
    if report["ir_version"]:
        lines.append(f"IR version {report['ir_version'][0]} -> {report['ir_version'][1]}")
    if report["doc_string_changed"]:
        lines.append("doc string changed")
    return lines
