//! Shared-state sync among in-process peers on loopback.

mod common;

use common::*;
use pccl_core::{Error, SharedState, SharedTensor, SyncStrategy};

fn weights(seed: u32, n: usize) -> Vec<f32> {
    (0..n)
        .map(|k| ((k as u32).wrapping_mul(2654435761) ^ seed) as f32 * 1e-6)
        .collect()
}

#[test]
fn newcomer_receives_state_and_steady_state_moves_nothing() {
    let m = master();
    let peers = connect_peers(m.local_addr(), 3, |_| 0);
    let n = 3_000_001usize;
    let results = on_all(&peers, move |i, c| {
        // Peers 0 and 1 agree; peer 2 is stale (different weights, revision 0).
        let mut w = weights(if i == 2 { 99 } else { 7 }, n);
        let mut bias = vec![if i == 2 { 9.0 } else { 0.0 }; 17];
        let mut local = vec![i as u8; 5];
        let rev = if i == 2 { 0 } else { 5 };
        let mut st = SharedState::new(
            rev,
            vec![
                SharedTensor::new("w", &mut w),
                SharedTensor::new("b", &mut bias),
                SharedTensor::new("local", &mut local).allow_content_inequality(true),
            ],
        );
        let first = c
            .sync_shared_state(&mut st, SyncStrategy::EnforcePopular)
            .expect("sync 1");
        let rev1 = st.revision;
        // Steady state: everyone advances by one with identical content.
        st.revision += 1;
        let second = c
            .sync_shared_state(&mut st, SyncStrategy::EnforcePopular)
            .expect("sync 2");
        let rev2 = st.revision;
        drop(st);
        (first, second, rev1, rev2, w, bias, local)
    });
    let want = weights(7, n);
    for (i, (first, second, rev1, rev2, w, bias, local)) in results.iter().enumerate() {
        assert_eq!(*rev1, 5, "peer {i} adopts the group's revision");
        assert_eq!(*rev2, 6);
        assert!(
            w.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
            "peer {i} weights"
        );
        assert_eq!(second.rx_bytes, 0, "steady state receives nothing");
        assert_eq!(second.tx_bytes, 0, "steady state sends nothing");
        if i == 2 {
            assert!(
                first.rx_bytes >= (n * 4) as u64,
                "newcomer fetched the weights"
            );
            // The revision lagged, so even the unequal tensor came over.
            assert_eq!(bias, &vec![0.0f64; 17]);
            assert!(local.iter().all(|&x| x == local[0]) && local[0] < 2);
        } else {
            assert_eq!(first.rx_bytes, 0);
            assert_eq!(local, &vec![i as u8; 5], "unequal tensors are left alone");
        }
    }
    let sent: u64 = results.iter().map(|r| r.0.tx_bytes).sum();
    assert!(sent >= (n * 4) as u64, "someone served the weights");
}

#[test]
fn a_flipped_bit_is_repaired() {
    let m = master();
    let peers = connect_peers(m.local_addr(), 3, |_| 0);
    let results = on_all(&peers, |i, c| {
        let mut a = vec![1.25f32; 100_000];
        let mut b = vec![7u16; 1000];
        if i == 1 {
            a[4242] = f32::from_bits(a[4242].to_bits() ^ 1);
        }
        let mut st = SharedState::new(
            1,
            vec![
                SharedTensor::new("a", &mut a),
                SharedTensor::new("b", &mut b),
            ],
        );
        let info = c
            .sync_shared_state(&mut st, SyncStrategy::EnforcePopular)
            .expect("sync");
        drop(st);
        (info, a, b)
    });
    for (i, (info, a, b)) in results.iter().enumerate() {
        assert!(a.iter().all(|x| *x == 1.25), "peer {i}");
        assert!(b.iter().all(|x| *x == 7));
        if i == 1 {
            // Only the differing tensor moved.
            assert!(
                info.rx_bytes >= 400_000 && info.rx_bytes < 410_000,
                "rx {}",
                info.rx_bytes
            );
        } else {
            assert_eq!(info.rx_bytes, 0);
        }
    }
}

