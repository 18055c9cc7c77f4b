//! The master's liveness bookkeeping, kept out of the agreement logic:
//!
//! - a *judged clock* that discounts the master's own scheduling delay. The
//!   driver ticks every [`super::TICK`]; a tick that arrives more than
//!   [`MasterConfig::max_tick_step_ms`](super::MasterConfig) after the
//!   previous one means the master itself was not running (starved by the OS
//!   or by its runtime), so only that much of the gap is counted. Peers are
//!   judged on the judged clock only: a stall on the master's side never
//!   evicts a peer.
//! - statistics of what the master saw: gaps between consecutive heartbeats
//!   of each peer (real time), its own late ticks, data-plane credits and
//!   evictions (see `docs/reliability.md`).
//!
//! Everything here is sans-IO: time comes in as numbers.

use std::collections::BTreeMap;

use crate::wire::PeerId;

/// Real and judged time of the master, in milliseconds.
#[derive(Debug, Clone)]
pub(crate) struct Clock {
    /// Latest real time seen (ticks and observed events); never runs backwards.
    real_ms: u64,
    /// Real time of the last tick.
    last_tick_ms: u64,
    /// Sum of the counted parts of the gaps between ticks.
    judged_ms: u64,
    max_step_ms: u64,
}

impl Clock {
    pub fn new(max_step_ms: u64) -> Self {
        Clock {
            real_ms: 0,
            last_tick_ms: 0,
            judged_ms: 0,
            max_step_ms: max_step_ms.max(1),
        }
    }

    pub fn real_ms(&self) -> u64 {
        self.real_ms
    }

    pub fn judged_ms(&self) -> u64 {
        self.judged_ms
    }

    /// Real time seen outside a tick (e.g. when a message arrives): refines
    /// the heartbeat-gap statistics, judges nobody.
    pub fn observe(&mut self, now_ms: u64) {
        self.real_ms = self.real_ms.max(now_ms);
    }

    /// A tick at `now_ms`: advances the judged clock by the real time since
    /// the previous tick, at most `max_step_ms`. Returns the discounted part
    /// (how late the master itself was), 0 for a punctual tick.
    pub fn tick(&mut self, now_ms: u64) -> u64 {
        self.observe(now_ms);
        let delta = self.real_ms - self.last_tick_ms;
        self.last_tick_ms = self.real_ms;
        let counted = delta.min(self.max_step_ms);
        self.judged_ms += counted;
        delta - counted
    }
}

/// A peer the master evicted for silence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eviction {
    pub peer: PeerId,
    /// Judged silence at eviction (just over the timeout).
    pub silent_ms: u64,
    /// Real master time of the eviction.
    pub at_ms: u64,
}

/// What the master saw of its peers' liveness (see `docs/reliability.md`).
#[derive(Debug, Clone, Default)]
pub struct LivenessStats {
    /// Gaps between consecutive heartbeats (`Heartbeat` or `DataProgress`)
    /// of the same peer, in real milliseconds: gap → count.
    pub heartbeat_gaps: BTreeMap<u64, u64>,
    /// Ticks handled.
    pub ticks: u64,
    /// Ticks that came late (part of their gap was discounted).
    pub late_ticks: u64,
    /// Largest discounted part of one tick gap.
    pub max_tick_late_ms: u64,
    /// Sum of the discounted parts.
    pub discounted_ms: u64,
    /// Times a peer's liveness was credited by a neighbour's report of
    /// data-plane bytes received from it.
    pub progress_credits: u64,
    /// Peers evicted for silence, in order.
    pub evictions: Vec<Eviction>,
}

impl LivenessStats {
    pub(crate) fn record_gap(&mut self, gap_ms: u64) {
        *self.heartbeat_gaps.entry(gap_ms).or_insert(0) += 1;
    }

    pub(crate) fn record_tick(&mut self, late_ms: u64) {
        self.ticks += 1;
        if late_ms > 0 {
            self.late_ticks += 1;
            self.discounted_ms += late_ms;
            self.max_tick_late_ms = self.max_tick_late_ms.max(late_ms);
        }
    }

    /// Heartbeat gaps recorded.
    pub fn gap_count(&self) -> u64 {
        self.heartbeat_gaps.values().sum()
    }

    /// Largest heartbeat gap (0 without any).
    pub fn max_gap_ms(&self) -> u64 {
        self.heartbeat_gaps.keys().next_back().copied().unwrap_or(0)
    }

    /// The `q`-quantile (0..=1) of the heartbeat gaps, nearest rank (0 without any).
    pub fn gap_quantile_ms(&self, q: f64) -> u64 {
        let n = self.gap_count();
        if n == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (gap, count) in &self.heartbeat_gaps {
            seen += count;
            if seen >= rank {
                return *gap;
            }
        }
        self.max_gap_ms()
    }

    /// One line for logs and reports.
    pub fn summary(&self) -> String {
        format!(
            "heartbeat gaps: n={} p50={} ms p99={} ms max={} ms; master ticks: {} ({} late, \
             max {} ms late, {} ms discounted); data-plane credits: {}; evictions: {}",
            self.gap_count(),
            self.gap_quantile_ms(0.5),
            self.gap_quantile_ms(0.99),
            self.max_gap_ms(),
            self.ticks,
            self.late_ticks,
            self.max_tick_late_ms,
            self.discounted_ms,
            self.progress_credits,
            self.evictions.len(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punctual_ticks_count_in_full_late_ones_are_capped() {
        let mut c = Clock::new(100);
        assert_eq!(c.tick(50), 0);
        assert_eq!(c.tick(100), 0);
        assert_eq!(c.judged_ms(), 100);
        // The master slept 6 s: only 100 ms of it count.
        assert_eq!(c.tick(6_100), 5_900);
        assert_eq!(c.judged_ms(), 200);
        assert_eq!(c.real_ms(), 6_100);
        // Observed time between ticks judges nobody and is not counted twice.
        c.observe(6_130);
        assert_eq!(c.tick(6_150), 0);
        assert_eq!(c.judged_ms(), 250);
        // Time never runs backwards.
        assert_eq!(c.tick(10), 0);
        assert_eq!(c.judged_ms(), 250);
    }

    #[test]
    fn gap_quantiles_use_the_nearest_rank() {
        let mut s = LivenessStats::default();
        assert_eq!((s.max_gap_ms(), s.gap_quantile_ms(0.99)), (0, 0));
        for g in 1..=100 {
            s.record_gap(g);
        }
        s.record_gap(100);
        assert_eq!(s.gap_count(), 101);
        assert_eq!(s.gap_quantile_ms(0.5), 51);
        assert_eq!(s.gap_quantile_ms(0.99), 100);
        assert_eq!(s.gap_quantile_ms(0.0), 1);
        assert_eq!(s.max_gap_ms(), 100);
        s.record_tick(0);
        s.record_tick(30);
        s.record_tick(10);
        assert_eq!((s.ticks, s.late_ticks, s.max_tick_late_ms), (3, 2, 30));
        assert_eq!(s.discounted_ms, 40);
    }
}
