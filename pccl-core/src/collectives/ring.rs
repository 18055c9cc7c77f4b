//! Ring all-reduce: reduce-scatter then all-gather, pipelined in sub-chunks
//! that are processed as they arrive (in any order) and striped over the
//! connection pool to the right neighbour. Either half also runs alone
//! ([`RingPhase`]): the reduce-scatter and all-gather collectives.
//!
//! Rank `r` of `w` owns ring segment `(r+1) mod w` at the end of
//! reduce-scatter. In the all-gather every peer, the owner included, ends
//! with the owner's exact bytes (for quantized ops the owner adopts the
//! dequantized values of what it sends), so results are bit-identical
//! everywhere. The standalone halves rotate the buffer by one segment
//! (`seg_shift`), so rank `r`'s ring segment is buffer segment `r`.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{join_all, sender_task, InPlace, Payload, RawBuf, SendItem};
use crate::bufpool::BufPool;
use crate::comm::p2p::{Frame, OpRoute, OutPool};
use crate::error::{Error, Result};
use crate::types::{DataType, QuantizationAlgorithm, ReduceOp};
use crate::wire::{DataHeader, Encoding};
use crate::{kernels, quant};

/// Which steps of the ring an op runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RingPhase {
    /// Reduce-scatter then all-gather: all-reduce.
    Full,
    /// Only the reduce-scatter: each rank ends with its reduced segment,
    /// written at the start of its (segment-sized) result buffer.
    ReduceScatter,
    /// Only the all-gather: each rank's input becomes its segment of every
    /// rank's result.
    AllGather,
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
    pub phase: RingPhase,
}

impl RingParams {
    /// Ring segment `s` maps onto buffer segment `s - shift`: the halves
    /// run alone put rank `r`'s segment (ring segment `r+1`) at buffer
    /// segment `r`.
    fn seg_shift(&self) -> usize {
        match self.phase {
            RingPhase::Full => 0,
            RingPhase::ReduceScatter | RingPhase::AllGather => 1,
        }
    }

    fn seg_range(&self, s: usize) -> (usize, usize) {
        let b = (s + self.world - self.seg_shift()) % self.world;
        let w = self.world as u128;
        let n = self.count as u128;
        let a = (b as u128 * n / w) as usize;
        let e = ((b as u128 + 1) * n / w) as usize;
        (a, e)
    }

    /// The steps this op runs: `first_step()..end_step()`.
    fn first_step(&self) -> usize {
        match self.phase {
            RingPhase::Full | RingPhase::ReduceScatter => 0,
            RingPhase::AllGather => self.world - 1,
        }
    }

    fn end_step(&self) -> usize {
        match self.phase {
            RingPhase::Full | RingPhase::AllGather => self.steps(),
            RingPhase::ReduceScatter => self.world - 1,
        }
    }

    /// The ring segment this rank owns after reduce-scatter.
    fn owned_segment(&self) -> usize {
        (self.rank + 1) % self.world
    }

