//! Shared state: named tensors plus a revision counter, kept bit-identical
//! across the peers of a group. A sync hashes every tensor, lets the master
//! elect the popular content, and fetches exactly the differing tensors from
//! a peer that holds it, verifying them by hash before returning.
//!
//! Here: the public types ([`SharedTensor`], [`SharedState`],
//! [`SyncTimings`]), the constants and the upload-limit parser, and
//! `run_sync`, the peer's side of the sync protocol with the master. The
//! holder's server lives in `server`, the fetching side in `fetch`; the
//! request and response bytes they exchange are in [`crate::wire`].

mod fetch;
mod progress;
mod server;

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::comm::Element;
use crate::error::{Error, Result};
use crate::hash;
use crate::types::{DataType, DeviceType};

use fetch::fetch_tensors;
pub(crate) use fetch::TransferOpts;
pub(crate) use progress::ProgressOpts;
pub use progress::{SyncProgress, SyncProgressCallback};
use server::ServedTensor;
pub(crate) use server::SharedStateServer;

/// One tensor of a shared state. Borrowed mutably for `'a`: a sync may
/// overwrite it with the popular content.
pub struct SharedTensor<'a> {
    pub(crate) name: String,
    pub(crate) ptr: *mut u8,
    pub(crate) count: usize,
    pub(crate) datatype: DataType,
    pub(crate) device: DeviceType,
    pub(crate) allow_content_inequality: bool,
    _borrow: PhantomData<&'a mut [u8]>,
}

// SAFETY: a SharedTensor is an exclusive borrow of its buffer (or, via
// `from_raw`, a caller promise of the same), so moving it to another thread
// is as safe as moving a `&mut [u8]`.
unsafe impl Send for SharedTensor<'_> {}

impl<'a> SharedTensor<'a> {
    /// A tensor over a typed slice on the CPU.
    pub fn new<T: Element>(name: impl Into<String>, data: &'a mut [T]) -> Self {
        SharedTensor {
            name: name.into(),
            ptr: data.as_mut_ptr() as *mut u8,
            count: data.len(),
            datatype: T::DTYPE,
            device: DeviceType::Cpu,
            allow_content_inequality: false,
            _borrow: PhantomData,
        }
    }

    /// A tensor over raw memory (for the C and Python layers).
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `count * datatype.size()`
    /// bytes for `'a`, and nothing else may access it during a sync.
    pub unsafe fn from_raw(
        name: impl Into<String>,
        ptr: *mut u8,
        count: usize,
        datatype: DataType,
        device: DeviceType,
    ) -> Self {
        SharedTensor {
            name: name.into(),
            ptr,
            count,
            datatype,
            device,
            allow_content_inequality: false,
            _borrow: PhantomData,
        }
    }

    /// Marks the tensor as allowed to differ between peers: it is neither
    /// voted on nor re-sent every step (only to peers whose revision lags).
    pub fn allow_content_inequality(mut self, allow: bool) -> Self {
        self.allow_content_inequality = allow;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn datatype(&self) -> DataType {
        self.datatype
    }

    pub fn byte_len(&self) -> usize {
        self.count * self.datatype.size()
    }

    /// The tensor's bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the constructor's contract makes ptr valid for byte_len bytes for 'a.
        unsafe { std::slice::from_raw_parts(self.ptr, self.byte_len()) }
    }
}

/// A revision counter and the tensors it versions.
pub struct SharedState<'a> {
    /// Must advance by exactly one per sync; a newcomer's first sync adopts
    /// the group's revision.
    pub revision: u64,
    pub tensors: Vec<SharedTensor<'a>>,
}

impl<'a> SharedState<'a> {
    pub fn new(revision: u64, tensors: Vec<SharedTensor<'a>>) -> Self {
        SharedState { revision, tensors }
    }
}

