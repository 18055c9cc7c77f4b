//! Builds the user-facing examples `examples/c/hello.c` (gcc, C99) and
//! `examples/c/hello.cpp` (g++, C++17) against libpccl, and runs them as two
//! peers of one swarm (master: `tests/c/swarm.c` in master mode), each with
//! `PCCL_PEER_PORT_BASE=0` (the environment extension) so they use free ports.
//! Both must finish every step and print the same checksum of the shared
//! weights at every step: the canonical loop (connect with retry, update
//! topology, shared-state sync, all-reduce with retry, identical update)
//! keeps the peers bit-identical, and C and C++ peers interoperate.
//! Skipped, with a message, without gcc and g++.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{
    build, c_source, have, repo_dir, scratch_dir, start_master, stop_master, Link, Procs,
};

const STEPS: usize = 8;

#[test]
fn hello_c_and_cpp_train_together() {
    if !have("gcc") || !have("g++") {
        return;
    }
    let dir = scratch_dir("hello");
    let examples = repo_dir().join("examples/c");
    let hello_c = build(&dir, "hello_c", &[examples.join("hello.c")], Link::Shared);
    let hello_cpp = build(
        &dir,
        "hello_cpp",
        &[examples.join("hello.cpp")],
        Link::Static,
    );
    let swarm = build(&dir, "swarm", &[c_source("swarm.c")], Link::Shared);

    let mut procs = Procs::new();
    let (m, port) = start_master(&mut procs, &swarm, 5000);
    let master = format!("127.0.0.1:{port}");
    let mut peers = Vec::new();
    for (name, exe) in [("hello_c", &hello_c), ("hello_cpp", &hello_cpp)] {
        let mut cmd = Command::new(exe);
        cmd.arg(STEPS.to_string())
            .arg(&master)
            .env("PCCL_PEER_PORT_BASE", "0");
        peers.push(procs.spawn(name, cmd));
    }
    let timeout = Duration::from_secs(60);
    let mut outputs = Vec::new();
    for &p in &peers {
        procs.expect_success(p, timeout);
        let steps = procs.lines(p, "step ");
        assert_eq!(
            steps.len(),
            STEPS,
            "{} printed {} step lines: {steps:?}",
            procs.name(p),
            steps.len()
        );
        for (i, line) in steps.iter().enumerate() {
            assert!(
                line.starts_with(&format!("step {i} world 2 checksum ")),
                "{}: unexpected line {line:?}",
                procs.name(p)
            );
        }
        outputs.push(steps);
    }
    assert_eq!(
        outputs[0], outputs[1],
        "hello.c and hello.cpp disagree on the weights"
    );
    stop_master(&mut procs, m);
}
