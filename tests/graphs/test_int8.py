"""INT8: quantize the base once, fuse an adapter into the QDQ model exactly, verify against FP32 on real
labelled windows, refuse QDQ layouts that fusion cannot keep exact."""

import json
import re
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from toolchain.cli import main
from toolchain.data.sources import load_split
from toolchain.graphs.qdq import activation_quantizers, dequantized, quantized_weights
from toolchain.graphs.weights import index_weights
from toolchain.kernels.quant import channel_scales
from toolchain.quantize import Calibration, quantize_model, recalibrate
from toolchain.records import read_verify_report
from toolchain.verify import model_batches

Q = ["--no-progress"]


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    d = tmp_path_factory.mktemp("int8")
    p = {
        k: d / v
        for k, v in dict(
            ckpt="base.pt",
            adapter="adapter.safetensors",
            base="base.onnx",
            fused="fused.onnx",
            base8="base.int8.onnx",
            fused8="fused.int8.onnx",
        ).items()
    }
    assert main(["pretrain", "--out", str(p["ckpt"]), "--epochs", "2", *Q]) == 0
    assert main(["finetune", "--checkpoint", str(p["ckpt"]), "--out", str(p["adapter"]), "--steps", "60", *Q]) == 0
    assert main(["export", "--checkpoint", str(p["ckpt"]), "-o", str(p["base"])]) == 0
    assert main(["fuse", str(p["base"]), str(p["adapter"]), "-o", str(p["fused"])]) == 0
    assert main(["quantize", str(p["base"]), "-o", str(p["base8"]), "--calibration-batches", "64"]) == 0
    assert main(["fuse", str(p["base8"]), str(p["adapter"]), "-o", str(p["fused8"])]) == 0
    p["dir"] = d
    return p


