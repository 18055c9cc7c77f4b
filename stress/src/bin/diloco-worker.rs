//! `diloco-worker`: one peer running `pccl_core::diloco` on a synthetic
//! task, for the DiLoCo churn tests and people at a shell.
//!
//! The task: every parameter tensor is pulled towards a target of this
//! peer's own (`½‖θ − c‖²`, plain SGD inner steps), so the peers' local
//! models drift apart between outer steps and the outer parameters converge
//! to the average target. One stdout line per event, `key=value` fields:
//!
//! - `JOINED peer=.. world=.. inner=.. outer=.. hash=..` after connecting;
//! - `BEGIN inner=..` right before a `DiLoCo::step` call that may run an
//!   outer event (lets a test aim a kill at the all-reduce);
//! - `OUTER outer=.. inner=.. world=.. hash=.. rev=.. frag=.. applied=..
//!   rejoined=.. tx=.. comm_ms=.. exposed_ms=.. loss=..` after each outer
//!   event (`hash` covers the outer parameters, momentum and counters, and
//!   must be equal on every peer at the same `outer`);
//! - `DONE outer=..` after `--outer-steps`, `BYE outer=..` after a graceful
//!   stop (SIGTERM/SIGINT), `FATAL err=.. msg=..` on an error (exit 1).
//!
//! ```text
//! pccl-master --listen 127.0.0.1:48148 &
//! diloco-worker --master 127.0.0.1:48148 --mode async --min-world 2 --outer-steps 20 &
//! diloco-worker --master 127.0.0.1:48148 --mode async --min-world 2 --outer-steps 20
//! ```

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Parser;
use half::{bf16, f16};
use pccl_core::diloco::{DiLoCo, DiLoCoConfig, Mode, ParamMut};
use pccl_core::{
    CommunicatorConfig, DataType, Error as PcclError, QuantizationAlgorithm, QuantizationOptions,
};

#[derive(Parser, Debug)]
#[command(about = "A PCCL peer training a synthetic task with DiLoCo, one stdout line per event")]
struct Cli {
    #[arg(long)]
    master: SocketAddr,
    /// sync, async or streaming.
    #[arg(long, default_value = "sync")]
    mode: String,
    /// H: inner steps per outer step.
    #[arg(long, default_value_t = 4)]
    sync_every: u64,
    /// Streaming: fragments.
    #[arg(long, default_value_t = 2)]
    fragments: usize,
    /// Streaming: τ, inner steps a fragment's all-reduce overlaps.
    #[arg(long, default_value_t = 1)]
    delay: u64,
    /// Streaming: α of lerp(local, outer, α).
    #[arg(long, default_value_t = 1.0)]
    alpha: f32,
    #[arg(long, default_value_t = 0.7)]
    outer_lr: f32,
    /// Parameter tensors.
    #[arg(long, default_value_t = 4)]
    tensors: usize,
    /// Elements per tensor.
    #[arg(long, default_value_t = 20_000)]
    elems: usize,
    /// Added to the first tensor's length (a model whose shape differs).
    #[arg(long, default_value_t = 0)]
    shape_offset: usize,
    /// Model dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Quantization: none, minmax or zps (to u8).
    #[arg(long, default_value = "none")]
    quant: String,
    /// Quantized data type (any dtype name; the core refuses what it cannot code).
    #[arg(long, default_value = "u8")]
    quant_type: String,
    #[arg(long)]
    error_feedback: bool,
    #[arg(long, default_value_t = 1)]
    min_world: u32,
    /// Exit 0 once the group's outer step reaches this (0: run until stopped).
    #[arg(long, default_value_t = 0)]
    outer_steps: u64,
    /// Pause after each inner step (emulates compute).
    #[arg(long, default_value_t = 2)]
    inner_sleep_ms: u64,
    /// Seed of this peer's target and initial parameters (default: the pid).
    #[arg(long)]
    seed: Option<u64>,
    /// Connections per ring neighbour.
    #[arg(long, default_value_t = 1)]
    pool: u32,
    /// Exit (code 3) when stdin reaches EOF, so the peer never outlives its harness.
    #[arg(long)]
    exit_on_stdin_eof: bool,
    /// Log filter for pccl-core's logs on stderr (default: `PCCL_LOG` or `warn`).
    #[arg(long)]
    log: Option<String>,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_sig: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_stop_signals() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe);
        // the sigaction struct is zero-initialized and then filled in.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_stop as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn emit(line: String) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
        std::process::exit(3);
    }
}

