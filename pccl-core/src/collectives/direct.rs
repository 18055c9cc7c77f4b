//! The one-hop small all-reduce: every peer sends its whole buffer (in
//! sub-chunks, quantized once when the op is quantized) straight to every
//! other peer, then reduces all `w` contributions in rank order. One hop of
//! latency instead of the ring's `2(w-1)`, for `(w-1)` times the bytes out
//! of each peer: the master picks it for small ops (see
//! `master::small_op_threshold`).
//!
//! Bit-parity: every peer reduces the same bytes in the same order (rank
//! 0, then 1, ...), so all end with identical results. For exact ops
//! (integers, Max/Min) the result equals the ring's. A quantized op reduces
//! the decoded contributions, its own included, so the own contribution
//! goes through the same quantization the others see.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{frame_matches, interrupted, Outbox, Payload, RawBuf};
use crate::bufpool::{BufPool, PooledBuf};
use crate::comm::p2p::{Frame, OpRoute, OutPool};
use crate::error::{Error, Result};
use crate::types::{DataType, QuantizationAlgorithm, ReduceOp};
use crate::wire::{DataHeader, Encoding, PeerId};
use crate::{kernels, quant};

/// Everything that defines one direct all-reduce.
#[derive(Debug, Clone)]
pub(crate) struct DirectParams {
    pub op_id: u64,
    pub rank: usize,
    pub count: usize,
    pub dtype: DataType,
    pub op: ReduceOp,
    pub quant: Option<(DataType, QuantizationAlgorithm)>,
    pub chunk_elems: usize,
}

impl DirectParams {
    fn chunks(&self) -> usize {
        self.count.div_ceil(self.chunk_elems)
    }

    /// First element and element count of chunk `c`.
    fn chunk(&self, c: usize) -> (usize, usize) {
        let start = c * self.chunk_elems;
        (start, self.chunk_elems.min(self.count - start))
    }

    fn payload_len(&self, elems: usize) -> usize {
        match self.quant {
            None => elems * self.dtype.size(),
            Some((q, algo)) => quant::encoded_len(self.dtype, q, algo, elems),
        }
    }

    fn encoding(&self) -> Encoding {
        match self.quant {
            None => Encoding::Raw,
            Some(_) => Encoding::Quantized,
        }
    }

    fn header(&self, c: usize, payload_len: usize) -> [u8; DataHeader::LEN] {
        let (start, n) = self.chunk(c);
        DataHeader {
            op_id: self.op_id,
            step: 0,
            encoding: self.encoding(),
            segment: self.rank as u32,
            chunk: c as u32,
            elem_offset: start as u64,
            elems: n as u32,
            payload_len: payload_len as u32,
        }
        .encode()
    }
}

/// Runs the op. `input` is only read; `acc` (distinct from `input`)
/// receives the result. `pools[r]` reaches rank `r` (`None` for this
/// peer). Returns (tx bytes, rx bytes); every task is joined before it
/// returns, whatever the outcome.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_direct(
    p: &DirectParams,
    ring: &[PeerId],
    input: RawBuf,
    input_owner: Option<Arc<Vec<u8>>>,
    acc: RawBuf,
    inbox: &mut mpsc::Receiver<Frame>,
    route: &OpRoute,
    abort: &CancellationToken,
    pools: Vec<Option<Arc<OutPool>>>,
    bufs: &Arc<BufPool>,
) -> Result<(u64, u64)> {
    let send_failed = CancellationToken::new();
    let outboxes: Vec<Option<Outbox>> = pools
        .iter()
        .map(|pool| {
            pool.as_ref()
                .map(|pool| Outbox::new(pool, &send_failed, &input_owner))
        })
        .collect();
    let mut rx_bytes = 0u64;
    let result = exchange(
        p,
        ring,
        input,
        acc,
        inbox,
        route,
        abort,
        &send_failed,
        &outboxes,
        bufs,
        &mut rx_bytes,
    )
    .await;
    let mut tx_bytes = 0u64;
    let mut send_err = None;
    for outbox in outboxes.into_iter().flatten() {
        match outbox.finish(result.is_err()).await {
            Ok(n) => tx_bytes += n,
            Err(e) => {
                send_err.get_or_insert(e);
            }
        }
    }
    result?;
    if let Some(e) = send_err {
        return Err(e);
    }
    Ok((tx_bytes, rx_bytes))
}

