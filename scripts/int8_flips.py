"""Which target windows each INT8 route flips, how sure the FP32 reference was there, and what
calibration choices and float layers would change, on one folder of `scripts/bench_int8.py`.

    python scripts/int8_flips.py DIR [--data watch] [--greedy 5] [--first 4] [--parts routes,recal,oracle,first]

DIR holds what `scripts/bench_int8.py --models mobilenet1d` writes (fused.onnx and the INT8 models of
each route). Three parts, every agreement on the target users' test windows against fused.onnx:
1. per route: agreement, its Wilson 95% interval, the flips and the reference's top-2 margin on them
   (``toolchain.verify.task_agreement``, what `toolchain verify` reports);
2. `--recalibrate` variants: activation scales set from max |x| or a percentile of |x| over the
   target-adapt windows (or source and target-adapt together), on the fused INT8 models;
3. an oracle, **not a method**: activation/weight quantizers of the recalibrated model left float one
   at a time, each step the one that lowers the logit error most *on the test windows themselves*:
   an upper bound on what choosing float layers could buy;
4. the first N convs left float (`toolchain quantize --exclude @first:N`, N = --first), fused and
   fused with `--recalibrate`, through the CLI: agreement, macro-F1 and the flips.
Prints one line per measurement; writes only temporary files.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from toolchain.data.sources import load_split
from toolchain.graphs.qdq import activation_quantizers, dequantized, set_activation_scale
from toolchain.graphs.weights import index_weights
from toolchain.verify import VerifyOptions, first_outputs, task_agreement

TMP = Path(tempfile.mkdtemp(prefix="int8-flips-"))
ROUTES = {
    "fused into the quantized base": "fused.int8.onnx",
    "+ --recalibrate": "fused.recal.int8.onnx",
    "re-quantized from scratch": "fused.requant.int8.onnx",
    "first conv float": "fused.int8-first-float.onnx",
    "first conv float + --recalibrate": "fused.recal.int8-first-float.onnx",
}


def windows(data: str, splits: list[str]) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate([load_split(data, s).X for s in splits]), dtype=np.float32)


def routes(d: Path, data: str) -> None:
    opts = VerifyOptions(data=data, split="target-test")
    for label, name in ROUTES.items():
        if not (d / name).exists():
            continue
        a = task_agreement(str(d / name), str(d / "fused.onnx"), opts)
        lo, hi = a.interval
        top = f"{a.flipped_margins[0]:.3g}" if a.flipped_margins else "-"
        rank = f"{100 * a.flipped_margin_rank:.1f}%" if a.flipped_margin_rank is not None else "-"
        print(f"route {label}: agreement {a.top1_agreement:.4f} [{lo:.4f}, {hi:.4f}], {a.flipped} flips, "
              f"reference margin there <= {top} (median {a.margin_median:.3g}), rank {rank}")  # fmt: skip


def abs_values(model: onnx.ModelProto, tensors: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """|x| of each named tensor of the float ``model`` over the windows, flattened."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors if t not in have)
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    name, batch = s.get_inputs()[0].name, s.get_inputs()[0].shape[0]
    step = batch if isinstance(batch, int) else 64
    runs = [s.run(tensors, {name: x[i : i + step]}) for i in range(0, len(x) - len(x) % step, step)]
    return {t: np.abs(np.concatenate([r[j].ravel() for r in runs])) for j, t in enumerate(tensors)}


