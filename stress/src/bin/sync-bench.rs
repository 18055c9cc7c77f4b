//! `sync-bench`: time for a newcomer to receive a shared state of a given size
//! from the peers that hold it, on loopback, next to a raw single-connection
//! TCP copy of the same bytes measured in the same run.
//!
//! ```text
//! cargo run --release -p pccl-stress --bin sync-bench -- --mib 1024 --holders 2 --pool 4
//! ```

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
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
        handles.push(thread::spawn(move || -> BoxResult<(Duration, u64, u64)> {
            let mut st = SharedState::new(1, state_of(&mut bufs));
            b.wait();
            let t0 = Instant::now();
            let info = h.sync_shared_state(&mut st, SyncStrategy::EnforcePopular)?;
            Ok((t0.elapsed(), info.tx_bytes, info.rx_bytes))
        }));
    }
    // A newcomer has its model allocated and initialized (pages touched), just not trained.
    let mut mine: Vec<Vec<f32>> = (0..4).map(|_| vec![-1f32; elems_per_tensor]).collect();
    let (took, rx) = {
        let mut st = SharedState::new(0, state_of(&mut mine));
        barrier.wait();
        let t0 = Instant::now();
        let info = newcomer.sync_shared_state(&mut st, SyncStrategy::EnforcePopular)?;
        (t0.elapsed(), info.rx_bytes)
    };
    let mut served = 0;
    for h in handles {
        let (_, tx, _) = h.join().map_err(|_| "holder panicked")??;
        served += tx;
    }
    let identical = mine
        .iter()
        .zip(&content)
        .all(|(a, b)| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
    let gbps = total_bytes as f64 / took.as_secs_f64() / 1e9;
    let probe = tcp_probe(total_bytes as usize)?;
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
    if !identical {
        return Err("newcomer's state differs from the holders'".into());
    }
    Ok(())
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
