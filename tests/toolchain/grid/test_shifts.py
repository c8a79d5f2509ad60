"""The benchmark's shifts on the real HAPT and watch data (skipped where HAPT is absent)."""

import numpy as np
import pytest

from toolchain import __version__
from toolchain.data.sources import load_data
from toolchain.grid.bench import ShiftBench, adapt_tasks, base_task, run_bench
from toolchain.grid.runner import cache_key
from toolchain.grid.shifts import SHIFTS, session_split
from toolchain.grid.tasks import adapt_task


def test_hapt12_adds_the_six_postural_transitions(hapt_dir):
    basic, full = load_data(f"hapt:{hapt_dir}"), load_data(f"hapt12:{hapt_dir}")
    assert full.classes[:6] == basic.classes and len(full.classes) == 12 and full.classes[6] == "STAND_TO_SIT"
    assert len(full) > len(basic) and set(np.unique(full.y)) == set(range(12))


def test_session_split_adapts_on_the_first_performance_and_tests_on_the_second(hapt_dir):
    ds = load_data(f"hapt12:{hapt_dir}")
    user = ds.take(ds.subject == 2)
    adapt, test = session_split(user)
    assert len(adapt) + len(test) == len(user) and not set(adapt.segment) & set(test.segment)
    for c in range(12):
        segs = np.unique(user.segment[user.y == c])
        if len(segs) >= 2:
            assert c in adapt.y and c in test.y, c
            assert adapt.segment[adapt.y == c].max() < test.segment[test.y == c].min(), "adapt on the earlier session"


def test_shifts_share_a_base_only_when_their_source_is_the_same(tmp_path, hapt_dir):
    job = ShiftBench(out=str(tmp_path), hapt=str(hapt_dir))
    keys = {s: base_task(job, s, "cnn1d", 0).key for s in SHIFTS}
    assert keys["cross-subject"] == keys["unseen-transitions"] != keys["cross-dataset"]
    assert base_task(job, "cross-subject", "cnn1d", 1).key != keys["cross-subject"]
    bases = {(s, b, seed): base_task(job, s, b, seed) for s in job.shifts for b in job.backbones for seed in job.seeds}
    tasks = adapt_tasks(job, bases)
    per_user = sum(3 if m in ("lora-edge", "lora", "dora", "galore") else 1 for m in job.methods)
    assert len(tasks) == 3 * 3 * (9 + 9 + 10) * per_user == len({t.key for t in tasks})


def test_a_revised_backbone_gets_new_bases_and_the_others_keep_their_cache(tmp_path, hapt_dir):
    """mobilenet1d's layers changed under its name (revision 2: ReLU6): its bases from before must not
    be found; cnn1d's key is still the digest of the inputs it always had."""
    job = ShiftBench(out=str(tmp_path), hapt=str(hapt_dir))
    for backbone, revised in (("cnn1d", False), ("resnet1d", False), ("mobilenet1d", True)):
        task = base_task(job, "cross-subject", backbone, 0)
        before = {k: v for k, v in task.inputs.items() if k != "backbone_revision"}
        old = cache_key({"fn": task.fn, "inputs": before, "version": __version__})
        assert (task.key != old) is revised, backbone
        assert ("backbone_revision" in task.inputs) is revised


@pytest.mark.parametrize(
    ("shift", "classes", "head_trains"),
    [("unseen-transitions", 12, True), ("cross-dataset", 7, True), ("cross-subject", 6, False)],
)
def test_one_adaptation_per_shift(tmp_path, hapt_dir, shift, classes, head_trains):
    job = ShiftBench(
        out=str(tmp_path),
        hapt=str(hapt_dir),
        shifts=(shift,),
        backbones=("cnn1d",),
        methods=("lora-edge",),
        ranks=(2,),
        seeds=(0,),
        users=(2,),
        steps=4,
        eval_every=2,
        pretrain_epochs=1,
        progress=False,
    )
    rows, grid = run_bench(job)
    assert grid.failed == [] and len(rows) == 1
    row = rows[0]
    assert row["shift"] == shift and [s for s, _ in row["history"]] == [0, 2, 4] and len(row["history_seconds"]) == 3
    assert row["adapt_windows"] > 0 and row["test_windows"] > 0
    head_params = (128 + 1) * classes  # cnn1d's head: 128 features
    assert (row["trainable_params"] >= head_params) if head_trains else (row["trainable_params"] < head_params), row[
        "trainable_params"
    ]
    bases = list((tmp_path / "bases").iterdir())
    inputs = {
        **adapt_tasks(job, {(shift, "cnn1d", 0): base_task(job, shift, "cnn1d", 0)})[0].inputs,
        "base": str(bases[0]),
    }
    again = adapt_task(inputs)
    assert again["history"] == row["history"], "the same inputs give the same run"
