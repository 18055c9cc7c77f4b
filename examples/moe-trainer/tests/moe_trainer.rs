//! The MoE trainer end to end, with real processes and sockets: local swarms
//! with a SIGKILL and a restart (sync and async DiLoCo, fresh and stale
//! global counts, fp32 and u8), peers joining an external master, and bad
//! configurations refused before anything starts.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use pccl_stress::swarm::procs::{ProcEvent, Procs, Stream};
use serde_json::Value;

const EXE: &str = env!("CARGO_BIN_EXE_moe-trainer");

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let p = std::env::temp_dir().join(format!("moe-test-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).expect("scratch dir");
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The small model every test uses (an inner step takes tens of ms).
const TINY: &[&str] = &[
    "--d-model=32",
    "--heads=2",
    "--expert-hidden=32",
    "--seq-len=32",
    "--batch=4",
    "--val-seqs=8",
    "--train-tokens=20000",
    "--val-tokens=2000",
    "--sync-every=10",
];

fn run(args: &[&str], out: &Path) -> Output {
    // Flags given by the test replace TINY's (clap refuses a repeated flag).
    let key = |a: &str| a.split('=').next().unwrap_or(a).to_string();
    let tiny = TINY
        .iter()
        .filter(|t| !args.iter().any(|a| key(a) == key(t)));
    Command::new(EXE)
        .args(tiny)
        .args(args)
        .arg(format!("--out={}", out.display()))
        .env_remove("PCCL_LOG")
        .output()
        .expect("running moe-trainer")
}

fn run_json(args: &[&str], tag: &str) -> (Value, String) {
    let dir = Scratch::new(tag);
    let o = run(args, &dir.0);
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "moe-trainer {args:?} failed: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        o.status
    );
    let text = std::fs::read_to_string(dir.0.join("moe-trainer.json")).expect("the JSON report");
    let png = std::fs::read(dir.0.join("moe-trainer.png")).expect("the PNG");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    (serde_json::from_str(&text).expect("valid JSON"), stdout)
}

/// What every churned run must show.
fn check_churned_run(r: &Value, finishers: usize) {
    let name = r["name"].as_str().unwrap_or("?");
    let first = r["first_loss"].as_f64().expect("first loss");
    let last = r["last_loss"].as_f64().expect("last loss");
    assert!(
        last < first - 0.3,
        "{name}: the loss did not decrease: {first} -> {last}"
    );
    // Two founding survivors and the restarted peer finished, all alike.
    let hashes = r["final_hashes"].as_array().expect("hashes");
    assert_eq!(hashes.len(), finishers, "{name}: {hashes:?}");
    let h0 = &hashes[0][1];
    assert!(
        hashes.iter().all(|h| &h[1] == h0),
        "{name}: final states differ: {hashes:?}"
    );
    assert_eq!(
        r["hashes_identical"], true,
        "{name}: {:?}",
        r["outer_disagreed"]
    );
    assert!(r["outer_agreed"].as_u64().unwrap_or(0) >= 4, "{name}");
    assert_eq!(r["killed"], serde_json::json!([1]), "{name}");
    assert_eq!(r["joined"], serde_json::json!([1]), "{name}");
    // The restarted peer received the group's outer state on joining.
    assert_eq!(r["joiner_got_state"], true, "{name}");
    let val = r["outer"]
        .as_array()
        .and_then(|o| o.last())
        .expect("outer steps");
    assert_eq!(val["val"].as_array().map(Vec::len), Some(3), "{name}");
}

#[test]
fn global_balancing_with_a_kill_and_a_restart() {
    let (doc, stdout) = run_json(
        &[
            "--peers=3",
            "--lbl=global",
            "--inner-steps=80",
            "--kill-at=15",
            "--join-at=25",
            "--leave-at=45",
            "--leave-peer=2",
            // Slow enough that the restarted peer is admitted with 50 steps to go.
            "--step-delay-ms=20",
        ],
        "global",
    );
    let r = &doc["runs"][0];
    // Peer 2 left gracefully; peer 0 and the restarted peer 1 finished.
    check_churned_run(r, 2);
    assert_eq!(r["left"], serde_json::json!([2]));
    // Every step's all-reduced expert counts are exactly the sum of the
    // local counts of the peers that took part (checked by the driver).
    let checked = r["counts_checked"].as_u64().unwrap_or(0);
    assert!(checked >= 50, "only {checked} steps had checkable counts");
    assert_eq!(r["counts_mismatches"], serde_json::json!([]));
    assert!(stdout.contains("weights bit-identical across peers") && stdout.contains("yes"));
    assert!(stdout.contains("SIGKILL peer 1"), "{stdout}");
}

#[test]
fn async_u8_with_stale_counts_survives_churn() {
    let (doc, _) = run_json(
        &[
            "--peers=3",
            "--mode=async",
            "--quant=u8",
            "--lbl-sync=stale",
            "--inner-steps=80",
            "--kill-at=15",
            "--join-at=25",
            // Slow enough that the restarted peer is admitted with 50 steps to go.
            "--step-delay-ms=20",
        ],
        "async",
    );
    let r = &doc["runs"][0];
    check_churned_run(r, 3);
    assert_eq!(r["counts_mismatches"], serde_json::json!([]));
    assert!(r["counts_checked"].as_u64().unwrap_or(0) >= 40);
    // Stale mode overlaps every count all-reduce with the backward pass.
    assert_eq!(r["side_hidden"], r["side_total"]);
}

#[test]
fn micro_balancing_compare_mode_reports_both() {
    let (doc, stdout) = run_json(
        &["--peers=2", "--compare", "--no-churn", "--inner-steps=20"],
        "compare",
    );
    let runs = doc["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["lbl"], "global");
    assert_eq!(runs[1]["lbl"], "micro");
    for r in runs {
        assert_eq!(r["hashes_identical"], true);
        assert_eq!(r["final_hashes"].as_array().map(Vec::len), Some(2));
        let mi = r["mutual_information_bits"].as_array().expect("MI");
        assert_eq!(mi.len(), 2);
        assert!(mi
            .iter()
            .all(|m| m.as_f64().is_some_and(|m| (0.0..=1.59).contains(&m))));
    }
    // Micro balancing all-reduces no counts.
    assert_eq!(runs[1]["counts_checked"], 0);
    assert_eq!(runs[1]["side_total"], 0);
    assert!(stdout.contains("global LBL") && stdout.contains("micro LBL"));
}

#[test]
fn peers_join_an_external_master() {
    let mut master = pccl_core::MasterNode::bind(
        "127.0.0.1:0".parse().expect("addr"),
        pccl_core::MasterConfig::default(),
    )
    .expect("master");
    master.run().expect("master runs");
    let addr = master.local_addr().to_string();
    let mut procs = Procs::new();
    for i in 0..2 {
        let mut cmd = Command::new(EXE);
        cmd.args(TINY)
            .args([
                "--json",
                "--master",
                &addr,
                "--bind-ip=127.0.0.1",
                "--min-world=2",
            ])
            .arg(format!("--peer-index={i}"))
            .arg("--inner-steps=20")
            .env_remove("PCCL_LOG");
        procs.spawn(format!("peer{i}"), cmd).expect("spawn");
    }
    let mut done = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    while done.len() < 2 && std::time::Instant::now() < deadline {
        let Some(ev) = procs.next(Duration::from_millis(200)) else {
            continue;
        };
        if let ProcEvent::Line {
            stream: Stream::Stdout,
            line,
            ..
        } = ev
        {
            if let Some(v) = line
                .strip_prefix("MOE ")
                .and_then(|j| serde_json::from_str::<Value>(j).ok())
            {
                assert_ne!(v["ev"], "fatal", "{v}");
                if v["ev"] == "done" {
                    done.push(v);
                }
            }
        }
    }
    assert_eq!(done.len(), 2, "both peers finish");
    assert_eq!(done[0]["hash"], done[1]["hash"]);
    assert_eq!(done[0]["outer_step"], 2);
    for id in 0..2 {
        let s = procs
            .wait_timeout(id, Duration::from_secs(30))
            .expect("exits");
        assert!(s.success(), "peer {id}: {s:?}");
    }
    master.interrupt();
    let _ = master.await_termination();
}

#[test]
fn bad_configurations_fail_before_anything_starts() {
    let dir = Scratch::new("bad");
    for (args, expect) in [
        (
            vec!["--peers=2", "--top-k=9"],
            "must not exceed the number of experts",
        ),
        (
            vec!["--peers=2", "--train-tokens=10"],
            "fewer tokens than the sequence length",
        ),
        (
            vec!["--peers=2", "--inner-steps=55"],
            "multiple of --sync-every",
        ),
        (vec!["--peers=2", "--domain-skew=1.5"], "skew"),
        (vec!["--peers=2", "--heads=3"], "multiple of --heads"),
        // A peer refuses too, before dialing the (unreachable) master.
        (
            vec!["--master=127.0.0.1:9", "--top-k=0"],
            "--top-k must be at least 1",
        ),
    ] {
        let o = run(&args, &dir.0);
        let stderr = String::from_utf8_lossy(&o.stderr);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert!(
            !stdout.contains("peers, balance"),
            "{args:?} started a swarm: {stdout}"
        );
        assert!(
            !stderr.contains("joining the swarm"),
            "{args:?} dialed: {stderr}"
        );
    }
    assert!(!dir.0.join("moe-trainer.json").exists());
}
