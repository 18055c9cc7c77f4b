//! Load-balancing modes and how the global expert counts are obtained.
//!
//! `micro` balances each peer's batch on its own counts; `global` sums the
//! per-layer expert counts of every peer with one between-steps all-reduce
//! per inner step (a few hundred bytes: it rides the master's relay, one
//! round trip). `fresh` waits for that all-reduce before the loss; `stale`
//! uses the previous step's global counts and runs this step's all-reduce
//! behind the backward pass and the optimizer step, so its latency is hidden
//! at the price of balancing on counts one step old.
//!
//! May import: pccl-core's DiLoCo driver.

use pccl_core::diloco::{DiLoCo, SideReduce, SideReduceInfo};
use pccl_core::ReduceOp;

/// How the load-balancing loss gets its selection fractions fᵢ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Balance {
    /// No load-balancing loss.
    None,
    /// fᵢ from this peer's own batch.
    Micro,
    /// fᵢ from the counts of every peer's batch (all-reduced).
    #[default]
    Global,
}

impl Balance {
    pub fn name(self) -> &'static str {
        match self {
            Balance::None => "none",
            Balance::Micro => "micro",
            Balance::Global => "global",
        }
    }
}

/// When the global counts are synchronized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LblSync {
    /// This step's global counts, before the loss (latency exposed).
    #[default]
    Fresh,
    /// The previous step's global counts; this step's all-reduce overlaps
    /// the backward pass and optimizer step (latency hidden).
    Stale,
}

/// Flattens per-layer counts into one buffer (one all-reduce for all layers).
pub fn flatten(counts: &[Vec<u32>]) -> Vec<u32> {
    counts.iter().flatten().copied().collect()
}

/// Splits a flat buffer back into `layers` rows.
pub fn unflatten(flat: &[u32], layers: usize) -> Vec<Vec<u32>> {
    if layers == 0 {
        return Vec::new();
    }
    flat.chunks(flat.len().div_ceil(layers).max(1))
        .map(|c| c.to_vec())
        .collect()
}

/// The outcome of one step's global-count all-reduce.
#[derive(Debug, Clone)]
pub struct GlobalCounts {
    pub counts: Vec<Vec<u32>>,
    pub info: Result<SideReduceInfo, String>,
}

/// Sums `local` across the group now (fresh mode). On error the local
/// counts stand in and the error is reported.
pub fn reduce_now(diloco: &DiLoCo, local: &[Vec<u32>]) -> GlobalCounts {
    let mut flat = flatten(local);
    let info = diloco
        .all_reduce_between_steps(&mut flat, ReduceOp::Sum)
        .map_err(|e| e.to_string());
    let counts = if info.is_ok() {
        unflatten(&flat, local.len())
    } else {
        local.to_vec()
    };
    GlobalCounts { counts, info }
}

/// Starts the sum of `local` in the background (stale mode).
pub fn start(diloco: &DiLoCo, local: &[Vec<u32>]) -> Result<Pending, String> {
    let handle = diloco
        .start_between_steps(flatten(local), ReduceOp::Sum)
        .map_err(|e| e.to_string())?;
    Ok(Pending {
        handle,
        local: local.to_vec(),
    })
}

/// A stale-mode all-reduce in flight.
pub struct Pending {
    handle: SideReduce<u32>,
    local: Vec<Vec<u32>>,
}

impl Pending {
    pub fn wait(self) -> GlobalCounts {
        let (flat, r) = self.handle.wait();
        match r {
            Ok(info) => GlobalCounts {
                counts: unflatten(&flat, self.local.len()),
                info: Ok(info),
            },
            Err(e) => GlobalCounts {
                counts: self.local,
                info: Err(e.to_string()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flatten_round_trips() {
        let c = vec![vec![1, 2, 3], vec![4, 5, 6]];
        assert_eq!(flatten(&c), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(unflatten(&flatten(&c), 2), c);
        assert!(unflatten(&[], 0).is_empty());
    }
}
