//! One peer of the swarm: trains its copy of the MoE model on its own
//! domain-skewed stream, balances experts (micro, or global through a
//! between-steps all-reduce of the expert counts), and runs DiLoCo outer
//! steps through `pccl_core::diloco`. It reports what it does as
//! [`Event`]s: JSON lines on stdout for the local driver, or readable lines
//! when it runs on its own (`--master`).
//!
//! May import: pccl-core's public API, and the crate's data, model and
//! balance modules.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use candle_core::Device;
use candle_nn::Optimizer;
use pccl_core::diloco::{DiLoCo, DiLoCoConfig, Mode, OuterReport, ParamMut};
use pccl_core::{CommunicatorConfig, DataType, QuantizationAlgorithm, QuantizationOptions};
use serde_json::json;

use crate::balance::{self, Balance, GlobalCounts, LblSync};
use crate::data::{self, Corpus, Sampler, DOMAINS};
use crate::model::{self, ModelConfig, Params};

/// Outer-step mode of the swarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum OuterMode {
    #[default]
    Sync,
    Async,
    /// No communication at all: every peer trains alone (the baseline for
    /// step-time comparisons; there is no shared model).
    None,
}

/// Wire format of the pseudo-gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Quant {
    #[default]
    Fp32,
    U8,
}

/// Everything a peer needs; every peer of a swarm must agree on all but
/// `peer_index`, `home_domain`, `bind_ip` and `min_world` (DiLoCo checks
/// its part at every sync).
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub master: SocketAddr,
    pub bind_ip: std::net::IpAddr,
    pub peer_index: usize,
    pub home_domain: usize,
    pub domain_skew: f64,
    pub data_seed: u64,
    pub model_seed: u64,
    pub model: ModelConfig,
    pub batch: usize,
    pub inner_steps: u64,
    pub sync_every: u64,
    pub inner_lr: f64,
    pub outer_lr: f32,
    pub outer_momentum: f32,
    pub mode: OuterMode,
    pub quant: Quant,
    pub lbl: Balance,
    pub lbl_weight: f64,
    pub lbl_sync: LblSync,
    pub min_world: u32,
    pub val_seqs: usize,
    pub train_tokens: usize,
    pub val_tokens: usize,
    /// Sleep this long after each inner step (a slower machine; 0: none).
    pub step_delay: Duration,
    /// Leave the swarm gracefully after this inner step (`None`: stay).
    pub leave_after: Option<u64>,
}

impl PeerConfig {
    /// Checks everything that can be checked before connecting.
    pub fn validate(&self) -> Result<(), String> {
        self.model.validate()?;
        if self.model.vocab < data::Vocab::size() {
            return Err(format!(
                "vocab {} is smaller than the corpus vocabulary {}",
                self.model.vocab,
                data::Vocab::size()
            ));
        }
        if self.home_domain >= DOMAINS.len() {
            return Err(format!(
                "--home-domain {} is out of range (0..{})",
                self.home_domain,
                DOMAINS.len()
            ));
        }
        if !(0.0..=1.0).contains(&self.domain_skew) {
            return Err(format!(
                "--domain-skew must be in [0, 1], got {}",
                self.domain_skew
            ));
        }
        if self.batch == 0 {
            return Err("--batch must be at least 1".into());
        }
        if self.sync_every == 0 {
            return Err("--sync-every must be at least 1".into());
        }
        if self.inner_steps == 0 || !self.inner_steps.is_multiple_of(self.sync_every) {
            return Err(format!(
                "--inner-steps ({}) must be a positive multiple of --sync-every ({})",
                self.inner_steps, self.sync_every
            ));
        }
        if !(self.lbl_weight >= 0.0 && self.lbl_weight.is_finite()) {
            return Err(format!(
                "--lbl-weight must be finite and >= 0, got {}",
                self.lbl_weight
            ));
        }
        if !(self.inner_lr > 0.0 && self.inner_lr.is_finite()) {
            return Err(format!("--inner-lr must be > 0, got {}", self.inner_lr));
        }
        if self.val_seqs == 0 {
            return Err("--val-seqs must be at least 1".into());
        }
        for (what, tokens) in [
            ("--train-tokens", self.train_tokens),
            ("--val-tokens", self.val_tokens),
        ] {
            if tokens <= self.model.seq_len {
                return Err(format!(
                    "{what} ({tokens}) is fewer tokens than the sequence length + 1 ({})",
                    self.model.seq_len + 1
                ));
            }
        }
        self.diloco().validate().map_err(|e| e.to_string())?;
        Ok(())
    }

