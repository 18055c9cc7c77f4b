//! Fault-tolerance harnesses: a scriptable peer process, its line protocol,
//! a supervisor for child processes, a shared-state hash audit and a swarm
//! driver that runs a master plus peer processes and turns their output into
//! events.
//!
//! - [`worker`]: the canonical fault-tolerant training loop of one peer
//!   (connect, admit newcomers, sync shared state, all-reduce with retry,
//!   deterministic state update), printing one machine-readable line per
//!   step. The `pccl-worker` binary and the swarm demo's peer role run it.
//! - [`lines`]: that line format, written by the worker and parsed (with
//!   errors that name the offending line) by the harnesses.
//! - [`procs`]: child processes whose stdout and stderr lines arrive on one
//!   channel; signals (kill, stop, continue, terminate); every child is
//!   killed and reaped when the supervisor is dropped, panics included.
//! - [`audit`]: per-step agreement of the shared-state hashes peers report.
//! - [`driver`]: an embedded master and a set of peer processes, with the
//!   bookkeeping the churn harness and the demo share (joins, leaves,
//!   evictions, retries, hang detection, step aggregation).

pub mod audit;
pub mod driver;
pub mod lines;
pub mod procs;
pub mod worker;

use std::fmt::Display;

/// Errors of the harnesses: a message with context added on the way up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<String> for Error {
    fn from(s: String) -> Self {
        Error(s)
    }
}

impl From<&str> for Error {
    fn from(s: &str) -> Self {
        Error(s.to_owned())
    }
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Adds a description of what failed to an error (a tiny `anyhow::Context`).
pub trait Context<T> {
    fn context(self, what: impl Display) -> Result<T>;
    fn with_context<D: Display>(self, what: impl FnOnce() -> D) -> Result<T>;
}

impl<T, E: Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl Display) -> Result<T> {
        self.map_err(|e| Error(format!("{what}: {e}")))
    }
    fn with_context<D: Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| Error(format!("{}: {e}", what())))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, what: impl Display) -> Result<T> {
        self.ok_or_else(|| Error(what.to_string()))
    }
    fn with_context<D: Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.ok_or_else(|| Error(what().to_string()))
    }
}

/// Bytes as a short human string (KiB, MiB, GiB).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Parses a duration such as `90s`, `2m`, `1500ms`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> std::result::Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, mult_ms) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e3)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600e3)
    } else {
        (s, 1e3)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|e| format!("bad duration '{s}': {e}"))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("bad duration '{s}'"));
    }
    Ok(std::time::Duration::from_millis((v * mult_ms) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90s").unwrap().as_secs(), 90);
        assert_eq!(parse_duration("2m").unwrap().as_secs(), 120);
        assert_eq!(parse_duration("1500ms").unwrap().as_millis(), 1500);
        assert_eq!(parse_duration("30").unwrap().as_secs(), 30);
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn human() {
        assert_eq!(human_bytes(10), "10 B");
        assert_eq!(human_bytes(16 << 20), "16.0 MiB");
    }
}
