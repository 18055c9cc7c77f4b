//! DiLoCo under churn, with real processes (`diloco-worker`) around an
//! in-process master: in each mode (sync, async, streaming) a peer is
//! SIGKILLed mid-all-reduce, a late joiner arrives, a peer leaves
//! gracefully and (sync) one is frozen with SIGSTOP until it is evicted and
//! then resumed; every peer reports the hash of its outer parameters,
//! momentum and counters after every outer event, and all reports of one
//! event must be equal. Also: bad input gets a clear error and leaves the
//! group's state as it was.
//!
//! Every child is SIGKILLed and reaped when a test ends, panics included
//! (`Procs`' drop); the workers also exit when their stdin pipe closes.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pccl_core::{MasterConfig, MasterNode};
use pccl_stress::swarm::procs::{ProcEvent, Procs, Stream};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// One parsed stdout line of a worker: its kind and `key=value` fields.
#[derive(Debug, Clone)]
struct Line {
    kind: String,
    fields: BTreeMap<String, String>,
}

impl Line {
    fn parse(s: &str) -> Option<Line> {
        let mut it = s.split_whitespace();
        let kind = it.next()?.to_owned();
        if !kind.chars().all(|c| c.is_ascii_uppercase()) {
            return None;
        }
        let mut fields = BTreeMap::new();
        let mut last_key = None;
        for kv in it {
            match kv.split_once('=') {
                Some((k, v)) => {
                    fields.insert(k.to_owned(), v.to_owned());
                    last_key = Some(k.to_owned());
                }
                // msg=... runs to the end of the line.
                None => {
                    if let Some(k) = &last_key {
                        if let Some(v) = fields.get_mut(k) {
                            v.push(' ');
                            v.push_str(kv);
                        }
                    }
                }
            }
        }
        Some(Line { kind, fields })
    }

    fn u64(&self, k: &str) -> u64 {
        self.fields
            .get(k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{} line without numeric {k}: {:?}", self.kind, self.fields))
    }

    fn get(&self, k: &str) -> &str {
        self.fields.get(k).map_or("", String::as_str)
    }
}

struct Swarm {
    master: MasterNode,
    procs: Procs,
    lines: Vec<Vec<Line>>,
    stderr: Vec<Vec<String>>,
}

impl Swarm {
    fn new(peer_timeout_ms: u64) -> Swarm {
        let cfg = MasterConfig {
            peer_timeout_ms,
            ..MasterConfig::default()
        };
        let mut master =
            MasterNode::bind("127.0.0.1:0".parse().expect("address"), cfg).expect("bind master");
        master.run().expect("run master");
        Swarm {
            master,
            procs: Procs::new(),
            lines: Vec::new(),
            stderr: Vec::new(),
        }
    }

    fn spawn(&mut self, args: &[&str]) -> usize {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_diloco-worker"));
        cmd.arg("--master")
            .arg(self.master.local_addr().to_string())
            .arg("--exit-on-stdin-eof")
            .args(args);
        let id = self
            .procs
            .spawn(format!("d{}", self.procs.len()), cmd)
            .expect("spawn diloco-worker");
        self.lines.push(Vec::new());
        self.stderr.push(Vec::new());
        id
    }

    /// Handles one event; returns the worker and its new line, if any.
    fn pump(&mut self, timeout: Duration) -> Option<(usize, Line)> {
        match self.procs.next(timeout)? {
            ProcEvent::Line {
                id,
                stream: Stream::Stdout,
                line,
                ..
            } => {
                let l = Line::parse(&line)?;
                self.lines[id].push(l.clone());
                Some((id, l))
            }
            ProcEvent::Line {
                id,
                stream: Stream::Stderr,
                line,
                ..
            } => {
                self.stderr[id].push(line);
                None
            }
            ProcEvent::Eof { .. } => None,
        }
    }