#[allow(clippy::too_many_arguments)]
async fn exchange(
    p: &DirectParams,
    ring: &[PeerId],
    input: RawBuf,
    acc: RawBuf,
    inbox: &mut mpsc::Receiver<Frame>,
    route: &OpRoute,
    abort: &CancellationToken,
    send_failed: &CancellationToken,
    outboxes: &[Option<Outbox>],
    bufs: &Arc<BufPool>,
    rx_bytes: &mut u64,
) -> Result<()> {
    let world = ring.len();
    let chunks = p.chunks();
    let ds = p.dtype.size();
    // This peer's encoded chunks (quantized ops reduce them like the others').
    let mut own: Vec<Option<Arc<PooledBuf>>> = vec![None; chunks];
    for (c, slot) in own.iter_mut().enumerate() {
        let (start, n) = p.chunk(c);
        let (off, len) = (start * ds, n * ds);
        let payload = match p.quant {
            None => None,
            Some((q, algo)) => {
                let mut enc = bufs.get(quant::encoded_len(p.dtype, q, algo, n));
                // SAFETY: the input is only read while the op runs.
                quant::quantize(p.dtype, q, algo, unsafe { input.slice(off, len) }, &mut enc)?;
                Some(Arc::new(enc))
            }
        };
        for outbox in outboxes.iter().flatten() {
            let item = match &payload {
                None => Payload::Borrowed {
                    buf: input,
                    off,
                    len,
                },
                Some(enc) => Payload::Shared(enc.clone()),
            };
            let plen = p.payload_len(n);
            outbox.enqueue(p.header(c, plen), item)?;
        }
        *slot = payload;
    }

    // Every other rank's chunks, as they arrive.
    let mut staged: Vec<Vec<Option<PooledBuf>>> = (0..world)
        .map(|_| (0..chunks).map(|_| None).collect())
        .collect();
    let mut remaining = (world - 1) * chunks;
    while remaining > 0 {
        let frame = tokio::select! {
            biased;
            e = interrupted(abort, route, send_failed) => return Err(e),
            f = inbox.recv() => f.ok_or_else(|| Error::Internal("inbox closed".into()))?,
        };
        *rx_bytes += (DataHeader::LEN + frame.header.payload_len as usize) as u64;
        let bad = |what: &str| {
            Error::RankConnectionLost(format!(
                "peer {} sent a malformed frame: {what}",
                frame.from
            ))
        };
        let h = frame.header;
        let sender = ring
            .iter()
            .position(|x| *x == frame.from)
            .filter(|r| *r != p.rank)
            .ok_or_else(|| bad("not a peer of this op"))?;
        let c = h.chunk as usize;
        if h.step != 0 || h.segment as usize != sender || c >= chunks {
            return Err(bad("step, rank or chunk out of range"));
        }
        let (start, n) = p.chunk(c);
        if !frame_matches(&h, start, n, p.encoding(), p.payload_len(n)) {
            return Err(bad("chunk geometry or encoding does not match"));
        }
        let slot = &mut staged[sender][c];
        if slot.is_some() {
            return Err(bad("duplicate chunk"));
        }
        *slot = Some(frame.payload);
        remaining -= 1;
    }

    // Reduce in rank order, chunk by chunk, straight into the result.
    for c in 0..chunks {
        let (start, n) = p.chunk(c);
        let (off, len) = (start * ds, n * ds);
        // SAFETY: `acc` is the caller's result buffer, distinct from the
        // input; no task of this op touches it but this loop.
        let dst = unsafe { acc.slice_mut(off, len) };
        for (r, theirs) in staged.iter().enumerate() {
            let theirs: &[u8] = if r == p.rank {
                match &own[c] {
                    Some(enc) => enc,
                    // SAFETY: the input is only read while the op runs.
                    None => unsafe { input.slice(off, len) },
                }
            } else {
                theirs[c]
                    .as_deref()
                    .ok_or_else(|| Error::Internal("a contribution is missing".into()))?
            };
            match (p.quant, r) {
                (None, 0) => dst.copy_from_slice(theirs),
                (None, _) => kernels::reduce_into(p.dtype, p.op, dst, theirs),
                (Some((q, algo)), 0) => {
                    quant::dequantize_into(p.dtype, q, algo, None, theirs, dst)?
                }
                (Some((q, algo)), _) => {
                    quant::dequantize_into(p.dtype, q, algo, Some(p.op), theirs, dst)?
                }
            }
        }
        if p.op == ReduceOp::Avg {
            kernels::finalize_avg(p.dtype, dst, world as u32);
        }
    }
    Ok(())
}
