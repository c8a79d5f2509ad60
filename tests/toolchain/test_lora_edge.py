import copy

import numpy as np
import pytest
import torch
from torch import nn

from tests.geometries import GEOMETRIES, make_conv
from toolchain.kernels import delta_weight, suffix_kernel
from toolchain.peft.lora_edge import LoRAEdgeConv

IDS = list(GEOMETRIES)


def _wrapped(geom_id: str, nonzero: bool = True) -> tuple[nn.Module, LoRAEdgeConv, torch.Tensor]:
    conv, x, rank = make_conv(geom_id)
    base = copy.deepcopy(conv)
    layer = LoRAEdgeConv.from_pretrained(conv, rank)
    if nonzero:
        with torch.no_grad():
            layer.delta_g1.copy_(torch.randn_like(layer.delta_g1) * 0.3)
    return base, layer, x


@pytest.mark.parametrize("geom_id", IDS)
def test_delta_weight_equals_reference(geom_id):
    _, layer, _ = _wrapped(geom_id)
    cores = [c.numpy() for c in layer.suffix_cores()]
    ref = delta_weight(layer.delta_g1.detach().numpy(), suffix_kernel(cores), layer.scaling)
    got = layer.delta_weight().detach().numpy()
    assert got.shape == tuple(layer.base.weight.shape)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("geom_id", IDS)
def test_merged_conv_equals_base_plus_aux_path(geom_id):
    _, layer, x = _wrapped(geom_id)
    unmerged = layer(x)
    assert not torch.allclose(unmerged, layer.base(x)), "a non-zero ΔG1 must change the output"
    layer.merge()
    merged = layer(x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("geom_id", IDS)
def test_zero_delta_is_exactly_the_base(geom_id):
    base, layer, x = _wrapped(geom_id, nonzero=False)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("geom_id", IDS)
def test_only_delta_g1_gets_gradients(geom_id):
    _, layer, x = _wrapped(geom_id)
    layer(x).square().sum().backward()
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"delta_g1"}
    assert layer.delta_g1.grad is not None and torch.count_nonzero(layer.delta_g1.grad) > 0
    assert layer.base.weight.grad is None
    assert all(not c.requires_grad for c in layer.suffix_cores())


def test_scaling_scales_delta():
    _, layer, _ = _wrapped("1d-plain")
    d1 = layer.delta_weight().detach().clone()
    layer.scaling = 2.0
    torch.testing.assert_close(layer.delta_weight(), 2 * d1)