def _inits(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_quantize_writes_the_layout_tensorrt_and_fusion_need(art):
    m = onnx.load(str(art["base8"]))
    chains = quantized_weights(m.graph, index_weights(m.graph))
    convs = [n.input[1] for n in onnx.load(str(art["base"])).graph.node if n.op_type == "Conv"]
    assert sorted(chains) == sorted(convs)  # every Conv kernel, float weight behind Q -> DQ
    base = _inits(art["base"])
    for name, c in chains.items():
        assert np.array_equal(c.weight.values(), base[name])  # the float weight is the base's, bit for bit
        assert np.array_equal(c.scale.values(), channel_scales(base[name], 0))  # our rule is the quantizer's
        assert c.zero_point.values().dtype == np.int8 and not c.zero_point.values().any()
    meta = {p.key: p.value for p in m.metadata_props}
    scheme = json.loads(meta["toolchain.quantization"])
    assert scheme["calibration"]["batches"] == 64 and scheme["calibration"]["split"] == "source"
    assert len(scheme["calibration"]["sha256"]) == 64 and scheme["ops"] == ["Conv"]
    assert meta["toolchain.kind"] == "base" and "toolchain.checkpoint_sha256" in meta  # provenance kept
    head = next(n for n in m.graph.node if n.op_type == "Gemm")
    assert head.input[1] in base  # the head stays float by default


def test_an_excluded_conv_stays_float_and_fusion_treats_it_as_the_fp32_pass_does(art, tmp_path):
    """quantize --exclude @first: the first conv keeps a plain weight and a float input (TensorRT runs it
    in FP16/FP32); fuse writes W + dW into it as into the FP32 model, and requantizes the others."""
    base8, fused8 = tmp_path / "b.int8.onnx", tmp_path / "f.int8.onnx"
    assert (
        main(["quantize", str(art["base"]), "-o", str(base8), "--calibration-batches", "64", "--exclude", "@first"])
        == 0
    )
    m = onnx.load(str(base8))
    first = next(n for n in m.graph.node if n.op_type == "Conv")
    producers = {o: n.op_type for n in m.graph.node for o in n.output}
    assert first.input[1] in _inits(art["base"]) and producers.get(first.input[0]) != "DequantizeLinear"
    chains = quantized_weights(m.graph, index_weights(m.graph))
    convs = [n.input[1] for n in onnx.load(str(art["base"])).graph.node if n.op_type == "Conv"]
    assert sorted(chains) == sorted(convs[1:])
    scheme = json.loads({p.key: p.value for p in m.metadata_props}["toolchain.quantization"])
    assert scheme["excluded"] == [first.name]
    assert main(["fuse", str(base8), str(art["adapter"]), "-o", str(fused8)]) == 0
    fused, mine, full8 = _inits(art["fused"]), _inits(fused8), _inits(art["fused8"])
    assert all(np.array_equal(mine[w], fused[w]) for w in convs)  # W + dW, the same bits as the FP32 fuse
    assert all(np.array_equal(mine[f"{w}_scale"], full8[f"{w}_scale"]) for w in convs[1:])
    assert f"{convs[0]}_scale" not in mine


def test_exclude_first_n_is_the_first_n_convs_by_name(art, tmp_path):
    """--exclude @first:2 leaves the first two convs float: the same bytes as naming them, and one more
    float conv than @first."""
    convs = [n.name for n in onnx.load(str(art["base"])).graph.node if n.op_type == "Conv"]
    outs = {}
    for label, spec in [("n", "@first:2"), ("names", ",".join(convs[:2])), ("both", f"@first,{convs[1]}")]:
        outs[label] = tmp_path / f"{label}.onnx"
        argv = ["quantize", str(art["base"]), "-o", str(outs[label]), "--calibration-batches", "64", "--exclude", spec]
        assert main(argv) == 0
    assert outs["n"].read_bytes() == outs["names"].read_bytes() == outs["both"].read_bytes()
    m = onnx.load(str(outs["n"]))
    scheme = json.loads({p.key: p.value for p in m.metadata_props}["toolchain.quantization"])
    assert scheme["excluded"] == convs[:2]
    chains = quantized_weights(m.graph, index_weights(m.graph))
    weights = [n.input[1] for n in onnx.load(str(art["base"])).graph.node if n.op_type == "Conv"]
    assert sorted(chains) == sorted(weights[2:])


def test_fuse_into_qdq_is_exact_and_requantizes_only_the_changed_scales(art):
    fused, fused8, base8 = _inits(art["fused"]), _inits(art["fused8"]), _inits(art["base8"])
    m = onnx.load(str(art["fused8"]))
    chains = quantized_weights(m.graph, index_weights(m.graph))
    changed = json.loads({p.key: p.value for p in m.metadata_props}["toolchain.fused_weights"])
    assert changed and set(changed) <= set(chains)
    for name in changed:
        assert np.array_equal(fused8[name], fused[name])  # W + ΔW exactly as the FP32 fuse
        assert np.array_equal(fused8[f"{name}_scale"], channel_scales(fused[name], 0))
        assert not np.array_equal(fused8[f"{name}_scale"], base8[f"{name}_scale"])
    moved = {k for k in base8 if not np.array_equal(base8[k], fused8[k])}
    assert moved == set(changed) | {f"{n}_scale" for n in changed}  # activation scales and the rest stay
    base_nodes = [(n.op_type, n.name, list(n.input)) for n in onnx.load(str(art["base8"])).graph.node]
    assert [(n.op_type, n.name, list(n.input)) for n in m.graph.node] == base_nodes


def test_fused_scales_equal_requantizing_the_fused_model_from_scratch(art):
    fused8 = _inits(art["fused8"])
    given = onnx.load(str(art["fused"]))
    scratch = quantize_model(given, Calibration("watch", batches=64))
    for name, c in quantized_weights(scratch.graph, index_weights(scratch.graph)).items():
        assert np.array_equal(c.scale.values(), fused8[f"{name}_scale"]), name
    # the caller's model is left as given (quantize_static moves its weights to external data in a
    # folder it then deletes), so it can be quantized again
    assert given.SerializeToString() == onnx.load(str(art["fused"])).SerializeToString()
    again = quantize_model(given, Calibration("watch", batches=64))
    assert again.SerializeToString() == scratch.SerializeToString()


def test_fuse_into_qdq_is_torch_free_and_deterministic(art, tmp_path):
    code = (
        "import sys; from toolchain.cli import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    outs = []
    for i in range(2):
        out = tmp_path / f"f{i}.onnx"
        subprocess.run(
            [sys.executable, "-c", code, "fuse", str(art["base8"]), str(art["adapter"]), "-o", str(out)], check=True
        )
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == art["fused8"].read_bytes()


def test_recalibration_reproduces_the_quantizers_own_activation_scales(art):
    m = onnx.load(str(art["base8"]))
    before = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    recalibrate(m, Calibration("watch", split="source", batches=64))  # the calibration quantize used
    after = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    activation = [k for k in before if k.endswith("_scale") and before[k].ndim == 0]
    assert activation and all(np.array_equal(before[k], after[k]) and after[k].shape == () for k in activation)
    other = quantize_model(onnx.load(str(art["base"])), Calibration("watch", split="target-adapt", batches=64))
    recalibrate(m, Calibration("watch", split="target-adapt", batches=64))
    theirs = {t.name: numpy_helper.to_array(t) for t in other.graph.initializer}
    mine = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    assert all(np.array_equal(mine[k], theirs[k]) for k in activation)
    assert any(not np.array_equal(mine[k], before[k]) for k in activation)


def test_dequantized_graph_computes_the_float_model(art):
    import onnxruntime as ort

    from toolchain.data.sources import load_data

    x = load_data("watch").X[:1]
    runs = []
    for model in (onnx.load(str(art["base"])), dequantized(onnx.load(str(art["base8"])))):
        s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        runs.append(s.run(None, {s.get_inputs()[0].name: x})[0])
    assert np.array_equal(runs[0], runs[1])


def test_verify_int8_reports_agreement_and_f1(art, tmp_path, capsys):
    out = tmp_path / "v"
    rc = main(["verify", str(art["fused8"]), "--reference", str(art["fused"]), "--split", "target-test",
               "--min-agreement", "0.9", "--out-dir", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    report = json.loads((out / "verify.json").read_text())
    ag = report["agreement"]
    assert rc == 0 and report["passed"] and ag["top1_agreement"] >= 0.9
    assert ag["windows"] == len(load_split("watch", "target-test")), "every labelled window, the last batch too"
    assert report["comparisons"]["model"]["precision"] == "int8"
    assert 0 < report["comparisons"]["model"]["outputs"]["logits"]["max_abs"]  # INT8 differs, and says how much
    assert "top-1 agreement" in text and "macro-F1" in text
    from toolchain.verify import predictions

    x = np.ascontiguousarray(load_split("watch", "target-test").X, dtype=np.float32)
    flips = np.flatnonzero(predictions(str(art["fused8"]), x) != predictions(str(art["fused"]), x))
    assert ag["flipped"] == len(flips) == round((1 - ag["top1_agreement"]) * ag["windows"])
    assert sorted(ag["flipped_windows"]) == flips.tolist()[:50] and f"{len(flips)} of {len(x)} windows flip" in text
    lo, hi = ag["interval"]
    assert lo <= ag["top1_agreement"] <= hi


def _matmul_model(batch):
    w = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, 5])],
        [numpy_helper.from_array(w, "w")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, w


@pytest.mark.parametrize("batch", [7, 1, "N"])  # fixed batch sizes, and a dynamic one (run 64 at a time)
@pytest.mark.parametrize("rows", [1, 6, 7, 64, 65, 130])
def test_predictions_cover_every_row_at_any_batch_size(tmp_path, batch, rows):
    from toolchain.verify import predictions

    model, w = _matmul_model(batch)
    onnx.save(model, str(tmp_path / "m.onnx"))
    x = np.random.default_rng(rows).standard_normal((rows, 3)).astype(np.float32)
    assert np.array_equal(predictions(str(tmp_path / "m.onnx"), x), (x @ w).argmax(axis=1))


def test_verify_int8_fails_below_min_agreement(art, tmp_path, capsys):
    m = onnx.load(str(art["fused8"]))
    for t in m.graph.initializer:  # saturate every activation: the model still runs, but answers differently
        if t.name.endswith("_scale") and not t.dims:
            t.CopyFrom(numpy_helper.from_array(np.asarray(1e-6, np.float32), t.name))
    bad = tmp_path / "bad.int8.onnx"
    onnx.save(m, str(bad))
    out = tmp_path / "v"
    assert main(["verify", str(bad), "--reference", str(art["fused"]), "--out-dir", str(out)]) == 1
    report = json.loads((out / "verify.json").read_text())
    assert not report["passed"] and report["agreement"]["top1_agreement"] < 0.99
    clipped = report["agreement"]["saturation"]  # every activation quantizer, on (nearly) every window
    assert len(clipped) == len(activation_quantizers(m.graph, index_weights(m.graph)))
    assert clipped[0]["windows_clipped"] == 1.0 and clipped[0]["max_over_range"] > 1e3
    text = capsys.readouterr().out
    assert "remedy:" in text and "--recalibrate" in text


def test_verify_int8_saturation_is_measured_in_the_deployed_model(art, tmp_path, capsys):
    """verify.json's saturation is the INT8 model's own: each entry's share equals the share of windows
    whose pre-quantization tensor, computed by the INT8 model, leaves [-128, 127] * scale; it reads back."""
    out = tmp_path / "v"
    main(["verify", str(art["fused8"]), "--reference", str(art["fused"]), "--split", "target-test",
          "--out-dir", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    entries = read_verify_report(out / "verify.json").agreement.saturation
    assert ("activations clipped" in text) == bool(entries) and "INT8 model:" in text
    m = onnx.load(str(art["fused8"]))
    weights = index_weights(m.graph)
    quantizers = activation_quantizers(m.graph, weights)
    names = list(dict.fromkeys(q.input[0] for q in quantizers))
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    x = np.ascontiguousarray(load_split("watch", "target-test").X, dtype=np.float32)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # Q/DQ as written, not fused
    session = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    rows = [session.run(names, {inp.name: chunk}) for chunk, _ in model_batches(x, inp.shape[0])]
    scales = {q.input[0]: float(weights[q.input[1]].values()) for q in quantizers}
    expected = {}
    for j, n in enumerate(names):
        v = np.concatenate([r[j] for r in rows])[: len(x)].reshape(len(x), -1)
        share = float(np.mean((v.max(1) > 127 * scales[n]) | (v.min(1) < -128 * scales[n])))
        if share:
            expected[n] = share
    assert {e.tensor: e.windows_clipped for e in entries} == pytest.approx(expected)
    coarse = {}  # the largest value over every window as a multiple of the range, where at most half of it
    for j, n in enumerate(names):
        v = np.concatenate([r[j] for r in rows])[: len(x)].astype(np.float64) / scales[n]
        used = max(v.max() / 127, v.min() / -128)
        if used <= 0.5:
            coarse[n] = used
    got = read_verify_report(out / "verify.json").agreement.coarse
    assert {e.tensor: e.max_over_range for e in got} == pytest.approx(coarse)
    assert [e.max_over_range for e in got] == sorted(e.max_over_range for e in got)


def test_verify_int8_names_an_input_calibrated_on_larger_values(art, tmp_path, capsys):
    """The model input's scale made 8x coarser (as spikes in the calibration data make it): verify
    names that input among the activations that reach at most half their range (on the scale the
    quantizer set it does not), and where the gate fails the remedy names --exclude @first."""
    m = onnx.load(str(art["fused8"]))
    weights = index_weights(m.graph)
    first = next(n for n in m.graph.node if n.op_type == "Conv")
    dq = next(n for n in m.graph.node if n.output[0] == first.input[0])
    q = next(n for n in m.graph.node if n.output[0] == dq.input[0])
    scale = weights[q.input[1]]
    scale.set_values(scale.values() * 8)
    coarse_model = tmp_path / "coarse.int8.onnx"
    onnx.save(m, str(coarse_model))
    runs = {}
    for name, model in (("as quantized", art["fused8"]), ("coarse", coarse_model)):
        out = tmp_path / name
        rc = main(["verify", str(model), "--reference", str(art["fused"]), "--split", "target-test",
                   "--min-agreement", "1.0", "--out-dir", str(out)])  # fmt: skip
        text = capsys.readouterr().out
        ag = read_verify_report(out / "verify.json").agreement
        runs[name] = ({e.tensor: e.max_over_range for e in ag.coarse}, text, rc)
    plain, text, rc = runs["as quantized"][0], runs["coarse"][1], runs["coarse"][2]
    coarse = runs["coarse"][0]
    assert rc == 1 and q.input[0] in coarse and q.input[0] not in plain  # on the base's scale: more than half
    assert q.input[0] in text and "1 activation reaches at most 50% of its INT8 range" in text
    assert "--exclude @first" in text and "remedy:" in text


def test_verify_fp32_is_unchanged(art, tmp_path):
    out = tmp_path / "v"
    assert main(["verify", str(art["fused"]), "--reference", str(art["fused"]), "--out-dir", str(out)]) == 0
    report = json.loads((out / "verify.json").read_text())
    assert report["agreement"] is None and report["comparisons"]["model"]["precision"] == "fp32"


def _first_chain(m):
    return next(iter(quantized_weights(m.graph, index_weights(m.graph)).values()))


def _set(m, name, value):
    t = next(t for t in m.graph.initializer if t.name == name)
    t.CopyFrom(numpy_helper.from_array(np.asarray(value), name))


def _scale(value):
    def mutate(m):
        c = _first_chain(m)
        s = c.scale.values()
        s[0] = value
        _set(m, c.scale.name, s.astype(np.float32))

    return mutate


def _zp(dtype, value=0):
    def mutate(m):
        c = _first_chain(m)
        _set(m, c.zero_point.name, np.full(c.zero_point.values().shape, value, dtype))

    return mutate


def _attr_axis(axis):
    def mutate(m):
        c = _first_chain(m)
        for node in (c.quantize, c.dequantize):
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("axis", axis))

    return mutate


def _per_tensor(m):
    c = _first_chain(m)
    _set(m, c.scale.name, np.float32(c.scale.values().max()))
    _set(m, c.zero_point.name, np.int8(0))


def _missing_scale(m):
    c = _first_chain(m)
    m.graph.initializer.remove(next(t for t in m.graph.initializer if t.name == c.scale.name))


def _shared_dq(m):
    c = _first_chain(m)
    conv = c.readers[0].node
    twin = onnx.NodeProto()
    twin.CopyFrom(conv)
    twin.name, twin.output[0] = conv.name + "_twin", conv.output[0] + "_twin"
    m.graph.node.append(twin)
    m.graph.output.append(onnx.helper.make_empty_tensor_value_info(twin.output[0]))


def _integer_weights(m):
    """Another quantizer's layout: the weight stored as INT8 feeding DQ, the float weight gone."""
    c = _first_chain(m)
    w = c.weight.values()
    q = np.clip(np.rint(w / c.scale.values().reshape(-1, *[1] * (w.ndim - 1))), -127, 127).astype(np.int8)
    _set(m, c.weight.name, q)
    c.dequantize.input[0] = c.weight.name
    m.graph.node.remove(c.quantize)


def _integer_wrong_shape(m):
    _integer_weights(m)
    c = next(n for n in m.graph.node if n.op_type == "DequantizeLinear")
    w = next(t for t in m.graph.initializer if t.name == c.input[0])
    _set(m, w.name, numpy_helper.to_array(w)[:-1])


HOSTILE = [
    (_scale(0.0), "scales must be finite, positive"),
    (_scale(-0.5), "scales must be finite, positive"),
    (_scale(np.nan), "scales must be finite, positive"),
    (_scale(np.inf), "scales must be finite, positive"),
    (_zp(np.int8, 3), "zero points must be 0"),
    (_zp(np.uint8), "weights must be INT8"),
    (_attr_axis(7), "axis is out of range"),
    (_attr_axis(1), "one value per channel of the axis"),
    (_per_tensor, "per-tensor weight scales"),
    (_missing_scale, "scale or zero point is not a constant"),
    (_shared_dq, "shared by several nodes"),
    (_integer_weights, "stores its quantized weights as INT8 initializers"),
    (_integer_wrong_shape, "shape does not fit its per-channel scales"),
]


@pytest.mark.parametrize("mutate, message", HOSTILE, ids=[m for _, m in HOSTILE])
def test_hostile_qdq_is_refused_in_one_line_and_writes_nothing(art, tmp_path, capsys, mutate, message):
    m = onnx.load(str(art["base8"]))
    mutate(m)
    bad = tmp_path / "bad.int8.onnx"
    onnx.save(m, str(bad))
    before = bad.read_bytes()
    out = tmp_path / "out.onnx"
    assert main(["fuse", str(bad), str(art["adapter"]), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not out.exists() and bad.read_bytes() == before


SCALE, ZERO_POINT = 1, 2  # input positions of QuantizeLinear / DequantizeLinear


def _activation_input(position, value, dtype):
    """The first activation quantizer's scale or zero point set to ``value`` (its DQ reads the same
    initializer)."""

    def mutate(m):
        q = activation_quantizers(m.graph, index_weights(m.graph))[0]
        _set(m, q.input[position], np.asarray(value, dtype))

    return mutate


def _activation_scale(value, dtype=np.float32):
    return _activation_input(SCALE, value, dtype)


def _activation_zero_point(value, dtype=np.int8):
    return _activation_input(ZERO_POINT, value, dtype)


def _activation_scale_gone(m):
    q = activation_quantizers(m.graph, index_weights(m.graph))[0]
    m.graph.initializer.remove(next(t for t in m.graph.initializer if t.name == q.input[SCALE]))


def _activation_zero_point_gone(m):
    zp = activation_quantizers(m.graph, index_weights(m.graph))[0].input[ZERO_POINT]
    for n in m.graph.node:
        if n.input and n.op_type in ("QuantizeLinear", "DequantizeLinear") and zp in n.input[ZERO_POINT:]:
            del n.input[ZERO_POINT:]


ACTIVATION_HOSTILE = [
    (_activation_scale(0.0), "activation scales must be finite, positive float32"),
    (_activation_scale(-0.02), "activation scales must be finite, positive float32"),
    (_activation_scale(np.nan), "activation scales must be finite, positive float32"),
    (_activation_scale(np.inf), "activation scales must be finite, positive float32"),
    (_activation_scale(0.02, np.float64), "activation scales must be finite, positive float32"),
    (_activation_scale([0.02, 0.02]), "needs one constant per-tensor scale"),
    (_activation_scale_gone, "needs one constant per-tensor scale|ONNX model is invalid"),  # loaders check first
    (_activation_zero_point(3), "activations must be symmetric INT8"),
    (_activation_zero_point(128, np.uint8), "activations must be symmetric INT8"),
    (_activation_zero_point_gone, "activations must be symmetric INT8|ONNX model is invalid"),
]
ACTIVATION_COMMANDS = {
    "fuse": ["fuse", "{bad}", "{adapter}", "-o", "{out}"],
    "recalibrate": ["fuse", "{bad}", "{adapter}", "-o", "{out}", "--recalibrate", "watch"],
    "verify": ["verify", "{bad}", "--reference", "{fused}", "--data", "watch", "--out-dir", "{outdir}"],
    "build-check": ["build", "{bad}", "--check"],
}


@pytest.mark.parametrize("command", list(ACTIVATION_COMMANDS))
@pytest.mark.parametrize("mutate, message", ACTIVATION_HOSTILE, ids=[f"{i}" for i in range(len(ACTIVATION_HOSTILE))])
def test_broken_activation_scales_are_refused_by_every_command(art, tmp_path, capsys, mutate, message, command):
    """A zero, negative, NaN, Inf, float64, vector or missing activation scale: one line, exit 2, before
    any work, nothing written (the scale is kept by fuse, so a bad one would ship)."""
    base = art["fused8"] if command == "verify" else art["base8"]
    m = onnx.load(str(base))
    mutate(m)
    bad = tmp_path / "bad.int8.onnx"
    onnx.save(m, str(bad))
    before = bad.read_bytes()
    subs = {"bad": str(bad), "adapter": str(art["adapter"]), "fused": str(art["fused"])}
    subs.update(out=str(tmp_path / "out.onnx"), outdir=str(tmp_path / "report"))
    argv = [a.format(**subs) if "{" in a else a for a in ACTIVATION_COMMANDS[command]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err) and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.int8.onnx"] and bad.read_bytes() == before


@pytest.mark.parametrize(
    "argv, message",
    [
        (["quantize", "{base8}", "-o", "{out}"], "already quantized"),
        (["quantize", "{base}", "-o", "{out}", "--ops", "Relu"], "--ops takes"),
        (["quantize", "{base}", "-o", "{out}", "--calibration-batches", "0"], "--calibration-batches must be"),
        (["quantize", "{base}", "-o", "{out}", "--data", "digits"], "does not fit the model input"),
        (["quantize", "{base}", "-o", "{base}"], "must not be one of the inputs"),
        (["quantize", "{base}", "-o", "{out}", "--exclude", "nope"], "--exclude names nodes of --ops"),
        (["quantize", "{base}", "-o", "{out}", "--exclude", "{convs}"], "--exclude leaves nothing to quantize"),
        (["quantize", "{base}", "-o", "{out}", "--exclude", "@first:999"], "--exclude leaves nothing to quantize"),
        (["quantize", "{base}", "-o", "{out}", "--exclude", "@first:0"], "@first:N takes a whole number"),
        (["quantize", "{base}", "-o", "{out}", "--exclude", "@first:-2"], "@first:N takes a whole number"),
        (["quantize", "{base}", "-o", "{out}", "--exclude", "@first:two"], "@first:N takes a whole number"),
        (["quantize", "{base}", "-o", "{out}", "--exclude", "@first:\u0663"], "@first:N takes a whole number"),
        (["quantize", "{base}", "-o", "{out}", "--exclude", "@first:"], "@first:N takes a whole number"),
        (["quantize", "{base}", "-o", "{out}", "--exclude", "@firsts"], "--exclude names nodes of --ops"),
        (["fuse", "{base}", "{adapter}", "-o", "{out}", "--recalibrate", "watch"], "quantized activations"),
        (["fuse", "{base8}", "{adapter}", "-o", "{out}", "--recalibrate-split", "all"], "need --recalibrate"),
        (["verify", "{fused8}", "--reference", "{fused}", "--data", "none"], "labelled real data"),
        (["verify", "{fused8}", "--reference", "{fused}", "--min-agreement", "2"], "--min-agreement must be"),
    ],
)
def test_int8_refusals_leave_no_output(art, tmp_path, capsys, argv, message):
    subs = {k: str(art[k]) for k in ("base", "base8", "fused", "fused8", "adapter")}
    subs["out"] = str(tmp_path / "o.onnx")
    subs["convs"] = ",".join(n.name for n in onnx.load(subs["base"]).graph.node if n.op_type == "Conv")
    before = {k: art[k].read_bytes() for k in ("base", "base8")}
    assert main([a.format(**subs) if a.startswith("{") else a for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o.onnx").exists()
    assert all(art[k].read_bytes() == v for k, v in before.items())
