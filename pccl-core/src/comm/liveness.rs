//! Peer-side liveness (issue #19: a busy peer is not a dead peer).
//!
//! - **The control writer is a dedicated OS thread** (`pccl-ctl-writer`),
//!   not a task on the communicator's runtime. It is the only writer of the
//!   control socket: it writes whole frames with blocking sends, in the order
//!   they were queued, so frames never interleave. It also emits the
//!   heartbeats itself, on its own timer: a runtime worker stuck in a long
//!   synchronous section, a starved runtime or a Python thread holding the
//!   GIL cannot delay them (the thread never touches the runtime or Python).
//! - **Data-plane progress**: the p2p reader counts the bytes each ring peer
//!   delivered ([`RxProgress`]); a heartbeat due while some arrived goes out
//!   as `DataProgress` (a heartbeat that also lists them), so the master
//!   also counts a neighbour's bytes as a sign of life of the sender.
//! - **No long synchronous sections on runtime workers**: large copies are
//!   done in slices with a yield in between ([`copy_yielding`]).
//!
//! See `docs/reliability.md` for the design and the measurements.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::net::SendHalf;
use crate::wire::{PeerId, PeerMsg};

use super::control::Control;

/// What the control writer thread is asked to do.
pub(crate) enum Out {
    Frame(Vec<u8>),
    /// Answered once everything queued before it has been written.
    Flush(oneshot::Sender<()>),
}

/// How often the writer thread looks at the shutdown token while idle.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// Bytes received per ring peer since the last report.
#[derive(Debug, Default)]
pub(crate) struct RxProgress {
    bytes: Mutex<HashMap<PeerId, u64>>,
}

impl RxProgress {
    /// `n` bytes arrived from `from` on a data connection.
    pub fn note(&self, from: PeerId, n: u64) {
        if let Ok(mut b) = self.bytes.lock() {
            *b.entry(from).or_insert(0) += n;
        }
    }

    /// The counts since the previous call (peers with bytes only), reset.
    pub fn take(&self) -> Vec<(PeerId, u64)> {
        let Ok(mut b) = self.bytes.lock() else {
            return Vec::new();
        };
        let mut v: Vec<(PeerId, u64)> = b.drain().filter(|(_, n)| *n > 0).collect();
        v.sort_unstable();
        v
    }
}

/// The heartbeat message due now: a plain heartbeat, or one that reports
/// data-plane progress.
pub(crate) fn heartbeat_msg(progress: &RxProgress) -> PeerMsg {
    let from = progress.take();
    if from.is_empty() {
        PeerMsg::Heartbeat
    } else {
        PeerMsg::DataProgress { from }
    }
}

/// Starts the control writer thread. `heartbeat_ms` is 0 until the master
/// told us the interval (then heartbeats start).
pub(crate) fn spawn_writer<W: SendHalf>(
    wr: W,
    rx: Receiver<Out>,
    ctl: Arc<Control>,
    heartbeat_ms: Arc<AtomicU64>,
    progress: Arc<RxProgress>,
    stop: CancellationToken,
) {
    let ctl2 = ctl.clone();
    let spawned = std::thread::Builder::new()
        .name("pccl-ctl-writer".into())
        .spawn(move || {
            let mut w = Writer {
                wr,
                stop,
                heartbeat_ms,
                progress,
            };
            if let Err(e) = w.run(&rx) {
                ctl.mark_dead(format!("write to master failed: {e}"));
            }
        });
    if let Err(e) = spawned {
        ctl2.mark_dead(format!("cannot start the control writer thread: {e}"));
    }
}

struct Writer<W> {
    /// Owned so the connection lives as long as the thread; dropping it
    /// shuts the write side down.
    wr: W,
    stop: CancellationToken,
    heartbeat_ms: Arc<AtomicU64>,
    progress: Arc<RxProgress>,
}

