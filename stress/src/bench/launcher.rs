//! The launcher role: embedded master, probe, peer processes, table.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pccl_core::{MasterConfig, MasterNode};

use super::proto::Msg;
use super::report::{self, Row};
use super::{human_bytes, op_name, probe, Args, Context, Result};

/// What a child's stdout reader reports.
pub enum Event {
    Line(usize, String),
    Eof(usize),
}

struct Kid {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
}

/// Child processes whose stdout lines arrive on one channel. Dropping it
/// kills and reaps every child still running, so no child outlives the
/// launcher's scope, on errors and panics included.
pub struct Children {
    kids: Vec<Kid>,
    tx: mpsc::Sender<Event>,
    rx: mpsc::Receiver<Event>,
}

impl Children {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel();
        Children {
            kids: Vec::new(),
            tx,
            rx,
        }
    }

    /// Starts `current_exe() args...` with piped stdin/stdout (stderr inherited).
    pub fn spawn(&mut self, name: String, args: &[String]) -> Result<()> {
        let exe = std::env::current_exe().context("locating the pccl-bench executable")?;
        let mut child = Command::new(&exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawning {name} ({})", exe.display()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let idx = self.kids.len();
        self.kids.push(Kid { name, child, stdin });
        let stdout = stdout.context("child stdout was not captured")?;
        let tx = self.tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(Event::Line(idx, l)).is_err() {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
            let _ = tx.send(Event::Eof(idx));
        });
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.kids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kids.is_empty()
    }

    pub fn name(&self, i: usize) -> &str {
        self.kids.get(i).map_or("?", |k| k.name.as_str())
    }

    /// Writes one line to child `i`'s stdin.
    pub fn send(&mut self, i: usize, line: &str) -> Result<()> {
        let kid = self.kids.get_mut(i).context("no such child")?;
        let name = kid.name.clone();
        let stdin = kid
            .stdin
            .as_mut()
            .with_context(|| format!("stdin of {name} is closed"))?;
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .with_context(|| format!("writing to {name}"))
    }

    /// The next event, or an error after `timeout` of silence.
    pub fn next(&self, timeout: Duration) -> Result<Event> {
        self.rx.recv_timeout(timeout).map_err(|_| {
            format!(
                "no word from the children for {} s; giving up",
                timeout.as_secs()
            )
            .into()
        })
    }

    /// Waits up to `timeout` for every child to exit (stdin stays open, so a
    /// peer is not told to quit early), then closes stdin and kills the rest.
    pub fn wait_all(&mut self, timeout: Duration) -> Vec<(String, Option<ExitStatus>)> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        for kid in &mut self.kids {
            let status = loop {
                match kid.child.try_wait() {
                    Ok(Some(s)) => break Some(s),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    _ => {
                        kid.stdin = None;
                        let _ = kid.child.kill();
                        let _ = kid.child.wait();
                        break None;
                    }
                }
            };
            out.push((kid.name.clone(), status));
        }
        out
    }
}

impl Default for Children {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for kid in &mut self.kids {
            kid.stdin = None;
            if let Ok(None) = kid.child.try_wait() {
                let _ = kid.child.kill();
            }
            let _ = kid.child.wait();
        }
    }
}

