//! SIGKILL mid-op for every collective, with real processes: an in-process
//! master on 127.0.0.1:0 and `pccl-worker --collective ...` processes on
//! loopback. Each worker contributes `mark + grad_value(step, k)` (its mark
//! is a small integer of its own), checks its result exactly and prints the
//! marks the result carries and its hash, so these tests can check, step by
//! step, that
//!
//! - broadcast: every peer holds the root's bytes (the peer at the root rank
//!   finds its own mark, the others that mark), bit-identical everywhere;
//! - all-gather: every peer holds every participant's contribution in rank
//!   order, bit-identical everywhere;
//! - reduce-scatter: each rank's segment is the exact sum of every
//!   participant's contribution (the marks it carries add up to the
//!   participants' marks), ranks 0..world each held once;
//! - the direct all-reduce: exact, the master really chose `direct`, equal
//!   hashes everywhere;
//!
//! and that a peer SIGKILLed in the middle of the op (aimed at a third of
//! the victim's shortest op after every peer printed the op's BEGIN line; a
//! survivor stepping on without a RETRY fails the test as a missed aim)
//! fails the op on every survivor with `RankConnectionLost`, and the retry
//! with the survivors (buffers re-sized for the smaller world) succeeds.
//!
//! The harness (`common::Cluster`) is shared with `faults.rs`: every child
//! is SIGKILLed and reaped when a test ends, panics included; all ports are
//! ephemeral; the tests run one at a time.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{serial, Cluster};
use pccl_stress::swarm::lines::{CollRec, StepRec};

/// Per step: every report of it, by worker.
fn by_step(c: &Cluster, ids: &[usize]) -> BTreeMap<u64, Vec<(usize, StepRec)>> {
    let mut m: BTreeMap<u64, Vec<(usize, StepRec)>> = BTreeMap::new();
    for &i in ids {
        for (step, s) in c.steps(i) {
            m.entry(step).or_default().push((i, s));
        }
    }
    m
}

fn coll_of(id: usize, s: &StepRec) -> &CollRec {
    s.coll
        .as_ref()
        .unwrap_or_else(|| panic!("w{id} step {}: no coll= fields", s.step))
}

/// Checks every step that all of its participants among `ids` reported
/// (as many reports as the step's world): exact on each peer, the expected
/// collective and algorithm, ranks 0..world each once, and the marks and
/// hashes the collective promises. Returns how many steps were checked.
fn check_steps(c: &Cluster, ids: &[usize], kind: &str, algo: &str) -> usize {
    let mut checked = 0;
    for (step, reports) in by_step(c, ids) {
        for (i, s) in &reports {
            let coll = coll_of(*i, s);
            assert!(
                s.allreduce_exact,
                "w{i} step {step}: inexact {kind} result: {s:?}"
            );
            assert_eq!(
                (coll.kind.as_str(), coll.algo.as_str()),
                (kind, algo),
                "w{i} step {step}"
            );
        }
        let world = reports[0].1.world as usize;
        if reports.len() != world || reports.iter().any(|(_, s)| s.world as usize != world) {
            continue; // someone's report is missing (e.g. the victim's) or worlds differ
        }
        let what = format!("step {step} (world {world}) of {kind}");
        let colls: Vec<&CollRec> = reports.iter().map(|(i, s)| coll_of(*i, s)).collect();
        let ranks: BTreeSet<u32> = colls.iter().map(|c| c.rank).collect();
        assert_eq!(
            ranks,
            (0..world as u32).collect(),
            "{what}: ranks are not 0..world"
        );
        let marks: BTreeSet<u32> = colls.iter().map(|c| c.mark).collect();
        assert_eq!(marks.len(), world, "{what}: peers share a mark");
        let hashes: BTreeSet<Option<u64>> = reports.iter().map(|(_, s)| s.ar_hash).collect();
        match kind {
            "broadcast" => {
                let root = colls[0].root.expect("broadcast root");
                let at_root = colls
                    .iter()
                    .find(|c| c.rank == root)
                    .expect("a peer at the root rank");
                for c in &colls {
                    assert_eq!(c.root, Some(root), "{what}: peers disagree on the root");
                    assert_eq!(
                        c.marks,
                        vec![at_root.mark],
                        "{what}: rank {} does not hold the root's bytes",
                        c.rank
                    );
                }
                assert_eq!(hashes.len(), 1, "{what}: results differ: {hashes:?}");
            }
            "all-gather" => {
                let mut by_rank: Vec<(u32, u32)> = colls.iter().map(|c| (c.rank, c.mark)).collect();
                by_rank.sort();
                let want: Vec<u32> = by_rank.iter().map(|(_, m)| *m).collect();
                for c in &colls {
                    assert_eq!(
                        c.marks, want,
                        "{what}: rank {} gathered the wrong contributions",
                        c.rank
                    );
                }
                assert_eq!(hashes.len(), 1, "{what}: results differ: {hashes:?}");
            }
            "reduce-scatter" => {
                let sum: u64 = colls.iter().map(|c| u64::from(c.mark)).sum();
                for c in &colls {
                    assert_eq!(
                        c.mark_sum,
                        Some(sum),
                        "{what}: rank {}'s segment is not the sum of every contribution",
                        c.rank
                    );
                }
                // Each rank holds a different segment.
                assert_eq!(hashes.len(), world, "{what}: segments {hashes:?}");
            }
            _ => {
                assert_eq!(hashes.len(), 1, "{what}: results differ: {hashes:?}");
            }
        }
        checked += 1;
    }
    checked
}

