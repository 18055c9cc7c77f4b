//! Process-level fault tests: an in-process master on 127.0.0.1 and real
//! `pccl-worker` processes talking over loopback sockets. Peers are SIGKILLed
//! mid all-reduce, frozen with SIGSTOP until the master evicts them, joined
//! late, and killed while a newcomer fetches the shared state from them.
//!
//! Every child is SIGKILLed and reaped when a test ends, panics included
//! (the `common::Cluster` harness); workers also exit when their stdin (a pipe from this
//! process) closes. Children's stdout/stderr are read on threads; the tests
//! wait for specific lines with deadlines, never for fixed sleeps. The tests
//! run one at a time (a lock), so their timings do not disturb each other on
//! small machines.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{serial, Cluster};
use pccl_stress::swarm::lines::{Record, StepRec};

/// What a holder logs (at debug) when it starts writing a shared-state range.
const SERVING: &str = "serving a shared-state range";

/// The step a worker's STEP record has, if it is one with `world`.
fn step_with_world(rec: &Record, world: u32) -> Option<&StepRec> {
    match rec {
        Record::Step(s) if s.world == world => Some(s),
        _ => None,
    }
}

#[test]
fn sigkill_mid_allreduce() {
    sigkill_mid_allreduce_with(3);
}

/// In a ring of four, the peer opposite the victim shares no connection
/// with it: only the master's verdict can stop its all-reduce.
#[test]
fn sigkill_mid_allreduce_ring_of_four() {
    sigkill_mid_allreduce_with(4);
}

fn sigkill_mid_allreduce_with(n: usize) {
    let _g = serial();
    let mut c = Cluster::new(5_000);
    let min_world = n.to_string();
    // 8M f32 (32 MiB) per all-reduce: the ring transfer dominates each step,
    // and an op lasts long enough (tens of ms in place) for the kill to land
    // inside it on a loaded machine.
    let args = [
        "--elems",
        "8388608",
        "--state-mib",
        "1",
        "--min-world",
        &min_world,
        "--trace",
    ];
    let ids: Vec<usize> = (0..n).map(|_| c.spawn(&args)).collect();
    c.wait_steps(&ids, 3, Duration::from_secs(40));
    let victim = ids[n - 1];
    let survivors: Vec<usize> = ids[..n - 1].to_vec();
    let (aim, killed_at) = c.kill_mid_allreduce(&ids, victim);
    // Every survivor fails, retries, and steps on with world n - 1.
    let recovered = c.wait_recovered(&survivors, n as u32 - 1, aim);
    let recovery = killed_at.elapsed();
    for (&s, (r, st)) in &recovered {
        println!(
            "w{s}: RETRY step={} err={} wait_ms={} restored={}; recovered at step {} (world {})",
            r.step, r.err, r.wait_ms, r.restored, st.step, st.world
        );
        assert_eq!(r.err, "RankConnectionLost");
        assert!(
            r.restored,
            "the in-place buffer must be restored after a failure"
        );
        assert!(
            r.wait_ms < 5_000,
            "w{s} waited {} ms for the failed all-reduce to return",
            r.wait_ms
        );
        assert!(st.allreduce_exact, "inexact result after recovery");
        assert_eq!(st.retries, 1);
    }
    println!(
        "kill -> all {} survivors stepping with world {}: {} ms",
        n - 1,
        n - 1,
        recovery.as_millis()
    );
    c.wait_steps(
        &survivors,
        c.step_count(survivors[0]) + 2,
        Duration::from_secs(30),
    );
    for &s in &survivors {
        for st in c.steps(s).values() {
            assert!(st.allreduce_exact, "w{s} step {} inexact", st.step);
        }
    }
    let common = c.assert_same_hashes(survivors[0], survivors[1]);
    assert!(common >= 5, "only {common} common steps");
    for &s in &survivors[2..] {
        c.assert_same_hashes(survivors[0], s);
    }
    let before = c.assert_same_hashes(survivors[0], victim);
    println!(
        "hashes agree on {common} common steps of the survivors ({before} with the victim before it died)"
    );
}

