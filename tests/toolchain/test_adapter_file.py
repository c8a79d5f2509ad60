import json
import struct

import numpy as np
import pytest
import torch

from tests.geometries import make_conv
from toolchain.adapters.adapter_file import load_adapter, save_adapter
from toolchain.core.errors import ToolchainError
from toolchain.models.backbones import CNN1D
from toolchain.peft.inject import AdaptConfig, apply_adapter, extract_adapter, inject


def _adapter(tmp_path, train=()):
    torch.manual_seed(0)
    model = CNN1D(num_classes=4).eval()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = AdaptConfig(rank=3, train=train)
    inject(model, cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    adapter = extract_adapter(model, base_state, cfg, {"rank": 3})
    path = tmp_path / "a.safetensors"
    save_adapter(adapter, path)
    return model, base_state, adapter, path


def test_roundtrip_is_bit_exact(tmp_path):
    _, _, adapter, path = _adapter(tmp_path, train=("head",))
    back = load_adapter(path)
    assert back.layers == adapter.layers and back.extras == adapter.extras and back.info == {"rank": 3}
    assert set(back.tensors) == set(adapter.tensors)
    for k, v in adapter.tensors.items():
        assert np.array_equal(back.tensors[k], v)
    assert {e.param for e in back.extras} == {"head.weight", "head.bias"}


def test_apply_adapter_reproduces_the_trained_model(tmp_path):
    model, base_state, _, path = _adapter(tmp_path, train=("head", "bn"))
    fresh = CNN1D(num_classes=4)
    fresh.load_state_dict(base_state)
    apply_adapter(fresh, load_adapter(path))
    x = torch.randn(2, 6, 128)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_apply_adapter_refuses_wrong_base(tmp_path):
    _, _, _, path = _adapter(tmp_path)
    torch.manual_seed(123)
    with pytest.raises(ToolchainError, match="base weight differs"):
        apply_adapter(CNN1D(num_classes=4), load_adapter(path))


def _rewrite_header(path, edit):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _set_first_tensor(header, **kw):
    name = next(k for k in header if k != "__metadata__")
    header[name].update(kw)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:5]), "shorter than its 8-byte header"),
        (lambda p: p.write_bytes(p.read_bytes()[:200]), "header length is larger than the file"),
        (lambda p: p.write_bytes(p.read_bytes()[:-16]), "bytes no tensor owns, or is too short"),
        (
            lambda p: _rewrite_header(p, lambda h: _set_first_tensor(h, shape=[100_000, 100_000, 10])),
            "does not match its shape",
        ),
        (lambda p: _rewrite_header(p, lambda h: _set_first_tensor(h, shape=[-4])), "list of at most 8 integers"),
        (lambda p: _rewrite_header(p, lambda h: _set_first_tensor(h, dtype="F64")), "must be float32"),
        (
            lambda p: _rewrite_header(p, lambda h: h["__metadata__"].update(layers="{not json")),
            "'layers' is not valid JSON",
        ),
        (lambda p: _rewrite_header(p, lambda h: h["__metadata__"].update(format="other")), "not a toolchain adapter"),
        (
            lambda p: _rewrite_header(p, lambda h: h["__metadata__"].update(format_version="99")),
            "unsupported adapter format version",
        ),
        (
            lambda p: _rewrite_header(p, lambda h: h.pop(next(k for k in h if k.endswith("delta_g1")))),
            "overlaps another tensor or leaves a gap",
        ),
    ],
)
def test_corrupt_adapters_are_refused(tmp_path, mutate, message):
    _, _, _, path = _adapter(tmp_path)
    mutate(path)
    with pytest.raises(ToolchainError, match=message):
        load_adapter(path)


def test_non_finite_values_are_refused(tmp_path):
    _, _, adapter, _ = _adapter(tmp_path)
    name = next(k for k in adapter.tensors if k.endswith("delta_g1"))
    adapter.tensors[name] = adapter.tensors[name].copy()
    adapter.tensors[name][0, 0] = np.nan
    with pytest.raises(ToolchainError, match="NaN or Inf"):
        save_adapter(adapter, tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()


def test_conv_geometry_roundtrips_for_2d(tmp_path):
    conv, _, _ = make_conv("2d-stride-dil")
    from toolchain.peft.lora_edge import conv_geometry

    g = conv_geometry(conv)
    assert g.weight_shape == tuple(conv.weight.shape)
