//! The line protocol of `pccl-worker` (and of the swarm demo's peers): one
//! line per event on stdout, a keyword then `key=value` fields separated by
//! single spaces. A `msg=` field, when present, is last and runs to the end
//! of the line (it may contain spaces). Examples:
//!
//! ```text
//! HELLO pid=4242
//! BEGIN step=12 op=allreduce attempt=1          (only with --trace)
//! JOINED peer=1a2b3c4d session=1 world=3 connect_ms=812
//! STEP step=12 rev=12 world=3 local=9 ok=1 retries=0 wait_ms=0 state_hash=0123abcd0123abcd allreduce_exact=1 sync_rx=0 sync_ms=3.1 ar_ms=40.2 bytes=16777216 busbw=0.555
//! STEP ... busbw=0.555 ar_hash=89abcdef01234567 ar_err=1.1764705882352941e-2   (with --quant)
//! STEP ... busbw=0.555 ar_hash=89abcdef01234567 coll=all-gather algo=ring rank=1 mark=4242 marks=4242,4243,4250   (with --collective)
//! RETRY step=12 op=allreduce err=RankConnectionLost wait_ms=310 attempt=1 restored=1
//! SKIP step=13 reason=TooFewPeers
//! REJOIN reason=MasterConnectionFailed msg=the master closed the connection
//! ERR op=update_topology err=UpdateTopologyFailed msg=...
//! BYE steps=40
//! DONE steps=40
//! FATAL msg=connecting to the master: ...
//! ```
//!
//! `step` is the shared-state revision after the step's sync, the same on
//! every peer of the group for the same step; `state_hash` is the hash of the
//! shared state right after that sync. A harness compares them across peers.
//!
//! Writers use the `Display` impls below; readers use [`Record::parse`],
//! whose errors quote the offending line.

use std::fmt;
use std::str::FromStr;

use super::{Error, Result};

/// One completed step of a peer.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRec {
    /// Shared-state revision after this step's sync (the global step number).
    pub step: u64,
    /// Peers that took part in the successful all-reduce.
    pub world: u32,
    /// Steps this process has completed, this one included.
    pub local: u64,
    /// Failed all-reduce attempts of this step before the one that succeeded.
    pub retries: u32,
    /// Total time spent in those failed attempts.
    pub wait_ms: u64,
    /// Hash of the shared state after the sync.
    pub state_hash: u64,
    /// Whether the all-reduce result equalled `world × contribution` exactly.
    pub allreduce_exact: bool,
    /// Bytes the sync received (non-zero only when this peer was out of date).
    pub sync_rx: u64,
    pub sync_ms: f64,
    /// Duration of the successful all-reduce attempt.
    pub ar_ms: f64,
    /// Size of the all-reduced buffer.
    pub bytes: u64,
    /// Bus bandwidth of the successful attempt, GB/s: `2(w-1)/w · bytes / time`.
    pub busbw: f64,
    /// Quantized all-reduce only (`--quant`): hash of the reduced buffer,
    /// which must be equal on every peer of the step.
    pub ar_hash: Option<u64>,
    /// Quantized all-reduce only: largest |result − world × contribution|.
    pub ar_err: Option<f64>,
    /// What the step's collective was and who took part (`--collective`).
    pub coll: Option<CollRec>,
}

/// The collective of a step (`coll=...` and the fields after it): which
/// one, the algorithm the master chose, this peer's rank in the op and the
/// peer marks its result carries. A mark is a small positive integer a
/// worker adds to every element of its contribution, so a result says
/// whose data it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct CollRec {
    /// `all-reduce`, `broadcast`, `all-gather` or `reduce-scatter`.
    pub kind: String,
    /// The algorithm the master chose (`ring` or `direct`).
    pub algo: String,
    /// This peer's rank (ring position) in the successful op.
    pub rank: u32,
    /// This peer's own mark.
    pub mark: u32,
    /// Broadcast only: the root rank.
    pub root: Option<u32>,
    /// Broadcast: the mark of the peer whose bytes every peer received;
    /// all-gather: every rank's mark, in rank order; empty otherwise.
    pub marks: Vec<u32>,
    /// Reduce-scatter only: the sum of the marks of the contributions the
    /// segment holds (equal to the participants' marks' sum when exact).
    pub mark_sum: Option<u64>,
}

impl fmt::Display for CollRec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "coll={} algo={} rank={} mark={}",
            self.kind, self.algo, self.rank, self.mark
        )?;
        if let Some(r) = self.root {
            write!(f, " root={r}")?;
        }
        if !self.marks.is_empty() {
            let m: Vec<String> = self.marks.iter().map(u32::to_string).collect();
            write!(f, " marks={}", m.join(","))?;
        }
        if let Some(m) = self.mark_sum {
            write!(f, " mark_sum={m}")?;
        }
        Ok(())
    }
}