/// With restore-on-failure off (`PCCL_IN_PLACE_RESTORE=0`: no saved copy,
/// peak memory the tensor itself), a survivor whose in-place buffer was
/// already partly overwritten gets `InPlaceInputLost`, and one whose buffer
/// was not yet written gets `RankConnectionLost` with its input intact.
/// Either way it refills and retries, and the group steps on exactly.
#[test]
fn sigkill_mid_allreduce_without_restore() {
    let _g = serial();
    let mut c = Cluster::new(5_000);
    let args = [
        "--elems",
        "8388608",
        "--state-mib",
        "1",
        "--min-world",
        "3",
        "--trace",
    ];
    let env = [("PCCL_IN_PLACE_RESTORE", "0")];
    let ids: Vec<usize> = (0..3).map(|_| c.spawn_with_env(&args, &env)).collect();
    c.wait_steps(&ids, 3, Duration::from_secs(40));
    let (victim, survivors) = (ids[2], ids[..2].to_vec());
    // Aimed late, where every buffer is being written (the all-gather).
    let (aim, _) = c.kill_mid_allreduce_at(&ids, victim, 0.6);
    let recovered = c.wait_recovered(&survivors, 2, aim);
    let mut lost = 0;
    for (&s, (r, st)) in &recovered {
        println!(
            "w{s}: RETRY step={} err={} restored={}; recovered at step {} (world {})",
            r.step, r.err, r.restored, st.step, st.world
        );
        match r.err.as_str() {
            "InPlaceInputLost" => lost += 1,
            "RankConnectionLost" => assert!(
                r.restored,
                "w{s}: a plain RankConnectionLost must leave the buffer as it was"
            ),
            other => panic!("w{s}: unexpected error {other}"),
        }
        assert!(st.allreduce_exact, "inexact result after recovery");
    }
    println!("{lost} of 2 survivors reported InPlaceInputLost");
    c.wait_steps(
        &survivors,
        c.step_count(survivors[0]) + 2,
        Duration::from_secs(30),
    );
    for &s in &survivors {
        for st in c.steps(s).values() {
            assert!(st.allreduce_exact, "w{s} step {} inexact", st.step);
        }
    }
    c.assert_same_hashes(survivors[0], survivors[1]);
}

#[test]
fn sigstop_peer_is_evicted() {
    let _g = serial();
    let timeout_ms = 1_500;
    let mut c = Cluster::new(timeout_ms);
    let args = [
        "--elems",
        "4194304",
        "--state-mib",
        "1",
        "--min-world",
        "3",
        "--trace",
    ];
    let ids: Vec<usize> = (0..3).map(|_| c.spawn(&args)).collect();
    c.wait_steps(&ids, 3, Duration::from_secs(40));
    let victim = ids[2];
    let survivors = [ids[0], ids[1]];
    // Freeze it in the middle of a ring transfer: the survivors' all-reduce
    // stalls (the sockets stay open) until the master evicts the silent peer.
    let typical_ms = c
        .steps(victim)
        .values()
        .map(|s| s.ar_ms)
        .fold(f64::INFINITY, f64::min);
    c.wait_all_begin(&ids, "allreduce");
    std::thread::sleep(Duration::from_secs_f64((typical_ms / 2.0).max(5.0) / 1e3));
    c.procs
        .signal(victim, libc::SIGSTOP)
        .expect("SIGSTOP the victim");
    let stopped_at = Instant::now();
    let mut seen = BTreeMap::new();
    c.wait_for(
        "the survivors to step with world 2",
        Duration::from_secs(10),
        |_, id, r| {
            if step_with_world(r, 2).is_some() {
                seen.entry(id).or_insert(stopped_at.elapsed());
            }
            survivors.iter().all(|s| seen.contains_key(s)).then_some(())
        },
    );
    let evicted = seen.values().max().copied().unwrap_or_default();
    let waits = survivors.map(|s| c.retries(s).iter().map(|r| r.wait_ms).collect::<Vec<_>>());
    println!(
        "SIGSTOP -> survivors stepping with world 2: {} ms (peer timeout {timeout_ms} ms); \
         survivors' failed all-reduce waits (ms): {waits:?}",
        evicted.as_millis(),
    );
    assert!(
        evicted >= Duration::from_millis(timeout_ms / 2),
        "the frozen peer was dropped before the timeout could expire ({} ms)",
        evicted.as_millis()
    );
    for w in waits.iter().flatten() {
        assert!(
            *w < timeout_ms + 5_000,
            "a survivor waited {w} ms on the stalled all-reduce"
        );
    }

    // Thaw it: it finds itself evicted, joins again, receives the state and
    // steps with the others.
    c.procs.signal(victim, libc::SIGCONT).expect("SIGCONT");
    c.wait_for(
        "the thawed peer to rejoin",
        Duration::from_secs(20),
        |_, id, r| (id == victim && matches!(r, Record::Joined { session: 2, .. })).then_some(()),
    );
    let back = c.wait_for(
        "the thawed peer to step again",
        Duration::from_secs(20),
        |_, id, r| match r {
            Record::Step(s) if id == victim => Some(s.clone()),
            _ => None,
        },
    );
    println!(
        "thawed peer rejoined and stepped at step {} with world {} (fetched {} B)",
        back.step, back.world, back.sync_rx
    );
    c.wait_steps(
        &ids,
        c.step_count(survivors[0]) + 2,
        Duration::from_secs(20),
    );
    // Then kill it: the survivors go on again.
    c.procs.kill(victim).expect("SIGKILL");
    let before = c.step_count(survivors[0]);
    c.wait_steps(&survivors, before + 3, Duration::from_secs(20));
    for (a, b) in [(0, 1), (0, 2), (1, 2)] {
        c.assert_same_hashes(ids[a], ids[b]);
    }
}

