# shellcheck shell=bash
# Sourced by the benchmark scripts: optional wan-emu hosts and helpers that
# run a command on host i (or locally on loopback). Expects `n` (hosts) and
# `log_dir`; sets `wan`, `where` and `pids` (the caller appends every
# background pid so the EXIT trap reaps it and tears the hosts down).
wan=""
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [[ -n "$wan" ]] && "$wan" down >/dev/null 2>&1 || true
}
trap cleanup EXIT
where="loopback"
if [[ "${WAN:-0}" == 1 ]]; then
    wan=${WAN_EMU:-$(pwd)/../shared/wan-emu}/wan.sh
    wan_opts=${WAN_OPTS:---delay 50ms --loss 0.01% --rate 100mbit --tcp-mem 64M}
    # shellcheck disable=SC2086
    "$wan" up "$n" $wan_opts >"$log_dir/wan-up.log" 2>&1 || { cat "$log_dir/wan-up.log" >&2; exit 1; }
    where="wan-emu ($wan_opts)"
fi
in_host() { # host-index command...
    local i=$1
    shift
    if [[ -n "$wan" ]]; then "$wan" exec "h$i" "$@"; else "$@"; fi
}
host_ip() { if [[ -n "$wan" ]]; then "$wan" ip "h$1"; else echo 127.0.0.1; fi; }
free_port() { in_host 0 python3 -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])'; }
