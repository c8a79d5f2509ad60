#!/usr/bin/env bash
# Fuse, build, verify, refit and time a bundle of cases on a Jetson Orin Nano (JetPack 6.x, TensorRT 10.3).
# usage: run_on_orin.sh [--force] BUNDLE [OUT]
#   BUNDLE: made on a host by scripts/jetson/prepare_bundle.py (no torch needed here)
#   OUT:    results (default orin_results): environment.txt, summary.tsv, one folder per case. A
#           non-empty OUT that is not an earlier results folder of this script (it holds .orin_results)
#           is refused unless --force; case names from the bundle's cases.txt must be plain names.
# Per case: fuse both adapters into base.onnx on the device; build the first fused model with
# `toolchain build --fp16 --refit` (it checks the engine against the ONNX and writes the sidecar);
# build base and unfused engines for timing; verify the engine against the fused and the unfused
# ONNX; refit with the second adapter and verify again; negative control: the old engine against the
# new model must FAIL; time base, fused, unfused and refit engines with trtexec --loadEngine. INT8
# (when the bundle has base.int8.onnx): fuse into it, build --int8, engine vs INT8 ONNX, INT8 vs FP32
# agreement on the target test windows, refit refused, trtexec timing.
# Exit status 0 only when every case gives what its `expect` file says.
set -euo pipefail

usage="usage: run_on_orin.sh [--force] BUNDLE [OUT]"
force=0
if [ "${1:-}" = --force ]; then
  force=1
  shift
fi
bundle=${1:?$usage}
out=${2:-orin_results}
marker=.orin_results  # written into OUT: an earlier results folder of this script may be written again
refuse() {
  echo "run_on_orin.sh: error: $1" >&2
  exit 2
}
[ -f "$bundle/cases.txt" ] || refuse "$bundle is not a bundle (no cases.txt); make one with scripts/jetson/prepare_bundle.py"
# Every case name becomes a folder under BUNDLE and OUT: plain names only (no '/', no '..', no leading '-' or '.').
while read -r name; do
  [ -n "$name" ] || continue
  [[ $name =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] && [[ $name != *..* ]] \
    || refuse "case name '$name' in $bundle/cases.txt is not a plain name (letters, digits, '.', '_', '-'); fix cases.txt"
done < "$bundle/cases.txt"
if [ -e "$out" ] && [ ! -d "$out" ]; then
  refuse "$out exists and is not a folder; choose another OUT"
fi
if [ -d "$out" ] && [ -n "$(ls -A "$out")" ] && [ ! -f "$out/$marker" ] && [ "$force" != 1 ]; then
  refuse "$out is not empty and is not a results folder of this script; its files would be replaced. Choose another OUT, or pass --force"
fi
mkdir -p "$out"
echo "results of scripts/jetson/run_on_orin.sh" > "$out/$marker"

trtexec_bin=$(command -v trtexec || true)
if [ -z "$trtexec_bin" ] && [ -x /usr/src/tensorrt/bin/trtexec ]; then
  trtexec_bin=/usr/src/tensorrt/bin/trtexec
fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -a)"
  echo "toolchain: $(toolchain --version)"
  echo "tensorrt: $(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>&1 || true)"
  echo "trtexec: ${trtexec_bin:-absent}"
  echo "--- nvpmodel -q"
  nvpmodel -q 2>&1 || echo "nvpmodel absent"
  echo "--- jetson_clocks --show"
  jetson_clocks --show 2>&1 || echo "jetson_clocks absent"
} > "$out/environment.txt"

# step LOG CMD...: run CMD with its output in LOG; print its exit status (never stops the script)
step() {
  local log=$1
  shift
  local rc=0
  "$@" > "$log" 2>&1 || rc=$?
  echo "$rc"
}

# median latency in ms from a trtexec log ("Latency: min = ..., median = X ms, ...")
median_ms() {
  sed -n 's/.*Latency: .*median = \([0-9.]*\) ms.*/\1/p' "$1" | head -n 1
}

