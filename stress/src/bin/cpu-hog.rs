//! `cpu-hog`: busy threads beside a PCCL run, to prove liveness under
//! oversubscription (issue #19; `docs/reliability.md`). Runs until its
//! stdin reaches EOF (the harness that piped it is gone) or it is killed.
//!
//! ```text
//! cpu-hog --threads 4 < /dev/zero &   # runs until killed
//! ```

use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Busy threads until stdin closes")]
struct Cli {
    /// Busy threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() {
    let cli = Cli::parse();
    let n = cli.threads.unwrap_or_else(pccl_stress::hog::cores);
    if let Err(e) = pccl_stress::hog::spawn_busy_threads(n) {
        eprintln!("cpu-hog: cannot start threads: {e}");
        std::process::exit(1);
    }
    pccl_stress::hog::wait_stdin_eof();
}
