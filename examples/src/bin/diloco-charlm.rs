//! `diloco-charlm`: a small character-level language model trained with
//! DiLoCo (`pccl_core::diloco`) across local peer processes, with churn.
//!
//! ```text
//! cargo run --release -p pccl-examples --bin diloco-charlm -- --mode async
//! ```
//!
//! The parent starts an embedded master and three peer processes (copies of
//! this executable with `--role peer`). Each peer trains the same model (two
//! characters of context → embeddings → tanh layer → next-character logits,
//! AdamW inner steps) on its own shard of text drawn from a fixed order-2
//! Markov source, and every `--sync-every` steps DiLoCo averages the
//! pseudo-gradients and takes an outer Nesterov step. During the run a
//! fourth peer joins late, and one peer is SIGKILLed in the middle of an
//! outer step. Each peer prints one line per outer step: validation loss,
//! world size, bytes sent and the communication time hidden behind inner
//! steps. The parent checks at the end that every surviving peer holds the
//! identical outer state (hash) and that the validation loss fell; exit
//! status 0 only then.
//!
//! `--role peer` can also be run by hand against any master (`--master`).

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Parser;
use pccl_core::diloco::{DiLoCo, DiLoCoConfig, Mode, ParamMut};
use pccl_core::{
    Communicator, CommunicatorConfig, DataType, MasterConfig, MasterNode, QuantizationAlgorithm,
    QuantizationOptions, ReduceBuffers, ReduceOp,
};
use pccl_stress::swarm::procs::{ProcEvent, Procs, Stream};

#[derive(Parser, Debug, Clone)]
#[command(about = "A char-level LM trained with DiLoCo across local peers that join and die")]
struct Args {
    /// parent (default: master + peers + churn) or peer.
    #[arg(long, default_value = "parent")]
    role: String,
    /// Master address (peer role).
    #[arg(long)]
    master: Option<SocketAddr>,
    /// sync, async or streaming.
    #[arg(long, default_value = "sync")]
    mode: String,
    /// none, minmax or zps (pseudo-gradients to u8 on the wire).
    #[arg(long, default_value = "none")]
    quant: String,
    /// Streaming: τ, inner steps a fragment's all-reduce overlaps (default H/4).
    #[arg(long)]
    delay: Option<u64>,
    /// With --quant: keep each peer's quantization residual.
    #[arg(long)]
    error_feedback: bool,
    /// H: inner steps per outer step.
    #[arg(long, default_value_t = 20)]
    sync_every: u64,
    /// Outer steps every surviving peer trains to.
    #[arg(long, default_value_t = 14)]
    outer_steps: u64,
    /// Founding peers (the parent adds one joiner and kills one of these).
    #[arg(long, default_value_t = 3)]
    peers: usize,
    /// No joiner and no kill.
    #[arg(long)]
    no_churn: bool,
    /// Hidden units.
    #[arg(long, default_value_t = 64)]
    hidden: usize,
    /// Sequences per inner step.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Shard seed (peer role).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Founding peers to wait for before the first step (peer role).
    #[arg(long, default_value_t = 1)]
    min_world: u32,
    /// Local address the peer's listeners bind to (peer role).
    #[arg(long, default_value = "127.0.0.1")]
    bind_ip: std::net::IpAddr,
    /// Sleep this long in every inner step, standing in for accelerator
    /// compute (benchmarks: lets the CPU-light model hide communication).
    #[arg(long, default_value_t = 0)]
    compute_ms: u64,
    /// Peer role, benchmark baseline: train alone, no communication at all.
    #[arg(long)]
    no_comm: bool,
    /// Peer role, benchmark baseline: DDP, an all-reduce (Avg) of the
    /// gradients before every AdamW step (same peers, no joins).
    #[arg(long)]
    ddp: bool,
}

const VOCAB: usize = 27; // a-z and space
const EMBED: usize = 12;

