#!/usr/bin/env bash
# Issue 9's image benchmark: every method on both 2-D backbones, on the digits shift (clean ->
# corrupted, severity 3) and on unseen classes (pretrain on digits 0-7, adapt to 0-9). Resumable:
# finished runs are cached under runs/digits/.
set -euo pipefail
cd "$(dirname "$0")/.."
METHODS=lora-edge,lora,dora,galore,adapter,bitfit,head,full
for bb in resnet18:all mobilenetv2:pointwise; do
  name=${bb%%:*}; layers=${bb##*:}
  python3 -m toolchain.cli compare --backbone "$name" --layers "$layers" --data digits --methods $METHODS --ranks 4 \
    --steps 120 --eval-every 20 --pretrain-epochs 6 --out "runs/digits/shift_$name" --no-progress
  python3 -m toolchain.cli compare --backbone "$name" --layers "$layers" --data digits --methods $METHODS --ranks 4 \
    --steps 120 --eval-every 20 --pretrain-epochs 6 --exclude-classes 8,9 --out "runs/digits/unseen_$name" --no-progress
done
