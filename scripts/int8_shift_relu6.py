"""Symmetric INT8 spends half its codes on ReLU6 outputs: shift them to [-3, 3] (exact in FP32) and
measure whether the INT8 model then agrees with the FP32 fused model. (Negative result,
docs/BENCHMARKS.md, "mobilenet1d: ReLU6 outputs shifted to a signed range".)

    python scripts/int8_shift_relu6.py DIR --out OUT [--exclude @first:4] [--data watch]

TensorRT takes symmetric activations only (zero point 0), so a ReLU6 output in [0, 6] is quantized at
6/127 and codes -128..-1 are never used. For each Clip(0, 6) whose only reader is a Conv, after a
BatchNormalization read by nothing else, the pass moves the range: the BN's bias - 3, Clip(-3, 3),
and the Conv's bias + 3 * sum(W) over its input channels and taps; a Conv that pads gets an explicit
Pad with the value -3 (the old zero) and pads 0. Same function, per-tensor scale 3/127.

DIR holds base.onnx, fused.onnx and adapter.safetensors (the folder `scripts/bench_int8.py --models
mobilenet1d` writes). Per route, plain and shifted: quantize the base on the source subjects, fuse
the adapter into it, and re-quantize the fused FP32 model on target-adapt (what `fuse --recalibrate`
does); verify each against DIR's fused.onnx on the target test windows. In the INT8 models each
shifted conv's bias is b + 3 * sum(Wq), Wq its weight as dequantized (``set_biases``: `toolchain fuse`
changes W only, and with the float W the rounding error of W would be multiplied by every shifted
zero). Also printed: the FP32 shift's largest logit difference, the plain and shifted INT8 models'
with every activation quantizer removed (the weight error must be unchanged), and, without
--exclude, the plain model's agreement with only some activation quantizers left (``parts``).
Writes only under OUT; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper
from onnx import numpy_helper as nh

from toolchain.data.sources import load_split
from toolchain.graphs.qdq import activation_quantizers, quantized_weights
from toolchain.graphs.weights import Weight, index_weights
from toolchain.kernels.quant import fake_quantize
from toolchain.metrics import macro_f1
from toolchain.verify import VerifyOptions, first_outputs, predictions, task_agreement

SHIFT = 3.0  # the middle of ReLU6's range


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for x in n.input:
            out.setdefault(x, []).append(n)
    return out


def _pads(node: onnx.NodeProto) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "pads"), [])


def _shiftable(clip: onnx.NodeProto, weights: dict[str, Weight], readers: dict, producers: dict) -> bool:
    if clip.op_type != "Clip" or len(clip.input) < 3 or not {clip.input[1], clip.input[2]} <= weights.keys():
        return False
    if (float(weights[clip.input[1]].values()), float(weights[clip.input[2]].values())) != (0.0, 6.0):
        return False
    rs, bn = readers.get(clip.output[0], []), producers.get(clip.input[0])
    return (
        len(rs) == 1
        and rs[0].op_type == "Conv"
        and rs[0].input[0] == clip.output[0]
        and len(rs[0].input) > 2
        and len(readers[rs[0].input[2]]) == 1
        and bn is not None
        and bn.op_type == "BatchNormalization"
        and len(readers[bn.output[0]]) == 1
        and len(readers[bn.input[2]]) == 1
    )


def shift_relu6(model: onnx.ModelProto, c: float = SHIFT) -> int:
    """Shift every shiftable ReLU6 output by -c in place (see the module doc); returns how many."""
    g = model.graph
    weights = index_weights(g)
    readers, producers = _readers(g), {o: n for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}

    def add(arr: np.ndarray, name: str) -> str:
        g.initializer.append(nh.from_array(arr, name))
        return name

    def bump(name: str, delta: np.ndarray) -> None:
        weights[name].set_values(weights[name].values() + delta)  # keeps the dtype

    pads_to_insert = []
    shifted = 0
    for clip in list(g.node):
        if not _shiftable(clip, weights, readers, producers) or clip.output[0] in outputs:
            continue
        conv, bn = readers[clip.output[0]][0], producers[clip.input[0]]
        dtype = weights[clip.input[1]].values().dtype
        bump(bn.input[2], np.asarray(-c))
        clip.input[1] = add(np.asarray(-c, dtype), f"{clip.name}_shift_min")
        clip.input[2] = add(np.asarray(6.0 - c, dtype), f"{clip.name}_shift_max")
        w = weights[conv.input[1]].values()
        bump(conv.input[2], c * w.sum(axis=tuple(range(1, w.ndim)), dtype=np.float64))
        pads = _pads(conv)
        if any(pads):
            half = len(pads) // 2
            full = np.asarray([0, 0, *pads[:half], 0, 0, *pads[half:]], np.int64)
            name = f"{conv.name}_shift_pad"
            ins = [clip.output[0], add(full, f"{name}_pads"), add(np.asarray(-c, np.float32), f"{name}_value")]
            pads_to_insert.append((conv, helper.make_node("Pad", ins, [f"{name}_out"], name=name, mode="constant")))
            conv.input[0] = f"{name}_out"
            attr = next(a for a in conv.attribute if a.name == "pads")
            del attr.ints[:]
            attr.ints.extend([0] * len(pads))
        shifted += 1
    for conv, pad in pads_to_insert:
        g.node.insert(list(g.node).index(conv), pad)
    unread = {t.name for t in g.initializer} - {x for n in g.node for x in n.input}
    for t in [t for t in g.initializer if t.name in unread]:
        g.initializer.remove(t)
    onnx.checker.check_model(model)
    return shifted


def max_difference(a: Path, b: Path, data: str) -> float:
    """Largest logit difference of two models on the target test windows (``verify.first_outputs``)."""
    x = np.ascontiguousarray(load_split(data, "target-test").X, dtype=np.float32)
    return float(np.abs(first_outputs(str(a), x) - first_outputs(str(b), x)).max())


def cli(*args: str) -> None:
    res = subprocess.run(["toolchain", *args], capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"toolchain {' '.join(args)} failed:\n{res.stderr[-2000:]}")


def set_biases(model8: Path, shifted: Path, plain: Path, c: float = SHIFT) -> int:
    """Give each shifted conv of an INT8 model the bias b + c * sum(Wq), Wq its weight as the engine sees
    it (``kernels.quant.fake_quantize`` at the chain's scales): then conv(x - c; Wq) + bias = conv(x; Wq)
    and only the activation's error changes. b is the plain FP32 model's bias; a shifted conv is one whose
    bias differs between the shifted and the plain fused FP32 models. Returns how many biases were set."""
    ref = {t.name: nh.to_array(t) for t in onnx.load(str(plain)).graph.initializer}
    moved = {t.name: nh.to_array(t) for t in onnx.load(str(shifted)).graph.initializer}
    m = onnx.load(str(model8))
    weights = index_weights(m.graph)
    chains = {c.readers[0].node.name: c for c in quantized_weights(m.graph, weights).values()}
    taken = 0
    for conv in (n for n in m.graph.node if n.op_type == "Conv" and len(n.input) > 2):
        b = conv.input[2]
        if b not in ref or np.array_equal(ref[b], moved[b]):
            continue
        chain = chains.get(conv.name)
        if chain is None:  # a conv left float (--exclude): the engine sees W itself
            w = weights[conv.input[1]].values()
        else:
            w = fake_quantize(chain.weight.values(), chain.scale.values(), chain.axis)
        bias = ref[b].astype(np.float64) + c * w.sum(axis=tuple(range(1, w.ndim)), dtype=np.float64)
        weights[b].set_values(bias.astype(np.float32))
        taken += 1
    onnx.save(m, str(model8))
    return taken


def route(out: Path, tag: str, adapter: Path, data: str, exclude: list[str]) -> dict[str, float | int]:
    """Quantize OUT/base.TAG.onnx, fuse ADAPTER into it, re-quantize OUT/fused.TAG.onnx on target-adapt."""
    base, fused = out / f"base.{tag}.onnx", out / f"fused.{tag}.onnx"
    base8, fused8, recal8 = (out / f"{n}.{tag}.int8.onnx" for n in ("base", "fused", "fused.recal"))
    cli("quantize", str(base), "-o", str(base8), "--data", data, *exclude, "--force")
    cli("fuse", str(base8), str(adapter), "-o", str(fused8), "--force")
    cli("quantize", str(fused), "-o", str(recal8), "--data", data, "--split", "target-adapt", *exclude, "--force")
    plain = out / "fused.plain.onnx"
    biases = [set_biases(m, fused, plain) for m in (fused8, recal8)]
    return {
        "biases_set": biases,
        "fused": _agreement(fused8, plain, data),
        "recalibrated": _agreement(recal8, plain, data),
    }


def keep_activations(src: Path, keep: set[str], dst: Path) -> Path:
    """SRC with every activation Q/DQ pair removed except those quantizing a tensor in KEEP (weights stay
    INT8), written to DST."""
    m = onnx.load(str(src))
    g = m.graph
    quant = {q.output[0]: q.input[0] for q in activation_quantizers(g, index_weights(g))}
    rename = {n.output[0]: quant[n.input[0]] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in quant}
    rename = {dq: x for dq, x in rename.items() if x not in keep}
    dropped = set(rename) | {q for q, x in quant.items() if x not in keep}
    nodes = [n for n in g.node if n.output[0] not in dropped]
    for n in nodes:
        for i, x in enumerate(n.input):
            n.input[i] = rename.get(x, x)
    kept = [onnx.NodeProto.FromString(n.SerializeToString()) for n in nodes]
    del g.node[:]
    g.node.extend(kept)
    onnx.save(m, str(dst))
    return dst


def parts(fused8: Path, reference: Path, data: str) -> dict[str, float]:
    """Agreement of FUSED8 with only some activation quantizers left (weights INT8 throughout): where the
    activations' loss is. The first conv's input is the standardised window."""
    g = onnx.load(str(fused8)).graph
    acts = [q.input[0] for q in activation_quantizers(g, index_weights(g))]
    made_by = {o: n for n in g.node for o in n.output}
    dq = made_by[next(n.input[0] for n in g.node if n.op_type == "Conv")]  # the first conv's input DQ
    first = {made_by[dq.input[0]].input[0]}
    relu6 = {x for x in acts if made_by[x].op_type in ("Clip", "Pad")}
    subsets = {
        "all": set(acts),
        "none": set(),
        "relu6_outputs": relu6,
        "the_others": set(acts) - relu6,
        "first_conv_input": first,
        "the_others_but_first_conv_input": set(acts) - relu6 - first,
        "all_but_first_conv_input": set(acts) - first,
    }
    out: dict[str, float] = {"quantized_activations": len(acts)}
    for name, keep in subsets.items():
        out[name] = _agreement(keep_activations(fused8, keep, fused8.with_suffix(f".{name}.onnx")), reference, data)
    return out


def _agreement(model: Path, reference: Path, data: str) -> float:
    return round(
        task_agreement(str(model), str(reference), VerifyOptions(data=data, split="target-test")).top1_agreement, 4
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path, help="a bench_int8.py mobilenet1d folder (base.onnx, fused.onnx, adapter)")
    ap.add_argument("--out", type=Path, required=True, help="new folder for this run's models")
    ap.add_argument("--exclude", default=None, help="passed to `toolchain quantize --exclude` (e.g. @first:4)")
    ap.add_argument("--data", default="watch", help="data spec (default watch)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    exclude = ["--exclude", a.exclude] if a.exclude else []
    counts = {}
    for name in ("base", "fused"):
        shutil.copyfile(a.dir / f"{name}.onnx", a.out / f"{name}.plain.onnx")
        model = onnx.load(str(a.dir / f"{name}.onnx"))
        counts[name] = shift_relu6(model)
        onnx.save(model, str(a.out / f"{name}.shift.onnx"))
    if counts["base"] != counts["fused"]:
        sys.exit(f"the base and the fused model shift differently: {counts}")
    adapter = a.dir / "adapter.safetensors"
    result = {
        "dir": str(a.dir),
        "exclude": a.exclude,
        "shifted": counts["base"],
        "fp32_shift_max_logit_difference": max_difference(
            a.out / "fused.plain.onnx", a.out / "fused.shift.onnx", a.data
        ),
        "plain": route(a.out, "plain", adapter, a.data, exclude),
        "shift": route(a.out, "shift", adapter, a.data, exclude),
    }
    # the shift must leave the weight error as it was: with no activation quantizer, plain == shifted
    result["weights_only_max_logit_difference"] = max_difference(
        *(
            keep_activations(a.out / f"fused.{t}.int8.onnx", set(), a.out / f"fused.{t}.int8.weights-only.onnx")
            for t in ("plain", "shift")
        ),
        a.data,
    )
    test = load_split(a.data, "target-test")
    got = predictions(str(a.out / "fused.plain.onnx"), np.ascontiguousarray(test.X, dtype=np.float32))
    result["f1_fp32_fused"] = round(macro_f1(test.y, got, len(test.classes)), 4)
    if not a.exclude:  # with the first conv float its input has no quantizer to single out
        result["plain_parts"] = parts(a.out / "fused.plain.int8.onnx", a.out / "fused.plain.onnx", a.data)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
