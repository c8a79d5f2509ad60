"""Run a grid of independent runs, on Ray or serially in-process, with a resumable cache.

A run is a :class:`Task`: an importable function (``"module:function"``) and a JSON-able dict of
every input it depends on. Its cache key is the SHA-256 of those inputs (and the toolchain
version), so a changed input never reuses a result. Finished runs are written as
``CACHE/<key>.json`` as they arrive; a grid that is interrupted and run again skips them. A run
that raises is reported in :class:`GridResult` ``failed`` (and not cached, so the next run of the
grid tries it again); it never stops the others.

Backends: ``ray=None`` runs the tasks in this process, one after another; ``ray="auto"`` starts Ray
locally (``workers`` CPUs, all by default); any other value is the address of a running Ray cluster
(``ray start --head`` prints it), whose nodes must see ``cache`` and the data at the same paths.
Each run gets 1 CPU and torch is limited to ``threads`` threads in it (1 by default), on both
backends, so a grid gives the same numbers serially and on Ray.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolchain import __version__
from toolchain.core.errors import ToolchainError
from toolchain.core.fileio import sha256_file, write_bytes_atomic
from toolchain.core.jsonio import read_json

RAY_HINT = "pip install 'toolchain[grid]' (Ray), or leave out --ray to run the grid serially in this process"


@dataclass(frozen=True)
class Task:
    """One run: ``fn`` ("package.module:function") called with ``inputs``, which must hold every
    value the result depends on (the cache key is computed from them)."""

    fn: str
    inputs: dict[str, Any]
    context: dict[str, Any] = field(default_factory=dict)  # where to write (paths): passed, not keyed
    produces: tuple[str, ...] = ()  # files the run writes: a cached result whose files are gone runs again

    @property
    def key(self) -> str:
        return cache_key({"fn": self.fn, "inputs": self.inputs, "version": __version__})


@dataclass
class GridResult:
    """Results in task order (None where the run failed), the failures, and how the grid ran."""

    results: list[dict[str, Any] | None]
    failed: list[dict[str, Any]] = field(default_factory=list)
    cached: int = 0
    ran: int = 0
    seconds: float = 0.0
    backend: str = "serial"

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [r for r in self.results if r is not None]


def cache_key(inputs: dict[str, Any]) -> str:
    """A short digest of ``inputs`` (sorted JSON): 16 hex characters."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N: this process runs the tasks whose key is I modulo N."""
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit()) or not 0 <= int(i) < int(n):
        raise ToolchainError(
            "--shard takes I/N with 0 <= I < N", seen=text, remedy="e.g. --shard 0/4 ... --shard 3/4 in four processes"
        )
    return int(i), int(n)


def execute(task: Task, threads: int = 1) -> dict[str, Any]:
    """Run one task here: ``{"status": "ok", "result": ...}`` or ``{"status": "failed", "error": ...}``."""
    torch: Any
    try:
        import torch
    except ImportError:  # a torch-free task
        torch = None
    before = torch.get_num_threads() if torch else 0
    if torch:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        module, _, name = task.fn.partition(":")
        fn: Callable[[dict[str, Any]], dict[str, Any]] = getattr(importlib.import_module(module), name)
        result = fn({**task.context, **task.inputs})
        return {"status": "ok", "result": result, "seconds": time.perf_counter() - start}
    except Exception as err:  # a failed run is reported, never fatal to the grid
        return {
            "status": "failed",
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(limit=8),
            "seconds": time.perf_counter() - start,
        }
    finally:
        if torch:
            torch.set_num_threads(before)  # in-process (serial) runs leave the caller's setting as it was


@dataclass(frozen=True)
class GridOptions:
    """How a grid runs. ray: None (serially, here), "auto" (a local Ray of ``workers`` CPUs) or a
    cluster address. threads: torch threads per run. shard: (I, N), run only the tasks whose key
    is I modulo N. run_missing: False only collects what the cache holds."""

    ray: str | None = None
    workers: int | None = None
    threads: int = 1
    shard: tuple[int, int] = (0, 1)
    progress: bool = True
    run_missing: bool = True


