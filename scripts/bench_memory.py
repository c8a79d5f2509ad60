"""Training memory a user can rely on: whole-process peak RSS with the allocator controlled.

For each built-in backbone (cnn1d, resnet1d, mobilenet1d on watch windows at batch 512; resnet18,
mobilenetv2 on digits images at batch 256; the mobilenets adapt their pointwise convs) and each
configuration (head only, full fine-tuning, LoRA-Edge on the lean path, PEFT's LoRA on the same convs),
run 3 training steps in a fresh process under `/usr/bin/time -f %M` (GNU time, not this project's
code), twice with glibc's default allocator and twice with `MALLOC_MMAP_THRESHOLD_=131072` (large
blocks come from mmap and go back to the system when freed). Report peak RSS above the head-only run
as a fraction of full fine-tuning's, per allocator, every run shown.

    python3 scripts/bench_memory.py --out runs/bench_memory.json     # about 30 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BACKBONES = {  # data, batch, layers adapted (LoRA-Edge and PEFT's LoRA alike)
    "cnn1d": ("watch", 512, "all"),
    "resnet1d": ("watch", 512, "all"),
    "mobilenet1d": ("watch", 512, "pointwise"),
    "resnet18": ("digits", 256, "all"),
    "mobilenetv2": ("digits", 256, "pointwise"),
}
CONFIGS = ("head", "full", "lora-edge", "peft-lora")
ALLOCATORS = {"glibc default": {}, "MALLOC_MMAP_THRESHOLD_=131072": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
PEFT_DRIVER = """
import sys, torch, peft
import torch.nn.functional as F
from toolchain.data.sources import load_data
from toolchain.models.registry import load_checkpoint
ckpt, data, batch, layers = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
net, payload = load_checkpoint(ckpt)
convs = [n for n, m in net.named_modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d))
         and (layers == "all" or (all(k == 1 for k in m.kernel_size) and m.groups == 1))]
model = peft.get_peft_model(net, peft.LoraConfig(r=4, lora_alpha=4, target_modules=convs))
model.train()
for m in model.modules():
    if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
        m.eval()
ds = load_data(data)
x, y = torch.from_numpy(ds.X[:batch]), torch.from_numpy(ds.y[:batch])
opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
for _ in range(3):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
"""


def _pretrain(d: Path, backbone: str, data: str) -> Path:
    ck = d / f"{backbone}.pt"
    if not ck.is_file():
        subprocess.run(
            [
                "toolchain",
                "pretrain",
                "--model",
                backbone,
                "--data",
                data,
                "--epochs",
                "1",
                "--out",
                str(ck),
                "--no-progress",
            ],
            check=True,
            capture_output=True,
        )
    return ck


def _command(config: str, ck: Path, data: str, batch: int, out: Path, layers: str = "all") -> list[str]:
    if config == "peft-lora":
        return [sys.executable, "-c", PEFT_DRIVER, str(ck), data, str(batch), layers]
    method = {"lora-edge": "lora-edge"}.get(config, config)
    return [
        "toolchain",
        "finetune",
        "--checkpoint",
        str(ck),
        "--method",
        method,
        "--batch-size",
        str(batch),
        "--steps",
        "3",
        "--layers",
        layers,
        "--out",
        str(out),
        "--force",
        "--no-progress",
    ]


def peak_mib(cmd: list[str], env: dict[str, str]) -> float:
    """GNU time's maximum resident set size of the whole process, in MiB."""
    with tempfile.NamedTemporaryFile(suffix=".txt") as f:
        subprocess.run(
            ["/usr/bin/time", "-o", f.name, "-f", "%M", *cmd],
            check=True,
            capture_output=True,
            env={**os.environ, **env},
        )
        return int(Path(f.name).read_text().split()[-1]) / 1024


def measure(work: Path, repeats: int, backbones: list[str]) -> list[dict]:
    rows = []
    for backbone in backbones:
        data, batch, layers = BACKBONES[backbone]
        ck = _pretrain(work, backbone, data)
        for alloc, env in ALLOCATORS.items():
            for run in range(repeats):
                for config in CONFIGS:  # interleaved: a run of every config, then the next repeat
                    mib = peak_mib(_command(config, ck, data, batch, work / "a.safetensors", layers), env)
                    rows.append(
                        {"backbone": backbone, "allocator": alloc, "run": run, "config": config, "peak_mib": mib}
                    )
                    print(json.dumps(rows[-1]), flush=True)
    return rows


ACCOUNTED = {
    "cnn1d": ((6, 128), 512, "all"),
    "resnet1d": ((6, 128), 512, "all"),
    "mobilenet1d": ((6, 128), 512, "pointwise"),
    "resnet18": ((1, 32, 32), 256, "all"),
    "mobilenetv2": ((1, 32, 32), 256, "pointwise"),
}


def accounted() -> list[dict]:
    """Accounted memory of one training step (parameters, gradients, optimizer state, saved
    activations; toolchain.profile.step_memory): LoRA-Edge on the lean path vs full fine-tuning."""
    import torch

    from toolchain.adapters.methods import get_method
    from toolchain.models.registry import build_model
    from toolchain.peft.inject import AdaptConfig, inject, set_train_mode
    from toolchain.peft.lean import lean_training
    from toolchain.profile import step_memory
    from toolchain.workflows import make_optimizer

    rows = []
    for backbone, (shape, batch, layers) in ACCOUNTED.items():
        got = {}
        for method in ("full", "lora-edge"):
            torch.manual_seed(0)
            model = build_model(backbone, shape[0], 10, len(shape) - 1)
            cfg = AdaptConfig(method=method, rank=4, layers=layers)
            inject(model, cfg)
            opt = make_optimizer(model, cfg, get_method(method).lr)
            x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
            with lean_training(model, method != "full"):
                got[method] = step_memory(model, opt, x, y, lambda m: set_train_mode(m, False)).total_bytes / 2**20
        rows.append(
            {
                "backbone": backbone,
                "batch": batch,
                "full_mib": got["full"],
                "lora_edge_mib": got["lora-edge"],
                "ratio": got["lora-edge"] / got["full"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def summary(rows: list[dict]) -> str:
    lines = [
        "| backbone | allocator | run | head MiB | full above head | LoRA-Edge above head | PEFT LoRA above "
        "head | LoRA-Edge / full | PEFT LoRA / full |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["backbone"], r["allocator"], r["run"]) for r in rows})
    for b, a, run in keys:
        got = {r["config"]: r["peak_mib"] for r in rows if (r["backbone"], r["allocator"], r["run"]) == (b, a, run)}
        full, edge, lora = (got[c] - got["head"] for c in ("full", "lora-edge", "peft-lora"))
        lines.append(
            f"| {b} | {a} | {run + 1} | {got['head']:.0f} | {full:.0f} | {edge:.0f} | {lora:.0f} | "
            f"{edge / full:.2f} | {lora / full:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_memory.json")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    ap.add_argument(
        "--accounted",
        action="store_true",
        help="only the accounted memory of one step, every built-in backbone (seconds)",
    )
    a = ap.parse_args()
    if a.accounted:
        for row in accounted():
            print(
                f"| {row['backbone']} | {row['batch']} | {row['full_mib']:.1f} | {row['lora_edge_mib']:.1f} | "
                f"{row['ratio']:.3f} |"
            )
        sys.exit(0)
    work = Path(a.out).parent / "bench_memory"
    work.mkdir(parents=True, exist_ok=True)
    result = measure(work, a.repeats, a.backbones)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(summary(result))
