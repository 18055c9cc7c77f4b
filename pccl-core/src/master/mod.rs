//! The master (coordinator): a thin tokio driver around the sans-IO
//! [`state::MasterState`]. It accepts control connections, turns bytes into
//! events, and performs the actions the state machine returns. Connections
//! are accepted and framed through the [`crate::net`] traits.

pub mod liveness;
pub mod state;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Notify};
use tokio::task::AbortHandle;

use crate::error::{Error, Result};
use crate::net::{self, Conn, FrameError, Listener, Net, NetListener, Transport};
use crate::wire::{ConnKind, PeerId, PeerMsg};
pub use liveness::{Eviction, LivenessStats};
pub use state::{Action, ConnId, Event, MasterConfig, MasterState};

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the driver feeds time to the state machine (see
/// [`MasterConfig::max_tick_step_ms`] for what a late tick means).
pub const TICK: Duration = Duration::from_millis(50);

/// An embeddable master. `bind` reserves the port (so a taken port fails
/// at once), `run` starts serving in the background, `interrupt` asks it to
/// stop, and `await_termination` waits until it has.
pub struct MasterNode {
    runtime: Option<tokio::runtime::Runtime>,
    listener: Option<NetListener>,
    local_addr: SocketAddr,
    cfg: MasterConfig,
    stop: Arc<Notify>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// A copy of the state machine's liveness statistics, refreshed every tick.
    liveness: Arc<Mutex<LivenessStats>>,
}

impl MasterNode {
    /// Binds the listening socket. Fails with `InvalidArgument` when the
    /// address is taken (e.g. a second master on the same port).
    pub fn bind(addr: SocketAddr, cfg: MasterConfig) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pccl-master")
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(format!("cannot start runtime: {e}")))?;
        // Accepted control connections get the default tuning. The listener
        // registers with this runtime, so it is bound within it.
        let bound = {
            let _guard = runtime.enter();
            Net::default()
                .listen_exact(addr)
                .map_err(|e| Error::InvalidArgument(format!("master cannot listen on {addr}: {e}")))
                .and_then(|l| {
                    let local = l
                        .local_addr()
                        .map_err(|e| Error::Internal(format!("local_addr: {e}")))?;
                    Ok((l, local))
                })
        };
        let (listener, local_addr) = match bound {
            Ok(b) => b,
            Err(e) => {
                // Not a plain drop: `bind` may be called from async code,
                // where dropping a runtime panics.
                runtime.shutdown_background();
                return Err(e);
            }
        };
        Ok(MasterNode {
            runtime: Some(runtime),
            listener: Some(listener),
            local_addr,
            cfg,
            stop: Arc::new(Notify::new()),
            task: None,
            liveness: Arc::new(Mutex::new(LivenessStats::default())),
        })
    }

    /// What the master saw of its peers' liveness so far (heartbeat gaps,
    /// its own late ticks, evictions), as of the last tick.
    pub fn liveness(&self) -> LivenessStats {
        self.liveness.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Starts serving in the background; returns at once.
    pub fn run(&mut self) -> Result<()> {
        let listener = self.listener.take().ok_or_else(|| {
            Error::InvalidUsage("master is already running or was stopped".into())
        })?;
        let rt = self
            .runtime
            .as_ref()
            .ok_or_else(|| Error::InvalidUsage("master was destroyed".into()))?;
        let cfg = self.cfg.clone();
        let stop = self.stop.clone();
        tracing::info!(addr = %self.local_addr, "master listening");
        self.task = Some(rt.spawn(serve(listener, cfg, stop, self.liveness.clone())));
        Ok(())
    }

    /// Asks the master to stop; returns at once.
    pub fn interrupt(&self) {
        self.stop.notify_one();
    }

    /// Blocks until the master has stopped (after `interrupt`).
    pub fn await_termination(&mut self) -> Result<()> {
        let Some(task) = self.task.take() else {
            return Err(Error::InvalidUsage("master is not running".into()));
        };
        let rt = self
            .runtime
            .as_ref()
            .ok_or_else(|| Error::InvalidUsage("master was destroyed".into()))?;
        rt.block_on(task)
            .map_err(|e| Error::Internal(format!("master task failed: {e}")))
    }
}

impl std::fmt::Debug for MasterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterNode")
            .field("local_addr", &self.local_addr)
            .field("running", &self.task.is_some())
            .finish()
    }
}

impl Drop for MasterNode {
    fn drop(&mut self) {
        self.stop.notify_one();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_millis(500));
        }
    }
}

enum DriverMsg {
    NewConn {
        conn: ConnId,
        remote: SocketAddr,
        local: SocketAddr,
        writer: mpsc::UnboundedSender<WriterCmd>,
        reader: AbortHandle,
    },
    Event(Event),
}

enum WriterCmd {
    Frame(Vec<u8>),
    Close,
}

struct ConnHandles {
    writer: mpsc::UnboundedSender<WriterCmd>,
    reader: AbortHandle,
}

