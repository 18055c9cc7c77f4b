//! Compile checks of the public C headers (`include/pccl.h`, `ccoip.h`,
//! `ccoip_inet.h`):
//!
//! - `tests/c/header_c99.c` with `gcc -std=c99 -pedantic -Wall -Wextra -Werror`
//!   plus stricter warnings; it uses every type, member and enumerator and
//!   restates every function signature as a typed function pointer.
//! - `tests/c/header_cxx.cpp` with `g++ -std=c++17 -Wall -Wextra -Werror` (and
//!   C++11); it checks exact signatures with `std::is_same` and every
//!   enumerator value against SPEC.md section 3.
//! - each header alone, as C99 and as C++17, to prove it is self-contained.
//!
//! All are `-fsyntax-only`: nothing is linked, so they need no libpccl. Each
//! test prints a message and passes when its compiler (gcc / g++) is missing.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

const HEADERS: [&str; 3] = ["ccoip_inet.h", "ccoip.h", "pccl.h"];

const C_FLAGS: &[&str] = &[
    "-std=c99",
    "-pedantic",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wstrict-prototypes",
    "-Wmissing-prototypes",
    "-Wshadow",
    "-Wundef",
    "-Wconversion",
    "-Wsign-conversion",
    "-Wredundant-decls",
    "-Wcast-qual",
    "-Wwrite-strings",
    "-fsyntax-only",
];

const CXX_FLAGS: &[&str] = &[
    "-pedantic",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wshadow",
    "-Wconversion",
    "-Wold-style-cast",
    "-Wzero-as-null-pointer-constant",
    "-fsyntax-only",
];

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn have(compiler: &str) -> bool {
    let ok = Command::new(compiler)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        println!("SKIPPED: `{compiler}` not found; install it to check the C headers");
    }
    ok
}

/// Runs `compiler flags -I include <input>`, feeding `stdin` if given; panics
/// with the compiler's diagnostics on failure.
fn compile(compiler: &str, flags: &[&str], input: &str, stdin: Option<&str>, what: &str) {
    let mut cmd = Command::new(compiler);
    cmd.args(flags)
        .arg("-I")
        .arg(crate_dir().join("include"))
        .arg(input)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {compiler}: {e}"));
    if let Some(mut pipe) = child.stdin.take() {
        if let Some(text) = stdin {
            pipe.write_all(text.as_bytes())
                .unwrap_or_else(|e| panic!("writing to {compiler}: {e}"));
        }
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for {compiler}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({compiler} {}):\n{}{}",
        flags.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn test_file(name: &str) -> String {
    crate_dir()
        .join("tests/c")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

#[test]
fn headers_compile_as_strict_c99() {
    if !have("gcc") {
        return;
    }
    compile(
        "gcc",
        C_FLAGS,
        &test_file("header_c99.c"),
        None,
        "tests/c/header_c99.c as C99",
    );
    let mut c11 = C_FLAGS.to_vec();
    c11[0] = "-std=c11";
    compile(
        "gcc",
        &c11,
        &test_file("header_c99.c"),
        None,
        "tests/c/header_c99.c as C11",
    );
}

#[test]
fn headers_compile_as_cxx() {
    if !have("g++") {
        return;
    }
    for std in ["-std=c++17", "-std=c++11"] {
        let mut flags = vec![std];
        flags.extend_from_slice(CXX_FLAGS);
        compile(
            "g++",
            &flags,
            &test_file("header_cxx.cpp"),
            None,
            &format!("tests/c/header_cxx.cpp as {std}"),
        );
    }
}

#[test]
fn each_header_is_self_contained() {
    let have_gcc = have("gcc");
    let have_gxx = have("g++");
    for header in HEADERS {
        let src = format!("#include \"{header}\"\n#include \"{header}\"\n");
        if have_gcc {
            let mut flags = vec!["-x", "c"];
            flags.extend_from_slice(C_FLAGS);
            compile(
                "gcc",
                &flags,
                "-",
                Some(&src),
                &format!("{header} alone as C99"),
            );
        }
        if have_gxx {
            let mut flags = vec!["-x", "c++", "-std=c++17"];
            flags.extend_from_slice(CXX_FLAGS);
            compile(
                "g++",
                &flags,
                "-",
                Some(&src),
                &format!("{header} alone as C++17"),
            );
        }
    }
}
