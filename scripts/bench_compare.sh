#!/usr/bin/env bash
# PEFT method comparison (issue: LoRA, DoRA, GaLore, adapters, LoRA-Edge side by side).
# Results land in runs/compare_<data>_<backbone>/ (results.md, results.csv, plots); re-running resumes.
set -euo pipefail
data=${1:-../shared/data/HAPT}
name=${2:-hapt}
shift 2 || true
for backbone in ${BACKBONES:-cnn1d mobilenet1d resnet1d}; do
  python -m toolchain.cli compare --data "$data" --backbone "$backbone" --out "runs/compare_${name}_${backbone}" \
    --ranks 2,4,8 --steps "${STEPS:-300}" --eval-every 25 --no-progress "$@"
done
