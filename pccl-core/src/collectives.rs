//! Ring all-reduce: reduce-scatter then all-gather, pipelined in sub-chunks
//! that are processed as they arrive (in any order) and striped over the
//! connection pool to the right neighbour.
//!
//! Rank `r` of `w` owns segment `(r+1) mod w` at the end of reduce-scatter.
//! In the all-gather every peer, the owner included, ends with the owner's
//! exact bytes (for quantized ops the owner adopts the dequantized values of
//! what it sends), so results are bit-identical everywhere.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bufpool::{BufPool, PooledBuf};
use crate::comm::p2p::{Frame, OutConn, OutPool};
use crate::error::{Error, Result};
use crate::types::{DataType, QuantizationAlgorithm, ReduceOp};
use crate::wire::{DataHeader, Encoding};
use crate::{kernels, quant};

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

    /// # Safety
    /// The range must not be written concurrently while the slice lives.
    unsafe fn slice(&self, off: usize, len: usize) -> &[u8] {
        debug_assert!(off + len <= self.len);
        std::slice::from_raw_parts(self.ptr.add(off), len)
    }

    /// # Safety
    /// The range must not be accessed by anyone else while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut(&self, off: usize, len: usize) -> &mut [u8] {
        debug_assert!(off + len <= self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(off), len)
    }
}

/// Everything that defines one ring pass.
#[derive(Debug, Clone)]
pub(crate) struct RingParams {
    pub op_id: u64,
    pub rank: usize,
    pub world: usize,
    pub count: usize,
    pub dtype: DataType,
    pub op: ReduceOp,
    pub quant: Option<(DataType, QuantizationAlgorithm)>,
    pub chunk_elems: usize,
}

impl RingParams {
    fn seg_range(&self, s: usize) -> (usize, usize) {
        let w = self.world as u128;
        let n = self.count as u128;
        let a = (s as u128 * n / w) as usize;
        let b = ((s as u128 + 1) * n / w) as usize;
        (a, b)
    }

    fn chunks_in(&self, s: usize) -> usize {
        let (a, b) = self.seg_range(s);
        (b - a).div_ceil(self.chunk_elems)
    }

    /// First element and element count of chunk `c` of segment `s`.
    fn chunk(&self, s: usize, c: usize) -> (usize, usize) {
        let (a, b) = self.seg_range(s);
        let start = a + c * self.chunk_elems;
        (start, self.chunk_elems.min(b - start))
    }

    fn payload_len(&self, elems: usize) -> usize {
        match self.quant {
            None => elems * self.dtype.size(),
            Some((q, algo)) => quant::encoded_len(self.dtype, q, algo, elems),
        }
    }

    /// Segment received at `step`.
    fn recv_segment(&self, step: usize) -> usize {
        let (w, r) = (self.world, self.rank);
        if step < w - 1 {
            (r + w - step - 1) % w
        } else {
            (r + w - (step - (w - 1))) % w
        }
    }

    fn steps(&self) -> usize {
        2 * (self.world - 1)
    }
}

enum Payload {
    /// Bytes of the caller's buffer.
    Acc {
        off: usize,
        len: usize,
    },
    Owned(PooledBuf),
}

struct SendItem {
    header: [u8; DataHeader::LEN],
    payload: Payload,
}

