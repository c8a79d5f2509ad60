"""`toolchain demo`: the whole pipeline on the embedded default, with a summary table."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from toolchain.core.errors import ToolchainError
from toolchain.core.jsonio import write_json

DEMOS = {
    # name: (backbone, data, pretrain epochs, finetune epochs, batch)
    "watch": ("cnn1d", "watch", 8, 15, 32),
    "digits": ("resnet18", "digits", 6, 6, 32),
}


def run_demo(out: str, *, quick: bool = False, force: bool = False, images: bool = False) -> int:
    """pretrain -> finetune (LoRA-Edge) -> export base/unfused/fused -> verify -> bench -> build.

    The embedded default: IMU windows (seglearn's watch set, cnn1d); ``images``: scikit-learn's
    digits under corruptions (ResNet-18-style net), adapting from clean scans to corrupted ones.
    """
    backbone, data, pre_epochs, ft_epochs, batch = DEMOS["digits" if images else "watch"]
    from toolchain.bench import bench
    from toolchain.export import export
    from toolchain.peft.inject import AdaptConfig
    from toolchain.train import TrainConfig
    from toolchain.trt.runtime import tensorrt_status
    from toolchain.verify import VerifyOptions, verify
    from toolchain.workflows import FinetuneJob, PretrainJob, finetune, pretrain

    d = Path(out)
    if d.exists() and not d.is_dir():
        raise ToolchainError(
            "--out names a file, not a folder", seen=str(d), remedy="choose a folder path for the demo's outputs"
        )
    if d.exists() and any(d.iterdir()) and not force:
        raise ToolchainError(
            "the demo folder is not empty",
            seen=str(d),
            remedy="pass --force to overwrite its files, or choose another --out",
        )
    d.mkdir(parents=True, exist_ok=True)
    p = {
        k: str(d / v)
        for k, v in dict(
            ckpt="base.pt", adapter="adapter.safetensors", base="base.onnx", unfused="unfused.onnx", fused="fused.onnx"
        ).items()
    }
    print(f"1/6 pretrain {backbone} on the {data} dataset's source {'domain' if images else 'subjects'}")
    pre = pretrain(
        PretrainJob(
            out=p["ckpt"],
            model=backbone,
            data=data,
            train=TrainConfig(lr=2e-3, epochs=(1 if images else 2) if quick else pre_epochs, progress=not quick),
            force=True,
        )
    )
    print(f"2/6 finetune with LoRA-Edge (rank 4) on the target {'domains' if images else 'subjects'}")
    train_cfg = TrainConfig(
        lr=5e-3,
        batch_size=batch,
        epochs=2 if quick else ft_epochs,
        steps=10 if quick and images else 0,
        progress=not quick,
    )
    ft = finetune(
        FinetuneJob(checkpoint=p["ckpt"], out=p["adapter"], adapt=AdaptConfig(rank=4), train=train_cfg, force=True)
    )
    print("3/6 export base, unfused and fused ONNX")
    exports = {
        "base": export(p["ckpt"], p["base"], force=True, check_data=data),
        "unfused": export(p["ckpt"], p["unfused"], adapter=p["adapter"], force=True, check_data=data),
        "fused": export(p["ckpt"], p["fused"], adapter=p["adapter"], fuse=True, force=True, check_data=data),
    }
    export_checks = {k: {**asdict(v["check"]), "notes": v["notes"]} for k, v in exports.items()}
    print("4/6 verify fused against unfused with Polygraphy")
    ver = verify(
        p["fused"], p["unfused"], str(d / "verify"), opts=VerifyOptions(data=data, real=8 if quick else 16, force=True)
    )
    int8 = _int8_line(p, d, data)
    print("5/6 bench base, fused and unfused with ONNX Runtime")
    lat = bench([p["base"], p["fused"], p["unfused"]], warmup=10, runs=50 if quick else 300)
    missing = tensorrt_status()
    print(f"6/6 TensorRT build: {'skipped, ' + missing if missing else 'building'}")
    build: dict[str, Any] = {"skipped": missing}
    if not missing:  # the build checks the engine against fused.onnx before writing it
        from toolchain.trt.engine import BuildOptions, build_engine

        record, _ = build_engine(p["fused"], str(d / "fused.plan"), BuildOptions(fp16=True, refit=True), force=True)
        build = asdict(record)
    report = {
        "pretrain": pre,
        "finetune": ft.to_dict(),
        "export_checks": export_checks,
        "verify": ver.to_dict(),
        "int8": int8,
        "bench": lat,
        "build": build,
    }
    write_json(d / "report.json", report)
    print(summary(report))
    return 0 if ver.passed else 1


def summary(report: dict[str, Any]) -> str:
    ft, ver, lat = report["finetune"], report["verify"], report["bench"]["results"]
    comp = ver["comparisons"]["model"]
    worst = max(v["max_abs"] for v in comp["outputs"].values())
    rows = [
        ("macro-F1 before -> after", f"{ft['f1_before']:.3f} -> {ft['f1_after']:.3f}"),
        ("accuracy before -> after", f"{ft['accuracy_before']:.3f} -> {ft['accuracy_after']:.3f}"),
        (
            "trainable parameters",
            f"{ft['trainable_params']} / {ft['total_params']} ({100 * ft['trainable_fraction']:.2f}%)",
        ),
        ("ONNX vs PyTorch (export)", _export_line(report["export_checks"])),
        (
            "parity fused vs unfused",
            f"max abs err {worst:.2e} ({'PASSED' if comp['passed'] else 'FAILED'}, atol {comp['atol']})",
        ),
        ("INT8 fused vs FP32 fused", _int8_summary(report["int8"])),
        ("latency median base", f"{lat[0]['median_ms']:.4f} ms"),
        ("latency fused / base", f"{lat[1]['ratio_to_first']:.3f}"),
        ("latency unfused / base", f"{lat[2]['ratio_to_first']:.3f}"),
        ("TensorRT engine", report["build"].get("skipped") or _engine_line(report["build"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(
        ["", f"{'step'.ljust(width)} | result", f"{'-' * width}-|-{'-' * 40}"]
        + [f"{k.ljust(width)} | {v}" for k, v in rows]
    )


def _int8_line(p: dict[str, str], d: Path, data: str) -> dict[str, Any]:
    """Quantize the base once (calibrated on the source split), fuse the adapter into it, and measure the
    fused INT8 model against the fused FP32 one on the target users' test windows."""
    from toolchain.graphs.fuse import fuse_files
    from toolchain.quantize import Calibration, quantize_file
    from toolchain.verify import VerifyOptions, task_agreement

    print("4b/6 INT8: quantize the base once, fuse the adapter into it, compare with FP32 on target test data")
    base8, fused8 = str(d / "base.int8.onnx"), str(d / "fused.int8.onnx")
    scheme = quantize_file(p["base"], base8, Calibration(data), force=True)
    fuse_files(base8, p["adapter"], fused8, force=True)
    agreement = task_agreement(fused8, p["fused"], VerifyOptions(data=data, split="target-test"))
    return {"calibration": scheme["calibration"], "agreement": asdict(agreement)}


def _int8_summary(int8: dict[str, Any]) -> str:
    a = int8["agreement"]
    return (
        f"top-1 agreement {a['top1_agreement']:.3f} on {a['windows']} target test windows, macro-F1 "
        f"{a['f1_model']:.3f} vs {a['f1_reference']:.3f} ({'PASSED' if a['passed'] else 'FAILED'}, min "
        f"{a['min_agreement']})"
    )


def _engine_line(build: dict[str, Any]) -> str:
    check = build.get("engine_check") or {}
    return (
        f"built ({build['precision']}, TensorRT {build['tensorrt_version']}), engine vs fused max abs "
        f"{check.get('max_abs', float('nan')):.2e} (PASSED, atol {check.get('tolerance')})"
    )


def _export_line(checks: dict[str, Any]) -> str:
    worst = max(max(c["max_abs"].values()) for c in checks.values())
    exporters = sorted({c["exporter"] for c in checks.values()})
    return f"max abs err {worst:.2e} over base, unfused, fused ({'/'.join(exporters)} exporter)"
