//! Liveness under oversubscription (issue #19: a busy peer is not a dead
//! peer). Real processes: an in-process master, three `pccl-worker`s that
//! each run 2 × cores busy threads of compute beside their loop (shared-state
//! sync + in-place multi-tensor all-reduce via
//! `all_reduce_multiple_with_retry`, every result checked exactly), and a
//! `cpu-hog` process with one busy thread per core on top. The machine is
//! oversubscribed ~(3 × 2 + 1) times over.
//!
//! Asserted: the busy peers are never evicted and never lose the master;
//! every all-reduce completes and is exact; the peers agree on the shared
//! state; a peer frozen with SIGSTOP in the same run is evicted within
//! timeout + one heartbeat interval + the master's own (discounted)
//! lateness + 500 ms, and not before timeout − one heartbeat interval
//! (− 100 ms of tick resolution). The
//! heartbeat gaps the master saw are printed (`--nocapture`).
//!
//! Short form (the test command, ~30 s, ~1.7 GB of memory in all): 256 MiB
//! per step (4 in-place tensors of 64 MiB), 2 steps before the freeze, 2
//! after; the heartbeat gaps must stay under 1.5 intervals. Long form
//! (documented in
//! `docs/reliability.md`): e.g.
//! `PCCL_LIVENESS_ELEMS=134217728 PCCL_LIVENESS_TENSORS=8 PCCL_LIVENESS_STEPS=4 PCCL_LIVENESS_WAIT_S=600
//! cargo test --release -p pccl-stress --test liveness -- --nocapture`
//! (512 MiB per step). `PCCL_LIVENESS_MIN_S=600` keeps the steps before
//! the freeze going for 10 minutes (the long form), checking for
//! evictions after every step.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{serial, Cluster};
use pccl_core::MasterConfig;
use pccl_stress::hog::{cores, CpuHog};
use pccl_stress::swarm::lines::Record;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

