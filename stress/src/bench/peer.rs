//! The peer role: join, agree on ranks, sweep sizes, time, verify, report.
//!
//! Timing: each timed iteration is one batch of `conc` all-reduces (one
//! blocking call when `conc == 1`), timed on this peer from the call to its
//! return. An all-reduce ends for every peer when the master announces the
//! verdict, so consecutive iterations start together on all peers; after a
//! verified iteration (local work of uneven length) an untimed 4-byte
//! all-reduce re-synchronizes the peers before the next timed one
//! (`--no-barrier` disables it). The launcher takes, per iteration, the
//! slowest peer's time, then the median over iterations.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use pccl_core::{
    CollectiveInfo, Communicator, CommunicatorConfig, DataType, Error as PcclError,
    QuantizationOptions, ReduceDescriptor, ReduceInfo, ReduceOp,
};

use super::data::{check, Workload};
use super::launcher::op_label;
use super::report::{self, median, Row};
use super::{process_cpu_us, proto, Args, Collective, Context, Result};

/// Tags: the timed ops use `0..conc`; these are for the helpers.
const BARRIER_TAG: u64 = 1 << 40;
const LATENCY_TAG: u64 = (1 << 40) + 1;
const RANK_CHECK_TAG: u64 = (1 << 40) + 2;
const RANK_AGREE_TAG: u64 = 1 << 41;
const RING_MAP_TAG: u64 = (1 << 40) + 3;

/// Runs the peer role; in `--machine` mode errors are also reported to the launcher.
pub fn run(args: &Args) -> Result<()> {
    if args.machine {
        exit_when_launcher_goes();
    }
    let r = run_inner(args);
    if let Err(e) = &r {
        if args.machine {
            proto::emit("error", &[("msg", e.to_string())]);
        }
    }
    r
}

/// A spawned peer must not outlive its launcher: its stdin is a pipe from
/// the launcher, and EOF means the launcher is gone.
fn exit_when_launcher_goes() {
    std::thread::spawn(|| {
        let mut sink = [0u8; 256];
        let mut stdin = std::io::stdin();
        loop {
            match stdin.read(&mut sink) {
                Ok(0) | Err(_) => {
                    eprintln!("pccl-bench peer: launcher went away; exiting");
                    std::process::exit(3);
                }
                Ok(_) => {}
            }
        }
    });
}

