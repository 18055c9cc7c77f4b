//! Child processes under supervision. Each child's stdout and stderr are read
//! line by line on their own threads and arrive, tagged with the child's
//! index, on one channel, so a harness waits for specific lines with a
//! deadline instead of sleeping. Signals go only to children not yet reaped
//! (a zombie's pid cannot be reused, so this never hits a stranger).
//! Dropping [`Procs`] SIGKILLs and reaps every child still there, also when
//! the harness panics.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{Context, Error, Result};

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// What the reader threads report.
#[derive(Debug, Clone)]
pub enum ProcEvent {
    Line {
        id: usize,
        stream: Stream,
        line: String,
        at: Instant,
    },
    /// The stream closed (the child exited or closed it).
    Eof { id: usize, stream: Stream },
}

impl ProcEvent {
    pub fn id(&self) -> usize {
        match self {
            ProcEvent::Line { id, .. } | ProcEvent::Eof { id, .. } => *id,
        }
    }
}

struct Kid {
    name: String,
    child: Child,
    /// Held open so a child started with `--exit-on-stdin-eof` lives; dropped to end it.
    stdin: Option<ChildStdin>,
    status: Option<ExitStatus>,
}

/// A set of supervised children.
pub struct Procs {
    kids: Vec<Kid>,
    tx: mpsc::Sender<ProcEvent>,
    rx: mpsc::Receiver<ProcEvent>,
}

impl Default for Procs {
    fn default() -> Self {
        Self::new()
    }
}

impl Procs {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel();
        Procs {
            kids: Vec::new(),
            tx,
            rx,
        }
    }

    /// Starts `cmd` with piped stdin, stdout and stderr; returns its index.
    pub fn spawn(&mut self, name: impl Into<String>, mut cmd: Command) -> Result<usize> {
        let name = name.into();
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {name} ({cmd:?})"))?;
        let id = self.kids.len();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        self.kids.push(Kid {
            name: name.clone(),
            child,
            stdin,
            status: None,
        });
        let stdout = stdout.with_context(|| format!("{name}: stdout was not captured"))?;
        let stderr = stderr.with_context(|| format!("{name}: stderr was not captured"))?;
        self.reader(id, Stream::Stdout, stdout);
        self.reader(id, Stream::Stderr, stderr);
        Ok(id)
    }

    fn reader(&self, id: usize, stream: Stream, r: impl std::io::Read + Send + 'static) {
        let tx = self.tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { break };
                let ev = ProcEvent::Line {
                    id,
                    stream,
                    line,
                    at: Instant::now(),
                };
                if tx.send(ev).is_err() {
                    return;
                }
            }
            let _ = tx.send(ProcEvent::Eof { id, stream });
        });
    }

    pub fn len(&self) -> usize {
        self.kids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kids.is_empty()
    }

    pub fn name(&self, id: usize) -> &str {
        self.kids.get(id).map_or("?", |k| k.name.as_str())
    }

    pub fn pid(&self, id: usize) -> Option<u32> {
        self.kids.get(id).map(|k| k.child.id())
    }

    /// The next line or EOF from any child, or `None` after `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<ProcEvent> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// The next event without waiting.
    pub fn try_next(&self) -> Option<ProcEvent> {
        self.rx.try_recv().ok()
    }

    /// Exit status if the child has exited (reaping it).
    pub fn try_wait(&mut self, id: usize) -> Option<ExitStatus> {
        let kid = self.kids.get_mut(id)?;
        if kid.status.is_none() {
            if let Ok(Some(s)) = kid.child.try_wait() {
                kid.status = Some(s);
            }
        }
        kid.status
    }

    /// Whether the child is still running (or stopped), i.e. not exited.
    pub fn alive(&mut self, id: usize) -> bool {
        id < self.kids.len() && self.try_wait(id).is_none()
    }

    /// Sends `sig` to a child that has not been reaped yet.
    pub fn signal(&mut self, id: usize, sig: libc::c_int) -> Result<()> {
        if self.try_wait(id).is_some() {
            return Err(Error(format!("{} has already exited", self.name(id))));
        }
        let kid = self
            .kids
            .get(id)
            .with_context(|| format!("no child #{id}"))?;
        let pid = kid.child.id() as libc::pid_t;
        // SAFETY: kill(2) with the pid of our own child, not reaped yet.
        let rc = unsafe { libc::kill(pid, sig) };
        if rc != 0 {
            return Err(Error(format!(
                "signal {sig} to {} (pid {pid}): {}",
                kid.name,
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self, id: usize) -> Result<ExitStatus> {
        if let Some(s) = self.try_wait(id) {
            return Ok(s);
        }
        self.signal(id, libc::SIGKILL)?;
        self.wait(id)
    }

    /// Blocks until the child exits.
    pub fn wait(&mut self, id: usize) -> Result<ExitStatus> {
        let kid = self
            .kids
            .get_mut(id)
            .with_context(|| format!("no child #{id}"))?;
        if let Some(s) = kid.status {
            return Ok(s);
        }
        let s = kid
            .child
            .wait()
            .with_context(|| format!("waiting for {}", kid.name))?;
        kid.status = Some(s);
        Ok(s)
    }

    /// Waits up to `timeout` for the child to exit; `None` if it did not.
    pub fn wait_timeout(&mut self, id: usize, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait(id) {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Closes the child's stdin (a `--exit-on-stdin-eof` worker then exits).
    pub fn close_stdin(&mut self, id: usize) {
        if let Some(k) = self.kids.get_mut(id) {
            k.stdin = None;
        }
    }

    /// SIGKILLs and reaps every child still running.
    pub fn kill_all(&mut self) {
        for id in 0..self.kids.len() {
            if self.try_wait(id).is_none() {
                let _ = self.signal(id, libc::SIGKILL);
            }
        }
        for kid in &mut self.kids {
            kid.stdin = None;
            if kid.status.is_none() {
                kid.status = kid.child.wait().ok();
            }
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// How a child ended, in words (`exit 0`, `exit 3`, `killed by signal 9`).
pub fn describe_status(s: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "ended".into(),
    }
}
