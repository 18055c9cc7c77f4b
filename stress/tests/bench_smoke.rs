//! Smoke tests of `pccl-bench`: the launcher with an embedded master and peer
//! processes, the probes, quantized and concurrent runs, broadcast,
//! all-gather and reduce-scatter, the all-reduce algorithm choice, and
//! failing configurations. Small sizes only; each test takes a second or two.

use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::Duration;

/// One at a time: each run spawns several processes on a small machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn bench(args: &[&str]) -> Output {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = Command::new(env!("CARGO_BIN_EXE_pccl-bench"))
        .args(args)
        .args(["--idle-timeout-s", "60", "--join-timeout-s", "30"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn pccl-bench");
    // The launcher's own idle timeout bounds the run; this is a backstop.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn last_line(o: &Output) -> String {
    stdout(o).lines().last().unwrap_or_default().to_string()
}

#[test]
fn two_peers_verify_every_result() {
    let o = bench(&[
        "-n",
        "2",
        "--sizes",
        "4,5000,1M",
        "--iters",
        "3",
        "--warmup",
        "1",
        "--no-probe",
        "--latency-samples",
        "5",
        "--pool-size",
        "1,2",
    ]);
    let last = last_line(&o);
    assert!(
        o.status.success(),
        "{}\n{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(last.starts_with("# pccl-bench: N=2"), "{last}");
    assert!(last.contains("all 6 results verified"), "{last}");
    // One table row per size and pool size, each with zero wrong elements.
    let text = stdout(&o);
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    assert_eq!(rows.len(), 6, "{text}");
    assert!(
        rows.iter()
            .all(|r| r.split_whitespace().nth(12) == Some("0")),
        "{text}"
    );
}

#[test]
fn three_peers_quantized_and_concurrent() {
    let o = bench(&[
        "-n",
        "3",
        "--sizes",
        "4K,300K",
        "--iters",
        "2",
        "--warmup",
        "1",
        "--no-probe",
        "--latency-samples",
        "0",
        "--concurrency",
        "1,3",
        "--quant",
        "zps",
        "--quant-dtype",
        "u8",
        "--op",
        "avg",
    ]);
    let last = last_line(&o);
    assert!(
        o.status.success(),
        "{}\n{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(last.contains("all 4 results verified"), "{last}");
    assert!(stdout(&o).contains("f32>u8"), "{}", stdout(&o));
}

#[test]
fn probes_only() {
    let o = bench(&[
        "-n",
        "2",
        "--probe",
        "--reference",
        "--sizes",
        "1M",
        "--probe-mib",
        "8",
        "--probe-rounds",
        "2",
    ]);
    let text = stdout(&o);
    assert!(
        o.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(text.contains("# ring probe: 2 processes"), "{text}");
    assert!(text.contains("# reference ring all-reduce"), "{text}");
    assert!(last_line(&o).contains("probe per-link"), "{text}");
}

#[test]
fn invalid_options_fail_cleanly() {
    // Prod cannot be quantized: refused before anything starts.
    let o = bench(&["-n", "2", "--quant", "minmax", "--op", "prod", "--no-probe"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("quantization"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The table rows of a run: the lines that start with a size.
fn rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

fn col(row: &[String], i: usize) -> f64 {
    row.get(i)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("column {i} of {row:?}"))
}

#[test]
fn each_collective_verifies_with_its_bus_factor() {
    // N = 3: busbw = algbw · 1 (broadcast) or · 2/3 (all-gather, reduce-scatter).
    for (coll, factor) in [
        ("broadcast", 1.0),
        ("all-gather", 2.0 / 3.0),
        ("reduce-scatter", 2.0 / 3.0),
    ] {
        let o = bench(&[
            "-n",
            "3",
            "--collective",
            coll,
            "--sizes",
            "12,3000,1M",
            "--iters",
            "2",
            "--warmup",
            "1",
            "--no-probe",
            "--latency-samples",
            "0",
        ]);
        let text = stdout(&o);
        assert!(
            o.status.success(),
            "{coll}: {text}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            text.contains(&format!("pccl-bench 0.1.0: {coll}")),
            "{text}"
        );
        assert!(last_line(&o).contains("all 3 results verified"), "{text}");
        let rows = rows(&text);
        assert_eq!(rows.len(), 3, "{text}");
        for r in &rows {
            assert_eq!(r[12], "0", "{coll}: wrong elements in {r:?}");
            // Both printed with 3 decimals.
            let (alg, bus) = (col(r, 8), col(r, 9));
            assert!(
                (bus - alg * factor).abs() <= 0.0015 + 0.0005 * factor,
                "{coll}: busbw {bus} vs algbw {alg} x {factor:.3}"
            );
        }
    }
}

#[test]
fn all_reduce_algorithm_is_passed_to_the_peers() {
    // 3000 B among 3 peers: direct sends the whole buffer, in one 40-byte
    // framed sub-chunk, to each of the 2 others; the ring sends 2(N-1) = 4
    // frames of a third. A list runs one sweep per algorithm, in order.
    let o = bench(&[
        "-n",
        "3",
        "--algorithm",
        "direct,ring",
        "--sizes",
        "3000",
        "--iters",
        "2",
        "--warmup",
        "1",
        "--no-probe",
        "--latency-samples",
        "3",
    ]);
    let text = stdout(&o);
    assert!(
        o.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        text.contains("all-reduce (algorithm direct, ring)"),
        "{text}"
    );
    assert!(text.contains("# algorithm direct, pool size 1"), "{text}");
    assert!(text.contains("# algorithm ring, pool size 1"), "{text}");
    let rows = rows(&text);
    assert_eq!(rows.len(), 2, "{text}");
    let tx: Vec<u64> = rows.iter().map(|r| col(r, 10) as u64).collect();
    assert_eq!(tx[0], 2 * (3000 + 40), "direct: {text}");
    assert!(tx[1] < tx[0], "ring: {text}");
    assert!(last_line(&o).contains("all 2 results verified"), "{text}");
}

#[test]
fn direct_is_refused_for_other_collectives() {
    let o = bench(&[
        "-n",
        "2",
        "--collective",
        "all-gather",
        "--algorithm",
        "direct",
        "--no-probe",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("direct is for all-reduce only"), "{err}");
}

/// `inplace-bench` (in place with and without restore against out of
/// place, issue #18) at a tiny size: every peer verifies every element of
/// every step itself and fails otherwise; the launcher prints one summary
/// per mode.
#[test]
fn inplace_bench_verifies_all_three_modes() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = Command::new(env!("CARGO_BIN_EXE_inplace-bench"))
        .args([
            "--tensors",
            "3",
            "--mib",
            "1",
            "--pool",
            "2",
            "--rounds",
            "3",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn inplace-bench");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while child.try_wait().expect("try_wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().expect("output");
    let out = stdout(&o);
    assert!(
        o.status.success(),
        "inplace-bench failed\n{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for mode in ["in-place", "in-place-norestore", "out-of-place"] {
        // 2 peers x 3 rounds, one step of each mode per round.
        let steps = out
            .lines()
            .filter(|l| l.starts_with("RESULT") && l.contains(&format!("mode={mode} ")))
            .count();
        assert_eq!(steps, 6, "{mode}: {steps} verified steps\n{out}");
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("SUMMARY {mode}:"))),
            "no summary for {mode}\n{out}"
        );
    }
}

/// `scripts/wan-timeline.py` (bench-wan.sh TIMELINE=1) on a hand-made
/// `ss -tin` sample file: goodput, moving / idle / queued connections, and
/// each connection's share of the acked bytes, exactly.
#[test]
fn wan_timeline_reads_ss_samples() {
    let dir = std::env::temp_dir().join(format!("pccl-wan-timeline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let samples = dir.join("ss.txt");
    let sock = |port: u32, dst: &str, sendq: u32, info: &str| {
        format!("0      {sendq}      10.77.0.11:{port} {dst}:48150\n\t cubic mss:1000 {info}\n")
    };
    let mut text = String::new();
    // t = 0: both connections to 10.77.0.12 start; one to another host.
    text += "@ 100.00\n";
    text += &sock(1, "10.77.0.12", 0, "cwnd:10 bytes_acked:1 unacked:0");
    text += &sock(2, "10.77.0.12", 0, "cwnd:10 bytes_acked:1 unacked:0");
    text += &sock(3, "10.77.0.10", 0, "cwnd:99 bytes_acked:1 unacked:0");
    // t = 0.05 s: connection 1 acked 30 000 bytes, 2 is idle.
    text += "@ 100.05\n";
    text += &sock(
        1,
        "10.77.0.12",
        5000,
        "cwnd:20 bytes_acked:30001 unacked:5 notsent:0",
    );
    text += &sock(2, "10.77.0.12", 0, "cwnd:10 bytes_acked:1 unacked:0");
    // t = 0.15 s: connection 2 acked 10 000, 1 has bytes queued, unsent.
    text += "@ 100.15\n";
    text += &sock(
        1,
        "10.77.0.12",
        9000,
        "cwnd:20 bytes_acked:30001 unacked:5 notsent:4000",
    );
    text += &sock(2, "10.77.0.12", 0, "cwnd:10 bytes_acked:10001 unacked:0");
    std::fs::write(&samples, text).expect("write samples");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/wan-timeline.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&samples)
        .args(["--dst", "10.77.0.12", "--bin-ms", "100"])
        .output()
        .expect("python3 must be installed to run the test command");
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Vec<&str>> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim_start().starts_with("t_s"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    // Bin 0 (samples at 0 and 0.05 s): 30 000 bytes in 0.1 s = 2.4 Mbit/s,
    // two connections, on average 0.5 moving and 1.5 idle per sample.
    assert_eq!(rows[0][..5], ["0.00", "2.4", "2", "0.5", "1.5"], "{text}");
    // Bin 1: 10 000 bytes = 0.8 Mbit/s; one moving, one with bytes queued.
    assert_eq!(
        rows[1][..6],
        ["0.10", "0.8", "2", "1.0", "0.0", "1.0"],
        "{text}"
    );
    assert!(text.contains("(% of 0.0 MB): 75 25"), "{text}");
}
