#!/usr/bin/env bash
# DiLoCo against DDP on the diloco-charlm task: same peers, same data, same
# inner steps (OUTER × H per peer), fp32 and u8-quantized wire, and a
# no-communication baseline. One swarm per configuration; prints a table of
# the final validation loss of the shared model, bytes sent per peer, wall
# time and mean window time (H inner steps), then the ratios.
#
#   scripts/bench-diloco.sh [N]             loopback, N peers (default 4)
#   sudo WAN=1 scripts/bench-diloco.sh 4    one peer per emulated WAN host
#
# Environment:
#   OUTER (14) outer steps, H (20) inner steps per outer step, HIDDEN (64)
#   hidden units, COMPUTE_MS (20) emulated accelerator time per inner step,
#   WAN_OPTS (default: 100 ms RTT, 0.01 % loss, 100 Mbit/s) for `wan.sh up`,
#   CONFIGS: space-separated subset of the configuration names below,
#   NO_BUILD=1 to use the release binaries already built, LOG_DIR for logs.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-4}
target=${CARGO_TARGET_DIR:-target}
log_dir=${LOG_DIR:-${TMPDIR:-/tmp}/pccl-bench-diloco}
mkdir -p "$log_dir"
if [[ "${NO_BUILD:-0}" != 1 ]]; then
    cargo build --release -p pccl-examples --bin diloco-charlm -p pccl-core --bin pccl-master >&2
fi
bin=$(realpath "$target/release/diloco-charlm")
master_bin=$(realpath "$target/release/pccl-master")
common=(--outer-steps "${OUTER:-14}" --sync-every "${H:-20}" --hidden "${HIDDEN:-64}" --compute-ms "${COMPUTE_MS:-20}")

declare -A flags=(
    [no-comm]="--no-comm"
    [ddp-fp32]="--ddp"
    [ddp-u8]="--ddp --quant minmax"
    [sync-fp32]="--mode sync"
    [sync-u8]="--mode sync --quant minmax --error-feedback"
    [async-fp32]="--mode async"
    [async-u8]="--mode async --quant minmax --error-feedback"
    [streaming-fp32]="--mode streaming"
    [streaming-u8]="--mode streaming --quant minmax --error-feedback"
    [streaming9-fp32]="--mode streaming --delay 9"
)
order=${CONFIGS:-no-comm sync-fp32 sync-u8 async-fp32 async-u8 streaming-fp32 streaming-u8 ddp-fp32 ddp-u8}

# shellcheck source=scripts/lib-wan.sh
source scripts/lib-wan.sh

echo "# $(date -u +%FT%TZ) bench-diloco: $n peers on $where; ${common[*]}; nproc $(nproc)"
printf '%-16s %9s %12s %8s %10s\n' config val_loss tx/peer wall_s window_ms
declare -A loss tx wall win
for cfg in $order; do
    # shellcheck disable=SC2206
    extra=(${flags[$cfg]})
    mip=$(host_ip 0)
    port=$(free_port)
    mpid=""
    if [[ "$cfg" != no-comm ]]; then
        in_host 0 "$master_bin" --listen "$mip:$port" --log-level warn >"$log_dir/$cfg-master.log" 2>&1 &
        mpid=$!
        pids+=("$mpid")
        sleep 0.3
    fi
    peers=()
    for i in $(seq 0 $((n - 1))); do
        in_host "$i" "$bin" --role peer --master "$mip:$port" --bind-ip "$(host_ip "$i")" \
            --seed $((i + 1)) --min-world "$n" "${common[@]}" "${extra[@]}" \
            >"$log_dir/$cfg-peer$i.txt" 2>"$log_dir/$cfg-peer$i.stderr" &
        peers+=($!)
        pids+=($!)
    done
    for p in "${peers[@]}"; do wait "$p" || { echo "$cfg: a peer failed; see $log_dir" >&2; exit 1; }; done
    [[ -n "$mpid" ]] && kill "$mpid" 2>/dev/null && wait "$mpid" 2>/dev/null || true
    done_line=$(grep '^done' "$log_dir/$cfg-peer0.txt")
    get() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$done_line"; }
    loss[$cfg]=$(get val_loss) tx[$cfg]=$(get total_tx) wall[$cfg]=$(get wall_s) win[$cfg]=$(get mean_window_ms)
    if [[ "$cfg" != no-comm && "$cfg" != ddp-* ]]; then
        hashes=$(grep -h '^done' "$log_dir/$cfg"-peer*.txt | sed 's/.* hash=\([^ ]*\).*/\1/' | sort -u | wc -l)
        [[ "$hashes" == 1 ]] || { echo "$cfg: peers ended with different outer state" >&2; exit 1; }
    fi
    printf '%-16s %9s %12s %8s %10s\n' "$cfg" "${loss[$cfg]}" "${tx[$cfg]}" "${wall[$cfg]}" "${win[$cfg]}"
done
ratio() { python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f'{a/b:.3f}' if b else 'n/a')" "$1" "$2"; }
echo "## ratios"
if [[ -n "${win[no-comm]:-}" ]]; then
    for m in sync async streaming ddp; do
        for q in fp32 u8; do
            c="$m-$q"
            [[ -n "${win[$c]:-}" ]] && echo "# window time $c / no-comm: $(ratio "${win[$c]}" "${win[no-comm]}")"
        done
    done
fi
for m in sync async streaming ddp; do
    if [[ -n "${loss[$m-u8]:-}" && -n "${loss[$m-fp32]:-}" ]]; then
        echo "# $m: u8 / fp32 final loss $(ratio "${loss[$m-u8]}" "${loss[$m-fp32]}"), bytes $(ratio "${tx[$m-u8]}" "${tx[$m-fp32]}")"
    fi
done
