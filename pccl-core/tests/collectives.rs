//! The master's algorithm choice, the direct small all-reduce, broadcast,
//! all-gather and reduce-scatter: multi-peer on loopback with real sockets
//! (in-process peers), every dtype, odd counts and counts below the world.

mod common;

use std::sync::Arc;

use common::*;
use half::{bf16, f16};
use pccl_core::{
    Algorithm, Communicator, DataType, Error, QuantizationAlgorithm, QuantizationOptions,
    ReduceDescriptor, ReduceOp,
};

/// Small integers, exact in every type (and their sums over 4 peers).
fn value(dtype: DataType, peer: usize, k: usize) -> f64 {
    let base = ((k * 7 + peer * 3) % 5) as f64;
    let signed = matches!(
        dtype,
        DataType::I8 | DataType::I16 | DataType::I32 | DataType::I64
    ) || dtype.is_float();
    if signed {
        base * 3.0 - 5.0
    } else {
        base * 3.0
    }
}

fn encode(dtype: DataType, vals: impl Iterator<Item = f64>) -> Vec<u8> {
    let mut out = Vec::new();
    for v in vals {
        match dtype {
            DataType::U8 => out.push(v as u8),
            DataType::I8 => out.push(v as i8 as u8),
            DataType::U16 => out.extend((v as u16).to_le_bytes()),
            DataType::I16 => out.extend((v as i16).to_le_bytes()),
            DataType::U32 => out.extend((v as u32).to_le_bytes()),
            DataType::I32 => out.extend((v as i32).to_le_bytes()),
            DataType::U64 => out.extend((v as u64).to_le_bytes()),
            DataType::I64 => out.extend((v as i64).to_le_bytes()),
            DataType::F16 => out.extend(f16::from_f64(v).to_le_bytes()),
            DataType::BF16 => out.extend(bf16::from_f64(v).to_le_bytes()),
            DataType::F32 => out.extend((v as f32).to_le_bytes()),
            DataType::F64 => out.extend(v.to_le_bytes()),
        }
    }
    out
}

fn input(dtype: DataType, peer: usize, n: usize) -> Vec<u8> {
    encode(dtype, (0..n).map(|k| value(dtype, peer, k)))
}

/// The reduction of every peer's `input` at element k (Sum, Max or Min).
fn reduced(dtype: DataType, op: ReduceOp, world: usize, k: usize) -> f64 {
    let xs = (0..world).map(|p| value(dtype, p, k));
    match op {
        ReduceOp::Sum => xs.sum(),
        ReduceOp::Max => xs.fold(f64::MIN, f64::max),
        ReduceOp::Min => xs.fold(f64::MAX, f64::min),
        _ => unreachable!("the tests use Sum, Max and Min"),
    }
}

fn all_reduce(c: &Communicator, send: &[u8], desc: &ReduceDescriptor) -> Result<Vec<u8>, Error> {
    let mut recv = vec![0u8; send.len()];
    // SAFETY: both buffers are valid for count*size bytes for the whole call.
    unsafe { c.all_reduce_raw(send.as_ptr(), recv.as_mut_ptr(), desc) }?;
    Ok(recv)
}

#[test]
fn direct_equals_the_ring_and_the_reference_for_exact_ops() {
    for world in [2usize, 3, 4] {
        // Two swarms, each with its own master: admission is a call of
        // every accepted peer, so an idle second swarm would block it.
        let (m1, m2) = (master(), master());
        let ring = connect_peers_with(m1.local_addr(), world, |_| 0, Algorithm::Ring);
        let direct = connect_peers_with(m2.local_addr(), world, |_| 0, Algorithm::Direct);
        for dtype in DataType::ALL {
            for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min] {
                for n in [1usize, world - 1, 7, 1000, 140_001] {
                    if n == 0 {
                        continue;
                    }
                    let run = |peers: &[Arc<Communicator>]| {
                        on_all(peers, move |i, c| {
                            let desc = ReduceDescriptor::new(n, dtype, op);
                            all_reduce(c, &input(dtype, i, n), &desc).expect("all-reduce")
                        })
                    };
                    let by_ring = run(&ring);
                    let by_direct = run(&direct);
                    let want = encode(dtype, (0..n).map(|k| reduced(dtype, op, world, k)));
                    for i in 0..world {
                        let what = format!("world {world} {dtype:?} {op:?} n {n} peer {i}");
                        assert_eq!(by_direct[i], want, "direct: {what}");
                        assert_eq!(by_ring[i], want, "ring: {what}");
                    }
                }
            }
        }
    }
}

