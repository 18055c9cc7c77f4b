//! `sync-bench`: time for a newcomer to receive a shared state of a given size
//! from the peers that hold it, on loopback, next to raw single-connection
//! TCP copies of the same bytes measured in the same run (1 MiB buffer to
//! 1 MiB buffer, and the holder's state into the newcomer's).
//!
//! ```text
//! cargo run --release -p pccl-stress --bin sync-bench -- --mib 1024 --holders 2 --pool 4
//! ```
//!
//! It also prints where the time went (from
//! `pccl_core::shared_state::last_sync_timings`): for the newcomer, hashing
//! its own state before the vote, waiting for the plan (the slowest peer's
//! hashing), the fetch (socket reads and leaf hashing summed over the
//! connections, root checks) and waiting for the master's result; for each
//! holder, its hashing, waits and time spent serving. See
//! `docs/shared-state.md` for recorded figures.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use pccl_core::shared_state::{last_sync_timings, SyncTimings};
use pccl_core::{
    Communicator, CommunicatorConfig, MasterConfig, MasterNode, SharedState, SharedTensor,
    SyncStrategy,
};

#[derive(Parser, Debug)]
#[command(about = "Newcomer shared-state transfer vs raw loopback TCP")]
struct Args {
    /// State size in MiB (split over 4 tensors).
    #[arg(long, default_value_t = 1024)]
    mib: usize,
    /// Peers holding the state before the newcomer joins.
    #[arg(long, default_value_t = 2)]
    holders: usize,
    /// Connections per transfer (the communicator's pool size).
    #[arg(long, default_value_t = 4)]
    pool: u32,
}

type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn config(master: SocketAddr, pool: u32) -> CommunicatorConfig {
    let mut c = CommunicatorConfig::new(master).with_ephemeral_ports();
    c.bind_ip = "127.0.0.1".parse().expect("ip");
    c.p2p_connection_pool_size = pool;
    c
}

fn state_of(bufs: &mut [Vec<f32>]) -> Vec<SharedTensor<'_>> {
    bufs.iter_mut()
        .enumerate()
        .map(|(i, b)| SharedTensor::new(format!("t{i}"), b.as_mut_slice()))
        .collect()
}

/// Raw loopback TCP: one connection streaming `bytes` bytes (GB/s).
fn tcp_probe(bytes: usize) -> BoxResult<f64> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let rx = thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            left -= n.min(left);
        }
        Ok(())
    });
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let buf = vec![7u8; 1 << 20];
    let t0 = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len());
        s.write_all(&buf[..n])?;
        left -= n;
    }
    drop(s);
    rx.join().map_err(|_| "probe receiver panicked")??;
    Ok(bytes as f64 / t0.elapsed().as_secs_f64() / 1e9)
}

/// Raw loopback TCP, one connection, from the holders' state into the
/// newcomer's (GB/s): the same memory-to-memory copy a sync does, without
/// the protocol and the hashing.
fn tcp_probe_state(src: &[Vec<f32>], dst: &mut [Vec<f32>]) -> BoxResult<f64> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let bytes: usize = src
        .iter()
        .map(|v| std::mem::size_of_val(v.as_slice()))
        .sum();
    thread::scope(|sc| -> BoxResult<f64> {
        let rx = sc.spawn(move || -> std::io::Result<()> {
            let (mut s, _) = l.accept()?;
            for d in dst.iter_mut() {
                s.read_exact(as_bytes_mut(d))?;
            }
            Ok(())
        });
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let t0 = Instant::now();
        for v in src {
            s.write_all(as_bytes(v))?;
        }
        drop(s);
        rx.join().map_err(|_| "probe receiver panicked")??;
        Ok(bytes as f64 / t0.elapsed().as_secs_f64() / 1e9)
    })
}

