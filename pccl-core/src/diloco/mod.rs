//! DiLoCo outer steps over a churning swarm: sync, async (one-step delayed)
//! and streaming (fragments), optionally quantized, with per-peer error
//! feedback. See `docs/diloco.md` for the protocol and its guarantees.
//!
//! Each peer trains its own copy of the model (the *local* parameters,
//! borrowed at every call as [`ParamMut`]s) and calls [`DiLoCo::step`] after
//! every inner optimizer step. Every H inner steps (per fragment, in
//! streaming mode) the pseudo-gradient `outer − local` is averaged across the
//! group with `all_reduce_multiple_with_retry`, and one outer optimizer step
//! (SGD, Nesterov momentum) runs on the f32 *outer* parameters, identically on
//! every peer. The outer parameters, the momentum and the step counters live
//! in the shared state, so a newcomer receives exactly what the others hold,
//! and every sync checks that all peers hold identical bytes.
//!
//! Lives here: the driver ([`DiLoCo`]) and its configuration; the pure
//! pieces (optimizer, fragments, schedule, meta record, casts) are in
//! [`outer`]. May import only the crate's public API: the communicator,
//! shared state, quantization and hashing, and the types and errors.

pub mod outer;

use std::sync::Arc;
use std::time::{Duration, Instant};

use half::{bf16, f16};

use crate::{
    Communicator, CommunicatorConfig, DataType, Error, QuantizationAlgorithm, QuantizationOptions,
    ReduceBuffers, ReduceInfo, ReduceOp, Result, SharedState, SharedTensor, SyncStrategy,
};
use outer::{ModelElement, META_FORMAT, META_INNER_STEP, META_LEN, META_OUTER_STEP};

/// How outer steps overlap the inner steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Every H inner steps: all-reduce the pseudo-gradient, apply it, go on.
    Sync,
    /// One-step delay: the all-reduce of outer step t runs in the background
    /// during the inner steps of t + 1 and is applied at their end.
    Async,
    /// The parameters are split into `fragments` groups that sync on a
    /// staggered schedule (fragment f at inner steps ≡ f·H/F mod H); each
    /// fragment's all-reduce overlaps `delay` (τ) inner steps, then the
    /// local fragment becomes `lerp(local, outer, alpha)`.
    Streaming {
        fragments: usize,
        delay: u64,
        alpha: f32,
    },
}

impl Mode {
    fn code(self) -> u64 {
        match self {
            Mode::Sync => 0,
            Mode::Async => 1,
            Mode::Streaming { .. } => 2,
        }
    }
}

/// What every peer of a group must configure alike (checked at every sync).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiLoCoConfig {
    pub mode: Mode,
    /// H: inner steps per outer step (per fragment period when streaming).
    pub sync_every: u64,
    pub outer_lr: f32,
    pub outer_momentum: f32,
    pub nesterov: bool,
    /// Quantize the pseudo-gradient on the wire (any algorithm and code
    /// type the core accepts for f32).
    pub quantization: Option<QuantizationOptions>,
    /// Add this peer's last quantization residual to its next
    /// pseudo-gradient (only with `quantization`).
    pub error_feedback: bool,
    /// Before the first inner step of a new group, wait until this many
    /// peers are admitted.
    pub min_world: u32,
    /// All-reduces in flight at once inside one outer step.
    pub max_in_flight: usize,
    /// How often the driver joins the group again as a newcomer (after an
    /// eviction, a lost master connection or a failed own sync) before
    /// giving up with the error.
    pub max_rejoins: u32,
}

impl Default for DiLoCoConfig {
    fn default() -> Self {
        DiLoCoConfig {
            mode: Mode::Sync,
            sync_every: 100,
            outer_lr: 0.7,
            outer_momentum: 0.9,
            nesterov: true,
            quantization: None,
            error_feedback: false,
            min_world: 1,
            max_in_flight: 4,
            max_rejoins: 50,
        }
    }
}

impl DiLoCoConfig {
    /// Checks the values; `InvalidArgument` names the first bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.sync_every == 0 {
            return bad("sync_every (H) must be at least 1".into());
        }
        if !self.outer_lr.is_finite() || self.outer_lr <= 0.0 {
            return bad(format!(
                "outer_lr must be finite and > 0, got {}",
                self.outer_lr
            ));
        }
        if !(0.0..1.0).contains(&self.outer_momentum) {
            return bad(format!(
                "outer_momentum must be in [0, 1), got {}",
                self.outer_momentum
            ));
        }
        if let Mode::Streaming {
            fragments,
            delay,
            alpha,
        } = self.mode
        {
            if fragments == 0 {
                return bad("streaming needs at least 1 fragment".into());
            }
            if fragments as u64 > self.sync_every {
                return bad(format!(
                    "{fragments} fragments need sync_every ≥ {fragments}, got {}",
                    self.sync_every
                ));
            }
            let gap = outer::min_launch_gap(fragments, self.sync_every);
            if delay >= gap {
                return bad(format!(
                    "fragment_sync_delay τ={delay} with {fragments} fragments and H={} needs \
                     τ·F < H and τ < {gap} (the shortest gap between two launches), so that \
                     one fragment is in flight at a time and peers are admitted between launches",
                    self.sync_every
                ));
            }
            if !(0.0..=1.0).contains(&alpha) {
                return bad(format!(
                    "fragment_update_alpha must be in [0, 1], got {alpha}"
                ));
            }
        }
        if let Some(q) = self.quantization {
            if q.algorithm != QuantizationAlgorithm::None {
                crate::quant::validate(
                    DataType::F32,
                    q.quantized_datatype,
                    q.algorithm,
                    ReduceOp::Avg,
                )?;
            }
        } else if self.error_feedback {
            return bad("error_feedback needs quantization".into());
        }
        Ok(())
    }

    fn quant(&self) -> Option<QuantizationOptions> {
        self.quantization
            .filter(|q| q.algorithm != QuantizationAlgorithm::None)
    }

    fn meta(&self) -> [u64; META_LEN] {
        let (frags, delay, alpha) = match self.mode {
            Mode::Streaming {
                fragments,
                delay,
                alpha,
            } => (fragments as u64, delay, alpha),
            _ => (1, 0, 1.0),
        };
        let quant = self.quant().map_or(0, |q| {
            (q.algorithm as u64) << 8 | q.quantized_datatype.as_raw() as u64
        });
        let mut m = [0u64; META_LEN];
        m[..outer::META_CONFIG_LEN].copy_from_slice(&[
            META_FORMAT,
            self.mode.code(),
            self.sync_every,
            frags,
            delay,
            alpha.to_bits() as u64,
            self.outer_lr.to_bits() as u64,
            self.outer_momentum.to_bits() as u64,
            self.nesterov as u64,
            quant,
        ]);
        m
    }
}