#[test]
fn direct_sends_each_buffer_once_to_every_peer() {
    let m = master();
    let world = 4;
    let peers = connect_peers_with(m.local_addr(), world, |_| 0, Algorithm::Direct);
    // 300 000 f32 (1.2 MB) in sub-chunks of 131 072: 3 frames per peer.
    let n = 300_000usize;
    let results = on_all(&peers, move |i, c| {
        let send: Vec<f32> = (0..n).map(|k| (k % 97) as f32 + i as f32).collect();
        let mut recv = vec![0f32; n];
        let info = c
            .all_reduce(
                &send,
                &mut recv,
                &ReduceDescriptor::new(n, DataType::F32, ReduceOp::Avg),
            )
            .expect("all-reduce");
        (info, recv)
    });
    let per_peer = (n * 4 + 3 * 40) as u64;
    for (info, recv) in &results {
        assert_eq!(info.local_world_size, 4);
        assert_eq!(info.tx_bytes, 3 * per_peer);
        assert_eq!(info.rx_bytes, 3 * per_peer);
        assert_eq!(recv, &results[0].1);
        for (k, v) in recv.iter().enumerate() {
            // (4x + 0+1+2+3) / 4, exact in f32.
            assert_eq!(*v, (k % 97) as f32 + 1.5, "element {k}");
        }
    }
}

#[test]
fn auto_runs_relay_then_direct_then_the_ring_as_ops_grow() {
    let m = master_with(pccl_core::MasterConfig {
        small_op_max_bytes: Some(16384),
        ..Default::default()
    });
    let world = 3;
    let peers = connect_peers_with(m.local_addr(), world, |_| 0, Algorithm::Auto);
    let traffic = |n: usize| {
        on_all(&peers, move |i, c| {
            let send = vec![i as u32 + 1; n];
            let mut recv = vec![0u32; n];
            let info = c
                .all_reduce(
                    &send,
                    &mut recv,
                    &ReduceDescriptor::new(n, DataType::U32, ReduceOp::Sum),
                )
                .expect("all-reduce");
            assert!(recv.iter().all(|&x| x == 6));
            (info.tx_bytes, info.rx_bytes)
        })
    };
    // 1024 u32 = 4096 bytes: relayed through the master, no data frames.
    assert!(traffic(1024).iter().all(|&t| t == (4096, 2 * 4096)));
    // 4096 u32 = 16384 bytes: direct, one frame to each of 2 peers.
    assert!(traffic(4096)
        .iter()
        .all(|&t| t == (2 * (16384 + 40), 2 * (16384 + 40))));
    // 4097 u32: the ring. Each peer sends 2(w-1) = 4 frames of about a third.
    for (tx, _) in traffic(4097) {
        assert!(tx < 2 * (16388 + 40), "ring traffic {tx}");
        assert!(tx >= 4 * (1365 * 4 + 40), "ring traffic {tx}");
    }
}

