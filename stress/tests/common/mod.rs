//! The process-test harness shared by `faults.rs`, `quant_faults.rs` and
//! `collective_faults.rs`:
//! an in-process master on 127.0.0.1:0, real `pccl-worker` processes, and
//! what they printed. Every child is SIGKILLed and reaped when a test ends,
//! panics included ([`Procs`]'s drop); workers also exit when their stdin (a
//! pipe from the test process) closes. Tests wait for specific lines with
//! deadlines, never for fixed sleeps, and run one at a time per test binary
//! ([`serial`]), so their timings do not disturb each other on small
//! machines.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pccl_core::{MasterConfig, MasterNode};
use pccl_stress::swarm::lines::{Record, RetryRec, StepRec};
use pccl_stress::swarm::procs::{ProcEvent, Procs, Stream};

static SERIAL: Mutex<()> = Mutex::new(());

/// A master plus worker processes and everything they printed.
pub struct Cluster {
    pub master: MasterNode,
    pub procs: Procs,
    /// Per worker: parsed stdout records, in order.
    pub records: Vec<Vec<Record>>,
    /// Per worker: stderr lines.
    pub stderr: Vec<Vec<String>>,
}

impl Cluster {
    pub fn new(peer_timeout_ms: u64) -> Cluster {
        let cfg = MasterConfig {
            peer_timeout_ms,
            ..MasterConfig::default()
        };
        let mut master =
            MasterNode::bind("127.0.0.1:0".parse().expect("address"), cfg).expect("bind master");
        master.run().expect("run master");
        Cluster {
            master,
            procs: Procs::new(),
            records: Vec::new(),
            stderr: Vec::new(),
        }
    }

    /// Starts a worker with `args` (on top of the master address and the
    /// exit-with-the-test flag); returns its index.
    pub fn spawn(&mut self, args: &[&str]) -> usize {
        self.spawn_with_env(args, &[])
    }

    /// Spawns a worker with extra environment variables.
    pub fn spawn_with_env(&mut self, args: &[&str], env: &[(&str, &str)]) -> usize {
        self.spawn_for(self.master.local_addr(), args, env)
    }