fn err_name(e: &PcclError) -> String {
    format!("{e:?}").split('(').next().unwrap_or("?").to_owned()
}

/// Deterministic pseudo-random value in [-1, 1) of (seed, i).
fn noise(seed: u64, i: u64) -> f32 {
    let mut x = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(i.wrapping_mul(0xBF58_476D_1CE4_E5B9));
    x ^= x >> 31;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 29;
    ((x >> 40) as f32 / (1u64 << 23) as f32) - 1.0
}

/// The model: tensors in one dtype.
enum Model {
    F32(Vec<Vec<f32>>),
    BF16(Vec<Vec<bf16>>),
    F16(Vec<Vec<f16>>),
}

impl Model {
    fn new(dtype: &str, lens: &[usize], seed: u64) -> Result<Model, String> {
        let init = |t: usize, k: usize| noise(seed ^ 0xA5A5, (t as u64) << 32 | k as u64);
        let f32s: Vec<Vec<f32>> = lens
            .iter()
            .enumerate()
            .map(|(t, &n)| (0..n).map(|k| init(t, k)).collect())
            .collect();
        Ok(match dtype {
            "f32" => Model::F32(f32s),
            "bf16" => Model::BF16(
                f32s.iter()
                    .map(|v| v.iter().map(|&x| bf16::from_f32(x)).collect())
                    .collect(),
            ),
            "f16" => Model::F16(
                f32s.iter()
                    .map(|v| v.iter().map(|&x| f16::from_f32(x)).collect())
                    .collect(),
            ),
            other => return Err(format!("unknown dtype '{other}' (f32, bf16, f16)")),
        })
    }

    fn params(&mut self) -> Vec<ParamMut<'_>> {
        match self {
            Model::F32(v) => v.iter_mut().map(|t| ParamMut::F32(t)).collect(),
            Model::BF16(v) => v.iter_mut().map(|t| ParamMut::BF16(t)).collect(),
            Model::F16(v) => v.iter_mut().map(|t| ParamMut::F16(t)).collect(),
        }
    }

    /// One SGD step on ½‖θ − c‖²; returns the loss before the step.
    fn inner_step(&mut self, targets: &[Vec<f32>], lr: f32) -> f64 {
        fn go<T: Copy>(
            v: &mut [Vec<T>],
            targets: &[Vec<f32>],
            lr: f32,
            to: impl Fn(T) -> f32,
            from: impl Fn(f32) -> T,
        ) -> f64 {
            let mut loss = 0.0f64;
            for (t, c) in v.iter_mut().zip(targets) {
                for (x, &ci) in t.iter_mut().zip(c) {
                    let xv = to(*x);
                    let d = xv - ci;
                    loss += 0.5 * f64::from(d * d);
                    *x = from(xv - lr * d);
                }
            }
            loss
        }
        match self {
            Model::F32(v) => go(v, targets, lr, |x| x, |x| x),
            Model::BF16(v) => go(v, targets, lr, bf16::to_f32, bf16::from_f32),
            Model::F16(v) => go(v, targets, lr, f16::to_f32, f16::from_f32),
        }
    }
}

