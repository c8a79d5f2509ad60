"""How reproducible training is on this machine: the demo's pretraining (cnn1d on the watch set, 8
epochs, seed 0) in N fresh processes, each printing a hash of the trained weights; counts per hash.

    python3 scripts/check_repro.py --runs 10                 # PyTorch's default threads, oneDNN on
    python3 scripts/check_repro.py --runs 10 --no-onednn     # torch.backends.mkldnn.enabled = False
    OMP_NUM_THREADS=1 python3 scripts/check_repro.py --runs 8
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile

DRIVER = """
import contextlib, hashlib, io, sys
import torch
from toolchain.models.registry import load_checkpoint
from toolchain.train import TrainConfig
from toolchain.workflows import PretrainJob, pretrain
out, onednn = sys.argv[1], sys.argv[2] == "1"
torch.backends.mkldnn.enabled = onednn
cfg = TrainConfig(lr=2e-3, epochs=8, progress=False)
with contextlib.redirect_stdout(io.StringIO()):
    pretrain(PretrainJob(out=out, model="cnn1d", data="watch", train=cfg, force=True))
model, _ = load_checkpoint(out)
h = hashlib.sha256()
for _, v in sorted(model.state_dict().items()):
    h.update(v.numpy().tobytes())
print(h.hexdigest()[:16])
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--no-onednn", action="store_true")
    a = ap.parse_args()
    counts: collections.Counter[str] = collections.Counter()
    with tempfile.TemporaryDirectory() as d:
        for _ in range(a.runs):
            out = subprocess.run(
                [sys.executable, "-c", DRIVER, f"{d}/base.pt", "0" if a.no_onednn else "1"],
                check=True,
                capture_output=True,
                text=True,
            )
            counts[out.stdout.split()[-1]] += 1
    for digest, n in counts.most_common():
        print(f"{n:3d} runs: weights {digest}")


if __name__ == "__main__":
    main()
