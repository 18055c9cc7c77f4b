//! Multi-process test of the C API's broadcast, all-gather and
//! reduce-scatter extensions: `tests/c/collectives.c` is compiled with gcc
//! against `pccl.h`, linked against libpccl.so and libpccl.a, and run as a
//! master (on an OS-chosen port it prints) plus three peer processes on
//! OS-chosen ports. See collectives.c's header comment for every check; in
//! short: broadcast from every root, all-gather and reduce-scatter (sum, max,
//! min) for every data type, odd counts and counts smaller than the world,
//! each compared exactly with a reference computed in the C program; the
//! async forms; and argument errors with their exact result codes. Here the
//! driver checks that the broadcast / all-gather outputs and the gathered
//! reduce-scatter outputs hash the same on every peer.
//!
//! Every child process is killed and reaped when the test ends, pass or
//! fail. Skipped, with a message, without gcc.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{build, c_source, have, scratch_dir, start_master, stop_master, Link, Procs};

const STEP: Duration = Duration::from_secs(120);

#[test]
fn broadcast_all_gather_reduce_scatter_three_peers() {
    if !have("gcc") {
        return;
    }
    let dir = scratch_dir("collectives");
    let src = [c_source("collectives.c")];
    let shared = build(&dir, "collectives_shared", &src, Link::Shared);
    let static_ = build(&dir, "collectives_static", &src, Link::Static);
    let mut procs = Procs::new();
    let (m, port) = start_master(&mut procs, &shared, 5000);
    let world = 3;
    let peers: Vec<usize> = (0..world)
        .map(|id| {
            // Alternate the builds so both libraries interoperate.
            let exe = if id % 2 == 0 { &shared } else { &static_ };
            let mut cmd = Command::new(exe);
            cmd.arg("peer")
                .arg(port.to_string())
                .arg(id.to_string())
                .arg(world.to_string());
            procs.spawn(&format!("peer{id}"), cmd)
        })
        .collect();
    for (prefix, what) in [
        ("COLL ", "the broadcast and all-gather outputs"),
        ("RS ", "the gathered reduce-scatter outputs"),
    ] {
        let lines: Vec<String> = peers
            .iter()
            .map(|&p| procs.wait_line(p, prefix, STEP))
            .collect();
        assert!(
            lines.windows(2).all(|w| w[0] == w[1]),
            "{what} differ between peers: {lines:?}"
        );
    }
    for &p in &peers {
        procs.wait_line(p, "PEER_DONE", STEP);
        procs.expect_success(p, STEP);
    }
    stop_master(&mut procs, m);
}