/// A fixed Markov source over the vocabulary: the next character's
/// distribution (a few likely characters) is picked by the last character,
/// shifted by which half of the alphabet the one before is in, so two
/// characters of context matter.
struct Source {
    /// For each context: cumulative next-character probabilities.
    cdf: Vec<[f32; VOCAB]>,
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        (mix(self.0) >> 40) as f32 / (1u64 << 24) as f32
    }
}

impl Source {
    fn new() -> Source {
        let mut rng = Rng(12345);
        let cdf = (0..VOCAB)
            .map(|_| {
                let mut w = [0.02f32; VOCAB];
                for _ in 0..3 {
                    let c = (rng.next_f32() * VOCAB as f32) as usize % VOCAB;
                    w[c] += 1.0 + 3.0 * rng.next_f32();
                }
                let total: f32 = w.iter().sum();
                let mut acc = 0.0;
                let mut out = [0.0f32; VOCAB];
                for (o, x) in out.iter_mut().zip(w) {
                    acc += x / total;
                    *o = acc;
                }
                out
            })
            .collect();
        Source { cdf }
    }

    fn text(&self, seed: u64, len: usize) -> Vec<u8> {
        let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0xD1B5);
        let mut t = vec![26u8, 26u8];
        while t.len() < len {
            // Mostly the last character decides; the one before shifts it.
            let ctx = (t[t.len() - 1] as usize + 5 * usize::from(t[t.len() - 2] < 13)) % VOCAB;
            let u = rng.next_f32();
            let c = self.cdf[ctx]
                .iter()
                .position(|&p| u < p)
                .unwrap_or(VOCAB - 1);
            t.push(c as u8);
        }
        t
    }
}

/// The model's tensors: embeddings, hidden layer, output layer.
struct Model {
    t: Vec<Vec<f32>>,
}

const NAMES: [&str; 5] = ["embed", "w1", "b1", "w2", "b2"];

impl Model {
    fn new(hidden: usize, seed: u64) -> Model {
        let mut rng = Rng(seed ^ 0x5EED);
        let mut init = |n: usize, scale: f32| -> Vec<f32> {
            (0..n)
                .map(|_| (rng.next_f32() * 2.0 - 1.0) * scale)
                .collect()
        };
        let t = vec![
            init(VOCAB * EMBED, 0.5),
            init(2 * EMBED * hidden, (1.0 / (2 * EMBED) as f32).sqrt()),
            vec![0.0; hidden],
            init(hidden * VOCAB, (1.0 / hidden as f32).sqrt()),
            vec![0.0; VOCAB],
        ];
        Model { t }
    }

    fn hidden(&self) -> usize {
        self.t[2].len()
    }