/// Where the time of one shared-state sync went, as seen by the peer that
/// ran it ([`last_sync_timings`]). Durations marked "summed" add up the
/// parallel connections, so they can exceed the wall time of their phase.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SyncTimings {
    /// The protocol part of the sync, from sending the vote to the master's
    /// result (the local hash of the tensors before the vote is not in it).
    pub protocol: Duration,
    /// Vote sent until the master's plan arrived: the master waits for every
    /// peer of the group, so this is mostly the slowest peer's hashing.
    pub wait_plan: Duration,
    /// Plan received until every fetched tensor was in and verified (zero
    /// when nothing was fetched).
    pub fetch: Duration,
    /// Summed: time spent waiting for and reading response bytes.
    pub fetch_recv: Duration,
    /// Summed: hashing received leaves.
    pub fetch_hash: Duration,
    /// Computing the roots from the leaf hashes and comparing them.
    pub verify: Duration,
    /// Transfer reported (or plan received, when nothing was fetched) until
    /// the master's result: waiting for the group's receivers.
    pub wait_result: Duration,
    /// Parallel connections used for fetching.
    pub fetch_connections: usize,
    /// Sources given up during the fetch (died, refused, wrong content).
    pub failed_sources: usize,
    /// Summed: writing requested ranges to fetching peers (includes any
    /// upload rate limiting).
    pub serve: Duration,
}

thread_local! {
    static LAST_TIMINGS: std::cell::Cell<Option<SyncTimings>> = const { std::cell::Cell::new(None) };
}

