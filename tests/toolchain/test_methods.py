"""Every PEFT method on a tiny model: gradients, exact start, merge, fused ONNX parity, profiling."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from tests.geometries import GEOMETRIES, make_conv
from tests.graphs.helpers import export_proto, run
from toolchain.adapters.methods import fused_weight
from toolchain.core.errors import ToolchainError
from toolchain.graphs.fuse import fuse_model
from toolchain.kernels import dora_weight, lora_delta
from toolchain.peft.galore import GaLoreAdam
from toolchain.peft.inject import METHODS, AdaptConfig, adapter_layers, apply_adapter, extract_adapter, inject
from toolchain.peft.lora import LoRAConv
from toolchain.profile import activation_bytes, count_flops, profile_step
from toolchain.workflows import make_optimizer

PROV = {
    "toolchain.fused": "true",
    "toolchain.base_sha256": "0" * 64,
    "toolchain.adapter_sha256": "1" * 64,
    "toolchain.version": "t",
}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv1d(6, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU()),
            nn.Sequential(nn.Conv1d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm1d(8), nn.ReLU()),
            nn.Sequential(nn.Conv1d(8, 12, 1), nn.BatchNorm1d(12), nn.ReLU()),
        )
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        return self.head(self.features(x).mean(2))


def _tiny(seed: int = 0, cls: type[nn.Module] = Tiny) -> nn.Module:
    """``cls`` with seeded weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    m = cls().eval()
    with torch.no_grad():
        for bn in [x for x in m.modules() if isinstance(x, nn.BatchNorm1d | nn.BatchNorm2d)]:
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2)
    return m


EXPECTED_TRAINABLE = {
    "lora-edge": lambda n: n.endswith("delta_g1"),
    "lora": lambda n: n.endswith(("lora_A", "lora_B")),
    "rslora": lambda n: n.endswith(("lora_A", "lora_B")),
    "dora": lambda n: n.endswith(("lora_A", "lora_B", "magnitude")),
    "adapter": lambda n: ".down." in n or ".up." in n,
    "full": lambda n: True,
    "galore": lambda n: True,
    "head": lambda n: n.startswith("head."),
    "bitfit": lambda n: n.endswith("bias") or (n.endswith("weight") and n.split(".")[-2] == "1"),
}


@pytest.mark.parametrize("method", METHODS)
def test_only_intended_parameters_get_gradients(method):
    model = _tiny()
    inject(model, AdaptConfig(method=method, rank=2))
    model(torch.randn(3, 6, 32)).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.requires_grad == EXPECTED_TRAINABLE[method](name), name
        if not p.requires_grad:
            assert p.grad is None, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("method", ["lora-edge", "lora", "dora", "adapter"])
def test_zero_initialised_methods_start_at_the_base_output(method):
    base = _tiny()
    x = torch.randn(3, 6, 32)
    model = copy.deepcopy(base)
    inject(model, AdaptConfig(method=method, rank=3))
    assert torch.equal(model.eval()(x), base(x))


def _perturb(model: nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)


@pytest.mark.parametrize("method", ["lora-edge", "lora", "dora"])
def test_merge_equals_unmerged_forward(method):
    model = _tiny()
    inject(model, AdaptConfig(method=method, rank=2))
    _perturb(model)
    x = torch.randn(3, 6, 32)
    before = model.eval()(x)
    for layer in adapter_layers(model).values():
        layer.merge()
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)
    for layer in adapter_layers(model).values():
        layer.unmerge()
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


