//! Broadcast as a pipelined chain around the ring: the root sends its
//! buffer in sub-chunks to its right neighbour; every other peer writes
//! each sub-chunk into its buffer and forwards it from there, except the
//! root's left neighbour, which ends the chain. Every link carries the
//! buffer once, so the op runs at link speed plus `(w-1)` sub-chunk hops.
//!
//! Every peer ends with exactly the root's bytes. Raw bytes only (any
//! dtype); quantization is refused before the op starts.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{frame_matches, interrupted, Outbox, Payload, RawBuf};
use crate::comm::p2p::{Frame, OpRoute, OutPool};
use crate::error::{Error, Result};
use crate::wire::{DataHeader, Encoding};

/// Everything that defines one broadcast.
#[derive(Debug, Clone)]
pub(crate) struct BroadcastParams {
    pub op_id: u64,
    pub rank: usize,
    pub world: usize,
    pub root: usize,
    /// Buffer length in bytes.
    pub bytes: usize,
    /// Bytes per sub-chunk.
    pub chunk_bytes: usize,
}

impl BroadcastParams {
    fn chunks(&self) -> usize {
        self.bytes.div_ceil(self.chunk_bytes)
    }

    /// First byte and byte count of chunk `c`.
    fn chunk(&self, c: usize) -> (usize, usize) {
        let start = c * self.chunk_bytes;
        (start, self.chunk_bytes.min(self.bytes - start))
    }

    fn header(&self, c: usize) -> [u8; DataHeader::LEN] {
        let (start, n) = self.chunk(c);
        DataHeader {
            op_id: self.op_id,
            step: 0,
            encoding: Encoding::Raw,
            segment: self.root as u32,
            chunk: c as u32,
            elem_offset: start as u64,
            elems: n as u32,
            payload_len: n as u32,
        }
        .encode()
    }

    fn forwards(&self) -> bool {
        (self.rank + 1) % self.world != self.root
    }
}

/// Runs the op on `buf` (read at the root, written everywhere else).
/// `pool` reaches the right neighbour (`None` at the end of the chain).
/// Returns (tx bytes, rx bytes); every task is joined before it returns.
pub(crate) async fn run_broadcast(
    p: &BroadcastParams,
    buf: RawBuf,
    inbox: &mut mpsc::Receiver<Frame>,
    route: &OpRoute,
    abort: &CancellationToken,
    pool: Option<Arc<OutPool>>,
) -> Result<(u64, u64)> {
    let send_failed = CancellationToken::new();
    let outbox = pool
        .filter(|_| p.forwards())
        .map(|pool| Outbox::new(&pool, &send_failed, &None));
    let mut rx_bytes = 0u64;
    let result = relay(
        p,
        buf,
        inbox,
        route,
        abort,
        &send_failed,
        &outbox,
        &mut rx_bytes,
    )
    .await;
    let tx = match outbox {
        Some(o) => o.finish(result.is_err()).await,
        None => Ok(0),
    };
    result?;
    Ok((tx?, rx_bytes))
}

#[allow(clippy::too_many_arguments)]
async fn relay(
    p: &BroadcastParams,
    buf: RawBuf,
    inbox: &mut mpsc::Receiver<Frame>,
    route: &OpRoute,
    abort: &CancellationToken,
    send_failed: &CancellationToken,
    outbox: &Option<Outbox>,
    rx_bytes: &mut u64,
) -> Result<()> {
    let chunks = p.chunks();
    let send = |c: usize| -> Result<()> {
        let Some(outbox) = outbox else {
            return Ok(());
        };
        let (off, len) = p.chunk(c);
        outbox.enqueue(p.header(c), Payload::Borrowed { buf, off, len })
    };
    if p.rank == p.root {
        for c in 0..chunks {
            send(c)?;
        }
        // The root has nothing to receive; it only waits for its sends to
        // drain (in `run_broadcast`) or for the op to be interrupted.
        return Ok(());
    }
    let mut seen = vec![false; chunks];
    let mut remaining = chunks;
    while remaining > 0 {
        let frame = tokio::select! {
            biased;
            e = interrupted(abort, route, send_failed) => return Err(e),
            f = inbox.recv() => f.ok_or_else(|| Error::Internal("inbox closed".into()))?,
        };
        *rx_bytes += (DataHeader::LEN + frame.header.payload_len as usize) as u64;
        let h = frame.header;
        let c = h.chunk as usize;
        let bad = |what: &str| {
            Error::RankConnectionLost(format!(
                "peer {} sent a malformed broadcast frame: {what}",
                frame.from
            ))
        };
        if h.step != 0 || h.segment as usize != p.root || c >= chunks {
            return Err(bad("root or chunk out of range"));
        }
        let (off, len) = p.chunk(c);
        if !frame_matches(&h, off, len, Encoding::Raw, len) {
            return Err(bad("chunk geometry does not match"));
        }
        if std::mem::replace(&mut seen[c], true) {
            return Err(bad("duplicate chunk"));
        }
        // SAFETY: `buf` is the caller's buffer, valid while the op runs;
        // each chunk's range is written once, here, before it is queued for
        // forwarding, and never written again.
        unsafe { buf.slice_mut(off, len) }.copy_from_slice(&frame.payload);
        send(c)?;
        remaining -= 1;
    }
    Ok(())
}
