//! Multi-peer all-reduce on loopback with real sockets (in-process peers).

mod common;

use std::io::Write;
use std::sync::Arc;

use common::*;
use half::{bf16, f16};
use pccl_core::{DataType, Error, ReduceDescriptor, ReduceOp};

/// Deterministic small values: exact in every type, products fit in i8.
fn value(op: ReduceOp, dtype: DataType, peer: usize, k: usize) -> f64 {
    let base = ((k * 7 + peer * 3) % 5) as f64;
    match op {
        ReduceOp::Prod => base + 1.0,
        _ if matches!(
            dtype,
            DataType::I8 | DataType::I16 | DataType::I32 | DataType::I64
        ) || dtype.is_float() =>
        {
            base * 3.0 - 5.0
        }
        _ => base * 3.0,
    }
}

fn encode(dtype: DataType, vals: &[f64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(vals.len() * dtype.size());
    for &v in vals {
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

/// Expected result bytes, following the documented semantics.
fn reference(dtype: DataType, op: ReduceOp, world: usize, n: usize) -> Vec<u8> {
    let vals: Vec<f64> = (0..n)
        .map(|k| {
            let xs: Vec<f64> = (0..world).map(|p| value(op, dtype, p, k)).collect();
            match op {
                ReduceOp::Sum => xs.iter().sum(),
                ReduceOp::Prod => xs.iter().product(),
                ReduceOp::Max => xs.iter().cloned().fold(f64::MIN, f64::max),
                ReduceOp::Min => xs.iter().cloned().fold(f64::MAX, f64::min),
                ReduceOp::Avg => {
                    let s: f64 = xs.iter().sum();
                    match dtype {
                        DataType::F64 => s / world as f64,
                        DataType::F32 => (s as f32 / world as f32) as f64,
                        DataType::F16 => f16::from_f32(s as f32 / world as f32).to_f64(),
                        DataType::BF16 => bf16::from_f32(s as f32 / world as f32).to_f64(),
                        // Integer average truncates toward zero.
                        _ => ((s as i64) / world as i64) as f64,
                    }
                }
            }
        })
        .collect();
    encode(dtype, &vals)
}

fn input(dtype: DataType, op: ReduceOp, peer: usize, n: usize) -> Vec<u8> {
    let vals: Vec<f64> = (0..n).map(|k| value(op, dtype, peer, k)).collect();
    encode(dtype, &vals)
}

fn run_bytes(
    c: &pccl_core::Communicator,
    send: &[u8],
    recv: &mut [u8],
    desc: &ReduceDescriptor,
) -> Result<pccl_core::ReduceInfo, Error> {
    // SAFETY: both buffers are valid for count*size bytes for the whole call.
    unsafe { c.all_reduce_raw(send.as_ptr(), recv.as_mut_ptr(), desc) }
}

#[test]
fn three_peers_sum_f32_exact() {
    let m = master();
    let peers = connect_peers(m.local_addr(), 3, |_| 0);
    let n = 1_000_003usize;
    let results = on_all(&peers, move |i, c| {
        let send: Vec<f32> = (0..n)
            .map(|k| ((k % 1000) as f32) * (i as f32 + 1.0))
            .collect();
        let mut recv = vec![0f32; n];
        let info = c
            .all_reduce(
                &send,
                &mut recv,
                &ReduceDescriptor::new(n, DataType::F32, ReduceOp::Sum),
            )
            .expect("all-reduce");
        (info, recv)
    });
    // Every segment crosses a link 2(w-1) = 4 times, in 16 frames each time
    // (a step is cut in 16 sub-chunks of 20834 elements: 83 KiB, between the
    // 64 KiB floor and the 512 KiB cap).
    let total_tx: u64 = results.iter().map(|(i, _)| i.tx_bytes).sum();
    let total_rx: u64 = results.iter().map(|(i, _)| i.rx_bytes).sum();
    assert_eq!(total_tx, 4 * (n as u64 * 4 + 3 * 16 * 40));
    assert_eq!(total_rx, total_tx);
    for (info, recv) in &results {
        assert_eq!(info.local_world_size, 3);
        // Segments hold 333334, 333334 and 333335 elements, 16 sub-chunks
        // each. Rank r sends its own segment twice and each neighbour's once
        // (4 transmissions, 64 frames of 40-byte header):
        // 4 * (n + len(r)) + 2560 bytes; it receives likewise.
        let allowed = [333_334u64, 333_335].map(|len| 4 * (n as u64 + len) + 64 * 40);
        assert!(allowed.contains(&info.tx_bytes), "tx {}", info.tx_bytes);
        assert!(allowed.contains(&info.rx_bytes), "rx {}", info.rx_bytes);
        for (k, v) in recv.iter().enumerate() {
            assert_eq!(*v, ((k % 1000) as f32) * 6.0, "element {k}");
        }
    }
}

#[test]
fn every_dtype_and_op_matches_the_reference() {
    let m = master();
    for world in [2usize, 3] {
        let peers = connect_peers(m.local_addr(), world, |_| 100 + world as u32);
        for dtype in DataType::ALL {
            for op in ReduceOp::ALL {
                for n in [1usize, 2, world + 1, 1000, 70_001] {
                    let results = on_all(&peers, move |i, c| {
                        let send = input(dtype, op, i, n);
                        let mut recv = vec![0u8; send.len()];
                        let desc = ReduceDescriptor::new(n, dtype, op);
                        run_bytes(c, &send, &mut recv, &desc).expect("all-reduce");
                        recv
                    });
                    let want = reference(dtype, op, world, n);
                    for (i, r) in results.iter().enumerate() {
                        assert_eq!(r, &want, "world {world} {dtype:?} {op:?} n {n} peer {i}");
                    }
                }
            }
        }
    }
}

#[test]
fn in_place_and_concurrent_tagged_ops() {
    let m = master();
    let peers = connect_peers(m.local_addr(), 3, |_| 0);
    let results = on_all(&peers, |i, c| {
        let mut bufs: Vec<Vec<i64>> = (0..8)
            .map(|t| vec![(i as i64 + 1) * (t + 1); 10_000 + t as usize])
            .collect();
        let mut handles = Vec::new();
        for (t, b) in bufs.iter_mut().enumerate() {
            let desc =
                ReduceDescriptor::new(b.len(), DataType::I64, ReduceOp::Sum).with_tag(t as u64);
            let p = b.as_mut_ptr() as *mut u8;
            // SAFETY: each buffer outlives its handle, which is awaited below.
            handles.push(unsafe { c.all_reduce_async_raw(p, p, &desc) }.expect("start"));
        }
        for h in handles {
            c.await_handle(h).expect("await");
        }
        bufs
    });
    for bufs in &results {
        for (t, b) in bufs.iter().enumerate() {
            assert!(b.iter().all(|&x| x == 6 * (t as i64 + 1)), "tag {t}");
        }
    }
}

#[test]
fn peer_groups_are_isolated_and_attributes_count_groups() {
    let m = master();
    let peers = connect_peers(m.local_addr(), 4, |i| (i % 2) as u32);
    let results = on_all(&peers, |i, c| {
        let world = c.world().expect("world");
        let mut x = vec![(i + 1) as u32; 33];
        c.all_reduce_in_place(
            &mut x,
            &ReduceDescriptor::new(33, DataType::U32, ReduceOp::Sum),
        )
        .expect("all-reduce");
        (world, x[0])
    });
    for (i, (world, x)) in results.iter().enumerate() {
        assert_eq!(world.global_world, 4);
        assert_eq!(world.group_world, 2);
        assert_eq!(world.num_groups, 2);
        assert_eq!(world.largest_group, 2);
        // Group 0 = peers 0 and 2 (1 + 3), group 1 = peers 1 and 3 (2 + 4).
        assert_eq!(*x, if i % 2 == 0 { 4 } else { 6 });
    }
}

#[test]
fn a_lone_peer_gets_too_few_peers_and_keeps_its_data() {
    let m = master();
    let peers = connect_peers(m.local_addr(), 1, |_| 0);
    let mut x = vec![1.5f32; 10];
    let e = peers[0]
        .all_reduce_in_place(
            &mut x,
            &ReduceDescriptor::new(10, DataType::F32, ReduceOp::Sum),
        )
        .unwrap_err();
    assert!(matches!(e, Error::TooFewPeers(_)), "{e}");
    assert!(x.iter().all(|&v| v == 1.5));
}

#[test]
fn invalid_arguments_are_refused() {
    let m = master();
    let peers = connect_peers(m.local_addr(), 2, |_| 0);
    let c = &peers[0];
    let send = vec![1f32; 4];
    let mut recv = vec![0f32; 4];
    let e = c
        .all_reduce(
            &send,
            &mut recv,
            &ReduceDescriptor::new(0, DataType::F32, ReduceOp::Sum),
        )
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)));
    let e = c
        .all_reduce(
            &send,
            &mut recv,
            &ReduceDescriptor::new(4, DataType::F64, ReduceOp::Sum),
        )
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)));
    let mut q = ReduceDescriptor::new(4, DataType::I32, ReduceOp::Sum);
    q.quantization = pccl_core::QuantizationOptions {
        quantized_datatype: DataType::U8,
        algorithm: pccl_core::QuantizationAlgorithm::MinMax,
    };
    let si = vec![1i32; 4];
    let mut ri = vec![0i32; 4];
    let e = c.all_reduce(&si, &mut ri, &q).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument(_)),
        "quantizing integers: {e}"
    );
    // Overlapping but distinct buffers.
    let mut buf = vec![0u8; 16];
    let p = buf.as_mut_ptr();
    // SAFETY: both ranges are inside `buf`; the call refuses before touching them.
    let e = unsafe {
        c.all_reduce_raw(
            p,
            p.add(4),
            &ReduceDescriptor::new(8, DataType::U8, ReduceOp::Sum),
        )
    }
    .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)));
}

