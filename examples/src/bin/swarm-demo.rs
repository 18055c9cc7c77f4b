//! `swarm-demo`: a local PCCL swarm in one command, no arguments needed.
//!
//! ```text
//! cargo run --release -p pccl-examples --bin swarm-demo
//! ```
//!
//! It starts an embedded master on 127.0.0.1 and three peer processes (copies
//! of this executable run with `--role peer`, each running the canonical
//! fault-tolerant loop of `pccl_stress::swarm::worker`: admit newcomers, sync
//! the shared state, all-reduce with retry, deterministic update). Then, on a
//! fixed schedule, it adds peers, SIGKILLs one, freezes one with SIGSTOP
//! until the master evicts it (and thaws it: it rejoins as a newcomer), and
//! stops one gracefully. A live display shows each step (world size,
//! all-reduce size and bus bandwidth, the shared-state hash and how many
//! peers agree on it), one line per join, leave, kill and eviction, and a
//! summary at the end. It ends by itself in under a minute; Ctrl-C ends it
//! early (peers leave gracefully). On a terminal the status block is redrawn
//! in place with ANSI escapes; when the output is piped it prints plain lines.
//! Exit status: 0 when every step's shared state agreed and nothing crashed.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use pccl_stress::swarm::driver::{DriverConfig, Event, PeerState, StepSummary, Swarm};
use pccl_stress::swarm::worker::{self, WorkerArgs};
use pccl_stress::swarm::{human_bytes, Context, Result};

/// Options of the demo itself (all optional).
#[derive(Parser, Debug)]
#[command(about = "A local PCCL swarm: peers join, die, freeze and leave while they train")]
struct DemoArgs {
    /// Seconds of scheduled churn after the swarm takes its first step.
    #[arg(long, default_value_t = 40)]
    seconds: u64,
    /// f32 elements all-reduced per step.
    #[arg(long, default_value_t = 1 << 20)]
    elems: usize,
    /// Shared-state size in MiB.
    #[arg(long, default_value_t = 8.0)]
    state_mib: f64,
    /// Pause after each step (ms), standing in for the compute of a training step.
    #[arg(long, default_value_t = 80)]
    step_sleep_ms: u64,
    /// The master evicts a silent peer after this long (ms).
    #[arg(long, default_value_t = 2_000)]
    peer_timeout_ms: u64,
    /// Plain lines even on a terminal.
    #[arg(long)]
    plain: bool,
    /// Write each peer's stderr to `<dir>/p<N>.log` (for debugging).
    #[arg(long)]
    log_dir: Option<std::path::PathBuf>,
    /// Log filter of the peers (e.g. `debug`); default `error`.
    #[arg(long, default_value = "error")]
    peer_log: String,
    /// Start the peers without `--trace` (no per-call lines).
    #[arg(long)]
    no_trace: bool,
}