def agree(model: onnx.ModelProto | Path, ref: np.ndarray, x: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean squared logit error) of ``model`` against the reference outputs."""
    path = model if isinstance(model, Path) else TMP / "m.onnx"
    if not isinstance(model, Path):
        onnx.save(model, str(path))
    out = first_outputs(str(path), x)
    return float(np.mean(out.argmax(1) == ref.argmax(1))), float(np.mean((out - ref) ** 2))


def recalibrations(d: Path, data: str, test: np.ndarray, ref: np.ndarray) -> None:
    for name in ("fused.int8.onnx", "fused.int8-first-float.onnx"):
        base = onnx.load(str(d / name))
        tensors = sorted({q.input[0] for q in activation_quantizers(base.graph, index_weights(base.graph))})
        for splits in (["target-adapt"], ["source", "target-adapt"]):
            values = abs_values(dequantized(base), tensors, windows(data, splits))
            for p in (100.0, 99.999, 99.99, 99.9, 99.5):
                m = onnx.ModelProto()
                m.CopyFrom(base)
                w = index_weights(m.graph)
                for q in activation_quantizers(m.graph, w):
                    set_activation_scale(w[q.input[1]], float(np.percentile(values[q.input[0]], p)))
                a, _ = agree(m, ref, test)
                print(f"recalibrate {name} on {'+'.join(splits)}, percentile {p}: agreement {a:.4f}")


def without(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """``model`` with the Q/DQ pair of ``tensor`` removed (its readers read the float tensor)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    q = next(n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    for dq in [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]]:
        for n in g.node:
            n.input[:] = [q.input[0] if t == dq.output[0] else t for t in n.input]
        g.node.remove(dq)
    g.node.remove(q)
    return out


def oracle(d: Path, test: np.ndarray, ref: np.ndarray, steps: int) -> None:
    m = onnx.load(str(d / "fused.recal.int8.onnx"))
    for step in range(steps):
        weights = index_weights(m.graph)
        names = [q.input[0] for q in m.graph.node if q.op_type == "QuantizeLinear"]
        (mse, a), pick = min(((agree(without(m, t), ref, test)[::-1]), t) for t in names)
        m = without(m, pick)
        kind = "weight" if pick in weights else "activation"
        print(f"oracle step {step + 1}: {kind} {pick} float: agreement {a:.4f}, logit MSE {mse:.4f}")


def first_float(d: Path, data: str, n: int) -> None:
    base8 = TMP / f"base.first{n}.int8.onnx"
    cli = ["toolchain", "quantize", str(d / "base.onnx"), "-o", str(base8), "--data", data, "--exclude", f"@first:{n}"]
    subprocess.run([*cli, "--force"], check=True, capture_output=True)
    opts = VerifyOptions(data=data, split="target-test")
    for label, extra in (("fused", []), ("fused + --recalibrate", ["--recalibrate", data])):
        out = TMP / "first.onnx"
        cmd = ["toolchain", "fuse", str(base8), str(d / "adapter.safetensors"), "-o", str(out), "--force", *extra]
        subprocess.run(cmd, check=True, capture_output=True)
        a = task_agreement(str(out), str(d / "fused.onnx"), opts)
        rank = f"{100 * a.flipped_margin_rank:.1f}%" if a.flipped_margin_rank is not None else "-"
        print(f"first {n} convs float, {label}: agreement {a.top1_agreement:.4f}, macro-F1 {a.f1_model:.4f} vs "
              f"{a.f1_reference:.4f}, {a.flipped} flips, rank {rank}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--data", default="watch")
    ap.add_argument("--greedy", type=int, default=5, help="oracle steps (default 5)")
    ap.add_argument("--first", type=int, default=4, help="part 4: convs left float (default 4)")
    ap.add_argument("--parts", default="routes,recal,oracle,first", help="which parts to run (default all)")
    a = ap.parse_args()
    ort.set_default_logger_severity(3)
    d = Path(a.dir)
    test = windows(a.data, ["target-test"])
    ref = first_outputs(str(d / "fused.onnx"), test)
    parts = set(a.parts.split(","))
    if "routes" in parts:
        routes(d, a.data)
    if "recal" in parts:
        recalibrations(d, a.data, test, ref)
    if "oracle" in parts:
        oracle(d, test, ref, a.greedy)
    if "first" in parts:
        first_float(d, a.data, a.first)


if __name__ == "__main__":
    main()
