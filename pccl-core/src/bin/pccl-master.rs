//! `pccl-master`: runs the PCCL-rs master (coordinator) until Ctrl-C.

use std::net::SocketAddr;

use clap::Parser;
use pccl_core::{MasterConfig, MasterNode};

#[derive(Parser, Debug)]
#[command(
    name = "pccl-master",
    version,
    about = "Run the PCCL-rs master (coordinator) that peers connect to"
)]
struct Args {
    /// Address and port to listen on.
    #[arg(long, default_value = "0.0.0.0:48148", env = "PCCL_MASTER_LISTEN")]
    listen: SocketAddr,
    /// Evict a peer that shows no sign of life for this many milliseconds.
    #[arg(long, default_value_t = 5000)]
    peer_timeout_ms: u64,
    /// Largest all-reduce (bytes on the wire per peer's contribution) the
    /// master runs with the one-hop direct algorithm when peers leave the
    /// choice to it; default: derived per world size from the link figures
    /// below (docs/concepts.md, "Collectives and algorithms").
    #[arg(long)]
    small_op_max_bytes: Option<u64>,
    /// One-way peer-to-peer latency the automatic threshold assumes.
    #[arg(long, default_value_t = MasterConfig::default().link_latency_us)]
    link_latency_us: u64,
    /// Per-peer bandwidth (bits/s) the automatic threshold assumes.
    #[arg(long, default_value_t = MasterConfig::default().link_bandwidth_bps)]
    link_bandwidth_bps: u64,
    /// Log filter (error, warn, info, debug, trace); also PCCL_LOG / RUST_LOG.
    #[arg(long)]
    log_level: Option<String>,
}

fn main() {
    let args = Args::parse();
    pccl_core::logging::init(Some(args.log_level.as_deref().unwrap_or("info")));
    let cfg = MasterConfig {
        peer_timeout_ms: args.peer_timeout_ms,
        small_op_max_bytes: args.small_op_max_bytes,
        link_latency_us: args.link_latency_us,
        link_bandwidth_bps: args.link_bandwidth_bps,
        ..MasterConfig::default()
    };
    let mut master = match MasterNode::bind(args.listen, cfg) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("pccl-master: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = master.run() {
        eprintln!("pccl-master: {e}");
        std::process::exit(2);
    }
    println!("pccl-master listening on {}", master.local_addr());
    let (tx, rx) = std::sync::mpsc::channel();
    if let Err(e) = ctrlc_channel(tx) {
        eprintln!("pccl-master: cannot install the Ctrl-C handler: {e}");
    }
    let _ = rx.recv();
    eprintln!("pccl-master: interrupted, shutting down");
    master.interrupt();
    let _ = master.await_termination();
}

/// Sends on `tx` at SIGINT or SIGTERM.
fn ctrlc_channel(tx: std::sync::mpsc::Sender<()>) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                        let _ = tx.send(());
                        return;
                    }
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            let _ = tx.send(());
        });
    });
    Ok(())
}
