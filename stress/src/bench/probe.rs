//! Raw loopback TCP ring bandwidth: the reference for the all-reduce's busbw.
//!
//! `N` probe processes form a ring: each listens, connects `C` TCP
//! connections (`TCP_NODELAY`, kernel buffer autotuning, like the library's
//! defaults) to its right neighbour and accepts `C` from its left one. In a
//! round, all start together (the launcher writes `go` to every stdin) and
//! each streams `--probe-mib` MiB to the right while receiving as much from
//! the left — what a ring all-reduce does. A round's per-link figure is the
//! bytes of one link divided by the slowest process's time (the all-reduce is
//! as slow as its slowest link too), in GB/s.

use std::io::{BufRead, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::launcher::{Children, Event};
use super::proto::{self, Msg};
use super::report::ProbeFigure;
use super::{process_cpu_us, Args, Context, Result};

/// Launcher side: runs the probe with `n` processes and `conns` connections
/// per link; with `reference = Some(bytes)`, the reference all-reduce of
/// `bytes` instead (one connection per link), reported as busbw.
pub fn run_ring_probe(
    args: &Args,
    n: u32,
    conns: u32,
    span: u64,
    reference: Option<u64>,
) -> Result<ProbeFigure> {
    let mut kids = Children::new();
    for i in 0..n {
        let mut a = vec![
            "--role".to_string(),
            "probe".into(),
            "--machine".into(),
            "--probe-conns-one".into(),
            conns.to_string(),
            "--probe-mib".into(),
            args.probe_mib.to_string(),
            "--probe-buf".into(),
            args.probe_buf.to_string(),
            "--probe-span".into(),
            span.to_string(),
        ];
        if let Some(ip) = args.bind_ip {
            a.extend(["--bind-ip".into(), ip.to_string()]);
        }
        if let Some(bytes) = reference {
            if args.reference_no_copy {
                a.push("--reference-no-copy".into());
            }
            a.extend([
                "--reference-rank".into(),
                format!("{i}/{n}"),
                "--max-bytes".into(),
                bytes.to_string(),
            ]);
            if let Some(c) = args.chunk_bytes {
                a.extend(["--chunk-bytes".into(), c.to_string()]);
            }
        }
        kids.spawn(format!("probe {i}"), &a)?;
    }
    let idle = Duration::from_secs(args.idle_timeout_s.min(120));
    let nk = kids.len();
    // Listening ports.
    let mut addrs: Vec<Option<SocketAddr>> = vec![None; nk];
    while addrs.iter().any(Option::is_none) {
        let (i, m) = next_msg(&kids, idle)?;
        if m.kind == "probe-listen" {
            addrs[i] = Some(m.get("addr")?.parse().context("probe address")?);
        }
    }
    for i in 0..nk {
        let right = addrs[(i + 1) % nk].context("missing probe address")?;
        kids.send(i, &format!("right {right}"))?;
    }
    wait_all_kind(&kids, nk, "probe-ready", idle)?;
    // Bytes each process sends per round.
    let bytes_per_link = match reference {
        Some(b) => 2.0 * (n as f64 - 1.0) / n as f64 * b as f64,
        None => (args.probe_mib << 20) as f64,
    };
    let mut rounds = Vec::new();
    let mut cpu = Vec::new();
    for _ in 0..args.probe_rounds {
        for i in 0..nk {
            kids.send(i, "go")?;
        }
        let msgs = wait_all_kind(&kids, nk, "probe-round", idle)?;
        let mut slowest: f64 = 0.0;
        let mut cpu_us = 0.0;
        for m in &msgs {
            slowest = slowest.max(m.num::<f64>("secs")?);
            cpu_us += m.num::<f64>("cpu_us")?;
            let wrong = m.num::<u64>("wrong")?;
            if wrong > 0 {
                return Err(format!("reference all-reduce: {wrong} wrong elements").into());
            }
        }
        rounds.push(bytes_per_link / slowest / 1e9);
        cpu.push(cpu_us / msgs.len().max(1) as f64 * 1e3 / bytes_per_link);
    }
    for i in 0..nk {
        let _ = kids.send(i, "quit");
    }
    for (name, status) in kids.wait_all(Duration::from_secs(10)) {
        if !status.is_some_and(|s| s.success()) {
            return Err(format!("{name} did not exit cleanly ({status:?})").into());
        }
    }
    Ok(ProbeFigure {
        procs: n,
        conns,
        span,
        rounds,
        cpu_ns_per_byte: cpu,
    })
}

/// The next protocol message of any probe child (other lines are forwarded).
fn next_msg(kids: &Children, idle: Duration) -> Result<(usize, Msg)> {
    loop {
        match kids.next(idle)? {
            Event::Eof(i) => return Err(format!("{} exited early", kids.name(i)).into()),
            Event::Line(i, l) => match Msg::parse(&l) {
                Some(m) if m.kind == "error" => {
                    return Err(
                        format!("{} failed: {}", kids.name(i), m.get("msg").unwrap_or("?")).into(),
                    )
                }
                Some(m) => return Ok((i, m)),
                None => eprintln!("[{}] {l}", kids.name(i)),
            },
        }
    }
}

/// Waits until every child sent a message of `kind`; returns them by child.
fn wait_all_kind(kids: &Children, nk: usize, kind: &str, idle: Duration) -> Result<Vec<Msg>> {
    let mut got: Vec<Option<Msg>> = vec![None; nk];
    while got.iter().any(Option::is_none) {
        let (i, m) = next_msg(kids, idle)?;
        if m.kind == kind {
            if let Some(g) = got.get_mut(i) {
                *g = Some(m);
            }
        }
    }
    Ok(got.into_iter().flatten().collect())
}

/// Child side (`--role probe`).
pub fn run_child(args: &Args) -> Result<()> {
    let r = child_inner(args);
    if let Err(e) = &r {
        proto::emit("error", &[("msg", e.to_string())]);
    }
    r
}

fn child_inner(args: &Args) -> Result<()> {
    let conns = args.probe_conns_one.max(1) as usize;
    let total = args.probe_mib << 20;
    let buf = usize::try_from(args.probe_buf).context("--probe-buf")?;
    let ip = args.bind_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let listener = TcpListener::bind((ip, 0)).context("binding the probe listener")?;
    let addr = listener.local_addr().context("probe listener address")?;
    proto::emit("probe-listen", &[("addr", addr.to_string())]);

    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut next_cmd = || -> Result<String> {
        match lines.next() {
            Some(l) => l.context("reading a command"),
            None => Err("launcher closed stdin".into()),
        }
    };
    let cmd = next_cmd()?;
    let right: SocketAddr = cmd
        .strip_prefix("right ")
        .context("expected 'right ADDR'")?
        .trim()
        .parse()
        .context("right neighbour address")?;

    let acceptor = std::thread::spawn(move || -> std::io::Result<Vec<TcpStream>> {
        (0..conns)
            .map(|_| listener.accept().map(|(s, _)| s))
            .collect()
    });
    let mut outs = Vec::with_capacity(conns);
    for _ in 0..conns {
        let s = TcpStream::connect_timeout(&right, Duration::from_secs(10))
            .with_context(|| format!("connecting to {right}"))?;
        s.set_nodelay(true).context("TCP_NODELAY")?;
        outs.push(s);
    }
    let ins = acceptor
        .join()
        .map_err(|_| "acceptor thread panicked")?
        .context("accepting probe connections")?;
    for s in &ins {
        s.set_nodelay(true).context("TCP_NODELAY")?;
    }
    proto::emit("probe-ready", &[]);
    if let Some(rr) = &args.reference_rank {
        let (r, n) = rr
            .split_once('/')
            .and_then(|(r, n)| Some((r.parse::<u32>().ok()?, n.parse::<u32>().ok()?)))
            .context("--reference-rank R/N")?;
        let out = outs.first().context("no outgoing probe connection")?;
        let inp = ins.first().context("no incoming probe connection")?;
        return reference_child(args, r, n, out, inp, &mut next_cmd);
    }

    // Per-connection share of the bytes (the first ones take the remainder).
    let share = |k: usize| total / conns as u64 + u64::from((k as u64) < total % conns as u64);
    let span = args
        .probe_spans()?
        .first()
        .map(|s| usize::try_from(*s))
        .context("--probe-span")?
        .context("--probe-span")?;
    // The connections share the span (as a tensor's sub-chunks share it).
    let span = (span / conns).max(buf);
    let mut sbufs: Vec<Vec<u8>> = (0..conns).map(|_| vec![0x5Au8; span]).collect();
    let mut rbufs: Vec<Vec<u8>> = (0..conns).map(|_| vec![0u8; span]).collect();
    loop {
        let cmd = next_cmd()?;
        match cmd.trim() {
            "quit" => return Ok(()),
            "go" => {}
            other => return Err(format!("unknown probe command {other:?}").into()),
        }
        let cpu0 = process_cpu_us();
        let start = Instant::now();
        let results: Vec<std::io::Result<()>> = std::thread::scope(|s| {
            let mut hs = Vec::new();
            for (k, (out, b)) in outs.iter().zip(sbufs.iter_mut()).enumerate() {
                let n = share(k);
                hs.push(s.spawn(move || send_n(out, n, b, buf)));
            }
            for (k, (inp, b)) in ins.iter().zip(rbufs.iter_mut()).enumerate() {
                let n = share(k);
                hs.push(s.spawn(move || recv_n(inp, n, b, buf)));
            }
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(std::io::Error::other("probe thread panicked")))
                })
                .collect()
        });
        let secs = start.elapsed().as_secs_f64();
        let cpu = process_cpu_us() - cpu0;
        for r in results {
            r.context("probe transfer")?;
        }
        proto::emit(
            "probe-round",
            &[
                ("secs", format!("{secs:.6}")),
                ("cpu_us", format!("{cpu:.1}")),
                ("bytes", total.to_string()),
                ("wrong", "0".into()),
            ],
        );
    }
}

