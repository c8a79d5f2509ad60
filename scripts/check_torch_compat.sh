#!/usr/bin/env bash
# The test suite on another torch: a venv with torch 2.14.1 and torchvision 0.29.1 (on the project's
# machines both install from the local disk), the package installed into it with its dev extra (the
# torch range keeps 2.14.1), then the README's test command. torchvision makes
# tests/toolchain/test_torchvision.py and the timm cases of tests/toolchain/test_third_party.py run instead of skipping,
# and tsai, braindecode and pytorch-tcn make the library cases of tests/toolchain/test_ts_libs.py run.
# usage: scripts/check_torch_compat.sh [VENV]   (default .venvs/torch-2.14.1; log in VENV.log)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venvs/torch-2.14.1}
log="$venv.log"
mkdir -p "$(dirname "$venv")"
python3 -m venv "$venv"
# timm (its edge CNNs in tests/toolchain/test_third_party.py) needs torchvision, so it runs only here;
# --no-deps keeps this venv's torch.
{
  "$venv/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
  "$venv/bin/python" -m pip install -q -e ".[dev]"
  "$venv/bin/python" -m pip install -q --no-deps timm==1.0.31
  "$venv/bin/python" -m pip install -q huggingface_hub pyyaml
  # the time-series CNN libraries HAR users bring (tests/toolchain/test_ts_libs.py, scripts/check_ts_libs.py);
  # naming torch and torchvision again keeps this venv's builds
  "$venv/bin/python" -m pip install -q tsai==1.0.1 braindecode==1.8.1 pytorch-tcn==1.2.3 torch==2.14.1 torchvision==0.29.1
} > "$log" 2>&1
"$venv/bin/python" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)' | tee -a "$log"
"$venv/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider 2>&1 | tail -n 15 | tee -a "$log"
