//! Collective algorithms over the p2p data plane, one file per algorithm:
//! [`ring`] (all-reduce, and its two halves as reduce-scatter and
//! all-gather), [`direct`] (the one-hop small all-reduce), [`relay`] (the
//! tiny all-reduce whose buffers ride through the master) and [`broadcast`]
//! (a pipelined chain from the root). This module holds what
//! they share: the raw view of caller buffers, the send queue and its
//! per-connection sender tasks, and task joining.
//!
//! May import: `comm::p2p` (frames, routes, outgoing pools), `kernels`,
//! `quant`, `wire`, `bufpool`, `types`, `error`.

pub(crate) mod broadcast;
pub(crate) mod direct;
pub(crate) mod relay;
pub(crate) mod ring;

use std::sync::Arc;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bufpool::PooledBuf;
use crate::comm::p2p::OutConn;
use crate::comm::p2p::OutPool;
use crate::error::{Error, Result};
use crate::quant;
use crate::types::{Algorithm, CollectiveKind, DataType, QuantizationAlgorithm};
use crate::wire::{DataHeader, PeerId};

pub(crate) use ring::{run_ring, Landing, RingParams, RingPhase};

/// A caller-owned byte buffer the ring reads and writes through raw
/// pointers. The op that holds it joins every task using it before returning.
#[derive(Clone, Copy)]
pub(crate) struct RawBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: RawBuf is only a pointer and a length; the all-reduce that creates
// it guarantees the memory outlives every task it is handed to (all tasks are
// joined before the op returns) and the ring's schedule never has two tasks
// write the same bytes at once.
unsafe impl Send for RawBuf {}
// SAFETY: see `Send`.
unsafe impl Sync for RawBuf {}

impl RawBuf {
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes for as long
    /// as any copy of the returned value is used.
    pub(crate) unsafe fn new(ptr: *mut u8, len: usize) -> Self {
        RawBuf { ptr, len }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// # Safety
    /// The range must not be written concurrently while the slice lives.
    pub(crate) unsafe fn slice(&self, off: usize, len: usize) -> &[u8] {
        debug_assert!(off + len <= self.len);
        std::slice::from_raw_parts(self.ptr.add(off), len)
    }

    /// # Safety
    /// The range must not be accessed by anyone else while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice_mut(&self, off: usize, len: usize) -> &mut [u8] {
        debug_assert!(off + len <= self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(off), len)
    }
}

/// What an in-place all-reduce (one buffer that is input and result at
/// once) keeps about the caller's buffer while the ring runs in it.
///
/// The ring reads every input range before it first writes that range
/// (`before_write` is called right before each first write, each range
/// once), so no copy of the input is needed to compute the result. With
/// `restore` on, `before_write` saves the bytes it is about to overwrite,
/// and a failed op writes them back: the buffer is then exactly the input
/// again, and a retry reduces the original data. The saved bytes grow with
/// what the op has overwritten, so a failure early in the op costs little,
/// and nothing is copied for ranges never written. With `restore` off
/// nothing is saved (peak memory: the tensor plus the in-flight sub-chunks),
/// and a failure after the first write is reported as
/// [`Error::InPlaceInputLost`] so that nobody retries on half-reduced data.
pub(crate) struct InPlace {
    buf: RawBuf,
    restore: bool,
    dirty: std::sync::atomic::AtomicBool,
    /// (offset, bytes) of every range saved so far. Plain vectors, not
    /// pool buffers: they are written once, never zero-filled first.
    saved: std::sync::Mutex<Vec<(usize, Vec<u8>)>>,
}

