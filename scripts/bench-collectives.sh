#!/usr/bin/env bash
# Figures of docs/benchmarks.md "Collectives and the small all-reduce":
# the ring and the direct all-reduce back to back in one pccl-bench run
# (4 B .. 256 KiB, N = 2 and 4), then one 16 MiB run of each collective
# (N = 4). No probes (they are in bench-loopback.sh).
#
#   scripts/bench-collectives.sh [REPEATS] [extra pccl-bench options...]
#
# Builds in release mode (CARGO_TARGET_DIR is honoured), writes each run's
# full output to ${BENCH_LOG_DIR:-${TMPDIR:-/tmp}/pccl-bench-logs} and
# prints the table rows and control-latency lines.
set -euo pipefail
cd "$(dirname "$0")/.."
repeats=${1:-1}
shift || true
cargo build --release -p pccl-stress --bin pccl-bench
bin="${CARGO_TARGET_DIR:-target}/release/pccl-bench"
logs=${BENCH_LOG_DIR:-${TMPDIR:-/tmp}/pccl-bench-logs}
mkdir -p "$logs"
echo "# $(date -u +%FT%TZ) $(uname -srm), nproc $(nproc)"
show='^# (algorithm|control|pccl-bench)|^ +[0-9]'
# A run that hangs (see "Findings" in docs/benchmarks.md) ends after 30 s of silence.
idle=(--idle-timeout-s 30)
for r in $(seq 1 "$repeats"); do
  for n in 2 4; do
    log="$logs/small-n$n-run$r.txt"
    echo "# run $r, N=$n, load: $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$log"
    "$bin" -n "$n" --no-probe --algorithm ring,direct --sizes 4,1K,16K,64K,256K \
      --iters 100 --warmup 10 --latency-samples 200 "${idle[@]}" "$@" 2>>"$log.stderr" \
      | tee -a "$log" | grep -E "$show" || echo "# run failed (see $log.stderr)"
  done
done
for c in all-reduce broadcast all-gather reduce-scatter; do
  log="$logs/coll-$c.txt"
  echo "# $c, N=4, load: $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$log"
  "$bin" -n 4 --no-probe --collective "$c" --sizes 16M --iters 10 --warmup 2 \
    --latency-samples 0 "${idle[@]}" "$@" 2>>"$log.stderr" \
    | tee -a "$log" | grep -E "$show" || echo "# run failed (see $log.stderr)"
done
