//! `pccl-worker`: one scriptable peer process running the canonical
//! fault-tolerant loop (see `pccl_stress::swarm::worker` for the loop and
//! the recovery rules, `pccl_stress::swarm::lines` for its stdout format).
//! The fault tests, the churn harness and people at a shell start it:
//!
//! ```text
//! pccl-master --listen 127.0.0.1:48148 &
//! pccl-worker --master 127.0.0.1:48148 --elems 4194304 --state-mib 64 --steps 100 &
//! pccl-worker --master 127.0.0.1:48148 --elems 4194304 --state-mib 64 --steps 100
//! ```
//!
//! Exit status: 0 after `--steps` steps or a graceful stop
//! (`--graceful-signals` + SIGTERM/SIGINT); 1 on an unrecoverable error,
//! after a `FATAL msg=...` line; 3 when stdout or (with
//! `--exit-on-stdin-eof`) stdin closes.

use std::process::ExitCode;

use clap::Parser;
use pccl_stress::swarm::worker::{self, WorkerArgs};

#[derive(Parser, Debug)]
#[command(
    about = "A PCCL peer running the canonical fault-tolerant loop, one stdout line per step"
)]
struct Cli {
    #[command(flatten)]
    worker: WorkerArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match worker::run(&cli.worker) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pccl-worker: {e}");
            ExitCode::FAILURE
        }
    }
}