    /// Mean cross-entropy over the positions `starts` of `text`; with
    /// `grads`, accumulates its gradient (of the mean) there.
    fn loss(&self, text: &[u8], starts: &[usize], mut grads: Option<&mut [Vec<f32>]>) -> f32 {
        let h = self.hidden();
        let (e, w1, b1, w2, b2) = (&self.t[0], &self.t[1], &self.t[2], &self.t[3], &self.t[4]);
        let mut total = 0.0f32;
        let inv = 1.0 / starts.len() as f32;
        let mut x = [0.0f32; 2 * EMBED];
        let mut a = vec![0.0f32; h];
        let mut logits = [0.0f32; VOCAB];
        for &s in starts {
            let (c0, c1, y) = (text[s] as usize, text[s + 1] as usize, text[s + 2] as usize);
            x[..EMBED].copy_from_slice(&e[c0 * EMBED..(c0 + 1) * EMBED]);
            x[EMBED..].copy_from_slice(&e[c1 * EMBED..(c1 + 1) * EMBED]);
            for (j, aj) in a.iter_mut().enumerate() {
                let mut z = b1[j];
                for (i, xi) in x.iter().enumerate() {
                    z += xi * w1[i * h + j];
                }
                *aj = z.tanh();
            }
            for (k, l) in logits.iter_mut().enumerate() {
                let mut z = b2[k];
                for (j, aj) in a.iter().enumerate() {
                    z += aj * w2[j * VOCAB + k];
                }
                *l = z;
            }
            let max = logits.iter().cloned().fold(f32::MIN, f32::max);
            let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
            total += -(logits[y] - max - sum.ln());
            let Some(g) = grads.as_deref_mut() else {
                continue;
            };
            // dL/dlogits = softmax − onehot
            let mut dl = [0.0f32; VOCAB];
            for k in 0..VOCAB {
                dl[k] = ((logits[k] - max).exp() / sum - f32::from(k == y)) * inv;
            }
            let mut da = vec![0.0f32; h];
            for j in 0..h {
                for k in 0..VOCAB {
                    g[3][j * VOCAB + k] += a[j] * dl[k];
                    da[j] += w2[j * VOCAB + k] * dl[k];
                }
            }
            for k in 0..VOCAB {
                g[4][k] += dl[k];
            }
            let mut dx = [0.0f32; 2 * EMBED];
            for j in 0..h {
                let dz = da[j] * (1.0 - a[j] * a[j]);
                g[2][j] += dz;
                for i in 0..2 * EMBED {
                    g[1][i * h + j] += x[i] * dz;
                    dx[i] += w1[i * h + j] * dz;
                }
            }
            for i in 0..EMBED {
                g[0][c0 * EMBED + i] += dx[i];
                g[0][c1 * EMBED + i] += dx[EMBED + i];
            }
        }
        total * inv
    }
}

/// AdamW, the inner optimizer (its state is each peer's own).
struct AdamW {
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    t: i32,
}

impl AdamW {
    fn new(model: &Model) -> AdamW {
        let zeros: Vec<Vec<f32>> = model.t.iter().map(|t| vec![0.0; t.len()]).collect();
        AdamW {
            m: zeros.clone(),
            v: zeros,
            t: 0,
        }
    }

    fn step(&mut self, model: &mut Model, grads: &[Vec<f32>]) {
        let (lr, b1, b2, eps, wd) = (0.01f32, 0.9f32, 0.999f32, 1e-8f32, 0.01f32);
        self.t += 1;
        let (c1, c2) = (1.0 - b1.powi(self.t), 1.0 - b2.powi(self.t));
        for (((p, g), m), v) in model
            .t
            .iter_mut()
            .zip(grads)
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            for i in 0..p.len() {
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                p[i] -= lr * (m[i] / c1 / ((v[i] / c2).sqrt() + eps) + wd * p[i]);
            }
        }
    }
}

fn diloco_config(args: &Args) -> Result<DiLoCoConfig, String> {
    let mode = match args.mode.as_str() {
        "sync" => Mode::Sync,
        "async" => Mode::Async,
        "streaming" => Mode::Streaming {
            fragments: 2,
            delay: args.delay.unwrap_or_else(|| {
                (args.sync_every / 4)
                    .max(1)
                    .min(args.sync_every.saturating_sub(1) / 2)
            }),
            alpha: 0.5,
        },
        m => return Err(format!("unknown mode '{m}' (sync, async, streaming)")),
    };
    let quantization = match args.quant.as_str() {
        "none" => None,
        "minmax" => Some(QuantizationAlgorithm::MinMax),
        "zps" => Some(QuantizationAlgorithm::ZeroPointScale),
        q => return Err(format!("unknown quantization '{q}' (none, minmax, zps)")),
    }
    .map(|algorithm| QuantizationOptions {
        quantized_datatype: DataType::U8,
        algorithm,
    });
    Ok(DiLoCoConfig {
        mode,
        sync_every: args.sync_every,
        quantization,
        error_feedback: args.error_feedback,
        min_world: args.min_world,
        ..DiLoCoConfig::default()
    })
}

fn params(m: &mut Model) -> Vec<ParamMut<'_>> {
    m.t.iter_mut()
        .map(|t| ParamMut::F32(t.as_mut_slice()))
        .collect()
}