fn run_inner(args: &Args) -> Result<()> {
    args.validate()?;
    let master = args
        .master
        .context("a peer needs --master ADDR (the master to join)")?;
    if args.pool_size.len() != 1 {
        return Err(
            "a peer runs one --pool-size; start one set of peers per value (the launcher does)"
                .into(),
        );
    }
    let pool = args.pool_size[0];
    let mut cfg = CommunicatorConfig::new(master).with_ephemeral_ports();
    cfg.bind_ip = args.bind_ip.unwrap_or(if master.ip().is_loopback() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    });
    cfg.advertised_ip = args.advertise_ip;
    cfg.peer_group = args.peer_group;
    cfg.p2p_connection_pool_size = pool;
    if let Some(c) = args.chunk_bytes {
        cfg.chunk_bytes = usize::try_from(c).context("--chunk-bytes")?;
    }
    if let Some(t) = args.worker_threads {
        cfg.worker_threads = t;
    }
    match args.algorithm[..] {
        [] => {}
        [a] => cfg.algorithm = a,
        _ => {
            return Err(
                "a peer runs one --algorithm; start one set of peers per value (the launcher does)"
                    .into(),
            )
        }
    }
    let chunk_bytes = cfg.chunk_bytes;
    let comm = Communicator::new(cfg).context("creating the communicator")?;

    let t_join = Instant::now();
    let deadline = t_join + Duration::from_secs(args.join_timeout_s);
    connect(&comm, deadline)?;
    let world = wait_for_world(&comm, args.peers, deadline)?;
    let join_ms = t_join.elapsed().as_secs_f64() * 1e3;
    if world != args.peers {
        eprintln!(
            "pccl-bench peer: the group holds {world} peers, not {}; using {world}",
            args.peers
        );
    }
    let rank = match args.rank_hint {
        Some(h) if h < world => h,
        Some(h) => {
            return Err(format!("--rank-hint {h} is not below the world size {world}").into())
        }
        None => agree_rank(&comm, world)?,
    };
    check_ranks(&comm, rank, world)?;
    // Which bench rank sits at each ring position (the ranks of broadcast,
    // all-gather and reduce-scatter).
    let ring = if args.collective == Collective::AllReduce {
        Vec::new()
    } else {
        ring_map(&comm, rank, world)?
    };

    let lat = if args.latency_samples > 0 {
        Some(latency(&comm, args.latency_samples)?)
    } else {
        None
    };
    let quant = args.quant.map(|q| (args.quant_dtype, q.algorithm()));
    let dtype_label = match args.quant {
        Some(_) => format!("{}>{}", args.dtype.name(), args.quant_dtype.name()),
        None => args.dtype.name().to_string(),
    };
    if args.machine {
        proto::emit(
            "ready",
            &[
                ("rank", rank.to_string()),
                ("world", world.to_string()),
                ("join_ms", format!("{join_ms:.1}")),
                ("chunk_bytes", chunk_bytes.to_string()),
            ],
        );
        if let Some((p, a)) = lat {
            proto::emit(
                "latency",
                &[
                    ("pending_us", format!("{p:.1}")),
                    ("allreduce4_us", format!("{a:.1}")),
                ],
            );
        }
    } else {
        println!(
            "# pccl-bench peer: rank {rank} of {world}, master {master}, pool {pool}, chunk {} B, joined in {join_ms:.0} ms",
            chunk_bytes
        );
        if let Some((p, a)) = lat {
            println!("# control latency: are_peers_pending median {p:.1} us, 4-byte all-reduce median {a:.1} us");
        }
        println!("{}", report::header(quant.is_some()));
    }

    let wl = Workload::new(args.dtype, args.op, world, quant)?;
    let sizes = args.size_list()?;
    let mut rows = Vec::new();
    for &conc in &args.concurrency {
        for &size in &sizes {
            let r = if args.collective == Collective::AllReduce {
                run_size(&comm, args, &wl, rank, conc, size)?
            } else {
                run_size_coll(&comm, args, &wl, rank, &ring, size)?
            };
            if args.machine {
                proto::emit(
                    "result",
                    &[
                        ("conc", conc.to_string()),
                        ("bytes", r.bytes.to_string()),
                        ("count", r.count.to_string()),
                        ("world", r.world.to_string()),
                        ("tx", r.tx.to_string()),
                        ("rx", r.rx.to_string()),
                        ("wrong", r.wrong.to_string()),
                        ("checked", r.checked.to_string()),
                        ("maxerr", format!("{:e}", r.max_err)),
                        ("hash", format!("{:016x}", r.hash)),
                        ("cpu", format!("{:.1}", r.cpu_us)),
                        (
                            "times",
                            r.times_us
                                .iter()
                                .map(|t| format!("{t:.3}"))
                                .collect::<Vec<_>>()
                                .join(","),
                        ),
                    ],
                );
            } else {
                let row = Row {
                    world: r.world,
                    pool,
                    conc,
                    bytes: r.bytes,
                    count: r.count,
                    dtype: dtype_label.clone(),
                    op: op_label(args),
                    times_us: r.times_us.clone(),
                    tx: r.tx,
                    rx: r.rx,
                    wrong: r.wrong,
                    checked: r.checked,
                    max_err: quant.map(|_| r.max_err),
                    parity_errors: 0,
                    cpu_us: r.cpu_us,
                    coll: args.collective,
                };
                println!("{}", report::format_row(&row, quant.is_some()));
                rows.push(row);
            }
        }
    }
    if args.machine {
        proto::emit("done", &[]);
    } else {
        println!("{}", report::final_summary(world, &rows, &[], &[]));
    }
    comm.close();
    let errors: u64 = rows.iter().map(Row::errors).sum();
    if errors > 0 {
        return Err(format!("{errors} wrong elements").into());
    }
    Ok(())
}