impl<W: SendHalf> Writer<W> {
    fn run(&mut self, rx: &Receiver<Out>) -> io::Result<()> {
        let mut next_beat: Option<Instant> = None;
        loop {
            if self.stop.is_cancelled() {
                return Ok(());
            }
            let hb = self.heartbeat_ms.load(Ordering::Relaxed);
            let now = Instant::now();
            if hb > 0 {
                let due = *next_beat.get_or_insert(now);
                if now >= due {
                    self.write_all(&heartbeat_msg(&self.progress).to_frame())?;
                    next_beat = Some(now + Duration::from_millis(hb));
                }
            }
            let wait = next_beat
                .map(|d| d.saturating_duration_since(Instant::now()))
                .unwrap_or(IDLE_POLL)
                .min(IDLE_POLL);
            match rx.recv_timeout(wait) {
                Ok(Out::Frame(f)) => self.write_all(&f)?,
                Ok(Out::Flush(done)) => {
                    let _ = done.send(());
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
    }

    /// Writes a whole frame with blocking sends, checking the shutdown
    /// token while the connection cannot take more.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let stop = self.stop.clone();
        match self
            .wr
            .send_blocking(buf, IDLE_POLL, &|| stop.is_cancelled())?
        {
            true => Ok(()),
            false => Err(io::Error::other("communicator closed mid-frame")),
        }
    }
}

/// Copies slices of this size between yields.
pub(crate) const COPY_SLICE: usize = 256 << 10;

/// `dst.copy_from_slice(src)` in slices of [`COPY_SLICE`] bytes with a yield
/// to the runtime after each, so a large copy (the in-place backup of a
/// whole buffer) never holds a runtime worker for more than a slice.
pub(crate) async fn copy_yielding(dst: &mut [u8], src: &[u8]) {
    debug_assert_eq!(dst.len(), src.len());
    let mut slices = dst.chunks_mut(COPY_SLICE).zip(src.chunks(COPY_SLICE));
    if let Some((d, s)) = slices.next() {
        d.copy_from_slice(s);
    }
    for (d, s) in slices {
        tokio::task::yield_now().await;
        d.copy_from_slice(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_reported_once_and_only_when_bytes_came() {
        let p = RxProgress::default();
        assert_eq!(heartbeat_msg(&p), PeerMsg::Heartbeat);
        let (a, b) = (PeerId([1; 16]), PeerId([2; 16]));
        p.note(b, 10);
        p.note(a, 5);
        p.note(b, 1);
        p.note(a, 0);
        assert_eq!(
            heartbeat_msg(&p),
            PeerMsg::DataProgress {
                from: vec![(a, 5), (b, 11)]
            }
        );
        assert_eq!(heartbeat_msg(&p), PeerMsg::Heartbeat);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn yielding_copy_copies_everything() {
        for len in [0, 1, COPY_SLICE - 1, COPY_SLICE, 3 * COPY_SLICE + 17] {
            let src: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut dst = vec![0u8; len];
            copy_yielding(&mut dst, &src).await;
            assert_eq!(dst, src);
        }
    }

    /// Frames queued from many threads while heartbeats (with progress)
    /// go out meanwhile: every frame arrives whole and decodable, in each
    /// sender's order, and heartbeats keep coming during the traffic.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writer_thread_never_interleaves_frames() {
        let (client, mut server) = crate::net::loopback_pair(&crate::net::Net::default()).await;
        let (_rd, wr) = crate::net::Conn::into_halves(client);
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = CancellationToken::new();
        let progress = Arc::new(RxProgress::default());
        let mut w = Writer {
            wr,
            stop: stop.clone(),
            heartbeat_ms: Arc::new(AtomicU64::new(2)),
            progress: progress.clone(),
        };
        let writer = std::thread::spawn(move || w.run(&rx));
        const SENDERS: u64 = 4;
        const EACH: u64 = 2_000;
        let senders: Vec<_> = (0..SENDERS)
            .map(|s| {
                let tx = tx.clone();
                let progress = progress.clone();
                std::thread::spawn(move || {
                    for i in 0..EACH {
                        progress.note(PeerId([s as u8; 16]), 1);
                        let msg = PeerMsg::CollectiveDone {
                            tag: s,
                            op_id: i,
                            ok: true,
                        };
                        tx.send(Out::Frame(msg.to_frame())).unwrap();
                        if i % 200 == 0 {
                            std::thread::sleep(Duration::from_millis(3));
                        }
                    }
                })
            })
            .collect();
        for s in senders {
            s.join().unwrap();
        }
        let (done_tx, done_rx) = oneshot::channel();
        tx.send(Out::Flush(done_tx)).unwrap();
        done_rx.await.unwrap();
        stop.cancel();
        writer.join().unwrap().unwrap();
        let mut next = [0u64; SENDERS as usize];
        let mut beats = 0;
        // Until the writer's shutdown of the stream.
        while let Ok(body) = crate::net::read_control_frame(&mut server).await {
            match PeerMsg::decode(&body).unwrap() {
                PeerMsg::CollectiveDone { tag, op_id, .. } => {
                    assert_eq!(op_id, next[tag as usize], "sender {tag} out of order");
                    next[tag as usize] += 1;
                }
                PeerMsg::Heartbeat | PeerMsg::DataProgress { .. } => beats += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(next, [EACH; SENDERS as usize]);
        assert!(beats >= 2, "only {beats} heartbeats during the traffic");
    }

    /// On a one-worker runtime, another task keeps running while a large
    /// copy is in progress: the copy yields between slices.
    #[tokio::test(flavor = "current_thread")]
    async fn a_large_copy_lets_other_tasks_run() {
        let len = 64 * COPY_SLICE;
        let src = vec![3u8; len];
        let mut dst = vec![0u8; len];
        let ticks = Arc::new(AtomicU64::new(0));
        let t = ticks.clone();
        let other = tokio::spawn(async move {
            loop {
                t.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        });
        tokio::task::yield_now().await;
        let before = ticks.load(Ordering::Relaxed);
        copy_yielding(&mut dst, &src).await;
        let during = ticks.load(Ordering::Relaxed) - before;
        other.abort();
        assert!(dst.iter().all(|&x| x == 3));
        assert!(
            during >= 32,
            "the other task ran only {during} times during a 64-slice copy"
        );
    }
}