#[test]
fn busy_peers_are_not_evicted_and_a_frozen_one_is() {
    let _g = serial();
    let timeout_ms = 3_000u64;
    let hb_ms = MasterConfig {
        peer_timeout_ms: timeout_ms,
        ..MasterConfig::default()
    }
    .heartbeat_interval_ms() as u64;
    let n_cores = cores();
    let elems = env_or("PCCL_LIVENESS_ELEMS", 64 << 20);
    let tensors = env_or("PCCL_LIVENESS_TENSORS", 4);
    let steps_before = env_or("PCCL_LIVENESS_STEPS", 2);
    let steps_after = env_or("PCCL_LIVENESS_STEPS_AFTER", 2);
    // Deadline of each phase (the long form's steps take ~10 s each on 2 cores).
    let wait = Duration::from_secs(env_or("PCCL_LIVENESS_WAIT_S", 120) as u64);
    // The long form's duration: steps go on under load (before the freeze)
    // until this much time has passed (0: just `steps_before`).
    let min_run = Duration::from_secs(env_or("PCCL_LIVENESS_MIN_S", 0) as u64);
    let busy = 2 * n_cores;
    let t0 = Instant::now();

    let mut c = Cluster::new(timeout_ms);
    let _hog =
        CpuHog::spawn(Path::new(env!("CARGO_BIN_EXE_cpu-hog")), n_cores).expect("spawn cpu-hog");
    let (e, t, b) = (elems.to_string(), tensors.to_string(), busy.to_string());
    let args = [
        "--elems",
        e.as_str(),
        "--tensors",
        t.as_str(),
        "--busy-threads",
        b.as_str(),
        "--pool",
        "4",
        "--state-mib",
        "16",
        "--min-world",
        "3",
        "--trace",
    ];
    let ids: Vec<usize> = (0..3).map(|_| c.spawn(&args)).collect();
    println!(
        "{} cores; per peer {busy} busy threads, {} MiB in {tensors} in-place tensors per step; \
         cpu-hog with {n_cores} threads; peer timeout {timeout_ms} ms, heartbeat {hb_ms} ms",
        n_cores,
        (elems * 4) >> 20
    );
    c.wait_steps(&ids, steps_before, wait);
    let mut steps_before = steps_before;
    while t0.elapsed() < min_run {
        steps_before += 1;
        c.wait_steps(&ids, steps_before, wait);
        let l = c.master.liveness();
        assert!(
            l.evictions.is_empty(),
            "busy peers were evicted after {:.0} s: {:?}\nmaster: {}\n{}",
            t0.elapsed().as_secs_f64(),
            l.evictions,
            l.summary(),
            c.diagnostics()
        );
    }
    println!(
        "{steps_before} steps under load after {:.1} s (load average {})",
        t0.elapsed().as_secs_f64(),
        loadavg()
    );
    let before = c.master.liveness();
    assert!(
        before.evictions.is_empty(),
        "busy peers were evicted: {:?}\nmaster: {}\n{}",
        before.evictions,
        before.summary(),
        c.diagnostics()
    );

    // Freeze one peer inside a ring transfer.
    let victim = ids[2];
    let survivors = [ids[0], ids[1]];
    let victim_peer = c.records[victim]
        .iter()
        .find_map(|r| match r {
            Record::Joined { peer, .. } => Some(peer.clone()),
            _ => None,
        })
        .expect("the victim joined");
    let typical_ms = c
        .steps(victim)
        .values()
        .map(|s| s.ar_ms)
        .fold(f64::INFINITY, f64::min);
    c.wait_all_begin(&ids, "allreduce");
    std::thread::sleep(Duration::from_secs_f64((typical_ms / 4.0).max(5.0) / 1e3));
    let discounted_before = c.master.liveness().discounted_ms;
    c.procs
        .signal(victim, libc::SIGSTOP)
        .expect("SIGSTOP the victim");
    let stopped_at = Instant::now();
    let deadline = stopped_at + Duration::from_millis(4 * timeout_ms);
    let evicted_after = loop {
        c.pump(Duration::from_millis(20));
        let l = c.master.liveness();
        if l.evictions
            .iter()
            .any(|e| e.peer.to_string() == victim_peer)
        {
            break stopped_at.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the frozen peer was not evicted within {} ms\n{}",
            4 * timeout_ms,
            c.diagnostics()
        );
    };
    let master_late = c.master.liveness().discounted_ms - discounted_before;
    let bound = timeout_ms + hb_ms + master_late + 500;
    println!(
        "SIGSTOP -> evicted after {} ms (timeout {timeout_ms} ms, bound {bound} ms: timeout + \
         heartbeat {hb_ms} ms + master lateness {master_late} ms + 500 ms)",
        evicted_after.as_millis()
    );
    assert!(
        evicted_after <= Duration::from_millis(bound),
        "the frozen peer was evicted only after {} ms (bound {bound} ms)",
        evicted_after.as_millis()
    );
    assert!(
        // Its last heartbeat came up to one interval before the freeze, and
        // the master stamps it at its previous tick (50 ms).
        evicted_after >= Duration::from_millis(timeout_ms - hb_ms - 100),
        "the frozen peer was evicted after {} ms, before its timeout could pass",
        evicted_after.as_millis()
    );

    // The survivors go on with two peers, still under load.
    let n = survivors
        .iter()
        .map(|&s| c.step_count(s))
        .max()
        .unwrap_or(0);
    c.wait_steps(&survivors, n + steps_after, wait);
    let _ = c.procs.kill(victim);

    let l = c.master.liveness();
    println!(
        "after {:.1} s (load average {}): {}",
        t0.elapsed().as_secs_f64(),
        loadavg(),
        l.summary()
    );
    let evicted: Vec<String> = l.evictions.iter().map(|e| e.peer.to_string()).collect();
    assert_eq!(
        evicted,
        vec![victim_peer.clone()],
        "only the frozen peer may be evicted\n{}",
        c.diagnostics()
    );
    for &s in &survivors {
        let rejoins: Vec<&Record> = c.records[s]
            .iter()
            .filter(|r| matches!(r, Record::Rejoin { .. }))
            .collect();
        assert!(
            rejoins.is_empty(),
            "w{s} lost the master: {rejoins:?}\n{}",
            c.diagnostics()
        );
        let steps = c.steps(s);
        assert!(steps.values().any(|st| st.world == 2));
        for st in steps.values() {
            assert!(
                st.allreduce_exact,
                "w{s}'s all-reduce at step {} is not exact",
                st.step
            );
        }
    }
    for st in c.steps(victim).values() {
        assert!(
            st.allreduce_exact,
            "the victim's step {} is inexact",
            st.step
        );
    }
    let common = c.assert_same_hashes(survivors[0], survivors[1]);
    assert!(common >= steps_before + steps_after);
    // No heartbeat was late by half an interval or more. Measured: at most
    // 55 ms late; the runtime-task heartbeat this replaced came 510 ms and
    // 1117 ms late in two runs of this short form, and let busy peers be
    // evicted at 512 MiB per step (docs/reliability.md).
    assert!(l.gap_count() > 0, "the master saw no heartbeats");
    assert!(
        l.max_gap_ms() < hb_ms * 3 / 2,
        "a heartbeat came half an interval late or more: {}",
        l.summary()
    );
}