#[test]
fn revision_rule_and_strategies() {
    let m = master();
    let peers = connect_peers(m.local_addr(), 2, |_| 0);
    // First sync at revision 10 for both.
    let r = on_all(&peers, |i, c| {
        let mut x = vec![3u32; 64];
        let mut st = SharedState::new(10, vec![SharedTensor::new("x", &mut x)]);
        c.sync_shared_state(&mut st, SyncStrategy::EnforcePopular)
            .map(|_| i)
    });
    assert!(r.iter().all(|x| x.is_ok()));
    // Peer 0 skips a revision (12): error for it; peer 1 (11) is fine.
    let r = on_all(&peers, |i, c| {
        let mut x = vec![3u32; 64];
        let mut st = SharedState::new(
            if i == 0 { 12 } else { 11 },
            vec![SharedTensor::new("x", &mut x)],
        );
        c.sync_shared_state(&mut st, SyncStrategy::EnforcePopular)
    });
    assert!(matches!(r[0], Err(Error::InvalidUsage(_))), "{:?}", r[0]);
    assert!(r[1].is_ok(), "{:?}", r[1]);
    // Peer 0 retries with the right revision after the others moved on.
    // Send-only peer with non-popular content fails; receive-only peer receives.
    let r = on_all(&peers, |i, c| {
        let mut x = vec![if i == 0 { 9u32 } else { 3 }; 64];
        let rev = if i == 0 { 11 } else { 12 };
        let mut st = SharedState::new(rev, vec![SharedTensor::new("x", &mut x)]);
        let strategy = if i == 0 {
            SyncStrategy::ReceiveOnly
        } else {
            SyncStrategy::SendOnly
        };
        let res = c
            .sync_shared_state(&mut st, strategy)
            .map(|info| (info, st.revision));
        drop(st);
        (res, x)
    });
    let (res0, x0) = &r[0];
    let (res1, _) = &r[1];
    assert!(res1.is_ok(), "send-only holder: {res1:?}");
    let (info0, rev0) = res0.as_ref().expect("receive-only peer syncs");
    assert_eq!(*rev0, 12);
    assert!(info0.rx_bytes > 0);
    assert_eq!(x0, &vec![3u32; 64]);

    // All receive-only: nobody offers state.
    let r = on_all(&peers, |_, c| {
        let mut x = vec![3u32; 64];
        let mut st = SharedState::new(13, vec![SharedTensor::new("x", &mut x)]);
        c.sync_shared_state(&mut st, SyncStrategy::ReceiveOnly)
    });
    for x in &r {
        assert!(matches!(x, Err(Error::NoSharedStateAvailable(_))), "{x:?}");
    }
}

#[test]
fn send_only_with_stale_content_fails() {
    let m = master();
    let peers = connect_peers(m.local_addr(), 3, |_| 0);
    let r = on_all(&peers, |i, c| {
        let mut x = vec![if i == 2 { 1u8 } else { 2 }; 64];
        let mut st = SharedState::new(1, vec![SharedTensor::new("x", &mut x)]);
        let s = if i == 2 {
            SyncStrategy::SendOnly
        } else {
            SyncStrategy::EnforcePopular
        };
        let res = c.sync_shared_state(&mut st, s);
        drop(st);
        (res, x)
    });
    assert!(r[0].0.is_ok() && r[1].0.is_ok());
    assert!(
        matches!(r[2].0, Err(Error::InvalidUsage(_))),
        "{:?}",
        r[2].0
    );
    assert_eq!(r[2].1, vec![1u8; 64], "send-only never receives");
}

