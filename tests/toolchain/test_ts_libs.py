"""Time-series CNN libraries HAR users bring (issue 27): tsai, braindecode and pytorch-tcn through every
stage (adapt, step 0, train, save, export, fuse, parity, parser), and miniatures of each mechanism their
models use, which run everywhere: a conv registered under two names (tsai's TemporalBlock), weight norm
hook-based and parametrized, a max-norm constraint (braindecode's Conv2dWithConstraint), a conv that
pads in its own forward with keyword arguments (pytorch-tcn's TemporalConv1d), one that crops its
output (braindecode's CausalConv1d), and a parent that reads its convs' weights instead of calling them
(braindecode's CombinedConv, refused). The libraries' cases skip where the library does not import;
scripts/check_torch_compat.sh installs all three (tsai needs torchvision)."""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import toolchain.api as tc
from tests.toolchain.test_lean import _assert_same, _grads
from tests.toolchain.ts_lib_models import MODELS, STAGES, run_case, through_every_stage
from toolchain.core.errors import ToolchainError
from toolchain.peft import lora_edge
from toolchain.reparametrized import copy_module, plain_copy, reparametrized

METHODS = ("lora-edge", "lora", "bitfit")


def _hook_weight_norm(conv: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated, and still what tsai's TCN uses
        return torch.nn.utils.weight_norm(conv)


class Chomp(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : -self.n].contiguous()


class TemporalBlock(nn.Module):
    """tsai's TemporalBlock in miniature: hook weight-normed convs registered as conv1/conv2 and again
    inside ``net``, which is what forward calls."""

    def __init__(self, ni: int, nf: int, dilation: int) -> None:
        super().__init__()
        pad = 2 * dilation
        self.conv1 = _hook_weight_norm(nn.Conv1d(ni, nf, 3, padding=pad, dilation=dilation))
        self.conv2 = _hook_weight_norm(nn.Conv1d(nf, nf, 3, padding=pad, dilation=dilation))
        self.net = nn.Sequential(self.conv1, Chomp(pad), nn.ReLU(), self.conv2, Chomp(pad), nn.ReLU())
        self.downsample = nn.Conv1d(ni, nf, 1) if ni != nf else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = x if self.downsample is None else self.downsample(x)
        return F.relu(self.net(x) + res)


class MaxNorm(nn.Module):
    """braindecode's max-norm constraint: each output filter's norm clipped to 1 (a parametrization)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        norm = w.flatten(1).norm(dim=1).clamp(min=1.0)
        return w / norm.reshape(-1, *([1] * (w.dim() - 1)))


class CombinedConv(nn.Module):
    """braindecode's CombinedConv in miniature: one kernel made of two convs' weights in its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_time = nn.Conv2d(1, 4, (5, 1))
        self.conv_spat = nn.Conv2d(4, 4, (1, 6), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.conv_time.weight * self.conv_spat.weight.permute(1, 0, 2, 3)).sum(0, keepdim=True)
        return F.conv2d(x, w.permute(1, 0, 2, 3).expand(4, 1, 5, 6).contiguous())


class Classifier(nn.Module):
    """(N, 6, T) -> (N, 6) logits around a feature extractor."""

    def __init__(self, features: nn.Module, channels: int, two_d: bool = False) -> None:
        super().__init__()
        self.features, self.two_d = features, two_d
        self.head = nn.Linear(channels, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x[:, None].transpose(2, 3) if self.two_d else x)
        return self.head(h.flatten(2).mean(-1))


def _tcn() -> nn.Module:
    return Classifier(nn.Sequential(TemporalBlock(6, 8, 1), TemporalBlock(8, 8, 2)), 8)


def _parametrized_weight_norm() -> nn.Module:
    convs = [parametrizations.weight_norm(nn.Conv1d(6, 8, 5, padding=2)), nn.ReLU(), nn.Conv1d(8, 8, 3)]
    return Classifier(nn.Sequential(*convs), 8)


def _max_norm() -> nn.Module:
    first = nn.Conv2d(1, 8, (9, 1), padding=(4, 0))
    parametrize.register_parametrization(first, "weight", MaxNorm())
    return Classifier(nn.Sequential(first, nn.BatchNorm2d(8), nn.ELU(), nn.Conv2d(8, 8, (1, 6))), 8, two_d=True)


class SplitHeads(nn.Module):
    """braindecode ATCNet's attention in miniature: a projection split into heads with torch.split, which
    the dynamo exporter writes as SplitToSequence + SequenceAt (TensorRT parses neither)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(6, 16, 5, padding=2)
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.conv(x).transpose(1, 2))
        a, b = torch.split(h, 8, dim=-1)
        return (a * b.softmax(-1)).transpose(1, 2)


MINIATURES = {  # name -> (factory, what it stands for)
    "twice-registered hook weight norm": (_tcn, "tsai TCN"),
    "parametrized weight norm": (_parametrized_weight_norm, "pytorch-tcn, braindecode BDTCN"),
    "parametrized max-norm": (_max_norm, "braindecode Conv2dWithConstraint (EEGNet, ATCNet)"),
    "heads split with torch.split": (lambda: Classifier(SplitHeads(), 8), "braindecode ATCNet"),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", MINIATURES)
def test_miniatures_pass_every_stage(name, method, tmp_path):
    torch.manual_seed(0)
    row = through_every_stage(MINIATURES[name][0]().eval(), method, torch.randn(8, 6, 64), 6, tmp_path)
    assert [row.get(s) for s in STAGES[1:]] == ["exact", "ok", "ok", "ok", "ok", "PASSED", "parses"], row
    assert row["parity_error"] < 1e-5


@pytest.mark.parametrize("name", MINIATURES)
def test_lean_gradients_of_reparametrized_convs_equal_the_reference(name):
    torch.manual_seed(0)
    model = MINIATURES[name][0]().eval()
    adaptation = tc.adapt(model, "lora-edge", rank=2)
    with torch.no_grad():
        for p in adaptation.parameters():
            p.normal_(0, 0.05)
    x = torch.randn(2, 6, 64).double()
    _assert_same(_grads(model.double(), x, lean=False), _grads(model.double(), x, lean=True))


def test_a_conv_registered_twice_is_adapted_where_forward_calls_it():
    model = _tcn()
    tc.adapt(model, "lora-edge", rank=2)
    block = model.features[0]
    assert block.net[0] is block.conv1 and type(block.conv1).__name__ == "LoRAEdgeConv"
    names = list(tc.adapt(_tcn(), "lora", rank=2).wrapped)
    assert "features.0.conv1" in names and not any(".net." in n for n in names)  # one name per conv


@pytest.mark.parametrize("factory", [_tcn, _parametrized_weight_norm, _max_norm])
def test_plain_copy_holds_the_values_and_leaves_the_original_untouched(factory):
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(3, 6, 64)
    names, cls = reparametrized(model), [type(m) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = plain_copy(model)
    assert names and not reparametrized(plain)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))
    assert reparametrized(model) == names and [type(m) for m in model.modules()] == cls
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    for name in names:
        assert isinstance(plain.get_parameter(name), nn.Parameter)


def test_copy_module_copies_hook_weight_norm_which_deepcopy_refuses():
    model = _tcn()
    with pytest.raises(RuntimeError, match="deepcopy"):
        copy.deepcopy(model)
    twin = copy_module(model)
    with torch.no_grad():
        twin.features[0].conv1.weight_g.mul_(2)  # the copy's g, not the original's
        x = torch.randn(2, 6, 32)
        assert not torch.equal(twin(x), model(x))
    assert twin.features[0].net[0] is twin.features[0].conv1  # shared modules stay shared


def test_a_parent_that_reads_conv_weights_is_refused_at_save(tmp_path):
    model = Classifier(nn.Sequential(CombinedConv(), nn.ELU(), nn.Conv2d(4, 8, (3, 1))), 8, two_d=True)
    adaptation = tc.adapt(model, "lora-edge", rank=2)
    model(torch.randn(2, 6, 32)).sum().backward()
    with pytest.raises(ToolchainError, match=r"features\.0\.conv_time was never called.*CombinedConv") as e:
        adaptation.save(tmp_path / "a.safetensors")
    assert "--layers" in e.value.remedy and not (tmp_path / "a.safetensors").exists()
    only = tc.adapt(
        Classifier(nn.Sequential(CombinedConv(), nn.ELU(), nn.Conv2d(4, 8, (3, 1))), 8, two_d=True),
        "lora-edge",
        rank=2,
        layers=r"features\.2",
    )
    assert list(only.wrapped) == ["features.2"]


class KwargPadConv(nn.Conv1d):
    """pytorch-tcn's TemporalConv1d in miniature: a causal pad in its own forward, with a keyword."""

    def padder(self, x: torch.Tensor, inference: bool = False, buffer_io: object = None) -> torch.Tensor:
        return F.pad(x, (2 * self.dilation[0], 0), value=1.0 if inference else 0.0)

    def forward(self, x: torch.Tensor, inference: bool = False) -> torch.Tensor:
        return super().forward(self.padder(x, inference=inference))


class CropConv(nn.Conv1d):
    """braindecode's CausalConv1d in miniature: padded (k - 1)·d on both sides, the tail cut."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[..., : -self.padding[0]]


class KwargNet(nn.Module):
    def __init__(self, inference: bool) -> None:
        super().__init__()
        self.inference = inference
        self.conv = KwargPadConv(6, 8, 3, dilation=2)
        self.crop = CropConv(8, 8, 3, padding=2)
        self.head = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.crop(F.relu(self.conv(x, inference=self.inference))).mean(-1))


@pytest.mark.parametrize("inference", [False, True])
@pytest.mark.parametrize("method", ["lora-edge", "lora"])
def test_pad_with_keywords_and_output_crop_are_followed_exactly(method, inference, monkeypatch, tmp_path):
    path = f"{__name__}.%s"
    monkeypatch.setitem(lora_edge.PRE_PADS, path % "KwargPadConv", lambda conv, x, **kw: conv.padder(x, **kw))
    monkeypatch.setitem(lora_edge.POST_CROPS, path % "CropConv", lambda conv, y: y[..., : -conv.padding[0]])
    torch.manual_seed(0)
    row = through_every_stage(KwargNet(inference).eval(), method, torch.randn(8, 6, 32), 6, tmp_path)
    assert [row.get(s) for s in STAGES[1:7]] == ["exact", "ok", "ok", "ok", "ok", "PASSED"], row


def test_keywords_to_a_plain_conv_are_a_type_error_as_without_the_wrapper():
    model = nn.Sequential(nn.Conv1d(6, 8, 3))
    tc.adapt(model, "lora-edge", rank=2)
    with pytest.raises(TypeError, match="inference"):
        model[0](torch.randn(1, 6, 16), inference=True)


# The libraries' models: what each does at every stage. Everything not listed passes every stage.
REFUSED = {  # (model, method) -> the refusal's stage and the words it must say
    ("braindecode.ShallowFBCSPNet", "lora-edge"): ("save", "CombinedConv"),
    ("braindecode.ShallowFBCSPNet", "lora"): ("save", "CombinedConv"),
    ("braindecode.Deep4Net", "lora-edge"): ("save", "CombinedConv"),
    ("braindecode.Deep4Net", "lora"): ("save", "CombinedConv"),
}
LIBRARY = {"tsai": "tsai", "braindecode": "braindecode", "pytorch-tcn": "pytorch_tcn"}


class DeadBranch(nn.Module):
    """tsai's mWDN in miniature: a block whose output the model computes and never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.unused(x)
        return torch.sigmoid(self.used(x))


def test_bitfit_on_a_model_with_an_unused_branch_passes_every_stage(tmp_path):
    torch.manual_seed(0)
    model = Classifier(nn.Sequential(DeadBranch(), nn.Conv1d(6, 8, 3)), 8).eval()
    row = through_every_stage(model, "bitfit", torch.randn(8, 6, 64), 6, tmp_path)
    assert [row.get(s) for s in STAGES[1:]] == ["exact", "ok", "ok", "ok", "ok", "PASSED", "parses"], row


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", MODELS)
def test_library_models_through_every_stage(name, method, tmp_path):
    module = LIBRARY[name.split(".")[0]]
    try:
        importlib.import_module(module)
    except Exception as e:  # tsai imports fastai, which needs torchvision
        pytest.skip(f"{module} does not import here: {type(e).__name__}")
    row = run_case(name, method, tmp_path)
    crashes = {s: row[s] for s in STAGES if str(row.get(s, "")).startswith(("CRASH", "DIFFERS", "FAILED"))}
    assert not crashes, row
    if (name, method) in REFUSED:
        stage, words = REFUSED[name, method]
        assert str(row.get(stage, "")).startswith("refused:") and words in row[stage], row
    else:
        assert row.get("parity") == "PASSED" and row["parity_error"] < 1e-4, row
        assert row.get("parser") == "parses", row


def tsai_like(c_in, c_out, seq_len=None):
    return nn.Sequential(nn.Conv1d(c_in, 4, 3), nn.Flatten(), nn.Linear(4 * (seq_len - 2), c_out))


def braindecode_like(n_chans, n_outputs, n_times):
    """(N, C, T) as a one-channel image, as braindecode's EEG models take it: the first conv has 1 input."""
    return nn.Sequential(
        nn.Unflatten(1, (1, n_chans)),
        nn.Conv2d(1, 4, (n_chans, 3)),
        nn.Flatten(),
        nn.Linear(4 * (n_times - 2), n_outputs),
    )


@pytest.mark.parametrize("builder", ["tsai_like", "braindecode_like"])
def test_builders_get_channels_classes_and_window_length_under_their_own_names(builder):
    from toolchain.models.registry import build_model

    model = build_model(f"tests.toolchain.test_ts_libs:{builder}", 6, 5, 1, length=32)
    assert model(torch.randn(2, 6, 32)).shape == (2, 5)
