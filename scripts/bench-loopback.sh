#!/usr/bin/env bash
# Loopback figures for docs/benchmarks.md: pccl-bench for N = 2, 3, 4 peers at
# 4 B, 1 MiB, 16 MiB and 128 MiB with pool sizes 1 and 4, each run next to
# its own ring-bandwidth probe (and the no-library reference all-reduce).
#
#   scripts/bench-loopback.sh [REPEATS] [extra pccl-bench options...]
#
# Builds in release mode (CARGO_TARGET_DIR is honoured), writes every run's
# full output to ${TMPDIR:-/tmp}/pccl-bench-logs (or $BENCH_LOG_DIR) and prints the summary lines.
# On a shared machine run it when `uptime` shows little load, and repeat.
set -euo pipefail
cd "$(dirname "$0")/.."
repeats=${1:-1}
shift || true
cargo build --release -p pccl-stress --bin pccl-bench
bin="${CARGO_TARGET_DIR:-target}/release/pccl-bench"
logs=${BENCH_LOG_DIR:-${TMPDIR:-/tmp}/pccl-bench-logs}
mkdir -p "$logs"
echo "# $(date -u +%FT%TZ) $(uname -srm), nproc $(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for r in $(seq 1 "$repeats"); do
  for n in 2 3 4; do
    log="$logs/loopback-n$n-run$r.txt"
    echo "# run $r, N=$n, load: $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$log"
    "$bin" -n "$n" --sizes 4,1M,16M,128M --pool-size 1,4 --reference "$@" 2>>"$log.stderr" | tee -a "$log" | grep -E '^# (ring probe|reference|control|pccl-bench:|\[N=)|^ +[0-9]'
  done
done