#[test]
fn late_joiner_gets_identical_state() {
    let _g = serial();
    let mut c = Cluster::new(5_000);
    let args = [
        "--elems",
        "262144",
        "--state-mib",
        "16",
        "--min-world",
        "3",
        "--step-sleep-ms",
        "20",
    ];
    let ids: Vec<usize> = (0..3).map(|_| c.spawn(&args)).collect();
    c.wait_steps(&ids, 4, Duration::from_secs(40));
    let late = c.spawn(&[
        "--elems",
        "262144",
        "--state-mib",
        "16",
        "--step-sleep-ms",
        "20",
    ]);
    let first = c.wait_for(
        "the late joiner's first step",
        Duration::from_secs(30),
        |_, id, r| match r {
            Record::Step(s) if id == late => Some(s.clone()),
            _ => None,
        },
    );
    assert!(
        first.step > 3,
        "the late joiner adopted revision {} instead of the group's",
        first.step
    );
    assert!(
        first.sync_rx >= (16 << 20) - 4 * 4096,
        "the late joiner fetched only {} bytes",
        first.sync_rx
    );
    c.wait_steps(
        &[ids[0], ids[1], ids[2], late],
        c.step_count(ids[0]) + 3,
        Duration::from_secs(30),
    );
    for &o in &ids {
        let theirs = c.steps(o);
        let at = theirs
            .get(&first.step)
            .unwrap_or_else(|| panic!("w{o} did not report step {}", first.step));
        assert_eq!(
            at.state_hash, first.state_hash,
            "the late joiner's first state differs from w{o}'s"
        );
        let n = c.assert_same_hashes(o, late);
        assert!(n >= 3, "only {n} common steps with w{o}");
    }
    println!(
        "late joiner: first step {} (world {}), fetched {} bytes in a {:.1} ms sync; hash {:016x} equals the others'",
        first.step, first.world, first.sync_rx, first.sync_ms, first.state_hash
    );
}

/// Three holders of a 64 MiB shared state whose uploads are capped at
/// 16 MiB/s each (`PCCL_SHARED_STATE_UPLOAD_BPS`), stepping together. A
/// newcomer with pool 3 ([`spawn_newcomer`]) then fetches over three
/// parallel streams, one per holder: the fetch takes ~1.3 s and every holder
/// streams during all of it, so a holder hit once it starts serving
/// (`SERVING` in its log: each served range is logged) is always
/// mid-transfer.
fn spawn_capped_holders(c: &mut Cluster) -> Vec<usize> {
    const LIMIT: &str = "16Mi";
    let args = [
        "--elems",
        "65536",
        "--state-mib",
        "64",
        "--pool",
        "3",
        "--min-world",
        "3",
        "--log",
        "warn,pccl_core::shared_state=debug",
    ];
    let ids: Vec<usize> = (0..3)
        .map(|_| c.spawn_with_env(&args, &[("PCCL_SHARED_STATE_UPLOAD_BPS", LIMIT)]))
        .collect();
    c.wait_steps(&ids, 2, Duration::from_secs(60));
    ids
}

