//! Helpers for the tests that compile C/C++ programs against libpccl and run
//! them as processes (`c_args.rs`, `c_swarm.rs`, `c_hello.rs`):
//!
//! - locating `libpccl.so` / `libpccl.a` next to the test executable (so a
//!   custom `CARGO_TARGET_DIR` works), compiling with gcc/g++ and linking
//!   either library;
//! - [`Procs`]: child processes whose stdout lines can be awaited with a
//!   timeout; every child is killed and reaped when the value is dropped,
//!   also when a test fails (and then all of their output is printed).

#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The crate's directory (for `include/` and `tests/c/`).
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The repository root (for `examples/c/`).
pub fn repo_dir() -> PathBuf {
    crate_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(crate_dir)
}

/// The directory holding `libpccl.so` and `libpccl.a`: `target/<profile>/deps`
/// next to this test executable, or its parent.
pub fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe
        .parent()
        .expect("test binary has a parent directory")
        .to_path_buf();
    let candidates = [
        deps.clone(),
        deps.parent().map(Path::to_path_buf).unwrap_or_default(),
    ];
    candidates
        .iter()
        .find(|d| d.join("libpccl.so").is_file() && d.join("libpccl.a").is_file())
        .cloned()
        .unwrap_or_else(|| panic!("libpccl.so / libpccl.a not found in {candidates:?}"))
}

/// Whether `tool --version` runs; prints a SKIPPED message when it does not.
pub fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        println!("SKIPPED: `{tool}` not found; install it to run this test");
    }
    ok
}