#[test]
fn mismatched_tensor_sets_are_invalid_arguments() {
    let m = master();
    let peers = connect_peers(m.local_addr(), 3, |_| 0);
    let r = on_all(&peers, |i, c| {
        let mut x = vec![0f32; if i == 2 { 10 } else { 11 }];
        let mut st = SharedState::new(1, vec![SharedTensor::new("x", &mut x)]);
        c.sync_shared_state(&mut st, SyncStrategy::EnforcePopular)
    });
    assert!(r[0].is_ok() && r[1].is_ok());
    assert!(matches!(r[2], Err(Error::InvalidArgument(_))), "{:?}", r[2]);
    // Duplicate names are refused locally.
    let mut a = vec![0u8; 4];
    let mut b = vec![0u8; 4];
    let mut st = SharedState::new(
        2,
        vec![
            SharedTensor::new("d", &mut a),
            SharedTensor::new("d", &mut b),
        ],
    );
    let e = peers[0]
        .sync_shared_state(&mut st, SyncStrategy::EnforcePopular)
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)));
}

/// Peers like `connect_peers`, with `pool` parallel connections each.
fn connect_peers_with_pool(
    master: std::net::SocketAddr,
    n: usize,
    pool: u32,
) -> Vec<std::sync::Arc<pccl_core::Communicator>> {
    let mut peers: Vec<std::sync::Arc<pccl_core::Communicator>> = Vec::new();
    for i in 0..n {
        let mut cfg = config(master);
        cfg.p2p_connection_pool_size = pool;
        let joiner = std::thread::spawn(move || {
            let c = pccl_core::Communicator::new(cfg).expect("new communicator");
            c.connect().expect("connect");
            std::sync::Arc::new(c)
        });
        let target = i as u32 + 1;
        on_all(&peers, move |_, c| admit_until(c, target));
        peers.push(joiner.join().expect("connect thread"));
    }
    peers
}