    fn wait_for(&mut self, what: &str, within: Duration, mut f: impl FnMut(usize, &Line) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out after {:.0} s waiting for {what}\n{}",
                within.as_secs_f64(),
                self.diagnostics()
            );
            if let Some((id, l)) = self.pump(left.min(Duration::from_millis(200))) {
                assert!(
                    l.kind != "FATAL" || what.contains("FATAL"),
                    "d{id} failed: {:?}\n{}",
                    l.fields,
                    self.diagnostics()
                );
                if f(id, &l) {
                    return;
                }
            }
        }
    }

    /// Waits until each of `ids` has reported an applied outer step ≥ `n`.
    fn wait_outer(&mut self, ids: &[usize], n: u64, within: Duration) {
        let reached = |s: &Swarm, id: usize| {
            s.lines[id]
                .iter()
                .any(|l| l.kind == "OUTER" && l.u64("outer") >= n)
        };
        let mut done: Vec<bool> = ids.iter().map(|&i| reached(self, i)).collect();
        if done.iter().all(|d| *d) {
            return;
        }
        self.wait_for(&format!("outer step {n} on {ids:?}"), within, |id, l| {
            if l.kind == "OUTER" && l.u64("outer") >= n {
                if let Some(p) = ids.iter().position(|&i| i == id) {
                    done[p] = true;
                }
            }
            done.iter().all(|d| *d)
        });
    }

    /// The highest outer step worker `id` has reported (0: none yet).
    fn last_outer(&self, id: usize) -> u64 {
        self.lines[id]
            .iter()
            .filter(|l| l.kind == "OUTER")
            .map(|l| l.u64("outer"))
            .max()
            .unwrap_or(0)
    }

    /// SIGKILLs `victim` right after it announces a step call that runs an
    /// outer event (its all-reduce).
    fn kill_mid_allreduce(&mut self, victim: usize, sync_every: u64) {
        self.wait_for(
            "the victim's BEGIN of an outer event",
            Duration::from_secs(30),
            |id, l| id == victim && l.kind == "BEGIN" && l.u64("inner") % sync_every == 0,
        );
        self.procs.kill(victim).expect("kill");
    }

    /// Every (outer, inner) event's hash, checked equal across all peers;
    /// returns how many events were reported by ≥ 2 peers.
    fn assert_hashes_agree(&self) -> usize {
        let mut seen: BTreeMap<(u64, u64), (String, usize, usize)> = BTreeMap::new();
        for (id, lines) in self.lines.iter().enumerate() {
            for l in lines {
                if l.kind != "OUTER" && l.kind != "JOINED" {
                    continue;
                }
                let key = (l.u64("outer"), l.u64("inner"));
                let h = l.get("hash").to_owned();
                match seen.get_mut(&key) {
                    None => {
                        seen.insert(key, (h, id, 1));
                    }
                    Some((h0, first, n)) => {
                        assert_eq!(
                            *h0,
                            h,
                            "outer {} inner {}: d{first} and d{id} hold different state\n{}",
                            key.0,
                            key.1,
                            self.diagnostics()
                        );
                        *n += 1;
                    }
                }
            }
        }
        seen.values().filter(|(_, _, n)| *n >= 2).count()
    }

    fn diagnostics(&self) -> String {
        let mut s = String::new();
        for (id, lines) in self.lines.iter().enumerate() {
            s.push_str(&format!("--- d{id} stdout (last 12)\n"));
            for l in lines.iter().rev().take(12).rev() {
                s.push_str(&format!("{} {:?}\n", l.kind, l.fields));
            }
            s.push_str(&format!("--- d{id} stderr (last 8)\n"));
            for l in self.stderr[id].iter().rev().take(8).rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }
}

const H: u64 = 4;

/// The churn scenario of one mode: 4 founders; SIGKILL mid-all-reduce; a
/// late joiner; a graceful leave; with `freeze`, a SIGSTOP long enough to be
/// evicted, then SIGCONT (the peer joins again). Survivors and the joiner
/// must keep training and report identical state at every event.
fn churn(mode_args: &[&str], freeze: bool) {
    let _g = serial();
    let mut s = Swarm::new(1500);
    let h = H.to_string();
    let mut base: Vec<&str> = vec![
        "--sync-every",
        &h,
        "--tensors",
        "4",
        "--elems",
        "60000",
        "--inner-sleep-ms",
        "4",
    ];
    base.extend_from_slice(mode_args);
    let founders: Vec<usize> = (0..4)
        .map(|_| {
            let mut a = base.clone();
            a.extend_from_slice(&["--min-world", "4"]);
            s.spawn(&a)
        })
        .collect();
    s.wait_outer(&founders, 3, Duration::from_secs(60));

    // SIGKILL one founder while its outer event (the all-reduce) runs.
    s.kill_mid_allreduce(founders[0], H);
    let survivors = [founders[1], founders[2], founders[3]];
    let after_kill = s.last_outer(founders[1]);
    s.wait_outer(&survivors, after_kill + 3, Duration::from_secs(60));
    let world_after_kill = s.lines[founders[1]]
        .iter()
        .filter(|l| l.kind == "OUTER" && l.u64("outer") > after_kill + 1)
        .map(|l| l.u64("world"))
        .next_back()
        .unwrap_or(0);
    assert_eq!(
        world_after_kill,
        3,
        "survivors carry on with 3\n{}",
        s.diagnostics()
    );

    // A late joiner receives exactly the others' state.
    let joiner = s.spawn(&base);
    s.wait_for("the joiner's JOINED", Duration::from_secs(60), |id, l| {
        id == joiner && l.kind == "JOINED"
    });
    let joined_at = s.lines[joiner][0].u64("outer");
    let mut alive = vec![founders[1], founders[2], founders[3], joiner];
    s.wait_outer(&alive, joined_at + 3, Duration::from_secs(60));

    // A graceful leave.
    s.procs.signal(founders[1], libc::SIGTERM).expect("sigterm");
    s.wait_for("BYE of the leaver", Duration::from_secs(60), |id, l| {
        id == founders[1] && l.kind == "BYE"
    });
    alive.retain(|&i| i != founders[1]);
    let now = s.last_outer(joiner);
    s.wait_outer(&alive, now + 3, Duration::from_secs(60));

    if freeze {
        // Frozen past the master's peer timeout: evicted; resumed, it joins again.
        let frozen = founders[2];
        s.procs.signal(frozen, libc::SIGSTOP).expect("sigstop");
        let others = [founders[3], joiner];
        let now = s.last_outer(joiner);
        s.wait_outer(&others, now + 4, Duration::from_secs(60));
        s.procs.signal(frozen, libc::SIGCONT).expect("sigcont");
        s.wait_for(
            "the frozen peer joins again",
            Duration::from_secs(60),
            |id, l| id == frozen && l.kind == "OUTER" && l.get("rejoined") == "1",
        );
        let now = s.last_outer(frozen);
        s.wait_outer(&alive, now + 3, Duration::from_secs(60));
    }

    let shared = s.assert_hashes_agree();
    eprintln!(
        "{mode_args:?}: {shared} events reported by ≥ 2 peers agree\n{}",
        s.diagnostics()
    );
    assert!(
        shared >= 10,
        "only {shared} events were reported by two or more peers"
    );
    // The joiner's first state is one the others reported at the same event.
    let first = &s.lines[joiner][0];
    let key = (first.u64("outer"), first.u64("inner"));
    let reported_by_others = s.lines.iter().enumerate().any(|(id, ls)| {
        id != joiner
            && ls.iter().any(|l| {
                l.kind == "OUTER"
                    && (l.u64("outer"), l.u64("inner")) == key
                    && l.get("hash") == first.get("hash")
            })
    });
    assert!(
        reported_by_others,
        "the joiner's state at {key:?} matches nobody's\n{}",
        s.diagnostics()
    );
}

