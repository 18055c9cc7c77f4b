#!/usr/bin/env bash
# The one test command: builds everything and runs every check and test —
# formatting, clippy, Rust unit/integration tests (C header/ABI tests
# included), the Python suite (in a cached virtual environment with maturin,
# numpy, pytest and PyTorch) and two short churn stress runs (exact and
# quantized all-reduces).
# Exits non-zero if anything fails; the last line is the summary.
#
# Environment:
#   PCCL_VENV            Python venv to create/reuse (default ~/.cache/pccl-rs/venv)
#   PCCL_CHURN_SECS      length of the exact churn run (default 60)
#   PCCL_CHURN_QUANT_SECS  length of the quantized (minmax > u8) churn run (default 30)
#   PCCL_CHURN_CPU_HOG   busy threads of the cpu-hog process beside the exact churn
#                        run (default: the number of cores; healthy peers must
#                        never be evicted, docs/reliability.md)
#   PCCL_SKIP_PYTHON=1   skip the Python suite (local iteration only; CI never sets it)
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

passed=0
failed=0
report=()
step() {
    local name=$1
    shift
    echo
    echo "=== $name: $*"
    local t0=$SECONDS
    if "$@"; then
        passed=$((passed + 1))
        report+=("PASS  $name ($((SECONDS - t0)) s)")
    else
        failed=$((failed + 1))
        report+=("FAIL  $name ($((SECONDS - t0)) s)")
    fi
}

python_suite() {
    local venv=${PCCL_VENV:-$HOME/.cache/pccl-rs/venv}
    if [ ! -x "$venv/bin/python" ]; then
        echo "creating the Python test environment in $venv (PyTorch is large: first run downloads ~3 GB)"
        python3 -m venv "$venv" || return 1
    fi
    "$venv/bin/python" -m pip install --quiet --upgrade pip || return 1
    "$venv/bin/python" -m pip install --quiet -r bindings/python/requirements-test.txt || return 1
    if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
        "$venv/bin/python" -m pip install --quiet torch || return 1
    fi
    # Build and install the package exactly as a user would.
    CARGO_TARGET_DIR="$root/target/python" "$venv/bin/python" -m pip install --quiet --force-reinstall --no-deps ./bindings/python || return 1
    (cd bindings/python && PCCL_REQUIRE_TORCH=1 "$venv/bin/python" -m pytest -q tests)
}

step "cargo fmt" cargo fmt --all -- --check
step "clippy" cargo clippy --workspace --all-targets --quiet -- -D warnings
step "cargo test" cargo test --workspace
if [ "${PCCL_SKIP_PYTHON:-0}" = 1 ]; then
    report+=("SKIP  python (PCCL_SKIP_PYTHON=1)")
else
    step "python" python_suite
fi
churn() {
    cargo build --release --quiet -p pccl-stress --bins &&
        ./target/release/churn --duration "${PCCL_CHURN_SECS:-60}s" --cpu-hog "${PCCL_CHURN_CPU_HOG:-$(nproc)}"
}
step "churn" churn
churn_quant() {
    ./target/release/churn --duration "${PCCL_CHURN_QUANT_SECS:-30}s" --quant minmax --quant-type u8
}
step "churn (quantized)" churn_quant

echo
echo "=== summary"
printf '%s\n' "${report[@]}"
echo "test.sh: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