impl fmt::Display for StepRec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "STEP step={} rev={} world={} local={} ok=1 retries={} wait_ms={} state_hash={:016x} \
             allreduce_exact={} sync_rx={} sync_ms={:.1} ar_ms={:.1} bytes={} busbw={:.3}",
            self.step,
            self.step,
            self.world,
            self.local,
            self.retries,
            self.wait_ms,
            self.state_hash,
            u8::from(self.allreduce_exact),
            self.sync_rx,
            self.sync_ms,
            self.ar_ms,
            self.bytes,
            self.busbw
        )?;
        if let Some(h) = self.ar_hash {
            write!(f, " ar_hash={h:016x}")?;
        }
        if let Some(e) = self.ar_err {
            write!(f, " ar_err={e:e}")?;
        }
        if let Some(c) = &self.coll {
            write!(f, " {c}")?;
        }
        Ok(())
    }
}

/// A failed attempt that the worker recovered from by retrying.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryRec {
    pub step: u64,
    /// `allreduce` (sync failures lead to a rejoin instead).
    pub op: String,
    /// Error variant name, e.g. `RankConnectionLost`.
    pub err: String,
    /// Time from the start of the failed attempt until its error returned.
    pub wait_ms: u64,
    /// 1-based number of the failed attempt within the step.
    pub attempt: u32,
    /// Whether the in-place buffer held its input again after the failure.
    pub restored: bool,
}

impl fmt::Display for RetryRec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RETRY step={} op={} err={} wait_ms={} attempt={} restored={}",
            self.step,
            self.op,
            self.err,
            self.wait_ms,
            self.attempt,
            u8::from(self.restored)
        )
    }
}

/// Everything a worker prints on stdout.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Hello {
        pid: u32,
    },
    Joined {
        peer: String,
        session: u32,
        world: u32,
        connect_ms: u64,
    },
    /// An operation is about to start (`--trace` only). For `sync`, `step`
    /// is the revision voted (0 for a peer's first sync).
    Begin {
        step: u64,
        op: String,
        attempt: u32,
    },
    Step(StepRec),
    Retry(RetryRec),
    /// The step's all-reduce could not run (fewer than two peers left).
    Skip {
        step: u64,
        reason: String,
    },
    /// The communicator was dropped and the worker joins again as a newcomer.
    Rejoin {
        reason: String,
        msg: String,
    },
    /// A collective failed on every peer alike and the loop went on.
    Err {
        op: String,
        err: String,
        msg: String,
    },
    /// Graceful stop on SIGTERM/SIGINT: the communicator was closed.
    Bye {
        steps: u64,
    },
    /// `--steps` completed.
    Done {
        steps: u64,
    },
    /// Unrecoverable error; the worker exits non-zero.
    Fatal {
        msg: String,
    },
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Record::Hello { pid } => write!(f, "HELLO pid={pid}"),
            Record::Joined {
                peer,
                session,
                world,
                connect_ms,
            } => write!(
                f,
                "JOINED peer={peer} session={session} world={world} connect_ms={connect_ms}"
            ),
            Record::Begin { step, op, attempt } => {
                write!(f, "BEGIN step={step} op={op} attempt={attempt}")
            }
            Record::Step(s) => s.fmt(f),
            Record::Retry(r) => r.fmt(f),
            Record::Skip { step, reason } => write!(f, "SKIP step={step} reason={reason}"),
            Record::Rejoin { reason, msg } => {
                write!(f, "REJOIN reason={reason} msg={}", one_line(msg))
            }
            Record::Err { op, err, msg } => {
                write!(f, "ERR op={op} err={err} msg={}", one_line(msg))
            }
            Record::Bye { steps } => write!(f, "BYE steps={steps}"),
            Record::Done { steps } => write!(f, "DONE steps={steps}"),
            Record::Fatal { msg } => write!(f, "FATAL msg={}", one_line(msg)),
        }
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// A parsed line: keyword and fields, with typed getters whose errors name
/// the field and quote the line.
struct Fields<'a> {
    line: &'a str,
    kind: &'a str,
    fields: Vec<(&'a str, &'a str)>,
}

impl<'a> Fields<'a> {
    fn split(line: &'a str) -> Result<Self> {
        let line = line.trim_end();
        let (kind, mut rest) = match line.split_once(' ') {
            Some((k, r)) => (k, r),
            None => (line, ""),
        };
        let mut fields = Vec::new();
        while !rest.is_empty() {
            if let Some(msg) = rest.strip_prefix("msg=") {
                fields.push(("msg", msg));
                break;
            }
            let (tok, next) = match rest.split_once(' ') {
                Some((t, n)) => (t, n),
                None => (rest, ""),
            };
            let (k, v) = tok
                .split_once('=')
                .ok_or_else(|| Error(format!("field '{tok}' lacks '=' in line '{line}'")))?;
            fields.push((k, v));
            rest = next;
        }
        Ok(Fields { line, kind, fields })
    }

