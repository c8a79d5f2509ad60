"""finetune --int8-base: the adapter trains with each quantized conv input fake-quantized at the INT8
base's own scales; the base must be this checkpoint's quantized export."""

import hashlib
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from toolchain.adapters.adapter_file import load_adapter
from toolchain.cli import main
from toolchain.graphs.qdq import activation_quantizers, kernel_input_scales, quantized_weights
from toolchain.graphs.weights import index_weights
from toolchain.models.registry import load_checkpoint
from toolchain.qat import quantized_inputs, read_int8_base

Q = ["--no-progress"]


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    d = tmp_path_factory.mktemp("qat")
    p = {k: d / v for k, v in dict(ckpt="base.pt", base="base.onnx", base8="base.int8.onnx").items()}
    assert main(["pretrain", "--out", str(p["ckpt"]), "--epochs", "2", *Q]) == 0
    assert main(["export", "--checkpoint", str(p["ckpt"]), "-o", str(p["base"])]) == 0
    assert main(["quantize", str(p["base"]), "-o", str(p["base8"]), "--calibration-batches", "32"]) == 0
    p["dir"] = d
    return p


def test_kernel_input_scales_are_each_quantized_convs_input_scale(art):
    m = onnx.load(str(art["base8"]))
    weights = index_weights(m.graph)
    scales = kernel_input_scales(m.graph, weights)
    producers = {o: n for n in m.graph.node for o in n.output}
    expected = {}
    for name, chain in quantized_weights(m.graph, weights).items():
        dq = producers[chain.readers[0].node.input[0]]
        expected[name] = float(numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == dq.input[1])))
    assert scales == expected and len(scales) == 3  # cnn1d: three convs, inputs and weights quantized
    assert sorted(scales.values()) == sorted(
        {float(weights[q.input[1]].values()) for q in activation_quantizers(m.graph, weights)}
    )


def test_inputs_are_on_the_int8_grid_inside_the_block_and_exact_outside(art):
    model, _ = load_checkpoint(str(art["ckpt"]), None)
    model.eval()
    base = read_int8_base(art["base8"], model)
    assert set(base.scales) == {"net.features.0.0", "net.features.2.0", "net.features.4.0"}
    x = torch.randn(8, 6, 128) * 4
    before = model(x).detach()
    seen = {}
    modules = dict(model.named_modules())
    with quantized_inputs(model, base.scales):
        hooks = [
            modules[p].register_forward_pre_hook(lambda m, a, p=p: seen.__setitem__(p, a[0].detach()))
            for p in base.scales
        ]
        inside = model(x).detach()
        for h in hooks:
            h.remove()
    for path, s in base.scales.items():
        k = seen[path].numpy() / s
        assert np.allclose(k, np.rint(k), atol=1e-3) and k.min() >= -128.001 and k.max() <= 127.001
    assert not torch.equal(inside, before)  # the quantization is real
    assert torch.equal(model(x).detach(), before)  # and gone after the block


def test_finetune_for_the_int8_base_records_it_and_fuses_into_it(art, tmp_path, capsys):
    plain, qat = tmp_path / "plain.safetensors", tmp_path / "qat.safetensors"
    common = ["finetune", "--checkpoint", str(art["ckpt"]), "--steps", "30", *Q]
    assert main([*common, "--out", str(plain)]) == 0
    assert main([*common, "--out", str(qat), "--int8-base", str(art["base8"])]) == 0
    assert "trained for the INT8 base" in capsys.readouterr().out
    info = load_adapter(qat).info["int8_base"]
    assert info == {"sha256": hashlib.sha256(art["base8"].read_bytes()).hexdigest(), "quantized_inputs": 3}
    assert "int8_base" not in load_adapter(plain).info
    a, b = load_adapter(plain), load_adapter(qat)
    assert any(not np.array_equal(a.tensors[k], b.tensors[k]) for k in a.tensors)  # the scales changed training
    out = tmp_path / "fused.int8.onnx"
    assert main(["fuse", str(art["base8"]), str(qat), "-o", str(out)]) == 0
    json.loads((tmp_path / "qat.metrics.json").read_text())  # metrics written as for any finetune


def _edit_weight(m):
    t = next(t for t in m.graph.initializer if t.name == "net.features.2.0.weight")
    w = numpy_helper.to_array(t).copy()
    w.flat[0] += 1e-3
    t.CopyFrom(numpy_helper.from_array(w, t.name))


def _nan_activation_scale(m):
    q = activation_quantizers(m.graph, index_weights(m.graph))[0]
    t = next(t for t in m.graph.initializer if t.name == q.input[1])
    t.CopyFrom(numpy_helper.from_array(np.float32(np.nan), t.name))


REFUSED = [
    ("fp32", None, "takes an explicitly quantized (QDQ) model"),
    ("edited", _edit_weight, "was not quantized from this checkpoint"),
    ("nan-scale", _nan_activation_scale, "activation scales must be finite, positive float32"),
]


@pytest.mark.parametrize("case, mutate, message", REFUSED, ids=[c for c, _, _ in REFUSED])
def test_int8_base_refusals_write_nothing(art, tmp_path, capsys, case, mutate, message):
    given = art["base"] if mutate is None else tmp_path / "given.int8.onnx"
    if mutate is not None:
        m = onnx.load(str(art["base8"]))
        mutate(m)
        onnx.save(m, str(given))
    before = given.read_bytes()
    out = tmp_path / "adapter.safetensors"
    argv = ["finetune", "--checkpoint", str(art["ckpt"]), "--out", str(out), "--steps", "5", "--int8-base", str(given)]
    assert main([*argv, *Q]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "adapter.metrics.json").exists() and given.read_bytes() == before