fn run(cli: &Cli) -> Result<(), String> {
    let mode = match cli.mode.as_str() {
        "sync" => Mode::Sync,
        "async" => Mode::Async,
        "streaming" => Mode::Streaming {
            fragments: cli.fragments,
            delay: cli.delay,
            alpha: cli.alpha,
        },
        other => return Err(format!("unknown mode '{other}' (sync, async, streaming)")),
    };
    let quantization = match cli.quant.as_str() {
        "none" => None,
        "minmax" | "zps" => Some(QuantizationOptions {
            quantized_datatype: DataType::ALL
                .into_iter()
                .find(|d| d.name() == cli.quant_type)
                .ok_or_else(|| format!("unknown data type '{}'", cli.quant_type))?,
            algorithm: if cli.quant == "minmax" {
                QuantizationAlgorithm::MinMax
            } else {
                QuantizationAlgorithm::ZeroPointScale
            },
        }),
        other => {
            return Err(format!(
                "unknown quantization '{other}' (none, minmax, zps)"
            ))
        }
    };
    let cfg = DiLoCoConfig {
        mode,
        sync_every: cli.sync_every,
        outer_lr: cli.outer_lr,
        quantization,
        error_feedback: cli.error_feedback,
        min_world: cli.min_world,
        ..DiLoCoConfig::default()
    };
    let seed = cli.seed.unwrap_or(u64::from(std::process::id()));
    let mut lens = vec![cli.elems; cli.tensors];
    if let Some(first) = lens.first_mut() {
        *first += cli.shape_offset;
    }
    let targets: Vec<Vec<f32>> = lens
        .iter()
        .enumerate()
        .map(|(t, &n)| {
            (0..n)
                .map(|k| 2.0 + noise(seed, (t as u64) << 32 | k as u64))
                .collect()
        })
        .collect();
    let mut model = Model::new(&cli.dtype, &lens, seed)?;
    let names: Vec<String> = (0..lens.len())
        .map(|t| format!("layer{t}.weight"))
        .collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();

    let mut comm_cfg = CommunicatorConfig::new(cli.master).with_ephemeral_ports();
    comm_cfg.p2p_connection_pool_size = cli.pool.max(1);
    comm_cfg.connect_timeout = Duration::from_secs(5);
    let fatal = |e: PcclError| format!("FATAL err={} msg={}", err_name(&e), e.message());
    let mut d = DiLoCo::connect(comm_cfg, &name_refs, &mut model.params(), cfg).map_err(fatal)?;
    emit(format!(
        "JOINED peer={} world={} inner={} outer={} hash={:016x}",
        d.communicator().peer_id(),
        d.communicator().world().map_or(0, |w| w.group_world),
        d.inner_step(),
        d.outer_step(),
        d.state_hash()
    ));
    loop {
        if STOP.load(Ordering::SeqCst) {
            let outer = d.outer_step();
            d.close();
            emit(format!("BYE outer={outer}"));
            return Ok(());
        }
        if cli.outer_steps > 0 && d.outer_step() >= cli.outer_steps {
            let outer = d.outer_step();
            d.close();
            emit(format!("DONE outer={outer}"));
            return Ok(());
        }
        let loss = model.inner_step(&targets, 0.05);
        if cli.inner_sleep_ms > 0 {
            std::thread::sleep(Duration::from_millis(cli.inner_sleep_ms));
        }
        let next = d.inner_step() + 1;
        if next % cli.sync_every == 0 || matches!(mode, Mode::Streaming { .. }) {
            emit(format!("BEGIN inner={next}"));
        }
        if let Some(r) = d.step(&mut model.params()).map_err(fatal)? {
            emit(format!(
                "OUTER outer={} inner={} world={} hash={:016x} rev={} frag={} applied={} rejoined={} tx={} comm_ms={:.3} exposed_ms={:.3} loss={:.6}",
                r.outer_step,
                r.inner_step,
                r.world,
                d.state_hash(),
                r.revision.map_or("-".to_owned(), |v| v.to_string()),
                r.fragment.map_or("-".to_owned(), |v| v.to_string()),
                u8::from(r.applied),
                u8::from(r.rejoined),
                r.tx_bytes,
                r.comm_time.as_secs_f64() * 1e3,
                r.exposed_time.as_secs_f64() * 1e3,
                loss
            ));
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = cli
        .log
        .clone()
        .or_else(|| std::env::var("PCCL_LOG").ok())
        .unwrap_or_else(|| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
    install_stop_signals();
    if cli.exit_on_stdin_eof {
        std::thread::spawn(|| {
            let mut sink = [0u8; 64];
            loop {
                match std::io::stdin().read(&mut sink) {
                    Ok(0) | Err(_) => std::process::exit(3),
                    Ok(_) => {}
                }
            }
        });
    }
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(line) => {
            if line.starts_with("FATAL") {
                emit(line);
            } else {
                emit(format!("FATAL err=InvalidArgument msg={line}"));
            }
            ExitCode::FAILURE
        }
    }
}
