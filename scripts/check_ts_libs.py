"""Time-series CNN libraries HAR users bring (tsai, braindecode, pytorch-tcn) through every stage, as a
new user would through the Python API: adapt, step 0 exact, three training steps (lean path), save, export
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from tests.toolchain.ts_lib_models import MODELS, STAGES, run_case


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
