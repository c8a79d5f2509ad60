"""One adaptation core: finetune and the grid's runs (the shift benchmark's ``adapt_once``, ``compare``)
give the same adapter from the same inputs, new classes included; the seed is applied once."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from toolchain.adaptation import HeadChange, adapt, extract, prepare
from toolchain.adapters.adapter_file import load_adapter, save_adapter
from toolchain.adapters.methods import get_method
from toolchain.compare import compare_task
from toolchain.data.sources import default_target_subjects, load_data
from toolchain.data.windows import split_subjects, time_split
from toolchain.grid.tasks import adapt_once
from toolchain.models.registry import load_checkpoint
from toolchain.peft.inject import AdaptConfig
from toolchain.records import read_metrics
from toolchain.train import TrainConfig
from toolchain.workflows import FinetuneJob, PretrainJob, finetune, pretrain

STEPS, BATCH, SEED = 8, 32, 3


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("bases")
    out = {}
    for name, exclude in (("same", ()), ("grown", ("0",))):
        out[name] = d / f"{name}.pt"
        cfg = TrainConfig(lr=2e-3, epochs=1, progress=False)
        pretrain(PretrainJob(out=str(out[name]), train=cfg, exclude_classes=exclude))
    return out


def _split(ckpt):
    base, payload = load_checkpoint(str(ckpt))
    ds = load_data("watch")
    subjects = (payload.get("pretrain") or {}).get("target_subjects") or default_target_subjects(ds)
    adapt_set, test_set = time_split(split_subjects(ds, subjects)[1])
    grows = list(payload["classes"]) != list(ds.classes)
    head = HeadChange(list(payload["classes"]), list(ds.classes)) if grows else None
    return base, payload, ds, adapt_set, test_set, head


def _finetune(ckpt, out, method, rank):
    job = FinetuneJob(
        checkpoint=str(ckpt),
        out=str(out),
        adapt=AdaptConfig(method=method, rank=rank),
        train=TrainConfig(lr=get_method(method).lr, batch_size=BATCH, steps=STEPS, seed=SEED, progress=False),
    )
    return finetune(job)


@pytest.mark.parametrize("base", ["same", "grown"])
@pytest.mark.parametrize("method", ["lora-edge", "lora", "bitfit"])
def test_a_grid_run_and_finetune_give_the_same_adapter_bytes(bases, tmp_path, base, method):
    ft = tmp_path / "finetune.safetensors"
    metrics = _finetune(bases[base], ft, method, 2)
    model, payload, ds, adapt_set, test_set, head = _split(bases[base])
    done = adapt_once(
        model, adapt_set, test_set, method, 2, seed=SEED, steps=STEPS, eval_every=0, batch_size=BATCH, head=head
    )
    info = {"rank": 2, "layers": "all", "checkpoint_model": payload["model"], "classes": list(ds.classes)}
    grid = tmp_path / "grid.safetensors"
    save_adapter(extract(done.outcome, info), grid)
    assert grid.read_bytes() == ft.read_bytes()
    assert done.row["f1_final"] == metrics.f1_after and done.row["f1_start"] == metrics.f1_before
    assert read_metrics(tmp_path / "finetune.metrics.json") == metrics
    # compare's task (another grid) trains the same tensors; its file records a different ``info``
    inputs = {"checkpoint": str(bases[base]), "data": "watch", "method": method, "rank": 2, "seed": SEED}
    inputs |= {"steps": STEPS, "eval_every": 0, "batch_size": BATCH, "layers": "all", "backbone": "cnn1d"}
    row = compare_task({**inputs, "adapter": str(tmp_path / "compare.safetensors")})
    a, b = load_adapter(tmp_path / "compare.safetensors"), load_adapter(ft)
    assert a.layers == b.layers and a.extras == b.extras and sorted(a.tensors) == sorted(b.tensors)
    for name, t in a.tensors.items():
        assert t.dtype == b.tensors[name].dtype and t.tobytes() == b.tensors[name].tobytes(), name
    assert row["f1_final"] == metrics.f1_after


def test_the_core_starts_at_the_base_and_seeds_once(bases):
    """Step 0 is the base model (new head rows aside), and two runs with one seed are identical even when
    other draws happen in between (the seed is applied where the draws start, not earlier)."""
    model, _, _, adapt_set, test_set, head = _split(bases["grown"])
    cfg = AdaptConfig(method="lora", rank=2)
    tc = TrainConfig(lr=5e-3, batch_size=BATCH, steps=3, seed=SEED, progress=False)
    first = adapt(model, adapt_set, test_set, cfg, tc, head=head, copy_base=True)
    np.random.default_rng().random(10)
    torch.rand(7)  # unrelated draws between the runs change nothing
    second = adapt(model, adapt_set, test_set, cfg, tc, head=head, copy_base=True)
    assert first.f1_after == second.f1_after and first.history == second.history
    assert "head" in first.config.train  # new classes: the head is trained
    probe = copy.deepcopy(model)
    applied, layers = prepare(probe, cfg, SEED, head)
    assert applied == first.config and layers == first.layers