/// One local (model) parameter tensor, borrowed for a call.
pub enum ParamMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
    BF16(&'a mut [bf16]),
}

impl<'a> From<&'a mut [f32]> for ParamMut<'a> {
    fn from(v: &'a mut [f32]) -> Self {
        ParamMut::F32(v)
    }
}
impl<'a> From<&'a mut [f16]> for ParamMut<'a> {
    fn from(v: &'a mut [f16]) -> Self {
        ParamMut::F16(v)
    }
}
impl<'a> From<&'a mut [bf16]> for ParamMut<'a> {
    fn from(v: &'a mut [bf16]) -> Self {
        ParamMut::BF16(v)
    }
}

macro_rules! with_param {
    ($p:expr, $v:ident => $body:expr) => {
        match $p {
            ParamMut::F32($v) => $body,
            ParamMut::F16($v) => $body,
            ParamMut::BF16($v) => $body,
        }
    };
}

impl ParamMut<'_> {
    pub fn len(&self) -> usize {
        with_param!(self, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DataType {
        match self {
            ParamMut::F32(_) => DataType::F32,
            ParamMut::F16(_) => DataType::F16,
            ParamMut::BF16(_) => DataType::BF16,
        }
    }

    fn to_f32_vec(&self) -> Vec<f32> {
        with_param!(self, v => v.iter().map(|x| x.to_f32()).collect())
    }

    fn pseudo_gradient(&self, outer: &[f32], out: &mut [f32]) {
        with_param!(self, v => outer::pseudo_gradient(outer, v, out))
    }

    fn reset_to(&mut self, outer: &[f32]) {
        with_param!(self, v => outer::reset_to(v, outer))
    }

    fn lerp_to(&mut self, outer: &[f32], alpha: f32) {
        with_param!(self, v => outer::lerp_to(v, outer, alpha))
    }
}

/// Name, dtype and length of one registered parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub dtype: DataType,
    pub len: usize,
}

/// What one outer event (an outer step, or one fragment's in streaming mode) did.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct OuterReport {
    /// Outer optimizer steps applied so far by the group (the meta counter).
    pub outer_step: u64,
    /// Inner steps so far (the group's schedule clock).
    pub inner_step: u64,
    /// The fragment applied (streaming), else `None`.
    pub fragment: Option<usize>,
    /// Peers whose pseudo-gradients were averaged (1: alone, applied locally).
    pub world: u32,
    /// Shared-state revision after the event's sync (`None`: no sync).
    pub revision: Option<u64>,
    /// Bytes this peer sent / received for the event (all-reduces and syncs).
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    /// Wall time of the all-reduce(s) applied in this event.
    pub comm_time: Duration,
    /// Time this call spent blocked on communication (all-reduces, votes,
    /// topology updates, syncs). `comm_time − exposed_time` was hidden
    /// behind inner steps (async and streaming modes).
    pub exposed_time: Duration,
    /// Whether this peer joined the group again as a newcomer during the call.
    pub rejoined: bool,
    /// Whether an outer optimizer step was applied in this event.
    pub applied: bool,
}

impl OuterReport {
    /// Communication time hidden behind inner steps.
    pub fn hidden_time(&self) -> Duration {
        self.comm_time.saturating_sub(self.exposed_time)
    }
}

/// What async mode's background task hands back: the outer state after its
/// sync (when one was due), the averaged pseudo-gradient, and the answer of
/// the are-peers-pending vote that followed.
struct AsyncOutcome {
    state: Option<OuterState>,
    sync: Result<Option<crate::SyncInfo>>,
    bufs: Vec<Vec<f32>>,
    reduce: Result<ReduceInfo>,
    pending: Result<bool>,
    took: Duration,
}

fn join_async(h: std::thread::JoinHandle<AsyncOutcome>) -> AsyncOutcome {
    h.join().unwrap_or_else(|_| AsyncOutcome {
        state: None,
        sync: Err(Error::Internal(
            "the DiLoCo background task panicked".into(),
        )),
        bufs: Vec::new(),
        reduce: Err(Error::Internal(
            "the DiLoCo background task panicked".into(),
        )),
        pending: Ok(false),
        took: Duration::ZERO,
    })
}

/// Streaming: the fragment whose background task runs, and when it started.
struct InFlight {
    fragment: usize,
    launched_at: u64,
}

/// An event's outcome: on failure the error and whether it came from this
/// peer's own sync (which decides whether it must join again).
type EventResult<T> = std::result::Result<T, (Error, bool)>;

/// Errors after which this peer is out of step with the group's sequence of
/// collectives and must join again as a newcomer.
fn needs_rejoin(e: &Error, during_sync: bool) -> bool {
    match e {
        Error::MasterConnectionFailed(_) => true,
        Error::RankConnectionLost(_)
        | Error::RankConnectionFailed(_)
        | Error::NoSharedStateAvailable(_) => true,
        Error::InvalidUsage(_) => during_sync,
        _ => false,
    }
}