    /// Spawns a worker of the master at `master` (e.g. a master process of
    /// the test's own instead of the in-process one).
    pub fn spawn_for(
        &mut self,
        master: std::net::SocketAddr,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> usize {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pccl-worker"));
        cmd.arg("--master")
            .arg(master.to_string())
            .arg("--exit-on-stdin-eof")
            .args(args)
            .envs(env.iter().copied());
        let name = format!("w{}", self.procs.len());
        let id = self.procs.spawn(name, cmd).expect("spawn pccl-worker");
        self.records.push(Vec::new());
        self.stderr.push(Vec::new());
        id
    }

    /// Handles one event if one arrives within `timeout`; returns the worker
    /// and its new record, if the event was a protocol line.
    pub fn pump(&mut self, timeout: Duration) -> Option<(usize, Option<Record>)> {
        let ev = self.procs.next(timeout)?;
        match ev {
            ProcEvent::Line {
                id,
                stream: Stream::Stdout,
                line,
                ..
            } => {
                let rec = Record::parse(&line)
                    .unwrap_or_else(|e| panic!("w{id} printed a malformed line: {e}"));
                if let Some(r) = &rec {
                    if let Record::Fatal { msg } = r {
                        panic!("w{id} failed: {msg}\n{}", self.diagnostics());
                    }
                    self.records[id].push(r.clone());
                }
                Some((id, rec))
            }
            ProcEvent::Line {
                id,
                stream: Stream::Stderr,
                line,
                ..
            } => {
                self.stderr[id].push(line);
                Some((id, None))
            }
            ProcEvent::Eof { id, .. } => Some((id, None)),
        }
    }

    /// Pumps events until `f` returns `Some`, or panics after `within`.
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        within: Duration,
        mut f: impl FnMut(&Cluster, usize, &Record) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "timed out after {:.1} s waiting for {what}\n{}",
                    within.as_secs_f64(),
                    self.diagnostics()
                );
            }
            if let Some((id, Some(rec))) = self.pump(left.min(Duration::from_millis(200))) {
                if let Some(v) = f(self, id, &rec) {
                    return v;
                }
            }
        }
    }

    /// Waits until worker `id` prints a stderr line containing `needle`.
    pub fn wait_stderr(&mut self, id: usize, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        let mut seen = self.stderr[id].len();
        if self.stderr[id].iter().any(|l| l.contains(needle)) {
            return;
        }
        while Instant::now() < deadline {
            self.pump(Duration::from_millis(50));
            if self.stderr[id][seen..].iter().any(|l| l.contains(needle)) {
                return;
            }
            seen = self.stderr[id].len();
        }
        panic!(
            "timed out waiting for '{needle}' on w{id}'s stderr\n{}",
            self.diagnostics()
        );
    }

    pub fn steps(&self, id: usize) -> BTreeMap<u64, StepRec> {
        self.records[id]
            .iter()
            .filter_map(|r| match r {
                Record::Step(s) => Some((s.step, s.clone())),
                _ => None,
            })
            .collect()
    }

    pub fn step_count(&self, id: usize) -> usize {
        self.records[id]
            .iter()
            .filter(|r| matches!(r, Record::Step(_)))
            .count()
    }

    pub fn retries(&self, id: usize) -> Vec<RetryRec> {
        self.records[id]
            .iter()
            .filter_map(|r| match r {
                Record::Retry(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    /// Waits until each worker in `ids` has printed at least `n` STEP lines.
    pub fn wait_steps(&mut self, ids: &[usize], n: usize, within: Duration) {
        let ids = ids.to_vec();
        if ids.iter().all(|&i| self.step_count(i) >= n) {
            return;
        }
        self.wait_for(&format!("{n} steps on {ids:?}"), within, |c, _, _| {
            ids.iter().all(|&i| c.step_count(i) >= n).then_some(())
        });
    }

    /// Waits until every worker in `ids` has begun `op` of the same step
    /// (`--trace` lines): the master then commences the operation at once,
    /// so a fault injected a little later lands inside its ring transfer.
    pub fn wait_all_begin(&mut self, ids: &[usize], op: &str) -> u64 {
        let mut begun: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        let ids = ids.to_vec();
        self.wait_for(
            &format!("every worker to begin a {op}"),
            Duration::from_secs(20),
            |_, id, r| match r {
                Record::Begin { step, op: o, .. } if o == op && ids.contains(&id) => {
                    let who = begun.entry(*step).or_default();
                    if !who.contains(&id) {
                        who.push(id);
                    }
                    (who.len() == ids.len()).then_some(*step)
                }
                _ => None,
            },
        )
    }

    /// SIGKILLs `victim` in the middle of the next ring transfer of `ids`
    /// (`--trace` workers that have stepped): once every one has begun the
    /// all-reduce, it waits half of the victim's shortest all-reduce so far.
    /// Returns the aim and the moment of the kill.
    pub fn kill_mid_allreduce(&mut self, ids: &[usize], victim: usize) -> (Duration, Instant) {
        self.kill_mid_op_at(ids, victim, "allreduce", 0.5)
    }

    /// [`kill_mid_allreduce`](Self::kill_mid_allreduce) aimed at `fraction`
    /// of the victim's shortest all-reduce so far.
    pub fn kill_mid_allreduce_at(
        &mut self,
        ids: &[usize],
        victim: usize,
        fraction: f64,
    ) -> (Duration, Instant) {
        self.kill_mid_op_at(ids, victim, "allreduce", fraction)
    }

    /// [`kill_mid_allreduce`](Self::kill_mid_allreduce) for the collective
    /// whose BEGIN lines say `op=op` (`allreduce`, `broadcast`, `allgather`,
    /// `reducescatter`), aimed at a third of the victim's shortest op so far:
    /// the op cannot have commenced later than the last BEGIN line, so an
    /// early aim leaves the most room for this process being scheduled late
    /// on a loaded machine.
    pub fn kill_mid_op(&mut self, ids: &[usize], victim: usize, op: &str) -> (Duration, Instant) {
        self.kill_mid_op_at(ids, victim, op, 1.0 / 3.0)
    }

    fn kill_mid_op_at(
        &mut self,
        ids: &[usize],
        victim: usize,
        op: &str,
        fraction: f64,
    ) -> (Duration, Instant) {
        let typical_ms = self
            .steps(victim)
            .values()
            .map(|s| s.ar_ms)
            .fold(f64::INFINITY, f64::min);
        let aim = Duration::from_secs_f64((typical_ms * fraction).max(5.0) / 1e3);
        self.wait_all_begin(ids, op);
        std::thread::sleep(aim);
        let killed_at = Instant::now();
        self.procs.kill(victim).expect("SIGKILL the victim");
        (aim, killed_at)
    }

    /// Waits until every survivor has stepped with `world` peers and returns,
    /// per survivor, its first RETRY and that first step. A survivor that
    /// stepped on without a RETRY means the kill (aimed `aim` into the
    /// all-reduce) missed it: that fails the test.
    pub fn wait_recovered(
        &mut self,
        survivors: &[usize],
        world: u32,
        aim: Duration,
    ) -> BTreeMap<usize, (RetryRec, StepRec)> {
        let mut failed: BTreeMap<usize, RetryRec> = BTreeMap::new();
        let mut recovered: BTreeMap<usize, StepRec> = BTreeMap::new();
        self.wait_for(
            &format!("every survivor to step with world {world}"),
            Duration::from_secs(30),
            |_, id, r| {
                match r {
                    Record::Retry(rr) => {
                        failed.entry(id).or_insert(rr.clone());
                    }
                    Record::Step(s) if s.world == world => {
                        recovered.entry(id).or_insert(s.clone());
                    }
                    _ => {}
                }
                survivors
                    .iter()
                    .all(|s| recovered.contains_key(s))
                    .then_some(())
            },
        );
        recovered
            .into_iter()
            .filter(|(s, _)| survivors.contains(s))
            .map(|(s, st)| {
                let r = failed.remove(&s).unwrap_or_else(|| {
                    panic!(
                        "w{s} stepped with world {world} without a RETRY: the kill missed the \
                         all-reduce (aimed {:.0} ms into it)\n{}",
                        aim.as_secs_f64() * 1e3,
                        self.diagnostics()
                    )
                });
                (s, (r, st))
            })
            .collect()
    }

    /// Asserts that `a` and `b` reported equal state hashes at every step
    /// both reported; returns how many steps were compared.
    pub fn assert_same_hashes(&self, a: usize, b: usize) -> usize {
        let (sa, sb) = (self.steps(a), self.steps(b));
        let mut n = 0;
        for (step, ra) in &sa {
            if let Some(rb) = sb.get(step) {
                assert_eq!(
                    ra.state_hash, rb.state_hash,
                    "w{a} and w{b} disagree on the shared state at step {step}"
                );
                n += 1;
            }
        }
        n
    }

    /// Last records and stderr lines of every worker.
    pub fn diagnostics(&self) -> String {
        let mut s = String::new();
        for id in 0..self.records.len() {
            s.push_str(&format!("--- w{id} stdout (last 8):\n"));
            for r in self.records[id].iter().rev().take(8).rev() {
                s.push_str(&format!("  {r}\n"));
            }
            s.push_str(&format!("--- w{id} stderr (last 8):\n"));
            for l in self.stderr[id].iter().rev().take(8).rev() {
                s.push_str(&format!("  {l}\n"));
            }
        }
        s
    }
}

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}
