//! The command line: one set of flags for the three ways to run the trainer
//! (compare, one local swarm, one peer of a remote swarm), and the
//! translation to a [`PeerConfig`] and back to a child's arguments.
//!
//! May import: the crate's peer, model and balance modules.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::balance::{Balance, LblSync};
use crate::model::ModelConfig;
use crate::peer::{OuterMode, PeerConfig, Quant};

/// A mixture-of-experts language model trained by a churning PCCL-rs swarm,
/// with global-batch load balancing and DiLoCo outer steps.
///
/// With no arguments: an embedded master and local peers train twice, with
/// global and with micro-batch balancing, a peer killed and one restarted
/// in each run, then a side-by-side summary, a PNG and a JSON file.
#[derive(Parser, Debug, Clone)]
#[command(name = "moe-trainer", version)]
pub struct Cli {
    /// Join the swarm of this master as one peer (other machines).
    #[arg(long)]
    pub master: Option<SocketAddr>,
    /// Start an embedded master and this many local peer processes (one run,
    /// balanced as --lbl); without it (and without --master) the trainer
    /// compares global against micro balancing.
    #[arg(long)]
    pub peers: Option<usize>,
    /// With --peers: run global and micro back to back anyway.
    #[arg(long)]
    pub compare: bool,

    /// Load balancing: global (counts all-reduced across peers), micro, none.
    #[arg(long, value_enum, default_value_t = Balance::Global)]
    pub lbl: Balance,
    /// Weight of the load-balancing loss.
    #[arg(long, default_value_t = 0.05)]
    pub lbl_weight: f64,
    /// Global counts of this step (fresh: latency exposed) or of the
    /// previous one (stale: the all-reduce runs behind the backward pass).
    #[arg(long, value_enum, default_value_t = LblSync::Fresh)]
    pub lbl_sync: LblSync,

    /// DiLoCo outer steps: sync, or async (one-step delayed, hidden).
    #[arg(long, value_enum, default_value_t = OuterMode::Sync)]
    pub mode: OuterMode,
    /// Pseudo-gradients on the wire: fp32, or u8 (min-max, error feedback).
    #[arg(long, value_enum, default_value_t = Quant::Fp32)]
    pub quant: Quant,
    /// H: inner steps per outer step.
    #[arg(long, default_value_t = 20)]
    pub sync_every: u64,
    /// Inner steps of the whole run (a multiple of H).
    #[arg(long, default_value_t = 400)]
    pub inner_steps: u64,
    #[arg(long, default_value_t = 3e-3)]
    pub inner_lr: f64,
    /// Outer learning rate (default: 0.7 in sync mode, 0.4 in async mode,
    /// where the one-step delay overshoots at 0.7; see docs/moe-trainer.md).
    #[arg(long)]
    pub outer_lr: Option<f32>,
    #[arg(long, default_value_t = 0.9)]
    pub outer_momentum: f32,

    /// Experts per MoE layer (N_E).
    #[arg(long, default_value_t = 8)]
    pub experts: usize,
    /// Experts each token is routed to.
    #[arg(long, default_value_t = 2)]
    pub top_k: usize,
    /// Add an always-on shared expert to every MoE layer.
    #[arg(long)]
    pub shared_expert: bool,
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    #[arg(long, default_value_t = 64)]
    pub d_model: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long, default_value_t = 64)]
    pub expert_hidden: usize,
    #[arg(long, default_value_t = 64)]
    pub seq_len: usize,
    /// Sequences per inner step and peer.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,

    /// Probability that a training sequence comes from the peer's home
    /// domain (1/3: uniform).
    #[arg(long, default_value_t = 0.8)]
    pub domain_skew: f64,
    /// Home domain of this peer (with --master; local peers take index mod 3).
    #[arg(long)]
    pub home_domain: Option<usize>,
    /// Index of this peer (seeds its data stream; with --master).
    #[arg(long, default_value_t = 0)]
    pub peer_index: usize,
    /// Seed of the corpus and the model initialization.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value_t = 60_000)]
    pub train_tokens: usize,
    #[arg(long, default_value_t = 4_096)]
    pub val_tokens: usize,
    /// Validation sequences per domain.
    #[arg(long, default_value_t = 16)]
    pub val_seqs: usize,

    /// Local mode: SIGKILL peer --kill-peer once the swarm reaches this
    /// inner step (compare mode default: 40% of the run, mid outer step).
    #[arg(long)]
    pub kill_at: Option<u64>,
    #[arg(long, default_value_t = 1)]
    pub kill_peer: usize,
    /// Local mode: start a peer at this inner step (the killed one again,
    /// with the same index and domain, if it was killed; compare mode
    /// default: 60% of the run).
    #[arg(long)]
    pub join_at: Option<u64>,
    /// Local mode: peer --leave-peer leaves the swarm gracefully after this
    /// inner step (compare mode: none unless given).
    #[arg(long)]
    pub leave_at: Option<u64>,
    #[arg(long, default_value_t = 2)]
    pub leave_peer: usize,
    /// Peer mode: leave the swarm gracefully after this inner step.
    #[arg(long)]
    pub leave_after: Option<u64>,
    /// Local mode: no kill and no join.
    #[arg(long)]
    pub no_churn: bool,
    /// Wait for this many peers before the first inner step (--master mode;
    /// local peers wait for all founding peers).
    #[arg(long, default_value_t = 1)]
    pub min_world: u32,
    /// Address the peer's listeners bind.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_ip: IpAddr,
    /// Sleep after each inner step (emulates a slower machine).
    #[arg(long, default_value_t = 0)]
    pub step_delay_ms: u64,
    /// Where the JSON and the PNG go.
    #[arg(long, default_value = "target/moe-trainer")]
    pub out: PathBuf,
    /// Do not render the PNG.
    #[arg(long)]
    pub no_plot: bool,
    /// Give up a local run after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout_s: u64,
    /// Peer mode: report JSON lines (what the local driver reads).
    #[arg(long, hide = true)]
    pub json: bool,
}