    /// First element of the owned segment: where a reduce-scatter result
    /// buffer starts in the whole buffer's coordinates.
    fn owned_base(&self) -> usize {
        self.seg_range(self.owned_segment()).0
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

/// Lets the p2p readers write all-gather values straight into the caller's
/// result buffer (raw payloads are read into it; quantized ones are decoded
/// into it on the reader's task), instead of the ring copying or decoding
/// them from a pool buffer on its own task.
///
/// Memory safety: all-gather frames are only ever landed in the ranges of
/// segments this peer does not own, which nothing else writes or reads
/// while the op runs (reduce-scatter keeps its partial sums in pool buffers
/// and reads only the input buffer), and each (step, chunk) slot is claimed
/// once. In place (the input is the result buffer), a chunk is only landed
/// once this peer has read its input there (`input_read`; for its own
/// segment, sent borrowed at step 0: once the sender handed it to the
/// connection). An honest ring cannot deliver a chunk's final value before
/// that; a frame that does is not landed but waits in the ring until the
/// range is writable, so it never races the read. Readers write only while holding `open`'s lock, one `recv` at a
/// time; [`Landing::close`] takes the lock, so once the op has closed its
/// landing no reader touches the caller's memory again.
pub(crate) struct Landing {
    p: RingParams,
    acc: RawBuf,
    /// One flag per (all-gather step, chunk): set when a frame claims it.
    claimed: Vec<Vec<std::sync::atomic::AtomicBool>>,
    open: std::sync::Mutex<bool>,
    /// Set when the buffer is also the input (see [`InPlace`]).
    in_place: Option<Arc<InPlace>>,
    /// In place: one flag per (ring segment, chunk), set once this peer has
    /// read its input there; empty otherwise.
    input_read: Vec<Vec<std::sync::atomic::AtomicBool>>,
    /// Signalled when a range becomes writable (frames may wait for it).
    became_writable: tokio::sync::Notify,
}

impl Landing {
    fn new(p: &RingParams, acc: RawBuf, in_place: Option<Arc<InPlace>>) -> Self {
        let w = p.world;
        let claimed = (w - 1..p.steps())
            .map(|step| {
                (0..p.chunks_in(p.recv_segment(step)))
                    .map(|_| std::sync::atomic::AtomicBool::new(false))
                    .collect()
            })
            .collect();
        let input_read = match in_place {
            Some(_) => (0..w)
                .map(|s| {
                    (0..p.chunks_in(s))
                        .map(|_| std::sync::atomic::AtomicBool::new(false))
                        .collect()
                })
                .collect(),
            None => Vec::new(),
        };
        Landing {
            p: p.clone(),
            acc,
            claimed,
            open: std::sync::Mutex::new(true),
            in_place,
            input_read,
            became_writable: tokio::sync::Notify::new(),
        }
    }

    /// In place: records that this peer has read its input at chunk `c` of
    /// ring segment `seg` (so that range may now be written).
    fn mark_input_read(&self, seg: usize, c: usize) {
        if let Some(flag) = self.input_read.get(seg).and_then(|v| v.get(c)) {
            flag.store(true, std::sync::atomic::Ordering::Release);
            self.became_writable.notify_one();
        }
    }

    /// Whether the range of (seg, c) may be written: always out of place;
    /// in place once this peer's input there was read.
    fn writable(&self, seg: usize, c: usize) -> bool {
        self.in_place.is_none()
            || self
                .input_read
                .get(seg)
                .and_then(|v| v.get(c))
                .is_some_and(|f| f.load(std::sync::atomic::Ordering::Acquire))
    }

    /// In place: saves what is about to be overwritten (see [`InPlace`]).
    fn before_write(&self, off: usize, len: usize) {
        if let Some(ip) = &self.in_place {
            ip.before_write(off, len);
        }
    }

    /// Claims the all-gather slot (step, chunk); false if it was claimed
    /// before (a duplicate frame).
    fn claim(&self, step: usize, c: usize) -> bool {
        let w = self.p.world;
        match step
            .checked_sub(w - 1)
            .and_then(|i| self.claimed.get(i))
            .and_then(|v| v.get(c))
        {
            Some(flag) => !flag.swap(true, std::sync::atomic::Ordering::AcqRel),
            None => false,
        }
    }

    /// The byte range of the result buffer a frame's values belong in, if
    /// it is a well-formed all-gather frame of this op whose slot was free
    /// (the slot is claimed). Anything else returns `None` and takes the
    /// normal path, where the ring validates it. Raw payloads are read
    /// straight into that range; quantized ones are read into a buffer and
    /// decoded into it with [`Landing::decode`].
    pub(crate) fn is_quantized(&self) -> bool {
        self.p.quant.is_some()
    }

    /// Decodes a quantized all-gather payload into `len` bytes of the result
    /// buffer at `off` (a range [`Landing::target`] returned). `None` if the
    /// op has closed its landing.
    pub(crate) fn decode(&self, off: usize, len: usize, payload: &[u8]) -> Option<Result<()>> {
        let (q, algo) = self.p.quant?;
        let dtype = self.p.dtype;
        self.with_dst(off, len, |dst| {
            quant::dequantize_into(dtype, q, algo, None, payload, dst)
        })
    }

    pub(crate) fn target(&self, h: &DataHeader) -> Option<(usize, usize)> {
        let p = &self.p;
        let step = h.step as usize;
        let encoding = if p.quant.is_some() {
            Encoding::Quantized
        } else {
            Encoding::Raw
        };
        if h.encoding != encoding || step < p.world - 1 || step >= p.end_step() {
            return None;
        }
        let seg = p.recv_segment(step);
        let c = h.chunk as usize;
        if h.segment as usize != seg || c >= p.chunks_in(seg) {
            return None;
        }
        let (start, n) = p.chunk(seg, c);
        let ds = p.dtype.size();
        if h.elem_offset != start as u64
            || h.elems as usize != n
            || h.payload_len as usize != p.payload_len(n)
        {
            return None;
        }
        if !self.writable(seg, c) || !self.claim(step, c) {
            return None;
        }
        if self.in_place.is_some() {
            // The first write to this range follows: save it while the op
            // still holds the buffer (checked under the lock `close` takes).
            let open = self.open.lock().ok()?;
            if !*open {
                return None;
            }
            self.before_write(start * ds, n * ds);
        }
        Some((start * ds, n * ds))
    }

    /// Runs `f` on `len` bytes of the result buffer at `off` unless the op
    /// has closed its landing; the lock is held while `f` runs.
    pub(crate) fn with_dst<R>(
        &self,
        off: usize,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Option<R> {
        let open = self.open.lock().ok()?;
        if !*open || off.checked_add(len).is_none_or(|end| end > self.acc.len) {
            return None;
        }
        // SAFETY: the op is still running (landing open, checked under the
        // lock that `close` takes), so the buffer is valid; the range was
        // claimed by exactly one frame and no one else accesses it (see the
        // type's doc).
        let dst = unsafe { self.acc.slice_mut(off, len) };
        Some(f(dst))
    }

    /// Stops all landing; returns once no reader is writing.
    fn close(&self) {
        if let Ok(mut open) = self.open.lock() {
            *open = false;
        }
    }
}

/// Runs the ring. `input` holds this peer's contribution and is only read;
/// `acc` (the caller's receive buffer) receives the result. They are
/// distinct, or the same buffer when `in_place` is set (an in-place
/// all-reduce: every input range is read before it is first written). `input_owner`, when the library owns the input memory (the copy
/// of an in-place call), is kept alive by every sender task, so the memory
/// outlives them even if this future is dropped half-way (a runtime shutting
/// down with the op in flight). Returns (tx bytes, rx bytes). Fails promptly
/// when the route's connection is lost or `abort` fires; every spawned task
/// is joined, and the landing closed, before returning.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_ring(
    p: &RingParams,
    input: RawBuf,
    input_owner: Option<Arc<Vec<u8>>>,
    acc: RawBuf,
    in_place: Option<Arc<InPlace>>,
    inbox: &mut mpsc::Receiver<Frame>,
    route: &OpRoute,
    abort: &CancellationToken,
    pool: Arc<OutPool>,
    bufs: &Arc<BufPool>,
) -> Result<(u64, u64)> {
    let landing = Arc::new(Landing::new(p, acc, in_place));
    route.set_landing(landing.clone());
    // Closes the landing however this future ends, dropped included.
    let landing_guard = CloseLanding(landing.clone());
    let (tx_q, rx_q) = async_channel::unbounded::<SendItem>();
    let send_failed = CancellationToken::new();
    let mut senders: JoinSet<Result<u64>> = JoinSet::new();
    for conn in &pool.conns {
        senders.spawn(sender_task(
            conn.clone(),
            rx_q.clone(),
            send_failed.clone(),
            input_owner.clone(),
        ));
    }
    drop(rx_q);
    let mut state = RingState {
        p: Arc::new(p.clone()),
        input,
        _input_owner: input_owner,
        acc,
        landing: landing.clone(),
        bufs: bufs.clone(),
        tx_q,
        rx_bytes: 0,
    };
    let result = state
        .drive(inbox, &route.lost, &route.lost_reason, abort, &send_failed)
        .await;
    drop(landing_guard);
    // Closing the queue lets senders drain what is left and stop.
    state.tx_q.close();
    let mut tx_bytes = 0u64;
    if result.is_err() {
        senders.abort_all();
    }
    let send_err = join_all(&mut senders, "sender", |n| tx_bytes += n).await;
    result?;
    if let Some(e) = send_err {
        return Err(e);
    }
    Ok((tx_bytes, state.rx_bytes))
}

/// Closes a [`Landing`] when dropped.
struct CloseLanding(Arc<Landing>);

impl Drop for CloseLanding {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// One op's ring schedule. Data flow per sub-chunk:
/// * step 0 sends this peer's own segment straight from `input`;
/// * a reduce-scatter hop reduces the received partial sum with `input`
///   inside the received buffer and forwards that buffer, so partial sums
///   never touch `acc`;
/// * the last reduce-scatter hop writes `op(partial, input)` into `acc`
///   (the owned segment), finalizes it and sends it from there (quantized:
///   sends its encoding, having adopted the decoded values);
/// * all-gather values land in `acc` (read or decoded there by the reader,
///   see [`Landing`], or here for frames that came before the landing was
///   set up) and are forwarded (raw: from `acc`; quantized: the encoded
///   bytes as received).
///
/// Quantized reduce-scatter hops (decode, reduce, re-encode: the costly
/// part of a quantized op) run as tasks of their own on clones of this
/// state, so sub-chunks are processed on both worker threads; they touch
/// disjoint ranges (pool buffers, or the owned segment's chunk) and are all
/// joined before the op ends.
#[derive(Clone)]
struct RingState {
    p: Arc<RingParams>,
    input: RawBuf,
    /// Keeps library-owned input memory alive in spawned hop tasks.
    _input_owner: Option<Arc<Vec<u8>>>,
    acc: RawBuf,
    landing: Arc<Landing>,
    bufs: Arc<BufPool>,
    tx_q: async_channel::Sender<SendItem>,
    rx_bytes: u64,
}

impl RingState {
    async fn drive(
        &mut self,
        inbox: &mut mpsc::Receiver<Frame>,
        lost: &CancellationToken,
        lost_reason: &Arc<std::sync::Mutex<Option<String>>>,
        abort: &CancellationToken,
        send_failed: &CancellationToken,
    ) -> Result<()> {
        let mut hops: JoinSet<Result<()>> = JoinSet::new();
        let result = self
            .drive_frames(inbox, lost, lost_reason, abort, send_failed, &mut hops)
            .await;
        if result.is_err() {
            hops.abort_all();
        }
        // Every hop task is joined: they use the caller's buffers.
        let hop_err = join_all(&mut hops, "ring hop", |()| {}).await;
        result?;
        match hop_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn drive_frames(
        &mut self,
        inbox: &mut mpsc::Receiver<Frame>,
        lost: &CancellationToken,
        lost_reason: &Arc<std::sync::Mutex<Option<String>>>,
        abort: &CancellationToken,
        send_failed: &CancellationToken,
        hops: &mut JoinSet<Result<()>>,
    ) -> Result<()> {
        let p = self.p.clone();
        let steps = p.steps();
        let mut seen: Vec<Vec<bool>> = (0..steps)
            .map(|s| vec![false; p.chunks_in(p.recv_segment(s))])
            .collect();
        let mut remaining: usize = (p.first_step()..p.end_step()).map(|s| seen[s].len()).sum();

        if p.phase == RingPhase::AllGather {
            // This peer's contribution is its owned segment from the start.
            let own = p.owned_segment();
            for c in 0..p.chunks_in(own) {
                self.start_owned(own, c)?;
            }
        }
        // Step 0: this peer's own segment (encoded in hop tasks when
        // quantized, so the first frames do not wait for all of it).
        let first_sends = if p.phase == RingPhase::AllGather {
            0
        } else {
            p.chunks_in(p.rank)
        };
        for c in 0..first_sends {
            if p.quant.is_some() {
                let hop = self.clone();
                hops.spawn(async move { hop.send_input(hop.p.rank, c) });
            } else {
                self.send_input(p.rank, c)?;
            }
        }
        // In place: all-gather frames whose range is not writable yet (this
        // peer's own send of it is still with the sender), held until it is.
        let mut deferred: Vec<(usize, usize, usize, Frame)> = Vec::new();
        while remaining > 0 || !deferred.is_empty() {
            let frame = tokio::select! {
                biased;
                _ = abort.cancelled() => return Err(Error::RankConnectionLost("aborted by the master".into())),
                _ = lost.cancelled() => return Err(Error::RankConnectionLost(lost_reason.lock().ok().and_then(|g| g.clone()).unwrap_or_else(|| "ring connection lost".into()))),
                _ = send_failed.cancelled() => return Err(Error::RankConnectionLost("sending to the right neighbour failed".into())),
                Some(joined) = hops.join_next(), if !hops.is_empty() => {
                    match joined {
                        Ok(Ok(())) => continue,
                        Ok(Err(e)) => return Err(e),
                        Err(e) => return Err(Error::Internal(format!("ring hop task failed: {e}"))),
                    }
                }
                _ = self.landing.became_writable.notified(), if !deferred.is_empty() => {
                    let mut still = Vec::new();
                    for (step, seg, c, frame) in deferred.drain(..) {
                        if self.landing.writable(seg, c) {
                            self.process(step, seg, c, frame)?;
                        } else {
                            still.push((step, seg, c, frame));
                        }
                    }
                    deferred = still;
                    continue;
                }
                f = inbox.recv(), if remaining > 0 => f.ok_or_else(|| Error::Internal("inbox closed".into()))?,
            };
            self.rx_bytes += (DataHeader::LEN + frame.header.payload_len as usize) as u64;
            let (step, seg, c) = self.validate(&frame.header, &seen)?;
            seen[step][c] = true;
            remaining -= 1;
            if step >= p.world - 1 && !frame.landed && !self.landing.writable(seg, c) {
                deferred.push((step, seg, c, frame));
                continue;
            }
            if p.quant.is_some() && step < p.world - 1 {
                let hop = self.clone();
                hops.spawn(async move { hop.process(step, seg, c, frame) });
            } else {
                self.process(step, seg, c, frame)?;
            }
        }
        Ok(())
    }

    /// Checks a frame against the schedule; returns (step, segment, chunk).
    fn validate(&self, h: &DataHeader, seen: &[Vec<bool>]) -> Result<(usize, usize, usize)> {
        let p = &*self.p;
        let bad = |what: &str| {
            Error::RankConnectionLost(format!("left neighbour sent a malformed frame: {what}"))
        };
        let step = h.step as usize;
        if step < p.first_step() || step >= p.end_step() {
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
        if h.elem_offset != start as u64
            || h.elems as usize != n
            || h.encoding != self.encoding()
            || h.payload_len as usize != p.payload_len(n)
        {
            return Err(bad("chunk geometry or encoding does not match"));
        }
        Ok((step, seg, c))
    }

    fn encoding(&self) -> Encoding {
        if self.p.quant.is_some() {
            Encoding::Quantized
        } else {
            Encoding::Raw
        }
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
            encoding: self.encoding(),
            segment: seg as u32,
            chunk: c as u32,
            elem_offset: start as u64,
            elems: n as u32,
            payload_len: payload_len as u32,
        }
        .encode()
    }

    fn enqueue(&self, header: [u8; DataHeader::LEN], payload: Payload) -> Result<()> {
        self.enqueue_then(header, payload, None)
    }

    fn enqueue_then(
        &self,
        header: [u8; DataHeader::LEN],
        payload: Payload,
        on_sent: Option<Box<dyn FnOnce() + Send>>,
    ) -> Result<()> {
        self.tx_q
            .try_send(SendItem {
                header,
                payload,
                on_sent,
            })
            .map_err(|_| Error::RankConnectionLost("send queue closed".into()))
    }

    fn byte_range(&self, seg: usize, c: usize) -> (usize, usize) {
        let (start, n) = self.p.chunk(seg, c);
        let ds = self.p.dtype.size();
        (start * ds, n * ds)
    }

    /// Queues chunk `c` of `seg` at `step` as it stands in `buf` (raw, or
    /// quantized into a pool buffer).
    fn send_from(&self, buf: RawBuf, step: usize, seg: usize, c: usize) -> Result<()> {
        let (off, len) = self.byte_range(seg, c);
        match self.p.quant {
            None => self.enqueue(
                self.header(step, seg, c, len),
                Payload::Borrowed { buf, off, len },
            ),
            Some((q, algo)) => {
                let (_, n) = self.p.chunk(seg, c);
                let mut out = self.bufs.get(quant::encoded_len(self.p.dtype, q, algo, n));
                // SAFETY: `buf` is the read-only input, or `acc` in a range
                // that was finalized just before and is not written again;
                // in place, an input range is not written before it is
                // marked read, which happens after this encoding.
                let src = unsafe { buf.slice(off, len) };
                quant::quantize(self.p.dtype, q, algo, src, &mut out)?;
                let plen = out.len();
                self.enqueue(self.header(step, seg, c, plen), Payload::Owned(out))
            }
        }
    }

    /// All-gather alone: copies chunk `c` of this peer's input into its
    /// owned segment of the result and sends it from there.
    fn start_owned(&self, seg: usize, c: usize) -> Result<()> {
        let (off, len) = self.byte_range(seg, c);
        let base = self.p.owned_base() * self.p.dtype.size();
        let src = self.input_slice(off - base, len);
        // SAFETY: the owned segment is never a landing target; nothing else
        // touches it until it is queued below, and it is not written again.
        let dst = unsafe { self.acc.slice_mut(off, len) };
        dst.copy_from_slice(src);
        self.send_from(self.acc, self.p.world - 1, seg, c)
    }

    fn send_input(&self, seg: usize, c: usize) -> Result<()> {
        if self.landing.in_place.is_some() && self.p.quant.is_none() {
            // In place this range is written later (its final value lands
            // here): it is sent borrowed, and becomes writable only once the
            // sender has handed it to the connection. An honest ring cannot
            // deliver the final value before that; a frame that does anyway
            // waits (see `drive_frames`).
            let (off, len) = self.byte_range(seg, c);
            let landing = self.landing.clone();
            return self.enqueue_then(
                self.header(0, seg, c, len),
                Payload::Borrowed {
                    buf: self.input,
                    off,
                    len,
                },
                Some(Box::new(move || landing.mark_input_read(seg, c))),
            );
        }
        // Quantized, the encoding is made (the input read) before queuing.
        self.send_from(self.input, 0, seg, c)?;
        self.landing.mark_input_read(seg, c);
        Ok(())
    }

    fn input_slice(&self, off: usize, len: usize) -> &[u8] {
        // SAFETY: the input buffer is only read while the op runs.
        unsafe { self.input.slice(off, len) }
    }

    fn process(&self, step: usize, seg: usize, c: usize, frame: Frame) -> Result<()> {
        let p = &*self.p;
        let w = p.world;
        let (off, len) = self.byte_range(seg, c);
        if step < w - 1 {
            let mut payload = frame.payload;
            if step < w - 2 {
                // A partial sum passing through: add ours in its buffer.
                let mine = self.input_slice(off, len);
                match p.quant {
                    None => {
                        kernels::reduce_into(p.dtype, p.op, &mut payload, mine);
                        self.landing.mark_input_read(seg, c);
                        let plen = payload.len();
                        return self
                            .enqueue(self.header(step + 1, seg, c, plen), Payload::Owned(payload));
                    }
                    Some((q, algo)) => {
                        let mut sum = self.bufs.get(len);
                        quant::dequantize_reduce_from(
                            p.dtype, q, algo, p.op, mine, &payload, &mut sum,
                        )?;
                        self.landing.mark_input_read(seg, c);
                        drop(payload);
                        let (_, n) = p.chunk(seg, c);
                        let mut out = self.bufs.get(quant::encoded_len(p.dtype, q, algo, n));
                        quant::quantize(p.dtype, q, algo, &sum, &mut out)?;
                        let plen = out.len();
                        return self
                            .enqueue(self.header(step + 1, seg, c, plen), Payload::Owned(out));
                    }
                }
            }
            // The last hop: this peer owns `seg`. It is written into `acc`
            // once, finalized, and sent from there.
            // A reduce-scatter result buffer holds only the owned segment.
            let acc_off = match p.phase {
                RingPhase::ReduceScatter => off - p.owned_base() * p.dtype.size(),
                _ => off,
            };
            let in_place = self.landing.in_place.is_some();
            // In place and quantized the input is this very range: decode
            // against a copy of it. (Raw, it is reduced into in place.)
            let mine_copy = (in_place && p.quant.is_some()).then(|| {
                let mut copy = self.bufs.get(len);
                copy.copy_from_slice(self.input_slice(off, len));
                copy
            });
            self.landing.mark_input_read(seg, c);
            self.landing.before_write(acc_off, len);
            // SAFETY: the owned segment is never a landing target and this
            // task is the only one touching it until it is queued below; in
            // place nothing else borrows the range (`mine` is a copy, or
            // not taken).
            let dst = unsafe { self.acc.slice_mut(acc_off, len) };
            match (p.quant, &mine_copy) {
                // In place: dst = op(input, partial). The ops are
                // commutative, so this equals the out-of-place result
                // (only which NaN payload wins may differ); every peer
                // takes the owner's bytes either way.
                (None, _) if in_place => kernels::reduce_into(p.dtype, p.op, dst, &payload),
                (None, _) => {
                    // SAFETY: out of place the input is another buffer, only read.
                    let mine = unsafe { self.input.slice(off, len) };
                    kernels::reduce_from(p.dtype, p.op, dst, &payload, mine)
                }
                (Some((q, algo)), Some(mine)) => {
                    quant::dequantize_reduce_from(p.dtype, q, algo, p.op, mine, &payload, dst)?
                }
                (Some((q, algo)), None) => {
                    // SAFETY: out of place the input is another buffer, only read.
                    let mine = unsafe { self.input.slice(off, len) };
                    quant::dequantize_reduce_from(p.dtype, q, algo, p.op, mine, &payload, dst)?
                }
            }
            drop(mine_copy);
            drop(payload);
            if p.op == ReduceOp::Avg {
                kernels::finalize_avg(p.dtype, dst, w as u32);
            }
            if p.phase == RingPhase::ReduceScatter {
                return Ok(());
            }
            match p.quant {
                None => self.send_from(self.acc, w - 1, seg, c),
                Some((q, algo)) => {
                    let (_, n) = p.chunk(seg, c);
                    let mut enc = self.bufs.get(quant::encoded_len(p.dtype, q, algo, n));
                    // The owner keeps exactly what the others will decode.
                    quant::quantize_adopt(p.dtype, q, algo, dst, &mut enc)?;
                    let plen = enc.len();
                    self.enqueue(self.header(w - 1, seg, c, plen), Payload::Owned(enc))
                }
            }
        } else {
            let last = step == p.steps() - 1;
            if frame.landed {
                // The reader already wrote (or decoded) it into `acc`.
                return match (last, p.quant) {
                    (true, _) => Ok(()),
                    (false, None) => self.send_from(self.acc, step + 1, seg, c),
                    // Forward the encoded bytes as they came.
                    (false, Some(_)) => {
                        let plen = frame.payload.len();
                        self.enqueue(
                            self.header(step + 1, seg, c, plen),
                            Payload::Owned(frame.payload),
                        )
                    }
                };
            }
            // A frame the reader did not land (it came before the landing
            // was set up): its slot must still be free.
            if !self.landing.writable(seg, c) {
                // `drive_frames` defers such frames until the range is writable.
                return Err(Error::Internal(
                    "an all-gather frame was processed before its range was writable".into(),
                ));
            }
            if !self.landing.claim(step, c) {
                return Err(Error::RankConnectionLost(
                    "left neighbour sent a malformed frame: duplicate chunk".into(),
                ));
            }
            self.landing.before_write(off, len);
            // SAFETY: an all-gather range of a segment this peer does not
            // own; nothing else accesses it (see `Landing`).
            let dst = unsafe { self.acc.slice_mut(off, len) };
            let payload = frame.payload;
            match p.quant {
                None => dst.copy_from_slice(&payload),
                Some((q, algo)) => quant::dequantize_into(p.dtype, q, algo, None, &payload, dst)?,
            }
            if last {
                Ok(())
            } else {
                let plen = payload.len();
                self.enqueue(self.header(step + 1, seg, c, plen), Payload::Owned(payload))
            }
        }
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
            phase: RingPhase::Full,
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