/// A buffer shared by the reference's sender and receiver threads.
#[derive(Clone, Copy)]
struct Shared {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: only a pointer and a length; `reference_child` keeps the buffer
// alive until both threads are joined, and the ring schedule never has one
// thread write bytes the other is reading (see there).
unsafe impl Send for Shared {}

/// The reference ring all-reduce (f32 sum), driven by `go`/`quit` commands:
/// reduce-scatter then all-gather over one blocking connection per link, in
/// sub-chunks of `--chunk-bytes` (default 512 KiB), with a sender thread fed
/// by the receiving thread as chunks become final — the library's schedule
/// without its runtime, framing, pools or master. Timed from the copy of the
/// input into the result buffer (which the library does too) to the end.
fn reference_child(
    args: &Args,
    rank: u32,
    world: u32,
    out: &TcpStream,
    inp: &TcpStream,
    next_cmd: &mut dyn FnMut() -> Result<String>,
) -> Result<()> {
    use pccl_core::{kernels, DataType, ReduceOp};
    let ds = 4usize;
    let count = usize::try_from(args.max_bytes).context("--max-bytes")? / ds;
    let chunk_elems =
        (usize::try_from(args.chunk_bytes.unwrap_or(512 << 10)).context("chunk")? / ds).max(1);
    let wl = super::data::Workload::new(DataType::F32, ReduceOp::Sum, world, None)?;
    let mut src = vec![0u8; count * ds];
    wl.fill(&mut src, rank, 1);
    let mut expected = vec![0u8; count * ds];
    wl.expected(&mut expected, 1);
    let mut acc = vec![0u8; count * ds];
    let mut tmp = vec![0u8; chunk_elems * ds];
    let (w, r) = (world as usize, rank as usize);
    let seg = |s: usize| (s * count / w, (s + 1) * count / w);
    // Byte ranges of the chunks of segment `s`.
    let chunks = move |s: usize| {
        let (a, b) = seg(s);
        (a..b)
            .step_by(chunk_elems)
            .map(move |x| (x * ds, (chunk_elems.min(b - x)) * ds))
    };
    let recv_seg = |step: usize| {
        if step < w - 1 {
            (r + w - step - 1) % w
        } else {
            (r + w - (step - (w - 1))) % w
        }
    };
    loop {
        match next_cmd()?.trim() {
            "quit" => return Ok(()),
            "go" => {}
            other => return Err(format!("unknown probe command {other:?}").into()),
        }
        acc.fill(0);
        let cpu0 = process_cpu_us();
        let start = Instant::now();
        let no_copy = args.reference_no_copy;
        if !no_copy {
            acc.copy_from_slice(&src);
        }
        let src_ref: &[u8] = &src;
        let shared = Shared {
            ptr: acc.as_mut_ptr(),
            len: acc.len(),
        };
        let (tx, rx) = std::sync::mpsc::channel::<(usize, usize)>();
        let own: Vec<(usize, usize)> = chunks(r).collect();
        let res: Result<()> = std::thread::scope(|s| {
            let sender = s.spawn(move || -> std::io::Result<()> {
                let sh = shared;
                let mut o = out;
                let send = |o: &mut &TcpStream, (off, len): (usize, usize)| {
                    debug_assert!(off + len <= sh.len);
                    // SAFETY: the range is final: the receiving thread queued
                    // it after its last write, and writes it again only after
                    // the right neighbour received these bytes (all-gather
                    // data for a range comes back around the ring only after
                    // this send completed), so nothing writes it meanwhile.
                    let b = unsafe { std::slice::from_raw_parts(sh.ptr.add(off), len) };
                    o.write_all(b)
                };
                for c in own {
                    if no_copy {
                        o.write_all(&src_ref[c.0..c.0 + c.1])?;
                    } else {
                        send(&mut o, c)?;
                    }
                }
                for c in rx {
                    send(&mut o, c)?;
                }
                Ok(())
            });
            let mut i = inp;
            for step in 0..2 * (w - 1) {
                let sg = recv_seg(step);
                for (off, len) in chunks(sg) {
                    // SAFETY: see the sender: this range is not being sent now.
                    let dst = unsafe { std::slice::from_raw_parts_mut(shared.ptr.add(off), len) };
                    if step < w - 1 {
                        i.read_exact(&mut tmp[..len]).context("reference receive")?;
                        if no_copy {
                            // The input joins the result chunk by chunk, while hot.
                            dst.copy_from_slice(&src_ref[off..off + len]);
                        }
                        kernels::reduce_into(DataType::F32, ReduceOp::Sum, dst, &tmp[..len]);
                    } else {
                        i.read_exact(dst).context("reference receive")?;
                    }
                    if step + 1 < 2 * (w - 1) {
                        tx.send((off, len))
                            .map_err(|_| "reference sender stopped")?;
                    }
                }
            }
            drop(tx);
            sender
                .join()
                .map_err(|_| "reference sender panicked")?
                .context("reference send")
        });
        let secs = start.elapsed().as_secs_f64();
        let cpu = process_cpu_us() - cpu0;
        res?;
        let wrong = super::data::check(DataType::F32, false, 0.0, &acc, &expected).wrong;
        proto::emit(
            "probe-round",
            &[
                ("secs", format!("{secs:.6}")),
                ("cpu_us", format!("{cpu:.1}")),
                ("bytes", acc.len().to_string()),
                ("wrong", wrong.to_string()),
            ],
        );
    }
}

/// Sends `n` bytes in writes of `step` bytes, walking through `span` cyclically.
fn send_n(mut s: &TcpStream, n: u64, span: &mut [u8], step: usize) -> std::io::Result<()> {
    let mut left = n;
    let mut pos = 0;
    while left > 0 {
        if pos + step > span.len() {
            pos = 0;
        }
        let k = (step as u64).min(left) as usize;
        s.write_all(&span[pos..pos + k])?;
        pos += k;
        left -= k as u64;
    }
    Ok(())
}

/// Receives `n` bytes in reads of at most `step` bytes into `span`, cyclically.
fn recv_n(mut s: &TcpStream, n: u64, span: &mut [u8], step: usize) -> std::io::Result<()> {
    let mut left = n;
    let mut pos = 0;
    while left > 0 {
        if pos + step > span.len() {
            pos = 0;
        }
        let k = (step as u64).min(left) as usize;
        let got = s.read(&mut span[pos..pos + k])?;
        pos += got;
        if got == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "left neighbour closed the probe connection",
            ));
        }
        left -= got as u64;
    }
    Ok(())
}