#[test]
fn sync_diloco_survives_kill_join_leave_and_freeze() {
    churn(&["--mode", "sync"], true);
}

#[test]
fn async_diloco_survives_kill_join_and_leave() {
    churn(
        &["--mode", "async", "--quant", "minmax", "--error-feedback"],
        false,
    );
}

#[test]
fn streaming_diloco_survives_kill_join_and_leave() {
    churn(
        &[
            "--mode",
            "streaming",
            "--fragments",
            "2",
            "--delay",
            "1",
            "--alpha",
            "0.5",
            "--dtype",
            "bf16",
        ],
        false,
    );
}

/// A worker that must fail: its FATAL line's fields.
fn fatal_of(s: &mut Swarm, id: usize) -> Line {
    let mut out = None;
    s.wait_for("a FATAL line", Duration::from_secs(60), |i, l| {
        if i == id && l.kind == "FATAL" {
            out = Some(l.clone());
            true
        } else {
            false
        }
    });
    let status = s.procs.wait(id).expect("reap");
    assert_eq!(status.code(), Some(1), "exit status of a failed worker");
    out.expect("fatal line")
}

#[test]
fn bad_input_gets_a_clear_error_and_the_group_goes_on() {
    let _g = serial();
    let mut s = Swarm::new(5000);
    // Refused before connecting.
    let h0 = s.spawn(&["--sync-every", "0"]);
    let f = fatal_of(&mut s, h0);
    assert_eq!(f.get("err"), "InvalidArgument");
    assert!(f.get("msg").contains("sync_every"), "{:?}", f.fields);
    let q = s.spawn(&["--quant", "minmax", "--quant-type", "f32"]);
    let f = fatal_of(&mut s, q);
    assert_eq!(f.get("err"), "InvalidArgument");
    assert!(
        f.get("msg").contains("quantized data type"),
        "{:?}",
        f.fields
    );

    let group = [
        s.spawn(&["--min-world", "2", "--inner-sleep-ms", "10"]),
        s.spawn(&["--min-world", "2", "--inner-sleep-ms", "10"]),
    ];
    s.wait_outer(&group, 2, Duration::from_secs(60));
    // A parameter whose shape differs from the group's.
    let bad_shape = s.spawn(&["--shape-offset", "1"]);
    let f = fatal_of(&mut s, bad_shape);
    assert_eq!(f.get("err"), "InvalidArgument");
    assert!(f.get("msg").contains("20001"), "{:?}", f.fields);
    // A different outer learning rate.
    let bad_lr = s.spawn(&["--outer-lr", "0.5"]);
    let f = fatal_of(&mut s, bad_lr);
    assert_eq!(f.get("err"), "InvalidArgument");
    assert!(f.get("msg").contains("outer_lr"), "{:?}", f.fields);

    let now = s.last_outer(group[0]);
    s.wait_outer(&group, now + 3, Duration::from_secs(60));
    let last_world = s.lines[group[0]]
        .iter()
        .rev()
        .find(|l| l.kind == "OUTER")
        .map(|l| l.u64("world"));
    assert_eq!(
        last_world,
        Some(2),
        "the group of two goes on\n{}",
        s.diagnostics()
    );
    assert!(s.assert_hashes_agree() >= 4);
}