/// The timing breakdown of the last shared-state sync that the calling thread
/// ran (successful or not), or `None` if it never ran one. A diagnostic: the
/// same figures are logged at debug level by each sync.
pub fn last_sync_timings() -> Option<SyncTimings> {
    LAST_TIMINGS.with(|t| t.get())
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

/// Bytes fetched per request; a multiple of the hash leaf size so each range
/// hashes independently and ranges can be fetched in parallel.
pub const RANGE_BYTES: usize = 64 * hash::LEAF_SIZE;

/// Default of [`crate::CommunicatorConfig::shared_state_stall_timeout`]: how
/// long a fetch connection with requests outstanding may receive no byte at
/// all before its source is given up and its ranges are requested from the
/// next holder.
///
/// The same as the master's default peer timeout (5 s), so a holder that
/// stays connected but stops sending (frozen, swapped out, wedged) costs a
/// fetching peer about what a silent peer costs a collective, instead of
/// waiting on TCP: a stopped process's kernel keeps acknowledging and
/// answering keepalive probes, so the connection never breaks by itself, and
/// even a vanished host is only detected after ~16 s of keepalive. It leaves
/// room for what a live holder can do: a few consecutive retransmission
/// timeouts on a lossy path (200 ms, 400 ms, 800 ms, 1.6 s ...), and the
/// pauses of an upload limit (at most 10 ms per connection sharing it,
/// [`UPLOAD_LIMIT_ENV`]). A false alarm only costs re-requesting at most
/// two ranges (`PIPELINE_DEPTH`) from another holder.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Environment variable capping how fast a peer uploads shared state to
/// the peers fetching from it, in bytes per second over all its connections
/// together (see `docs/shared-state.md`). Read when a communicator is
/// created. Unset, empty or `0`: no limit.
pub const UPLOAD_LIMIT_ENV: &str = "PCCL_SHARED_STATE_UPLOAD_BPS";

/// Parses an upload limit: a decimal number of bytes per second, optionally
/// followed by `K`, `M` or `G` (powers of 1000) or `Ki`, `Mi`, `Gi` (powers of
/// 1024). `Ok(None)` means no limit (empty or zero).
pub fn parse_upload_limit(text: &str) -> std::result::Result<Option<u64>, String> {
    let t = text.trim();
    if t.is_empty() {
        return Ok(None);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: u64 = num
        .parse()
        .map_err(|_| format!("'{text}' is not a number of bytes per second"))?;
    let mult: u64 = match unit.trim() {
        "" => 1,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        u => {
            return Err(format!(
                "unknown unit '{u}' in '{text}' (K, M, G, Ki, Mi, Gi)"
            ))
        }
    };
    let bps = num
        .checked_mul(mult)
        .ok_or_else(|| format!("'{text}' is too large"))?;
    Ok((bps > 0).then_some(bps))
}

/// Runs one sync for `state` (called by [`crate::Communicator::sync_shared_state`]).
pub(crate) async fn run_sync(
    ctl: &Arc<crate::comm::control::Control>,
    server: &Arc<SharedStateServer>,
    state: &mut SharedState<'_>,
    strategy: crate::SyncStrategy,
    hashes: Vec<u64>,
    opts: TransferOpts,
) -> Result<crate::SyncInfo> {
    use crate::comm::control::{Routed, WaitKey};
    use crate::wire::{MasterMsg, PeerMsg, TensorMeta};

    let me = ctl.me();
    let served: HashMap<String, ServedTensor> = if strategy == crate::SyncStrategy::ReceiveOnly {
        HashMap::new()
    } else {
        state
            .tensors
            .iter()
            .zip(&hashes)
            .map(|(t, h)| {
                (
                    t.name.clone(),
                    ServedTensor {
                        ptr: t.ptr as usize,
                        len: t.byte_len(),
                        hash: *h,
                    },
                )
            })
            .collect()
    };
    let mut waiter = ctl.wait(WaitKey::Sync)?;
    let (cancel, tx_bytes, serve_ns) = server.begin(served).await;
    let mut tm = SyncTimings::default();
    let started = Instant::now();
    let outcome = async {
        ctl.send(&PeerMsg::SyncVote {
            revision: state.revision,
            strategy: strategy as u8,
            tensors: state
                .tensors
                .iter()
                .zip(&hashes)
                .map(|(t, h)| TensorMeta {
                    name: t.name.clone(),
                    datatype: t.datatype as u8,
                    count: t.count as u64,
                    hash: *h,
                    allow_content_inequality: t.allow_content_inequality,
                })
                .collect(),
        })?;
        let voted = Instant::now();
        let (sync_id, revision, fetch, sources) = match waiter.recv().await? {
            Routed::Msg(MasterMsg::SyncPlan { sync_id, revision, fetch, sources }) => (sync_id, revision, fetch, sources),
            Routed::Msg(MasterMsg::SyncResult { ok: false, code, reason, .. }) => {
                return Err(crate::comm::error_from_code(code, reason));
            }
            _ => return Err(Error::Internal("unexpected answer to a shared-state vote".into())),
        };
        let planned = Instant::now();
        tm.wait_plan = planned - voted;
        server.set_sync_id(sync_id).await;
        let mut rx = 0;
        if !fetch.is_empty() {
            tracing::info!(peer = %me, sync_id, revision, tensors = fetch.len(), "fetching shared state");
            let items: Vec<(String, u64)> = fetch.into_iter().map(|f| (f.name, f.expected_hash)).collect();
            let fetched = fetch_tensors(me, sync_id, state, &items, sources, opts, &mut tm).await;
            tm.fetch = planned.elapsed();
            let ok = fetched.is_ok();
            ctl.send(&PeerMsg::SyncTransferDone { sync_id, ok, failed_source: None })?;
            rx = fetched?;
        }
        let reported = Instant::now();
        let result = loop {
            match waiter.recv().await? {
                Routed::Msg(MasterMsg::SyncResult { sync_id: id, ok, code, reason }) if id == sync_id || id == 0 => {
                    break (ok, code, reason);
                }
                _ => continue,
            }
        };
        tm.wait_result = reported.elapsed();
        let (ok, code, reason) = result;
        if !ok {
            return Err(crate::comm::error_from_code(code, reason));
        }
        state.revision = revision;
        Ok(rx)
    }
    .await;
    server.end(&cancel).await;
    tm.protocol = started.elapsed();
    tm.serve = Duration::from_nanos(serve_ns.load(Ordering::Relaxed));
    tracing::debug!(peer = %me, ok = outcome.is_ok(), timings = ?tm, "shared-state sync timings");
    LAST_TIMINGS.with(|t| t.set(Some(tm)));
    let rx = outcome?;
    Ok(crate::SyncInfo {
        tx_bytes: tx_bytes.load(Ordering::Relaxed),
        rx_bytes: rx,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_limits_parse() {
        assert_eq!(parse_upload_limit(""), Ok(None));
        assert_eq!(parse_upload_limit("  "), Ok(None));
        assert_eq!(parse_upload_limit("0"), Ok(None));
        assert_eq!(parse_upload_limit("0M"), Ok(None));
        assert_eq!(parse_upload_limit("1500"), Ok(Some(1500)));
        assert_eq!(parse_upload_limit(" 25M "), Ok(Some(25_000_000)));
        assert_eq!(parse_upload_limit("3k"), Ok(Some(3_000)));
        assert_eq!(parse_upload_limit("2G"), Ok(Some(2_000_000_000)));
        assert_eq!(parse_upload_limit("16Mi"), Ok(Some(16 << 20)));
        assert_eq!(parse_upload_limit("64 Ki"), Ok(Some(64 << 10)));
        assert_eq!(parse_upload_limit("1Gi"), Ok(Some(1 << 30)));
        for bad in [
            "M",
            "-5",
            "1.5M",
            "10MB",
            "ten",
            "99999999999999999999",
            "18446744073709551615G",
        ] {
            assert!(
                parse_upload_limit(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
    }
}
