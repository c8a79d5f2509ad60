#!/usr/bin/env bash
# The whole suite on JetPack 6's Python stack: Python 3.10, torch 2.5.1 (PyPI's build of NVIDIA's
# JetPack 6 release; runs on CPU), numpy 1.26.4. The stack is installed first, then the package as
# docs/COMPAT.md tells a user who has torch (`pip install -e ".[dev]" -c constraints/jetpack6.txt`);
# the check fails when that install changed torch or numpy. Then the README's test command, the demo
# and TensorRT's parser on the demo's three models.
# The venv's dependencies are cached in CACHE (default ~/.cache/toolchain/jetpack-<hash>), keyed on
# pyproject.toml and the constraints file; the package itself is installed from this tree every run
# (--no-deps, editable), so a cached venv never tests another checkout's code.
# usage: scripts/check_jetpack_stack.sh [CACHE]     (log in CACHE.log)
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=2.5.1
NUMPY=1.26.4
key=$(cat pyproject.toml constraints/jetpack6.txt | sha256sum | cut -c1-12)
venv=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/toolchain/jetpack-$key}
log="$venv.log"
mkdir -p "$(dirname "$venv")"
: > "$log"

# shellcheck source=scripts/lib/py310.sh
source scripts/lib/py310.sh
py310=$(find_py310)
if [ -z "$py310" ]; then
  echo "check_jetpack_stack: no Python 3.10 here (JetPack 6's); install one (pyenv install 3.10)" | tee -a "$log"
  exit 1
fi

stack() { "$venv/bin/python" -c 'import torch, numpy; print(torch.__version__.split("+")[0], numpy.__version__)'; }

if [ ! -f "$venv/.complete" ] || [ "$(stack 2> /dev/null)" != "$TORCH $NUMPY" ]; then
  rm -rf "$venv"
  "$py310" -m venv "$venv"
  {
    "$venv/bin/python" -m pip install -q "torch==$TORCH" "numpy==$NUMPY"
    "$venv/bin/python" -m pip install -q -e ".[dev]" -c constraints/jetpack6.txt
  } >> "$log" 2>&1
  touch "$venv/.complete"
fi
"$venv/bin/python" -m pip install -q --no-deps -e . >> "$log" 2>&1
got=$(stack)
echo "== jetpack stack: Python $("$venv/bin/python" -c 'import sys; print(sys.version.split()[0])'), torch/numpy $got" | tee -a "$log"
if [ "$got" != "$TORCH $NUMPY" ]; then
  echo "check_jetpack_stack: the install replaced JetPack's stack: torch/numpy $got, expected $TORCH $NUMPY" | tee -a "$log"
  exit 1
fi
"$venv/bin/python" -m pip check >> "$log" 2>&1 || { echo "check_jetpack_stack: pip check failed (see $log)" | tee -a "$log"; exit 1; }

export PATH="$venv/bin:$PATH"
status=0
"$venv/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider 2>&1 | tee -a "$log" | tail -n 25 || status=1

demo=$(mktemp -d)
trap 'rm -rf "$demo"' EXIT
if "$venv/bin/toolchain" demo --out "$demo/out" > "$demo/demo.txt" 2>&1; then
  grep -E "macro-F1|parity|ONNX vs PyTorch" "$demo/demo.txt" | tee -a "$log"
  for m in base unfused fused; do
    verdict=$("$venv/bin/toolchain" build "$demo/out/$m.onnx" --check 2>&1) || status=1
    echo "$m.onnx: $(echo "$verdict" | grep -E "engine would" | head -n 1)" | tee -a "$log"
  done
  grep -q "PASSED" "$demo/demo.txt" || status=1
else
  echo "check_jetpack_stack: toolchain demo failed:" | tee -a "$log"
  tail -n 20 "$demo/demo.txt" | tee -a "$log"
  status=1
fi
"$venv/bin/python" -c 'import torch, numpy; print("after the run: torch", torch.__version__, "numpy", numpy.__version__)' | tee -a "$log"
[ "$(stack)" = "$TORCH $NUMPY" ] || status=1
exit "$status"
