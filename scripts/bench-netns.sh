#!/usr/bin/env bash
# WAN-style pccl-bench: one peer per network namespace, links shaped with netem.
#
#   sudo scripts/bench-netns.sh N [DELAY_MS] [RATE] [-- extra pccl-bench options]
#   e.g. sudo scripts/bench-netns.sh 3 25 1gbit -- --sizes 1M,16M,64M --pool-size 4
#
# Creates a bridge (10.77.0.1/24) in the current namespace and N namespaces
# pcclb-1..N, each with a veth on the bridge (10.77.0.10+i). Every namespace's
# egress gets `netem delay DELAY_MS rate RATE`, so a peer-to-peer round trip
# is 2·DELAY_MS and each peer's upload is capped at RATE (`none`: no cap).
# Without sch_netem in the kernel only the rate is shaped (tbf), no delay. pccl-master runs on
# the bridge address; each peer is `ip netns exec pcclb-i pccl-bench
# --peer-only --master 10.77.0.1:PORT -n N --rank-hint i-1`, which prints its
# own table (rank 0's is shown, all are kept in $LOG_DIR). Everything is
# removed on exit. Needs root, iproute2 and tc (sch_netem).
set -euo pipefail
cd "$(dirname "$0")/.."
pos=()
while [[ $# -gt 0 && "$1" != "--" ]]; do pos+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
n=${pos[0]:?usage: bench-netns.sh N [DELAY_MS] [RATE] [-- pccl-bench options]}
delay=${pos[1]:-10}
rate=${pos[2]:-1gbit}
port=${PCCL_NETNS_PORT:-48555}
log_dir=${LOG_DIR:-${TMPDIR:-/tmp}/pccl-bench-netns}
br=pcclbr0
target=${CARGO_TARGET_DIR:-target}
cargo build --release -p pccl-stress --bin pccl-bench -p pccl-core --bin pccl-master >&2
bench="$(realpath "$target/release/pccl-bench")"
master_bin="$(realpath "$target/release/pccl-master")"
mkdir -p "$log_dir"

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for i in $(seq 1 "$n"); do ip netns del "pcclb-$i" 2>/dev/null || true; done
  ip link del "$br" 2>/dev/null || true
}
trap cleanup EXIT

shaped=""
shape() {
  [[ "$rate" == none && "$delay" == 0 ]] && { shaped="no shaping"; return; }
  local netem=(netem delay "${delay}ms" limit 100000)
  [[ "$rate" != none ]] && netem+=(rate "$rate")
  if ip netns exec "$1" tc qdisc add dev eth0 root "${netem[@]}" 2>/dev/null; then
    shaped="netem delay ${delay} ms per direction, rate $rate per peer"
  elif [[ "$rate" != none ]]; then
    # No sch_netem in this kernel: cap the rate with tbf, add no delay.
    ip netns exec "$1" tc qdisc add dev eth0 root tbf rate "$rate" burst 256kb latency 100ms
    shaped="tbf rate $rate per peer (sch_netem unavailable: NO added delay)"
  else
    shaped="no shaping (sch_netem unavailable)"
  fi
}

ip link add "$br" type bridge
ip addr add 10.77.0.1/24 dev "$br"
ip link set "$br" up
for i in $(seq 1 "$n"); do
  ns="pcclb-$i"
  ip netns add "$ns"
  ip link add "pcclv$i" type veth peer name eth0 netns "$ns"
  ip link set "pcclv$i" master "$br" up
  ip -n "$ns" addr add "10.77.0.$((10 + i))/24" dev eth0
  ip -n "$ns" link set lo up
  ip -n "$ns" link set eth0 up
  shape "$ns"
done

"$master_bin" --listen "10.77.0.1:$port" --log-level warn >"$log_dir/master.log" 2>&1 &
pids+=($!)
sleep 0.3
echo "# $(date -u +%FT%TZ) N=$n, $shaped, nproc $(nproc)"
for i in $(seq 1 "$n"); do
  ip netns exec "pcclb-$i" "$bench" --peer-only --master "10.77.0.1:$port" -n "$n" \
    --rank-hint $((i - 1)) --bind-ip "10.77.0.$((10 + i))" "$@" \
    >"$log_dir/peer$((i - 1)).txt" 2>"$log_dir/peer$((i - 1)).stderr" &
  pids+=($!)
done
status=0
for i in $(seq 1 "$n"); do
  wait "${pids[$i]}" || status=1
done
cat "$log_dir/peer0.txt"
[[ $status == 0 ]] || echo "# some peer failed; see $log_dir" >&2
exit $status