#[test]
fn relay_equals_the_reference_for_exact_ops_and_refuses_big_ops() {
    for world in [2usize, 3, 4] {
        let m = master();
        let peers = connect_peers_with(m.local_addr(), world, |_| 0, Algorithm::Relay);
        for dtype in DataType::ALL {
            for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min] {
                for n in [1usize, 3, 4096 / dtype.size()] {
                    let results = on_all(&peers, move |i, c| {
                        let desc = ReduceDescriptor::new(n, dtype, op);
                        let send = input(dtype, i, n);
                        let mut recv = send.clone();
                        // In place, as the MoE trainer's expert counts are.
                        let p = recv.as_mut_ptr();
                        // SAFETY: `recv` is valid for the whole call.
                        let info = unsafe { c.all_reduce_raw(p, p, &desc) }.expect("all-reduce");
                        (info, recv)
                    });
                    let want = encode(dtype, (0..n).map(|k| reduced(dtype, op, world, k)));
                    for (info, r) in &results {
                        assert_eq!(r, &want, "world {world} {dtype:?} {op:?} n {n}");
                        let bytes = (n * dtype.size()) as u64;
                        assert_eq!(
                            (info.tx_bytes, info.rx_bytes),
                            (bytes, bytes * (world as u64 - 1))
                        );
                    }
                }
            }
        }
        // Past the relay's bound every peer gets the same clear error.
        let results = on_all(&peers, |_, c| {
            all_reduce(
                c,
                &[0u8; 4097],
                &ReduceDescriptor::new(4097, DataType::U8, ReduceOp::Sum),
            )
        });
        for r in results {
            assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
        }
    }
}

#[test]
fn quantized_direct_is_bit_identical_bounded_and_compressed() {
    let m = master();
    let world = 3;
    let peers = connect_peers_with(m.local_addr(), world, |_| 0, Algorithm::Direct);
    let n = 50_000usize;
    let results = on_all(&peers, move |i, c| {
        let send: Vec<f32> = (0..n)
            .map(|k| (((k * 37 + i * 11) % 1000) as f32 - 500.0) * 0.01)
            .collect();
        let mut recv = vec![0f32; n];
        let desc = ReduceDescriptor::new(n, DataType::F32, ReduceOp::Sum).with_quantization(
            QuantizationOptions {
                quantized_datatype: DataType::U8,
                algorithm: QuantizationAlgorithm::MinMax,
            },
        );
        let info = c
            .all_reduce(&send, &mut recv, &desc)
            .expect("quantized all-reduce");
        (info, recv)
    });
    let bits0: Vec<u32> = results[0].1.iter().map(|v| v.to_bits()).collect();
    for (info, r) in &results {
        let bits: Vec<u32> = r.iter().map(|v| v.to_bits()).collect();
        assert_eq!(bits, bits0, "peers differ");
        // Each contribution is quantized once: 3 × half an 8-bit step of a
        // block's range of 10 is under 0.06.
        for (k, v) in r.iter().enumerate() {
            let exact: f32 = (0..3)
                .map(|i| (((k * 37 + i * 11) % 1000) as f32 - 500.0) * 0.01)
                .sum();
            assert!((v - exact).abs() < 0.06, "element {k}: {v} vs {exact}");
        }
        // Two copies of one u8 encoding (plus block metadata) out of each peer.
        let raw = 2 * n as u64 * 4;
        let ratio = info.tx_bytes as f64 / raw as f64;
        assert!((ratio - 0.25).abs() < 0.03, "wire ratio {ratio}");
    }
}

#[test]
fn peers_that_ask_for_different_algorithms_get_invalid_usage() {
    let m = master();
    let mut peers = connect_peers_with(m.local_addr(), 1, |_| 0, Algorithm::Ring);
    let cfg = config_with(m.local_addr(), Algorithm::Direct);
    let joiner = std::thread::spawn(move || {
        let c = Communicator::new(cfg).expect("new communicator");
        c.connect().expect("connect");
        Arc::new(c)
    });
    admit_until(&peers[0], 2);
    peers.push(joiner.join().expect("join"));
    let results = on_all(&peers, |_, c| {
        all_reduce(
            c,
            &[1, 0, 0, 0],
            &ReduceDescriptor::new(1, DataType::U32, ReduceOp::Sum),
        )
    });
    for r in results {
        assert!(matches!(r, Err(Error::InvalidUsage(_))), "{r:?}");
    }
}

