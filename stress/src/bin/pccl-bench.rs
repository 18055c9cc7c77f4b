//! `pccl-bench`: all-reduce (and broadcast, all-gather, reduce-scatter)
//! benchmark for PCCL-rs in the style of nccl-tests.
//!
//! ```text
//! # embedded master + ring probe + 2 peer processes on loopback, 4 B .. 256 MiB:
//! cargo run --release -p pccl-stress --bin pccl-bench -- -n 2
//! # selected sizes, pool sizes 1 and 4, 3 peers:
//! pccl-bench -n 3 --sizes 4,1M,16M,128M --pool-size 1,4
//! # quantized:
//! pccl-bench -n 2 --quant minmax --quant-dtype u8
//! # the ring and the direct all-reduce back to back; the other collectives:
//! pccl-bench -n 4 --algorithm ring,direct --sizes 4,1K,64K
//! pccl-bench -n 4 --collective all-gather --sizes 16M
//! # WAN mode: one peer per host/namespace joining an existing master:
//! ip netns exec ns1 pccl-bench --peer-only --master 10.0.0.1:48148 -n 4
//! ```
//!
//! See `pccl_stress::bench` for the roles, the timing method and the
//! verification, and `docs/benchmarks.md` for measured figures.

use std::process::ExitCode;

use clap::Parser;
use pccl_stress::bench::{launcher, peer, probe, Args, Role};

fn main() -> ExitCode {
    let args = Args::parse();
    pccl_core::logging::init(None);
    let role = args.effective_role();
    let outcome = match role {
        Role::Launcher => launcher::run(&args),
        Role::Peer => peer::run(&args).map(|()| true),
        Role::Probe => probe::run_child(&args).map(|()| true),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("pccl-bench ({role:?}): {e}");
            ExitCode::FAILURE
        }
    }
}