fn bytes_of(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A newcomer fetches, over four pipelined connections from two holders,
/// tensors whose sizes are not multiples of the range or leaf size (plus an
/// empty one, a one-byte one, and an unequal tensor larger than a range that
/// must come whole from one holder); every byte arrives and is verified.
#[test]
fn pipelined_fetch_from_two_holders_with_odd_sizes() {
    use pccl_core::shared_state::last_sync_timings;
    let m = master();
    let peers = connect_peers_with_pool(m.local_addr(), 3, 4);
    // 4 MiB ranges, 64 KiB leaves: 9 MiB + 12345 B spans three ranges and
    // ends in a partial leaf.
    let big = 9 * (1 << 20) + 12_345;
    let unequal = 5 * (1 << 20) + 3;
    let results = on_all(&peers, move |i, c| {
        let newcomer = i == 2;
        let seed = if newcomer { 1000 } else { 1 };
        let mut a = bytes_of(seed, big);
        let mut one = vec![if newcomer { 0u8 } else { 42 }; 1];
        let mut empty: Vec<f32> = Vec::new();
        let mut mid: Vec<u16> = (0..70_000u32)
            .map(|k| (k as u16).wrapping_mul(if newcomer { 3 } else { 7 }))
            .collect();
        let mut local = bytes_of(10 + i as u64, unequal);
        let mut st = SharedState::new(
            if newcomer { 0 } else { 4 },
            vec![
                SharedTensor::new("a", &mut a),
                SharedTensor::new("one", &mut one),
                SharedTensor::new("empty", &mut empty),
                SharedTensor::new("mid", &mut mid),
                SharedTensor::new("local", &mut local).allow_content_inequality(true),
            ],
        );
        let info = c
            .sync_shared_state(&mut st, SyncStrategy::EnforcePopular)
            .expect("sync");
        let rev = st.revision;
        drop(st);
        let timings = last_sync_timings().expect("timings of the sync just run");
        (info, rev, timings, a, one, mid, local)
    });
    let want_mid: Vec<u16> = (0..70_000u32).map(|k| (k as u16).wrapping_mul(7)).collect();
    let (info, rev, timings, a, one, mid, local) = &results[2];
    assert_eq!(*rev, 4, "the newcomer adopts the group's revision");
    assert!(a == &bytes_of(1, big), "tensor 'a' arrived intact");
    assert_eq!(one, &vec![42u8]);
    assert_eq!(mid, &want_mid);
    assert!(
        local == &results[0].6 || local == &results[1].6,
        "the unequal tensor is one holder's copy, whole"
    );
    let payload = (big + 1 + 2 * 70_000 + unequal) as u64;
    assert!(
        info.rx_bytes >= payload && info.rx_bytes < payload + 64 * 17,
        "rx {} for {payload} payload bytes",
        info.rx_bytes
    );
    assert_eq!(timings.fetch_connections, 4);
    assert_eq!(timings.failed_sources, 0);
    assert!(timings.fetch > std::time::Duration::ZERO);
    let served: u64 = results[..2].iter().map(|r| r.0.tx_bytes).sum();
    assert_eq!(
        served, info.rx_bytes,
        "holders served what the newcomer received"
    );
    for (i, r) in results[..2].iter().enumerate() {
        assert_eq!(r.0.rx_bytes, 0, "holder {i} fetched nothing");
        assert_eq!(r.2.fetch, std::time::Duration::ZERO, "holder {i}");
        assert_eq!(r.2.fetch_connections, 0, "holder {i}");
    }
}

/// A group of three runs syncs (advancing its revision each step); a fourth
/// peer joins the running group and its first sync brings it a 256 MiB
/// state bit-identical to the others' (bytes and hashes compared), at the
/// group's revision; the next steady-state sync moves nothing.
#[test]
fn newcomer_joins_a_running_group_of_three_and_gets_256_mib() {
    use std::sync::{Arc, Barrier};
    const BYTES: usize = 256 << 20;
    let m = master();
    let mut peers = connect_peers(m.local_addr(), 3, |_| 0);
    // The group runs two steps at revisions 1 and 2 with identical content.
    let group_state: Vec<u8> = bytes_of(42, BYTES);
    let want_hash = pccl_core::hash::tensor_hash(&group_state);
    let shared = Arc::new(group_state);
    let ready = on_all(&peers, {
        let shared = shared.clone();
        move |_, c| {
            let mut mine = shared.to_vec();
            for rev in 1..=2u64 {
                let mut st = SharedState::new(rev, vec![SharedTensor::new("w", &mut mine)]);
                let info = c
                    .sync_shared_state(&mut st, SyncStrategy::EnforcePopular)
                    .expect("group sync");
                assert_eq!(info.rx_bytes, 0, "agreeing peers fetch nothing");
            }
            mine
        }
    });
    // The newcomer connects while the group admits it.
    let joiner = std::thread::spawn({
        let cfg = config(m.local_addr());
        move || {
            let c = pccl_core::Communicator::new(cfg).expect("new communicator");
            c.connect().expect("connect");
            Arc::new(c)
        }
    });
    on_all(&peers, |_, c| admit_until(c, 4));
    peers.push(joiner.join().expect("joiner"));
    let states: Vec<Vec<u8>> = {
        let mut v = ready;
        v.push(vec![0u8; BYTES]); // the newcomer's stale content
        v
    };
    let states = Arc::new(std::sync::Mutex::new(states));
    let barrier = Arc::new(Barrier::new(4));
    let results = on_all(&peers, {
        let states = states.clone();
        move |i, c| {
            let mut mine = std::mem::take(&mut states.lock().unwrap()[i]);
            barrier.wait();
            // Group peers step to revision 3; the newcomer offers revision 0.
            let rev = if i == 3 { 0 } else { 3 };
            let mut st = SharedState::new(rev, vec![SharedTensor::new("w", &mut mine)]);
            let first = c
                .sync_shared_state(&mut st, SyncStrategy::EnforcePopular)
                .expect("first sync with the newcomer");
            let rev_after = st.revision;
            st.revision += 1;
            let second = c
                .sync_shared_state(&mut st, SyncStrategy::EnforcePopular)
                .expect("steady-state sync");
            drop(st);
            (first, second, rev_after, mine)
        }
    });
    for (i, (first, second, rev, bytes)) in results.iter().enumerate() {
        assert_eq!(*rev, 3, "peer {i} is at the group's revision");
        assert!(bytes[..] == shared[..], "peer {i}'s bytes differ");
        assert_eq!(pccl_core::hash::tensor_hash(bytes), want_hash, "peer {i}");
        assert_eq!((second.tx_bytes, second.rx_bytes), (0, 0), "peer {i}");
        if i == 3 {
            // The state, plus a 17-byte response head per range.
            let ranges = BYTES.div_ceil(pccl_core::shared_state::RANGE_BYTES) as u64;
            assert_eq!(first.rx_bytes, BYTES as u64 + 17 * ranges, "newcomer");
        } else {
            assert_eq!(first.rx_bytes, 0, "peer {i}");
        }
    }
    // The holders served exactly what the newcomer received.
    let served: u64 = results.iter().map(|r| r.0.tx_bytes).sum();
    assert_eq!(served, results[3].0.rx_bytes);
}

/// A newcomer's fetch reports its progress through
/// `CommunicatorConfig::on_sync_progress`: while it runs, with received
/// byte counts that never decrease, then once with `done` and every byte.
#[test]
fn fetch_progress_callback_reports_increasing_bytes() {
    use pccl_core::{SyncProgress, SyncProgressCallback};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    let m = master();
    let reports: Arc<Mutex<Vec<SyncProgress>>> = Arc::default();
    let n = 96 << 20;
    let mut peers: Vec<Arc<pccl_core::Communicator>> = Vec::new();
    for i in 0..2 {
        let mut cfg = config(m.local_addr());
        if i == 1 {
            let r = reports.clone();
            cfg.progress_interval = Duration::from_millis(1);
            cfg.on_sync_progress = Some(SyncProgressCallback::new(move |p| {
                r.lock().unwrap().push(p);
            }));
        }
        let joiner = std::thread::spawn(move || {
            let c = pccl_core::Communicator::new(cfg).expect("new communicator");
            c.connect().expect("connect");
            Arc::new(c)
        });
        let target = i as u32 + 1;
        on_all(&peers, move |_, c| admit_until(c, target));
        peers.push(joiner.join().expect("connect thread"));
    }
    let results = on_all(&peers, move |i, c| {
        let mut data = if i == 0 { bytes_of(5, n) } else { vec![0u8; n] };
        let mut st = SharedState::new(
            if i == 0 { 3 } else { 0 },
            vec![SharedTensor::new("big", &mut data)],
        );
        let info = c
            .sync_shared_state(&mut st, SyncStrategy::EnforcePopular)
            .expect("sync");
        drop(st);
        (info, data)
    });
    assert!(results[1].1 == results[0].1, "the newcomer got the bytes");
    let r = reports.lock().unwrap().clone();
    assert!(r.len() >= 2, "{r:?}");
    for w in r.windows(2) {
        assert!(w[1].received_bytes >= w[0].received_bytes, "{r:?}");
        assert!(w[1].elapsed >= w[0].elapsed, "{r:?}");
    }
    let last = r.last().unwrap();
    assert!(last.done && last.received_bytes == n as u64 && last.total_bytes == n as u64);
    assert_eq!(r.iter().filter(|p| p.done).count(), 1, "one final report");
    assert!(
        r.iter()
            .any(|p| !p.done && p.received_bytes > 0 && p.received_bytes < n as u64),
        "a report mid-transfer: {r:?}"
    );
    println!(
        "{} progress reports over {:.0} ms",
        r.len(),
        last.elapsed.as_secs_f64() * 1e3
    );
}
