#!/usr/bin/env bash
# Fuse, build, verify and time on a Jetson Orin Nano (JetPack 6.x / TensorRT 10.3).
# usage: run_on_orin.sh base.onnx unfused.onnx adapter.safetensors [outdir]
set -euo pipefail
base=$1 unfused=$2 adapter=$3 out=${4:-orin_results}
mkdir -p "$out"
{ nvpmodel -q 2>/dev/null || true; jetson_clocks --show 2>/dev/null || true; } > "$out/power_and_clocks.txt"

toolchain fuse "$base" "$adapter" -o "$out/fused.onnx" --force
for m in base fused; do
  src=$base; [ "$m" = fused ] && src=$out/fused.onnx
  if command -v trtexec >/dev/null || [ -x /usr/src/tensorrt/bin/trtexec ]; then
    TRTEXEC=$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)
    "$TRTEXEC" --onnx="$src" --fp16 --saveEngine="$out/$m.plan" --timingCacheFile="$out/timing.cache" \
      --warmUp=500 --iterations=2000 --percentile=50,90,99 --useSpinWait > "$out/trtexec_$m.log"
    grep -E "Latency:|GPU Compute Time:" "$out/trtexec_$m.log" | tee "$out/latency_$m.txt"
  else
    toolchain build "$src" -o "$out/$m.plan" --fp16 --timing-cache "$out/timing.cache" --force
  fi
done
toolchain verify "$out/fused.onnx" --reference "$unfused" --engine "$out/fused.plan" --out-dir "$out/verify" --data none
echo "results in $out"