impl Cli {
    pub fn model(&self) -> ModelConfig {
        ModelConfig {
            vocab: crate::data::Vocab::size(),
            seq_len: self.seq_len,
            d_model: self.d_model,
            n_heads: self.heads,
            n_layers: self.layers,
            n_experts: self.experts,
            top_k: self.top_k,
            expert_hidden: self.expert_hidden,
            shared_expert: self.shared_expert,
        }
    }

    /// The peer configuration these flags describe (`master` is a
    /// placeholder in local modes until the embedded master runs).
    pub fn peer_config(&self) -> PeerConfig {
        PeerConfig {
            master: self
                .master
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            bind_ip: self.bind_ip,
            peer_index: self.peer_index,
            home_domain: self
                .home_domain
                .unwrap_or(self.peer_index % crate::data::DOMAINS.len()),
            domain_skew: self.domain_skew,
            data_seed: self.seed,
            model_seed: self.seed.wrapping_add(1000),
            model: self.model(),
            batch: self.batch,
            inner_steps: self.inner_steps,
            sync_every: self.sync_every,
            inner_lr: self.inner_lr,
            outer_lr: self.outer_lr.unwrap_or(match self.mode {
                OuterMode::Async => 0.4,
                _ => 0.7,
            }),
            outer_momentum: self.outer_momentum,
            mode: self.mode,
            quant: self.quant,
            lbl: self.lbl,
            lbl_weight: self.lbl_weight,
            lbl_sync: self.lbl_sync,
            min_world: self.min_world,
            val_seqs: self.val_seqs,
            train_tokens: self.train_tokens,
            val_tokens: self.val_tokens,
            step_delay: Duration::from_millis(self.step_delay_ms),
            leave_after: self.leave_after,
        }
    }
}

/// The arguments that make a child process run `cfg` as a JSON-reporting peer.
pub fn child_args(cfg: &PeerConfig) -> Vec<String> {
    use clap::ValueEnum;
    let name = |v: Option<clap::builder::PossibleValue>| {
        v.map(|p| p.get_name().to_string()).unwrap_or_default()
    };
    let m = &cfg.model;
    let mut a: Vec<String> = vec![
        "--json".into(),
        format!("--master={}", cfg.master),
        format!("--bind-ip={}", cfg.bind_ip),
        format!("--peer-index={}", cfg.peer_index),
        format!("--home-domain={}", cfg.home_domain),
        format!("--domain-skew={}", cfg.domain_skew),
        format!("--seed={}", cfg.data_seed),
        format!("--seq-len={}", m.seq_len),
        format!("--d-model={}", m.d_model),
        format!("--heads={}", m.n_heads),
        format!("--layers={}", m.n_layers),
        format!("--experts={}", m.n_experts),
        format!("--top-k={}", m.top_k),
        format!("--expert-hidden={}", m.expert_hidden),
        format!("--batch={}", cfg.batch),
        format!("--inner-steps={}", cfg.inner_steps),
        format!("--sync-every={}", cfg.sync_every),
        format!("--inner-lr={}", cfg.inner_lr),
        format!("--outer-lr={}", cfg.outer_lr),
        format!("--outer-momentum={}", cfg.outer_momentum),
        format!("--mode={}", name(cfg.mode.to_possible_value())),
        format!("--quant={}", name(cfg.quant.to_possible_value())),
        format!("--lbl={}", name(cfg.lbl.to_possible_value())),
        format!("--lbl-weight={}", cfg.lbl_weight),
        format!("--lbl-sync={}", name(cfg.lbl_sync.to_possible_value())),
        format!("--min-world={}", cfg.min_world),
        format!("--val-seqs={}", cfg.val_seqs),
        format!("--train-tokens={}", cfg.train_tokens),
        format!("--val-tokens={}", cfg.val_tokens),
        format!("--step-delay-ms={}", cfg.step_delay.as_millis()),
    ];
    if m.shared_expert {
        a.push("--shared-expert".into());
    }
    if let Some(s) = cfg.leave_after {
        a.push(format!("--leave-after={s}"));
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outer_lr_defaults_to_the_mode_and_an_explicit_value_wins() {
        let sync = Cli::parse_from(["moe-trainer"]).peer_config();
        assert_eq!(sync.outer_lr, 0.7);
        let asynchronous = Cli::parse_from(["moe-trainer", "--mode", "async"]).peer_config();
        assert_eq!(asynchronous.outer_lr, 0.4);
        let explicit =
            Cli::parse_from(["moe-trainer", "--mode", "async", "--outer-lr", "0.9"]).peer_config();
        assert_eq!(explicit.outer_lr, 0.9);
    }

    #[test]
    fn child_args_parse_back_to_the_same_peer() {
        let mut cli = Cli::parse_from(["moe-trainer", "--shared-expert", "--lbl=micro"]);
        cli.master = Some("127.0.0.1:4000".parse().unwrap());
        cli.peer_index = 4;
        let cfg = cli.peer_config();
        let mut args = vec!["moe-trainer".to_string()];
        args.extend(child_args(&cfg));
        let back = Cli::parse_from(args);
        assert!(back.json);
        let b = back.peer_config();
        assert_eq!(format!("{cfg:?}"), format!("{b:?}"));
        assert_eq!(b.home_domain, 1);
    }
}
