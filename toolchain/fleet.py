"""`toolchain fleet`: one adapter per user or device, each fused into ONNX and verified.

The manifest is JSON: defaults at the top, one entry per user::

    {"data": "watch",
     "users": [{"name": "wearer-08", "subjects": [8]},
               {"name": "wearer-09", "subjects": [9]},
               {"name": "bob", "data": "recordings/bob.npz"}]}

Each user is one run on the grid runner (Ray or serial, cached by every input including the
checkpoint's SHA-256): finetune on the user's adaptation windows, export the base and the unfused
adapted model, fuse the adapter into the base ONNX, and verify fused against unfused with
Polygraphy. OUT/NAME/ holds adapter.safetensors (+ metrics), base.onnx, unfused.onnx, fused.onnx
and verify/; OUT/summary.md and OUT/summary.csv hold one line per user. A user whose run fails is
reported there (and its folder removed); the others go on.

With ``int8`` (``fleet --int8 BASE.int8.onnx``, the base quantized once by ``toolchain quantize``)
each adapter is also fused into that one quantized base (fused.int8.onnx; with ``recalibrate`` its
activation scales re-derived on the user's own adaptation windows) and judged against the user's
fused FP32 model on the user's held-out test windows (int8.json: top-1 agreement and macro-F1).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolchain.adapters.methods import check_rank, get_method
from toolchain.core.errors import ToolchainError
from toolchain.core.fileio import sha256_file, write_bytes_atomic
from toolchain.core.jsonio import read_json
from toolchain.grid.runner import GridOptions, GridResult, Task, check_backend, run_grid
from toolchain.reports import write_csv
from toolchain.verify import MIN_AGREEMENT

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
USER_KEYS = {"name", "data", "subjects"}
MARKER = "fleet.json"
RESERVED = {"cache", "summary.md", "summary.csv", MARKER}  # names in OUT that are not users' folders
PRODUCED = (
    "adapter.safetensors",
    "base.onnx",
    "unfused.onnx",
    "fused.onnx",
    "verify/verify.json",
)  # checked by size and SHA-256 on a rerun
INT8_PRODUCED = ("fused.int8.onnx", "int8.json")
MAX_MANIFEST_BYTES = 1 << 20


@dataclass
class FleetJob:
    manifest: str
    checkpoint: str
    out: str
    method: str = "lora-edge"
    rank: int = 4
    layers: str = "all"
    epochs: int = 15
    seed: int = 0
    verify_real: int = 8
    verify_random: int = 4
    int8: str | None = None  # a quantized base (toolchain quantize) every adapter is also fused into
    recalibrate: bool = False  # re-derive the INT8 activation scales on each user's adaptation windows
    min_agreement: float = MIN_AGREEMENT
    force: bool = False
    opts: GridOptions = field(default_factory=GridOptions)


_MANIFEST_REMEDY = 'write {"data": ..., "users": [{"name": ..., "subjects": [...]}]}'


def read_manifest(path: str) -> list[dict[str, Any]]:
    """The users of a manifest, each with name, data and subjects (None: the data's target subjects).
    Errors name the user (by index) and the field, never echo the file's content."""
    doc = read_json(path, "the fleet manifest", _MANIFEST_REMEDY, limit=MAX_MANIFEST_BYTES)
    if not isinstance(doc, dict) or not isinstance(doc.get("users"), list) or not doc["users"]:
        raise ToolchainError(
            "the fleet manifest needs a non-empty list 'users'",
            seen=type(doc).__name__,
            remedy='{"users": [{"name": "wearer-08", "subjects": [8]}]}',
        )
    if set(doc) - {"data", "users"}:
        raise ToolchainError(
            "the fleet manifest has keys other than data and users",
            seen=sorted(set(doc) - {"data", "users"})[:3],
            remedy=_MANIFEST_REMEDY,
        )
    default = doc.get("data")
    users, seen = [], set()
    for i, u in enumerate(doc["users"]):
        if not isinstance(u, dict) or set(u) - USER_KEYS or "name" not in u:
            keys = sorted(u)[:5] if isinstance(u, dict) else type(u).__name__
            raise ToolchainError(
                f"manifest user {i} must be an object with name and optionally data, subjects",
                seen=f"keys {keys}",
                remedy=f"use only the keys {sorted(USER_KEYS)}",
            )
        name = u["name"]
        if not isinstance(name, str) or not NAME.match(name) or name in seen or name in RESERVED:
            raise ToolchainError(
                f"manifest user {i}: names must be unique, 1-64 of A-Z a-z 0-9 . _ - (they become folder "
                f"names), and none of {sorted(RESERVED)}",
                seen=f"field name of user {i}",
                remedy="rename the user",
            )
        seen.add(name)
        data = u.get("data", default)
        if not isinstance(data, str) or not data:
            raise ToolchainError(
                f"manifest user {name!r} has no data (and the manifest no default 'data')",
                seen=f"field data of user {i}",
                remedy="add 'data' to the user or the manifest",
            )
        subjects = u.get("subjects")
        if subjects is not None and (
            not isinstance(subjects, list) or not subjects or not all(type(s) is int for s in subjects)
        ):
            raise ToolchainError(
                f"manifest user {name!r}: subjects must be a non-empty list of integers",
                seen=f"field subjects of user {i}",
                remedy="e.g. [8, 9]",
            )
        users.append({"name": name, "data": data, "subjects": subjects})
    return users


def _check_out(job: FleetJob) -> Path:
    out = Path(job.out)
    if out.exists() and not out.is_dir():
        raise ToolchainError("the fleet output must be a folder", seen=str(out), remedy="choose a new folder name")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not job.force:
        raise ToolchainError(
            "the fleet output folder is not empty and is not a fleet folder, so it is left alone",
            seen=str(out),
            remedy="choose a new folder, or pass --force",
        )
    return out


def _check_int8(job: FleetJob) -> str | None:
    """The SHA-256 of ``job.int8`` once it is known to be a quantized model of this checkpoint (None
    without --int8): every user would fail the same way, so it is refused before any training."""
    if job.int8 is None:
        if job.recalibrate:
            raise ToolchainError("--recalibrate needs --int8", seen="no --int8", remedy="add --int8 BASE.int8.onnx")
        return None
    from toolchain.graphs.onnx_io import load_onnx
    from toolchain.graphs.provenance import read_provenance
    from toolchain.graphs.qdq import is_quantized

    if not Path(job.int8).is_file():
        raise ToolchainError(
            "--int8 is not a file", seen=job.int8, remedy="pass the model `toolchain quantize` wrote from base.onnx"
        )
    if not (isinstance(job.min_agreement, int | float) and 0.0 <= job.min_agreement <= 1.0):
        raise ToolchainError("--min-agreement must be a number in [0, 1]", seen=job.min_agreement, remedy="e.g. 0.99")
    model = load_onnx(job.int8)
    if not is_quantized(model):
        raise ToolchainError(
            "--int8 must be a quantized model (QuantizeLinear/DequantizeLinear), the base quantized once",
            seen=f"{job.int8}: no QDQ nodes",
            remedy="toolchain quantize base.onnx -o base.int8.onnx --data SPEC",
        )
    prov = read_provenance(model)
    digest = sha256_file(job.checkpoint)
    if prov is not None and (prov.kind != "base" or prov.checkpoint_sha256 not in (None, digest)):
        raise ToolchainError(
            "--int8 must be the quantized base of --checkpoint",
            seen=f"kind {prov.kind}, checkpoint sha256 {str(prov.checkpoint_sha256)[:12]} vs {digest[:12]}",
            remedy="export base.onnx from this checkpoint and quantize it (toolchain export, toolchain quantize)",
        )
    return sha256_file(job.int8)


def run_fleet(job: FleetJob) -> tuple[list[dict[str, Any]], GridResult]:
    """Adapt, fuse and verify every user of the manifest; write OUT/summary.{md,csv}."""
    users = read_manifest(job.manifest)
    check_rank(job.method, job.rank)
    if not Path(job.checkpoint).is_file():
        raise ToolchainError(
            "the checkpoint is not a file", seen=job.checkpoint, remedy="pass the .pt that pretrain wrote"
        )
    if job.layers not in ("all", "pointwise"):
        from toolchain.core.patterns import compile_user_pattern

        compile_user_pattern(job.layers, "--layers", "pass all, pointwise or a regex on module names")
    int8_sha256 = _check_int8(job)
    check_backend(job.opts)
    out = _check_out(job)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        write_bytes_atomic(
            out / MARKER,
            json.dumps(
                {"manifest": str(job.manifest), "checkpoint": str(job.checkpoint), "int8": job.int8, "users": users},
                indent=1,
            ).encode(),
        )
    except BaseException:
        if created:  # a full disk or a signal: no empty folder stays behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    digest = sha256_file(job.checkpoint)
    settings = {
        "method": job.method,
        "rank": job.rank,
        "layers": job.layers,
        "epochs": job.epochs,
        "seed": job.seed,
        "verify_real": job.verify_real,
        "verify_random": job.verify_random,
    }
    if int8_sha256:  # only then: an FP32 fleet keeps the cache keys it always had
        settings |= {"int8_sha256": int8_sha256, "recalibrate": job.recalibrate, "min_agreement": job.min_agreement}
    produced = PRODUCED + (INT8_PRODUCED if job.int8 else ())
    paths = {"checkpoint": str(job.checkpoint)} | ({"int8": str(job.int8)} if job.int8 else {})
    tasks = [
        Task(
            "toolchain.fleet:fleet_task",
            {**u, **settings, "checkpoint_sha256": digest},
            paths | {"dir": str(out / u["name"])},
            tuple(str(out / u["name"] / f) for f in produced),
        )
        for u in users
    ]
    res = run_grid(tasks, out / "cache", job.opts, "fleet")
    rows: list[dict[str, Any]] = [r for r in res.results if r is not None]
    for f in res.failed:
        shutil.rmtree(out / f["inputs"]["name"], ignore_errors=True)  # no half-made user folder stays behind
        rows.append({"name": f["inputs"]["name"], "status": "failed", "error": f["error"]})
    order = {u["name"]: i for i, u in enumerate(users)}
    rows.sort(key=lambda r: order[r["name"]])
    write_summary(rows, out)
    return rows, res


def fleet_task(inputs: dict[str, Any]) -> dict[str, Any]:
    """One user: finetune, export base and unfused, fuse, verify (a grid task)."""
    from toolchain.export import export
    from toolchain.graphs.fuse import fuse_files
    from toolchain.peft.inject import AdaptConfig
    from toolchain.train import TrainConfig
    from toolchain.verify import VerifyOptions, verify
    from toolchain.workflows import FinetuneJob, finetune

    d = Path(inputs["dir"])
    shutil.rmtree(d, ignore_errors=True)  # a folder left by a killed run of this same user
    d.mkdir(parents=True)
    try:
        ck, ad = inputs["checkpoint"], str(d / "adapter.safetensors")
        spec = get_method(inputs["method"])
        job = FinetuneJob(
            checkpoint=ck,
            out=ad,
            adapt=AdaptConfig(method=inputs["method"], rank=inputs["rank"], layers=inputs["layers"]),
            data=inputs["data"],
        )
        job.subjects = tuple(inputs["subjects"]) if inputs["subjects"] else None
        job.train = TrainConfig(lr=spec.lr, batch_size=32, epochs=inputs["epochs"], seed=inputs["seed"], progress=False)
        m = finetune(job)
        export(ck, str(d / "base.onnx"))
        export(ck, str(d / "unfused.onnx"), adapter=ad)
        fuse_files(d / "base.onnx", ad, d / "fused.onnx")
        report = verify(
            str(d / "fused.onnx"),
            str(d / "unfused.onnx"),
            str(d / "verify"),
            opts=VerifyOptions(data=inputs["data"], real=inputs["verify_real"], random=inputs["verify_random"]),
        )
        int8 = _int8_task(inputs, d, tuple(m.target_subjects)) if "int8" in inputs else {}
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    errs = report.comparisons["model"].outputs
    return int8 | {
        "name": inputs["name"],
        "status": "ok",
        "subjects": m.target_subjects,
        "f1_before": m.f1_before,
        "f1_after": m.f1_after,
        "trainable_fraction": m.trainable_fraction,
        "adapter_bytes": m.adapter_bytes,
        "train_seconds": m.train_seconds,
        "verify_passed": report.passed,
        "max_abs_error": max(v.max_abs for v in errs.values()),
        "fused": str(d / "fused.onnx"),
    }


def _int8_task(inputs: dict[str, Any], d: Path, subjects: tuple[int, ...]) -> dict[str, Any]:
    """Fuse the user's adapter into the quantized base (recalibrated on the user's adaptation windows
    when asked) and measure it against the user's fused FP32 model on the user's test windows."""
    from dataclasses import asdict

    from toolchain.core.jsonio import dumps_json
    from toolchain.graphs.fuse import fuse_files
    from toolchain.quantize import RECALIBRATE_SPLIT, Calibration, recalibrate
    from toolchain.verify import VerifyOptions, task_agreement

    cal = Calibration(inputs["data"], RECALIBRATE_SPLIT, subjects=subjects)

    def on_user_windows(model: Any) -> None:
        recalibrate(model, cal)

    after = on_user_windows if inputs["recalibrate"] else None
    fuse_files(inputs["int8"], d / "adapter.safetensors", d / "fused.int8.onnx", after=after)
    opts = VerifyOptions(
        data=inputs["data"], split="target-test", subjects=subjects, min_agreement=inputs["min_agreement"]
    )
    agreement = task_agreement(str(d / "fused.int8.onnx"), str(d / "fused.onnx"), opts)
    record = {"recalibrated": bool(inputs["recalibrate"]), "subjects": list(subjects), **asdict(agreement)}
    write_bytes_atomic(d / "int8.json", dumps_json(record))
    return {
        "int8_agreement": agreement.top1_agreement,
        "int8_f1": agreement.f1_model,
        "fp32_test_f1": agreement.f1_reference,
        "int8_passed": agreement.passed,
        "fused_int8": str(d / "fused.int8.onnx"),
    }


COLUMNS = [
    "name",
    "status",
    "subjects",
    "f1_before",
    "f1_after",
    "trainable_fraction",
    "adapter_bytes",
    "train_seconds",
    "verify_passed",
    "max_abs_error",
    "fused",
    "int8_agreement",
    "int8_f1",
    "fp32_test_f1",
    "int8_passed",
    "fused_int8",
    "error",
]


def _int8_cell(r: dict[str, Any]) -> str:
    return (
        f" {'passed' if r['int8_passed'] else 'FAILED'}, agreement {r['int8_agreement']:.4f}, F1 "
        f"{r['int8_f1']:.3f} vs {r['fp32_test_f1']:.3f} |"
    )


def write_summary(rows: list[dict[str, Any]], out: Path) -> None:
    write_csv(out / "summary.csv", rows, COLUMNS)
    int8 = any("int8_agreement" in r for r in rows)
    head = " INT8 vs FP32 fused (target test) |" if int8 else ""
    lines = [
        f"| user | status | F1 before | F1 after | trained % | adapter KiB | parity (fused vs unfused) |{head} error |",
        "|---|---|---|---|---|---|---|" + ("---|" if int8 else "") + "---|",
    ]
    for r in rows:
        if r["status"] == "ok":
            parity = f"{'passed' if r['verify_passed'] else 'FAILED'}, max abs {r['max_abs_error']:.1e}"
            lines.append(
                f"| {r['name']} | ok | {r['f1_before']:.3f} | {r['f1_after']:.3f} | "
                f"{100 * r['trainable_fraction']:.2f} | {r['adapter_bytes'] / 1024:.1f} | {parity} |"
                + (_int8_cell(r) if int8 else "")
                + " |"
            )
        else:
            empty = " |" if int8 else ""
            lines.append(f"| {r['name']} | failed | | | | | |{empty} {r['error'][:200].replace('|', '/')} |")
    write_bytes_atomic(out / "summary.md", ("\n".join(lines) + "\n").encode())