/// A fresh scratch directory for one test.
pub fn scratch_dir(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("pccl-ffi-c")
        .join(format!("{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// Which libpccl a program is linked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Shared,
    Static,
}

/// Native libraries a static link of the Rust library needs (glibc Linux).
const STATIC_NATIVE_LIBS: &[&str] = &[
    "-lpthread",
    "-ldl",
    "-lm",
    "-lrt",
    "-lutil",
    "-lgcc_s",
    "-lc",
];

/// Compiles `sources` (C99 with gcc, or C++17 with g++ when a source ends
/// in `.cpp`) with warnings as errors, links libpccl as `link` says, and
/// returns the executable `dir/name`.
pub fn build(dir: &Path, name: &str, sources: &[PathBuf], link: Link) -> PathBuf {
    let cxx = sources
        .iter()
        .any(|s| s.extension().is_some_and(|e| e == "cpp"));
    let out = dir.join(name);
    let libs = lib_dir();
    let mut cmd = Command::new(if cxx { "g++" } else { "gcc" });
    cmd.arg(if cxx { "-std=c++17" } else { "-std=c99" })
        .args([
            "-pedantic",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-O2",
            "-g",
            "-pthread",
        ])
        .arg("-I")
        .arg(crate_dir().join("include"))
        .arg("-I")
        .arg(crate_dir().join("tests/c"))
        .args(sources)
        .arg("-o")
        .arg(&out);
    match link {
        Link::Shared => {
            cmd.arg(libs.join("libpccl.so"))
                // DT_RPATH (not RUNPATH): wins over the LD_LIBRARY_PATH cargo sets,
                // which may point at an older libpccl.so in target/<profile>.
                .arg("-Wl,--disable-new-dtags")
                .arg(format!("-Wl,-rpath,{}", libs.display()));
        }
        Link::Static => {
            cmd.arg(libs.join("libpccl.a")).args(STATIC_NATIVE_LIBS);
        }
    }
    cmd.arg("-lm");
    let res = cmd
        .output()
        .unwrap_or_else(|e| panic!("running the compiler: {e}"));
    assert!(
        res.status.success(),
        "compiling {name} ({link:?}) failed: {cmd:?}\n{}{}",
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
    if link == Link::Shared {
        assert_needs_libpccl_so(&out);
    }
    out
}

/// Checks that a dynamically linked program records `libpccl.so` (the soname).
fn assert_needs_libpccl_so(exe: &Path) {
    let Ok(out) = Command::new("readelf").arg("-d").arg(exe).output() else {
        return; // binutils missing: exports.rs reports that
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Shared library: [libpccl.so]"),
        "{} does not record NEEDED libpccl.so:\n{text}",
        exe.display()
    );
}

/// The C test sources directory.
pub fn c_source(name: &str) -> PathBuf {
    crate_dir().join("tests/c").join(name)
}

struct Proc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
}

/// Child processes of one test. Dropping it SIGKILLs and reaps every child
/// still running; if the test is failing, all collected output is printed.
pub struct Procs {
    procs: Vec<Proc>,
    log: Arc<Mutex<Vec<String>>>,
    started: Instant,
}

impl Default for Procs {
    fn default() -> Self {
        Self::new()
    }
}

impl Procs {
    pub fn new() -> Self {
        Procs {
            procs: Vec::new(),
            log: Arc::new(Mutex::new(Vec::new())),
            started: Instant::now(),
        }
    }

    fn note(log: &Arc<Mutex<Vec<String>>>, started: Instant, name: &str, line: &str) {
        let t = started.elapsed().as_secs_f64();
        if let Ok(mut l) = log.lock() {
            l.push(format!("[{t:7.3}s {name}] {line}"));
        }
    }

    /// Starts `cmd` (stdin, stdout and stderr piped) as process `name`;
    /// returns its index.
    pub fn spawn(&mut self, name: &str, mut cmd: Command) -> usize {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({cmd:?}): {e}"));
        let (tx, rx) = channel();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let (log, started) = (self.log.clone(), self.started);
        let n = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                Self::note(&log, started, &n, &line);
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (log, started) = (self.log.clone(), self.started);
        let n = format!("{name} stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                Self::note(&log, started, &n, &line);
            }
        });
        let stdin = child.stdin.take();
        self.procs.push(Proc {
            name: name.to_string(),
            child,
            stdin,
            lines: rx,
            seen: Vec::new(),
        });
        self.procs.len() - 1
    }

    pub fn name(&self, i: usize) -> &str {
        &self.procs[i].name
    }

    /// Waits up to `timeout` for a stdout line of process `i` starting with
    /// `prefix` (lines printed earlier count too); returns the first one.
    pub fn wait_line(&mut self, i: usize, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let p = &mut self.procs[i];
        loop {
            if let Some(l) = p.seen.iter().find(|l| l.starts_with(prefix)) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match p.lines.recv_timeout(left) {
                Ok(line) => p.seen.push(line),
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "{}: no line starting with {prefix:?} within {timeout:?}",
                        p.name
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = p.child.wait().ok();
                    panic!(
                        "{}: exited ({status:?}) without printing a line starting with {prefix:?}",
                        p.name
                    )
                }
            }
        }
    }

    /// Every stdout line of process `i` so far starting with `prefix`
    /// (call after it exited to get all of them).
    pub fn lines(&mut self, i: usize, prefix: &str) -> Vec<String> {
        let p = &mut self.procs[i];
        while let Ok(line) = p.lines.recv_timeout(Duration::from_millis(200)) {
            p.seen.push(line);
        }
        p.seen
            .iter()
            .filter(|l| l.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// Closes process `i`'s stdin (the swarm master stops on end-of-file).
    pub fn close_stdin(&mut self, i: usize) {
        self.procs[i].stdin.take();
    }

    /// Sends SIGKILL to process `i` and reaps it.
    pub fn kill(&mut self, i: usize) {
        let p = &mut self.procs[i];
        let _ = p.child.kill();
        let _ = p.child.wait();
        Self::note(
            &self.log,
            self.started,
            &p.name,
            "<killed with SIGKILL by the test>",
        );
    }

    /// Waits up to `timeout` for process `i` to exit; returns its status.
    pub fn wait_exit(&mut self, i: usize, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let p = &mut self.procs[i];
        loop {
            match p.child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => panic!("{} did not exit within {timeout:?}", p.name),
                Err(e) => panic!("waiting for {}: {e}", p.name),
            }
        }
    }

    /// Waits for process `i` to exit and asserts success.
    pub fn expect_success(&mut self, i: usize, timeout: Duration) {
        let status = self.wait_exit(i, timeout);
        assert!(status.success(), "{} failed: {status}", self.procs[i].name);
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for p in &mut self.procs {
            p.stdin.take();
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        if std::thread::panicking() {
            // Give the reader threads a moment to drain the pipes.
            std::thread::sleep(Duration::from_millis(100));
            if let Ok(log) = self.log.lock() {
                eprintln!("---- output of the test's processes ----");
                for line in log.iter() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// Field `n` (0-based, whitespace-separated) of a line such as "PORT 1234".
pub fn field(line: &str, n: usize) -> String {
    line.split_whitespace()
        .nth(n)
        .unwrap_or_else(|| panic!("line {line:?} has no field {n}"))
        .to_string()
}

/// Starts `swarm master TIMEOUT_MS` and returns (its index, its port).
pub fn start_master(procs: &mut Procs, swarm: &Path, peer_timeout_ms: u32) -> (usize, u16) {
    let mut cmd = Command::new(swarm);
    cmd.arg("master").arg(peer_timeout_ms.to_string());
    let m = procs.spawn("master", cmd);
    let line = procs.wait_line(m, "PORT ", Duration::from_secs(30));
    let port = field(&line, 1)
        .parse()
        .unwrap_or_else(|e| panic!("bad port in {line:?}: {e}"));
    (m, port)
}

/// Stops a master started with [`start_master`] and checks its clean exit.
pub fn stop_master(procs: &mut Procs, m: usize) {
    procs.close_stdin(m);
    procs.wait_line(m, "MASTER_DONE", Duration::from_secs(30));
    procs.expect_success(m, Duration::from_secs(30));
}
