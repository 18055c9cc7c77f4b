//! Churn during a quantized all-reduce: real `pccl-worker` processes (with
//! `--quant minmax --quant-type u8`, f32 sums) and an in-process master on
//! 127.0.0.1:0. One worker is SIGKILLed in the middle of a ring transfer;
//! the survivors must get `RankConnectionLost` for that attempt, retry with
//! each other, and end with bit-identical results (equal `ar_hash`) within
//! the documented error bound of the exact sum (`ar_err`).
//!
//! The harness (`common::Cluster`) is shared with `faults.rs`: every child
//! is SIGKILLed and reaped when a test ends, panics included. All ports are
//! ephemeral. The tests run one at a time.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{serial, Cluster};
use pccl_core::DataType;
use pccl_stress::swarm::lines::StepRec;
use pccl_stress::swarm::worker::quantized_sum_bound;

/// The documented error bound of the worker's u8 sum over `w` peers.
fn u8_minmax_sum_bound(w: usize) -> f64 {
    quantized_sum_bound(w as u32, DataType::U8)
}

/// Checks a quantized STEP record: it carries the result's hash and error,
/// the error is within the bound for its world size, and it is not zero
/// (the all-reduce really was quantized).
fn check_quantized(id: usize, s: &StepRec) {
    let hash = s.ar_hash;
    let err = s
        .ar_err
        .unwrap_or_else(|| panic!("w{id} step {}: no ar_err on a quantized step", s.step));
    assert!(hash.is_some(), "w{id} step {}: no ar_hash", s.step);
    let bound = u8_minmax_sum_bound(s.world as usize);
    assert!(
        err <= bound,
        "w{id} step {} (world {}): error {err:e} exceeds the documented bound {bound:e}",
        s.step,
        s.world
    );
    assert!(
        err > 0.0 && !s.allreduce_exact,
        "w{id} step {}: exact result, the all-reduce was not quantized",
        s.step
    );
}

/// Asserts that every worker in `ids` reported the same result hash at every
/// step they all reported, and that each step is a valid quantized one;
/// returns how many steps were compared.
fn assert_same_results(c: &Cluster, ids: &[usize]) -> usize {
    let all: Vec<BTreeMap<u64, StepRec>> = ids.iter().map(|&i| c.steps(i)).collect();
    let mut n = 0;
    for (step, s0) in &all[0] {
        check_quantized(ids[0], s0);
        let mut everyone = true;
        for (j, steps) in all.iter().enumerate().skip(1) {
            match steps.get(step) {
                Some(s) => {
                    check_quantized(ids[j], s);
                    assert_eq!(
                        (s.world, s.ar_hash),
                        (s0.world, s0.ar_hash),
                        "w{} and w{} disagree on the quantized result of step {step}",
                        ids[0],
                        ids[j]
                    );
                }
                None => everyone = false,
            }
        }
        n += usize::from(everyone);
    }
    n
}

fn sigkill_mid_quantized_allreduce_with(n: usize) {
    let _g = serial();
    let mut c = Cluster::new(5_000);
    let min_world = n.to_string();
    // 4M f32 per all-reduce, quantized to u8 (about 4 MiB on the wire per
    // segment pass): the ring transfer dominates each step.
    let args = [
        "--elems",
        "4194304",
        "--state-mib",
        "1",
        "--min-world",
        &min_world,
        "--trace",
        "--quant",
        "minmax",
        "--quant-type",
        "u8",
    ];
    let ids: Vec<usize> = (0..n).map(|_| c.spawn(&args)).collect();
    c.wait_steps(&ids, 3, Duration::from_secs(60));
    let before = assert_same_results(&c, &ids);
    assert!(before >= 3, "only {before} common steps before the kill");
    let victim = ids[n - 1];
    let survivors: Vec<usize> = ids[..n - 1].to_vec();
    let (aim, killed_at) = c.kill_mid_allreduce(&ids, victim);
    let recovered = c.wait_recovered(&survivors, n as u32 - 1, aim);
    let recovery = killed_at.elapsed();
    for (&s, (r, st)) in &recovered {
        println!(
            "w{s}: RETRY step={} err={} wait_ms={} restored={}; recovered at step {} \
             (world {}, ar_err {:e}, bound {:e})",
            r.step,
            r.err,
            r.wait_ms,
            r.restored,
            st.step,
            st.world,
            st.ar_err.unwrap_or(f64::NAN),
            u8_minmax_sum_bound(st.world as usize)
        );
        assert_eq!(r.err, "RankConnectionLost");
        assert!(r.restored, "the in-place buffer must be restored");
        assert_eq!(st.step, r.step, "the retry must complete the failed step");
        assert_eq!(st.retries, 1, "one failed attempt, then success");
        check_quantized(s, st);
    }
    // The survivors' retried results are bit-identical.
    let first = &recovered[&survivors[0]].1;
    for &s in &survivors[1..] {
        let st = &recovered[&s].1;
        assert_eq!(
            (st.step, st.ar_hash),
            (first.step, first.ar_hash),
            "w{} and w{s} differ after the retry",
            survivors[0]
        );
    }
    println!(
        "kill -> all {} survivors stepping with world {}: {} ms",
        n - 1,
        n - 1,
        recovery.as_millis()
    );
    // A few more steps among the survivors, all identical and within bound.
    c.wait_steps(
        &survivors,
        c.step_count(survivors[0]) + 2,
        Duration::from_secs(30),
    );
    let common = assert_same_results(&c, &survivors);
    assert!(common >= 5, "only {common} common steps");
    println!(
        "quantized results agree on {common} common steps of the survivors \
         (bounds: world {n} {:e}, world {} {:e})",
        u8_minmax_sum_bound(n),
        n - 1,
        u8_minmax_sum_bound(n - 1)
    );
}

#[test]
fn sigkill_mid_quantized_allreduce() {
    sigkill_mid_quantized_allreduce_with(3);
}

#[test]
fn sigkill_mid_quantized_allreduce_ring_of_four() {
    sigkill_mid_quantized_allreduce_with(4);
}

#[test]
fn documented_bound_is_tight_enough_to_matter() {
    // The bound is a few 8-bit steps of the final range, not a loose constant.
    for w in 2..=4 {
        let b = u8_minmax_sum_bound(w);
        let per_hop: f64 = (1..=w).map(|k| 6.0 * k as f64 / 510.0).sum();
        assert!(
            b >= per_hop && b < 1.01 * per_hop,
            "w {w}: {b} vs {per_hop}"
        );
    }
}