impl InPlace {
    pub(crate) fn new(buf: RawBuf, restore: bool) -> Arc<Self> {
        Arc::new(InPlace {
            buf,
            restore,
            dirty: std::sync::atomic::AtomicBool::new(false),
            saved: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Called by the one task about to write `len` bytes at `off` for the
    /// first time (the range is its alone: see [`Landing`]).
    pub(crate) fn before_write(&self, off: usize, len: usize) {
        self.dirty.store(true, std::sync::atomic::Ordering::Release);
        if !self.restore {
            return;
        }
        // SAFETY: the caller owns the range until it writes it; the op keeps
        // the buffer valid while it runs.
        let copy = unsafe { self.buf.slice(off, len) }.to_vec();
        if let Ok(mut saved) = self.saved.lock() {
            saved.push((off, copy));
        }
    }

    /// Whether any byte of the buffer was written.
    pub(crate) fn is_dirty(&self) -> bool {
        self.dirty.load(std::sync::atomic::Ordering::Acquire)
    }

    /// After a failure, with every task of the op joined: writes the saved
    /// bytes back, one saved range at a time with a yield in between (a
    /// large restore must not hold a runtime worker). Returns whether the
    /// buffer holds the input again.
    ///
    /// # Safety
    /// No task of the op may still access the buffer.
    pub(crate) async unsafe fn restore(&self) -> bool {
        if !self.is_dirty() {
            return true;
        }
        if !self.restore {
            return false;
        }
        let saved = match self.saved.lock() {
            Ok(mut saved) => std::mem::take(&mut *saved),
            Err(_) => return false,
        };
        for (off, bytes) in saved {
            // SAFETY: the op is over (the caller's contract) and `off..+len`
            // was a range of the buffer when it was saved.
            unsafe { self.buf.slice_mut(off, bytes.len()) }.copy_from_slice(&bytes);
            tokio::task::yield_now().await;
        }
        true
    }
}

pub(crate) enum Payload {
    /// Bytes of a caller buffer (the input or the result).
    Borrowed {
        buf: RawBuf,
        off: usize,
        len: usize,
    },
    Owned(PooledBuf),
    /// One encoding sent to several peers.
    Shared(Arc<PooledBuf>),
}

pub(crate) struct SendItem {
    pub header: [u8; DataHeader::LEN],
    pub payload: Payload,
    /// Called once the payload has been handed to the connection (its
    /// bytes are no longer read): an in-place ring marks the range
    /// writable then.
    pub on_sent: Option<Box<dyn FnOnce() + Send>>,
}

/// Sends queued frames on one connection until the queue closes.
/// `_input_owner` keeps library-owned input memory alive while this task
/// may still read it.
pub(crate) async fn sender_task(
    conn: Arc<OutConn>,
    queue: async_channel::Receiver<SendItem>,
    failed: CancellationToken,
    _input_owner: Option<Arc<Vec<u8>>>,
) -> Result<u64> {
    let mut sent = 0u64;
    while let Ok(item) = queue.recv().await {
        let payload: &[u8] = match &item.payload {
            // SAFETY: the range was final when it was queued and the ring
            // never writes it again while the op runs (see `Landing`), or,
            // in place, not before `on_sent` below has run; the
            // op joins this task before the caller's buffers are released,
            // and library-owned input lives in `_input_owner`.
            Payload::Borrowed { buf, off, len } => unsafe { buf.slice(*off, *len) },
            Payload::Owned(b) => b,
            Payload::Shared(b) => b,
        };
        if let Err(e) = conn.write_frame(&item.header, payload).await {
            failed.cancel();
            return Err(Error::RankConnectionLost(format!(
                "sending to peer {} failed: {e}",
                conn.peer()
            )));
        }
        sent += (DataHeader::LEN + payload.len()) as u64;
        if let Some(done) = item.on_sent {
            done();
        }
    }
    Ok(sent)
}

/// Joins every task of `set`, passing each success to `on_ok`; returns the
/// first error (a task's own, or its panic), ignoring cancelled tasks.
pub(crate) async fn join_all<T: 'static>(
    set: &mut JoinSet<Result<T>>,
    what: &str,
    mut on_ok: impl FnMut(T),
) -> Option<Error> {
    let mut first = None;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(v)) => on_ok(v),
            Ok(Err(e)) => {
                first.get_or_insert(e);
            }
            Err(e) if e.is_cancelled() => {}
            Err(e) => {
                first.get_or_insert(Error::Internal(format!("{what} task failed: {e}")));
            }
        }
    }
    first
}

/// Sub-chunks a pipelined op cuts each step's span into by default
/// (`CommunicatorConfig::pipeline_chunks`), so that a pool of up to this
/// many connections carries a frame each and the next hop starts on the
/// first chunk long before the step ends (on a long-fat link a step of one
/// 512 KiB chunk per connection ends all at once, then waits a one-way
/// delay for the next step's data).
pub(crate) const DEFAULT_PIPELINE_CHUNKS: usize = 16;

