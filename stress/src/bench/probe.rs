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
use super::{Args, Context, Result};

/// Launcher side: runs the probe with `n` processes and `conns` connections per link.
pub fn run_ring_probe(args: &Args, n: u32, conns: u32) -> Result<ProbeFigure> {
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
        ];
        if let Some(ip) = args.bind_ip {
            a.extend(["--bind-ip".into(), ip.to_string()]);
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
    let bytes_per_link = (args.probe_mib << 20) as f64;
    let mut rounds = Vec::new();
    for _ in 0..args.probe_rounds {
        for i in 0..nk {
            kids.send(i, "go")?;
        }
        let msgs = wait_all_kind(&kids, nk, "probe-round", idle)?;
        let mut slowest: f64 = 0.0;
        for m in &msgs {
            slowest = slowest.max(m.num::<f64>("secs")?);
        }
        rounds.push(bytes_per_link / slowest / 1e9);
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
        rounds,
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

    // Per-connection share of the bytes (the first ones take the remainder).
    let share = |k: usize| total / conns as u64 + u64::from((k as u64) < total % conns as u64);
    let mut sbufs: Vec<Vec<u8>> = (0..conns).map(|_| vec![0x5Au8; buf]).collect();
    let mut rbufs: Vec<Vec<u8>> = (0..conns).map(|_| vec![0u8; buf]).collect();
    loop {
        let cmd = next_cmd()?;
        match cmd.trim() {
            "quit" => return Ok(()),
            "go" => {}
            other => return Err(format!("unknown probe command {other:?}").into()),
        }
        let start = Instant::now();
        let results: Vec<std::io::Result<()>> = std::thread::scope(|s| {
            let mut hs = Vec::new();
            for (k, (out, b)) in outs.iter().zip(sbufs.iter_mut()).enumerate() {
                let n = share(k);
                hs.push(s.spawn(move || send_n(out, n, b)));
            }
            for (k, (inp, b)) in ins.iter().zip(rbufs.iter_mut()).enumerate() {
                let n = share(k);
                hs.push(s.spawn(move || recv_n(inp, n, b)));
            }
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(std::io::Error::other("probe thread panicked")))
                })
                .collect()
        });
        let secs = start.elapsed().as_secs_f64();
        for r in results {
            r.context("probe transfer")?;
        }
        proto::emit(
            "probe-round",
            &[("secs", format!("{secs:.6}")), ("bytes", total.to_string())],
        );
    }
}

fn send_n(mut s: &TcpStream, n: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let mut left = n;
    while left > 0 {
        let k = (buf.len() as u64).min(left) as usize;
        s.write_all(&buf[..k])?;
        left -= k as u64;
    }
    Ok(())
}

fn recv_n(mut s: &TcpStream, n: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let mut left = n;
    while left > 0 {
        let k = (buf.len() as u64).min(left) as usize;
        let got = s.read(&mut buf[..k])?;
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
