//! The relayed tiny all-reduce: every peer's buffer rode in its init to
//! the master, which handed all of them back in the commence, in ring
//! order. Each peer reduces them in rank order, exactly as the direct
//! algorithm does, so results are bit-identical on every peer and equal to
//! the ring's for exact ops. One round trip to the master and no
//! peer-to-peer traffic: the op's whole latency. The master decides the op
//! when it sends the commence, so there is no verdict to wait for.

use super::RawBuf;
use crate::error::{Error, Result};
use crate::kernels;
use crate::types::{DataType, ReduceOp};

/// Reduces `contributions` (one per rank, in rank order) into `acc`.
/// Returns (tx bytes, rx bytes): this peer's own buffer went out with its
/// init, the others' came in. Nothing is written unless every
/// contribution has `acc`'s length.
pub(crate) fn reduce_relayed(
    contributions: &[Vec<u8>],
    rank: usize,
    dtype: DataType,
    op: ReduceOp,
    acc: RawBuf,
) -> Result<(u64, u64)> {
    let len = acc.len();
    if contributions.len() < 2
        || rank >= contributions.len()
        || contributions.iter().any(|c| c.len() != len)
    {
        return Err(Error::Internal(format!(
            "the master relayed {} buffers of {:?} bytes for a {len}-byte all-reduce",
            contributions.len(),
            contributions.iter().map(Vec::len).collect::<Vec<_>>()
        )));
    }
    // SAFETY: `acc` is the caller's result buffer, valid for `len` bytes
    // while the op runs; nothing else touches it (no task of this op runs).
    let dst = unsafe { acc.slice_mut(0, len) };
    dst.copy_from_slice(&contributions[0]);
    for c in &contributions[1..] {
        kernels::reduce_into(dtype, op, dst, c);
    }
    if op == ReduceOp::Avg {
        kernels::finalize_avg(dtype, dst, contributions.len() as u32);
    }
    let rx = contributions
        .iter()
        .enumerate()
        .filter(|(r, _)| *r != rank)
        .map(|(_, c)| c.len() as u64)
        .sum();
    Ok((len as u64, rx))
}