#[test]
fn broadcast_delivers_the_roots_bytes_for_every_dtype_and_root() {
    let m = master();
    for world in [2usize, 3, 4] {
        let peers = connect_peers(m.local_addr(), world, |_| 40 + world as u32);
        for dtype in DataType::ALL {
            for root in 0..world as u32 {
                for n in [1usize, world - 1, 3, 70_001] {
                    if n == 0 {
                        continue;
                    }
                    let results = on_all(&peers, move |i, c| {
                        // Every peer starts with its own bytes; rank = ring position.
                        let mut buf = input(dtype, i, n);
                        let desc = ReduceDescriptor::new(n, dtype, ReduceOp::Sum).with_tag(7);
                        // SAFETY: `buf` is ours for the whole call.
                        let h = unsafe { c.broadcast_async_raw(buf.as_mut_ptr(), &desc, root) }
                            .expect("start broadcast");
                        let info = c.await_collective(h).expect("broadcast");
                        (info, buf)
                    });
                    let root_buf = &results
                        .iter()
                        .find(|(info, _)| info.rank == root)
                        .expect("a peer has the root rank")
                        .1;
                    let mut ranks: Vec<u32> = results.iter().map(|(i, _)| i.rank).collect();
                    ranks.sort();
                    assert_eq!(ranks, (0..world as u32).collect::<Vec<_>>());
                    // The root's buffer is its own input, unchanged.
                    let root_peer = results.iter().position(|(i, _)| i.rank == root).unwrap();
                    assert_eq!(root_buf, &input(dtype, root_peer, n));
                    for (info, buf) in &results {
                        assert_eq!(info.world_size, world as u32);
                        assert_eq!(buf, root_buf, "world {world} {dtype:?} root {root} n {n}");
                    }
                }
            }
        }
    }
}

#[test]
fn all_gather_concatenates_in_rank_order_for_every_dtype() {
    let m = master();
    for world in [2usize, 3, 4] {
        let peers = connect_peers(m.local_addr(), world, |_| 50 + world as u32);
        for dtype in DataType::ALL {
            for n in [1usize, 3, 1001, 70_001] {
                let results = on_all(&peers, move |i, c| {
                    let send = input(dtype, i, n);
                    let mut recv = vec![0u8; send.len() * world];
                    let desc = ReduceDescriptor::new(n, dtype, ReduceOp::Sum).with_tag(3);
                    // SAFETY: both buffers are valid for the call.
                    let h =
                        unsafe { c.all_gather_async_raw(send.as_ptr(), recv.as_mut_ptr(), &desc) }
                            .expect("start all-gather");
                    let info = c.await_collective(h).expect("all-gather");
                    (info.rank as usize, recv)
                });
                // Peer i (thread order) has some rank; its input is at that rank's slot.
                let mut want = vec![Vec::new(); world];
                for (i, (rank, _)) in results.iter().enumerate() {
                    want[*rank] = input(dtype, i, n);
                }
                let want: Vec<u8> = want.concat();
                for (_, recv) in &results {
                    assert_eq!(recv, &want, "world {world} {dtype:?} n {n}");
                }
            }
        }
    }
}

