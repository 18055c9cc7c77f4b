//! `pccl_core::diloco` against a reference: two peers (threads, real
//! sockets, an in-process master) run sync DiLoCo on a quadratic task whose
//! every number the test can recompute; with two peers the average of the
//! pseudo-gradients is `(a + b) / 2` exactly, so the outer parameters and
//! momentum must equal the reference bit for bit. Also: configuration and
//! argument errors, refused before anything connects.

use pccl_core::diloco::{outer, DiLoCo, DiLoCoConfig, Mode, ParamMut};
use pccl_core::{
    CommunicatorConfig, DataType, Error, MasterConfig, MasterNode, QuantizationAlgorithm,
    QuantizationOptions,
};

const LENS: [usize; 3] = [257, 1024, 3];
const H: u64 = 3;
const INNER_LR: f32 = 0.1;

fn target(peer: usize, t: usize, k: usize) -> f32 {
    (peer as f32 + 1.0) * 0.5 + ((t * 31 + k) % 17) as f32 * 0.125
}

fn init(peer: usize, t: usize, k: usize) -> f32 {
    ((peer * 7 + t * 3 + k) % 11) as f32 * 0.25 - 1.0
}

fn inner_step(model: &mut [Vec<f32>], peer: usize) {
    for (t, v) in model.iter_mut().enumerate() {
        for (k, x) in v.iter_mut().enumerate() {
            *x -= INNER_LR * (*x - target(peer, t, k));
        }
    }
}

fn params(m: &mut [Vec<f32>]) -> Vec<ParamMut<'_>> {
    m.iter_mut()
        .map(|v| ParamMut::F32(v.as_mut_slice()))
        .collect()
}

fn run_peer(
    master: std::net::SocketAddr,
    peer: usize,
    outer_steps: u64,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>, u64) {
    let mut model: Vec<Vec<f32>> = LENS
        .iter()
        .enumerate()
        .map(|(t, &n)| (0..n).map(|k| init(peer, t, k)).collect())
        .collect();
    let cfg = DiLoCoConfig {
        mode: Mode::Sync,
        sync_every: H,
        min_world: 2,
        ..DiLoCoConfig::default()
    };
    let names = ["a", "b", "c"];
    let comm_cfg = CommunicatorConfig::new(master).with_ephemeral_ports();
    let mut d = DiLoCo::connect(comm_cfg, &names, &mut params(&mut model), cfg).expect("connect");
    while d.outer_step() < outer_steps {
        inner_step(&mut model, peer);
        if let Some(r) = d.step(&mut params(&mut model)).expect("step") {
            assert_eq!(r.world, 2, "both peers take part");
            assert!(r.applied);
        }
    }
    // The model was reset to the outer parameters.
    for (m, o) in model.iter().zip(d.outer_params()) {
        assert_eq!(m, o);
    }
    let out = (
        d.outer_params().to_vec(),
        d.momentum().to_vec(),
        d.state_hash(),
    );
    d.close();
    out
}

#[test]
fn two_peer_sync_diloco_equals_the_reference_bit_for_bit() {
    let mut master = MasterNode::bind("127.0.0.1:0".parse().unwrap(), MasterConfig::default())
        .expect("bind master");
    master.run().expect("run master");
    let addr = master.local_addr();
    const STEPS: u64 = 5;
    let a = std::thread::spawn(move || run_peer(addr, 0, STEPS));
    let b = std::thread::spawn(move || run_peer(addr, 1, STEPS));
    let (oa, ma, ha) = a.join().expect("peer 0");
    let (ob, mb, hb) = b.join().expect("peer 1");
    assert_eq!(ha, hb, "state hashes");
    assert_eq!(oa, ob);
    assert_eq!(ma, mb);

    // The reference: one of the two initial models won the founding election.
    let reference = |winner: usize| {
        let mut outer_p: Vec<Vec<f32>> = LENS
            .iter()
            .enumerate()
            .map(|(t, &n)| (0..n).map(|k| init(winner, t, k)).collect())
            .collect();
        let mut mom: Vec<Vec<f32>> = LENS.iter().map(|&n| vec![0.0; n]).collect();
        for _ in 0..STEPS {
            let mut locals = [outer_p.clone(), outer_p.clone()];
            for _ in 0..H {
                for (peer, l) in locals.iter_mut().enumerate() {
                    inner_step(l, peer);
                }
            }
            for t in 0..LENS.len() {
                let g: Vec<f32> = (0..LENS[t])
                    .map(|k| {
                        let d0 = outer_p[t][k] - locals[0][t][k];
                        let d1 = outer_p[t][k] - locals[1][t][k];
                        (d0 + d1) / 2.0
                    })
                    .collect();
                outer::outer_sgd_step(&mut outer_p[t], &mut mom[t], &g, 0.7, 0.9, true);
            }
        }
        (outer_p, mom)
    };
    let (r0, m0) = reference(0);
    let (r1, m1) = reference(1);
    assert!(
        (oa == r0 && ma == m0) || (oa == r1 && ma == m1),
        "outer state differs from both references"
    );
}

fn refused(cfg: DiLoCoConfig, needle: &str) {
    // Port 9 (discard) on loopback: nothing listens; validation must come first.
    let comm_cfg = CommunicatorConfig::new("127.0.0.1:9".parse().unwrap());
    let mut v = vec![0.0f32; 8];
    let mut params = [ParamMut::F32(&mut v)];
    match DiLoCo::connect(comm_cfg, &["w"], &mut params, cfg) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains(needle), "{m}"),
        Err(e) => panic!("expected InvalidArgument mentioning {needle}, got {e}"),
        Ok(_) => panic!("accepted a bad configuration"),
    }
    assert!(v.iter().all(|&x| x == 0.0), "parameters untouched");
}