def run_grid(tasks: list[Task], cache: str | Path, opts: GridOptions = GridOptions(), desc: str = "grid") -> GridResult:
    """Run every task not already in ``cache`` (none with ``run_missing=False``: collect only);
    return all results in task order."""
    ray, threads, shard = opts.ray, opts.threads, opts.shard
    check_backend(opts)
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: list[dict[str, Any] | None] = [None] * len(tasks)
    todo: list[int] = []
    for i, t in enumerate(tasks):
        hit = read_record(cache / f"{t.key}.json", t)
        if hit is not None:
            results[i] = hit
        elif (
            opts.run_missing and int(t.key, 16) % shard[1] == shard[0]
        ):  # by key: shards get a fair mix, not every N-th method
            todo.append(i)
    out = GridResult(
        results, cached=sum(r is not None for r in results), backend="serial" if ray is None else f"ray:{ray}"
    )
    started_ray = ray is not None and not _ray_initialized()
    run = _run_serial(tasks, todo, threads) if ray is None else _run_ray(tasks, todo, threads, ray, opts.workers)
    bar = _bar(len(todo), opts.progress, desc)
    try:
        for i, rec in run:
            bar.update(1)
            if rec["status"] == "ok":
                write_record(cache / f"{tasks[i].key}.json", tasks[i], rec)
                results[i] = rec["result"]
                out.ran += 1
            else:
                out.failed.append(
                    {
                        "index": i,
                        "fn": tasks[i].fn,
                        "inputs": tasks[i].inputs,
                        "error": rec["error"],
                        "traceback": rec.get("traceback", ""),
                    }
                )
                bar.write(f"run {i} failed: {rec['error']}")
    finally:
        bar.close()
        if started_ray:
            _ray_shutdown()
    out.seconds = time.perf_counter() - start
    return out


RECORD_FORMAT = 2
MAX_RECORD_BYTES = 16 << 20


def _normal(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(value, default=str))


