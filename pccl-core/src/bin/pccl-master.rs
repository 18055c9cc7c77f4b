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
    /// Log filter (error, warn, info, debug, trace); also PCCL_LOG / RUST_LOG.
    #[arg(long)]
    log_level: Option<String>,
}

fn main() {
    let args = Args::parse();
    pccl_core::logging::init(Some(args.log_level.as_deref().unwrap_or("info")));
    let cfg = MasterConfig {
        peer_timeout_ms: args.peer_timeout_ms,
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