    fn str(&self, key: &str) -> Result<&'a str> {
        self.fields
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .ok_or_else(|| Error(format!("field '{key}' missing in line '{}'", self.line)))
    }

    fn has(&self, key: &str) -> bool {
        self.fields.iter().any(|(k, _)| *k == key)
    }

    fn num<T: FromStr>(&self, key: &str) -> Result<T>
    where
        T::Err: fmt::Display,
    {
        let v = self.str(key)?;
        v.parse().map_err(|e| {
            Error(format!(
                "field '{key}={v}' is not a number ({e}) in line '{}'",
                self.line
            ))
        })
    }

    fn flag(&self, key: &str) -> Result<bool> {
        match self.str(key)? {
            "1" => Ok(true),
            "0" => Ok(false),
            v => Err(Error(format!(
                "field '{key}={v}' is not 0 or 1 in line '{}'",
                self.line
            ))),
        }
    }

    fn hex(&self, key: &str) -> Result<u64> {
        let v = self.str(key)?;
        u64::from_str_radix(v, 16).map_err(|e| {
            Error(format!(
                "field '{key}={v}' is not hexadecimal ({e}) in line '{}'",
                self.line
            ))
        })
    }
}

impl Fields<'_> {
    fn coll(&self) -> Result<CollRec> {
        let marks = if self.has("marks") {
            self.str("marks")?
                .split(',')
                .map(|m| {
                    m.parse().map_err(|e| {
                        Error(format!(
                            "mark '{m}' is not a number ({e}) in line '{}'",
                            self.line
                        ))
                    })
                })
                .collect::<Result<Vec<u32>>>()?
        } else {
            Vec::new()
        };
        Ok(CollRec {
            kind: self.str("coll")?.to_owned(),
            algo: self.str("algo")?.to_owned(),
            rank: self.num("rank")?,
            mark: self.num("mark")?,
            root: self.has("root").then(|| self.num("root")).transpose()?,
            marks,
            mark_sum: self
                .has("mark_sum")
                .then(|| self.num("mark_sum"))
                .transpose()?,
        })
    }
}