    pub fn diloco(&self) -> DiLoCoConfig {
        DiLoCoConfig {
            mode: match self.mode {
                OuterMode::Sync | OuterMode::None => Mode::Sync,
                OuterMode::Async => Mode::Async,
            },
            sync_every: self.sync_every,
            outer_lr: self.outer_lr,
            outer_momentum: self.outer_momentum,
            nesterov: true,
            quantization: match self.quant {
                Quant::Fp32 => None,
                Quant::U8 => Some(QuantizationOptions {
                    quantized_datatype: DataType::U8,
                    algorithm: QuantizationAlgorithm::MinMax,
                }),
            },
            error_feedback: self.quant == Quant::U8,
            min_world: self.min_world,
            ..DiLoCoConfig::default()
        }
    }
}

/// Where a peer's reports go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// `MOE {json}` lines on stdout (the local driver parses them).
    Json,
    /// Readable lines (a peer run on its own).
    Human,
}

/// Prefix of every JSON report line.
pub const EVENT_PREFIX: &str = "MOE ";

fn emit(out: Output, v: serde_json::Value, human: impl FnOnce() -> String) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let _ = match out {
        Output::Json => writeln!(o, "{EVENT_PREFIX}{v}"),
        Output::Human => writeln!(o, "{}", human()),
    };
    let _ = o.flush();
}

/// The outer loop: the swarm's DiLoCo driver, or nothing (`--mode none`).
enum Outer {
    Swarm(Box<DiLoCo>),
    Alone { inner: u64, sync_every: u64 },
}

impl Outer {
    fn diloco(&self) -> Option<&DiLoCo> {
        match self {
            Outer::Swarm(d) => Some(d),
            Outer::Alone { .. } => None,
        }
    }

    fn inner_step(&self) -> u64 {
        match self {
            Outer::Swarm(d) => d.inner_step(),
            Outer::Alone { inner, .. } => *inner,
        }
    }

    fn outer_step(&self) -> u64 {
        match self {
            Outer::Swarm(d) => d.outer_step(),
            Outer::Alone { inner, sync_every } => inner / sync_every,
        }
    }

    fn world(&self) -> u32 {
        self.diloco()
            .and_then(|d| d.communicator().world().ok())
            .map_or(1, |w| w.group_world)
    }

    /// Hash of the shared state (alone: of this peer's own parameters).
    fn state_hash(&self, local: &[Vec<f32>]) -> u64 {
        match self {
            Outer::Swarm(d) => d.state_hash(),
            Outer::Alone { .. } => {
                let bytes: Vec<Vec<u8>> = local
                    .iter()
                    .map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect())
                    .collect();
                let slices: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
                let total = slices.iter().map(|s| s.len() as u64).sum();
                pccl_core::hash::root_hash(&pccl_core::hash::tensor_hashes(&slices), total)
            }
        }
    }

    /// The model validation runs on: the outer parameters (alone: own).
    fn outer_params<'a>(&'a self, local: &'a [Vec<f32>]) -> &'a [Vec<f32>] {
        match self {
            Outer::Swarm(d) => d.outer_params(),
            Outer::Alone { .. } => local,
        }
    }

    fn step(&mut self, values: &mut [Vec<f32>]) -> pccl_core::Result<Option<OuterReport>> {
        match self {
            Outer::Swarm(d) => {
                let mut views: Vec<ParamMut<'_>> =
                    values.iter_mut().map(|v| v.as_mut_slice().into()).collect();
                d.step(&mut views)
            }
            Outer::Alone { inner, sync_every } => {
                *inner += 1;
                Ok(inner.is_multiple_of(*sync_every).then(|| OuterReport {
                    outer_step: *inner / *sync_every,
                    inner_step: *inner,
                    world: 1,
                    applied: true,
                    ..OuterReport::default()
                }))
            }
        }
    }
}