/// The peer role (internal): `swarm-demo --role peer --master ADDR ...`.
#[derive(Parser, Debug)]
struct PeerCli {
    #[arg(long)]
    role: String,
    #[command(flatten)]
    worker: WorkerArgs,
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--role") {
        let cli = PeerCli::parse();
        if cli.role != "peer" {
            eprintln!("swarm-demo: unknown role '{}'", cli.role);
            return ExitCode::FAILURE;
        }
        return match worker::run(&cli.worker) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("swarm-demo peer: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let args = DemoArgs::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("swarm-demo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One scheduled action, `secs` after the first step.
#[derive(Debug, Clone, Copy)]
enum Action {
    Spawn,
    Kill(usize),
    Stop(usize),
    Cont(usize),
    Term(usize),
}

const SCHEDULE: &[(f64, Action)] = &[
    (0.10, Action::Spawn),
    (0.22, Action::Kill(1)),
    (0.35, Action::Spawn),
    (0.48, Action::Stop(2)),
    (0.62, Action::Cont(2)),
    (0.74, Action::Term(0)),
    (0.84, Action::Spawn),
];

fn run(args: &DemoArgs) -> Result<bool> {
    worker::install_stop_signals()?;
    pccl_core::logging::init(Some("error"));
    let exe = std::env::current_exe().context("locating this executable")?;
    let cfg = DriverConfig {
        peer_timeout_ms: args.peer_timeout_ms,
        hang_bound: Duration::from_millis(args.peer_timeout_ms * 5 + 10_000),
        program: exe,
        leading_args: vec!["--role".into(), "peer".into()],
        worker_args: vec![
            "--elems".into(),
            args.elems.to_string(),
            "--state-mib".into(),
            args.state_mib.to_string(),
            "--pool".into(),
            "2".into(),
            "--step-sleep-ms".into(),
            args.step_sleep_ms.to_string(),
            "--log".into(),
            args.peer_log.clone(),
        ],
        log_dir: args.log_dir.clone(),
        trace: !args.no_trace,
        quant_type: None,
    };
    let mut swarm = Swarm::start(cfg)?;
    let tty = std::io::stdout().is_terminal() && !args.plain;
    let mut ui = Ui::new(tty, args, swarm.master_addr().to_string());
    ui.note(
        &swarm,
        &format!(
            "embedded master on {}; starting 3 peers ({} all-reduce, {} MiB shared state)",
            swarm.master_addr(),
            human_bytes(args.elems as u64 * 4),
            args.state_mib
        ),
    );
    for _ in 0..3 {
        let (_, ev) = swarm.spawn(&["--min-world".into(), "3".into()])?;
        ui.events(&swarm, &ev);
    }
    let start_deadline = Instant::now() + Duration::from_secs(60);
    while swarm.audit.steps() == 0 && !worker::stop_requested() {
        if Instant::now() > start_deadline {
            ui.note(&swarm, "the swarm did not take its first step within 60 s");
            ui.finish();
            return Ok(false);
        }
        let ev = swarm.poll(Duration::from_millis(100));
        ui.events(&swarm, &ev);
        ui.draw(&swarm, None);
    }
    let t0 = Instant::now();
    ui.t0 = Some(t0);
    let total = Duration::from_secs(args.seconds);
    let mut next = 0;
    // A kill or freeze waits (up to 3 s) for its victim to start an
    // all-reduce, so the survivors visibly recover from a failed op.
    let mut aimed: Option<(Action, Instant)> = None;
    while t0.elapsed() < total && !worker::stop_requested() {
        let ev = swarm.poll(Duration::from_millis(20));
        ui.events(&swarm, &ev);
        if let Some((action, since)) = aimed {
            let victim = match action {
                Action::Kill(i) | Action::Stop(i) => Some(i),
                _ => None,
            };
            let started = ev.iter().any(|e| {
                matches!(e, Event::Begin { peer, op, .. } if Some(*peer) == victim && op == "allreduce")
            });
            if started || since.elapsed() > Duration::from_secs(3) || args.no_trace {
                if started {
                    // Into the transfer, not before the others joined the op.
                    std::thread::sleep(Duration::from_millis(ui.aim_ms()));
                }
                aimed = None;
                let ev = perform(&mut swarm, action, &mut ui)?;
                ui.events(&swarm, &ev);
            }
        }
        while aimed.is_none()
            && next < SCHEDULE.len()
            && t0.elapsed().as_secs_f64() >= SCHEDULE[next].0 * total.as_secs_f64()
        {
            let action = resolve(&swarm, SCHEDULE[next].1, &ui);
            next += 1;
            match action {
                Action::Kill(_) | Action::Stop(_) => aimed = Some((action, Instant::now())),
                _ => {
                    let ev = perform(&mut swarm, action, &mut ui)?;
                    ui.events(&swarm, &ev);
                }
            }
        }
        ui.draw(&swarm, Some(total));
    }
    if worker::stop_requested() {
        ui.note(&swarm, "interrupted: asking every peer to leave");
    } else {
        ui.note(&swarm, "time is up: asking every peer to leave");
    }
    let ev = swarm.shutdown(Duration::from_secs(10));
    ui.events(&swarm, &ev);
    ui.finish();
    Ok(summary(&swarm, &ui, t0.elapsed()))
}

/// Maps a scheduled action onto a peer that can take it: a target that is
/// not running any more is replaced by the first stepping peer; a thaw goes
/// to a frozen peer.
fn resolve(swarm: &Swarm, action: Action, ui: &Ui) -> Action {
    let running = |want: usize| -> usize {
        if swarm.peers.get(want).map(|p| p.state) == Some(PeerState::Running) {
            want
        } else {
            swarm.steppers().first().copied().unwrap_or(want)
        }
    };
    match action {
        Action::Spawn => Action::Spawn,
        Action::Kill(i) => Action::Kill(running(i)),
        Action::Stop(i) => Action::Stop(running(i)),
        Action::Term(i) => Action::Term(running(i)),
        Action::Cont(i) => Action::Cont(if ui.stopped.contains(&i) {
            i
        } else {
            ui.stopped.first().copied().unwrap_or(i)
        }),
    }
}

/// Carries out one action (already resolved onto a peer); destructive ones
/// only while at least three peers step, so two always carry on.
fn perform(swarm: &mut Swarm, action: Action, ui: &mut Ui) -> Result<Vec<Event>> {
    let state = |swarm: &Swarm, i: usize| swarm.peers.get(i).map(|p| p.state);
    let enough = swarm.steppers().len() >= 3;
    Ok(match action {
        Action::Spawn => swarm.spawn(&[])?.1,
        Action::Kill(_) | Action::Stop(_) | Action::Term(_) if !enough => {
            ui.note(
                swarm,
                &format!("skipping {action:?}: fewer than three peers are stepping"),
            );
            Vec::new()
        }
        Action::Kill(i) if state(swarm, i) == Some(PeerState::Running) => swarm.kill(i)?,
        Action::Stop(i) if state(swarm, i) == Some(PeerState::Running) => {
            ui.stopped.push(i);
            swarm.stop(i)?
        }
        Action::Cont(i) if state(swarm, i) == Some(PeerState::Stopped) => {
            ui.stopped.retain(|x| *x != i);
            swarm.cont(i)?
        }
        Action::Term(i) if state(swarm, i) == Some(PeerState::Running) => swarm.terminate(i)?,
        _ => Vec::new(),
    })
}

// ---------------------------------------------------------------------------
// Display

const RESET: &str = "\x1b[0m";
const BOLD: &str = "\x1b[1m";
const DIM: &str = "\x1b[2m";
const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const BLUE: &str = "\x1b[34m";
const CYAN: &str = "\x1b[36m";

struct Ui {
    tty: bool,
    master: String,
    started: Instant,
    t0: Option<Instant>,
    /// Lines of the status block currently on screen.
    drawn: usize,
    last_draw: Instant,
    last_plain_step: Instant,
    latest: Option<StepSummary>,
    busbw: Vec<f64>,
    stopped: Vec<usize>,
    steps_shown: u64,
    step_sleep_ms: u64,
}

impl Ui {
    fn new(tty: bool, args: &DemoArgs, master: String) -> Ui {
        let now = Instant::now();
        if tty {
            // Hide the cursor and stop long lines from wrapping while we redraw.
            print!("\x1b[?25l\x1b[?7l");
        }
        Ui {
            tty,
            master,
            started: now,
            t0: None,
            drawn: 0,
            last_draw: now - Duration::from_secs(1),
            last_plain_step: now - Duration::from_secs(1),
            latest: None,
            busbw: Vec::new(),
            stopped: Vec::new(),
            steps_shown: 0,
            step_sleep_ms: args.step_sleep_ms,
        }
    }

    /// How long after an all-reduce starts to strike: half of a recent
    /// step's all-reduce time (at least 2 ms, at most 200 ms).
    fn aim_ms(&self) -> u64 {
        self.latest
            .as_ref()
            .map_or(10, |s| (s.ar_ms / 2.0).clamp(2.0, 200.0) as u64)
    }

    fn c(&self, code: &'static str) -> &'static str {
        if self.tty {
            code
        } else {
            ""
        }
    }

    fn clear(&mut self) {
        if self.tty && self.drawn > 0 {
            print!("\x1b[{}F\x1b[J", self.drawn);
            self.drawn = 0;
        }
    }

    /// Prints one event line above the status block.
    fn line(&mut self, swarm: &Swarm, color: &'static str, text: &str) {
        self.clear();
        let t = self.started.elapsed().as_secs_f64();
        let _ = swarm;
        println!(
            "{}{t:6.1}s{} {}{text}{}",
            self.c(DIM),
            self.c(RESET),
            self.c(color),
            self.c(RESET)
        );
        self.last_draw = Instant::now() - Duration::from_secs(1);
    }

    fn note(&mut self, swarm: &Swarm, text: &str) {
        self.line(swarm, BLUE, &format!("· {text}"));
    }

    fn events(&mut self, swarm: &Swarm, events: &[Event]) {
        for ev in events {
            let name = |p: &usize| swarm.name(*p).to_string();
            let (color, text) = match ev {
                Event::Spawned { peer } => (CYAN, format!("+ {} started, asking to join", name(peer))),
                Event::Joined {
                    peer,
                    session,
                    world,
                    connect_ms,
                } => (
                    GREEN,
                    format!(
                        "+ {} {} the swarm: world {world} (admitted after {connect_ms} ms)",
                        name(peer),
                        if *session > 1 { "rejoined" } else { "joined" }
                    ),
                ),
                Event::Step { peer, rec } if rec.sync_rx > 0 && rec.local == 1 => (
                    CYAN,
                    format!(
                        "  {} received the shared state ({}) at step {}: hash {:016x}",
                        name(peer),
                        human_bytes(rec.sync_rx),
                        rec.step,
                        rec.state_hash
                    ),
                ),
                Event::Step { .. } | Event::Begin { .. } => continue,
                Event::StepDone(s) => {
                    self.step(swarm, s);
                    continue;
                }
                Event::Retry { peer, rec } => (
                    YELLOW,
                    format!(
                        "↻ {}: all-reduce of step {} failed ({}) after {} ms; retrying with the survivors",
                        name(peer),
                        rec.step,
                        rec.err,
                        rec.wait_ms
                    ),
                ),
                Event::Skip { peer, step } => (
                    YELLOW,
                    format!("  {} skipped step {step}: too few peers", name(peer)),
                ),
                Event::Rejoin { peer, reason, .. } => (
                    YELLOW,
                    format!("↻ {} lost its place ({reason}); joining again", name(peer)),
                ),
                Event::OpError { peer, op, err, .. } => {
                    (YELLOW, format!("  {}: {op} failed ({err}); going on", name(peer)))
                }
                Event::Mismatch(m) => (RED, format!("✗ SHARED STATE MISMATCH: {m}")),
                Event::ResultMismatch(m) => (RED, format!("✗ ALL-REDUCE RESULT MISMATCH: {m}")),
                Event::Inexact { peer, step } => (
                    RED,
                    format!("✗ {}: all-reduce result of step {step} is wrong", name(peer)),
                ),
                Event::Killed { peer } => (RED, format!("✖ SIGKILL {}: it dies without a word", name(peer))),
                Event::Stopped { peer } => (
                    YELLOW,
                    format!(
                        "❚❚ SIGSTOP {}: frozen but still connected; the others stall until the master evicts it",
                        name(peer)
                    ),
                ),
                Event::Continued { peer } => (CYAN, format!("▶ SIGCONT {}: thawed", name(peer))),
                Event::Terminating { peer } => {
                    (BLUE, format!("- SIGTERM {}: asked to leave gracefully", name(peer)))
                }
                Event::Evicted {
                    peer,
                    after_ms,
                    world,
                } => (
                    YELLOW,
                    format!(
                        "- {} evicted by the master; survivors go on with world {world} ({:.1} s after SIGSTOP)",
                        name(peer),
                        *after_ms as f64 / 1e3
                    ),
                ),
                Event::Left { peer, steps } => (
                    BLUE,
                    format!("- {} left gracefully after {steps} steps", name(peer)),
                ),
                Event::Exited {
                    peer,
                    status,
                    expected,
                } => {
                    if *expected {
                        continue;
                    }
                    (
                        RED,
                        format!(
                            "✗ {} crashed ({status}):\n{}",
                            name(peer),
                            swarm.stderr_tail(*peer)
                        ),
                    )
                }
                Event::Fatal { peer, msg } => (RED, format!("✗ {} failed: {msg}", name(peer))),
                Event::BadLine { peer, err } => (RED, format!("✗ {}: {err}", name(peer))),
                Event::Hang { silent_ms } => (
                    RED,
                    format!(
                        "✗ no step for {silent_ms} ms; where the peers are:\n{}",
                        swarm.whereabouts()
                    ),
                ),
                Event::SlowJoin { peer, waited_ms } => (
                    RED,
                    format!("✗ {} still not admitted after {waited_ms} ms", name(peer)),
                ),
                Event::StuckLeave { peer, waited_ms } => (
                    RED,
                    format!("✗ {} did not leave within {waited_ms} ms", name(peer)),
                ),
            };
            self.line(swarm, color, &text);
        }
    }

    fn step(&mut self, swarm: &Swarm, s: &StepSummary) {
        if s.world > 1 && s.busbw > 0.0 {
            self.busbw.push(s.busbw);
        }
        self.steps_shown += 1;
        if !self.tty && self.last_plain_step.elapsed() >= Duration::from_secs(1) {
            self.last_plain_step = Instant::now();
            let text = self.step_text(s);
            self.line(swarm, "", &text);
        }
        self.latest = Some(s.clone());
    }

    fn step_text(&self, s: &StepSummary) -> String {
        let agree = if s.agree {
            format!(
                "{}{}/{} agree ✓{}",
                self.c(GREEN),
                s.reporters,
                s.reporters,
                self.c(RESET)
            )
        } else {
            format!("{}DISAGREE ✗{}", self.c(RED), self.c(RESET))
        };
        format!(
            "step {:>5}  world {}  all-reduce {} in {:6.1} ms  busbw {:6.3} GB/s  state hash {:016x} {agree}",
            s.step,
            s.world,
            human_bytes(s.bytes),
            s.ar_ms,
            s.busbw,
            s.hash
        )
    }

    /// Redraws the status block (terminal only, at most 10 times a second).
    fn draw(&mut self, swarm: &Swarm, total: Option<Duration>) {
        if !self.tty || self.last_draw.elapsed() < Duration::from_millis(100) {
            return;
        }
        self.last_draw = Instant::now();
        self.clear();
        let mut lines = Vec::new();
        let elapsed = self.t0.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let (bar, of) = match total {
            Some(t) => {
                let frac = (elapsed / t.as_secs_f64()).clamp(0.0, 1.0);
                let n = (frac * 24.0) as usize;
                (
                    format!("[{}{}]", "█".repeat(n), "░".repeat(24 - n)),
                    format!("{elapsed:5.1} s / {} s", t.as_secs()),
                )
            }
            None => ("".into(), "starting".into()),
        };
        lines.push(format!(
            "{BOLD}PCCL-rs swarm demo{RESET}  master {}  {of} {bar}",
            self.master
        ));
        match &self.latest {
            Some(s) => lines.push(self.step_text(s)),
            None => lines.push(format!("{DIM}waiting for the first step...{RESET}")),
        }
        let mut peers = String::from("peers:");
        for p in &swarm.peers {
            let (color, mark) = match p.state {
                PeerState::Starting => (CYAN, "○ joining".to_string()),
                PeerState::Running => (GREEN, format!("● {} steps", p.steps)),
                PeerState::Stopped => (YELLOW, "❚❚ frozen".to_string()),
                PeerState::Leaving => (BLUE, "◌ leaving".to_string()),
                PeerState::Gone => (DIM, "✖ gone".to_string()),
            };
            peers.push_str(&format!("  {color}{} {mark}{RESET}", p.name));
        }
        lines.push(peers);
        let st = &swarm.stats;
        lines.push(format!(
            "{DIM}{} ops · {} reduced · {} retries (longest wait {} ms) · {} joins · {} evictions · {} hash mismatches · step pause {} ms{RESET}",
            st.ops,
            human_bytes(st.bytes_reduced),
            st.retries,
            st.max_retry_wait_ms,
            st.joins,
            st.evictions,
            st.mismatches,
            self.step_sleep_ms
        ));
        let mut out = std::io::stdout().lock();
        for l in &lines {
            let _ = writeln!(out, "{l}\x1b[K");
        }
        let _ = out.flush();
        self.drawn = lines.len();
    }

    fn finish(&mut self) {
        self.clear();
        if self.tty {
            print!("\x1b[?7h\x1b[?25h");
        }
        let _ = std::io::stdout().flush();
    }
}

impl Drop for Ui {
    fn drop(&mut self) {
        if self.tty {
            print!("\x1b[?7h\x1b[?25h");
            let _ = std::io::stdout().flush();
        }
    }
}

/// Prints the summary; returns whether the run was clean.
fn summary(swarm: &Swarm, ui: &Ui, ran: Duration) -> bool {
    let st = &swarm.stats;
    let a = &swarm.audit;
    let mut bw = ui.busbw.clone();
    bw.sort_by(|x, y| x.total_cmp(y));
    let median = bw.get(bw.len() / 2).copied().unwrap_or(0.0);
    let best = bw.last().copied().unwrap_or(0.0);
    let ok = st.failures() == 0 && st.ops > 0;
    let (b, r, g, red) = (ui.c(BOLD), ui.c(RESET), ui.c(GREEN), ui.c(RED));
    println!();
    println!("{b}summary{r}");
    println!(
        "  ran {:.1} s: {} steps, {} all-reduces ({} reduced per peer in total), busbw median {median:.3} GB/s, best {best:.3} GB/s",
        ran.as_secs_f64(),
        a.steps(),
        st.ops,
        human_bytes(st.bytes_reduced)
    );
    println!(
        "  membership: {} joins ({} rejoins), {} graceful leaves, {} killed, {} frozen, {} evicted{}, largest world {}",
        st.joins,
        st.rejoins,
        st.graceful_leaves,
        st.kills,
        st.stops,
        st.evictions,
        if st.max_eviction_ms > 0 {
            format!(" (slowest {:.1} s after SIGSTOP)", st.max_eviction_ms as f64 / 1e3)
        } else {
            String::new()
        },
        st.max_world
    );
    println!(
        "  failures recovered: {} all-reduce retries (longest wait on a failed op {} ms), {} skipped steps",
        st.retries, st.max_retry_wait_ms, st.skips
    );
    println!(
        "  shared state: {} fetched by newcomers; {} steps compared across peers, {} hash mismatches",
        human_bytes(st.sync_rx_bytes),
        a.compared_steps(),
        st.mismatches
    );
    if ok {
        println!(
            "  {g}every peer held bit-identical shared state after every sync; nothing crashed or hung{r}"
        );
    } else {
        println!(
            "  {red}problems: {} mismatches, {} inexact results, {} crashes, {} fatal errors, {} hangs{r}",
            st.mismatches, st.inexact, st.crashes, st.fatals, st.hangs
        );
    }
    ok
}
