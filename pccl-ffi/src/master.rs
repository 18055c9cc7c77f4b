//! The master functions of the C API: `pcclCreateMaster`, `pcclRunMaster`,
//! `pcclInterruptMaster`, `pcclMasterAwaitTermination`, `pcclDestroyMaster`,
//! plus the extensions `pcclSetMasterPeerTimeout` and
//! `pcclGetMasterListenAddress`. None of them needs `pcclInit`.
//!
//! A `pcclMasterInstance_t *` is the address of a [`MasterHandle`] recorded in
//! [`MASTERS`]. `pcclCreateMaster` only records the address; `pcclRunMaster`
//! binds it and starts a `pccl_core::MasterNode`. Interrupting is signalled
//! through a flag + condition variable owned by the handle, so
//! `pcclInterruptMaster` (any thread) never waits behind a thread blocked in
//! `pcclMasterAwaitTermination`.

use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use pccl_core::{Error, MasterConfig, MasterNode, Result};

use crate::boundary::{call, OutPtr};
use crate::registry::Registry;
use crate::types::*;

/// Live master instances.
pub(crate) static MASTERS: Registry<MasterHandle> = Registry::new("master instance");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Created, not run yet.
    Created,
    /// `pcclRunMaster` succeeded.
    Running,
    /// Awaited after an interrupt (or destroyed).
    Terminated,
}

struct MasterInner {
    listen: SocketAddr,
    cfg: MasterConfig,
    phase: Phase,
    node: Option<MasterNode>,
    local_addr: Option<SocketAddr>,
}

/// State behind a `pcclMasterInstance_t *`.
pub(crate) struct MasterHandle {
    inner: Mutex<MasterInner>,
    /// Set by `pcclInterruptMaster` / `pcclDestroyMaster`.
    stop: Mutex<bool>,
    stopped: Condvar,
}

impl MasterHandle {
    fn lock(&self) -> MutexGuard<'_, MasterInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn request_stop(&self) {
        *self.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.stopped.notify_all();
    }

    fn wait_for_stop_request(&self) {
        let mut stop = self.stop.lock().unwrap_or_else(|p| p.into_inner());
        while !*stop {
            stop = self.stopped.wait(stop).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Stops the node (if any) and waits for it; idempotent. The lock is
    /// held meanwhile (the node was interrupted, so this is short), so a
    /// concurrent awaiting thread returns only once the node is gone.
    fn terminate(&self) -> Result<()> {
        let mut g = self.lock();
        g.phase = Phase::Terminated;
        let Some(mut node) = g.node.take() else {
            return Ok(());
        };
        node.interrupt();
        let r = node.await_termination();
        drop(node);
        r
    }
}

fn master_of(p: *const pcclMasterInstance_t) -> Result<Arc<MasterHandle>> {
    MASTERS.get(p as usize)
}

/// Creates a master instance for `listen_address` (see pccl.h).
///
/// # Safety
/// `p_master_handle_out` must be NULL or valid for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn pcclCreateMaster(
    listen_address: ccoip_socket_address_t,
    p_master_handle_out: *mut *mut pcclMasterInstance_t,
) -> pcclResult_t {
    call("pcclCreateMaster", || {
        let out = OutPtr::required(p_master_handle_out, "p_master_handle_out")?;
        // SAFETY: checked non-NULL and aligned; valid for writes per the contract.
        unsafe { out.write(std::ptr::null_mut()) };
        pccl_core::logging::init(None);
        let listen = socket_addr_from_raw(&listen_address)?;
        let handle = Arc::new(MasterHandle {
            inner: Mutex::new(MasterInner {
                listen,
                cfg: MasterConfig::default(),
                phase: Phase::Created,
                node: None,
                local_addr: None,
            }),
            stop: Mutex::new(false),
            stopped: Condvar::new(),
        });
        let key = MASTERS.insert(handle);
        // SAFETY: as above.
        unsafe { out.write(key as *mut pcclMasterInstance_t) };
        Ok(())
    })
}

