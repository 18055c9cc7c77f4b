//! Multi-peer all-reduce on loopback with real sockets.

mod common;

use common::*;
use pccl_core::{DataType, ReduceDescriptor, ReduceOp};

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
    for (info, recv) in &results {
        assert_eq!(info.local_world_size, 3);
        for (k, v) in recv.iter().enumerate() {
            assert_eq!(*v, ((k % 1000) as f32) * 6.0, "element {k}");
        }
    }
    let first: Vec<u32> = results[0].1.iter().map(|v| v.to_bits()).collect();
    for (_, r) in &results[1..] {
        let bits: Vec<u32> = r.iter().map(|v| v.to_bits()).collect();
        assert_eq!(bits, first);
    }
}
