//! The `diloco-charlm` example runs as documented: three peers, a late
//! joiner and a SIGKILL, and it exits 0 only when every survivor holds the
//! identical outer state and the validation loss fell.

use std::process::Command;

fn run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_diloco-charlm"))
        .args(args)
        .output()
        .expect("run diloco-charlm");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "diloco-charlm {args:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn async_run_with_churn_ends_with_identical_state() {
    let out = run(&["--mode", "async", "--outer-steps", "10"]);
    assert!(out.contains("a peer joins late"), "{out}");
    assert!(out.contains("SIGKILL peer3"), "{out}");
    assert!(out.contains("finished with identical outer state"), "{out}");
}

#[test]
fn quantized_streaming_run_with_churn_ends_with_identical_state() {
    let out = run(&[
        "--mode",
        "streaming",
        "--quant",
        "minmax",
        "--error-feedback",
        "--outer-steps",
        "10",
    ]);
    assert!(out.contains("finished with identical outer state"), "{out}");
}

#[test]
fn bad_flags_are_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_diloco-charlm"))
        .args(["--mode", "sometimes"])
        .output()
        .expect("run diloco-charlm");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown mode"));
}
