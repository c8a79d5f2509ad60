"""Where an INT8 model loses agreement: the quantized base against the FP32 base on source and target
windows, weights-only and activations-only INT8, per-conv SQNR, calibration variants, and convs kept
float (picked greedily on source windows).

    python scripts/int8_diagnose.py DIR [--data watch] [--keep 2]

DIR holds what `scripts/bench_int8.py` (or the CLI) wrote for one backbone: base.onnx, fused.onnx,
adapter.safetensors, base.int8.onnx, fused.int8.onnx. Every agreement is top-1 of
``toolchain.verify.predictions`` against the FP32 model on every window of the split. Prints one line
per measurement; writes nothing but temporary files.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

from toolchain.data.sources import load_split
from toolchain.graphs.fuse import fuse_files
from toolchain.graphs.provenance import set_metadata
from toolchain.graphs.qdq import activation_quantizers
from toolchain.graphs.weights import index_weights
from toolchain.quantize import QUANTIZABLE_OPS, RECALIBRATE_SPLIT, Calibration, _reader, calibration_inputs, recalibrate
from toolchain.verify import predictions

TMP = Path(tempfile.mkdtemp(prefix="int8-diagnose-"))


def windows(data: str, split: str) -> np.ndarray:
    return np.ascontiguousarray(load_split(data, split).X, dtype=np.float32)


def agree(model: str | Path, reference: str | Path, x: np.ndarray) -> float:
    return float(np.mean(predictions(str(model), x) == predictions(str(reference), x)))


def quantize(src: Path, out: Path, batches: list[np.ndarray], exclude=(), method=CalibrationMethod.MinMax, **extra):
    """The toolchain's own quantize_static settings (toolchain/quantize.py), with convs left float."""
    model = onnx.load(str(src))
    quantize_static(
        str(src), str(out), _reader(model.graph.input[0].name, batches), quant_format=QuantFormat.QDQ,
        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"],
        nodes_to_exclude=list(exclude), calibrate_method=method,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "AddQDQPairToWeight": True,
                       "QuantizeBias": False, "OpTypesToExcludeOutputQuantization": list(QUANTIZABLE_OPS), **extra},
    )  # fmt: skip
    q = onnx.load(str(out))  # the quantizer keeps metadata; restore it so fuse checks provenance as usual
    set_metadata(q, {p.key: p.value for p in model.metadata_props})
    onnx.save(q, str(out))
    return out


def strip(src: Path, out: Path, activations: bool) -> Path:
    """``src`` with the activation (or the weight) Q/DQ pairs removed: the other half stays INT8."""
    m = onnx.load(str(src))
    g = m.graph
    acts = activation_quantizers(g, index_weights(g))
    ids = {id(q) for q in acts}
    targets = [q for q in g.node if q.op_type == "QuantizeLinear" and ((id(q) in ids) == activations)]
    for q in targets:
        for dq in [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]]:
            for n in g.node:
                for i, name in enumerate(n.input):
                    if name == dq.output[0]:
                        n.input[i] = q.input[0]
            g.node.remove(dq)
        g.node.remove(q)
    onnx.save(m, str(out))
    return out


def sqnr(fp32: Path, int8: Path, x: np.ndarray) -> list[tuple[str, float]]:
    """Signal-to-quantization-noise ratio (dB) of every Conv output and the logits."""
    m = onnx.load(str(fp32))
    names = [n.output[0] for n in m.graph.node if n.op_type == "Conv"] + [m.graph.output[0].name]

    def run(path: Path) -> list[np.ndarray]:
        mm = onnx.load(str(path))
        have = {o.name for o in mm.graph.output}
        mm.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in names if t not in have)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        s = ort.InferenceSession(mm.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        batch = s.get_inputs()[0].shape[0]
        step = batch if isinstance(batch, int) else len(x)
        runs = [s.run(names, {s.get_inputs()[0].name: x[i : i + step]}) for i in range(0, len(x) - len(x) % step, step)]
        return [np.concatenate([r[j] for r in runs]) for j in range(len(names))]

    out = []
    for name, a, b in zip(names, run(fp32), run(int8), strict=True):
        out.append((name, float(10 * np.log10(np.mean(a**2) / max(np.mean((a - b) ** 2), 1e-30)))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--data", default="watch")
    ap.add_argument("--keep", type=int, default=2, help="convs to keep float, picked greedily (default 2)")
    a = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)
    d = Path(a.dir)
    base, fused, adapter = d / "base.onnx", d / "fused.onnx", d / "adapter.safetensors"
    source, test = windows(a.data, "source"), windows(a.data, "target-test")
    shape = [d.dim_value or None for d in onnx.load(str(base)).graph.input[0].type.tensor_type.shape.dim]
    print(f"windows: source {len(source)}, target-test {len(test)}")
    print(f"base INT8 vs FP32: source {agree(d / 'base.int8.onnx', base, source):.4f}, "
          f"target-test {agree(d / 'base.int8.onnx', base, test):.4f}")  # fmt: skip
    print(f"fused INT8 vs FP32 (target-test): {agree(d / 'fused.int8.onnx', fused, test):.4f}")
    cal = Calibration(a.data, RECALIBRATE_SPLIT)
    fuse_files(d / "base.int8.onnx", adapter, TMP / "r.onnx", force=True, after=lambda m: recalibrate(m, cal) and None)
    print(f"fused INT8 + --recalibrate on {RECALIBRATE_SPLIT} (target-test): {agree(TMP / 'r.onnx', fused, test):.4f}")
    w_only, a_only = (
        strip(d / "fused.int8.onnx", TMP / "w.onnx", True),
        strip(d / "fused.int8.onnx", TMP / "a.onnx", False),
    )
    print(f"weights-only INT8 {agree(w_only, fused, test):.4f}, activations-only INT8 {agree(a_only, fused, test):.4f}")
    for name, db in sqnr(base, d / "base.int8.onnx", source[::20]):
        print(f"SQNR {name}: {db:.1f} dB")
    for n in (256, len(source)):
        batches, _ = calibration_inputs(Calibration(a.data, batches=n), shape)
        for label, method, extra in [
            ("minmax", CalibrationMethod.MinMax, {}),
            ("percentile 99.99", CalibrationMethod.Percentile, {"CalibPercentile": 99.99}),
            ("percentile 99.9", CalibrationMethod.Percentile, {"CalibPercentile": 99.9}),
            ("entropy", CalibrationMethod.Entropy, {}),
        ]:
            q = quantize(fused, TMP / "c.onnx", batches, method=method, **extra)
            print(f"re-quantized fused, {len(batches)} calibration batches, {label}: {agree(q, fused, test):.4f}")
    batches, _ = calibration_inputs(Calibration(a.data), shape)
    convs = [n.name for n in onnx.load(str(base)).graph.node if n.op_type == "Conv"]
    held = source[1::7]  # not the calibration windows' positions
    kept: list[str] = []
    for _ in range(a.keep):
        score, pick = max(
            (agree(quantize(base, TMP / "g.onnx", batches, [*kept, c]), base, held), c) for c in convs if c not in kept
        )
        kept.append(pick)
        quantize(base, TMP / "k.onnx", batches, kept)
        fuse_files(TMP / "k.onnx", adapter, TMP / "kf.onnx", force=True)
        after = agree(TMP / "kf.onnx", fused, test)
        print(f"keep float {kept}: base on source {score:.4f}, fused on target-test {after:.4f}")


if __name__ == "__main__":
    main()
