"""The lean training path gives the reference path's gradients (and weights after training) and keeps less."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.geometries import GEOMETRIES, make_conv
from toolchain.models.backbones import BACKBONES, SPATIAL_DIMS
from toolchain.peft.inject import AdaptConfig, inject, set_train_mode
from toolchain.peft.lean import lean_training
from toolchain.profile import activation_bytes
from toolchain.reparametrized import copy_module


class Block(nn.Module):
    """conv -> BN (frozen, eval) -> ReLU6 -> max-pool: every lean op around one adapted conv."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        nd = conv.weight.dim() - 2
        self.conv = conv
        self.bn = (nn.BatchNorm1d if nd == 1 else nn.BatchNorm2d)(conv.out_channels)
        self.act = nn.ReLU6()
        self.pool = (nn.MaxPool1d if nd == 1 else nn.MaxPool2d)(2)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.normal_()
            self.bn.bias.normal_()

    def forward(self, x):
        return self.pool(self.act(3 * self.bn(self.conv(x))))


def _grads(model: nn.Module, x: torch.Tensor, lean: bool, update_bn: bool = False) -> dict[str, torch.Tensor]:
    model = copy_module(model)  # copy.deepcopy, also for hook-based weight norm
    x = x.clone().requires_grad_(True)
    set_train_mode(model, update_bn)
    with lean_training(model, lean):
        out = model(x)
        weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        (out * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    grads["input"] = x.grad.clone()
    return grads


def _assert_same(ref: dict, lean: dict) -> None:
    assert ref.keys() == lean.keys()
    for k in ref:
        scale = ref[k].abs().max().clamp_min(1e-6)
        torch.testing.assert_close(lean[k], ref[k], rtol=1e-5, atol=1e-5 * float(scale), msg=lambda m, k=k: f"{k}: {m}")


def _adapted(geom_id: str, method: str, scaling: float, train: tuple[str, ...] = ()) -> tuple[nn.Module, torch.Tensor]:
    conv, x, rank = make_conv(geom_id)
    model = Block(conv)
    inject(model, AdaptConfig(method=method, rank=min(rank, 4), scaling=scaling, train=train))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ("delta_g1" in n or "lora_B" in n):
                p.normal_(0, 0.3)
    return model, x


@pytest.mark.parametrize("geom_id", list(GEOMETRIES))
@pytest.mark.parametrize(("method", "scaling"), [("lora-edge", 0.7), ("lora", 1.5), ("dora", 1.0), ("bitfit", 1.0)])
def test_lean_gradients_equal_reference_on_the_geometry_table(geom_id, method, scaling):
    model, x = _adapted(geom_id, method, scaling)
    _assert_same(_grads(model, x, lean=False), _grads(model, x, lean=True))


@pytest.mark.parametrize("geom_id", ["1d-plain", "1d-depthwise", "2d-stride-dil", "1d-same"])
def test_lean_gradients_with_trained_head_bn_and_moving_statistics(geom_id):
    model, x = _adapted(geom_id, "lora-edge", 2.0, train=("bn",))
    _assert_same(_grads(model, x, lean=False), _grads(model, x, lean=True))
    _assert_same(_grads(model, x, lean=False, update_bn=True), _grads(model, x, lean=True, update_bn=True))


def _backbone(name: str, method: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    channels = 6 if SPATIAL_DIMS[name] == 1 else 3
    model = BACKBONES[name](in_channels=channels, num_classes=5)
    layers = "pointwise" if name.startswith("mobilenet") and method in ("lora-edge", "lora") else "all"
    inject(
        model,
        AdaptConfig(method=method, rank=4, scaling=0.5, layers=layers, train=("head",) if method != "bitfit" else ()),
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ("delta_g1" in n or "lora_B" in n or ".up." in n):
                p.normal_(0, 0.1)
    return model, torch.randn(4, 6, 64) if SPATIAL_DIMS[name] == 1 else torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("name", sorted(BACKBONES))
@pytest.mark.parametrize("method", ["lora-edge", "lora", "dora", "bitfit", "head", "adapter"])
def test_lean_gradients_equal_reference_on_every_backbone(name, method):
    """In float64, so that deep nets compare the math and not float32 rounding (which reorders
    with the folded BatchNorm and can flip a ReLU6 at its bounds on an untrained net)."""
    model, x = _backbone(name, method)
    model, x = model.double(), x.double()
    _assert_same(_grads(model, x, lean=False), _grads(model, x, lean=True))


def test_lean_training_reaches_the_reference_weights():
    import numpy as np

    from toolchain.data.windows import WindowDataset
    from toolchain.train import TrainConfig, train

    rng = np.random.default_rng(0)
    ds = WindowDataset(
        rng.standard_normal((64, 6, 64)).astype(np.float32),
        rng.integers(0, 5, 64),
        np.zeros(64, int),
        np.zeros(64, int),
        [str(i) for i in range(5)],
    )
    model, _ = _backbone("resnet1d", "lora-edge")
    results = []
    for lean in (False, True):
        m = copy.deepcopy(model)
        with lean_training(m, lean):
            train(
                m,
                ds,
                TrainConfig(lr=5e-3, batch_size=16, steps=6, progress=False),
                set_mode=lambda mm: set_train_mode(mm, False),
            )
        results.append({n: p.detach() for n, p in m.named_parameters() if p.requires_grad})
    start = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for k in results[0]:
        # float32 Adam amplifies the order of float sums (threads, the torch release's kernels) element by
        # element: torch 2.5.1 moved one of 256 ΔG1 entries by 5.5e-5 to 1.6e-4 from run to run. So the
        # trained update is compared as a whole, to 0.5% of its size; exactness is the float64 tests' job.
        ref, lean = results[0][k] - start[k], results[1][k] - start[k]
        assert ref.norm() > 0 and (lean - ref).norm() <= 5e-3 * ref.norm(), k


@pytest.mark.parametrize(
    ("name", "layers", "bound"),
    [
        ("cnn1d", "all", 0.4),
        ("resnet1d", "all", 0.4),
        ("mobilenet1d", "pointwise", 0.5),
        ("resnet18", "all", 0.55),
        ("mobilenetv2", "pointwise", 0.5),
    ],
)
def test_lean_lora_edge_keeps_a_fraction_of_full_finetuning_activations(name, layers, bound):
    torch.manual_seed(0)
    x = torch.randn(32, 6, 128) if SPATIAL_DIMS[name] == 1 else torch.randn(8, 3, 32, 32)
    full = BACKBONES[name](in_channels=x.shape[1], num_classes=5)
    set_train_mode(full, False)
    full_bytes = activation_bytes(full, x)
    edge = copy.deepcopy(full)
    inject(edge, AdaptConfig(method="lora-edge", rank=4, layers=layers))
    set_train_mode(edge, False)
    ref_bytes = activation_bytes(edge, x)
    with lean_training(edge):
        lean_bytes = activation_bytes(edge, x)
    assert lean_bytes < bound * full_bytes, (lean_bytes, ref_bytes, full_bytes)
    assert ref_bytes > full_bytes * 0.9, "the reference path keeps about what full fine-tuning keeps"


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 5, 7), (2, 3, 4, 5)])
def test_bit_packed_masks_round_trip_on_both_paths(shape):
    from toolchain.peft.lean_ops import _pack_torch, _unpack_torch, pack_bits, unpack_bits

    mask = torch.rand(shape) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(_pack_torch(mask.reshape(-1)), packed), "the torch path (GPUs) packs as numpy does"
    assert torch.equal(unpack_bits(packed, mask.shape), mask)
    assert torch.equal(_unpack_torch(packed, mask.numel()).view(shape), mask)