/// `n` workers running `kind` (`--elems` `elems`, plus `extra`); after
/// three steps one is SIGKILLed mid-op; the survivors must all retry and
/// step on with world n − 1, every result exact and consistent.
fn sigkill_mid(kind: &str, op: &str, algo: &str, n: usize, elems: usize, extra: &[&str]) {
    let _g = serial();
    let mut c = Cluster::new(5_000);
    let min_world = n.to_string();
    let elems = elems.to_string();
    let mut args = vec![
        "--collective",
        kind,
        "--elems",
        &elems,
        "--state-mib",
        "1",
        "--min-world",
        &min_world,
        "--trace",
    ];
    args.extend_from_slice(extra);
    let ids: Vec<usize> = (0..n).map(|_| c.spawn(&args)).collect();
    c.wait_steps(&ids, 3, Duration::from_secs(60));
    let before = check_steps(&c, &ids, kind, algo);
    assert!(
        before >= 3,
        "only {before} complete steps of all {n} before the kill"
    );
    let victim = ids[n - 1];
    let survivors: Vec<usize> = ids[..n - 1].to_vec();
    let (aim, killed_at) = c.kill_mid_op(&ids, victim, op);
    let recovered = c.wait_recovered(&survivors, n as u32 - 1, aim);
    let recovery = killed_at.elapsed();
    for (&s, (r, st)) in &recovered {
        println!(
            "w{s}: RETRY step={} op={} err={} wait_ms={} restored={}; recovered at step {} \
             (world {}, retries {}, {:.1} ms)",
            r.step, r.op, r.err, r.wait_ms, r.restored, st.step, st.world, st.retries, st.ar_ms
        );
        assert_eq!(r.op, op);
        assert_eq!(r.err, "RankConnectionLost");
        assert_eq!(st.step, r.step, "the retry must complete the failed step");
        assert!(st.retries >= 1);
        assert!(
            r.wait_ms < 5_000,
            "w{s} waited {} ms for the failed op to return",
            r.wait_ms
        );
        if kind != "broadcast" {
            // A broadcast overwrites non-root buffers; the others' inputs
            // (an all-reduce restores its in-place buffer) must be intact.
            assert!(
                r.restored,
                "w{s}: the input was not intact after the failure"
            );
        }
        assert!(st.allreduce_exact, "w{s}: inexact result after recovery");
    }
    println!(
        "{kind}: kill -> all {} survivors stepping with world {}: {} ms (aimed {:.0} ms into the op)",
        n - 1,
        n - 1,
        recovery.as_millis(),
        aim.as_secs_f64() * 1e3
    );
    c.wait_steps(
        &survivors,
        c.step_count(survivors[0]) + 2,
        Duration::from_secs(30),
    );
    // Every step, before and after the kill, victim included while it lived.
    let checked = check_steps(&c, &ids, kind, algo);
    let retried = recovered[&survivors[0]].1.step;
    let after = by_step(&c, &survivors)
        .into_iter()
        .filter(|(step, r)| *step >= retried && r.len() == n - 1)
        .count();
    assert!(
        after >= 3,
        "only {after} steps of the survivors from the retried one on"
    );
    for &s in &survivors[1..] {
        c.assert_same_hashes(survivors[0], s);
    }
    println!(
        "{kind}: {checked} steps checked across peers ({after} with world {})",
        n - 1
    );
}

