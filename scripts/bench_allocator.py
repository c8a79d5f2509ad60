"""What an allocator setting costs and buys in a training process, side by side.

Each configuration trains the same checkpoint for ``--steps`` lean-path steps (LoRA-Edge unless
``--method``) in a fresh process under GNU time (`/usr/bin/time -f %M`: whole-process peak RSS) and
reports that peak and the training seconds (wall and CPU, all threads) the driver measured.
Configurations run interleaved, round after round, so load on the machine hits them alike:

- ``glibc default``;
- ``MALLOC_MMAP_THRESHOLD_=131072``: blocks of 128 KiB and more come from mmap and go back when freed
  (it also stops glibc raising the threshold after the first large free);
- the same with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >= 2.35: transparent huge pages for
  those mmaps, 512x fewer page faults where the kernel's THP mode is ``madvise`` or ``always``);
- ``hugetlb=1`` alone;
- ``malloc_trim(0)`` after every optimizer step (through ctypes).

    python3 scripts/bench_allocator.py runs/bench_memory/resnet1d.pt --batch 512 --steps 30 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS: dict[str, tuple[dict[str, str], bool]] = {  # name: (environment, trim after every step)
    "glibc default": ({}, False),
    "MALLOC_MMAP_THRESHOLD_=131072": ({"MALLOC_MMAP_THRESHOLD_": "131072"}, False),
    "threshold + hugetlb=1": (
        {"MALLOC_MMAP_THRESHOLD_": "131072", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
        False,
    ),
    "hugetlb=1": ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, False),
    "malloc_trim(0) every step": ({}, True),
}

DRIVER = """
import ctypes, json, sys, time
import torch
from toolchain.adaptation import make_optimizer
from toolchain.data.sources import load_data
from toolchain.models.registry import load_checkpoint
from toolchain.peft.inject import AdaptConfig, inject, set_train_mode
from toolchain.peft.lean import lean_training
ckpt, method, batch, steps, data, layers, trim = sys.argv[1:8]
libc = ctypes.CDLL("libc.so.6")
model, _ = load_checkpoint(ckpt)
cfg = AdaptConfig(method=method, rank=4, layers=layers)
inject(model, cfg)
ds = load_data(data)
x, y = torch.from_numpy(ds.X[: int(batch)]), torch.from_numpy(ds.y[: int(batch)])
opt = make_optimizer(model, cfg, 1e-3)
t0, c0 = time.perf_counter(), time.process_time()
with lean_training(model, method != "full"):
    for _ in range(int(steps)):
        set_train_mode(model, False)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if trim == "1":
            libc.malloc_trim(0)
print(json.dumps({"train_s": time.perf_counter() - t0, "train_cpu_s": time.process_time() - c0}))
"""


def run_config(name: str, args: argparse.Namespace) -> dict:
    env, trim = CONFIGS[name]
    cmd = [sys.executable, "-c", DRIVER, args.checkpoint, args.method, str(args.batch), str(args.steps)]
    cmd += [args.data, args.layers, "1" if trim else "0"]
    with tempfile.NamedTemporaryFile(suffix=".txt") as f:
        out = subprocess.run(
            ["/usr/bin/time", "-o", f.name, "-f", "%M", *cmd],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, **env},
        )
        peak = int(Path(f.name).read_text().split()[-1]) / 1024
    return {"config": name, "peak_mib": peak, **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--method", default="lora-edge")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--data", default="watch")
    ap.add_argument("--layers", default="all")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    rows = []
    for rnd in range(args.rounds):
        for name in args.configs:
            rows.append({"round": rnd + 1, **run_config(name, args)})
            print(json.dumps(rows[-1]), flush=True)
    print("| allocator setting | peak RSS MiB | train seconds | train CPU seconds |\n|---|---|---|---|")
    for name in args.configs:
        mine = [r for r in rows if r["config"] == name]
        peaks = " / ".join(f"{r['peak_mib']:.0f}" for r in mine)
        secs = " / ".join(f"{r['train_s']:.1f}" for r in mine)
        cpu = " / ".join(f"{r['train_cpu_s']:.1f}" for r in mine)
        print(f"| {name} | {peaks} | {secs} | {cpu} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