/// Runs the ring on `acc` (the receive buffer, already holding this peer's
/// input). Returns (tx bytes, rx bytes). Fails promptly when `lost` or
/// `abort` fire; every spawned task is joined before returning.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_ring(
    p: &RingParams,
    acc: RawBuf,
    inbox: &mut mpsc::Receiver<Frame>,
    lost: &CancellationToken,
    lost_reason: &Arc<std::sync::Mutex<Option<String>>>,
    abort: &CancellationToken,
    pool: Arc<OutPool>,
    bufs: &Arc<BufPool>,
) -> Result<(u64, u64)> {
    let (tx_q, rx_q) = async_channel::unbounded::<SendItem>();
    let send_failed = CancellationToken::new();
    let mut senders: JoinSet<Result<u64>> = JoinSet::new();
    for conn in &pool.conns {
        senders.spawn(sender_task(
            conn.clone(),
            rx_q.clone(),
            acc,
            send_failed.clone(),
        ));
    }
    drop(rx_q);
    let mut state = RingState {
        p,
        acc,
        bufs,
        tx_q,
        rx_bytes: 0,
    };
    let result = state
        .drive(inbox, lost, lost_reason, abort, &send_failed)
        .await;
    // Closing the queue lets senders drain what is left and stop.
    state.tx_q.close();
    let mut tx_bytes = 0u64;
    let mut send_err = None;
    if result.is_err() {
        senders.abort_all();
    }
    while let Some(joined) = senders.join_next().await {
        match joined {
            Ok(Ok(n)) => tx_bytes += n,
            Ok(Err(e)) => {
                send_err.get_or_insert(e);
            }
            Err(e) if e.is_cancelled() => {}
            Err(e) => {
                send_err.get_or_insert(Error::Internal(format!("sender task failed: {e}")));
            }
        }
    }
    result?;
    if let Some(e) = send_err {
        return Err(e);
    }
    Ok((tx_bytes, state.rx_bytes))
}

async fn sender_task(
    conn: Arc<OutConn>,
    queue: async_channel::Receiver<SendItem>,
    acc: RawBuf,
    failed: CancellationToken,
) -> Result<u64> {
    let mut sent = 0u64;
    while let Ok(item) = queue.recv().await {
        let payload: &[u8] = match &item.payload {
            // SAFETY: the range was finalized before it was queued and the
            // ring never writes it again while the op runs (see module doc);
            // the op joins this task before the buffer is released.
            Payload::Acc { off, len } => unsafe { acc.slice(*off, *len) },
            Payload::Owned(b) => b,
        };
        if let Err(e) = conn.write_frame(&item.header, payload).await {
            failed.cancel();
            return Err(Error::RankConnectionLost(format!(
                "sending to the right neighbour failed: {e}"
            )));
        }
        sent += (DataHeader::LEN + payload.len()) as u64;
    }
    Ok(sent)
}

struct RingState<'a> {
    p: &'a RingParams,
    acc: RawBuf,
    bufs: &'a Arc<BufPool>,
    tx_q: async_channel::Sender<SendItem>,
    rx_bytes: u64,
}

