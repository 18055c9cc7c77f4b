#!/usr/bin/env bash
# WAN pccl-bench: one peer per emulated internet host (../shared/wan-emu).
#
#   sudo scripts/bench-wan.sh N [-- pccl-bench options]
#   e.g. sudo PCCL_TCP_CONGESTION=cubic scripts/bench-wan.sh 4 -- --sizes 16M,64M --iters 3
#
# Environment:
#   WAN_EMU       path of wan-emu (default: ../shared/wan-emu beside the project root)
#   WAN_OPTS      options of `wan.sh up N` (default: 100 ms RTT, 0.01 % loss
#                 per direction, 250 Mbit/s uplink, 64 MiB TCP buffer max)
#   POOLS         pool sizes to compare, one swarm each (default "1 4 16")
#   PCCL_TCP_CONGESTION  congestion control of the data connections (e.g.
#                 cubic); the hosts' default is BBR, and a namespace cannot
#                 default to CUBIC here, so the library sets it per socket
#   SSAI          net.ipv4.tcp_slow_start_after_idle inside the hosts (default
#                 0: a pooled connection that sat idle keeps its congestion
#                 window; `keep` leaves the kernel default, 1)
#   LOG_DIR       where every peer's table and stderr are kept
#   NO_BUILD=1    use the binaries already in $CARGO_TARGET_DIR/release
#   BENCH_BIN     the pccl-bench to run (default: that build's); e.g. a copy
#                 of the previous build, to compare two builds on one link
#   IPERF_REF=0   skip the reference: an iperf3 ring (every host to the next
#                 at once, 10 s, same congestion control, pool-size streams)
#   TIMELINE=1    sample `ss -tin` in h1 every ~50 ms during each pool's run
#                 ($LOG_DIR/ss-poolP.txt) and print the timeline of h1's
#                 connections to h2 (scripts/wan-timeline.py): goodput,
#                 moving / idle / queued connections, cwnd, bytes in flight
#
# Brings up hosts h0..hN-1 (wan.sh up), runs pccl-master in h0 and one
# `pccl-bench --peer-only` per host for each pool size, prints rank 0's table
# per pool size and a summary (busbw against the uplink rate), and tears the
# emulation down on exit. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
n=${1:?usage: bench-wan.sh N [-- pccl-bench options]}
shift
[[ "${1:-}" == "--" ]] && shift
wan_emu=${WAN_EMU:-$root/../shared/wan-emu}
wan_opts=${WAN_OPTS:---delay 50ms --loss 0.01% --rate 250mbit --tcp-mem 64M}
pools=${POOLS:-1 4 16}
log_dir=${LOG_DIR:-${TMPDIR:-/tmp}/pccl-bench-wan}
target=${CARGO_TARGET_DIR:-target}
wan="$wan_emu/wan.sh"
[[ -x "$wan" ]] || { echo "bench-wan: $wan not found (set WAN_EMU)" >&2; exit 2; }

if [[ "${NO_BUILD:-0}" != 1 ]]; then
    cargo build --release -p pccl-stress --bin pccl-bench -p pccl-core --bin pccl-master >&2
fi
bench="$(realpath "${BENCH_BIN:-$target/release/pccl-bench}")"
master_bin="$(realpath "$target/release/pccl-master")"
mkdir -p "$log_dir"

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    "$wan" down >/dev/null 2>&1 || true
}
trap cleanup EXIT

# shellcheck disable=SC2086
"$wan" up "$n" $wan_opts >"$log_dir/wan-up.log" 2>&1 || { cat "$log_dir/wan-up.log" >&2; exit 1; }
ssai=${SSAI:-0}
if [[ "$ssai" != keep ]]; then
    for i in $(seq 0 $((n - 1))); do
        "$wan" exec "h$i" sysctl -qw "net.ipv4.tcp_slow_start_after_idle=$ssai"
    done