/// The smallest sub-chunk the pipelined split goes down to: below it the
/// per-frame costs (header, task hand-offs) start to show on loopback.
pub(crate) const MIN_PIPELINE_CHUNK_BYTES: usize = 64 << 10;

/// Elements per sub-chunk of a pipelined op (ring, its halves, broadcast)
/// whose peers each send `span_elems` elements per step: the span cut in
/// `pieces`, but no smaller than [`MIN_PIPELINE_CHUNK_BYTES`] and no larger
/// than `chunk_bytes`, aligned to quantization blocks. Depends only on
/// values every peer of the op shares (the op's shape and the configured
/// chunk size and pieces), so the frame geometry agrees.
pub(crate) fn pipelined_chunk_elems(
    dtype: DataType,
    quant: Option<(DataType, QuantizationAlgorithm)>,
    chunk_bytes: usize,
    pieces: usize,
    span_elems: usize,
) -> usize {
    let size = dtype.size();
    let cap = (chunk_bytes / size).max(1);
    let floor = (MIN_PIPELINE_CHUNK_BYTES / size).max(1);
    let split = span_elems.div_ceil(pieces.max(1));
    let elems = split.max(floor).min(cap);
    chunk_elems(dtype, quant, elems * size)
}

/// Elements per sub-chunk for `chunk_bytes`, aligned to quantization blocks.
pub(crate) fn chunk_elems(
    dtype: DataType,
    quant: Option<(DataType, QuantizationAlgorithm)>,
    chunk_bytes: usize,
) -> usize {
    let e = (chunk_bytes / dtype.size()).max(1);
    if quant.is_some() {
        let b = quant::QUANT_BLOCK_ELEMS;
        (e / b).max(1) * b
    } else {
        e
    }
}

/// Whom a peer at `rank` of `ring` receives from and sends to in one op:
/// (sources, sinks). The ring and its halves talk to the neighbours, the
/// direct algorithm to everyone, a broadcast chain from the root around
/// the ring (the root receives nothing; the root's left neighbour sends
/// nothing).
pub(crate) fn route_peers(
    ring: &[PeerId],
    rank: usize,
    kind: CollectiveKind,
    algorithm: Algorithm,
    root: usize,
) -> (Vec<PeerId>, Vec<PeerId>) {
    let n = ring.len();
    if n < 2 || rank >= n {
        return (Vec::new(), Vec::new());
    }
    let left = ring[(rank + n - 1) % n];
    let right_rank = (rank + 1) % n;
    let right = ring[right_rank];
    match (kind, algorithm) {
        // Relayed ops move their data through the master only.
        (_, Algorithm::Relay) => (Vec::new(), Vec::new()),
        (CollectiveKind::Broadcast, _) => {
            let sources = if rank == root { vec![] } else { vec![left] };
            let sinks = if right_rank == root {
                vec![]
            } else {
                vec![right]
            };
            (sources, sinks)
        }
        (_, Algorithm::Direct) => {
            let others: Vec<PeerId> = ring
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != rank)
                .map(|(_, p)| *p)
                .collect();
            (others.clone(), others)
        }
        _ => (vec![left], vec![right]),
    }
}

/// A send queue drained by one sender task per connection of `pool`.
pub(crate) struct Outbox {
    pub tx: async_channel::Sender<SendItem>,
    pub senders: JoinSet<Result<u64>>,
}

impl Outbox {
    pub(crate) fn new(
        pool: &OutPool,
        failed: &CancellationToken,
        input_owner: &Option<Arc<Vec<u8>>>,
    ) -> Outbox {
        let (tx, rx) = async_channel::unbounded::<SendItem>();
        let mut senders = JoinSet::new();
        for conn in &pool.conns {
            senders.spawn(sender_task(
                conn.clone(),
                rx.clone(),
                failed.clone(),
                input_owner.clone(),
            ));
        }
        Outbox { tx, senders }
    }

    pub(crate) fn enqueue(&self, header: [u8; DataHeader::LEN], payload: Payload) -> Result<()> {
        self.tx
            .try_send(SendItem {
                header,
                payload,
                on_sent: None,
            })
            .map_err(|_| Error::RankConnectionLost("send queue closed".into()))
    }