/// One peer's data, model and inner optimizer.
struct Trainer {
    shard: Vec<u8>,
    val: Vec<u8>,
    val_starts: Vec<usize>,
    model: Model,
    adam: AdamW,
    grads: Vec<Vec<f32>>,
    pos: usize,
    batch: usize,
    compute: Duration,
}

impl Trainer {
    fn new(args: &Args) -> Trainer {
        let source = Source::new();
        // Every peer starts from the same initial model (DiLoCo's first sync
        // would make them equal anyway; DDP needs it).
        let model = Model::new(args.hidden, 1);
        let shard = source.text(args.seed, 200_000);
        Trainer {
            pos: (args.seed as usize * 7919) % (shard.len() - 3),
            shard,
            val: source.text(999_999, 4_002),
            val_starts: (0..4_000).collect(),
            adam: AdamW::new(&model),
            grads: model.t.iter().map(|t| vec![0.0; t.len()]).collect(),
            model,
            batch: args.batch,
            compute: Duration::from_millis(args.compute_ms),
        }
    }

    /// Fills `grads` with the gradient of the next batch.
    fn gradients(&mut self) {
        let n = self.shard.len() - 3;
        let starts: Vec<usize> = (0..self.batch).map(|i| (self.pos + i * 97) % n).collect();
        self.pos = (self.pos + self.batch * 97 + 1) % n;
        self.grads
            .iter_mut()
            .for_each(|g| g.iter_mut().for_each(|x| *x = 0.0));
        self.model.loss(&self.shard, &starts, Some(&mut self.grads));
        if !self.compute.is_zero() {
            std::thread::sleep(self.compute);
        }
    }

    fn val_loss(&self, t: &[Vec<f32>]) -> f32 {
        let m = Model { t: t.to_vec() };
        m.loss(&self.val, &self.val_starts, None)
    }
}

fn emit(s: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{s}").and_then(|_| out.flush());
}

fn peer(args: &Args) -> Result<(), String> {
    if args.no_comm {
        return alone(args);
    }
    let master = args.master.ok_or("--role peer needs --master")?;
    let mut comm_cfg = CommunicatorConfig::new(master).with_ephemeral_ports();
    comm_cfg.connect_timeout = Duration::from_secs(5);
    comm_cfg.bind_ip = args.bind_ip;
    if args.ddp {
        return ddp(args, comm_cfg);
    }
    let cfg = diloco_config(args)?;
    let mut tr = Trainer::new(args);
    let mut d = DiLoCo::connect(comm_cfg, &NAMES, &mut params(&mut tr.model), cfg)
        .map_err(|e| format!("joining: {e}"))?;
    emit(format!(
        "joined outer_step={} val_loss={:.4}",
        d.outer_step(),
        tr.val_loss(&tr.model.t)
    ));
    let (mut sent, t0) = (0u64, Instant::now());
    let mut window = Instant::now();
    let mut windows = Vec::new();
    // Streaming counts one outer step per fragment: train as many inner
    // steps as the other modes (outer_steps × H).
    let per_period = match cfg.mode {
        Mode::Streaming { fragments, .. } => fragments as u64,
        _ => 1,
    };
    let mut eval = Duration::ZERO;
    while d.outer_step() < args.outer_steps * per_period {
        tr.gradients();
        tr.adam.step(&mut tr.model, &tr.grads);
        let report = d
            .step(&mut params(&mut tr.model))
            .map_err(|e| format!("outer step: {e}"))?;
        if let Some(r) = report.filter(|r| r.applied) {
            let te = Instant::now();
            sent += r.tx_bytes;
            // The shared model: the outer parameters (in async mode the local
            // model starts the next window from them plus its own eager step).
            emit(format!(
                "outer_step={} val_loss={:.4} world={} tx_bytes={} total_tx={} hidden_ms={:.1} exposed_ms={:.1} elapsed_s={:.2} hash={:016x}",
                r.outer_step,
                tr.val_loss(d.outer_params()),
                r.world,
                r.tx_bytes,
                sent,
                r.hidden_time().as_secs_f64() * 1e3,
                r.exposed_time.as_secs_f64() * 1e3,
                t0.elapsed().as_secs_f64(),
                d.state_hash()
            ));
            eval += te.elapsed();
        }
        if d.inner_step().is_multiple_of(args.sync_every) {
            // Windows of H inner steps, timed without evaluation and printing.
            windows.push(window.elapsed().saturating_sub(eval));
            window = Instant::now();
            eval = Duration::ZERO;
        }
    }
    emit(format!(
        "done outer_step={} hash={:016x} val_loss={:.4} total_tx={sent} wall_s={:.2} mean_window_ms={:.1}",
        d.outer_step(),
        d.state_hash(),
        tr.val_loss(d.outer_params()),
        t0.elapsed().as_secs_f64(),
        mean_ms(&windows)
    ));
    d.close();
    Ok(())
}

