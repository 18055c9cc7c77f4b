#!/usr/bin/env bash
# MoE trainer comparisons on a local swarm (embedded master, N peer
# processes, no churn): DiLoCo fp32 against u8 pseudo-gradients (final
# validation loss, bytes), and sync / async DiLoCo / fresh and stale global
# counts against the no-communication baseline (median and mean inner-step
# time). One run per configuration, all in one invocation; prints a table
# and the ratios.
#
#   scripts/bench-moe.sh [N]      N peers (default 3)
#
# Environment: STEPS (400) inner steps, H (20), CONFIGS (subset of the names
# below), EXTRA (more moe-trainer flags), NO_BUILD=1, LOG_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-3}
target=${CARGO_TARGET_DIR:-target}
log_dir=${LOG_DIR:-${TMPDIR:-/tmp}/pccl-bench-moe}
mkdir -p "$log_dir"
if [[ "${NO_BUILD:-0}" != 1 ]]; then
    cargo build --release -p moe-trainer >&2
fi
bin=$(realpath "$target/release/moe-trainer")
declare -A flags=(
    [none]="--mode none"
    [sync-fp32]="--mode sync --quant fp32"
    [sync-u8]="--mode sync --quant u8"
    [async-fp32]="--mode async --quant fp32"
    [async-u8]="--mode async --quant u8"
    [sync-fp32-stale]="--mode sync --quant fp32 --lbl-sync stale"
)
order=${CONFIGS:-none sync-fp32 sync-u8 async-fp32 async-u8 sync-fp32-stale}
echo "# $(date -u +%FT%TZ) bench-moe: $n local peers, ${STEPS:-400} inner steps, H=${H:-20}, global LBL; nproc $(nproc) ${EXTRA:-}"
printf '%-16s %9s %12s %10s %10s %10s %8s\n' config val_mean tx_all step_p50 step_mean count_p50 wall_s
declare -A val tx p50 mean
for cfg in $order; do
    # shellcheck disable=SC2206
    extra=(${flags[$cfg]} ${EXTRA:-})
    out="$log_dir/$cfg"
    "$bin" --peers "$n" --no-churn --no-plot --inner-steps "${STEPS:-400}" --sync-every "${H:-20}" \
        "${extra[@]}" --out "$out" >"$log_dir/$cfg.log" 2>&1 || { echo "$cfg failed; see $log_dir/$cfg.log" >&2; exit 1; }
    read -r v t a m c w < <(python3 - "$out/moe-trainer.json" <<'PY'
import json, statistics as st, sys
r = json.load(open(sys.argv[1]))["runs"][0]
steps = [s["step_ms"] for s in r["steps"]]
val = r["outer"][-1]["val"]
side = r["side_ms_median"]
print(f"{sum(val)/len(val):.4f} {r['tx_bytes']} {st.median(steps):.1f} {st.mean(steps):.1f} "
      f"{side if side is not None else float('nan'):.2f} {r['wall_s']:.1f}")
PY
)
    val[$cfg]=$v tx[$cfg]=$t p50[$cfg]=$a mean[$cfg]=$m
    printf '%-16s %9s %12s %10s %10s %10s %8s\n' "$cfg" "$v" "$t" "$a" "$m" "$c" "$w"
done
ratio() { python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f'{a/b:.3f}' if b else 'n/a')" "$1" "$2"; }
echo "## ratios"
for c in sync-fp32 async-fp32 sync-u8 async-u8 sync-fp32-stale; do
    if [[ -n "${mean[$c]:-}" && -n "${mean[none]:-}" ]]; then
        echo "# mean step time $c / none: $(ratio "${mean[$c]}" "${mean[none]}"), median $(ratio "${p50[$c]}" "${p50[none]}")"
    fi
done
for m in sync async; do
    if [[ -n "${val[$m-u8]:-}" && -n "${val[$m-fp32]:-}" ]]; then
        echo "# $m: u8 / fp32 validation loss $(ratio "${val[$m-u8]}" "${val[$m-fp32]}"), bytes $(ratio "${tx[$m-u8]}" "${tx[$m-fp32]}")"
    fi
done