    /// Lets the senders drain the queue (or aborts them after a failure)
    /// and joins them; returns the bytes they wrote.
    pub(crate) async fn finish(mut self, failed: bool) -> Result<u64> {
        self.tx.close();
        if failed {
            self.senders.abort_all();
        }
        let mut sent = 0u64;
        match join_all(&mut self.senders, "sender", |n| sent += n).await {
            Some(e) => Err(e),
            None => Ok(sent),
        }
    }
}

/// Why an op stopped early: the master's abort, a lost connection of its
/// route, or a failed send.
pub(crate) async fn interrupted(
    abort: &CancellationToken,
    route: &crate::comm::p2p::OpRoute,
    send_failed: &CancellationToken,
) -> Error {
    tokio::select! {
        biased;
        _ = abort.cancelled() => Error::RankConnectionLost("aborted by the master".into()),
        _ = route.lost.cancelled() => Error::RankConnectionLost(
            route.lost_reason.lock().ok().and_then(|g| g.clone())
                .unwrap_or_else(|| "a connection of the op was lost".into())),
        _ = send_failed.cancelled() => Error::RankConnectionLost("sending to a peer failed".into()),
    }
}

/// Checks a frame's geometry: raw (or quantized), `elems` elements from
/// `start`, of the given payload length.
pub(crate) fn frame_matches(
    h: &DataHeader,
    start: usize,
    elems: usize,
    encoding: crate::wire::Encoding,
    payload_len: usize,
) -> bool {
    h.elem_offset == start as u64
        && h.elems as usize == elems
        && h.encoding == encoding
        && h.payload_len as usize == payload_len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipelined_chunks_cut_a_step_in_sixteen_between_the_floor_and_the_cap() {
        let cap = 512 << 10;
        let f32_elems = |bytes: usize| bytes / 4;
        // 16 MiB of f32 over 4 peers: 4 MiB per step, 16 chunks of 256 KiB.
        let span = f32_elems(16 << 20) / 4;
        assert_eq!(
            pipelined_chunk_elems(DataType::F32, None, cap, 16, span),
            f32_elems(256 << 10)
        );
        // 128 MiB over 4: the cap (512 KiB) wins.
        let span = f32_elems(128 << 20) / 4;
        assert_eq!(
            pipelined_chunk_elems(DataType::F32, None, cap, 16, span),
            f32_elems(cap)
        );
        // 1 MiB over 4: the floor (64 KiB) wins.
        let span = f32_elems(1 << 20) / 4;
        assert_eq!(
            pipelined_chunk_elems(DataType::F32, None, cap, 16, span),
            f32_elems(MIN_PIPELINE_CHUNK_BYTES)
        );
        // A cap below the floor is kept (a user's small chunk_bytes).
        assert_eq!(
            pipelined_chunk_elems(DataType::F32, None, 4096, 16, span),
            1024
        );
        // Quantized: whole quantization blocks, at least one.
        let q = Some((DataType::U8, QuantizationAlgorithm::MinMax));
        let e = pipelined_chunk_elems(DataType::F32, q, cap, 16, f32_elems(3 << 20) / 3 + 17);
        assert_eq!(e % quant::QUANT_BLOCK_ELEMS, 0);
        assert!(e >= quant::QUANT_BLOCK_ELEMS);
        assert_eq!(
            pipelined_chunk_elems(DataType::F32, q, 16, 16, 5),
            quant::QUANT_BLOCK_ELEMS
        );
        // An empty op still gets a valid chunk size.
        assert!(pipelined_chunk_elems(DataType::F64, None, cap, 16, 0) >= 1);
        assert!(pipelined_chunk_elems(DataType::F64, None, cap, 0, 0) >= 1);
        // One piece: the previous geometry, one chunk of up to the cap.
        let span = f32_elems(1 << 20) / 4;
        assert_eq!(
            pipelined_chunk_elems(DataType::F32, None, cap, 1, span),
            span
        );
        let span = f32_elems(16 << 20) / 4;
        assert_eq!(
            pipelined_chunk_elems(DataType::F32, None, cap, 1, span),
            f32_elems(cap)
        );
    }
}