#[test]
fn join_mid_run_and_graceful_leave_cause_no_errors() {
    let m = master();
    let mut peers = connect_peers(m.local_addr(), 2, |_| 0);
    let run = |peers: &[Arc<pccl_core::Communicator>]| {
        let w = peers.len() as u32;
        on_all(peers, move |i, c| {
            let mut x = vec![i as u64 + 1; 1000];
            let info = c
                .all_reduce_in_place(
                    &mut x,
                    &ReduceDescriptor::new(1000, DataType::U64, ReduceOp::Sum),
                )
                .expect("all-reduce");
            assert_eq!(info.local_world_size, w);
            x[0]
        })
    };
    assert_eq!(run(&peers), vec![3, 3]);
    // A third peer joins while the others keep going.
    let joiner = {
        let addr = m.local_addr();
        std::thread::spawn(move || {
            let c = pccl_core::Communicator::new(config(addr)).expect("new");
            c.connect().expect("connect");
            Arc::new(c)
        })
    };
    on_all(&peers, |_, c| admit_until(c, 3));
    peers.push(joiner.join().expect("join"));
    assert_eq!(run(&peers), vec![6, 6, 6]);
    // The first peer leaves gracefully: the next op of the others succeeds.
    let leaver = peers.remove(0);
    match Arc::try_unwrap(leaver) {
        Ok(c) => c.close(),
        Err(_) => panic!("peer still shared"),
    }
    // Peers 1 and 2 (values 2 and 3) remain, renumbered 0 and 1 here: 1 + 2.
    let sums = run(&peers);
    assert_eq!(sums, vec![3, 3]);
}