time_engine() {
  local plan=$1 log=$2
  if [ -z "$trtexec_bin" ]; then
    echo "no-trtexec"
    return
  fi
  if [ "$(step "$log" "$trtexec_bin" --loadEngine="$plan" --warmUp=500 --iterations=2000 --percentile=50,90,99 --useSpinWait)" != 0 ]; then
    echo "trtexec-failed"
    return
  fi
  median_ms "$log"
}

refit_mode() {
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["refit_mode"])' "$1.json"
}

verdict() {  # verdict RC: PASSED for 0, FAILED for 1, ERROR(rc) otherwise
  case $1 in
    0) echo PASSED ;;
    1) echo FAILED ;;
    *) echo "ERROR($1)" ;;
  esac
}

run_case() {
  local name=$1
  local c=$bundle/$name o=$out/$name
  mkdir -p "$o"
  local expect
  expect=$(tr -d '[:space:]' < "$c/expect")
  local fuse_rc
  fuse_rc=$(step "$o/fuse1.log" toolchain fuse "$c/base.onnx" "$c/adapter1.safetensors" -o "$o/fused1.onnx" --force)
  if [ "$expect" = refused-at-fuse ]; then
    if [ "$fuse_rc" = 2 ]; then
      printf '%s\t%s\t%s\n' "$name" "$expect" "ok: refused at fuse ($(tail -n 1 "$o/fuse1.log" | cut -c1-120))" >> "$out/summary.tsv"
      return 0
    fi
    printf '%s\t%s\t%s\n' "$name" "$expect" "UNEXPECTED: fuse exited $fuse_rc" >> "$out/summary.tsv"
    return 1
  fi
  local ok=1 mode="-" v_unfused="-" v_fused="-" refit="-" v_refit="-" control="-"
  if [ "$fuse_rc" = 0 ] && [ "$(step "$o/fuse2.log" toolchain fuse "$c/base.onnx" "$c/adapter2.safetensors" -o "$o/fused2.onnx" --force)" = 0 ] \
    && [ "$(step "$o/build_fused1.log" toolchain build "$o/fused1.onnx" -o "$o/fused1.plan" --fp16 --refit --timing-cache "$out/timing.cache" --force)" = 0 ]; then
    mode=$(refit_mode "$o/fused1.plan")
    [ "$mode" = "$expect" ] || ok=0
    v_fused=$(verdict "$(step "$o/verify_fused1.log" toolchain verify "$o/fused1.onnx" --reference "$o/fused1.onnx" --engine "$o/fused1.plan" --data none --out-dir "$o/verify_fused1" --force)")
    v_unfused=$(verdict "$(step "$o/verify_unfused1.log" toolchain verify "$o/fused1.onnx" --reference "$c/unfused1.onnx" --engine "$o/fused1.plan" --data none --out-dir "$o/verify_unfused1" --force)")
    refit=$(verdict "$(step "$o/refit2.log" toolchain refit "$o/fused1.plan" "$o/fused2.onnx" -o "$o/refit2.plan" --force)")
    if [ "$refit" = PASSED ]; then
      v_refit=$(verdict "$(step "$o/verify_refit2.log" toolchain verify "$o/fused2.onnx" --reference "$c/unfused2.onnx" --engine "$o/refit2.plan" --data none --out-dir "$o/verify_refit2" --force)")
    fi
    # negative control: the engine from adapter 1 judged against adapter 2's model must fail
    control=$(verdict "$(step "$o/control.log" toolchain verify "$o/fused2.onnx" --reference "$c/unfused2.onnx" --engine "$o/fused1.plan" --data none --out-dir "$o/control" --force)")
    [ "$v_fused" = PASSED ] && [ "$v_unfused" = PASSED ] && [ "$refit" = PASSED ] && [ "$v_refit" = PASSED ] && [ "$control" = FAILED ] || ok=0
  else
    ok=0
  fi
  local t_base="-" t_fused="-" t_unfused="-" t_refit="-"
  if [ "$(step "$o/build_base.log" toolchain build "$c/base.onnx" -o "$o/base.plan" --fp16 --timing-cache "$out/timing.cache" --force)" = 0 ]; then
    t_base=$(time_engine "$o/base.plan" "$o/trtexec_base.log")
  fi
  if [ "$(step "$o/build_unfused1.log" toolchain build "$c/unfused1.onnx" -o "$o/unfused1.plan" --fp16 --timing-cache "$out/timing.cache" --force)" = 0 ]; then
    t_unfused=$(time_engine "$o/unfused1.plan" "$o/trtexec_unfused1.log")
  fi
  [ -f "$o/fused1.plan" ] && t_fused=$(time_engine "$o/fused1.plan" "$o/trtexec_fused1.log")
  [ -f "$o/refit2.plan" ] && t_refit=$(time_engine "$o/refit2.plan" "$o/trtexec_refit2.log")
  # INT8: fuse adapter 1 into the quantized base, build an explicitly quantized engine, judge the engine
  # against the INT8 ONNX model, the INT8 model against the FP32 fused one (top-1 agreement on the
  # target test windows); refit of an INT8 engine must be refused (rebuilt per adapter); time it.
  local i8_engine="-" i8_agree="-" i8_refit="-" t_int8="-"
  if [ -f "$c/base.int8.onnx" ] && [ -f "$o/fused1.onnx" ]; then
    if [ "$(step "$o/fuse1_int8.log" toolchain fuse "$c/base.int8.onnx" "$c/adapter1.safetensors" -o "$o/fused1.int8.onnx" --force)" = 0 ] \
      && [ "$(step "$o/build_int8.log" toolchain build "$o/fused1.int8.onnx" -o "$o/fused1.int8.plan" --int8 --fp16 --timing-cache "$out/timing.cache" --force)" = 0 ]; then
      i8_engine=$(verdict "$(step "$o/verify_int8_engine.log" toolchain verify "$o/fused1.int8.onnx" --reference "$o/fused1.int8.onnx" --engine "$o/fused1.int8.plan" --data none --out-dir "$o/verify_int8_engine" --force)")
      i8_agree=$(verdict "$(step "$o/verify_int8.log" toolchain verify "$o/fused1.int8.onnx" --reference "$o/fused1.onnx" --data watch --split target-test --out-dir "$o/verify_int8" --force)")
      [ "$(step "$o/refit_int8.log" toolchain refit "$o/fused1.int8.plan" "$o/fused1.int8.onnx" -o "$o/refit_int8.plan" --force)" = 2 ] && i8_refit=refused || i8_refit=UNEXPECTED
      t_int8=$(time_engine "$o/fused1.int8.plan" "$o/trtexec_int8.log")
    fi
    [ "$i8_engine" = PASSED ] && [ "$i8_agree" = PASSED ] && [ "$i8_refit" = refused ] || ok=0
  fi
  local status=ok
  [ "$ok" = 1 ] || status=FAILED
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$expect" "$status" "$mode" "$v_fused" "$v_unfused" "$refit" "$v_refit" "$control" \
    "$t_base" "$t_fused" "$t_unfused" "$t_refit" "$i8_engine" "$i8_agree" "$i8_refit" "$t_int8" >> "$out/summary.tsv"
  [ "$ok" = 1 ]
}

printf 'case\texpect\tstatus\trefit_mode\tengine_vs_fused\tengine_vs_unfused\trefit\trefit_vs_unfused2\tnegative_control\tbase_ms\tfused_ms\tunfused_ms\trefit_ms\tint8_engine_vs_onnx\tint8_vs_fp32_agreement\tint8_refit\tint8_ms\n' > "$out/summary.tsv"
failed=0
while read -r name <&3; do  # fd 3: the commands inside must not eat the case list
  [ -n "$name" ] || continue
  run_case "$name" || failed=$((failed + 1))
done 3< "$bundle/cases.txt"
column -t -s "$(printf '\t')" "$out/summary.tsv" 2>/dev/null || cat "$out/summary.tsv"
echo "results in $out ($failed case(s) not as expected)"
[ "$failed" = 0 ]