fi
master_ip=$("$wan" ip h0)
# A free port inside h0 (the namespace is fresh; the kernel picks).
port=$("$wan" exec h0 python3 -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')
"$wan" exec h0 "$master_bin" --listen "$master_ip:$port" --log-level warn >"$log_dir/master.log" 2>&1 &
pids+=($!)
sleep 0.5

rate=$(sed -n 's/.*--rate \([^ ]*\).*/\1/p' <<<"$wan_opts")
echo "# $(date -u +%FT%TZ) bench-wan: N=$n, wan.sh up $n $wan_opts, cc ${PCCL_TCP_CONGESTION:-default (bbr)}, tcp_slow_start_after_idle ${ssai/keep/default}, pools $pools, nproc $(nproc)"
# Reference: the raw emulated ring, iperf3 with the same congestion control
# and as many streams as the pool, every host sending to the next at once.
iperf_ring() { # streams -> mean per-link receive rate over the last 5 s, Mbit/s
    local p=$1 pids=() i j cc_opt=()
    [[ -n "${PCCL_TCP_CONGESTION:-}" ]] && cc_opt=(-C "$PCCL_TCP_CONGESTION")
    for i in $(seq 0 $((n - 1))); do
        "$wan" exec "h$i" iperf3 -s -D -1 -p 5201 >/dev/null 2>&1
    done
    sleep 0.5
    for i in $(seq 0 $((n - 1))); do
        j=$(((i + 1) % n))
        timeout 30 "$wan" exec "h$i" iperf3 -c "$("$wan" ip "h$j")" -p 5201 -t 10 -P "$p" "${cc_opt[@]}" -J \
            >"$log_dir/iperf-P$p-h$i.json" 2>/dev/null &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i" || true; done
    python3 - "$log_dir" "$p" "$n" <<'PY'
import json, sys
d, p, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rates = []
for i in range(n):
    try:
        j = json.load(open(f"{d}/iperf-P{p}-h{i}.json"))
        iv = j["intervals"][-5:]
        rates.append(sum(x["sum"]["bits_per_second"] for x in iv) / len(iv) / 1e6)
    except Exception:
        pass
print(f"{sum(rates) / len(rates):.0f}" if rates else "n/a")
PY
}

summary=()
if [[ "${IPERF_REF:-1}" == 1 ]] && command -v iperf3 >/dev/null; then
    for pool in $pools; do
        summary+=("iperf3 ring, $pool streams per link: $(iperf_ring "$pool") Mbit/s per link (mean over links, last 5 of 10 s)")
    done
fi
for pool in $pools; do
    peers=()
    for i in $(seq 0 $((n - 1))); do
        ip=$("$wan" ip "h$i")
        "$wan" exec "h$i" "$bench" --peer-only --master "$master_ip:$port" -n "$n" \
            --rank-hint "$i" --bind-ip "$ip" --pool-size "$pool" --no-probe "$@" \
            >"$log_dir/pool$pool-peer$i.txt" 2>"$log_dir/pool$pool-peer$i.stderr" &
        peers+=($!)
        pids+=($!)
    done
    sampler=
    if [[ "${TIMELINE:-0}" == 1 && $n -ge 3 ]]; then
        "$wan" exec h1 bash -c 'while :; do echo "@ $(date +%s.%N)"; ss -tinH state established; sleep 0.05; done' \
            >"$log_dir/ss-pool$pool.txt" 2>/dev/null &
        sampler=$!
        pids+=($!)
    fi
    status=0
    for p in "${peers[@]}"; do wait "$p" || status=1; done
    if [[ -n "$sampler" ]]; then
        kill "$sampler" 2>/dev/null || true
        python3 scripts/wan-timeline.py "$log_dir/ss-pool$pool.txt" --dst "$("$wan" ip h2)" \
            >"$log_dir/timeline-pool$pool.txt" || true
        echo "# timeline of h1 -> h2 with pool $pool: $log_dir/timeline-pool$pool.txt"
    fi
    echo "## pool size $pool"
    cat "$log_dir/pool$pool-peer0.txt"
    if [[ $status != 0 ]]; then
        echo "# some peer failed with pool $pool; see $log_dir" >&2
        exit 1
    fi
    summary+=("pool $pool: $(grep '^# pccl-bench:' "$log_dir/pool$pool-peer0.txt" | sed 's/^# pccl-bench: //')")
done
echo "## summary (uplink rate ${rate:-unlimited} per host)"
printf '# %s\n' "${summary[@]}"
