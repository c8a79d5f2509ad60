"""Property-based tests (hypothesis) over random conv geometries, ranks and values."""

import numpy as np
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.graphs.onnx_builders import build_pair
from toolchain.adapters.adapter_file import ConvGeometry, load_adapter, save_adapter
from toolchain.graphs.fuse import fuse_model

PROV = {
    "toolchain.fused": "true",
    "toolchain.base_sha256": "0" * 64,
    "toolchain.adapter_sha256": "1" * 64,
    "toolchain.version": "t",
}


@st.composite
def conv_cases(draw):
    dims = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2, 3]))
    cin = groups * draw(st.integers(1, 4))
    depthwise = draw(st.booleans())
    if depthwise:
        groups, cin = cin, cin
    cout = groups * draw(st.integers(1, 4))
    k = tuple(draw(st.integers(1, 4)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    pad = tuple(draw(st.integers(0, 2)) for _ in range(dims))
    geom = ConvGeometry(
        "conv1d" if dims == 1 else "conv2d", cin, cout, k, stride, pad, dil, groups, "zeros", draw(st.booleans())
    )
    rank = draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0]))
    return geom, rank, seed, scale


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases())
def test_fused_matches_unfused(case):
    geom, rank, seed, scale = case
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(geom.weight_shape).astype(np.float32)
    bias = rng.standard_normal(geom.out_channels).astype(np.float32) if geom.bias else None
    base, unfused, adapter = build_pair(geom, w, bias, rank, scale, seed)
    fused = fuse_model(base, adapter, PROV)
    x = rng.standard_normal((1, geom.in_channels, *([16] * len(geom.kernel_size)))).astype(np.float32)
    want, got = _run(unfused, x), _run(fused, x)
    tol = 1e-4 * max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=tol)


@settings(max_examples=40, deadline=None)
@given(conv_cases(), st.sampled_from([np.float32(0), np.float32(-0.0), np.float32(1e-38), np.float32(3e38)]))
def test_adapter_roundtrips_bit_exactly(tmp_path_factory, case, special):
    geom, rank, seed, scale = case
    w = np.random.default_rng(seed).standard_normal(geom.weight_shape).astype(np.float32)
    _, _, adapter = build_pair(geom, w, None, rank, scale, seed)
    adapter.tensors["conv.delta_g1"].flat[0] = special
    path = tmp_path_factory.mktemp("rt") / "a.safetensors"
    save_adapter(adapter, path)
    back = load_adapter(path)
    assert back.layers == adapter.layers
    for k, v in adapter.tensors.items():
        assert back.tensors[k].tobytes() == v.tobytes()
