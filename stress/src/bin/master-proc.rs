//! `master-proc`: a PCCL master in a process of its own, for tests that
//! freeze the master itself (SIGSTOP) to check that its own starvation never
//! evicts peers (docs/reliability.md). Prints `LISTEN <addr>` once serving;
//! when stdin reaches EOF it prints `LIVENESS evictions=<n> late_ticks=<n>
//! max_tick_late_ms=<ms> summary=<text>` and exits.
//!
//! ```text
//! master-proc --peer-timeout-ms 2000 < fifo
//! ```

use std::io::Write;
use std::net::SocketAddr;

use clap::Parser;
use pccl_core::{MasterConfig, MasterNode};

#[derive(Parser, Debug)]
#[command(about = "A PCCL master as a process; reports its liveness figures when stdin closes")]
struct Cli {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The master evicts a peer silent for this long (ms).
    #[arg(long, default_value_t = 5_000)]
    peer_timeout_ms: u64,
    /// The most of a late tick's gap counted against peers (ms); a huge
    /// value turns the master's discount of its own stalls off (experiments).
    #[arg(long, default_value_t = MasterConfig::default().max_tick_step_ms)]
    max_tick_step_ms: u64,
}

fn main() {
    let cli = Cli::parse();
    pccl_core::logging::init(None);
    let cfg = MasterConfig {
        peer_timeout_ms: cli.peer_timeout_ms,
        max_tick_step_ms: cli.max_tick_step_ms,
        ..MasterConfig::default()
    };
    let mut master = match MasterNode::bind(cli.listen, cfg).and_then(|mut m| m.run().map(|_| m)) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("master-proc: {e}");
            std::process::exit(1);
        }
    };
    println!("LISTEN {}", master.local_addr());
    let _ = std::io::stdout().flush();
    pccl_stress::hog::wait_stdin_eof();
    let l = master.liveness();
    println!(
        "LIVENESS evictions={} late_ticks={} max_tick_late_ms={} summary={}",
        l.evictions.len(),
        l.late_ticks,
        l.max_tick_late_ms,
        l.summary()
    );
    let _ = std::io::stdout().flush();
    master.interrupt();
    let _ = master.await_termination();
}