/// A master process of the test's own (`master-proc`), SIGKILLed and reaped
/// when dropped.
struct MasterProc {
    child: std::process::Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    addr: std::net::SocketAddr,
}

impl MasterProc {
    fn start(peer_timeout_ms: u64) -> MasterProc {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_master-proc"))
            .arg("--peer-timeout-ms")
            .arg(peer_timeout_ms.to_string())
            .args(
                std::env::var("PCCL_LIVENESS_MASTER_ARGS")
                    .ok()
                    .iter()
                    .flat_map(|a| a.split_whitespace()),
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn master-proc");
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read LISTEN");
        let addr = line
            .trim()
            .strip_prefix("LISTEN ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("master-proc printed {line:?}"));
        MasterProc {
            child,
            stdout,
            addr,
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) with the pid of our own, not yet reaped child.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({sig}) failed");
    }

    /// Closes its stdin; returns its `LIVENESS` line.
    fn finish(&mut self) -> String {
        use std::io::BufRead;
        drop(self.child.stdin.take());
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read LIVENESS");
        line
    }
}

impl Drop for MasterProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// The master itself is frozen (SIGSTOP) for 2.5 × the peer timeout, in
/// the middle of the peers' work: when it resumes, its first tick is seconds
/// late, and that time is not held against the peers. Nobody is evicted;
/// the peers go on with all three. (`PCCL_LIVENESS_MASTER_ARGS` passes
/// arguments to `master-proc`: `--max-tick-step-ms 100000000` turns the
/// discount off, and then all three are evicted at the resume.)
#[test]
fn a_frozen_master_evicts_nobody() {
    let _g = serial();
    let timeout_ms = 2_000u64;
    let mut master = MasterProc::start(timeout_ms);
    let mut c = Cluster::new(timeout_ms); // its in-process master stays idle
    let args = [
        "--elems",
        "1048576",
        "--tensors",
        "4",
        "--state-mib",
        "4",
        "--min-world",
        "3",
        "--trace",
    ];
    let ids: Vec<usize> = (0..3)
        .map(|_| c.spawn_for(master.addr, &args, &[]))
        .collect();
    c.wait_steps(&ids, 3, Duration::from_secs(60));
    c.wait_all_begin(&ids, "allreduce");
    master.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    // The freeze itself: the fault under test lasts this long on purpose.
    std::thread::sleep(Duration::from_millis(timeout_ms * 5 / 2));
    master.signal(libc::SIGCONT);
    println!(
        "master frozen for {} ms (peer timeout {timeout_ms} ms)",
        frozen.elapsed().as_millis()
    );
    let n = ids.iter().map(|&i| c.step_count(i)).max().unwrap_or(0);
    c.wait_steps(&ids, n + 3, Duration::from_secs(60));
    let line = master.finish();
    println!("{}", line.trim());
    assert_eq!(field(&line, "evictions"), 0, "{line}");
    assert!(field(&line, "late_ticks") >= 1, "{line}");
    assert!(
        field(&line, "max_tick_late_ms") >= timeout_ms * 2,
        "the freeze did not show as a late tick: {line}"
    );
    for &i in &ids {
        assert!(
            !c.records[i]
                .iter()
                .any(|r| matches!(r, Record::Rejoin { .. })),
            "w{i} lost the master\n{}",
            c.diagnostics()
        );
        for st in c.steps(i).values() {
            assert!(st.allreduce_exact && st.world == 3, "w{i}: {st:?}");
        }
    }
}
