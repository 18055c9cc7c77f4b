//! Progress reports of a shared-state fetch: a line at the default log
//! level (target [`crate::logging::PROGRESS_TARGET`]) with bytes, rate and
//! ETA once per [`crate::CommunicatorConfig::progress_interval`], and the
//! optional [`crate::CommunicatorConfig::on_sync_progress`] callback.
//!
//! Leaf of `shared_state`: the fetch counts the tensor bytes it has
//! received in an `AtomicU64`; [`report_progress`] samples it.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Progress of one shared-state fetch (see
/// [`crate::CommunicatorConfig::on_sync_progress`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyncProgress {
    /// Tensor bytes received so far (counted range by range, so it grows in
    /// steps of up to [`super::RANGE_BYTES`]; never decreases).
    pub received_bytes: u64,
    /// Tensor bytes this fetch transfers in all.
    pub total_bytes: u64,
    /// Time since the fetch started.
    pub elapsed: Duration,
    /// `true` in the last report, once every byte has arrived (the tensors
    /// are then verified by hash before the sync returns).
    pub done: bool,
}

impl SyncProgress {
    /// Average rate since the start, in bytes per second.
    pub fn bytes_per_sec(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.received_bytes as f64 / s
        } else {
            0.0
        }
    }

    /// Time left at the average rate so far (`None` before any byte came).
    pub fn eta(&self) -> Option<Duration> {
        let rate = self.bytes_per_sec();
        if rate <= 0.0 {
            return None;
        }
        let left = self.total_bytes.saturating_sub(self.received_bytes) as f64;
        Some(Duration::from_secs_f64(left / rate))
    }
}

/// A callback for [`SyncProgress`] reports (a cheaply clonable `Arc`).
#[derive(Clone)]
pub struct SyncProgressCallback(pub Arc<dyn Fn(SyncProgress) + Send + Sync>);

impl SyncProgressCallback {
    pub fn new(f: impl Fn(SyncProgress) + Send + Sync + 'static) -> Self {
        SyncProgressCallback(Arc::new(f))
    }
}

impl fmt::Debug for SyncProgressCallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SyncProgressCallback(..)")
    }
}

/// How a fetch reports its progress.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProgressOpts {
    /// Zero: no periodic lines or callbacks (the final callback still runs).
    pub interval: Duration,
    pub callback: Option<SyncProgressCallback>,
}

/// `1.5 GiB`, `12.0 MiB`, `512 B`.
pub(crate) fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[0])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// One line of progress, e.g. `1.2 GiB of 4.0 GiB (30 %), 110.0 MiB/s, ETA 26 s`.
pub(crate) fn describe(p: &SyncProgress) -> String {
    let pct = if p.total_bytes > 0 {
        100.0 * p.received_bytes as f64 / p.total_bytes as f64
    } else {
        100.0
    };
    let eta = match p.eta() {
        Some(d) => format!("ETA {:.0} s", d.as_secs_f64()),
        None => "ETA unknown".into(),
    };
    format!(
        "{} of {} ({pct:.0} %), {}/s, {eta}",
        human_bytes(p.received_bytes as f64),
        human_bytes(p.total_bytes as f64),
        human_bytes(p.bytes_per_sec()),
    )
}

fn sample(received: &AtomicU64, total: u64, start: Instant, done: bool) -> SyncProgress {
    SyncProgress {
        received_bytes: received.load(Ordering::Relaxed).min(total),
        total_bytes: total,
        elapsed: start.elapsed(),
        done,
    }
}

/// A running [`report_progress`] task, aborted when dropped.
pub(crate) struct Reporter(tokio::task::JoinHandle<()>);

impl Reporter {
    pub(crate) fn spawn(
        received: Arc<AtomicU64>,
        total: u64,
        start: Instant,
        opts: ProgressOpts,
    ) -> Self {
        Reporter(tokio::spawn(report_progress(received, total, start, opts)))
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reports every `opts.interval` (the first one interval after `start`)
/// until the future is dropped: a log line and the callback. Nothing when
/// the interval is zero.
async fn report_progress(received: Arc<AtomicU64>, total: u64, start: Instant, opts: ProgressOpts) {
    if opts.interval.is_zero() {
        return;
    }
    let first = tokio::time::Instant::from_std(start) + opts.interval;
    let mut tick = tokio::time::interval_at(first, opts.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let p = sample(&received, total, start, false);
        tracing::info!(
            target: crate::logging::PROGRESS_TARGET,
            "fetching shared state: {}",
            describe(&p)
        );
        if let Some(cb) = &opts.callback {
            (cb.0)(p);
        }
    }
}

/// The last report of a fetch whose bytes have all arrived: the callback
/// with `done`, and a closing log line if the fetch lasted an interval or
/// more (so a short fetch logs nothing at the default level).
pub(crate) fn report_done(received: &AtomicU64, total: u64, start: Instant, opts: &ProgressOpts) {
    let p = sample(received, total, start, true);
    if !opts.interval.is_zero() && p.elapsed >= opts.interval {
        tracing::info!(
            target: crate::logging::PROGRESS_TARGET,
            "fetched shared state: {} in {:.1} s ({}/s)",
            human_bytes(p.total_bytes as f64),
            p.elapsed.as_secs_f64(),
            human_bytes(p.bytes_per_sec())
        );
    }
    if let Some(cb) = &opts.callback {
        (cb.0)(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_eta_and_lines() {
        let p = SyncProgress {
            received_bytes: 1 << 30,
            total_bytes: 4 << 30,
            elapsed: Duration::from_secs(2),
            done: false,
        };
        assert_eq!(p.bytes_per_sec(), (512 << 20) as f64);
        assert_eq!(p.eta(), Some(Duration::from_secs(6)));
        assert_eq!(
            describe(&p),
            "1.0 GiB of 4.0 GiB (25 %), 512.0 MiB/s, ETA 6 s"
        );
        let none = SyncProgress {
            received_bytes: 0,
            ..p
        };
        assert_eq!(none.eta(), None);
        assert_eq!(human_bytes(512.0), "512 B");
    }
}