/// The newcomer of [`spawn_capped_holders`]' group, with `extra` options.
fn spawn_newcomer(c: &mut Cluster, extra: &[&str]) -> usize {
    let mut args = vec![
        "--elems",
        "65536",
        "--state-mib",
        "64",
        "--pool",
        "3",
        "--log",
        "info",
    ];
    args.extend_from_slice(extra);
    c.spawn(&args)
}

/// The newcomer's first step (`first`) came with the whole 64 MiB state, and
/// its state equals the surviving holders' at that step and at every later
/// step they share.
fn assert_newcomer_has_the_state(
    c: &mut Cluster,
    first: &StepRec,
    newcomer: usize,
    survivors: [usize; 2],
) {
    assert!(
        first.sync_rx >= (64 << 20) - 4 * 4096,
        "the newcomer's first step fetched only {} bytes",
        first.sync_rx
    );
    c.wait_steps(
        &[survivors[0], survivors[1], newcomer],
        c.step_count(survivors[0]) + 2,
        Duration::from_secs(40),
    );
    for s in survivors {
        let theirs = c.steps(s);
        let at = theirs
            .get(&first.step)
            .unwrap_or_else(|| panic!("w{s} did not report step {}", first.step));
        assert_eq!(
            at.state_hash, first.state_hash,
            "the newcomer's state differs from w{s}'s"
        );
        c.assert_same_hashes(s, newcomer);
    }
    c.assert_same_hashes(survivors[0], survivors[1]);
}

#[test]
fn distributor_killed_mid_transfer() {
    let _g = serial();
    let mut c = Cluster::new(5_000);
    let ids = spawn_capped_holders(&mut c);
    let newcomer = spawn_newcomer(&mut c, &[]);
    let victim = ids[1];
    // The victim has started writing a range to the newcomer; at the capped
    // rate a 4 MiB range takes ~250 ms and its whole share ~1.3 s, so the
    // kill lands mid-transfer.
    c.wait_stderr(victim, SERVING, Duration::from_secs(40));
    c.procs.kill(victim).expect("SIGKILL a holder");
    let killed_at = Instant::now();
    let first = c.wait_for(
        "the newcomer's first step",
        Duration::from_secs(40),
        |_, id, r| match r {
            Record::Step(s) if id == newcomer => Some(s.clone()),
            Record::Rejoin { reason, msg } if id == newcomer => {
                println!("newcomer rejoined ({reason}: {msg})");
                None
            }
            _ => None,
        },
    );
    // The fetch fails over mid-stream ("transfer broke ... trying another
    // source") or, if the victim's stream was between connections, while
    // connecting ("cannot reach shared-state source").
    let source_lines: Vec<&String> = c.stderr[newcomer]
        .iter()
        .filter(|l| {
            l.contains("trying another source") || l.contains("cannot reach shared-state source")
        })
        .collect();
    for l in &source_lines {
        println!("newcomer log: {l}");
    }
    let rejoined = c.records[newcomer]
        .iter()
        .any(|r| matches!(r, Record::Rejoin { .. }));
    println!(
        "newcomer: first step {} world {} fetched {} bytes, sync {:.0} ms, {} ms after the kill; \
         rejoined: {rejoined}",
        first.step,
        first.world,
        first.sync_rx,
        first.sync_ms,
        killed_at.elapsed().as_millis()
    );
    assert!(
        !source_lines.is_empty(),
        "the newcomer never failed over from the killed holder\n{}",
        c.diagnostics()
    );
    assert_newcomer_has_the_state(&mut c, &first, newcomer, [ids[0], ids[2]]);
}

