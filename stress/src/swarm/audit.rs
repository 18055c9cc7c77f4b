//! Shared-state agreement: every peer reports, per step, the hash of its
//! shared state right after that step's sync. Peers that report the same
//! step must report the same hash; anything else is a mismatch (a broken
//! bit-parity guarantee).

use std::collections::BTreeMap;

/// A step at which peers reported different state hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub step: u64,
    /// The hash reported first and who reported it.
    pub first: (u64, String),
    /// The disagreeing report.
    pub other: (u64, String),
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "step {}: {} reported {:016x} but {} reported {:016x}",
            self.step, self.first.1, self.first.0, self.other.1, self.other.0
        )
    }
}

/// Per-step hash reports.
#[derive(Debug, Default)]
pub struct HashAudit {
    /// step -> (first hash, first reporter, number of agreeing reports)
    steps: BTreeMap<u64, (u64, String, u32)>,
    mismatches: Vec<Mismatch>,
    reports: u64,
}

impl HashAudit {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `peer`'s hash at `step`; returns the mismatch if it disagrees.
    pub fn record(&mut self, step: u64, hash: u64, peer: &str) -> Option<Mismatch> {
        self.reports += 1;
        match self.steps.get_mut(&step) {
            None => {
                self.steps.insert(step, (hash, peer.to_owned(), 1));
                None
            }
            Some((h, first, n)) => {
                if *h == hash {
                    *n += 1;
                    None
                } else {
                    let m = Mismatch {
                        step,
                        first: (*h, first.clone()),
                        other: (hash, peer.to_owned()),
                    };
                    self.mismatches.push(m.clone());
                    Some(m)
                }
            }
        }
    }

    /// How many reports agree with the first one at `step`.
    pub fn agreeing(&self, step: u64) -> u32 {
        self.steps.get(&step).map_or(0, |s| s.2)
    }

    /// The hash first reported at `step`.
    pub fn hash_at(&self, step: u64) -> Option<u64> {
        self.steps.get(&step).map(|s| s.0)
    }

    pub fn mismatches(&self) -> &[Mismatch] {
        &self.mismatches
    }

    /// Distinct steps seen.
    pub fn steps(&self) -> usize {
        self.steps.len()
    }

    /// Steps that at least two peers reported (where agreement was actually tested).
    pub fn compared_steps(&self) -> usize {
        self.steps.values().filter(|s| s.2 >= 2).count()
    }

    /// Hash reports recorded.
    pub fn reports(&self) -> u64 {
        self.reports
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_disagreement() {
        let mut a = HashAudit::new();
        assert!(a.record(1, 10, "p0").is_none());
        assert!(a.record(1, 10, "p1").is_none());
        let m = a.record(1, 11, "p2").unwrap();
        assert_eq!(m.step, 1);
        assert_eq!(a.agreeing(1), 2);
        assert!(a.record(2, 11, "p2").is_none());
        assert_eq!(a.mismatches().len(), 1);
        assert_eq!(a.compared_steps(), 1);
        assert_eq!(a.steps(), 2);
    }
}