impl RingState<'_> {
    async fn drive(
        &mut self,
        inbox: &mut mpsc::Receiver<Frame>,
        lost: &CancellationToken,
        lost_reason: &Arc<std::sync::Mutex<Option<String>>>,
        abort: &CancellationToken,
        send_failed: &CancellationToken,
    ) -> Result<()> {
        let p = self.p;
        let steps = p.steps();
        let mut seen: Vec<Vec<bool>> = (0..steps)
            .map(|s| vec![false; p.chunks_in(p.recv_segment(s))])
            .collect();
        let mut remaining: usize = seen.iter().map(Vec::len).sum();

        // Step 0: this peer's own segment.
        for c in 0..p.chunks_in(p.rank) {
            self.send_from_acc(0, p.rank, c)?;
        }
        while remaining > 0 {
            let frame = tokio::select! {
                biased;
                _ = abort.cancelled() => return Err(Error::RankConnectionLost("aborted by the master".into())),
                _ = lost.cancelled() => return Err(Error::RankConnectionLost(lost_reason.lock().ok().and_then(|g| g.clone()).unwrap_or_else(|| "ring connection lost".into()))),
                _ = send_failed.cancelled() => return Err(Error::RankConnectionLost("sending to the right neighbour failed".into())),
                f = inbox.recv() => f.ok_or_else(|| Error::Internal("inbox closed".into()))?,
            };
            self.rx_bytes += (DataHeader::LEN + frame.payload.len()) as u64;
            let (step, seg, c) = self.validate(&frame.header, &seen)?;
            seen[step][c] = true;
            remaining -= 1;
            self.process(step, seg, c, frame.payload)?;
        }
        Ok(())
    }

    /// Checks a frame against the schedule; returns (step, segment, chunk).
    fn validate(&self, h: &DataHeader, seen: &[Vec<bool>]) -> Result<(usize, usize, usize)> {
        let p = self.p;
        let bad = |what: &str| {
            Error::RankConnectionLost(format!("left neighbour sent a malformed frame: {what}"))
        };
        let step = h.step as usize;
        if step >= p.steps() {
            return Err(bad("step out of range"));
        }
        let seg = p.recv_segment(step);
        if h.segment as usize != seg {
            return Err(bad("unexpected segment"));
        }
        let c = h.chunk as usize;
        if c >= seen[step].len() {
            return Err(bad("chunk out of range"));
        }
        if seen[step][c] {
            return Err(bad("duplicate chunk"));
        }
        let (start, n) = p.chunk(seg, c);
        let enc = if p.quant.is_some() {
            Encoding::Quantized
        } else {
            Encoding::Raw
        };
        if h.elem_offset != start as u64
            || h.elems as usize != n
            || h.encoding != enc
            || h.payload_len as usize != p.payload_len(n)
        {
            return Err(bad("chunk geometry or encoding does not match"));
        }
        Ok((step, seg, c))
    }

    fn header(
        &self,
        step: usize,
        seg: usize,
        c: usize,
        payload_len: usize,
    ) -> [u8; DataHeader::LEN] {
        let (start, n) = self.p.chunk(seg, c);
        DataHeader {
            op_id: self.p.op_id,
            step: step as u16,
            encoding: if self.p.quant.is_some() {
                Encoding::Quantized
            } else {
                Encoding::Raw
            },
            segment: seg as u32,
            chunk: c as u32,
            elem_offset: start as u64,
            elems: n as u32,
            payload_len: payload_len as u32,
        }
        .encode()
    }

    fn enqueue(&self, header: [u8; DataHeader::LEN], payload: Payload) -> Result<()> {
        self.tx_q
            .try_send(SendItem { header, payload })
            .map_err(|_| Error::RankConnectionLost("send queue closed".into()))
    }

    fn byte_range(&self, seg: usize, c: usize) -> (usize, usize) {
        let (start, n) = self.p.chunk(seg, c);
        let ds = self.p.dtype.size();
        (start * ds, n * ds)
    }

    /// Queues chunk `c` of `seg` as it stands in the accumulator.
    fn send_from_acc(&self, step: usize, seg: usize, c: usize) -> Result<()> {
        let (off, len) = self.byte_range(seg, c);
        match self.p.quant {
            None => self.enqueue(self.header(step, seg, c, len), Payload::Acc { off, len }),
            Some((q, algo)) => {
                let (_, n) = self.p.chunk(seg, c);
                let mut out = self.bufs.get(quant::encoded_len(self.p.dtype, q, algo, n));
                // SAFETY: the chunk is not being written: it was finalized by
                // this task just before and nothing else writes it now.
                let src = unsafe { self.acc.slice(off, len) };
                quant::quantize(self.p.dtype, q, algo, src, &mut out)?;
                let plen = out.len();
                self.enqueue(self.header(step, seg, c, plen), Payload::Owned(out))
            }
        }
    }

    fn process(&self, step: usize, seg: usize, c: usize, payload: PooledBuf) -> Result<()> {
        let p = self.p;
        let w = p.world;
        let (off, len) = self.byte_range(seg, c);
        // SAFETY: each (segment, chunk) is received at most once per phase
        // (checked by `validate`), and the schedule guarantees the range is
        // neither being sent nor written elsewhere at this point.
        let dst = unsafe { self.acc.slice_mut(off, len) };
        if step < w - 1 {
            match p.quant {
                None => kernels::reduce_into(p.dtype, p.op, dst, &payload),
                Some((q, algo)) => {
                    quant::dequantize_into(p.dtype, q, algo, Some(p.op), &payload, dst)?
                }
            }
            drop(payload);
            if step < w - 2 {
                return self.send_from_acc(step + 1, seg, c);
            }
            // This peer owns `seg` now: finalize and start the all-gather.
            if p.op == ReduceOp::Avg {
                kernels::finalize_avg(p.dtype, dst, w as u32);
            }
            match p.quant {
                None => self.send_from_acc(w - 1, seg, c),
                Some((q, algo)) => {
                    let (_, n) = p.chunk(seg, c);
                    let mut enc = self.bufs.get(quant::encoded_len(p.dtype, q, algo, n));
                    quant::quantize(p.dtype, q, algo, dst, &mut enc)?;
                    // The owner keeps exactly what the others will decode.
                    quant::dequantize_into(p.dtype, q, algo, None, &enc, dst)?;
                    let plen = enc.len();
                    self.enqueue(self.header(w - 1, seg, c, plen), Payload::Owned(enc))
                }
            }
        } else {
            match p.quant {
                None => dst.copy_from_slice(&payload),
                Some((q, algo)) => quant::dequantize_into(p.dtype, q, algo, None, &payload, dst)?,
            }
            if step < p.steps() - 1 {
                let plen = payload.len();
                self.enqueue(self.header(step + 1, seg, c, plen), Payload::Owned(payload))
            } else {
                Ok(())
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn params(world: usize, rank: usize, count: usize, chunk: usize) -> RingParams {
        RingParams {
            op_id: 1,
            rank,
            world,
            count,
            dtype: DataType::F32,
            op: ReduceOp::Sum,
            quant: None,
            chunk_elems: chunk,
        }
    }

    #[test]
    fn segments_cover_every_element_once() {
        for world in 2..7 {
            for count in [1usize, 2, 3, 5, 7, 100, 1001] {
                let p = params(world, 0, count, 3);
                let mut covered = vec![0u8; count];
                for s in 0..world {
                    for c in 0..p.chunks_in(s) {
                        let (a, n) = p.chunk(s, c);
                        assert!(n > 0);
                        for x in &mut covered[a..a + n] {
                            *x += 1;
                        }
                    }
                }
                assert!(
                    covered.iter().all(|&x| x == 1),
                    "world {world} count {count}"
                );
            }
        }
    }

    #[test]
    fn schedule_receives_every_foreign_segment_once_per_phase() {
        for world in 2..7 {
            for rank in 0..world {
                let p = params(world, rank, 100, 7);
                let rs: Vec<usize> = (0..world - 1).map(|s| p.recv_segment(s)).collect();
                let ag: Vec<usize> = (world - 1..p.steps()).map(|s| p.recv_segment(s)).collect();
                // Reduce-scatter receives every segment but its own.
                let mut a = rs.clone();
                a.sort();
                let expect: Vec<usize> = (0..world).filter(|s| *s != rank).collect();
                assert_eq!(a, expect);
                // The last reduce-scatter segment is the owned one, (rank+1) % w.
                assert_eq!(*rs.last().unwrap(), (rank + 1) % world);
                // All-gather receives every segment but the owned one.
                let mut b = ag.clone();
                b.sort();
                let expect: Vec<usize> = (0..world).filter(|s| *s != (rank + 1) % world).collect();
                assert_eq!(b, expect);
                // What rank r sends at step k is what rank r+1 receives at step k.
                let right = params(world, (rank + 1) % world, 100, 7);
                for k in 0..p.steps() {
                    let sent = if k == 0 { rank } else { p.recv_segment(k - 1) };
                    assert_eq!(sent, right.recv_segment(k), "w {world} r {rank} step {k}");
                }
            }
        }
    }
}