fn mean_ms(d: &[Duration]) -> f64 {
    // The first window includes the founding wait; leave it out when we can.
    let d = if d.len() > 1 { &d[1..] } else { d };
    d.iter().map(|x| x.as_secs_f64() * 1e3).sum::<f64>() / d.len().max(1) as f64
}

/// The no-communication baseline: the same inner steps, windows of H, nothing sent.
fn alone(args: &Args) -> Result<(), String> {
    let mut tr = Trainer::new(args);
    let t0 = Instant::now();
    let mut window = Instant::now();
    let mut windows = Vec::new();
    for step in 1..=args.outer_steps * args.sync_every {
        tr.gradients();
        tr.adam.step(&mut tr.model, &tr.grads);
        if step % args.sync_every == 0 {
            windows.push(window.elapsed());
            window = Instant::now();
        }
    }
    emit(format!(
        "done outer_step={} hash=- val_loss={:.4} total_tx=0 wall_s={:.2} mean_window_ms={:.1}",
        args.outer_steps,
        tr.val_loss(&tr.model.t),
        t0.elapsed().as_secs_f64(),
        mean_ms(&windows)
    ));
    Ok(())
}

/// The DDP baseline: gradients averaged before every inner step.
fn ddp(args: &Args, comm_cfg: CommunicatorConfig) -> Result<(), String> {
    let cfg = diloco_config(args)?;
    let mut tr = Trainer::new(args);
    let comm = Communicator::new(comm_cfg).map_err(|e| e.to_string())?;
    comm.connect().map_err(|e| format!("connecting: {e}"))?;
    while comm.world().map_err(|e| e.to_string())?.group_world < args.min_world {
        if comm.are_peers_pending().map_err(|e| e.to_string())? {
            comm.update_topology().map_err(|e| e.to_string())?;
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let (mut sent, t0) = (0u64, Instant::now());
    let mut window = Instant::now();
    let mut windows = Vec::new();
    for step in 1..=args.outer_steps * args.sync_every {
        tr.gradients();
        let mut ops: Vec<ReduceBuffers<'_>> = tr
            .grads
            .iter_mut()
            .enumerate()
            .map(|(i, g)| {
                let op = ReduceBuffers::in_place(g.as_mut_slice(), ReduceOp::Avg, i as u64);
                match cfg.quantization {
                    Some(q) => op.with_quantization(q),
                    None => op,
                }
            })
            .collect();
        let info = comm
            .all_reduce_multiple_with_retry(&mut ops, 8)
            .map_err(|e| format!("all-reduce: {e}"))?;
        drop(ops);
        sent += info.tx_bytes;
        tr.adam.step(&mut tr.model, &tr.grads);
        if step % args.sync_every == 0 {
            windows.push(window.elapsed());
            emit(format!(
                "outer_step={} val_loss={:.4} world={} total_tx={sent} elapsed_s={:.2}",
                step / args.sync_every,
                tr.val_loss(&tr.model.t),
                info.local_world_size,
                t0.elapsed().as_secs_f64()
            ));
            window = Instant::now();
        }
    }
    let h = pccl_core::hash::tensor_hashes(
        &tr.model.t.iter().map(|t| f32_bytes(t)).collect::<Vec<_>>(),
    );
    emit(format!(
        "done outer_step={} hash={:016x} val_loss={:.4} total_tx={sent} wall_s={:.2} mean_window_ms={:.1}",
        args.outer_steps,
        pccl_core::hash::root_hash(&h, 0),
        tr.val_loss(&tr.model.t),
        t0.elapsed().as_secs_f64(),
        mean_ms(&windows)
    ));
    comm.close();
    Ok(())
}

fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding; the length is the slice's size in bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

fn parent(args: &Args) -> Result<(), String> {
    diloco_config(args)?; // refuse bad flags before starting anything
    let mut master = MasterNode::bind(
        "127.0.0.1:0".parse().expect("address"),
        MasterConfig::default(),
    )
    .map_err(|e| format!("starting the master: {e}"))?;
    master
        .run()
        .map_err(|e| format!("running the master: {e}"))?;
    let exe = std::env::current_exe().map_err(|e| format!("locating this executable: {e}"))?;
    let mut procs = Procs::new();
    let spawn = |procs: &mut Procs, seed: usize, min_world: usize| -> Result<usize, String> {
        let mut cmd = Command::new(&exe);
        cmd.args(["--role", "peer", "--master"])
            .arg(master.local_addr().to_string())
            .args(["--mode", &args.mode, "--quant", &args.quant])
            .args(args.delay.map(|d| format!("--delay={d}")))
            .args(["--sync-every", &args.sync_every.to_string()])
            .args(["--outer-steps", &args.outer_steps.to_string()])
            .args([
                "--hidden",
                &args.hidden.to_string(),
                "--batch",
                &args.batch.to_string(),
            ])
            .args([
                "--seed",
                &seed.to_string(),
                "--min-world",
                &min_world.to_string(),
            ]);
        if args.error_feedback {
            cmd.arg("--error-feedback");
        }
        procs
            .spawn(format!("peer{seed}"), cmd)
            .map_err(|e| format!("starting peer {seed}: {}", e.0))
    };
    println!(
        "diloco-charlm: {} peers, mode {}, quantization {}, H={}, {} outer steps{}",
        args.peers,
        args.mode,
        args.quant,
        args.sync_every,
        args.outer_steps,
        if args.no_churn {
            ""
        } else {
            "; a joiner at outer step 3, a SIGKILL at outer step 6"
        }
    );
    for i in 0..args.peers {
        spawn(&mut procs, i + 1, args.peers)?;
    }
    let victim = if args.peers > 2 {
        Some(args.peers - 1)
    } else {
        None
    };
    let (mut joined, mut killed) = (args.no_churn, args.no_churn);
    let mut final_hash: Vec<Option<String>> = vec![None; args.peers + 1];
    let mut first_val: Option<f32> = None;
    let mut last_val: Option<f32> = None;
    let mut done = 0usize;
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline {
        let Some(ev) = procs.next(Duration::from_millis(200)) else {
            continue;
        };
        match ev {
            ProcEvent::Line {
                id,
                stream: Stream::Stdout,
                line,
                ..
            } => {
                println!("[peer{}] {line}", id + 1);
                let step: u64 = field(&line, "outer_step")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if let Some(v) = field(&line, "val_loss").and_then(|v| v.parse::<f32>().ok()) {
                    first_val.get_or_insert(v);
                    last_val = Some(v);
                }
                if line.starts_with("done") {
                    if let Some(slot) = final_hash.get_mut(id) {
                        *slot = field(&line, "hash").map(str::to_owned);
                    }
                    done += 1;
                }
                if !joined && step >= 3 {
                    joined = true;
                    println!("diloco-charlm: a peer joins late");
                    spawn(&mut procs, args.peers + 1, 1)?;
                }
                if !killed && step >= 6 && Some(id) == victim {
                    // Right after its outer step 6: the others are about to
                    // start the next inner steps and, in async mode, have
                    // its all-reduce in flight.
                    killed = true;
                    println!("diloco-charlm: SIGKILL peer{}", id + 1);
                    procs.kill(id).map_err(|e| e.0)?;
                }
            }
            ProcEvent::Line {
                id,
                stream: Stream::Stderr,
                line,
                ..
            } => {
                eprintln!("[peer{} stderr] {line}", id + 1);
            }
            ProcEvent::Eof { .. } => {}
        }
        let expected = procs.len() - usize::from(killed && !args.no_churn && victim.is_some());
        if done >= expected && joined && killed {
            break;
        }
    }
    for id in 0..procs.len() {
        let _ = procs.wait(id);
    }
    let hashes: Vec<&String> = final_hash.iter().flatten().collect();
    if hashes.is_empty() {
        return Err("no peer finished".into());
    }
    if hashes.iter().any(|h| *h != hashes[0]) {
        return Err(format!("the survivors' outer states differ: {hashes:?}"));
    }
    let (first, last) = (first_val.unwrap_or(f32::NAN), last_val.unwrap_or(f32::NAN));
    println!(
        "diloco-charlm: {} peers finished with identical outer state {}; validation loss {first:.4} -> {last:.4}",
        hashes.len(),
        hashes[0]
    );
    if last.is_nan() || last >= first {
        return Err("the validation loss did not fall".into());
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("PCCL_LOG").unwrap_or_else(|_| "warn".into()),
        ))
        .with_writer(std::io::stderr)
        .try_init();
    let r = match args.role.as_str() {
        "parent" => parent(&args),
        "peer" => peer(&args),
        r => Err(format!("unknown role '{r}' (parent, peer)")),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("diloco-charlm: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradient_matches_finite_differences() {
        let source = Source::new();
        let text = source.text(3, 400);
        let starts: Vec<usize> = (0..40).map(|i| i * 9).collect();
        let model = Model::new(8, 5);
        let mut grads: Vec<Vec<f32>> = model.t.iter().map(|t| vec![0.0; t.len()]).collect();
        model.loss(&text, &starts, Some(&mut grads));
        for (ti, idx) in [(0usize, 3usize), (1, 17), (2, 2), (3, 40), (4, 5)] {
            let mut plus = Model { t: model.t.clone() };
            let mut minus = Model { t: model.t.clone() };
            let eps = 1e-2f32;
            plus.t[ti][idx] += eps;
            minus.t[ti][idx] -= eps;
            let numeric =
                (plus.loss(&text, &starts, None) - minus.loss(&text, &starts, None)) / (2.0 * eps);
            let analytic = grads[ti][idx];
            assert!(
                (numeric - analytic).abs() < 2e-3 + 0.05 * analytic.abs(),
                "tensor {ti}[{idx}]: numeric {numeric} analytic {analytic}"
            );
        }
    }

    #[test]
    fn adamw_alone_learns_the_source() {
        let source = Source::new();
        let text = source.text(1, 50_000);
        let val = source.text(2, 2_002);
        let vs: Vec<usize> = (0..2_000).collect();
        let mut model = Model::new(32, 1);
        let mut adam = AdamW::new(&model);
        let before = model.loss(&val, &vs, None);
        let mut grads: Vec<Vec<f32>> = model.t.iter().map(|t| vec![0.0; t.len()]).collect();
        for step in 0..300 {
            let starts: Vec<usize> = (0..32)
                .map(|i| (step * 3301 + i * 97) % (text.len() - 3))
                .collect();
            grads
                .iter_mut()
                .for_each(|g| g.iter_mut().for_each(|x| *x = 0.0));
            model.loss(&text, &starts, Some(&mut grads));
            adam.step(&mut model, &grads);
        }
        let after = model.loss(&val, &vs, None);
        assert!(after < before - 0.5, "{before} -> {after}");
    }
}