/// A holder frozen with SIGSTOP while a newcomer fetches from it: its
/// sockets stay open and its kernel keeps acknowledging (and answering
/// keepalive probes), but no byte comes. The newcomer's stream from it must
/// hit the fetch's stall deadline (`shared_state_stall_timeout`, 5 s by
/// default) and fail over to another holder, long before the master evicts
/// the frozen peer; the newcomer's sync succeeds with the others' content.
#[test]
fn distributor_frozen_mid_transfer() {
    let _g = serial();
    // The master's peer timeout (15 s) is longer than the bound asserted on
    // the newcomer's sync below (10 s), itself well above the stall deadline
    // (5 s): the sync can only finish in time through the fetch's own
    // deadline, not because the master dropped the frozen holder (which does
    // not end the newcomer's fetch anyway).
    let mut c = Cluster::new(15_000);
    let ids = spawn_capped_holders(&mut c);
    let victim = ids[1];
    let victim_peer = c.records[victim]
        .iter()
        .find_map(|r| match r {
            Record::Joined { peer, .. } => Some(peer.clone()),
            _ => None,
        })
        .expect("the victim printed its peer id");
    // `--trace`: the newcomer's first BEGIN allreduce comes right after its
    // sync returned (its STEP line only after the all-reduce, which waits for
    // the master to evict the frozen holder).
    let newcomer = spawn_newcomer(&mut c, &["--trace"]);
    // As above: stop the victim once it is writing a range to the newcomer.
    c.wait_stderr(victim, SERVING, Duration::from_secs(40));
    c.procs
        .signal(victim, libc::SIGSTOP)
        .expect("SIGSTOP a holder");
    let stopped_at = Instant::now();
    // `Procs`' drop SIGKILLs and reaps every child, stopped ones included,
    // should an assertion below fail.
    let synced = c.wait_for(
        "the newcomer's sync to return",
        Duration::from_secs(30),
        |_, id, r| match r {
            Record::Begin { op, .. } if id == newcomer && op == "allreduce" => {
                Some(stopped_at.elapsed())
            }
            Record::Rejoin { reason, msg } if id == newcomer => {
                panic!("the newcomer's sync failed ({reason}: {msg})");
            }
            _ => None,
        },
    );
    let stall_lines: Vec<String> = c.stderr[newcomer]
        .iter()
        .filter(|l| l.contains("stalled") && l.contains("trying another source"))
        .cloned()
        .collect();
    for l in c.stderr[newcomer]
        .iter()
        .filter(|l| l.contains("trying another source") || l.contains("shared-state source"))
    {
        println!("newcomer log: {l}");
    }
    println!(
        "SIGSTOP -> newcomer's sync returned: {} ms (victim {victim_peer})",
        synced.as_millis()
    );
    assert!(
        stall_lines.iter().any(|l| l.contains(&victim_peer)),
        "the newcomer never gave up on the frozen holder {victim_peer}\n{}",
        c.diagnostics()
    );
    assert!(
        synced < Duration::from_secs(10),
        "the newcomer's sync returned {} ms after the holder froze",
        synced.as_millis()
    );

    // Its state is the group's: compare with the live holders once the
    // frozen one is evicted and the all-reduce goes on without it.
    let first = c.wait_for(
        "the newcomer's first step",
        Duration::from_secs(40),
        |_, id, r| match r {
            Record::Step(s) if id == newcomer => Some(s.clone()),
            Record::Rejoin { reason, msg } if id == newcomer => {
                panic!("the newcomer rejoined ({reason}: {msg})");
            }
            _ => None,
        },
    );
    println!(
        "newcomer: first step {} world {} fetched {} bytes, sync {:.0} ms; {} ms after the stop",
        first.step,
        first.world,
        first.sync_rx,
        first.sync_ms,
        stopped_at.elapsed().as_millis()
    );
    assert_newcomer_has_the_state(&mut c, &first, newcomer, [ids[0], ids[2]]);
    // Thaw the victim only to kill it (it was evicted long ago).
    let _ = c.procs.signal(victim, libc::SIGCONT);
    c.procs.kill(victim).expect("SIGKILL the frozen holder");
}