#[test]
fn garbage_on_master_and_p2p_ports_is_survived() {
    let m = master();
    let peers = connect_peers(m.local_addr(), 2, |_| 0);
    // Raw garbage, a wrong magic, a huge length after a valid greeting.
    for payload in [b"GET / HTTP/1.1\r\n\r\n".to_vec(), vec![0xffu8; 4096], {
        let mut v = pccl_core::wire::Hello {
            kind: pccl_core::wire::ConnKind::Control,
            from: Default::default(),
            to: Default::default(),
        }
        .encode()
        .to_vec();
        v.extend_from_slice(&u32::MAX.to_le_bytes());
        v
    }] {
        let mut s = std::net::TcpStream::connect(m.local_addr()).expect("connect");
        let _ = s.write_all(&payload);
        drop(s);
    }
    // The swarm keeps working.
    let r = on_all(&peers, |i, c| {
        let mut x = vec![i as u8 + 1; 100];
        c.all_reduce_in_place(
            &mut x,
            &ReduceDescriptor::new(100, DataType::U8, ReduceOp::Sum),
        )
        .expect("all-reduce after garbage");
        x[99]
    });
    assert_eq!(r, vec![3, 3]);
}

#[test]
fn quantized_all_reduce_is_bit_identical_and_compressed() {
    use pccl_core::{QuantizationAlgorithm, QuantizationOptions};
    let m = master();
    let peers = connect_peers(m.local_addr(), 3, |_| 0);
    let n = 300_000usize;
    for algo in [
        QuantizationAlgorithm::MinMax,
        QuantizationAlgorithm::ZeroPointScale,
    ] {
        for q in [DataType::U8, DataType::I8, DataType::U16, DataType::I16] {
            let results = on_all(&peers, move |i, c| {
                let send: Vec<f32> = (0..n)
                    .map(|k| (((k * 37 + i * 11) % 1000) as f32 - 500.0) * 0.01)
                    .collect();
                let mut recv = vec![0f32; n];
                let desc = ReduceDescriptor::new(n, DataType::F32, ReduceOp::Sum)
                    .with_quantization(QuantizationOptions {
                        quantized_datatype: q,
                        algorithm: algo,
                    });
                let info = c
                    .all_reduce(&send, &mut recv, &desc)
                    .expect("quantized all-reduce");
                (info, recv)
            });
            let exact: Vec<f32> = (0..n)
                .map(|k| {
                    (0..3)
                        .map(|i| (((k * 37 + i * 11) % 1000) as f32 - 500.0) * 0.01)
                        .sum()
                })
                .collect();
            let bits0: Vec<u32> = results[0].1.iter().map(|v| v.to_bits()).collect();
            for (info, r) in &results {
                let bits: Vec<u32> = r.iter().map(|v| v.to_bits()).collect();
                assert!(bits == bits0, "{algo:?} {q:?}: peers differ");
                // Each block's range is about 20 (per peer) to 30 (sums); 8-bit steps
                // plus accumulation over 2 hops stay well under 0.5.
                let tol = if q.size() == 1 { 0.5 } else { 0.01 };
                let worst = r
                    .iter()
                    .zip(&exact)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst < tol, "{algo:?} {q:?}: error {worst}");
                let raw = (2 * 2 * n * 4 / 3) as u64;
                let ratio = info.tx_bytes as f64 / raw as f64;
                let want = q.size() as f64 / 4.0;
                assert!(
                    (ratio - want).abs() < 0.03,
                    "{algo:?} {q:?}: wire ratio {ratio}"
                );
            }
        }
    }
}

