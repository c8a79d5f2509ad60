"""`toolchain compare` on the embedded default, and the unseen-class path through fuse and verify."""

import json

import onnx

from toolchain.cli import main
from toolchain.compare import CompareJob, run_compare


def test_compare_writes_reports_and_resumes(tmp_path):
    job = CompareJob(
        out=str(tmp_path),
        methods=("lora-edge", "adapter", "full"),
        ranks=(2,),
        steps=6,
        eval_every=3,
        pretrain_epochs=1,
        progress=False,
    )
    rows = run_compare(job)
    assert [(r["method"], r["rank"]) for r in rows] == [("lora-edge", 2), ("adapter", 0), ("full", 0)]
    for name in ("results.md", "results.csv", "f1_vs_step.png", "memory.png", "params_vs_f1.png"):
        assert (tmp_path / name).stat().st_size > 0
    full = next(r for r in rows if r["method"] == "full")
    edge = next(r for r in rows if r["method"] == "lora-edge")
    assert full["trainable_params"] == full["total_params"] and edge["trainable_params"] < full["trainable_params"] / 50
    assert edge["optimizer_bytes"] < full["optimizer_bytes"] / 50 and edge["grad_bytes"] < full["grad_bytes"] / 50
    assert rows[1]["fusable"] is False and all(r["target_f1"] > 0 for r in rows)
    assert [s for s, _ in edge["history"]] == [0, 3, 6]
    cached = sorted((tmp_path / "runs").iterdir())
    stamps = [p.stat().st_mtime_ns for p in cached]
    again = run_compare(job)
    assert [p.stat().st_mtime_ns for p in cached] == stamps, "finished runs must come from the cache"
    assert [r["f1_final"] for r in again] == [r["f1_final"] for r in rows]


def test_compare_cache_is_keyed_on_every_input():
    from dataclasses import replace

    from toolchain.compare import base_inputs, cache_key, run_inputs

    job = CompareJob(out="x")
    key = cache_key(run_inputs(job, "lora-edge", 4))
    for change in (
        {"steps": 301},
        {"data": "hapt:../HAPT"},
        {"layers": "pointwise"},
        {"batch_size": 64},
        {"seed": 1},
        {"eval_every": 5},
        {"pretrain_epochs": 2},
    ):
        assert cache_key(run_inputs(replace(job, **change), "lora-edge", 4)) != key, change
    assert cache_key(run_inputs(job, "lora-edge", 2)) != key and cache_key(run_inputs(job, "lora", 4)) != key
    assert cache_key(base_inputs(replace(job, data="other.npz"))) != cache_key(base_inputs(job))
    assert cache_key(base_inputs(replace(job, steps=5))) == cache_key(base_inputs(job)), (
        "the base does not depend on adaptation steps"
    )


def test_unseen_classes_reach_the_fused_model(tmp_path):
    ck, ad = tmp_path / "base.pt", tmp_path / "a.safetensors"
    assert main(["pretrain", "--out", str(ck), "--exclude-classes", "ROW,TRAP", "--epochs", "1", "--no-progress"]) == 0
    assert (
        main(["finetune", "--checkpoint", str(ck), "--out", str(ad), "--rank", "2", "--steps", "30", "--no-progress"])
        == 0
    )
    metrics = json.loads((tmp_path / "a.metrics.json").read_text())
    assert metrics["test_windows"] > 0
    paths = {k: tmp_path / f"{k}.onnx" for k in ("base", "unfused", "fused")}
    assert main(["export", "--checkpoint", str(ck), "-o", str(paths["base"])]) == 0
    assert main(["export", "--checkpoint", str(ck), "--adapter", str(ad), "-o", str(paths["unfused"])]) == 0
    assert main(["fuse", str(paths["base"]), str(ad), "-o", str(paths["fused"])]) == 0
    dims = lambda p: [d.dim_value for d in onnx.load(p).graph.output[0].type.tensor_type.shape.dim]  # noqa: E731
    assert dims(paths["base"]) == [1, 5] and dims(paths["fused"]) == [1, 7] == dims(paths["unfused"])
    assert (
        main(
            [
                "verify",
                str(paths["fused"]),
                "--reference",
                str(paths["unfused"]),
                "--out-dir",
                str(tmp_path / "v"),
                "--real",
                "4",
                "--random",
                "2",
            ]
        )
        == 0
    )