/// Runs one peer to the end of the schedule (or an error).
pub fn run(cfg: &PeerConfig, out: Output) -> Result<(), String> {
    cfg.validate()?;
    let device = device()?;
    let corpus = Corpus::generate(cfg.data_seed, cfg.train_tokens, cfg.val_tokens);
    let mut sampler = Sampler::new(
        &corpus,
        cfg.home_domain,
        cfg.domain_skew,
        cfg.batch,
        cfg.model.seq_len,
        cfg.data_seed ^ (0x9e37_79b9 * (cfg.peer_index as u64 + 1)),
    )?;
    let val: Vec<Vec<data::Batch>> = (0..DOMAINS.len())
        .map(|d| data::validation_batches(&corpus, d, cfg.batch, cfg.model.seq_len, cfg.val_seqs))
        .collect::<Result<_, _>>()?;
    let params = Params::init(&cfg.model, cfg.model_seed, &device).map_err(|e| e.to_string())?;
    let names: Vec<&str> = params.names.iter().map(String::as_str).collect();
    let mut values = params.to_vecs().map_err(|e| e.to_string())?;

    let mut comm_cfg = CommunicatorConfig::new(cfg.master).with_ephemeral_ports();
    comm_cfg.bind_ip = cfg.bind_ip;
    let t_connect = Instant::now();
    let mut diloco = if cfg.mode == OuterMode::None {
        Outer::Alone {
            inner: 0,
            sync_every: cfg.sync_every,
        }
    } else {
        let mut views: Vec<ParamMut<'_>> =
            values.iter_mut().map(|v| v.as_mut_slice().into()).collect();
        Outer::Swarm(Box::new(
            DiLoCo::connect(comm_cfg, &names, &mut views, cfg.diloco())
                .map_err(|e| format!("joining the swarm at {}: {e}", cfg.master))?,
        ))
    };
    params.set_from(&values).map_err(|e| e.to_string())?;
    let peer = diloco.diloco().map_or_else(
        || format!("alone{}", cfg.peer_index),
        |d| d.communicator().peer_id().to_string(),
    );
    let world = diloco.world();
    emit(
        out,
        json!({"ev": "joined", "peer": cfg.peer_index, "id": peer, "world": world,
               "inner_step": diloco.inner_step(), "outer_step": diloco.outer_step(),
               "hash": format!("{:016x}", diloco.state_hash(&values)),
               "wait_ms": t_connect.elapsed().as_millis() as u64,
               "params": cfg.model.param_count(), "home": DOMAINS[cfg.home_domain]}),
        || {
            format!(
                "peer {} joined: world {world}, inner step {}, outer step {}, {} parameters, home domain {}",
                cfg.peer_index,
                diloco.inner_step(),
                diloco.outer_step(),
                cfg.model.param_count(),
                DOMAINS[cfg.home_domain]
            )
        },
    );

    let mut opt = candle_nn::AdamW::new(
        params.vars.clone(),
        candle_nn::ParamsAdamW {
            lr: cfg.inner_lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let mut prev_global: Option<Vec<Vec<u32>>> = None;
    let mut tx_total = 0u64;
    let mut rx_total = 0u64;
    while diloco.inner_step() < cfg.inner_steps {
        let t_step = Instant::now();
        let step = diloco.inner_step() + 1;
        let batch = sampler.next_batch(&corpus);
        let fwd = model::forward(
            &cfg.model,
            &params.tensors(),
            &batch.inputs,
            batch.batch,
            &device,
        )
        .map_err(|e| e.to_string())?;
        let local: Vec<Vec<u32>> = fwd.routing.iter().map(|r| r.counts.clone()).collect();
        // The global counts this step balances on, and how they were had.
        let mut side: Option<GlobalCounts> = None;
        let mut pending = None;
        let mut exposed = Duration::ZERO;
        let global_for_loss: Option<Vec<Vec<u32>>> = match (cfg.lbl, cfg.lbl_sync, diloco.diloco())
        {
            // Alone, the global counts are the local ones.
            (Balance::Global, _, None) => Some(local.clone()),
            (Balance::Global, LblSync::Fresh, Some(d)) => {
                let t = Instant::now();
                let g = balance::reduce_now(d, &local);
                exposed = t.elapsed();
                let counts = g.counts.clone();
                side = Some(g);
                Some(counts)
            }
            (Balance::Global, LblSync::Stale, Some(d)) => {
                pending = Some(balance::start(d, &local)?);
                Some(prev_global.clone().unwrap_or_else(|| local.clone()))
            }
            _ => None,
        };
        let ce = model::lm_loss(&fwd.logits, &batch.targets).map_err(|e| e.to_string())?;
        let fractions = model::balance_fractions(cfg.lbl, &local, global_for_loss.as_deref());
        let (loss, lbl_value) = match &fractions {
            Some(f) => {
                let lbl =
                    model::balance_loss(&fwd.routing, f, &device).map_err(|e| e.to_string())?;
                let v = lbl.to_scalar::<f32>().map_err(|e| e.to_string())?;
                let total = (&ce + (lbl * cfg.lbl_weight).map_err(|e| e.to_string())?)
                    .map_err(|e| e.to_string())?;
                (total, Some(v))
            }
            None => (ce.clone(), None),
        };
        opt.backward_step(&loss).map_err(|e| e.to_string())?;
        let ce_value = ce.to_scalar::<f32>().map_err(|e| e.to_string())?;
        if !ce_value.is_finite() {
            return Err(format!(
                "the training loss diverged at step {step}: {ce_value}"
            ));
        }
        if let Some(p) = pending.take() {
            let t = Instant::now();
            let g = p.wait();
            exposed = t.elapsed();
            if g.info.is_ok() {
                prev_global = Some(g.counts.clone());
            }
            side = Some(g);
        }
        let (side_world, side_ms, side_err) = match &side {
            Some(g) => match &g.info {
                Ok(i) => {
                    tx_total += i.tx_bytes;
                    rx_total += i.rx_bytes;
                    (i.world, i.took.as_secs_f64() * 1e3, None)
                }
                Err(e) => (1, 0.0, Some(e.clone())),
            },
            None => (0, 0.0, None),
        };
        if let Some(e) = &side_err {
            tracing::warn!(peer = %peer, "step {step}: the expert-count all-reduce failed ({e}); balancing on local counts");
        }

        values = params.to_vecs().map_err(|e| e.to_string())?;
        let report = diloco
            .step(&mut values)
            .map_err(|e| format!("outer step at inner step {step}: {e}"))?;
        if report.is_some() {
            params.set_from(&values).map_err(|e| e.to_string())?;
        }
        if !cfg.step_delay.is_zero() {
            std::thread::sleep(cfg.step_delay);
        }
        let step_ms = t_step.elapsed().as_secs_f64() * 1e3;
        let world = diloco.world();
        let hidden = cfg.lbl_sync == LblSync::Stale && side.is_some();
        emit(
            out,
            json!({"ev": "step", "peer": cfg.peer_index, "step": step, "world": world,
                   "loss": ce_value, "lbl": lbl_value, "local": local,
                   "global": side.as_ref().filter(|g| g.info.is_ok()).map(|g| &g.counts),
                   "count_world": side_world, "side_ms": side_ms,
                   "exposed_ms": exposed.as_secs_f64() * 1e3, "hidden": hidden,
                   "side_error": side_err, "tx": tx_total, "rx": rx_total, "step_ms": step_ms}),
            || {
                format!(
                    "step {step:>4}  world {world}  loss {ce_value:.4}  lbl {}  sent {}  step {step_ms:.0} ms  counts {}",
                    lbl_value.map_or("-".into(), |v| format!("{v:.4}")),
                    human_bytes(tx_total),
                    match &side {
                        None => "local".to_string(),
                        Some(_) if side_err.is_some() => "local (all-reduce failed)".into(),
                        Some(_) => format!(
                            "{} ms over {side_world} peers, {}",
                            format_args!("{side_ms:.1}"),
                            if hidden { "hidden" } else { "exposed" }
                        ),
                    }
                )
            },
        );
        if let Some(rep) = report {
            tx_total += rep.tx_bytes;
            rx_total += rep.rx_bytes;
            let outer_tensors =
                model::tensors_from(&params.shapes, diloco.outer_params(&values), &device)
                    .map_err(|e| e.to_string())?;
            let val_loss: Vec<f32> = val
                .iter()
                .map(|batches| evaluate(&cfg.model, &outer_tensors, batches, &device))
                .collect::<Result<_, _>>()?;
            let hash = format!("{:016x}", diloco.state_hash(&values));
            emit(
                out,
                json!({"ev": "outer", "peer": cfg.peer_index, "outer_step": rep.outer_step,
                       "inner_step": rep.inner_step, "world": rep.world, "hash": hash,
                       "applied": rep.applied, "rejoined": rep.rejoined,
                       "tx": tx_total, "rx": rx_total,
                       "comm_ms": rep.comm_time.as_secs_f64() * 1e3,
                       "exposed_ms": rep.exposed_time.as_secs_f64() * 1e3,
                       "val": val_loss}),
                || {
                    format!(
                        "outer step {} over {} peers: state {hash}, comm {:.0} ms ({:.0} ms exposed), validation {}",
                        rep.outer_step,
                        rep.world,
                        rep.comm_time.as_secs_f64() * 1e3,
                        rep.exposed_time.as_secs_f64() * 1e3,
                        DOMAINS
                            .iter()
                            .zip(&val_loss)
                            .map(|(d, l)| format!("{d} {l:.3}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                },
            );
        }
        if cfg.leave_after == Some(step) {
            let hash = format!("{:016x}", diloco.state_hash(&values));
            emit(
                out,
                json!({"ev": "left", "peer": cfg.peer_index, "step": step, "hash": hash,
                       "tx": tx_total, "rx": rx_total}),
                || format!("peer {} leaves the swarm after step {step}", cfg.peer_index),
            );
            if let Outer::Swarm(d) = diloco {
                d.close();
            }
            return Ok(());
        }
    }
    // Expert selections of the final outer model on each domain's validation data.
    let outer_tensors = model::tensors_from(&params.shapes, diloco.outer_params(&values), &device)
        .map_err(|e| e.to_string())?;
    let spec = selections(&cfg.model, &outer_tensors, &val, &device)?;
    let hash = format!("{:016x}", diloco.state_hash(&values));
    emit(
        out,
        json!({"ev": "done", "peer": cfg.peer_index, "hash": hash,
               "inner_step": diloco.inner_step(), "outer_step": diloco.outer_step(),
               "rejoins": diloco.diloco().map_or(0, DiLoCo::rejoins), "tx": tx_total, "rx": rx_total, "spec": spec}),
        || {
            let mut s = format!(
                "peer {} done at outer step {}: state {hash}, sent {}\n",
                cfg.peer_index,
                diloco.outer_step(),
                human_bytes(tx_total)
            );
            for (l, counts) in spec.iter().enumerate() {
                s.push_str(&crate::stats::specialization_table(
                    &format!("layer {l}: expert selection frequency per domain"),
                    &DOMAINS,
                    counts,
                ));
            }
            s
        },
    );
    if let Outer::Swarm(d) = diloco {
        d.close();
    }
    Ok(())
}

/// Mean next-token loss over `batches`.
pub fn evaluate(
    cfg: &ModelConfig,
    params: &[candle_core::Tensor],
    batches: &[data::Batch],
    device: &Device,
) -> Result<f32, String> {
    let mut sum = 0f64;
    let mut tokens = 0usize;
    for b in batches {
        let f =
            model::forward(cfg, params, &b.inputs, b.batch, device).map_err(|e| e.to_string())?;
        let l = model::lm_loss(&f.logits, &b.targets)
            .and_then(|l| l.to_scalar::<f32>())
            .map_err(|e| e.to_string())?;
        sum += l as f64 * b.targets.len() as f64;
        tokens += b.targets.len();
    }
    Ok((sum / tokens.max(1) as f64) as f32)
}

/// Token-slot selection counts, layer × domain × expert, of the model on
/// each domain's batches.
pub fn selections(
    cfg: &ModelConfig,
    params: &[candle_core::Tensor],
    per_domain: &[Vec<data::Batch>],
    device: &Device,
) -> Result<Vec<Vec<Vec<u64>>>, String> {
    let mut spec = vec![vec![vec![0u64; cfg.n_experts]; per_domain.len()]; cfg.n_layers];
    for (d, batches) in per_domain.iter().enumerate() {
        for b in batches {
            let f = model::forward(cfg, params, &b.inputs, b.batch, device)
                .map_err(|e| e.to_string())?;
            for (l, r) in f.routing.iter().enumerate() {
                for (e, &c) in r.counts.iter().enumerate() {
                    spec[l][d][e] += c as u64;
                }
            }
        }
    }
    Ok(spec)
}

fn device() -> Result<Device, String> {
    #[cfg(feature = "cuda")]
    {
        if let Ok(d) = Device::new_cuda(0) {
            return Ok(d);
        }
        tracing::warn!("no CUDA device: training on the CPU");
    }
    Ok(Device::Cpu)
}

pub fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}