#[test]
fn sigkill_mid_broadcast() {
    // 64 MiB along the pipelined chain (its ops are the shortest per byte).
    sigkill_mid("broadcast", "broadcast", "ring", 3, 16 << 20, &[]);
}

#[test]
fn sigkill_mid_all_gather() {
    // 16 MiB per rank: 48 MiB gathered in a world of 3.
    sigkill_mid("all-gather", "allgather", "ring", 3, 4 << 20, &[]);
}

/// In a ring of four, one survivor shares no connection with the victim.
#[test]
fn sigkill_mid_reduce_scatter_ring_of_four() {
    // 8 MiB shares: 32 MiB reduced in a world of 4.
    sigkill_mid("reduce-scatter", "reducescatter", "ring", 4, 2 << 20, &[]);
}

/// The one-hop direct all-reduce, asked for explicitly. The op is 16 MiB
/// (each peer sends it to both others) so that the kill can be aimed inside
/// it: a small op lasts about a millisecond, too short for an outside
/// SIGKILL to be timed into it; the direct algorithm is the same code at
/// every size.
#[test]
fn sigkill_mid_direct_all_reduce() {
    sigkill_mid(
        "all-reduce",
        "allreduce",
        "direct",
        3,
        4 << 20,
        &["--algorithm", "direct"],
    );
}

/// Small direct all-reduces (1 KiB, the size the master's `auto` gives to
/// the direct algorithm) while a peer is SIGKILLed as soon as every peer
/// has begun one. Such an op lasts about a millisecond, so the kill may
/// land in it or just after it: the test asserts the outcome either way
/// (the survivors step on with world 2, every result exact, the algorithm
/// direct, hashes equal) and prints which it was.
#[test]
fn sigkill_during_small_direct_all_reduces() {
    let _g = serial();
    let mut c = Cluster::new(5_000);
    let args = [
        "--collective",
        "all-reduce",
        "--algorithm",
        "direct",
        "--elems",
        "256",
        "--state-mib",
        "1",
        "--min-world",
        "3",
        "--trace",
    ];
    let ids: Vec<usize> = (0..3).map(|_| c.spawn(&args)).collect();
    c.wait_steps(&ids, 5, Duration::from_secs(60));
    let (victim, survivors) = (ids[2], [ids[0], ids[1]]);
    c.wait_all_begin(&ids, "allreduce");
    c.procs.kill(victim).expect("SIGKILL the victim");
    let mut first: BTreeMap<usize, u64> = BTreeMap::new();
    c.wait_for(
        "the survivors to step with world 2",
        Duration::from_secs(30),
        |_, id, r| {
            if let pccl_stress::swarm::lines::Record::Step(s) = r {
                if s.world == 2 {
                    first.entry(id).or_insert(s.step);
                }
            }
            survivors
                .iter()
                .all(|s| first.contains_key(s))
                .then_some(())
        },
    );
    c.wait_steps(
        &survivors,
        c.step_count(survivors[0]) + 5,
        Duration::from_secs(30),
    );
    let checked = check_steps(&c, &ids, "all-reduce", "direct");
    let retries: Vec<usize> = survivors.iter().map(|&s| c.retries(s).len()).collect();
    println!(
        "small direct: {checked} steps checked; survivors' RETRY lines {retries:?} \
         (0: the kill landed before the victim's request reached the master, or between ops); first world-2 steps {first:?}"
    );
    assert!(checked >= 8, "only {checked} complete steps");
    c.assert_same_hashes(survivors[0], survivors[1]);
}
