//! What a newcomer sees at the default log level (no `PCCL_LOG`, no
//! `RUST_LOG`): `connect()` waiting for admission says what it waits for,
//! then repeats every `progress_interval`, then says when it was admitted.
//!
//! The newcomer is a child process (this test binary re-run with
//! `PCCL_NEWCOMER_MASTER` set) whose stderr the test reads, so the check
//! covers the real default filter of `pccl_core::logging::init(None)`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use pccl_core::Communicator;

const CHILD_ENV: &str = "PCCL_NEWCOMER_MASTER";
const TEST_NAME: &str = "admission_wait_is_visible_at_the_default_log_level";

/// The child: a newcomer with the default log setup and the default
/// progress interval, connecting to the master named in the environment.
fn newcomer(master: &str) {
    pccl_core::logging::init(None);
    let mut cfg = config(master.parse().expect("master address"));
    cfg.connect_timeout = Duration::from_secs(30);
    let c = Communicator::new(cfg).expect("new communicator");
    c.connect().expect("connect");
    eprintln!("NEWCOMER_CONNECTED");
}

#[test]
fn admission_wait_is_visible_at_the_default_log_level() {
    if let Ok(master) = std::env::var(CHILD_ENV) {
        newcomer(&master);
        return;
    }
    let m = master();
    let peers = connect_peers(m.local_addr(), 1, |_| 0);
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, m.local_addr().to_string())
        .env_remove("PCCL_LOG")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the newcomer");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut wait_for = |what: &str, within: Duration| -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => {
                    seen.push(l.clone());
                    if l.contains(what) {
                        return l;
                    }
                }
                Err(_) => {
                    panic!("no line with '{what}' within {within:?}; stderr so far: {seen:#?}")
                }
            }
        }
    };
    // One line saying what it waits for...
    let first = wait_for("waiting for admission", Duration::from_secs(20));
    assert!(first.contains("update_topology"), "{first}");
    assert!(first.contains(&m.local_addr().to_string()), "{first}");
    // ...then a line every few seconds (default interval 3 s)...
    let t0 = Instant::now();
    let again = wait_for("still waiting for admission", Duration::from_secs(10));
    assert!(t0.elapsed() >= Duration::from_secs(1), "{again}");
    // ...and, once the swarm admits it, a line saying so.
    let deadline = Instant::now() + Duration::from_secs(20);
    while peers[0].world().expect("world").global_world < 2 {
        assert!(Instant::now() < deadline, "admission timed out");
        if peers[0].are_peers_pending().expect("pending") {
            peers[0].update_topology().expect("update_topology");
        } else {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let admitted = wait_for("admitted after", Duration::from_secs(20));
    assert!(admitted.contains("world 2"), "{admitted}");
    wait_for("NEWCOMER_CONNECTED", Duration::from_secs(20));
    let status = child.wait().expect("wait for the newcomer");
    assert!(status.success(), "newcomer failed: {seen:#?}");
    reader.join().expect("reader");
    // Nothing but these progress lines at the default level (no info noise).
    let info_noise: Vec<_> = seen
        .iter()
        .filter(|l| l.contains(" INFO ") && !l.contains("admission") && !l.contains("admitted"))
        .collect();
    assert!(info_noise.is_empty(), "{info_noise:#?}");
}