#[test]
fn bad_configurations_are_refused_before_connecting() {
    let base = DiLoCoConfig::default();
    refused(
        DiLoCoConfig {
            sync_every: 0,
            ..base
        },
        "sync_every",
    );
    refused(
        DiLoCoConfig {
            quantization: Some(QuantizationOptions {
                quantized_datatype: DataType::F32,
                algorithm: QuantizationAlgorithm::MinMax,
            }),
            ..base
        },
        "quantized data type",
    );
    refused(
        DiLoCoConfig {
            error_feedback: true,
            ..base
        },
        "error_feedback",
    );
    refused(
        DiLoCoConfig {
            sync_every: 8,
            mode: Mode::Streaming {
                fragments: 2,
                delay: 4,
                alpha: 1.0,
            },
            ..base
        },
        "τ·F < H",
    );
    refused(
        DiLoCoConfig {
            mode: Mode::Streaming {
                fragments: 2,
                delay: 0,
                alpha: 1.0,
            },
            ..base
        },
        "fragments",
    );
    refused(
        DiLoCoConfig {
            outer_momentum: 1.0,
            ..base
        },
        "outer_momentum",
    );
}

#[test]
fn bad_parameter_lists_are_refused() {
    let comm_cfg = CommunicatorConfig::new("127.0.0.1:9".parse().unwrap());
    let cfg = DiLoCoConfig::default();
    let (mut a, mut b) = (vec![0.0f32; 4], vec![0.0f32; 4]);
    let r = DiLoCo::connect(
        comm_cfg.clone(),
        &["w", "w"],
        &mut [ParamMut::F32(&mut a), ParamMut::F32(&mut b)],
        cfg,
    );
    assert!(matches!(r, Err(Error::InvalidArgument(m)) if m.contains("twice")));
    let r = DiLoCo::connect(comm_cfg.clone(), &["w"], &mut [], cfg);
    assert!(matches!(r, Err(Error::InvalidArgument(_))));
    let mut empty: Vec<f32> = Vec::new();
    let r = DiLoCo::connect(comm_cfg, &["w"], &mut [ParamMut::F32(&mut empty)], cfg);
    assert!(matches!(r, Err(Error::InvalidArgument(m)) if m.contains("empty")));
}

/// Between-steps all-reduces: exact sums every inner step (blocking and in
/// the background), `step` refused while a background one is unawaited, and
/// a lone peer's data left as it is.
#[test]
fn between_steps_all_reduces_sum_exactly_and_guard_step() {
    let mut master = MasterNode::bind("127.0.0.1:0".parse().unwrap(), MasterConfig::default())
        .expect("bind master");
    master.run().expect("run master");
    let addr = master.local_addr();
    let peer = move |p: usize| {
        let mut model: Vec<Vec<f32>> = LENS
            .iter()
            .enumerate()
            .map(|(t, &n)| (0..n).map(|k| init(p, t, k)).collect())
            .collect();
        let cfg = DiLoCoConfig {
            sync_every: H,
            min_world: 2,
            ..DiLoCoConfig::default()
        };
        let comm_cfg = CommunicatorConfig::new(addr).with_ephemeral_ports();
        let mut d = DiLoCo::connect(comm_cfg, &["a", "b", "c"], &mut params(&mut model), cfg)
            .expect("connect");
        let mut sums = Vec::new();
        for s in 0..2 * H {
            inner_step(&mut model, p);
            // Peer p contributes [p+1, 10·(p+1), s]: the sums are known.
            let mut counts = vec![p as u32 + 1, 10 * (p as u32 + 1), s as u32];
            let info = d
                .all_reduce_between_steps(&mut counts, pccl_core::ReduceOp::Sum)
                .expect("blocking between-steps all-reduce");
            assert_eq!(info.world, 2);
            sums.push(counts);
            let h = d
                .start_between_steps(vec![p as u64 + 1; 3], pccl_core::ReduceOp::Sum)
                .expect("start");
            match d.step(&mut params(&mut model)) {
                Err(Error::InvalidUsage(m)) => assert!(m.contains("wait for its handle"), "{m}"),
                other => panic!("step with a background op pending: {other:?}"),
            }
            let (bg, r) = h.wait();
            assert_eq!(r.expect("background between-steps all-reduce").world, 2);
            assert_eq!(bg, vec![3u64; 3]);
            d.step(&mut params(&mut model)).expect("step");
        }
        let hash = d.state_hash();
        d.close();
        (sums, hash)
    };
    let a = std::thread::spawn(move || peer(0));
    let b = std::thread::spawn(move || peer(1));
    let (sa, ha) = a.join().expect("peer 0");
    let (sb, hb) = b.join().expect("peer 1");
    assert_eq!(ha, hb);
    assert_eq!(sa, sb);
    for (s, c) in sa.iter().enumerate() {
        assert_eq!(c, &vec![3, 30, 2 * s as u32]);
    }

    // Alone in its group: data untouched, world 1.
    let mut model: Vec<Vec<f32>> = LENS.iter().map(|&n| vec![0.5; n]).collect();
    let comm_cfg = CommunicatorConfig::new(addr).with_ephemeral_ports();
    let d = DiLoCo::connect(
        comm_cfg,
        &["a", "b", "c"],
        &mut params(&mut model),
        DiLoCoConfig::default(),
    )
    .expect("connect alone");
    let mut v = vec![7u32, 8];
    let info = d
        .all_reduce_between_steps(&mut v, pccl_core::ReduceOp::Sum)
        .expect("alone");
    assert_eq!((info.world, v), (1, vec![7, 8]));
    d.close();
}
