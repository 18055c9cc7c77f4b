#!/usr/bin/env bash
# fp32 against quantized all-reduce on loopback, in one run: for each world
# size, pccl-bench runs the exact f32 sum and then the quantized one on the
# same sizes, alternating ROUNDS times, and the summary gives busbw (in
# source-dtype bytes), bytes on the wire per peer and the quantized/f32
# ratios of the best round of each.
#
#   scripts/bench-quant.sh [-- extra pccl-bench options]
#
# Environment: NS (world sizes, default "2 3 4"), SIZES (default 16M,128M),
# QUANT (default minmax), QDTYPE (default u8), ROUNDS (default 2),
# ITERS (default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ "${1:-}" == "--" ]] && shift
ns=${NS:-2 3 4}
sizes=${SIZES:-16M,128M}
quant=${QUANT:-minmax}
qdtype=${QDTYPE:-u8}
rounds=${ROUNDS:-2}
iters=${ITERS:-10}
target=${CARGO_TARGET_DIR:-target}
cargo build --release -p pccl-stress --bin pccl-bench >&2
bench="$target/release/pccl-bench"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "# $(date -u +%FT%TZ) bench-quant: N in ($ns), sizes $sizes, f32 vs $quant>$qdtype, $rounds rounds x $iters iters, nproc $(nproc)"
for n in $ns; do
    for r in $(seq 1 "$rounds"); do
        "$bench" -n "$n" --sizes "$sizes" --pool-size 1 --no-probe --iters "$iters" --warmup 2 "$@" \
            >"$out/n$n-f32-$r.txt"
        "$bench" -n "$n" --sizes "$sizes" --pool-size 1 --no-probe --iters "$iters" --warmup 2 \
            --quant "$quant" --quant-dtype "$qdtype" "$@" >"$out/n$n-q-$r.txt"
    done
done

# Data rows: size count type op pool conc time min algbw busbw tx rx wrong cpu...
best() { # file-glob size -> "busbw tx"
    cat $1 | awk -v s="$2" '$1 == s && $1 ~ /^[0-9]+$/ { if ($10 > b) { b = $10; tx = $11 } } END { print b, tx }'
}
printf '%-3s %-10s %-14s %-14s %-8s %-16s %-16s %-8s\n' N size "f32 busbw" "q busbw" ratio "f32 wire B/peer" "q wire B/peer" ratio
for n in $ns; do
    for size in $(awk -F, '{ for (i = 1; i <= NF; i++) print $i }' <<<"$sizes"); do
        bytes=$(numfmt --from=iec "$size")
        read -r fb ft < <(best "$out/n$n-f32-*.txt" "$bytes")
        read -r qb qt < <(best "$out/n$n-q-*.txt" "$bytes")
        printf '%-3s %-10s %-14s %-14s %-8s %-16s %-16s %-8s\n' "$n" "$size" "$fb GB/s" "$qb GB/s" \
            "$(awk -v a="$qb" -v b="$fb" 'BEGIN { printf "%.2f", a / b }')" "$ft" "$qt" \
            "$(awk -v a="$qt" -v b="$ft" 'BEGIN { printf "%.3f", a / b }')"
    done
done