#[test]
fn a_second_master_on_a_taken_port_fails_clearly() {
    let m = master();
    let e = pccl_core::MasterNode::bind(m.local_addr(), pccl_core::MasterConfig::default())
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert!(e.to_string().contains("cannot listen"), "{e}");
}

#[test]
fn many_ops_with_retry_in_one_call() {
    let m = master();
    let peers = connect_peers(m.local_addr(), 3, |_| 0);
    let results = on_all(&peers, |i, c| {
        let mut a = vec![i as f32 + 1.0; 100_000];
        let mut b = vec![(i as i32 + 1) * 10; 777];
        let src = vec![2u8; 5];
        let mut dst = vec![0u8; 5];
        let info = {
            let mut ops = [
                pccl_core::ReduceBuffers::in_place(&mut a, ReduceOp::Sum, 1),
                pccl_core::ReduceBuffers::in_place(&mut b, ReduceOp::Max, 2),
                pccl_core::ReduceBuffers::new(&src, &mut dst, ReduceOp::Prod, 3),
            ];
            c.all_reduce_multiple_with_retry(&mut ops, 2)
                .expect("multiple")
        };
        (info, a[99_999], b[0], dst)
    });
    for (info, a, b, dst) in results {
        assert_eq!(info.local_world_size, 3);
        assert_eq!(a, 6.0);
        assert_eq!(b, 30);
        assert_eq!(dst, vec![8u8; 5]);
    }
}
