#!/usr/bin/env bash
# The torch-free core at its declared floors, and at today's versions, each in a fresh venv:
# install the package without torch and run the tests that need no torch.
#   floors-py310: Python 3.10 (JetPack 6's), numpy 1.24.4 (<2, as JetPack's TensorRT bindings need),
#                 onnx 1.16.0, safetensors 0.4.0, and the verify extra's floors onnxruntime 1.18.0 (the first that loads IR 10),
#                 polygraphy 0.53.4
#   latest:       the newest releases pip resolves for the same packages
# usage: scripts/check_floors.sh [VENV_ROOT]   (default .venvs; results in VENV_ROOT/floors.log)
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-.venvs}
mkdir -p "$root"
log="$root/floors.log"
: > "$log"
# shellcheck source=scripts/lib/py310.sh
source scripts/lib/py310.sh
py310=$(find_py310)
if [ -z "$py310" ]; then
  echo "no Python 3.10 here: the floors run on python3" | tee -a "$log"
  py310=python3
fi
tests=(tests/kernels tests/test_layers.py tests/graphs/test_fold.py tests/test_torch_free.py tests/toolchain/trt/test_record.py tests/toolchain/trt/test_surface.py tests/graphs/test_properties.py)

run_combo() {
  local name=$1 python=$2
  shift 2
  local venv="$root/$name"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q "$@" pytest hypothesis tomli >> "$log" 2>&1
  "$venv/bin/python" -m pip install -q --no-deps . >> "$log" 2>&1
  echo "== $name: $("$venv/bin/python" -c 'import sys, numpy, onnx, safetensors, onnxruntime, polygraphy; print(sys.version.split()[0], "numpy", numpy.__version__, "onnx", onnx.__version__, "safetensors", safetensors.__version__, "onnxruntime", onnxruntime.__version__, "polygraphy", polygraphy.__version__)')" | tee -a "$log"
  if "$venv/bin/python" -c 'import torch' 2> /dev/null; then
    echo "torch is importable in $venv: the check is void" | tee -a "$log"
    return 1
  fi
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}" 2>&1 | tail -n 3 | tee -a "$log"
}

status=0
run_combo floors-py310 "$py310" numpy==1.24.4 onnx==1.16.0 safetensors==0.4.0 onnxruntime==1.18.0 polygraphy==0.53.4 || status=1
run_combo latest python3 numpy onnx safetensors onnxruntime polygraphy || status=1
grep -q "failed\|error" "$log" && status=1
exit "$status"