@pytest.mark.parametrize("numel", [1, 9, 8 * 1000 + 3, (1 << 17) * 2 + 5])
@pytest.mark.parametrize("upper", [None, 6.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_chunked_clamp_masks_equal_the_whole_tensor_ones(numel, upper, dtype):
    """The ReLU mask is packed, and applied in backward, MASK_CHUNK elements at a time (no full-size
    boolean or float mask): the same bits and the same gradient as the one-pass versions, across chunk
    edges, odd sizes and a non-contiguous gradient."""
    from toolchain.peft.lean_ops import MASK_CHUNK, masked_grad, pack_bits, pack_clamp_mask

    assert MASK_CHUNK % 8 == 0
    torch.manual_seed(numel)
    x = (torch.randn(numel) * 5).to(dtype)
    x[::7] = 0.0  # exact zeros (and, with upper, exact 6s) sit on the boundary
    if upper is not None:
        x[::11] = upper
    mask = (x > 0) if upper is None else (x > 0) & (x < upper)
    packed = pack_clamp_mask(x, upper)
    assert torch.equal(packed, pack_bits(mask))
    g = torch.randn(numel).to(dtype)
    g_t = torch.randn(numel, 2).to(dtype)[:, 0]
    for grad in (g, g_t):
        assert torch.equal(masked_grad(grad, packed), grad * mask)


@pytest.mark.parametrize("method", ["lora-edge", "lora"])
def test_first_conv_keeps_the_callers_batch_not_a_standardised_copy(method):
    """A 1-channel image into resnet18: LoRA-Edge keeps its stem's input (1 channel, smaller than the
    4-channel projection) and LoRA keeps it for A's gradient. The input is the standardisation's output;
    the lean ops keep the caller's batch and recompute (x - mean) / std in backward, bit for bit."""
    from toolchain.models.registry import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", 1, 5, 2)
    with torch.no_grad():
        model.norm.mean.fill_(0.3)
        model.norm.std.fill_(1.7)
    inject(model, AdaptConfig(method=method, rank=4, scaling=0.5))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ("delta_g1" in n or "lora_B" in n):
                p.normal_(0, 0.1)
    model, x = model.double(), torch.randn(3, 1, 32, 32, dtype=torch.float64)
    _assert_same(_grads(model, x, lean=False), _grads(model, x, lean=True))

    set_train_mode(model, False)
    batch_shaped: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.shape == x.shape:
            batch_shaped.append(t)
        return t

    with lean_training(model), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    assert batch_shaped, "the stem keeps its input (or the batch)"
    assert all(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in batch_shaped)
    with lean_training(model):
        out = model(x)
    x.add_(1.0)  # the batch changed after forward: autograd refuses, no silently wrong gradient
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_an_input_changed_in_place_after_standardisation_is_kept_as_it_is():
    """The recipe holds only while the standardised tensor is unchanged: an in-place op between the
    standardisation and the first conv makes the lean op keep the tensor itself (same gradients)."""
    from toolchain.models.registry import HARModel

    class Doubled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 8, 3, padding=1, bias=False)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.conv(x.mul_(2.0)).mean(-1))

    torch.manual_seed(0)
    model = HARModel(Doubled(), 2)
    with torch.no_grad():
        model.norm.mean.fill_(0.5)
        model.norm.std.fill_(2.0)
    inject(model, AdaptConfig(method="lora-edge", rank=4, scaling=0.5))
    with torch.no_grad():
        model.net.conv.delta_g1.normal_(0, 0.1)
    model, x = model.double(), torch.randn(3, 2, 16, dtype=torch.float64)
    # 2 input channels x 16 < 4 projection channels x 16: LoRA-Edge keeps the conv's input
    _assert_same(_grads(model, x, lean=False), _grads(model, x, lean=True))


@pytest.mark.parametrize("upper", [None, 6.0])
def test_lean_clamp_passes_a_nan_gradient_as_pytorch_does(upper):
    """PyTorch's ReLU/ReLU6 backward stops the gradient only where x <= 0 (or x >= 6): at a NaN it passes."""
    from toolchain.peft.lean_ops import MaskedClamp

    x = torch.tensor([float("nan"), -1.0, 0.0, 2.0, 6.0, 7.0], requires_grad=True)
    g = torch.arange(1.0, 7.0)
    ref = torch.relu if upper is None else torch.nn.functional.relu6
    (lean,) = torch.autograd.grad(MaskedClamp.apply(x, upper), x, g)
    (expected,) = torch.autograd.grad(ref(x), x, g)
    assert torch.equal(lean, expected)
