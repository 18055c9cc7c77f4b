#!/usr/bin/env bash
# MoE trainer comparisons on one swarm per configuration (a pccl-master and
# N `moe-trainer --master` peers, no churn, global LBL): DiLoCo fp32 against
# u8 pseudo-gradients (final validation loss, bytes), and sync / async
# DiLoCo, fresh / stale global counts against the no-communication baseline
# (mean and median inner-step time). All configurations in one invocation;
# prints a table and the ratios.
#
#   scripts/bench-moe.sh [N]             loopback, N peers (default 3)
#   sudo WAN=1 scripts/bench-moe.sh 3    one peer per emulated WAN host
#
# Environment: STEPS (400) inner steps, H (20), CONFIGS (a subset of the
# names below), EXTRA (more moe-trainer flags), WAN_OPTS (default 100 ms
# RTT, 0.01 % loss, 100 Mbit/s), NO_BUILD=1, LOG_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-3}
target=${CARGO_TARGET_DIR:-target}
log_dir=${LOG_DIR:-${TMPDIR:-/tmp}/pccl-bench-moe}
mkdir -p "$log_dir"
if [[ "${NO_BUILD:-0}" != 1 ]]; then
    cargo build --release -p moe-trainer -p pccl-core --bin moe-trainer --bin pccl-master >&2
fi
bin=$(realpath "$target/release/moe-trainer")
master_bin=$(realpath "$target/release/pccl-master")
declare -A flags=(
    [none]="--mode none"
    [sync-fp32]="--mode sync --quant fp32"
    [sync-u8]="--mode sync --quant u8"
    [async-fp32]="--mode async --quant fp32"
    [async-u8]="--mode async --quant u8"
    [async-fp32-stale]="--mode async --quant fp32 --lbl-sync stale"
)
order=${CONFIGS:-none sync-fp32 sync-u8 async-fp32 async-u8 async-fp32-stale}

# shellcheck source=scripts/lib-wan.sh
source scripts/lib-wan.sh

echo "# $(date -u +%FT%TZ) bench-moe: $n peers on $where; ${STEPS:-400} inner steps, H=${H:-20}, global LBL; nproc $(nproc) ${EXTRA:-}"
printf '%-17s %9s %11s %9s %9s %9s %10s\n' config val_mean tx/peer step_mean step_p50 count_p50 outer_exp
declare -A val tx p50 mean
for cfg in $order; do
    # shellcheck disable=SC2206
    extra=(${flags[$cfg]} ${EXTRA:-})
    mip=$(host_ip 0)
    port=$(free_port)
    in_host 0 "$master_bin" --listen "$mip:$port" --log-level warn >"$log_dir/$cfg-master.log" 2>&1 &
    mpid=$!
    pids+=("$mpid")
    sleep 0.3
    peers=()
    for i in $(seq 0 $((n - 1))); do
        in_host "$i" env RAYON_NUM_THREADS=1 "$bin" --json --master "$mip:$port" --bind-ip "$(host_ip "$i")" \
            --peer-index "$i" --min-world "$n" --inner-steps "${STEPS:-400}" --sync-every "${H:-20}" "${extra[@]}" \
            >"$log_dir/$cfg-peer$i.jsonl" 2>"$log_dir/$cfg-peer$i.stderr" &
        peers+=($!)
        pids+=($!)
    done
    for p in "${peers[@]}"; do wait "$p" || { echo "$cfg: a peer failed; see $log_dir" >&2; exit 1; }; done
    kill "$mpid" 2>/dev/null && wait "$mpid" 2>/dev/null || true
    read -r v t m a c o < <(python3 - "$cfg" "$log_dir" "$n" <<'PY'
import json, statistics as st, sys
cfg, d, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
def events(i):
    out = []
    for line in open(f"{d}/{cfg}-peer{i}.jsonl"):
        if line.startswith("MOE "):
            out.append(json.loads(line[4:]))
    return out
peers = [events(i) for i in range(n)]
done = [e for p in peers for e in p if e["ev"] == "done"]
if cfg != "none" and len({e["hash"] for e in done}) != 1:
    sys.exit(f"{cfg}: the peers' final states differ")
ev = peers[0]
steps = [e["step_ms"] for e in ev if e["ev"] == "step"]
side = [e["side_ms"] for e in ev if e["ev"] == "step" and e["count_world"] > 1]
outer = [e for e in ev if e["ev"] == "outer"]
vals = [sum(o["val"]) / len(o["val"]) for p in peers for o in p if o["ev"] == "outer"][-1:] if cfg != "none" else \
       [sum(o["val"]) / len(o["val"]) for o in [[e for e in p if e["ev"] == "outer"][-1] for p in peers]]
val = st.mean(vals)
tx = st.mean(e["tx"] for e in done)
exposed = sum(o["exposed_ms"] for o in outer)
print(f"{val:.4f} {tx:.0f} {st.mean(steps):.1f} {st.median(steps):.1f} "
      f"{(st.median(side) if side else float('nan')):.2f} {exposed:.0f}")
PY
)
    val[$cfg]=$v tx[$cfg]=$t p50[$cfg]=$a mean[$cfg]=$m
    printf '%-17s %9s %11s %9s %9s %9s %10s\n' "$cfg" "$v" "$t" "$m" "$a" "$c" "$o"
done
ratio() { python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f'{a/b:.3f}' if b else 'n/a')" "$1" "$2"; }
echo "## ratios"
for c in sync-fp32 async-fp32 sync-u8 async-u8 async-fp32-stale; do
    if [[ -n "${mean[$c]:-}" && -n "${mean[none]:-}" ]]; then
        echo "# mean step time $c / none: $(ratio "${mean[$c]}" "${mean[none]}"), median $(ratio "${p50[$c]}" "${p50[none]}")"
    fi
done
for m in sync async; do
    if [[ -n "${val[$m-u8]:-}" && -n "${val[$m-fp32]:-}" ]]; then
        echo "# $m: u8 / fp32 validation loss $(ratio "${val[$m-u8]}" "${val[$m-fp32]}"), bytes $(ratio "${tx[$m-u8]}" "${tx[$m-fp32]}")"
    fi
done
