//! Build script of pccl-ffi (libpccl): on Linux, gives the shared library the
//! soname `libpccl.so`, so programs linked with `-lpccl` record that name.
//!
//! Only the C API's `pccl*` functions are exported from libpccl.so: rustc's
//! own version script for a cdylib already exports just the `#[no_mangle]`
//! functions, and `tests/exports.rs` checks the dynamic symbol table. A second
//! version script is deliberately not passed: GNU ld rejects two anonymous
//! version scripts ("anonymous version tag cannot be combined with other
//! version tags") and lld merges them, so it would break some toolchains and
//! restrict nothing on the others.

use std::env;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libpccl.so");
    }
}