class Tiny2d(nn.Module):
    """2-D geometries: a non-square kernel with stride, a grouped conv, a depthwise conv, a pointwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, (3, 5), stride=(2, 1), padding=(1, 2)), nn.BatchNorm2d(8), nn.ReLU6()),
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Conv2d(8, 12, 1),
        )
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("method", [m for m in METHODS if m != "adapter"])
def test_fused_onnx_matches_unfused(method, dims):
    base = _tiny(cls=Tiny if dims == 1 else Tiny2d)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = copy.deepcopy(base)
    cfg = AdaptConfig(method=method, rank=2)
    inject(model, cfg)
    _perturb(model)
    adapter = extract_adapter(model, state, cfg, {})
    x = torch.randn(1, 6, 32) if dims == 1 else torch.randn(1, 3, 14, 11)
    unfused, fused = export_proto(model.eval(), x), fuse_model(export_proto(base, x), adapter, PROV)
    want = model(x).detach().numpy()
    np.testing.assert_allclose(run(unfused, x), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run(fused, x), want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(run(export_proto(base, x), x), want, atol=1e-3)


def test_bottleneck_adapter_is_refused_by_fusion_but_exports_unfused():
    base = _tiny()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = copy.deepcopy(base)
    cfg = AdaptConfig(method="adapter")
    inject(model, cfg)
    _perturb(model)
    x = torch.randn(1, 6, 32)
    np.testing.assert_allclose(run(export_proto(model.eval(), x), x), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ToolchainError, match="cannot be fused"):
        fuse_model(export_proto(base, x), extract_adapter(model, state, cfg, {}), PROV)


@pytest.mark.parametrize("geom_id", list(GEOMETRIES))
@pytest.mark.parametrize("dora", [False, True])
def test_torch_lora_matches_numpy_reference(geom_id, dora):
    conv, x, rank = make_conv(geom_id)
    w = conv.weight.detach().numpy().copy()
    layer = LoRAConv(conv, rank, alpha=2.0 * rank, dora=dora)
    with torch.no_grad():
        layer.lora_B.normal_()
        if dora:
            layer.magnitude.mul_(1.3)
    a, b = layer.lora_A.detach().numpy(), layer.lora_B.detach().numpy()
    ref = lora_delta(a, b, conv.groups, 2.0)
    np.testing.assert_allclose(layer.delta_weight().detach().numpy(), ref, rtol=1e-5, atol=1e-5)
    if dora:
        got = layer.dora_weight().detach().numpy()
        np.testing.assert_allclose(
            got, dora_weight(w, a, b, layer.magnitude.detach().numpy(), conv.groups, 2.0), rtol=1e-5, atol=1e-5
        )
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-4, atol=1e-4)


def test_galore_keeps_low_rank_state_and_learns():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(16, 8, 3))
    opt = GaLoreAdam([w], lr=1e-2, rank=4)
    x, target = torch.randn(32, 8, 20), torch.randn(32, 16, 18)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = ((nn.functional.conv1d(x, w) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    state = opt.state[w]
    assert state["exp_avg"].shape == (4, 24) and state["proj"].shape == (16, 4)  # 16 <= 24: left projection
    assert losses[-1] < 0.85 * losses[0]


@pytest.mark.parametrize(
    ("cin", "cout", "k", "stride", "length", "groups"), [(6, 16, 5, 1, 50, 1), (8, 8, 3, 2, 41, 8), (4, 6, 1, 1, 10, 2)]
)
def test_flop_count_of_one_conv_equals_the_formula(cin, cout, k, stride, length, groups):
    conv = nn.Conv1d(cin, cout, k, stride=stride, groups=groups, bias=False)
    x = torch.randn(3, cin, length)
    l_out = (length - k) // stride + 1
    macs = 3 * cout * l_out * (cin // groups) * k
    assert count_flops(lambda: conv(x)) == 2 * macs
    x.requires_grad_(False)
    out = conv(x)
    assert count_flops(lambda: out.sum().backward()) == 2 * macs  # weight gradient only: the input needs none
    x2 = torch.randn(3, cin, length, requires_grad=True)
    out2 = conv(x2)
    assert count_flops(lambda: out2.sum().backward()) == 4 * macs  # input and weight gradients


def test_memory_accounting_of_one_linear():
    lin = nn.Linear(10, 3)
    x = torch.randn(7, 10)
    opt = torch.optim.Adam(lin.parameters())
    prof = profile_step(lin, opt, x, torch.tensor([0, 1, 2, 0, 1, 2, 0]))
    n = 10 * 3 + 3
    assert prof.param_bytes == prof.grad_bytes == 4 * n
    assert prof.optimizer_bytes == 2 * 4 * n + 2 * 4  # two moments per element plus Adam's step counters
    assert activation_bytes(lin, x) == 0  # it saves only the caller's batch, which every method holds
    two = nn.Sequential(nn.Linear(10, 5), nn.Linear(5, 3))
    assert activation_bytes(two, x) == 7 * 5 * 4  # the intermediate the second layer saves
    assert prof.forward_flops == 2 * 7 * 10 * 3


def test_head_only_saves_no_conv_activations():
    model = _tiny()
    inject(model, AdaptConfig(method="head"))
    x = torch.randn(2, 6, 32)
    assert activation_bytes(model, x) < 2 * 12 * 4 * 2 + 1
    full = _tiny()
    assert activation_bytes(full, x) > 10 * activation_bytes(model, x)


def test_make_optimizer_picks_galore():
    model = _tiny()
    cfg = AdaptConfig(method="galore", rank=2)
    inject(model, cfg)
    assert isinstance(make_optimizer(model, cfg, 1e-3), GaLoreAdam)


@pytest.mark.parametrize("rank", [1, 4, 9])
def test_rslora_scales_by_the_square_root_of_the_rank(rank):
    """rsLoRA is LoRA's layer with s = scaling · sqrt(r): the same tensors, the record carries s, fusion and
    reloading use it."""
    base = _tiny()
    lora, rs = copy.deepcopy(base), copy.deepcopy(base)
    inject(lora, AdaptConfig(method="lora", rank=rank, scaling=0.5))
    inject(rs, AdaptConfig(method="rslora", rank=rank, scaling=0.5))
    for (name, a), b in zip(adapter_layers(lora).items(), adapter_layers(rs).values(), strict=True):
        with torch.no_grad():
            a.lora_B.normal_()
            b.lora_A.copy_(a.lora_A)
            b.lora_B.copy_(a.lora_B)
        assert b.method == "rslora"
        assert torch.allclose(b.delta_weight(), a.delta_weight() * math.sqrt(rank), rtol=1e-5, atol=1e-7), name
    adapter = extract_adapter(rs, base.state_dict(), AdaptConfig(method="rslora", rank=rank, scaling=0.5), {})
    assert adapter.method == "rslora" and all(r.method == "rslora" for r in adapter.layers)
    assert all(r.scaling == pytest.approx(0.5 * math.sqrt(rank)) for r in adapter.layers)
    for rec in adapter.layers:
        w = base.get_submodule(rec.name).weight.detach().numpy()
        a_, b_ = adapter.layer_tensors(rec)
        want = w + lora_delta(a_, b_, rec.geometry.groups, 0.5 * math.sqrt(rank))
        np.testing.assert_allclose(
            fused_weight("rslora", w, [a_, b_], rec.geometry.groups, rec.scaling), want, rtol=1e-6
        )
    reloaded = copy.deepcopy(base)
    apply_adapter(reloaded, adapter)
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), rs.eval()(x))


@pytest.mark.parametrize("method", ["lora-edge", "lora", "rslora", "dora"])
def test_evaluation_runs_the_merged_weight_and_leaves_the_base_alone(method):
    """``merged_for_inference`` (what ``evaluate`` uses): one conv with W + ΔW per wrapper, equal to the
    two-path forward to float rounding; base weights bit-identical after; grad-enabled passes (training,
    export) keep the auxiliary path; a layer already merged is not merged twice."""
    from toolchain.peft.inject import merged_for_inference

    model = _tiny()
    inject(model, AdaptConfig(method=method, rank=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 6, 32)
    with torch.no_grad():
        two_path = model(x)
        with merged_for_inference(model):
            merged = model(x)
            assert all(m.inference_weight is not None for m in adapter_layers(model).values())
            with torch.enable_grad():
                torch.testing.assert_close(model(x), two_path, rtol=0, atol=0)
    torch.testing.assert_close(merged, two_path, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.inference_weight is None for m in adapter_layers(model).values())
    layer = next(iter(adapter_layers(model).values()))
    layer.merge()
    with torch.no_grad(), merged_for_inference(model):
        assert layer.inference_weight is None