async fn serve<L: Listener>(
    listener: L,
    cfg: MasterConfig,
    stop: Arc<Notify>,
    liveness: Arc<Mutex<LivenessStats>>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<DriverMsg>();
    let mut state = MasterState::new(cfg);
    let mut conns: HashMap<ConnId, ConnHandles> = HashMap::new();
    let mut next_conn: ConnId = 1;
    let start = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let now_ms = || start.elapsed().as_millis() as u64;
    loop {
        // Biased: after a stall of the master, the messages that queued up
        // (heartbeats among them) are handled before the next tick judges.
        let actions = tokio::select! {
            biased;
            _ = stop.notified() => break,
            Some(msg) = rx.recv() => {
                state.observe_time(now_ms());
                match msg {
                    DriverMsg::NewConn { conn, remote, local, writer, reader } => {
                        conns.insert(conn, ConnHandles { writer, reader });
                        state.handle(Event::Connected { conn, id: PeerId::random(), remote, local })
                    }
                    DriverMsg::Event(ev) => state.handle(ev),
                }
            },
            _ = tick.tick() => {
                let acts = state.handle(Event::Tick { now_ms: now_ms() });
                if let Ok(mut l) = liveness.lock() {
                    l.clone_from(state.liveness());
                }
                acts
            },
            accepted = listener.accept() => {
                match accepted {
                    Ok((stream, remote)) => {
                        let conn = next_conn;
                        next_conn += 1;
                        tokio::spawn(handshake(stream, remote, conn, tx.clone()));
                    }
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                continue;
            }
        };
        for action in actions {
            match action {
                Action::Send { conn, msg } => {
                    if let Some(h) = conns.get(&conn) {
                        let _ = h.writer.send(WriterCmd::Frame(msg.to_frame()));
                    }
                }
                Action::Close { conn, reason } => {
                    if let Some(h) = conns.remove(&conn) {
                        tracing::debug!(conn, "closing control connection: {reason}");
                        h.reader.abort();
                        let _ = h.writer.send(WriterCmd::Close);
                    }
                }
            }
        }
    }
    for (_, h) in conns.drain() {
        h.reader.abort();
        let _ = h.writer.send(WriterCmd::Close);
    }
    if let Ok(mut l) = liveness.lock() {
        l.clone_from(state.liveness());
    }
    tracing::info!("master stopped; {}", state.liveness().summary());
}

/// Greets a new connection, then runs its reader and writer tasks.
/// The stream arrives tuned by the listener.
async fn handshake<C: Conn>(
    mut stream: C,
    remote: SocketAddr,
    conn: ConnId,
    tx: mpsc::UnboundedSender<DriverMsg>,
) {
    let hello = match net::read_hello(&mut stream, HELLO_TIMEOUT).await {
        Ok(h) if h.kind == ConnKind::Control => h,
        Ok(h) => {
            tracing::warn!(%remote, kind = ?h.kind, "refusing non-control connection on the master port");
            return;
        }
        Err(e) => {
            tracing::warn!(%remote, "refusing connection: bad greeting: {e}");
            return;
        }
    };
    if let Err(e) = net::write_hello(&mut stream, &hello).await {
        tracing::debug!(%remote, "greeting reply failed: {e}");
        return;
    }
    let local = match stream.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let (mut rd, mut wr) = stream.into_halves();
    let (wtx, mut wrx) = mpsc::unbounded_channel::<WriterCmd>();
    let ev_tx = tx.clone();
    // The reader starts only after NewConn is queued, so the state machine
    // always learns of the connection before its first message.
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        if go_rx.await.is_err() {
            return;
        }
        loop {
            match net::read_control_frame(&mut rd).await {
                Ok(body) => match PeerMsg::decode(&body) {
                    Ok(msg) => {
                        if ev_tx
                            .send(DriverMsg::Event(Event::Message { conn, msg }))
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%remote, "malformed control message ({e}); closing this connection");
                        break;
                    }
                },
                Err(FrameError::Closed) => break,
                Err(e) => {
                    tracing::warn!(%remote, "control connection error ({e}); closing it");
                    break;
                }
            }
        }
        let _ = ev_tx.send(DriverMsg::Event(Event::Disconnected { conn }));
    });
    tokio::spawn(async move {
        while let Some(cmd) = wrx.recv().await {
            match cmd {
                WriterCmd::Frame(f) => {
                    if wr.write_all(&f).await.is_err() {
                        break;
                    }
                }
                WriterCmd::Close => break,
            }
        }
        let _ = wr.shutdown().await;
    });
    let _ = tx.send(DriverMsg::NewConn {
        conn,
        remote,
        local,
        writer: wtx,
        reader: reader.abort_handle(),
    });
    let _ = go_tx.send(());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::mem::Mem;
    use crate::wire::{Hello, MasterMsg};

    /// The driver on a transport other than TCP: a peer greets and
    /// registers over in-memory pipes and is acknowledged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_driver_registers_a_peer_over_any_transport() {
        let mem = Mem::default();
        let l = mem.listen("127.0.0.1".parse().unwrap(), 0, 1).unwrap();
        let addr = l.local_addr().unwrap();
        let stop = Arc::new(Notify::new());
        let task = tokio::spawn(serve(
            l,
            MasterConfig::default(),
            stop.clone(),
            Arc::default(),
        ));
        let timeout = Duration::from_secs(5);
        let mut c = mem.dial(addr, timeout).await.unwrap();
        let hello = Hello {
            kind: ConnKind::Control,
            from: PeerId::default(),
            to: PeerId::default(),
        };
        net::write_hello(&mut c, &hello).await.unwrap();
        let echo = net::read_hello(&mut c, timeout).await.unwrap();
        assert_eq!(echo.kind, ConnKind::Control);
        let register = PeerMsg::Register {
            group: 0,
            p2p_port: 1,
            ss_port: 2,
            bench_port: 0,
            advertised_ip: None,
        };
        c.write_all(&register.to_frame()).await.unwrap();
        let body = tokio::time::timeout(timeout, net::read_control_frame(&mut c))
            .await
            .unwrap()
            .unwrap();
        let ack = MasterMsg::decode(&body).unwrap();
        assert!(matches!(ack, MasterMsg::RegisterAck { .. }), "{ack:?}");
        stop.notify_one();
        task.await.unwrap();
    }
}
