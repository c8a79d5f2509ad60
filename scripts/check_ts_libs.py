"""Time-series CNN libraries HAR users bring (tsai, braindecode, pytorch-tcn) through every stage, as a
new user would through the Python API: adapt, step 0 exact, one training step (lean path), save, export
base and adapted, fuse, Polygraphy parity of fused vs unfused, and TensorRT's parser (`build --check`,
TensorRT-RTX where TensorRT 10 is absent). Prints one row per model and method: each stage's verdict,
the parity error, the parser's verdict; a model refused by class shows the refusal's first line.

Needs a venv with the three libraries (scripts/check_torch_compat.sh builds one: torch 2.14.1 +
torchvision, which tsai's fastai needs).
usage: python scripts/check_ts_libs.py [--methods lora-edge,lora,bitfit] [--only REGEX] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import toolchain.api as tc  # noqa: E402
from tests.toolchain.ts_lib_models import MODELS  # noqa: E402
from toolchain.core.errors import ToolchainError  # noqa: E402

STAGES = ("adapt", "step0", "train", "save", "export", "fuse", "parity", "parser")


def run_case(name: str, method: str, work: Path) -> dict[str, object]:
    make, shape, classes = MODELS[name]
    row: dict[str, object] = {"model": name, "method": method}
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(8, *shape)
    y = torch.arange(len(x)) % classes
    stage = "adapt"
    try:
        with torch.no_grad():
            before = model(x[:2]).clone()
        adaptation = tc.adapt(model, method, rank=2)
        row["adapt"] = f"{len(adaptation.wrapped)} wrapped" if adaptation.wrapped else "ok"
        stage = "step0"
        with torch.no_grad():
            row["step0"] = "exact" if torch.equal(model(x[:2]), before) else "DIFFERS"
        stage = "train"
        opt = adaptation.optimizer()
        with adaptation.training():
            for _ in range(3):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        row["train"] = "ok"
        stage = "save"
        adaptation.save(work / "a.safetensors")
        row["save"] = "ok"
        stage = "export"
        tc.export_onnx(adaptation.base_model(), x[:1], work / "base.onnx")
        tc.export_onnx(model, x[:1], work / "unfused.onnx")
        row["export"] = "ok"
        stage = "fuse"
        tc.fuse(work / "base.onnx", work / "a.safetensors", work / "fused.onnx")
        row["fuse"] = "ok"
        stage = "parity"
        report = tc.verify(work / "fused.onnx", work / "unfused.onnx", work / "v", inputs=x.numpy())
        err = max(o["max_abs"] for c in report["comparisons"].values() for o in c["outputs"].values())
        row["parity_error"] = err
        row["parity"] = "PASSED" if report["passed"] else "FAILED"
        stage = "parser"
        from toolchain.trt.check import check_model

        check = check_model(str(work / "fused.onnx"))
        row["parser"] = "parses" if check.buildable else f"REFUSED ({len(check.problems)} nodes)"
    except ToolchainError as e:
        row[stage] = "refused: " + str(e).splitlines()[0]
    except Exception as e:  # noqa: BLE001  # a traceback is a finding: report its last frame
        frame = traceback.extract_tb(e.__traceback__)[-1]
        row[stage] = f"CRASH {type(e).__name__}: {str(e).splitlines()[0][:160]} ({Path(frame.filename).name}:{frame.lineno})"
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="lora-edge,lora,bitfit")
    p.add_argument("--only", default="", help="regex on model names")
    p.add_argument("--json", default="")
    a = p.parse_args()
    rows = []
    for name in MODELS:
        if a.only and not re.search(a.only, name):
            continue
        for method in a.methods.split(","):
            with tempfile.TemporaryDirectory() as d:
                row = run_case(name, method, Path(d))
            rows.append(row)
            cells = [str(row.get(s, "-")) for s in STAGES]
            err = row.get("parity_error")
            print(f"{name:28s} {method:9s} " + " | ".join(cells) + (f" | err {err:.2e}" if err is not None else ""))
            sys.stdout.flush()
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if any(str(r.get(s, "")).startswith(("CRASH", "DIFFERS", "FAILED")) for s in STAGES)]
    print(f"{len(rows)} cases, {len(bad)} crash or differ")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