/// The DiLoCo driver of one peer: owns its communicator (so it can join the
/// group again after an eviction) and the f32 outer state.
pub struct DiLoCo {
    comm_cfg: CommunicatorConfig,
    comm: Arc<Communicator>,
    cfg: DiLoCoConfig,
    specs: Vec<ParamSpec>,
    fragments: Vec<std::ops::Range<usize>>,
    outer: Vec<Vec<f32>>,
    momentum: Vec<Vec<f32>>,
    residual: Vec<Vec<f32>>,
    /// Async mode: where the local model started its current window (the
    /// outer parameters plus this peer's own eager step, see `async_event`).
    start: Vec<Vec<f32>>,
    meta: [u64; META_LEN],
    /// Revision of this session's last successful sync (`None`: none yet).
    revision: Option<u64>,
    inflight: Option<InFlight>,
    /// Async and streaming modes: the background task (sync of the last
    /// applied state, all-reduce, pending vote) of the last launch.
    async_task: Option<std::thread::JoinHandle<AsyncOutcome>>,
    /// Streaming: the last applied state still waits for its sync (which the
    /// next launch's background task runs).
    needs_sync: bool,
    rejoins: u32,
    /// Between-steps all-reduces running (0 or 1).
    side_in_flight: Arc<std::sync::atomic::AtomicUsize>,
}