/// Runs the launcher; `Ok(true)` when every result was verified without error.
pub fn run(args: &Args) -> Result<bool> {
    args.validate()?;
    let sizes = args.size_list()?;
    let n = args.peers;
    let local = args.local_peers.unwrap_or(n).min(n);
    let nproc = std::thread::available_parallelism().map_or(0, |p| p.get());
    println!(
        "# pccl-bench {}: {}{}, N={n} peers ({local} local), {} sizes {}..{}, dtype {}{}, op {}, iters {}, warmup {}, verify every {}, pool {:?}, concurrency {:?}, chunk {}, {} CPUs",
        env!("CARGO_PKG_VERSION"),
        args.collective.name(),
        if args.algorithm.is_empty() {
            String::new()
        } else {
            let names: Vec<&str> = args.algorithm.iter().map(|a| a.name()).collect();
            format!(" (algorithm {})", names.join(", "))
        },
        sizes.len(),
        human_bytes(*sizes.iter().min().unwrap_or(&0)),
        human_bytes(*sizes.iter().max().unwrap_or(&0)),
        args.dtype.name(),
        args.quant
            .map(|q| format!(" quantized {} to {}", q.name(), args.quant_dtype.name()))
            .unwrap_or_default(),
        op_name(args.op),
        args.iters,
        args.warmup,
        args.verify_every,
        args.pool_size,
        args.concurrency,
        args.chunk_bytes
            .map_or_else(|| "default".to_string(), human_bytes),
        nproc,
    );

    let mut probes = Vec::new();
    if !args.no_probe {
        let mut conns = args
            .probe_conns
            .clone()
            .unwrap_or_else(|| args.pool_size.clone());
        conns.sort_unstable();
        conns.dedup();
        for span in args.probe_spans()? {
            for &c in &conns {
                let fig = probe::run_ring_probe(args, n, c.max(1), span, None)?;
                println!(
                    "# ring probe: {} processes, {} conn(s)/link, {} MiB/round through a {} buffer: per-link {:.3} GB/s median, {:.3} best, CPU {:.2} ns per byte sent (rounds: {})",
                    fig.procs,
                    fig.conns,
                    args.probe_mib,
                    human_bytes(fig.span),
                    fig.median(),
                    fig.best(),
                    fig.cpu_ns_per_byte(),
                    fig.rounds
                        .iter()
                        .map(|r| format!("{r:.3}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                );
                probes.push(fig);
            }
        }
    }
    if args.reference {
        let bytes = sizes.iter().copied().max().unwrap_or(0) / 4 * 4;
        for no_copy in [false, true] {
            let mut a = args.clone();
            a.reference_no_copy = no_copy;
            let fig = probe::run_ring_probe(&a, n, 1, bytes, Some(bytes))?;
            println!(
                "# reference ring all-reduce{} (no library; blocking threads, 1 conn/link, chunk {}, f32 sum of {}): busbw {:.3} GB/s median, {:.3} best, CPU {:.2} ns per byte sent (rounds: {})",
                if no_copy { ", no up-front copy" } else { "" },
                human_bytes(args.chunk_bytes.unwrap_or(512 << 10)),
                human_bytes(bytes),
                fig.median(),
                fig.best(),
                fig.cpu_ns_per_byte(),
                fig.rounds
                    .iter()
                    .map(|r| format!("{r:.3}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
    }
    if args.probe {
        println!("{}", report::final_summary(n, &[], &probes, &[]));
        return Ok(true);
    }

    let mut all_rows = Vec::new();
    let mut failures = Vec::new();
    let algos: Vec<Option<pccl_core::Algorithm>> = if args.algorithm.is_empty() {
        vec![None]
    } else {
        args.algorithm.iter().copied().map(Some).collect()
    };
    for (algo, &pool) in algos
        .iter()
        .flat_map(|a| args.pool_size.iter().map(move |p| (*a, p)))
    {
        let mut one = args.clone();
        one.algorithm = algo.into_iter().collect();
        let args = &one;
        let mut master = None;
        let addr = match args.master {
            Some(a) => a,
            None => {
                let mut m = MasterNode::bind(args.master_bind, MasterConfig::default())
                    .context("binding the embedded master")?;
                m.run().context("starting the embedded master")?;
                let a = m.local_addr();
                master = Some(m);
                a
            }
        };
        println!("#");
        println!(
            "# {}pool size {pool}: master {addr}{}",
            algo.map(|a| format!("algorithm {}, ", a.name()))
                .unwrap_or_default(),
            if master.is_some() { " (embedded)" } else { "" }
        );
        let (rows, fails) = run_peers(args, addr, pool, local, &sizes)?;
        for c in &args.concurrency {
            let of_c: Vec<Row> = rows.iter().filter(|r| r.conc == *c).cloned().collect();
            if let Some(s) = report::config_summary(&of_c) {
                println!("{s}");
            }
        }
        all_rows.extend(rows);
        failures.extend(fails);
        if let Some(mut m) = master {
            m.interrupt();
            let _ = m.await_termination();
        }
        if !failures.is_empty() {
            break;
        }
    }
    println!(
        "{}",
        report::final_summary(n, &all_rows, &probes, &failures)
    );
    let errors: u64 = all_rows.iter().map(Row::errors).sum();
    Ok(failures.is_empty() && errors == 0)
}

/// Arguments of a spawned peer.
fn peer_args(
    args: &Args,
    master: SocketAddr,
    pool: u32,
    rank: Option<u32>,
    sizes: &[u64],
) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "--role".into(),
        "peer".into(),
        "--machine".into(),
        "--master".into(),
        master.to_string(),
        "--peers".into(),
        args.peers.to_string(),
        "--pool-size".into(),
        pool.to_string(),
        "--concurrency".into(),
        args.concurrency
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(","),
        "--sizes".into(),
        sizes
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(","),
        "--dtype".into(),
        args.dtype.name().into(),
        "--op".into(),
        op_name(args.op).into(),
        "--iters".into(),
        args.iters.to_string(),
        "--warmup".into(),
        args.warmup.to_string(),
        "--verify-every".into(),
        args.verify_every.to_string(),
        "--latency-samples".into(),
        args.latency_samples.to_string(),
        "--join-timeout-s".into(),
        args.join_timeout_s.to_string(),
        "--peer-group".into(),
        args.peer_group.to_string(),
    ];
    if let Some(r) = rank {
        v.extend(["--rank-hint".into(), r.to_string()]);
    }
    v.extend(["--collective".into(), args.collective.name().into()]);
    if let [a] = args.algorithm[..] {
        v.extend(["--algorithm".into(), a.name().into()]);
    }
    if let Some(c) = args.chunk_bytes {
        v.extend(["--chunk-bytes".into(), c.to_string()]);
    }
    if let Some(t) = args.worker_threads {
        v.extend(["--worker-threads".into(), t.to_string()]);
    }
    if let Some(q) = args.quant {
        v.extend([
            "--quant".into(),
            q.name().into(),
            "--quant-dtype".into(),
            args.quant_dtype.name().into(),
        ]);
    }
    if args.no_barrier {
        v.push("--no-barrier".into());
    }
    if let Some(ip) = args.bind_ip {
        v.extend(["--bind-ip".into(), ip.to_string()]);
    }
    if let Some(ip) = args.advertise_ip {
        v.extend(["--advertise-ip".into(), ip.to_string()]);
    }
    v
}

/// Per-size reports of the local peers, until all of them have reported.
struct Pending {
    reports: Vec<Option<Msg>>,
}

/// Spawns the local peers for one pool size and prints rows as they complete.
fn run_peers(
    args: &Args,
    master: SocketAddr,
    pool: u32,
    local: u32,
    sizes: &[u64],
) -> Result<(Vec<Row>, Vec<String>)> {
    let mut kids = Children::new();
    let t0 = Instant::now();
    for i in 0..local {
        // Rank hints only when every peer is ours; otherwise the peers agree.
        let rank = (local == args.peers).then_some(i);
        kids.spawn(
            format!("peer {i}"),
            &peer_args(args, master, pool, rank, sizes),
        )?;
    }
    let quant = args.quant.is_some();
    let dtype_label = match args.quant {
        Some(_) => format!("{}>{}", args.dtype.name(), args.quant_dtype.name()),
        None => args.dtype.name().to_string(),
    };
    let nk = kids.len();
    let mut ready = 0;
    let mut done = vec![false; nk];
    let mut eof = vec![false; nk];
    let mut failures = Vec::new();
    let mut rows = Vec::new();
    let mut pending: HashMap<(u32, u64), Pending> = HashMap::new();
    let mut latencies = Vec::new();
    let idle = Duration::from_secs(args.idle_timeout_s);
    while eof.iter().any(|e| !e) {
        let ev = match kids.next(idle) {
            Ok(ev) => ev,
            Err(e) => {
                failures.push(e.to_string());
                break;
            }
        };
        let (i, line) = match ev {
            Event::Eof(i) => {
                if let Some(e) = eof.get_mut(i) {
                    *e = true;
                }
                if !done.get(i).copied().unwrap_or(true) {
                    failures.push(format!("{} exited before finishing", kids.name(i)));
                }
                continue;
            }
            Event::Line(i, l) => (i, l),
        };
        let Some(msg) = Msg::parse(&line) else {
            eprintln!("[{}] {line}", kids.name(i));
            continue;
        };
        match msg.kind.as_str() {
            "ready" => {
                ready += 1;
                if ready == nk {
                    println!(
                        "# {nk} local peer(s) joined in {:.0} ms (chunk {} B)",
                        t0.elapsed().as_secs_f64() * 1e3,
                        msg.get("chunk_bytes").unwrap_or("?")
                    );
                }
            }
            "latency" => {
                latencies.push((
                    msg.num::<f64>("pending_us")?,
                    msg.num::<f64>("allreduce4_us")?,
                ));
                if latencies.len() == nk {
                    let p = report::median(&latencies.iter().map(|l| l.0).collect::<Vec<_>>());
                    let a = report::median(&latencies.iter().map(|l| l.1).collect::<Vec<_>>());
                    println!(
                        "# control latency ({} samples, median over peers): are_peers_pending {p:.1} us (one master round trip), 4-byte all-reduce {a:.1} us",
                        args.latency_samples
                    );
                    println!("#");
                    println!("{}", report::header(quant));
                }
            }
            "result" => {
                let key = (msg.num::<u32>("conc")?, msg.num::<u64>("bytes")?);
                let entry = pending.entry(key).or_insert_with(|| Pending {
                    reports: vec![None; nk],
                });
                if let Some(slot) = entry.reports.get_mut(i) {
                    *slot = Some(msg);
                }
                if entry.reports.iter().all(Option::is_some) {
                    let reports: Vec<Msg> = pending
                        .remove(&key)
                        .map(|p| p.reports.into_iter().flatten().collect())
                        .unwrap_or_default();
                    let row = combine(&reports, pool, &dtype_label, &op_label(args), quant)?;
                    let row = Row {
                        coll: args.collective,
                        ..row
                    };
                    if latencies.len() < nk && rows.is_empty() {
                        println!("{}", report::header(quant));
                    }
                    println!("{}", report::format_row(&row, quant));
                    rows.push(row);
                }
            }
            "done" => {
                if let Some(d) = done.get_mut(i) {
                    *d = true;
                }
            }
            "error" => {
                let m = msg.get("msg").unwrap_or("unknown error").to_string();
                eprintln!("# {} failed: {m}", kids.name(i));
                failures.push(format!("{}: {m}", kids.name(i)));
            }
            other => eprintln!("[{}] unexpected report '{other}'", kids.name(i)),
        }
    }
    for (name, status) in kids.wait_all(Duration::from_secs(15)) {
        match status {
            Some(s) if s.success() => {}
            Some(s) => failures.push(format!("{name} exited with {s}")),
            None => failures.push(format!("{name} did not exit; killed")),
        }
    }
    failures.dedup();
    Ok((rows, failures))
}

/// Combines the peers' reports of one size: per iteration the slowest peer.
fn combine(reports: &[Msg], pool: u32, dtype: &str, op: &str, quant: bool) -> Result<Row> {
    let first = reports.first().context("no reports")?;
    let mut times: Vec<f64> = first.floats("times")?;
    let mut tx = 0u64;
    let mut rx = 0u64;
    let mut wrong = 0u64;
    let mut checked = u32::MAX;
    let mut max_err: f64 = 0.0;
    let mut parity_errors = 0;
    let mut cpu = 0.0;
    let hash0 = first.get("hash")?.to_string();
    for m in reports {
        let t = m.floats("times")?;
        if t.len() != times.len() {
            return Err("peers report different iteration counts".into());
        }
        for (a, b) in times.iter_mut().zip(t) {
            *a = a.max(b);
        }
        tx += m.num::<u64>("tx")?;
        rx += m.num::<u64>("rx")?;
        wrong += m.num::<u64>("wrong")?;
        checked = checked.min(m.num::<u32>("checked")?);
        let e = m.num::<f64>("maxerr")?;
        if e.is_nan() || e > max_err {
            max_err = e;
        }
        cpu += m.num::<f64>("cpu")?;
        if m.get("hash")? != hash0 {
            parity_errors += 1;
        }
    }
    let n = reports.len() as u64;
    Ok(Row {
        world: first.num("world")?,
        pool,
        conc: first.num("conc")?,
        bytes: first.num("bytes")?,
        count: first.num("count")?,
        dtype: dtype.to_string(),
        op: op.to_string(),
        times_us: times,
        tx: tx / n,
        rx: rx / n,
        wrong,
        checked,
        max_err: quant.then_some(max_err),
        parity_errors,
        cpu_us: cpu / n as f64,
        coll: super::Collective::AllReduce,
    })
}

/// The table's `redop` column: the reduce op, or `-` for collectives that
/// do not reduce.
pub fn op_label(args: &Args) -> String {
    match args.collective {
        super::Collective::Broadcast | super::Collective::AllGather => "-".into(),
        _ => op_name(args.op).into(),
    }
}