#[test]
fn reduce_scatter_gives_each_rank_its_segment_for_every_dtype() {
    let m = master();
    for world in [2usize, 3, 4] {
        let peers = connect_peers(m.local_addr(), world, |_| 60 + world as u32);
        for dtype in DataType::ALL {
            for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min] {
                for share in [1usize, 3, 50_001] {
                    let n = share * world;
                    let results = on_all(&peers, move |i, c| {
                        let send = input(dtype, i, n);
                        let mut recv = vec![0u8; share * dtype.size()];
                        let desc = ReduceDescriptor::new(share, dtype, op).with_tag(4);
                        // SAFETY: both buffers are valid for the call.
                        let h = unsafe {
                            c.reduce_scatter_async_raw(send.as_ptr(), recv.as_mut_ptr(), &desc)
                        }
                        .expect("start reduce-scatter");
                        let info = c.await_collective(h).expect("reduce-scatter");
                        (info.rank as usize, recv)
                    });
                    for (rank, recv) in &results {
                        let want = encode(
                            dtype,
                            (rank * share..(rank + 1) * share)
                                .map(|k| reduced(dtype, op, world, k)),
                        );
                        assert_eq!(
                            recv, &want,
                            "world {world} {dtype:?} {op:?} share {share} rank {rank}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn typed_collectives_and_tagged_async_forms_run_concurrently() {
    let m = master();
    let world = 3;
    let peers = connect_peers(m.local_addr(), world, |_| 0);
    let results = on_all(&peers, move |i, c| {
        // Three collectives with distinct tags in flight at once.
        let mut bcast = vec![i as u64; 10_000];
        let gather_in = [i as i32 * 10; 5];
        let mut gathered = vec![0i32; 5 * world];
        let scatter_in = vec![1.5f64; 4 * world];
        let mut scattered = vec![0f64; 4];
        let bdesc = ReduceDescriptor::new(bcast.len(), DataType::U64, ReduceOp::Sum).with_tag(11);
        let gdesc = ReduceDescriptor::new(5, DataType::I32, ReduceOp::Sum).with_tag(12);
        let sdesc = ReduceDescriptor::new(4, DataType::F64, ReduceOp::Sum).with_tag(13);
        use pccl_core::CollectiveKind::*;
        // SAFETY: every buffer outlives the awaits below.
        unsafe {
            let b = bcast.as_mut_ptr() as *mut u8;
            c.collective_async_tagged(Broadcast, b, b, &bdesc, 1)
                .expect("broadcast");
            c.collective_async_tagged(
                AllGather,
                gather_in.as_ptr() as *const u8,
                gathered.as_mut_ptr() as *mut u8,
                &gdesc,
                0,
            )
            .expect("all-gather");
            c.collective_async_tagged(
                ReduceScatter,
                scatter_in.as_ptr() as *const u8,
                scattered.as_mut_ptr() as *mut u8,
                &sdesc,
                0,
            )
            .expect("reduce-scatter");
        }
        let b = c.await_async_collective(11).expect("await broadcast");
        let g = c.await_async_collective(12).expect("await all-gather");
        c.await_async_collective(13).expect("await reduce-scatter");
        // The typed forms.
        let mut typed = vec![i as f32; 3];
        let t = c.broadcast(&mut typed, 2, 20).expect("typed broadcast");
        let mut all = vec![0u16; world];
        c.all_gather(&[i as u16], &mut all, 21)
            .expect("typed all-gather");
        let mut mine = vec![0u8; 2];
        let rs = c
            .reduce_scatter(
                &vec![1u8; 2 * world],
                &mut mine,
                &ReduceDescriptor::new(2, DataType::U8, ReduceOp::Sum).with_tag(22),
            )
            .expect("typed reduce-scatter");
        (
            i, b.rank, g.rank, bcast, gathered, scattered, t.rank, typed, all, rs.rank, mine,
        )
    });
    let peer_at = |rank: u32| results.iter().find(|r| r.1 == rank).expect("rank").0;
    for r in &results {
        let (_, _, _, bcast, gathered, scattered, _, typed, all, _, mine) = r;
        assert!(bcast.iter().all(|&x| x == peer_at(1) as u64));
        let want: Vec<i32> = (0..world as u32)
            .flat_map(|rank| vec![peer_at(rank) as i32 * 10; 5])
            .collect();
        assert_eq!(gathered, &want);
        assert_eq!(scattered, &vec![4.5f64; 4]);
        let typed_root = results.iter().find(|x| x.6 == 2).expect("rank 2").0;
        assert_eq!(typed, &vec![typed_root as f32; 3]);
        let by_rank: Vec<u16> = (0..world as u32).map(|r| peer_at(r) as u16).collect();
        assert_eq!(all, &by_rank);
        assert_eq!(mine, &vec![3u8; 2]);
    }
}

#[test]
fn bad_calls_get_clear_errors_and_touch_nothing() {
    let lone_master = master();
    let alone = connect_peers(lone_master.local_addr(), 1, |_| 0);
    let mut recv = vec![0u32; 2];
    let e = alone[0].all_gather(&[1u32], &mut recv, 0).unwrap_err();
    assert!(matches!(e, Error::TooFewPeers(_)), "{e}");
    assert_eq!(recv, vec![0, 0]);

    let m = master();
    let peers = connect_peers(m.local_addr(), 2, |_| 0);
    let c = &peers[0];
    // All-gather into a buffer of the wrong size.
    let mut small = vec![0u32; 3];
    let e = c.all_gather(&[1u32, 2], &mut small, 0).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert_eq!(small, vec![0; 3]);
    // Reduce-scatter from a send buffer of the wrong size.
    let mut out = vec![0u32; 2];
    let desc = ReduceDescriptor::new(2, DataType::U32, ReduceOp::Sum);
    let e = c.reduce_scatter(&[1u32; 3], &mut out, &desc).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    // Quantized broadcast and all-gather are refused.
    let q = ReduceDescriptor::new(4, DataType::F32, ReduceOp::Sum).with_quantization(
        QuantizationOptions {
            quantized_datatype: DataType::U8,
            algorithm: QuantizationAlgorithm::MinMax,
        },
    );
    let mut buf = vec![1f32; 4];
    // SAFETY: `buf` is valid; the call is refused before anything starts.
    let e = unsafe { c.broadcast_async_raw(buf.as_mut_ptr() as *mut u8, &q, 0) }.unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    let mut g = vec![0f32; 8];
    // SAFETY: as above.
    let e =
        unsafe { c.all_gather_async_raw(buf.as_ptr() as *const u8, g.as_mut_ptr() as *mut u8, &q) }
            .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    // An all-gather whose buffers overlap.
    let mut both = vec![0u32; 4];
    let d = ReduceDescriptor::new(2, DataType::U32, ReduceOp::Sum);
    let p = both.as_mut_ptr() as *mut u8;
    // SAFETY: as above.
    let e = unsafe { c.all_gather_async_raw(p, p, &d) }.unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    // A broadcast from a rank past the world fails on every peer alike.
    let results = on_all(&peers, |_, c| c.broadcast(&mut [0u8; 4], 2, 5).map(|_| ()));
    for r in results {
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    }
    // The swarm still works.
    let results = on_all(&peers, |i, c| {
        let mut b = vec![i as u8; 3];
        c.broadcast(&mut b, 0, 6).expect("broadcast");
        b
    });
    assert_eq!(results[0], results[1]);
}

#[test]
fn misuse_is_refused_at_the_call_as_in_the_c_api() {
    let m = master();
    let alone = connect_peers(m.local_addr(), 1, |_| 0);
    let c = &alone[0];
    // A group of one: TooFewPeers at the call, not from the handle.
    let desc = ReduceDescriptor::new(4, DataType::F32, ReduceOp::Sum);
    let mut x = vec![1f32; 4];
    let p = x.as_mut_ptr() as *mut u8;
    // SAFETY: `x` is valid; the call is refused before anything starts.
    let e = unsafe { c.all_reduce_async_raw(p, p, &desc) }.unwrap_err();
    assert!(matches!(e, Error::TooFewPeers(_)), "{e}");
    // Optimizing a run of one peer is invalid usage.
    let e = c.optimize_topology().unwrap_err();
    assert!(matches!(e, Error::InvalidUsage(_)), "{e}");
    assert_eq!(x, vec![1f32; 4]);
}

#[test]
fn topology_calls_wait_for_every_kind_of_in_flight_op() {
    let m = master();
    let peers = connect_peers(m.local_addr(), 2, |_| 0);
    let results = on_all(&peers, |i, c| {
        // An op started with a handle (not by tag) blocks topology calls
        // until it has finished.
        let n = 1 << 20;
        let mut x = vec![i as u32; n];
        let p = x.as_mut_ptr() as *mut u8;
        let desc = ReduceDescriptor::new(n, DataType::U32, ReduceOp::Sum);
        // SAFETY: `x` outlives the handle, awaited below.
        let h = unsafe { c.all_reduce_async_raw(p, p, &desc) }.expect("start");
        let during = if i == 0 {
            Some(c.update_topology())
        } else {
            None
        };
        c.await_handle(h).expect("all-reduce");
        (during.map(|r| r.map_err(|e| e.code())), x[0])
    });
    assert!(matches!(results[0].0, Some(Err(10))), "{:?}", results[0].0);
    assert!(results.iter().all(|r| r.1 == 1));
}

fn all_reduce_in_place(
    c: &Communicator,
    data: &mut [u8],
    desc: &ReduceDescriptor,
) -> Result<(), Error> {
    let ptr = data.as_mut_ptr();
    // SAFETY: one buffer, valid for count*size bytes for the whole call; in
    // place (send == recv) is allowed.
    unsafe { c.all_reduce_raw(ptr, ptr, desc) }?;
    Ok(())
}

/// The ring in place (one buffer read and written in its own ranges, no
/// copy of the input) gives exactly the reference for every dtype and exact
/// op, with counts below the world, odd counts and several sub-chunks per
/// segment; quantized, it is byte-equal to the out-of-place op on every peer.
#[test]
fn in_place_ring_equals_the_reference_and_the_out_of_place_op() {
    for world in [2usize, 3] {
        let m = master();
        let peers = connect_peers_with(m.local_addr(), world, |_| 0, Algorithm::Ring);
        for dtype in DataType::ALL {
            for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min] {
                for n in [1usize, 7, 1000, 300_001] {
                    let got = on_all(&peers, move |i, c| {
                        let mut data = input(dtype, i, n);
                        let desc = ReduceDescriptor::new(n, dtype, op);
                        all_reduce_in_place(c, &mut data, &desc).expect("in-place all-reduce");
                        data
                    });
                    let want = encode(dtype, (0..n).map(|k| reduced(dtype, op, world, k)));
                    for (i, g) in got.iter().enumerate() {
                        assert!(
                            *g == want,
                            "world {world} {dtype:?} {op:?} n {n} peer {i}: in place differs"
                        );
                    }
                }
            }
        }
        for dtype in [DataType::F32, DataType::BF16] {
            let n = 300_001;
            let quant = QuantizationOptions {
                quantized_datatype: DataType::U8,
                algorithm: QuantizationAlgorithm::MinMax,
            };
            let desc = ReduceDescriptor::new(n, dtype, ReduceOp::Sum).with_quantization(quant);
            let both = on_all(&peers, move |i, c| {
                let send = input(dtype, i, n);
                let out = all_reduce(c, &send, &desc).expect("out-of-place quantized");
                let mut data = send;
                all_reduce_in_place(c, &mut data, &desc).expect("in-place quantized");
                (out, data)
            });
            for (i, (out, inp)) in both.iter().enumerate() {
                assert!(
                    out == inp,
                    "world {world} {dtype:?} peer {i}: quantized in place differs"
                );
                assert!(
                    *out == both[0].0,
                    "world {world} {dtype:?} peer {i}: peers differ"
                );
            }
        }
    }
}

/// The ring and the broadcast cut each step into `pipeline_chunks`
/// sub-chunks (between 64 KiB and `chunk_bytes`): one, five and the
/// default sixteen pieces give the reference bytes, exactly, with more
/// frames (so more header bytes) the more pieces, and the same payload.
#[test]
fn every_pipeline_split_gives_the_reference_bytes() {
    let world = 3;
    // 3 segments of 1.5 MiB of f32: sixteen pieces of 96 KiB, five of
    // about 307 KiB, or one chunk of 512 KiB per step.
    let n = 3 * (3 << 19) / 4 + 5;
    let mut tx_by_pieces = Vec::new();
    for pieces in [1usize, 5, 16] {
        let m = master();
        let peers = connect_peers_tuned(m.local_addr(), world, Algorithm::Ring, |_, cfg| {
            cfg.pipeline_chunks = pieces
        });
        for dtype in [DataType::F32, DataType::BF16, DataType::U8] {
            let op = ReduceOp::Sum;
            let count = n * 4 / dtype.size();
            let out = on_all(&peers, move |i, c| {
                let desc = ReduceDescriptor::new(count, dtype, op);
                let send = input(dtype, i, count);
                let mut recv = vec![0u8; send.len()];
                // SAFETY: both buffers are valid for the whole call.
                let info = unsafe { c.all_reduce_raw(send.as_ptr(), recv.as_mut_ptr(), &desc) }
                    .expect("all-reduce");
                (recv, info.tx_bytes)
            });
            let want = encode(dtype, (0..count).map(|k| reduced(dtype, op, world, k)));
            for (i, (got, _)) in out.iter().enumerate() {
                assert!(
                    got == &want,
                    "{pieces} pieces, {dtype:?}, peer {i}: not the reference"
                );
            }
            if dtype == DataType::F32 {
                tx_by_pieces.push(out[0].1);
            }
        }
        // Broadcast from rank 1 of 3 MiB (a chain: each step is the whole buffer).
        let bytes = 3 << 20;
        let got = on_all(&peers, move |i, c| {
            let mut buf: Vec<u8> = if i == 1 {
                (0..bytes).map(|k| (k % 251) as u8).collect()
            } else {
                vec![0u8; bytes]
            };
            let info = c.broadcast(&mut buf, 1, 0).expect("broadcast");
            (info.rank, buf)
        });
        let want: Vec<u8> = (0..bytes).map(|k| (k % 251) as u8).collect();
        for (rank, buf) in got {
            assert!(
                buf == want,
                "{pieces} pieces: broadcast wrong at rank {rank}"
            );
        }
    }
    // Exact traffic: segments of 393217 or 393218 f32 elements, each sent
    // 2(w-1) = 4 times (own segment twice, each neighbour's once: n + len
    // elements), in 4 frames of at most 131072 elements (1 piece: the
    // 512 KiB cap), 5 of 78644 (5 pieces) or 16 of 24577 (16 pieces), each
    // with a 40-byte header.
    for (got, frames) in tx_by_pieces.iter().zip([4u64, 5, 16]) {
        let allowed = [393_217u64, 393_218].map(|len| 4 * (n as u64 + len) + 4 * frames * 40);
        assert!(
            allowed.contains(got),
            "{frames} frames per segment: tx {got}, expected one of {allowed:?}"
        );
    }
}

/// Peers whose frame geometry differs (`chunk_bytes`, `pipeline_chunks`)
/// are refused before any data moves: every one gets `InvalidUsage`
/// naming the field, and their buffers stay as they were. Out-of-range
/// values are refused when the communicator is built.
#[test]
fn peers_with_different_frame_geometry_are_refused_up_front() {
    let m = master();
    let peers = connect_peers_tuned(m.local_addr(), 2, Algorithm::Ring, |i, cfg| {
        cfg.pipeline_chunks = if i == 0 { 16 } else { 4 }
    });
    let n = 1 << 20;
    let errs = on_all(&peers, move |i, c| {
        let desc = ReduceDescriptor::new(n, DataType::F32, ReduceOp::Sum);
        let send = input(DataType::F32, i, n);
        let mut recv = vec![7u8; send.len()];
        // SAFETY: both buffers are valid for the whole call.
        let r = unsafe { c.all_reduce_raw(send.as_ptr(), recv.as_mut_ptr(), &desc) };
        (r.err(), recv.iter().all(|&b| b == 7))
    });
    for (i, (err, untouched)) in errs.into_iter().enumerate() {
        match err {
            Some(Error::InvalidUsage(msg)) => {
                assert!(
                    msg.contains("pipeline_chunks 16 vs 4")
                        || msg.contains("pipeline_chunks 4 vs 16"),
                    "peer {i}: {msg}"
                );
            }
            other => panic!("peer {i}: expected InvalidUsage, got {other:?}"),
        }
        assert!(untouched, "peer {i}: the receive buffer was written");
    }
    for (what, tune) in [
        (
            "chunk_bytes is 0",
            (|c: &mut pccl_core::CommunicatorConfig| c.chunk_bytes = 0) as fn(&mut _),
        ),
        ("chunk_bytes is 33554432", |c| c.chunk_bytes = 32 << 20),
        ("pipeline_chunks is 0", |c| c.pipeline_chunks = 0),
        ("pipeline_chunks is 1025", |c| c.pipeline_chunks = 1025),
    ] {
        let mut cfg = config(m.local_addr());
        tune(&mut cfg);
        match Communicator::new(cfg) {
            Err(Error::InvalidArgument(msg)) => assert!(msg.contains(what), "{msg}"),
            other => panic!("{what}: expected InvalidArgument, got {:?}", other.err()),
        }
    }
}
