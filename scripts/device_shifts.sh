#!/usr/bin/env bash
# The shift benchmark on a lent 16-core machine without Ray (Ray's wheel is over the transfer
# limit): N processes share one cache, each running its share of the runs (--shard I/N). Bases first,
# then the adaptations in detached processes that outlive one 10-minute call; each call packs
# the cache into $OUT. Usage: bash scripts/device_shifts.sh start|wait SECONDS
set -u
T_START=$(date +%s)
N=${N:-16}
OUTDIR=/tmp/shifts
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
pack() { tar czf "$OUT/cache.tgz" -C "$OUTDIR" cache; ls "$OUTDIR/cache" | wc -l; tail -n 3 /tmp/shard*.log 2>/dev/null | tail -n 12; }
if [ "$1" = start ]; then
  mkdir -p /tmp/hapt && tar xzf .devcarry/hapt_raw.tgz -C /tmp/hapt
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devcarry/seglearn-*.whl
  nproc; python3 -c "import torch, numpy; print(torch.__version__, numpy.__version__)"
  t0=$(date +%s)
  for i in $(seq 0 $((N-1))); do python3 scripts/bench_shifts.py --hapt /tmp/hapt --out $OUTDIR --shard "$i/$N" --pretrain-only --no-progress >/tmp/pre$i.log 2>&1 & done
  wait; echo "bases in $(( $(date +%s) - t0 )) s"; cat /tmp/pre0.log
  date +%s > /tmp/adapt_start
  for i in $(seq 0 $((N-1))); do setsid nohup python3 scripts/bench_shifts.py --hapt /tmp/hapt --out $OUTDIR --shard "$i/$N" --no-progress >/tmp/shard$i.log 2>&1 < /dev/null & done
fi
end=$(( T_START + ${2:-300} ))  # the whole call, setup included
while [ "$(date +%s)" -lt "$end" ] && pgrep -f bench_shifts.py >/dev/null; do sleep 10; done
echo "adapting for $(( $(date +%s) - $(cat /tmp/adapt_start) )) s; running: $(pgrep -f bench_shifts.py | wc -l)"
pack