fn main() -> BoxResult<()> {
    let args = Args::parse();
    pccl_core::logging::init(None);
    let elems_per_tensor = args.mib * (1 << 20) / 4 / 4;
    let mut master = MasterNode::bind("127.0.0.1:0".parse()?, MasterConfig::default())?;
    master.run()?;
    let addr = master.local_addr();

    // Holders join one by one and sync identical content.
    let mut holders: Vec<Arc<Communicator>> = Vec::new();
    for _ in 0..args.holders {
        let c = Arc::new(Communicator::new(config(addr, args.pool))?);
        let joiner = {
            let c = c.clone();
            thread::spawn(move || c.connect())
        };
        let target = holders.len() as u32 + 1;
        admit(&holders, target)?;
        joiner.join().map_err(|_| "join panicked")??;
        holders.push(c);
    }
    let content: Vec<Vec<f32>> = (0..4)
        .map(|t| {
            (0..elems_per_tensor)
                .map(|k| (k as f32) * 0.5 + t as f32)
                .collect()
        })
        .collect();
    let total_bytes = (elems_per_tensor * 4 * 4) as u64;

    // The newcomer joins; then everyone syncs once at revision 1.
    let newcomer = Arc::new(Communicator::new(config(addr, args.pool))?);
    let joiner = {
        let c = newcomer.clone();
        thread::spawn(move || c.connect())
    };
    admit(&holders, args.holders as u32 + 1)?;
    joiner.join().map_err(|_| "join panicked")??;

    let barrier = Arc::new(Barrier::new(args.holders + 1));
    let mut handles = Vec::new();
    for h in &holders {
        let (h, mut bufs, b) = (h.clone(), content.clone(), barrier.clone());
        handles.push(thread::spawn(
            move || -> BoxResult<(Duration, SyncTimings, u64)> {
                let mut st = SharedState::new(1, state_of(&mut bufs));
                b.wait();
                let t0 = Instant::now();
                let info = h.sync_shared_state(&mut st, SyncStrategy::EnforcePopular)?;
                let took = t0.elapsed();
                Ok((took, last_sync_timings().unwrap_or_default(), info.tx_bytes))
            },
        ));
    }
    // A newcomer has its model allocated and initialized (pages touched), just not trained.
    let mut mine: Vec<Vec<f32>> = (0..4).map(|_| vec![-1f32; elems_per_tensor]).collect();
    // What hashing the newcomer's state costs with nothing else running.
    let alone = {
        let slices: Vec<&[u8]> = mine.iter().map(|b| as_bytes(b)).collect();
        let t0 = Instant::now();
        std::hint::black_box(pccl_core::hash::tensor_hashes(&slices));
        t0.elapsed()
    };
    let (took, tm, rx) = {
        let mut st = SharedState::new(0, state_of(&mut mine));
        barrier.wait();
        let t0 = Instant::now();
        let info = newcomer.sync_shared_state(&mut st, SyncStrategy::EnforcePopular)?;
        let took = t0.elapsed();
        (took, last_sync_timings().unwrap_or_default(), info.rx_bytes)
    };
    let mut served = 0;
    let mut holder_lines = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        let (htook, htm, tx) = h.join().map_err(|_| "holder panicked")??;
        served += tx;
        holder_lines.push(format!(
            "sync-bench:   holder {i}: {:.3} s = local hash {:.3} + wait for plan {:.3} + wait for result {:.3} (serving {:.3} s summed over connections, {tx} B)",
            htook.as_secs_f64(),
            htook.saturating_sub(htm.protocol).as_secs_f64(),
            htm.wait_plan.as_secs_f64(),
            htm.wait_result.as_secs_f64(),
            htm.serve.as_secs_f64(),
        ));
    }
    let identical = mine
        .iter()
        .zip(&content)
        .all(|(a, b)| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
    let gbps = total_bytes as f64 / took.as_secs_f64() / 1e9;
    let probe = tcp_probe(total_bytes as usize)?;
    let probe_state = tcp_probe_state(&content, &mut mine)?;
    println!(
        "sync-bench: state {} MiB, holders {}, pool {}: newcomer synced in {:.3} s = {:.2} GB/s (rx {} B, served {} B), identical: {}",
        args.mib,
        args.holders,
        args.pool,
        took.as_secs_f64(),
        gbps,
        rx,
        served,
        identical
    );
    println!(
        "sync-bench: raw loopback TCP, one connection, same bytes: {probe:.2} GB/s; ratio {:.2}",
        gbps / probe
    );
    println!(
        "sync-bench: raw loopback TCP, one connection, holder's state into the newcomer's (memory to memory): {probe_state:.2} GB/s; ratio {:.2}",
        gbps / probe_state
    );
    let other = tm
        .protocol
        .saturating_sub(tm.wait_plan + tm.fetch + tm.wait_result);
    println!(
        "sync-bench:   newcomer: {:.3} s = local hash {:.3} + wait for plan {:.3} + fetch {:.3} + wait for result {:.3} + other {:.3}",
        took.as_secs_f64(),
        took.saturating_sub(tm.protocol).as_secs_f64(),
        tm.wait_plan.as_secs_f64(),
        tm.fetch.as_secs_f64(),
        tm.wait_result.as_secs_f64(),
        other.as_secs_f64(),
    );
    println!(
        "sync-bench:   newcomer's fetch: {:.3} s = {:.2} GB/s over {} connections; summed over them: receiving {:.3} s, hashing leaves {:.3} s; root check {:.6} s; failed sources {}",
        tm.fetch.as_secs_f64(),
        total_bytes as f64 / tm.fetch.as_secs_f64().max(1e-9) / 1e9,
        tm.fetch_connections,
        tm.fetch_recv.as_secs_f64(),
        tm.fetch_hash.as_secs_f64(),
        tm.verify.as_secs_f64(),
        tm.failed_sources,
    );
    for l in &holder_lines {
        println!("{l}");
    }
    println!(
        "sync-bench:   hashing the state alone (tensor_hashes, nothing else running): {:.3} s = {:.2} GB/s",
        alone.as_secs_f64(),
        total_bytes as f64 / alone.as_secs_f64().max(1e-9) / 1e9
    );
    if !identical {
        return Err("newcomer's state differs from the holders'".into());
    }
    Ok(())
}

fn as_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: any f32 slice is a valid byte slice of four times its length.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn as_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above, and every byte pattern is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}

/// Existing peers admit pending peers until the world reaches `target`.
fn admit(peers: &[Arc<Communicator>], target: u32) -> BoxResult<()> {
    let handles: Vec<_> = peers
        .iter()
        .cloned()
        .map(|c| {
            thread::spawn(move || -> BoxResult<()> {
                let deadline = Instant::now() + Duration::from_secs(60);
                while c.world()?.global_world < target {
                    if Instant::now() > deadline {
                        return Err("admission timed out".into());
                    }
                    if c.are_peers_pending()? {
                        c.update_topology()?;
                    } else {
                        thread::sleep(Duration::from_millis(2));
                    }
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| "admit panicked")??;
    }
    Ok(())
}