def _file_facts(paths: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of each file (size -1 for one that is missing: such a record never matches)."""
    return {
        p: {"size": Path(p).stat().st_size, "sha256": sha256_file(p)}
        if Path(p).is_file()
        else {"size": -1, "sha256": ""}
        for p in paths
    }


def _digest(body: dict[str, Any]) -> str:
    fields = {k: body.get(k) for k in ("format", "fn", "inputs", "result", "files")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def write_record(path: Path, task: Task, rec: dict[str, Any]) -> None:
    """A finished run: its inputs, result, the size and SHA-256 of every file it produced, and a
    digest over all of them (an edited or torn record no longer matches and runs again)."""
    body = _normal(
        {
            "format": RECORD_FORMAT,
            "fn": task.fn,
            "inputs": task.inputs,
            "status": "ok",
            "result": rec["result"],
            "seconds": rec.get("seconds"),
            "files": _file_facts(task.produces),
        }
    )
    body["digest"] = _digest(body)
    write_bytes_atomic(path, json.dumps(body, indent=1).encode())


def read_record(path: Path, task: Task) -> dict[str, Any] | None:
    """The cached result of ``task``, or None (run it again) when the record is absent, not a regular
    file, not strict JSON, of another format or task, edited (digest), or when a file it produced is
    gone or changed."""
    if not path.exists() and not path.is_symlink():
        return None
    try:
        rec = read_json(path, "a grid cache record", "it will be run again", limit=MAX_RECORD_BYTES)
    except ToolchainError:
        return None
    if (
        not isinstance(rec, dict)
        or rec.get("format") != RECORD_FORMAT
        or rec.get("status") != "ok"
        or not isinstance(rec.get("result"), dict)
    ):
        return None
    if rec.get("fn") != task.fn or rec.get("inputs") != _normal(task.inputs) or rec.get("digest") != _digest(rec):
        return None
    files = rec.get("files")
    if not isinstance(files, dict) or set(files) != set(task.produces):
        return None
    try:
        if not all(Path(p).is_file() for p in task.produces) or _file_facts(task.produces) != files:
            return None  # a produced file is gone, truncated or replaced since the run
    except OSError:
        return None
    return rec["result"]


def _run_serial(tasks: list[Task], todo: list[int], threads: int) -> Iterator[tuple[int, dict[str, Any]]]:
    for i in todo:
        yield i, execute(tasks[i], threads)


def _run_ray(
    tasks: list[Task], todo: list[int], threads: int, address: str, workers: int | None
) -> Iterator[tuple[int, dict[str, Any]]]:
    ray = _import_ray()
    if not ray.is_initialized():
        try:
            if address == "auto":  # a fresh local Ray on this machine
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
        except Exception as err:  # Ray raises ConnectionError, ValueError, RuntimeError, ... for an unreachable cluster
            seen = f"--ray {address}: {type(err).__name__}: {str(err)[:200]}"
            raise ToolchainError(
                "could not start or join Ray",
                seen=seen,
                remedy="--ray auto starts one here; for a cluster, pass the address `ray start --head` printed",
            ) from None
    remote = ray.remote(num_cpus=1, max_retries=0)(execute)
    pending = {remote.remote(tasks[i], threads): i for i in todo}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            i = pending.pop(ref)
            try:
                rec = ray.get(ref)
            except Exception as err:  # a worker that died (OOM, killed) fails its run only
                rec = {"status": "failed", "error": f"ray: {type(err).__name__}: {str(err)[:300]}"}
            yield i, rec


def check_backend(opts: GridOptions) -> None:
    """Before any output exists: the options are sane, Ray is importable and a cluster address
    answers (5 s)."""
    if opts.threads < 1 or (opts.workers is not None and opts.workers < 1):
        raise ToolchainError("--threads and --workers must be at least 1", seen=(opts.threads, opts.workers))
    if not 0 <= opts.shard[0] < opts.shard[1]:
        raise ToolchainError("--shard takes I/N with 0 <= I < N", seen=opts.shard)
    if opts.ray is None:
        return
    _import_ray()
    if opts.ray == "auto":
        return
    host, _, port = opts.ray.removeprefix("ray://").rpartition(":")
    if not _HOST.fullmatch(host) or not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
        rule = "--ray takes auto or a cluster address HOST:PORT (ASCII host name or IP, port 1-65535)"
        raise ToolchainError(
            rule, seen=opts.ray[:80], remedy="e.g. --ray 10.0.0.5:6379 (what `ray start --head` printed)"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5) as conn:
            speaks = _speaks_grpc(conn)
    except (OSError, UnicodeError, ValueError) as err:
        raise ToolchainError(
            "no Ray cluster answers at --ray",
            seen=f"{opts.ray}: {err}",
            remedy="start it with `ray start --head` there, or use --ray auto for one on this machine",
        ) from None
    if not speaks:
        raise ToolchainError(
            "the --ray address answers, but not as a Ray head (its GCS speaks gRPC over HTTP/2)",
            seen=opts.ray,
            remedy="pass the address `ray start --head` printed (usually port 6379)",
        )


_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\]")
_PORT = re.compile(r"[0-9]{1,5}")
_H2_PREFACE = (
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
)  # preface, then an empty SETTINGS frame


def _speaks_grpc(conn: socket.socket, timeout: float = 3.0) -> bool:
    """A gRPC server answers the HTTP/2 preface with a SETTINGS frame (type 4) within seconds; a port
    that is something else answers otherwise or not at all (ray.init would wait there for minutes)."""
    conn.settimeout(timeout)
    try:
        conn.sendall(_H2_PREFACE)
        head = b""
        while len(head) < 9:
            chunk = conn.recv(9 - len(head))
            if not chunk:
                return False
            head += chunk
    except OSError:
        return False
    return head[3] == 4


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ToolchainError(
            "--ray needs Ray, which is not installed", seen="import ray failed", remedy=RAY_HINT
        ) from None
    return ray


def _ray_initialized() -> bool:
    return bool(_import_ray().is_initialized())


def _ray_shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _bar(total: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="run", desc=desc, dynamic_ncols=True)
