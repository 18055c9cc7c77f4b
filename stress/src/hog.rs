//! CPU load beside a run (issue #19): busy threads inside a process
//! ([`spawn_busy_threads`], the worker's `--busy-threads`) and a separate
//! hog process ([`CpuHog`], the `cpu-hog` binary, churn's `--cpu-hog`).

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Busy arithmetic forever: keeps one core saturated, touches no locks and
/// (nearly) no memory.
pub fn burn_forever() -> ! {
    let mut x = 1.000_1f64;
    loop {
        for _ in 0..1_000_000 {
            x = (x * 1.000_000_1 + 1e-9).sqrt() + 0.5;
        }
        x = std::hint::black_box(x);
    }
}

/// Starts `n` detached busy threads (they end with the process).
pub fn spawn_busy_threads(n: usize) -> std::io::Result<()> {
    for i in 0..n {
        std::thread::Builder::new()
            .name(format!("busy-{i}"))
            .spawn(|| burn_forever())?;
    }
    Ok(())
}

/// Blocks until stdin reaches EOF or fails (the parent is gone).
pub fn wait_stdin_eof() {
    let mut sink = [0u8; 256];
    let mut stdin = std::io::stdin();
    while let Ok(n) = stdin.read(&mut sink) {
        if n == 0 {
            break;
        }
    }
}

/// A `cpu-hog` process running `threads` busy threads, SIGKILLed and reaped
/// when dropped (panics included); it also exits when our end of its stdin
/// pipe closes, so it never outlives the harness.
pub struct CpuHog {
    child: Child,
    pub threads: usize,
}

impl CpuHog {
    pub fn spawn(exe: &Path, threads: usize) -> std::io::Result<CpuHog> {
        let child = Command::new(exe)
            .arg("--threads")
            .arg(threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(CpuHog { child, threads })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Cores of this machine (1 if unknown).
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