impl DiLoCo {
    /// Connects a communicator made from `comm_cfg`, joins the group's
    /// DiLoCo state (a newcomer receives it; founding peers elect one of
    /// theirs) and resets `params` to the outer parameters.
    ///
    /// `names` name the parameters (unique; shared-state tensors are
    /// `diloco.outer.<name>` and `diloco.momentum.<name>`). Errors:
    /// `InvalidArgument` for a bad configuration or parameter list (nothing
    /// connected), a configuration that differs from the group's, or a
    /// parameter whose shape differs from the group's; connection errors
    /// as [`Communicator::connect`].
    pub fn connect(
        comm_cfg: CommunicatorConfig,
        names: &[&str],
        params: &mut [ParamMut<'_>],
        cfg: DiLoCoConfig,
    ) -> Result<DiLoCo> {
        cfg.validate()?;
        let specs = check_params(names, params)?;
        let lens: Vec<usize> = specs.iter().map(|s| s.len).collect();
        let fragments = match cfg.mode {
            Mode::Streaming { fragments, .. } => outer::split_fragments(&lens, fragments)?,
            _ => std::iter::once(0..specs.len()).collect(),
        };
        let outer: Vec<Vec<f32>> = params.iter().map(|p| p.to_f32_vec()).collect();
        let momentum: Vec<Vec<f32>> = lens.iter().map(|&l| vec![0.0; l]).collect();
        let residual = if cfg.error_feedback {
            momentum.clone()
        } else {
            Vec::new()
        };
        let comm = Arc::new(connect_comm(&comm_cfg)?);
        let mut d = DiLoCo {
            comm_cfg,
            comm,
            meta: cfg.meta(),
            cfg,
            specs,
            fragments,
            outer,
            momentum,
            residual,
            start: Vec::new(),
            revision: None,
            inflight: None,
            async_task: None,
            needs_sync: false,
            rejoins: 0,
            side_in_flight: Arc::default(),
        };
        let mut rep = OuterReport::default();
        d.join(params, &mut rep)?;
        Ok(d)
    }

    /// The communicator (for queries such as [`Communicator::world`]; do not
    /// run collectives on it between `step` calls, they would put this peer
    /// out of step with the group).
    pub fn communicator(&self) -> &Communicator {
        &self.comm
    }

    pub fn config(&self) -> &DiLoCoConfig {
        &self.cfg
    }

    pub fn params(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// The f32 outer parameters, in registration order.
    pub fn outer_params(&self) -> &[Vec<f32>] {
        &self.outer
    }

    /// The outer optimizer's momentum buffers.
    pub fn momentum(&self) -> &[Vec<f32>] {
        &self.momentum
    }

    pub fn inner_step(&self) -> u64 {
        self.meta[META_INNER_STEP]
    }

    pub fn outer_step(&self) -> u64 {
        self.meta[META_OUTER_STEP]
    }

    /// Revision of the last successful sync of this peer's current session.
    pub fn revision(&self) -> Option<u64> {
        self.revision
    }

    /// Times this peer joined again as a newcomer.
    pub fn rejoins(&self) -> u32 {
        self.rejoins
    }

    /// Hash of the outer parameters, momentum and step counters: equal on
    /// every peer after each outer event.
    pub fn state_hash(&self) -> u64 {
        let mut slices: Vec<&[u8]> = Vec::with_capacity(2 * self.outer.len() + 1);
        for v in self.outer.iter().chain(&self.momentum) {
            slices.push(f32_bytes(v));
        }
        let counters = [self.meta[META_INNER_STEP], self.meta[META_OUTER_STEP]];
        let counter_bytes: Vec<u8> = counters.iter().flat_map(|c| c.to_le_bytes()).collect();
        slices.push(&counter_bytes);
        let hashes = crate::hash::tensor_hashes(&slices);
        let total: u64 = slices.iter().map(|s| s.len() as u64).sum();
        crate::hash::root_hash(&hashes, total)
    }

    /// Call after every inner optimizer step. Returns a report when an outer
    /// event (a step, or one fragment's) completed during the call.
    ///
    /// `params` are the same tensors, in the same order, as at
    /// [`connect`](Self::connect); otherwise `InvalidArgument`, nothing
    /// changed. On any other error the outer state is as it was before the
    /// event (an outer step is applied whole or not at all); errors after
    /// which this peer is out of step with the group (a lost master
    /// connection, an eviction, a failed own sync) make it join again as a
    /// newcomer, up to `max_rejoins` times, and adopt the group's state.
    pub fn step(&mut self, params: &mut [ParamMut<'_>]) -> Result<Option<OuterReport>> {
        self.check_same_params(params)?;
        if self
            .side_in_flight
            .load(std::sync::atomic::Ordering::Acquire)
            > 0
        {
            return Err(Error::InvalidUsage(
                "a between-steps all-reduce is still running; wait for its handle before step()"
                    .into(),
            ));
        }
        self.meta[META_INNER_STEP] += 1;
        let mut rep = OuterReport::default();
        let event = match self.cfg.mode {
            Mode::Sync | Mode::Async => self.inner_step().is_multiple_of(self.cfg.sync_every),
            Mode::Streaming {
                fragments, delay, ..
            } => {
                let s = self.inner_step();
                outer::launching_fragment(s, fragments, self.cfg.sync_every).is_some()
                    || self
                        .inflight
                        .as_ref()
                        .is_some_and(|f| s >= f.launched_at + delay)
            }
        };
        if !event {
            return Ok(None);
        }
        let r = match self.cfg.mode {
            Mode::Sync => self.sync_event(params, &mut rep),
            Mode::Async => self.async_event(params, &mut rep),
            Mode::Streaming { .. } => self.streaming_event(params, &mut rep),
        };
        if let Err((mut cause, mut during_sync)) = r {
            loop {
                if !needs_rejoin(&cause, during_sync) || self.rejoins >= self.cfg.max_rejoins {
                    return Err(cause);
                }
                tracing::warn!(peer = %self.comm.peer_id(), "DiLoCo: {cause}; joining the group again as a newcomer");
                match self.rejoin(params, &mut rep) {
                    Ok(()) => break,
                    Err(e) => {
                        (cause, during_sync) = (e, true);
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
        }
        rep.outer_step = self.outer_step();
        rep.inner_step = self.inner_step();
        rep.revision = self.revision;
        Ok(Some(rep))
    }

    /// All-reduces `data` in place across the group between two `step`
    /// calls: small per-step statistics, such as a mixture-of-experts
    /// model's expert counts. Tiny buffers ride the master's relay (one
    /// round trip). Alone in the group, `data` is left as it is (world 1).
    ///
    /// Every peer of the group must make the same between-steps calls, in
    /// the same order, between the same two steps (the inner-step schedule
    /// is the group's, so a newcomer is in step from its first call). A
    /// peer that dies mid-op is dropped and the op retried with the others.
    /// On error `data` is as it was; the outer state is untouched either
    /// way, and a broken connection is repaired by the next outer event.
    pub fn all_reduce_between_steps<T: crate::Element>(
        &self,
        data: &mut [T],
        op: ReduceOp,
    ) -> Result<SideReduceInfo> {
        if self
            .side_in_flight
            .load(std::sync::atomic::Ordering::Acquire)
            > 0
        {
            return Err(Error::InvalidUsage(
                "a between-steps all-reduce is still running; wait for it first".into(),
            ));
        }
        side_reduce(&self.comm, data, op)
    }

    /// Starts [`all_reduce_between_steps`](Self::all_reduce_between_steps)
    /// on a background thread, so it overlaps compute. Wait for the handle
    /// before the next [`step`](Self::step) (which otherwise refuses with
    /// `InvalidUsage`) or the next between-steps call.
    pub fn start_between_steps<T: crate::Element + Send + 'static>(
        &self,
        mut data: Vec<T>,
        op: ReduceOp,
    ) -> Result<SideReduce<T>> {
        use std::sync::atomic::Ordering;
        if self
            .side_in_flight
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(Error::InvalidUsage(
                "a between-steps all-reduce is still running; wait for it first".into(),
            ));
        }
        let comm = self.comm.clone();
        let in_flight = self.side_in_flight.clone();
        let spawned = std::thread::Builder::new()
            .name("pccl-diloco-side".into())
            .spawn(move || {
                let r = side_reduce(&comm, &mut data, op);
                in_flight.store(0, Ordering::Release);
                (data, r)
            });
        match spawned {
            Ok(join) => Ok(SideReduce { join }),
            Err(e) => {
                self.side_in_flight.store(0, Ordering::Release);
                Err(Error::Internal(format!(
                    "cannot start the between-steps all-reduce thread: {e}"
                )))
            }
        }
    }

    /// Waits for an all-reduce still in flight (this peer's contribution is
    /// part of it, so the others need it to finish), then closes the
    /// communicator: a graceful leave.
    pub fn close(self) {
        // Drop awaits the in-flight reduce; dropping the last handle of the
        // communicator leaves the group gracefully.
        drop(self);
    }

    // ---- events -------------------------------------------------------

    fn sync_event(
        &mut self,
        params: &mut [ParamMut<'_>],
        rep: &mut OuterReport,
    ) -> std::result::Result<(), (Error, bool)> {
        let all = 0..self.specs.len();
        let mut delta = Self::pseudo_gradients(params, &self.outer, all.clone());
        let residual = self.error_feedback(&mut delta, all.clone());
        let t = Instant::now();
        let (info, r) = reduce_now(&self.comm, &mut delta, all.start, &self.cfg);
        let info = r.map(|_| info).map_err(|e| (e, false))?;
        note(rep, &info, t.elapsed(), t.elapsed());
        self.commit_residual(residual, all.clone());
        self.apply(all.clone(), &delta);
        rep.applied = true;
        self.admit_and_sync(rep).map_err(|e| (e, true))?;
        for i in all {
            params[i].reset_to(&self.outer[i]);
        }
        Ok(())
    }

    /// One-step-delayed outer step with eager local updates (Kale et al.,
    /// "Eager updates for overlapped communication and computation in
    /// DiLoCo", 2025): the average of window t is applied to the outer
    /// state at the end of window t + 1, while each peer starts window t + 1
    /// from the outer state plus an outer step with its *own* pseudo-
    /// gradient of window t, a stand-in for the average that is still in
    /// flight. The outer state only ever takes group averages, so it stays
    /// identical on every peer; only the local starting points differ.
    /// (Starting every window from the plain outer state would count each
    /// window's progress twice, once late, which diverges with momentum.)
    fn async_event(
        &mut self,
        params: &mut [ParamMut<'_>],
        rep: &mut OuterReport,
    ) -> std::result::Result<(), (Error, bool)> {
        let all = 0..self.specs.len();
        let mut delta = Self::pseudo_gradients(params, &self.start, all.clone());
        let residual = self.error_feedback(&mut delta, all.clone());
        let pending = if self.async_task.is_some() {
            let (g, pending) = self.take_background(rep)?;
            self.apply(all.clone(), &g);
            rep.applied = true;
            pending
        } else {
            let t = Instant::now();
            let p = self.comm.are_peers_pending().map_err(|e| (e, false))?;
            rep.exposed_time += t.elapsed();
            p
        };
        if pending {
            // Drain the pipeline before admitting: the newcomer then receives
            // every applied step and nothing is in flight that it missed.
            let t = Instant::now();
            let (info, r) = reduce_now(&self.comm, &mut delta, all.start, &self.cfg);
            r.map_err(|e| (e, false))?;
            note(rep, &info, t.elapsed(), t.elapsed());
            self.commit_residual(residual, all.clone());
            self.apply(all.clone(), &delta);
            rep.applied = true;
            self.update_topology(rep);
            self.sync(rep).map_err(|e| (e, true))?;
            self.start = self.outer.clone();
        } else {
            self.commit_residual(residual, all.clone());
            self.start = self.eager_start(&delta);
            // The sync of the state just applied runs in the background too,
            // before the all-reduce (every peer runs the same sequence).
            let state = rep.applied.then(|| self.snapshot());
            self.launch_async(state, delta, 0);
        }
        for (p, s) in params.iter_mut().zip(&self.start) {
            p.reset_to(s);
        }
        Ok(())
    }

    /// Joins the background task: adopts the state it synced, accounts its
    /// traffic and time, and returns the averaged buffers and the vote.
    fn take_background(&mut self, rep: &mut OuterReport) -> EventResult<(Vec<Vec<f32>>, bool)> {
        let Some(task) = self.async_task.take() else {
            return Err((
                Error::Internal("no DiLoCo background task to join".into()),
                false,
            ));
        };
        let t = Instant::now();
        let out = join_async(task);
        let waited = t.elapsed();
        if let Some(st) = out.state {
            // The state as synced at launch (repaired if this peer's
            // differed); the schedule clock is this peer's own.
            let inner = self.meta[META_INNER_STEP];
            self.outer = st.outer;
            self.momentum = st.momentum;
            self.meta = st.meta;
            self.meta[META_INNER_STEP] = inner;
            self.revision = st.revision;
        }
        if let Some(info) = out.sync.map_err(|e| (e, true))? {
            rep.tx_bytes += info.tx_bytes;
            rep.rx_bytes += info.rx_bytes;
        }
        let info = out.reduce.map_err(|e| (e, false))?;
        note(rep, &info, out.took, waited);
        let pending = out.pending.map_err(|e| (e, false))?;
        Ok((out.bufs, pending))
    }

    /// Starts the background task (async mode, and streaming fragments):
    /// sync `state` (if given), average `delta` (tags from `tag_base`), then
    /// vote on pending peers, all off the training thread.
    fn launch_async(
        &mut self,
        state: Option<OuterState>,
        mut delta: Vec<Vec<f32>>,
        tag_base: usize,
    ) {
        let comm = self.comm.clone();
        let cfg = self.cfg;
        let specs = self.specs.clone();
        let spawned = std::thread::Builder::new()
            .name("pccl-diloco-async".into())
            .spawn(move || {
                let t = Instant::now();
                let mut state = state;
                let sync = match state.as_mut() {
                    Some(st) => sync_state(&comm, &specs, st).map(Some),
                    None => Ok(None),
                };
                let (reduce, pending) = if sync.is_ok() {
                    let (info, r) = reduce_now(&comm, &mut delta, tag_base, &cfg);
                    let pending = if r.is_ok() {
                        comm.are_peers_pending()
                    } else {
                        Ok(false)
                    };
                    (r.map(|_| info), pending)
                } else {
                    (Ok(ReduceInfo::default()), Ok(false))
                };
                AsyncOutcome {
                    state,
                    sync,
                    bufs: delta,
                    reduce,
                    pending,
                    took: t.elapsed(),
                }
            });
        match spawned {
            Ok(h) => self.async_task = Some(h),
            Err(e) => {
                // Without a thread the step cannot run in the background:
                // report it at the next event, as a failed reduce.
                tracing::error!(peer = %self.comm.peer_id(), "DiLoCo: cannot start the background task: {e}");
            }
        }
    }

    /// The outer parameters after an outer step with `own` on a copy of
    /// the momentum: this peer's eager starting point.
    fn eager_start(&self, own: &[Vec<f32>]) -> Vec<Vec<f32>> {
        self.outer
            .iter()
            .zip(&self.momentum)
            .zip(own)
            .map(|((o, m), g)| {
                let (mut o, mut m) = (o.clone(), m.clone());
                outer::outer_sgd_step(
                    &mut o,
                    &mut m,
                    g,
                    self.cfg.outer_lr,
                    self.cfg.outer_momentum,
                    self.cfg.nesterov,
                );
                o
            })
            .collect()
    }

    fn streaming_event(
        &mut self,
        params: &mut [ParamMut<'_>],
        rep: &mut OuterReport,
    ) -> std::result::Result<(), (Error, bool)> {
        let Mode::Streaming {
            fragments,
            delay,
            alpha,
        } = self.cfg.mode
        else {
            return Ok(());
        };
        let s = self.inner_step();
        if let Some(inf) = self.inflight.take_if(|f| s >= f.launched_at + delay) {
            let (g, pending) = self.take_background(rep)?;
            let range = self.fragments[inf.fragment].clone();
            self.apply(range.clone(), &g);
            rep.applied = true;
            rep.fragment = Some(inf.fragment);
            if pending {
                // Nothing is in flight now: admit, and sync so the newcomer
                // receives the state.
                self.update_topology(rep);
                self.sync(rep).map_err(|e| (e, true))?;
                self.needs_sync = false;
            } else {
                // Synced in the background at the next launch.
                self.needs_sync = true;
            }
            for i in range {
                params[i].lerp_to(&self.outer[i], alpha);
            }
        }
        if let Some(f) = outer::launching_fragment(s, fragments, self.cfg.sync_every) {
            let range = self.fragments[f].clone();
            let mut delta = Self::pseudo_gradients(params, &self.outer, range.clone());
            let residual = self.error_feedback(&mut delta, range.clone());
            if delay == 0 {
                if std::mem::take(&mut self.needs_sync) {
                    self.sync(rep).map_err(|e| (e, true))?;
                }
                let t = Instant::now();
                let (info, r) = reduce_now(&self.comm, &mut delta, range.start, &self.cfg);
                r.map_err(|e| (e, false))?;
                note(rep, &info, t.elapsed(), t.elapsed());
                self.commit_residual(residual, range);
                self.complete_fragment(f, &delta, params, alpha, rep)?;
            } else {
                self.commit_residual(residual, range.clone());
                let state = std::mem::take(&mut self.needs_sync).then(|| self.snapshot());
                self.launch_async(state, delta, range.start);
                self.inflight = Some(InFlight {
                    fragment: f,
                    launched_at: s,
                });
            }
        }
        Ok(())
    }

    fn complete_fragment(
        &mut self,
        f: usize,
        g: &[Vec<f32>],
        params: &mut [ParamMut<'_>],
        alpha: f32,
        rep: &mut OuterReport,
    ) -> std::result::Result<(), (Error, bool)> {
        let range = self.fragments[f].clone();
        self.apply(range.clone(), g);
        rep.applied = true;
        rep.fragment = Some(f);
        self.admit_and_sync(rep).map_err(|e| (e, true))?;
        for i in range {
            params[i].lerp_to(&self.outer[i], alpha);
        }
        Ok(())
    }

    // ---- pieces -------------------------------------------------------

    /// The pseudo-gradients of the tensors in `range`, measured from `base`
    /// (indexed like the parameters: the outer state, or async's starts).
    fn pseudo_gradients(
        params: &[ParamMut<'_>],
        base: &[Vec<f32>],
        range: std::ops::Range<usize>,
    ) -> Vec<Vec<f32>> {
        range
            .map(|i| {
                let mut d = vec![0.0f32; base[i].len()];
                params[i].pseudo_gradient(&base[i], &mut d);
                d
            })
            .collect()
    }

    /// A copy of the outer state for a background sync.
    fn snapshot(&self) -> OuterState {
        OuterState {
            outer: self.outer.clone(),
            momentum: self.momentum.clone(),
            meta: self.meta,
            revision: self.revision,
        }
    }

    /// Adds the residuals to `delta` and returns the new residuals (what
    /// quantizing the corrected delta loses), to keep once it is sent.
    fn error_feedback(
        &self,
        delta: &mut [Vec<f32>],
        range: std::ops::Range<usize>,
    ) -> Option<Vec<Vec<f32>>> {
        let q = self.cfg.quant().filter(|_| self.cfg.error_feedback)?;
        let mut out = Vec::with_capacity(delta.len());
        for (d, i) in delta.iter_mut().zip(range) {
            for (x, r) in d.iter_mut().zip(&self.residual[i]) {
                *x += r;
            }
            let mut round_trip = d.clone();
            let mut enc = vec![
                0u8;
                crate::quant::encoded_len(
                    DataType::F32,
                    q.quantized_datatype,
                    q.algorithm,
                    d.len()
                )
            ];
            let res = if crate::quant::quantize_adopt(
                DataType::F32,
                q.quantized_datatype,
                q.algorithm,
                f32_bytes_mut(&mut round_trip),
                &mut enc,
            )
            .is_ok()
            {
                d.iter().zip(&round_trip).map(|(a, b)| a - b).collect()
            } else {
                vec![0.0; d.len()]
            };
            out.push(res);
        }
        Some(out)
    }

    fn commit_residual(&mut self, residual: Option<Vec<Vec<f32>>>, range: std::ops::Range<usize>) {
        if let Some(res) = residual {
            for (r, i) in res.into_iter().zip(range) {
                self.residual[i] = r;
            }
        }
    }

    fn apply(&mut self, range: std::ops::Range<usize>, g: &[Vec<f32>]) {
        for (i, gi) in range.zip(g) {
            outer::outer_sgd_step(
                &mut self.outer[i],
                &mut self.momentum[i],
                gi,
                self.cfg.outer_lr,
                self.cfg.outer_momentum,
                self.cfg.nesterov,
            );
        }
        self.meta[META_OUTER_STEP] += 1;
    }

    fn update_topology(&mut self, rep: &mut OuterReport) {
        let t = Instant::now();
        if let Err(e) = self.comm.update_topology() {
            // Fails on every peer alike; the sync that follows is still common.
            tracing::warn!(peer = %self.comm.peer_id(), "DiLoCo: update topology failed: {e}");
        }
        rep.exposed_time += t.elapsed();
    }

    fn admit_and_sync(&mut self, rep: &mut OuterReport) -> Result<()> {
        let t = Instant::now();
        let pending = self.comm.are_peers_pending()?;
        rep.exposed_time += t.elapsed();
        if pending {
            self.update_topology(rep);
        }
        self.sync(rep)
    }

    /// One shared-state sync of the outer state (revision + 1). A session's
    /// first sync receives the group's state (founding peers, who find none,
    /// elect one of theirs); then the configuration is compared.
    fn sync(&mut self, rep: &mut OuterReport) -> Result<()> {
        let t = Instant::now();
        let mut st = OuterState {
            outer: std::mem::take(&mut self.outer),
            momentum: std::mem::take(&mut self.momentum),
            meta: self.meta,
            revision: self.revision,
        };
        let r = sync_state(&self.comm, &self.specs, &mut st);
        self.outer = st.outer;
        self.momentum = st.momentum;
        self.meta = st.meta;
        self.revision = st.revision;
        rep.exposed_time += t.elapsed();
        let info = r?;
        rep.tx_bytes += info.tx_bytes;
        rep.rx_bytes += info.rx_bytes;
        Ok(())
    }

    /// A session's start: the first sync (the peers that admitted us sync
    /// right after admitting), the founding wait for `min_world`, and the
    /// reset of the model to the outer parameters.
    fn join(&mut self, params: &mut [ParamMut<'_>], rep: &mut OuterReport) -> Result<()> {
        self.needs_sync = false;
        self.sync(rep)?;
        let mut announced = Instant::now() - Duration::from_secs(60);
        while self.inner_step() == 0 && self.comm.world()?.group_world < self.cfg.min_world {
            if announced.elapsed() >= Duration::from_secs(5) {
                tracing::warn!(
                    peer = %self.comm.peer_id(),
                    "DiLoCo: waiting for {} peers before the first step (have {})",
                    self.cfg.min_world,
                    self.comm.world()?.group_world
                );
                announced = Instant::now();
            }
            if self.comm.are_peers_pending()? {
                self.update_topology(rep);
                self.sync(rep)?;
            } else {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        for (p, o) in params.iter_mut().zip(&self.outer) {
            p.reset_to(o);
        }
        if self.cfg.mode == Mode::Async {
            self.start = self.outer.clone();
        }
        tracing::info!(
            peer = %self.comm.peer_id(),
            world = self.comm.world()?.group_world,
            inner_step = self.inner_step(),
            outer_step = self.outer_step(),
            "DiLoCo: joined"
        );
        Ok(())
    }

    /// Drops the communicator and joins the group again as a newcomer.
    fn rejoin(&mut self, params: &mut [ParamMut<'_>], rep: &mut OuterReport) -> Result<()> {
        self.inflight = None;
        if let Some(t) = self.async_task.take() {
            let _ = join_async(t);
        }
        self.rejoins += 1;
        let old = std::mem::replace(&mut self.comm, Arc::new(connect_comm(&self.comm_cfg)?));
        drop(old);
        rep.rejoined = true;
        self.revision = None;
        for r in &mut self.residual {
            r.iter_mut().for_each(|x| *x = 0.0);
        }
        self.join(params, rep)
    }

    fn check_same_params(&self, params: &[ParamMut<'_>]) -> Result<()> {
        if params.len() != self.specs.len() {
            return Err(Error::InvalidArgument(format!(
                "{} parameter tensors given, {} registered",
                params.len(),
                self.specs.len()
            )));
        }
        for (p, s) in params.iter().zip(&self.specs) {
            if p.len() != s.len || p.dtype() != s.dtype {
                return Err(Error::InvalidArgument(format!(
                    "parameter '{}' is {} × {} but was registered as {} × {}",
                    s.name,
                    p.len(),
                    p.dtype().name(),
                    s.len,
                    s.dtype.name()
                )));
            }
        }
        Ok(())
    }
}

impl Drop for DiLoCo {
    fn drop(&mut self) {
        self.inflight = None;
        if let Some(t) = self.async_task.take() {
            let _ = join_async(t);
        }
    }
}

fn check_params(names: &[&str], params: &[ParamMut<'_>]) -> Result<Vec<ParamSpec>> {
    if names.len() != params.len() {
        return Err(Error::InvalidArgument(format!(
            "{} names for {} parameter tensors",
            names.len(),
            params.len()
        )));
    }
    if params.is_empty() {
        return Err(Error::InvalidArgument("no parameters to train".into()));
    }
    let mut seen = std::collections::HashSet::new();
    let mut specs = Vec::with_capacity(params.len());
    for (n, p) in names.iter().zip(params) {
        if n.is_empty() || !seen.insert(*n) {
            return Err(Error::InvalidArgument(format!(
                "parameter name '{n}' is empty or appears twice"
            )));
        }
        if p.is_empty() {
            return Err(Error::InvalidArgument(format!("parameter '{n}' is empty")));
        }
        specs.push(ParamSpec {
            name: (*n).to_owned(),
            dtype: p.dtype(),
            len: p.len(),
        });
    }
    Ok(specs)
}

/// The part of the driver that travels in the shared state.
struct OuterState {
    outer: Vec<Vec<f32>>,
    momentum: Vec<Vec<f32>>,
    meta: [u64; META_LEN],
    /// Revision of the session's last successful sync (`None`: none yet).
    revision: Option<u64>,
}

/// Syncs `st` with the group (revision + 1; a session's first sync
/// receives, falling back to an election among founding peers), then
/// checks that the group's configuration is this peer's.
fn sync_state(
    comm: &Communicator,
    specs: &[ParamSpec],
    st: &mut OuterState,
) -> Result<crate::SyncInfo> {
    let first = st.revision.is_none();
    let ours = st.meta;
    let mut meta = st.meta;
    let (info, revision) = {
        let mut tensors = Vec::with_capacity(2 * specs.len() + 1);
        for ((o, m), spec) in st.outer.iter_mut().zip(st.momentum.iter_mut()).zip(specs) {
            tensors.push(SharedTensor::new(
                format!("diloco.outer.{}", spec.name),
                o.as_mut_slice(),
            ));
            tensors.push(SharedTensor::new(
                format!("diloco.momentum.{}", spec.name),
                m.as_mut_slice(),
            ));
        }
        tensors.push(SharedTensor::new("diloco.meta", &mut meta[..]));
        let mut shared = SharedState::new(st.revision.map_or(0, |r| r + 1), tensors);
        let strategy = if first {
            SyncStrategy::ReceiveOnly
        } else {
            SyncStrategy::EnforcePopular
        };
        let info = match comm.sync_shared_state(&mut shared, strategy) {
            Err(Error::NoSharedStateAvailable(_)) if first => {
                comm.sync_shared_state(&mut shared, SyncStrategy::EnforcePopular)
            }
            r => r,
        }?;
        (info, shared.revision)
    };
    st.meta = meta;
    st.revision = Some(revision);
    if let Some(msg) = outer::config_mismatch(&ours, &meta) {
        return Err(Error::InvalidArgument(format!(
            "DiLoCo configuration differs from the group's: {msg}"
        )));
    }
    Ok(info)
}

fn connect_comm(cfg: &CommunicatorConfig) -> Result<Communicator> {
    let comm = Communicator::new(cfg.clone())?;
    comm.connect()?;
    Ok(comm)
}

/// Averages `bufs` in place across the group (tags `tag_base + i`); alone,
/// the average is the peer's own. Returns the info, and the outcome.
fn reduce_now(
    comm: &Communicator,
    bufs: &mut [Vec<f32>],
    tag_base: usize,
    cfg: &DiLoCoConfig,
) -> (ReduceInfo, Result<()>) {
    let alone = ReduceInfo {
        local_world_size: 1,
        ..ReduceInfo::default()
    };
    match comm.world() {
        Ok(w) if w.group_world < 2 => return (alone, Ok(())),
        Ok(_) => {}
        Err(e) => return (alone, Err(e)),
    }
    let quant = cfg.quant();
    let mut ops: Vec<ReduceBuffers<'_>> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, b)| {
            let op =
                ReduceBuffers::in_place(b.as_mut_slice(), ReduceOp::Avg, (tag_base + i) as u64);
            match quant {
                Some(q) => op.with_quantization(q),
                None => op,
            }
        })
        .collect();
    match comm.all_reduce_multiple_with_retry(&mut ops, cfg.max_in_flight) {
        Ok(info) => (info, Ok(())),
        // Everybody else left: what this peer holds (its own pseudo-gradient,
        // or the group's average for tensors that completed) is the average.
        Err(Error::TooFewPeers(_)) => (alone, Ok(())),
        Err(e) => (alone, Err(e)),
    }
}

/// Tag of between-steps all-reduces: far from the outer steps' tags (the
/// parameter indices), and one at a time, so it can be reused.
const SIDE_TAG: u64 = 1 << 62;

/// What a between-steps all-reduce did.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SideReduceInfo {
    /// Peers whose buffers were reduced (1: alone, `data` unchanged).
    pub world: u32,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    /// Wall time of the call (retries included).
    pub took: Duration,
}

/// A between-steps all-reduce running on a background thread.
pub struct SideReduce<T> {
    join: std::thread::JoinHandle<(Vec<T>, Result<SideReduceInfo>)>,
}

impl<T> SideReduce<T> {
    /// Waits for the all-reduce; gives the buffer back with the outcome.
    pub fn wait(self) -> (Vec<T>, Result<SideReduceInfo>) {
        match self.join.join() {
            Ok(r) => r,
            Err(_) => (
                Vec::new(),
                Err(Error::Internal(
                    "the between-steps all-reduce thread panicked".into(),
                )),
            ),
        }
    }

    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }
}

fn side_reduce<T: crate::Element>(
    comm: &Communicator,
    data: &mut [T],
    op: ReduceOp,
) -> Result<SideReduceInfo> {
    let started = Instant::now();
    let alone = |started: Instant| SideReduceInfo {
        world: 1,
        took: started.elapsed(),
        ..SideReduceInfo::default()
    };
    if comm.world()?.group_world < 2 || data.is_empty() {
        return Ok(alone(started));
    }
    let original = data.to_vec();
    let r = {
        let mut ops = [ReduceBuffers::new(&original, data, op, SIDE_TAG)];
        comm.all_reduce_multiple_with_retry(&mut ops, 1)
    };
    match r {
        Ok(info) => Ok(SideReduceInfo {
            world: info.local_world_size.max(1),
            tx_bytes: info.tx_bytes,
            rx_bytes: info.rx_bytes,
            took: started.elapsed(),
        }),
        Err(e) => {
            // Everybody else left (TooFewPeers) or the op failed: this peer's
            // own values are the answer, or the error is.
            data.copy_from_slice(&original);
            match e {
                Error::TooFewPeers(_) => Ok(alone(started)),
                e => Err(e),
            }
        }
    }
}

fn note(rep: &mut OuterReport, info: &ReduceInfo, comm: Duration, exposed: Duration) {
    rep.world = info.local_world_size.max(1);
    rep.tx_bytes += info.tx_bytes;
    rep.rx_bytes += info.rx_bytes;
    rep.comm_time += comm;
    rep.exposed_time += exposed;
}

fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8; the
    // length is the slice's size in bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn f32_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above; every byte pattern written is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}
