//! Registries of live handles.
//!
//! A handle given to C (`pcclComm_t *`, `pcclMasterInstance_t *`) is the
//! address of an `Arc`-owned state object, and every live handle is recorded
//! in a process-wide table keyed by that address. Exported functions never
//! dereference a handle pointer: they look the address up and clone the
//! `Arc`. A NULL, destroyed (double destroy) or made-up pointer is simply not
//! in the table and gives `pcclInvalidArgument` instead of a crash.
//!
//! Limit: a stale pointer whose address has since been reused by a newer
//! handle of the same kind refers to that newer handle (addresses are only
//! reused after the old state has been freed).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use pccl_core::{Error, Result};

/// Live handles of one kind (`T` is the state behind the handle).
pub(crate) struct Registry<T> {
    what: &'static str,
    live: Mutex<Option<HashMap<usize, Arc<T>>>>,
}

impl<T> Registry<T> {
    /// An empty registry; `what` names the handle kind in error messages.
    pub(crate) const fn new(what: &'static str) -> Self {
        Registry {
            what,
            live: Mutex::new(None),
        }
    }

    fn table(&self) -> MutexGuard<'_, Option<HashMap<usize, Arc<T>>>> {
        // Only map operations run under this lock; recover from poisoning.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `state`; returns its handle address.
    pub(crate) fn insert(&self, state: Arc<T>) -> usize {
        let key = Arc::as_ptr(&state) as usize;
        self.table()
            .get_or_insert_with(HashMap::new)
            .insert(key, state);
        key
    }

    /// The state behind a handle; `InvalidArgument` for NULL or a pointer
    /// that is not a live handle.
    pub(crate) fn get(&self, handle: usize) -> Result<Arc<T>> {
        if handle == 0 {
            return Err(Error::InvalidArgument(format!("{} is NULL", self.what)));
        }
        self.table()
            .as_ref()
            .and_then(|m| m.get(&handle).cloned())
            .ok_or_else(|| self.not_live())
    }

    /// Forgets a handle; `InvalidArgument` if it is not live.
    pub(crate) fn remove(&self, handle: usize) -> Result<Arc<T>> {
        if handle == 0 {
            return Err(Error::InvalidArgument(format!("{} is NULL", self.what)));
        }
        self.table()
            .as_mut()
            .and_then(|m| m.remove(&handle))
            .ok_or_else(|| self.not_live())
    }

    fn not_live(&self) -> Error {
        Error::InvalidArgument(format!(
            "{} is not a live handle (already destroyed, or never created by this library)",
            self.what
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups() {
        let r: Registry<u32> = Registry::new("thing");
        assert!(r.get(0).is_err());
        assert!(r.get(0x1000).is_err());
        let h = r.insert(Arc::new(5));
        assert_eq!(r.get(h).map(|a| *a), Ok(5));
        assert_eq!(r.remove(h).map(|a| *a), Ok(5));
        assert!(r.get(h).is_err());
        assert!(r.remove(h).is_err());
        assert!(r.remove(0).is_err());
    }
}
