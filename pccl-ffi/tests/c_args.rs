//! Runs `tests/c/args.c`, a C program that checks the C API's argument and
//! lifecycle rules with exact result codes (see the file's header comment):
//! linked against libpccl.so and against libpccl.a, and under valgrind.
//! Skipped, with a message, without gcc (or valgrind for that test).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{build, c_source, have, scratch_dir, Link, Procs};

fn run_args(link: Link, mode: &str, valgrind: bool, test: &str) {
    if !have("gcc") || (valgrind && !have("valgrind")) {
        return;
    }
    let dir = scratch_dir(test);
    let exe = build(&dir, "args", &[c_source("args.c")], link);
    let mut cmd = if valgrind {
        let mut c = Command::new("valgrind");
        c.args(["--error-exitcode=1", "--leak-check=no", "-q"])
            .arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    cmd.arg(mode);
    let mut procs = Procs::new();
    let p = procs.spawn("args", cmd);
    let timeout = Duration::from_secs(if valgrind { 240 } else { 60 });
    let line = procs.wait_line(p, "ARGS ", timeout);
    let status = procs.wait_exit(p, timeout);
    assert!(
        line.starts_with("ARGS OK") && status.success(),
        "args {mode} ({link:?}{}): {line} / {status}",
        if valgrind { ", valgrind" } else { "" }
    );
    println!("{line}");
}

/// Every function's argument checks, linked against the shared library.
#[test]
fn argument_checks_shared() {
    run_args(Link::Shared, "basic", false, "args-shared");
}

/// The same program linked against the static library.
#[test]
fn argument_checks_static() {
    run_args(Link::Static, "basic", false, "args-static");
}

/// Shared-state sync of a single connected peer (revision rules included).
#[test]
fn single_peer_shared_state() {
    run_args(Link::Shared, "sync", false, "args-sync");
}

/// The argument-checking program under valgrind: no invalid reads/writes,
/// no uses of uninitialized values, in the library or at the boundary.
#[test]
fn argument_checks_under_valgrind() {
    run_args(Link::Shared, "basic", true, "args-valgrind");
}
