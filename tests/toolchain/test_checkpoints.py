"""Checkpoints record the revision of a built-in net whose layers changed under the same weights
(mobilenet1d: ReLU -> ReLU6), and load into the net they were trained in."""

import pytest
import torch
from torch import nn

from toolchain.core.errors import ToolchainError
from toolchain.models.registry import build_model, load_checkpoint, save_checkpoint


def _acts(model: nn.Module) -> tuple[int, int]:
    """(ReLU6 modules, plain ReLU modules)."""
    relu6 = sum(isinstance(m, nn.ReLU6) for m in model.modules())
    return relu6, sum(type(m) is nn.ReLU for m in model.modules())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """mobilenet1d written now, the same payload without a revision (as written before it was
    recorded), with a revision from the future, and a mobilenet1d-relu checkpoint."""
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    paths = {}
    for spec in ("mobilenet1d", "mobilenet1d-relu"):
        model = build_model(spec, 6, 4)
        paths[spec] = d / f"{spec}.pt"
        save_checkpoint(model, paths[spec], spec=spec, classes=list("abcd"), input_shape=(6, 64), extra={})
    payload = torch.load(paths["mobilenet1d"], weights_only=True)
    assert payload["backbone_revision"] == 2
    for name, revision in (("old", None), ("future", 3), ("text", "2")):
        edited = dict(payload)
        if revision is None:
            del edited["backbone_revision"]
        else:
            edited["backbone_revision"] = revision
        paths[name] = d / f"{name}.pt"
        torch.save(edited, paths[name])
    return paths


@pytest.mark.parametrize(
    ("ckpt", "model_spec", "net", "relu6", "note"),
    [
        ("mobilenet1d", None, "mobilenet1d", 16, False),
        ("mobilenet1d", "mobilenet1d", "mobilenet1d", 16, False),
        ("old", None, "mobilenet1d-relu", 0, True),
        ("old", "mobilenet1d", "mobilenet1d-relu", 0, True),  # repeating the recorded name keeps the old net
        ("old", "mobilenet1d-relu", "mobilenet1d-relu", 0, False),
        ("mobilenet1d-relu", None, "mobilenet1d-relu", 0, False),
    ],
)
def test_a_checkpoint_loads_into_the_net_it_was_trained_in(checkpoints, capsys, ckpt, model_spec, net, relu6, note):
    model, payload = load_checkpoint(checkpoints[ckpt], model_spec)
    assert payload["model"] == net
    assert _acts(model) == (relu6, 16 - relu6)
    assert ("loading it as mobilenet1d-relu" in capsys.readouterr().err) is note


def test_the_legacy_net_computes_what_the_old_mobilenet1d_computed(checkpoints):
    """Same weights, different activations: the old checkpoint's outputs are the ReLU net's, bit for bit."""
    old, _ = load_checkpoint(checkpoints["old"])
    new, _ = load_checkpoint(checkpoints["mobilenet1d"])
    relu = build_model("mobilenet1d-relu", 6, 4)
    relu.load_state_dict(new.state_dict())
    x = 3 * torch.randn(8, 6, 64)  # wide enough that some pre-activations pass 6
    with torch.no_grad():
        assert torch.equal(old.eval()(x), relu.eval()(x))
        assert not torch.equal(new.eval()(x), relu(x))


@pytest.mark.parametrize(
    ("ckpt", "model_spec", "message"),
    [
        ("mobilenet1d", "mobilenet1d-relu", "trained as the built-in mobilenet1d, not mobilenet1d-relu"),
        ("old", "cnn1d", "trained as the built-in mobilenet1d-relu, not cnn1d"),
        ("future", None, "'backbone_revision' of mobilenet1d must be an integer in 1..2"),
        ("text", None, "'backbone_revision' of mobilenet1d must be an integer in 1..2"),
    ],
)
def test_a_wrong_net_or_revision_is_refused(checkpoints, ckpt, model_spec, message):
    with pytest.raises(ToolchainError, match=message):
        load_checkpoint(checkpoints[ckpt], model_spec)


def test_the_same_model_saved_twice_gives_the_same_bytes(tmp_path):
    """The archive is not named after the random temporary file, so a re-run of a pipeline writes the
    same checkpoint (and the same checkpoint_sha256 in every export of it)."""
    torch.manual_seed(0)
    model = build_model("cnn1d", 6, 4)
    one, two = tmp_path / "one.pt", tmp_path / "sub" / "two.pt"
    two.parent.mkdir()
    for path in (one, two):
        save_checkpoint(model, path, spec="cnn1d", classes=list("abcd"), input_shape=(6, 64), extra={})
    assert one.read_bytes() == two.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.pt", "sub"]


def test_a_full_disk_seen_by_the_file_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    def full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    model = build_model("cnn1d", 6, 4)
    with pytest.raises(ToolchainError, match=r"cannot write the checkpoint.*No space left"):
        save_checkpoint(model, tmp_path / "x.pt", spec="cnn1d", classes=list("abcd"), input_shape=(6, 64), extra={})
    assert not list(tmp_path.iterdir())