/// Connects, retrying while the master is not reachable yet.
fn connect(comm: &Communicator, deadline: Instant) -> Result<()> {
    loop {
        match comm.connect() {
            Ok(()) => return Ok(()),
            Err(PcclError::MasterConnectionFailed(e)) if Instant::now() < deadline => {
                tracing::debug!("master not reachable yet ({e}); retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(format!("connecting to the master: {e}").into()),
        }
    }
}

/// Runs the admission loop until the group holds `n` peers; returns its size.
fn wait_for_world(comm: &Communicator, n: u32, deadline: Instant) -> Result<u32> {
    loop {
        let w = comm.world().context("reading the world size")?.group_world;
        if w >= n {
            return Ok(w);
        }
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {n} peers (the group holds {w})").into());
        }
        if comm.are_peers_pending().context("are_peers_pending")? {
            comm.update_topology().context("update_topology")?;
        } else {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Ranks without hints: in round `j` the unranked peer with the largest
/// random key takes rank `j` (one 8-byte max all-reduce per round).
fn agree_rank(comm: &Communicator, world: u32) -> Result<u32> {
    let key = loop {
        let k: u64 = rand::random();
        if k != 0 {
            break k;
        }
    };
    let mut mine = None;
    for j in 0..world {
        let contrib = [if mine.is_none() { key } else { 0 }];
        let mut out = [0u64];
        let desc = ReduceDescriptor::new(1, DataType::U64, ReduceOp::Max)
            .with_tag(RANK_AGREE_TAG + j as u64);
        comm.all_reduce(&contrib, &mut out, &desc)
            .context("rank agreement all-reduce")?;
        if mine.is_none() && out[0] == key {
            mine = Some(j);
        }
    }
    mine.context("rank agreement failed (the world changed?)")
}

/// Checks that the ranks are distinct: the sum of `1 << rank` must have every bit.
fn check_ranks(comm: &Communicator, rank: u32, world: u32) -> Result<()> {
    if world > 63 {
        return Ok(());
    }
    let mut out = [0u64];
    let desc = ReduceDescriptor::new(1, DataType::U64, ReduceOp::Sum).with_tag(RANK_CHECK_TAG);
    comm.all_reduce(&[1u64 << rank], &mut out, &desc)
        .context("rank check all-reduce")?;
    if out[0] != (1u64 << world) - 1 {
        return Err(format!(
            "ranks are not 0..{world} exactly once (mask {:#x}); duplicate --rank-hint?",
            out[0]
        )
        .into());
    }
    Ok(())
}

/// The bench rank at each ring position: an all-gather of the ranks.
fn ring_map(comm: &Communicator, rank: u32, world: u32) -> Result<Vec<u32>> {
    let mut map = vec![0u32; world as usize];
    let info = comm
        .all_gather(&[rank], &mut map, RING_MAP_TAG)
        .context("ring map all-gather")?;
    let mut sorted = map.clone();
    sorted.sort_unstable();
    if sorted != (0..world).collect::<Vec<_>>() || map.get(info.rank as usize) != Some(&rank) {
        return Err(format!("the ring map {map:?} does not hold ranks 0..{world} once each, with rank {rank} at position {}", info.rank).into());
    }
    Ok(map)
}

/// Untimed 4-byte all-reduce that also checks the world size.
fn barrier(comm: &Communicator, world: u32) -> Result<()> {
    let mut out = [0u32];
    let desc = ReduceDescriptor::new(1, DataType::U32, ReduceOp::Sum).with_tag(BARRIER_TAG);
    comm.all_reduce(&[1u32], &mut out, &desc)
        .context("barrier all-reduce")?;
    if out[0] != world {
        return Err(format!("barrier counted {} peers, expected {world}", out[0]).into());
    }
    Ok(())
}

/// Medians (µs) of `are_peers_pending` (one master consensus round) and of a
/// 4-byte all-reduce, over `samples` calls each.
fn latency(comm: &Communicator, samples: u32) -> Result<(f64, f64)> {
    let mut p = Vec::with_capacity(samples as usize);
    for _ in 0..samples {
        let t = Instant::now();
        let pending = comm.are_peers_pending().context("are_peers_pending")?;
        p.push(t.elapsed().as_secs_f64() * 1e6);
        if pending {
            eprintln!("pccl-bench peer: a peer is pending; it will not be admitted");
        }
    }
    let mut a = Vec::with_capacity(samples as usize);
    let desc = ReduceDescriptor::new(1, DataType::F32, ReduceOp::Sum).with_tag(LATENCY_TAG);
    let mut out = [0f32];
    for _ in 0..samples {
        let t = Instant::now();
        comm.all_reduce(&[1f32], &mut out, &desc)
            .context("latency all-reduce")?;
        a.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok((median(&p), median(&a)))
}

/// What one peer measured for one size.
struct SizeResult {
    world: u32,
    bytes: u64,
    count: u64,
    times_us: Vec<f64>,
    tx: u64,
    rx: u64,
    wrong: u64,
    checked: u32,
    max_err: f64,
    hash: u64,
    /// CPU time of this process per timed iteration, µs.
    cpu_us: f64,
}

fn run_size(
    comm: &Communicator,
    args: &Args,
    wl: &Workload,
    rank: u32,
    conc: u32,
    size: u64,
) -> Result<SizeResult> {
    let ds = args.dtype.size();
    let count = (usize::try_from(size).context("size")? / ds).max(1);
    let bytes = count * ds;
    let world = wl.world;
    let seed = bytes as u64;
    let mut sends = Vec::with_capacity(conc as usize);
    for k in 0..conc {
        let mut b = vec![0u8; bytes];
        wl.fill(&mut b, (rank + k) % world, seed);
        sends.push(b);
    }
    let mut recvs: Vec<Vec<u8>> = (0..conc).map(|_| vec![0u8; bytes]).collect();
    let mut expected = vec![0u8; bytes];
    wl.expected(&mut expected, seed);
    let quantized = wl.quant.is_some();
    let tol = wl.quant_tolerance();
    let mut desc = ReduceDescriptor::new(count, args.dtype, args.op);
    if let Some((q, algo)) = wl.quant {
        desc = desc.with_quantization(QuantizationOptions {
            quantized_datatype: q,
            algorithm: algo,
        });
    }

    let total = args.warmup + args.iters;
    let mut res = SizeResult {
        world,
        bytes: bytes as u64,
        count: count as u64,
        times_us: Vec::with_capacity(args.iters as usize),
        tx: 0,
        rx: 0,
        wrong: 0,
        checked: 0,
        max_err: 0.0,
        hash: 0,
        cpu_us: 0.0,
    };
    let mut need_sync = true;
    for j in 0..total {
        let timed = j >= args.warmup;
        let verify = args.verify_every > 0 && (j % args.verify_every == 0 || j + 1 == total);
        if verify {
            // Poison, so a result the library failed to write cannot pass.
            for r in &mut recvs {
                r.fill(0xA5);
            }
            need_sync = true;
        }
        if timed && need_sync && !args.no_barrier {
            barrier(comm, world)?;
        }
        need_sync = false;
        let cpu0 = process_cpu_us();
        let t = Instant::now();
        let infos = all_reduce_batch(comm, &sends, &mut recvs, desc)
            .with_context(|| format!("all-reduce of {bytes} B (iteration {j})"))?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        let cpu = process_cpu_us() - cpu0;
        if timed {
            res.cpu_us += cpu / args.iters.max(1) as f64;
            if res.times_us.is_empty() {
                res.tx = infos.iter().map(|i| i.tx_bytes).sum();
                res.rx = infos.iter().map(|i| i.rx_bytes).sum();
            }
            res.times_us.push(us);
        }
        if let Some(i) = infos.iter().find(|i| i.local_world_size != world) {
            return Err(format!(
                "all-reduce ran with {} peers instead of {world}",
                i.local_world_size
            )
            .into());
        }
        if verify {
            res.checked += 1;
            for r in &recvs {
                let c = check(args.dtype, quantized, tol, r, &expected);
                res.wrong += c.wrong;
                if c.max_err.is_nan() || c.max_err > res.max_err {
                    res.max_err = c.max_err;
                }
                if quantized {
                    res.hash = res.hash.rotate_left(7) ^ pccl_core::hash::tensor_hash(r);
                }
            }
            if res.wrong > 0 {
                eprintln!(
                    "pccl-bench peer {rank}: {} wrong elements at {bytes} B (iteration {j})",
                    res.wrong
                );
            }
        }
    }
    Ok(res)
}

/// A broadcast (from ring position 0), all-gather or reduce-scatter of a
/// whole buffer of about `size` bytes (all-gather and reduce-scatter: N
/// shares of `size / N`), timed and verified like the all-reduce: every
/// peer's data is [`Workload::fill`] of its bench rank, and the expected
/// result follows from which rank holds each ring position (`ring`).
fn run_size_coll(
    comm: &Communicator,
    args: &Args,
    wl: &Workload,
    rank: u32,
    ring: &[u32],
    size: u64,
) -> Result<SizeResult> {
    let ds = args.dtype.size();
    let world = wl.world as usize;
    let total = (usize::try_from(size).context("size")? / ds).max(1);
    let coll = args.collective;
    let share = match coll {
        Collective::Broadcast => total,
        _ => (total / world).max(1),
    };
    let whole = if coll == Collective::Broadcast {
        total
    } else {
        share * world
    };
    let bytes = whole * ds;
    let seed = bytes as u64;
    let pos = ring
        .iter()
        .position(|&r| r == rank)
        .context("this rank is not in the ring map")?;
    // Send and receive buffers, and the expected result.
    let mut send = vec![
        0u8;
        if coll == Collective::AllGather {
            share * ds
        } else {
            bytes
        }
    ];
    wl.fill(&mut send, rank, seed);
    let mut recv = vec![
        0u8;
        if coll == Collective::ReduceScatter {
            share * ds
        } else {
            bytes
        }
    ];
    let mut expected = vec![0u8; recv.len()];
    match coll {
        Collective::Broadcast => wl.fill(&mut expected, ring[0], seed),
        Collective::AllGather => {
            for (j, seg) in expected.chunks_mut(share * ds).enumerate() {
                wl.fill(seg, ring[j], seed);
            }
        }
        _ => {
            let mut all = vec![0u8; bytes];
            wl.expected(&mut all, seed);
            expected.copy_from_slice(&all[pos * share * ds..(pos + 1) * share * ds]);
        }
    }
    let desc = ReduceDescriptor::new(share, args.dtype, args.op).with_tag(0);
    let run = |send: &[u8], recv: &mut [u8]| -> std::result::Result<CollectiveInfo, PcclError> {
        // SAFETY: `send` and `recv` are distinct allocations sized for the
        // op (the broadcast uses `recv` alone, in place) and stay borrowed
        // until the handle is awaited just below.
        let h = unsafe {
            match coll {
                Collective::Broadcast => comm.broadcast_async_raw(recv.as_mut_ptr(), &desc, 0),
                Collective::AllGather => {
                    comm.all_gather_async_raw(send.as_ptr(), recv.as_mut_ptr(), &desc)
                }
                _ => comm.reduce_scatter_async_raw(send.as_ptr(), recv.as_mut_ptr(), &desc),
            }
        }?;
        comm.await_collective(h)
    };
    let total_iters = args.warmup + args.iters;
    let mut res = SizeResult {
        world: wl.world,
        bytes: bytes as u64,
        count: whole as u64,
        times_us: Vec::with_capacity(args.iters as usize),
        tx: 0,
        rx: 0,
        wrong: 0,
        checked: 0,
        max_err: 0.0,
        hash: 0,
        cpu_us: 0.0,
    };
    let mut need_sync = true;
    for j in 0..total_iters {
        let timed = j >= args.warmup;
        let verify = args.verify_every > 0 && (j % args.verify_every == 0 || j + 1 == total_iters);
        if verify {
            if coll == Collective::Broadcast {
                // Its own data: only the root's may be left after the op.
                wl.fill(&mut recv, rank, seed);
            } else {
                recv.fill(0xA5);
            }
            need_sync = true;
        }
        if timed && need_sync && !args.no_barrier {
            barrier(comm, wl.world)?;
        }
        need_sync = false;
        let cpu0 = process_cpu_us();
        let t = Instant::now();
        let info = run(&send, &mut recv)
            .with_context(|| format!("{} of {bytes} B (iteration {j})", coll.name()))?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        let cpu = process_cpu_us() - cpu0;
        if info.world_size != wl.world || info.rank as usize != pos {
            return Err(format!(
                "{} ran with {} peers at rank {} instead of {} at {pos}",
                coll.name(),
                info.world_size,
                info.rank,
                wl.world
            )
            .into());
        }
        if timed {
            res.cpu_us += cpu / args.iters.max(1) as f64;
            if res.times_us.is_empty() {
                res.tx = info.tx_bytes;
                res.rx = info.rx_bytes;
            }
            res.times_us.push(us);
        }
        if verify {
            res.checked += 1;
            let c = check(args.dtype, false, 0.0, &recv, &expected);
            res.wrong += c.wrong;
            // Broadcast and all-gather results are the same on every peer:
            // the launcher compares these hashes (a reduce-scatter's
            // segments differ, so it reports none).
            if coll != Collective::ReduceScatter {
                res.hash = res.hash.rotate_left(7) ^ pccl_core::hash::tensor_hash(&recv);
            }
            if res.wrong > 0 {
                eprintln!(
                    "pccl-bench peer {rank}: {} wrong elements in the {} of {bytes} B (iteration {j})",
                    res.wrong,
                    coll.name()
                );
            }
        }
    }
    Ok(res)
}

/// One timed step: `sends.len()` all-reduces with tags `0..`, in flight together.
fn all_reduce_batch(
    comm: &Communicator,
    sends: &[Vec<u8>],
    recvs: &mut [Vec<u8>],
    desc: ReduceDescriptor,
) -> Result<Vec<ReduceInfo>> {
    if sends.len() == 1 {
        // SAFETY: both buffers hold `desc.count` elements of `desc.datatype`
        // (allocated with `count * size` bytes), are distinct allocations, and
        // stay borrowed — unused by anyone else — until the call returns.
        let info = unsafe {
            comm.all_reduce_raw(sends[0].as_ptr(), recvs[0].as_mut_ptr(), &desc.with_tag(0))
        }?;
        return Ok(vec![info]);
    }
    let mut handles = Vec::with_capacity(sends.len());
    let mut first_err = None;
    for (k, (s, r)) in sends.iter().zip(recvs.iter_mut()).enumerate() {
        // SAFETY: as above; every started op is awaited below before the
        // borrows of `sends`/`recvs` end (await_handle only returns once the
        // op's task has finished, as this thread is outside any runtime).
        match unsafe {
            comm.all_reduce_async_raw(s.as_ptr(), r.as_mut_ptr(), &desc.with_tag(k as u64))
        } {
            Ok(h) => handles.push(h),
            Err(e) => {
                first_err = Some(e);
                break;
            }
        }
    }
    let mut infos = Vec::with_capacity(handles.len());
    for h in handles {
        match comm.await_handle(h) {
            Ok(i) => infos.push(i),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e.into()),
        None => Ok(infos),
    }
}