/// Extension: sets the master's peer liveness timeout before it runs.
///
/// # Safety
/// Any pointer value is accepted (handles are looked up, never dereferenced).
#[no_mangle]
pub unsafe extern "C" fn pcclSetMasterPeerTimeout(
    master: *mut pcclMasterInstance_t,
    peer_liveness_timeout_ms: u32,
) -> pcclResult_t {
    call("pcclSetMasterPeerTimeout", || {
        let h = master_of(master)?;
        let mut g = h.lock();
        if g.phase != Phase::Created {
            return Err(Error::InvalidUsage(
                "the master was already run; set the timeout before pcclRunMaster".into(),
            ));
        }
        if peer_liveness_timeout_ms != 0 {
            g.cfg.peer_timeout_ms = u64::from(peer_liveness_timeout_ms);
        }
        Ok(())
    })
}

/// Binds the listen address and starts the master in the background.
///
/// # Safety
/// Any pointer value is accepted (handles are looked up, never dereferenced).
#[no_mangle]
pub unsafe extern "C" fn pcclRunMaster(master_instance: *mut pcclMasterInstance_t) -> pcclResult_t {
    call("pcclRunMaster", || {
        let h = master_of(master_instance)?;
        let mut g = h.lock();
        if g.phase != Phase::Created {
            return Err(Error::InvalidUsage("the master was already run".into()));
        }
        let mut node = MasterNode::bind(g.listen, g.cfg.clone()).map_err(|e| match e {
            Error::InvalidArgument(m) => Error::InvalidUsage(m),
            e => e,
        })?;
        node.run()?;
        g.local_addr = Some(node.local_addr());
        g.node = Some(node);
        g.phase = Phase::Running;
        Ok(())
    })
}

/// Extension: the address a running master listens on (actual port).
///
/// # Safety
/// `address_out` must be NULL or valid for writing a `ccoip_socket_address_t`.
#[no_mangle]
pub unsafe extern "C" fn pcclGetMasterListenAddress(
    master_instance: *const pcclMasterInstance_t,
    address_out: *mut ccoip_socket_address_t,
) -> pcclResult_t {
    call("pcclGetMasterListenAddress", || {
        let out = OutPtr::required(address_out, "address_out")?;
        let h = master_of(master_instance)?;
        let addr = h.lock().local_addr.ok_or_else(|| {
            Error::InvalidUsage("the master has not been run yet (call pcclRunMaster)".into())
        })?;
        // SAFETY: checked non-NULL and aligned; valid for writes per the contract.
        unsafe { out.write(socket_addr_to_raw(&addr)) };
        Ok(())
    })
}

/// Asks a running master to stop; returns at once.
///
/// # Safety
/// Any pointer value is accepted (handles are looked up, never dereferenced).
#[no_mangle]
pub unsafe extern "C" fn pcclInterruptMaster(
    master_instance: *mut pcclMasterInstance_t,
) -> pcclResult_t {
    call("pcclInterruptMaster", || {
        let h = master_of(master_instance)?;
        let g = h.lock();
        if g.phase == Phase::Created {
            return Err(Error::InvalidUsage("the master was never run".into()));
        }
        if let Some(node) = g.node.as_ref() {
            node.interrupt();
        }
        drop(g);
        h.request_stop();
        Ok(())
    })
}

/// Blocks until the master has been interrupted and has terminated.
///
/// # Safety
/// Any pointer value is accepted (handles are looked up, never dereferenced).
#[no_mangle]
pub unsafe extern "C" fn pcclMasterAwaitTermination(
    master_instance: *mut pcclMasterInstance_t,
) -> pcclResult_t {
    call("pcclMasterAwaitTermination", || {
        let h = master_of(master_instance)?;
        match h.lock().phase {
            Phase::Created => {
                return Err(Error::InvalidUsage("the master was never run".into()));
            }
            Phase::Terminated => return Ok(()),
            Phase::Running => {}
        }
        h.wait_for_stop_request();
        h.terminate()
    })
}

/// Destroys a master instance, stopping it first if it runs.
///
/// # Safety
/// Any pointer value is accepted (handles are looked up, never dereferenced).
#[no_mangle]
pub unsafe extern "C" fn pcclDestroyMaster(
    master_instance: *mut pcclMasterInstance_t,
) -> pcclResult_t {
    call("pcclDestroyMaster", || {
        let h = MASTERS.remove(master_instance as usize)?;
        h.request_stop();
        h.terminate()
    })
}
