#!/usr/bin/env bash
# Runs every gridtune benchmark once, one after another (they share the dedicated Redis db
# BENCH_REDIS_DB=9, so never run two at once). Results: $OUT/*.md and *.json.
# Takes about 11 minutes on 2 cores (641 s on 2026-11-23: rate-limited runs ~3.3 min each, ceiling
# 2 x ~1.7 min, enqueue ~0.5 min, finalizer ~1 min). Set TRACEMALLOC=1 to add tracemalloc runs
# (enqueue and finalizer; not timed in the last run). Not included: bench/profile_worker.py and the
# py-spy ceiling run (`throughput.py ceiling --procs 1 --requests 4000 --py-spy 40`).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
OUT=${OUT:-/tmp/gridtune-bench}
mkdir -p "$OUT"
TM=()
FTM=(--no-tracemalloc)
if [ "${TRACEMALLOC:-0}" = 1 ]; then TM=(--tracemalloc); FTM=(); fi
start=$(date +%s)
echo "== machine"; { nproc; free -h; date -u; } | tee "$OUT/machine.txt"
echo "== throughput (rate-limited, 4 processes)"
python bench/throughput.py limited --procs 4 --concurrency-total 64 --json "$OUT/limited4.json" | tee "$OUT/limited4.md"
echo "== ceiling (no limit, no latency), bounded to 60 s per run"
python bench/throughput.py ceiling --procs 1,4 --requests 20000 --concurrency-total 64 --max-seconds 60 --json "$OUT/ceiling.json" | tee "$OUT/ceiling.md"
echo "== enqueue"
python bench/enqueue.py --sizes 10000,100000 --naive 10000 "${TM[@]}" --json "$OUT/enqueue.json" | tee "$OUT/enqueue.md"
echo "== finalizer"
python bench/finalizer.py --rows 100000 "${FTM[@]}" --json "$OUT/finalizer.json" | tee "$OUT/finalizer.md"
echo "== throughput (rate-limited, 1 process)"
python bench/throughput.py limited --procs 1 --concurrency-total 64 --json "$OUT/limited1.json" | tee "$OUT/limited1.md"
echo "== done in $(( $(date +%s) - start )) s"
