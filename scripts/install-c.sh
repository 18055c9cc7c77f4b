#!/usr/bin/env bash
# Builds libpccl (the C API of PCCL-rs) in release mode and installs it:
#   PREFIX/lib/libpccl.so, PREFIX/lib/libpccl.a,
#   PREFIX/include/{pccl.h,ccoip.h,ccoip_inet.h},
#   PREFIX/lib/pkgconfig/pccl.pc
#
# Usage: scripts/install-c.sh [PREFIX]      (default: /usr/local)
#
# Afterwards: cc app.c $(pkg-config --cflags --libs pccl)
# (set PKG_CONFIG_PATH=PREFIX/lib/pkgconfig for a non-standard PREFIX, and
# LD_LIBRARY_PATH=PREFIX/lib or an rpath to run against the shared library;
# pkg-config --static --libs pccl lists what a static link needs).
set -euo pipefail

usage() {
    echo "usage: $0 [PREFIX]   (default /usr/local)" >&2
    exit 2
}

[[ $# -le 1 ]] || usage
case "${1:-}" in -h | --help) usage ;; esac

PREFIX="${1:-/usr/local}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

echo "==> cargo build --release -p pccl-ffi"
cargo build --release -p pccl-ffi

# Where cargo put the artifacts (honours CARGO_TARGET_DIR and .cargo/config).
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
TARGET_DIR="${TARGET_DIR:-$ROOT/target}"
LIB_DIR="$TARGET_DIR/release"
for f in libpccl.so libpccl.a; do
    if [[ ! -f "$LIB_DIR/$f" ]]; then
        echo "error: $LIB_DIR/$f was not built" >&2
        exit 1
    fi
done

# Package version, e.g. "path+file:///src/pccl-ffi#0.1.0" -> "0.1.0".
PKGID="$(cargo pkgid -p pccl-ffi)"
VERSION="${PKGID##*[#@]}"

# Native libraries a static link of libpccl.a needs, as rustc reports them
# (this recompiles only pccl-ffi itself); fall back to Rust std's usual list.
LIBS_PRIVATE="$(cargo rustc --release -p pccl-ffi --lib -- --print native-static-libs 2>&1 |
    sed -n 's/.*native-static-libs: //p' | head -n 1 || true)"
LIBS_PRIVATE="${LIBS_PRIVATE:--lgcc_s -lutil -lrt -lpthread -lm -ldl -lc}"

mkdir -p "$PREFIX"
PREFIX="$(cd "$PREFIX" && pwd)"
echo "==> installing into $PREFIX"
install -d "$PREFIX/lib" "$PREFIX/lib/pkgconfig" "$PREFIX/include"
install -m 0755 "$LIB_DIR/libpccl.so" "$PREFIX/lib/libpccl.so"
install -m 0644 "$LIB_DIR/libpccl.a" "$PREFIX/lib/libpccl.a"
for h in pccl.h ccoip.h ccoip_inet.h; do
    install -m 0644 "pccl-ffi/include/$h" "$PREFIX/include/$h"
done

# Escape a value for the replacement side of a sed s||| expression.
sed_escape() { printf '%s' "$1" | sed -e 's/[\\|&]/\\&/g'; }
sed -e "s|@PREFIX@|$(sed_escape "$PREFIX")|g" \
    -e "s|@VERSION@|$(sed_escape "$VERSION")|g" \
    -e "s|@LIBS_PRIVATE@|$(sed_escape "$LIBS_PRIVATE")|g" \
    pccl-ffi/pccl.pc.in >"$PREFIX/lib/pkgconfig/pccl.pc"

if [[ $(id -u) -eq 0 ]] && command -v ldconfig >/dev/null 2>&1; then
    ldconfig || true
fi

echo "==> installed libpccl $VERSION:"
echo "    $PREFIX/lib/libpccl.so"
echo "    $PREFIX/lib/libpccl.a"
echo "    $PREFIX/include/pccl.h ccoip.h ccoip_inet.h"
echo "    $PREFIX/lib/pkgconfig/pccl.pc"
echo "    build with: cc app.c \$(PKG_CONFIG_PATH=$PREFIX/lib/pkgconfig pkg-config --cflags --libs pccl)"