impl Record {
    /// Parses one stdout line of a worker. `Ok(None)` for lines that are not
    /// part of the protocol (a harness may log them); `Err` for a protocol
    /// line with missing or malformed fields.
    pub fn parse(line: &str) -> Result<Option<Record>> {
        const KINDS: [&str; 11] = [
            "HELLO", "JOINED", "BEGIN", "STEP", "RETRY", "SKIP", "REJOIN", "ERR", "BYE", "DONE",
            "FATAL",
        ];
        let kind = line.split(' ').next().unwrap_or("");
        if !KINDS.contains(&kind) {
            return Ok(None);
        }
        let f = Fields::split(line)?;
        let rec = match f.kind {
            "HELLO" => Record::Hello { pid: f.num("pid")? },
            "JOINED" => Record::Joined {
                peer: f.str("peer")?.to_owned(),
                session: f.num("session")?,
                world: f.num("world")?,
                connect_ms: f.num("connect_ms")?,
            },
            "BEGIN" => Record::Begin {
                step: f.num("step")?,
                op: f.str("op")?.to_owned(),
                attempt: f.num("attempt")?,
            },
            "STEP" => Record::Step(StepRec {
                step: f.num("step")?,
                world: f.num("world")?,
                local: f.num("local")?,
                retries: f.num("retries")?,
                wait_ms: f.num("wait_ms")?,
                state_hash: f.hex("state_hash")?,
                allreduce_exact: f.flag("allreduce_exact")?,
                sync_rx: f.num("sync_rx")?,
                sync_ms: f.num("sync_ms")?,
                ar_ms: f.num("ar_ms")?,
                bytes: f.num("bytes")?,
                busbw: f.num("busbw")?,
                ar_hash: f.has("ar_hash").then(|| f.hex("ar_hash")).transpose()?,
                ar_err: f.has("ar_err").then(|| f.num("ar_err")).transpose()?,
                coll: f.has("coll").then(|| f.coll()).transpose()?,
            }),
            "RETRY" => Record::Retry(RetryRec {
                step: f.num("step")?,
                op: f.str("op")?.to_owned(),
                err: f.str("err")?.to_owned(),
                wait_ms: f.num("wait_ms")?,
                attempt: f.num("attempt")?,
                restored: f.flag("restored")?,
            }),
            "SKIP" => Record::Skip {
                step: f.num("step")?,
                reason: f.str("reason")?.to_owned(),
            },
            "REJOIN" => Record::Rejoin {
                reason: f.str("reason")?.to_owned(),
                msg: f.str("msg").unwrap_or("").to_owned(),
            },
            "ERR" => Record::Err {
                op: f.str("op")?.to_owned(),
                err: f.str("err")?.to_owned(),
                msg: f.str("msg").unwrap_or("").to_owned(),
            },
            "BYE" => Record::Bye {
                steps: f.num("steps")?,
            },
            "DONE" => Record::Done {
                steps: f.num("steps")?,
            },
            "FATAL" => Record::Fatal {
                msg: f.str("msg").unwrap_or("").to_owned(),
            },
            _ => return Ok(None),
        };
        Ok(Some(rec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(r: Record) {
        let line = r.to_string();
        let back = Record::parse(&line).unwrap().unwrap();
        assert_eq!(back, r, "line: {line}");
    }

    #[test]
    fn every_record_round_trips() {
        round_trip(Record::Hello { pid: 7 });
        round_trip(Record::Begin {
            step: 3,
            op: "allreduce".into(),
            attempt: 2,
        });
        round_trip(Record::Joined {
            peer: "1a2b3c4d".into(),
            session: 2,
            world: 3,
            connect_ms: 55,
        });
        round_trip(Record::Step(StepRec {
            step: 12,
            world: 3,
            local: 9,
            retries: 1,
            wait_ms: 310,
            state_hash: 0x0123_abcd_0123_abcd,
            allreduce_exact: true,
            sync_rx: 0,
            sync_ms: 3.5,
            ar_ms: 40.5,
            bytes: 16 << 20,
            busbw: 0.5,
            ar_hash: None,
            ar_err: None,
            coll: None,
        }));
        round_trip(Record::Step(StepRec {
            step: 13,
            world: 2,
            local: 10,
            retries: 0,
            wait_ms: 0,
            state_hash: 7,
            allreduce_exact: false,
            sync_rx: 0,
            sync_ms: 1.5,
            ar_ms: 2.5,
            bytes: 1 << 20,
            busbw: 0.25,
            ar_hash: Some(0xfedc_ba98_7654_3210),
            ar_err: Some(0.011764705882352941),
            coll: None,
        }));
        for coll in [
            CollRec {
                kind: "broadcast".into(),
                algo: "ring".into(),
                rank: 2,
                mark: 77,
                root: Some(1),
                marks: vec![78],
                mark_sum: None,
            },
            CollRec {
                kind: "all-gather".into(),
                algo: "ring".into(),
                rank: 0,
                mark: 5,
                root: None,
                marks: vec![5, 9, 12],
                mark_sum: None,
            },
            CollRec {
                kind: "reduce-scatter".into(),
                algo: "ring".into(),
                rank: 1,
                mark: 5,
                root: None,
                marks: vec![],
                mark_sum: Some(26),
            },
        ] {
            round_trip(Record::Step(StepRec {
                step: 14,
                world: 3,
                local: 11,
                retries: 1,
                wait_ms: 20,
                state_hash: 8,
                allreduce_exact: true,
                sync_rx: 0,
                sync_ms: 1.5,
                ar_ms: 2.5,
                bytes: 1 << 20,
                busbw: 0.25,
                ar_hash: Some(3),
                ar_err: None,
                coll: Some(coll),
            }));
        }
        round_trip(Record::Retry(RetryRec {
            step: 12,
            op: "allreduce".into(),
            err: "RankConnectionLost".into(),
            wait_ms: 310,
            attempt: 1,
            restored: true,
        }));
        round_trip(Record::Skip {
            step: 3,
            reason: "TooFewPeers".into(),
        });
        round_trip(Record::Rejoin {
            reason: "MasterConnectionFailed".into(),
            msg: "the master closed the connection".into(),
        });
        round_trip(Record::Err {
            op: "update_topology".into(),
            err: "UpdateTopologyFailed".into(),
            msg: "a b c".into(),
        });
        round_trip(Record::Bye { steps: 4 });
        round_trip(Record::Done { steps: 4 });
        round_trip(Record::Fatal {
            msg: "x = y".into(),
        });
    }

    #[test]
    fn malformed_lines_are_errors_not_panics() {
        assert!(Record::parse("STEP step=x").is_err());
        assert!(Record::parse("STEP step=1").is_err());
        assert!(Record::parse("HELLO pid").is_err());
        assert_eq!(Record::parse("something else").unwrap(), None);
        assert_eq!(Record::parse("").unwrap(), None);
    }
}
