"""The grid runner: serial and Ray give the same results, a grid resumes, failures are reported."""

import json
import sys
from dataclasses import replace

import pytest

from tests.toolchain.grid import fns
from toolchain.compare import CompareJob, run_compare
from toolchain.core.errors import ToolchainError
from toolchain.grid.runner import GridOptions, Task, parse_shard, run_grid

QUIET = GridOptions(progress=False)


def _tasks(xs, **context):
    return [Task("tests.toolchain.grid.fns:square", {"x": x}, dict(context)) for x in xs]


def test_failing_run_is_reported_and_the_others_finish(tmp_path):
    res = run_grid(_tasks([1, -2, 3]), tmp_path, QUIET)
    assert [r and r["y"] for r in res.results] == [1, None, 9]
    assert (
        len(res.failed) == 1
        and res.failed[0]["error"] == "ValueError: negative input -2"
        and res.failed[0]["inputs"] == {"x": -2}
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{t.key}.json" for t in _tasks([1, 3])), (
        "failures are not cached"
    )
    fns.CALLS.clear()
    again = run_grid(_tasks([1, -2, 3]), tmp_path, QUIET)
    assert fns.CALLS == [-2] and again.cached == 2 and again.ran == 0, "a rerun retries only the failed run"


def test_interrupted_grid_resumes_without_redoing_finished_runs(tmp_path):
    tasks = _tasks([1, 2, 3, 4])
    tasks[2] = replace(tasks[2], context={"stop": True})  # same key: the context is not an input
    with pytest.raises(KeyboardInterrupt):
        run_grid(tasks, tmp_path, QUIET)
    assert len(list(tmp_path.iterdir())) == 2
    fns.CALLS.clear()
    res = run_grid(_tasks([1, 2, 3, 4]), tmp_path, QUIET)
    assert fns.CALLS == [3, 4] and [r["y"] for r in res.ok] == [1, 4, 9, 16]


def test_cache_is_keyed_on_inputs_and_checks_produced_files(tmp_path):
    out = tmp_path / "made.txt"
    t = Task("tests.toolchain.grid.fns:square", {"x": 5}, produces=(str(out),))
    assert t.key != _tasks([6])[0].key and t.key == _tasks([5])[0].key
    run_grid([t], tmp_path / "c", QUIET)
    fns.CALLS.clear()
    run_grid([t], tmp_path / "c", QUIET)
    assert fns.CALLS == [5], "a cached run whose output file is gone runs again"
    out.write_text("x")
    fns.CALLS.clear()
    run_grid([t], tmp_path / "c", QUIET)
    assert fns.CALLS == [5], "the record did not know this file: run again"
    fns.CALLS.clear()
    run_grid([t], tmp_path / "c", QUIET)
    assert fns.CALLS == [], "the record knows the file's size and SHA-256 now"
    out.write_text("y")  # replaced (or truncated) since the run
    run_grid([t], tmp_path / "c", QUIET)
    assert fns.CALLS == [5]


@pytest.mark.parametrize(
    "damage", ["edited result", "edited inputs", "old format", "symlink to /dev/zero", "fifo", "not an object"]
)
def test_a_damaged_cache_record_runs_again_and_never_hangs(tmp_path, damage):
    import os

    t = _tasks([6])[0]
    run_grid([t], tmp_path, QUIET)
    path = tmp_path / f"{t.key}.json"
    rec = json.loads(path.read_text())
    if damage == "edited result":
        rec["result"]["y"] = 0
        path.write_text(json.dumps(rec))
    elif damage == "edited inputs":
        rec["inputs"]["x"] = 7
        path.write_text(json.dumps(rec))
    elif damage == "old format":
        del rec["format"], rec["digest"]
        path.write_text(json.dumps(rec))
    elif damage == "symlink to /dev/zero":
        path.unlink()
        path.symlink_to("/dev/zero")
    elif damage == "fifo":
        path.unlink()
        os.mkfifo(path)
    else:
        path.write_text("[1, 2]")
    fns.CALLS.clear()
    assert run_grid([t], tmp_path, QUIET).ok == [{"x": 6, "y": 36}] and fns.CALLS == [6]


def test_a_torn_cache_file_is_run_again(tmp_path):
    t = _tasks([7])[0]
    (tmp_path / f"{t.key}.json").write_text('{"status": "ok", "res')
    fns.CALLS.clear()
    assert run_grid([t], tmp_path, QUIET).ok == [{"x": 7, "y": 49}] and fns.CALLS == [7]
    assert json.loads((tmp_path / f"{t.key}.json").read_text())["result"]["y"] == 49


def test_shards_split_the_grid_between_processes(tmp_path):
    tasks = _tasks(range(12))
    fns.CALLS.clear()
    parts = [run_grid(tasks, tmp_path / "c", replace(QUIET, shard=(i, 3))).ran for i in range(3)]
    assert sum(parts) == 12 and sorted(fns.CALLS) == list(range(12)) and max(parts) < 12
    collected = run_grid(tasks, tmp_path / "c", replace(QUIET, run_missing=False))
    assert [r["y"] for r in collected.ok] == [x * x for x in range(12)]


@pytest.mark.parametrize(
    ("text", "ok"), [("0/1", (0, 1)), ("3/4", (3, 4)), ("4/4", None), ("-1/2", None), ("a/b", None), ("1", None)]
)
def test_parse_shard(text, ok):
    if ok:
        assert parse_shard(text) == ok
    else:
        with pytest.raises(ToolchainError, match="--shard"):
            parse_shard(text)


SMALL = {
    "methods": ("lora-edge", "head", "full"),
    "ranks": (2,),
    "steps": 6,
    "eval_every": 3,
    "pretrain_epochs": 1,
    "progress": False,
}


def _comparable(rows):
    return [(r["method"], r["rank"], r["seed"], r["history"], r["f1_final"], r["trainable_params"]) for r in rows]


def test_serial_fallback_runs_without_ray(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as where the grid extra is not installed
    rows = run_compare(CompareJob(out=str(tmp_path / "a"), **SMALL))
    assert [r["method"] for r in rows] == ["lora-edge", "head", "full"]
    with pytest.raises(ToolchainError, match=r"toolchain\[grid\]"):
        run_compare(CompareJob(out=str(tmp_path / "b"), ray="auto", **SMALL))


def test_ray_grid_equals_the_serial_grid(tmp_path):
    pytest.importorskip("ray", reason="Ray (the grid extra) is not installed")
    serial = run_compare(CompareJob(out=str(tmp_path / "serial"), seeds=2, **SMALL))
    on_ray = run_compare(CompareJob(out=str(tmp_path / "ray"), seeds=2, ray="auto", workers=2, **SMALL))
    assert len(serial) == 6 and _comparable(on_ray) == _comparable(serial)
    assert {r["seed"] for r in serial} == {0, 1}


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("nonsense", "HOST:PORT"),
        ("ray://:6379", "HOST:PORT"),
        ("127.0.0.1:1", "no Ray cluster answers"),
        ("127.0.0.1:\u0666\u0663\u0667\u0669", "HOST:PORT"),
        ("h" * 300 + ":6379", "HOST:PORT"),
        ("127.0.0.1:99999", "HOST:PORT"),
    ],
)
def test_a_ray_address_that_cannot_work_is_refused_before_any_output(tmp_path, address, message):
    pytest.importorskip("ray", reason="Ray (the grid extra) is not installed")
    with pytest.raises(ToolchainError, match=message):
        run_compare(CompareJob(out=str(tmp_path / "out"), ray=address, **SMALL))
    assert not (tmp_path / "out").exists()


def test_serial_runs_use_one_thread_and_give_the_callers_setting_back(tmp_path):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = run_grid([Task("tests.toolchain.grid.fns:threads", {})], tmp_path, QUIET).ok
        assert seen == [{"threads": 1}] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_port_that_answers_but_is_not_ray_is_refused_in_seconds(tmp_path):
    """R20: ray.init waited minutes on a port that accepted connections but was not Ray."""
    import socket
    import threading
    import time

    pytest.importorskip("ray", reason="Ray (the grid extra) is not installed")
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        conn, _ = server.accept()
        conn.recv(100)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")  # a web server, not a gRPC one
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(ToolchainError, match="answers, but not as a Ray head"):
        run_compare(CompareJob(out=str(tmp_path / "out"), ray=f"127.0.0.1:{port}", **SMALL))
    assert time.monotonic() - start < 30 and not (tmp_path / "out").exists()
    server.close()
