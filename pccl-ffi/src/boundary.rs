//! The ABI boundary: every exported function runs its body through
//! [`call`], which
//!
//! - catches any Rust panic (`std::panic::catch_unwind`) and turns it into
//!   `pcclInternalError`, so no unwinding ever crosses `extern "C"`;
//! - turns a `pccl_core::Error` into its `pcclResult_t` code;
//! - records the failure's message in a thread-local buffer that
//!   `pcclGetLastErrorString` returns.
//!
//! It also holds the process-wide "pcclInit has succeeded" flag and
//! [`OutPtr`], the checked wrapper for caller-provided output pointers.

use std::any::Any;
use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

use pccl_core::{Error, Result};

use crate::types::{pcclInternalError, pcclResult_t, pcclSuccess};

thread_local! {
    /// Message of the last failed pccl call on this thread ("" if none).
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

static INITIALIZED: AtomicBool = AtomicBool::new(false);

/// Marks the library initialized (`pcclInit`).
pub(crate) fn mark_initialized() {
    INITIALIZED.store(true, Ordering::Release);
}

/// `Err(NotInitialized)` until `pcclInit` has succeeded.
pub(crate) fn ensure_initialized() -> Result<()> {
    if INITIALIZED.load(Ordering::Acquire) {
        Ok(())
    } else {
        Err(Error::NotInitialized(
            "pcclInit() must be called (and succeed) first".into(),
        ))
    }
}

/// Stores `msg` as this thread's last error (interior NULs become spaces).
pub(crate) fn set_last_error(msg: &str) {
    let bytes: Vec<u8> = msg.bytes().map(|b| if b == 0 { b' ' } else { b }).collect();
    let c = CString::new(bytes).unwrap_or_default();
    // try_with / try_borrow_mut: never panic, even during thread teardown.
    let _ = LAST_ERROR.try_with(|e| {
        if let Ok(mut slot) = e.try_borrow_mut() {
            *slot = c;
        }
    });
}

/// Pointer to this thread's last-error string; valid until the next write
/// on this thread (i.e. the next failing pccl call) or the thread's exit.
pub(crate) fn last_error_ptr() -> *const c_char {
    LAST_ERROR
        .try_with(|e| e.try_borrow().map(|s| s.as_ptr()).ok())
        .ok()
        .flatten()
        .unwrap_or(c"".as_ptr())
}

fn panic_message(p: &(dyn Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

/// Runs the body of exported function `func` at the ABI boundary: success
/// gives `pcclSuccess`; an error gives its code and sets the last error to
/// "`func`: `error`"; a panic gives `pcclInternalError` (never unwinds).
pub(crate) fn call<F>(func: &str, body: F) -> pcclResult_t
where
    F: FnOnce() -> Result<()>,
{
    // AssertUnwindSafe: after a panic the library only reports the error;
    // state guarded by mutexes is recovered from poisoning explicitly.
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => pcclSuccess,
        Ok(Err(e)) => {
            set_last_error(&format!("{func}: {e}"));
            e.code()
        }
        Err(payload) => {
            let msg = panic_message(payload.as_ref());
            // Formatting and storing a String cannot panic in practice, but
            // stay on the safe side of the boundary anyway.
            let _ = catch_unwind(AssertUnwindSafe(|| {
                set_last_error(&format!("{func}: internal error: panic: {msg}"))
            }));
            pcclInternalError
        }
    }
}

/// A caller-provided output pointer, checked for NULL and alignment before
/// any work is done, written with [`OutPtr::write`] only at the end. Writing
/// through a raw pointer (never a reference) means the pointee may be
/// uninitialized memory, e.g. a `bool` the caller has not set.
pub(crate) struct OutPtr<T>(*mut T);

impl<T> OutPtr<T> {
    /// A required output: NULL or misaligned gives `InvalidArgument`.
    pub(crate) fn required(p: *mut T, what: &str) -> Result<Self> {
        if p.is_null() {
            return Err(Error::InvalidArgument(format!("{what} is NULL")));
        }
        Self::aligned(p, what)
    }

    /// An optional (nullable) output: NULL gives `None`, misaligned gives
    /// `InvalidArgument`.
    pub(crate) fn optional(p: *mut T, what: &str) -> Result<Option<Self>> {
        if p.is_null() {
            Ok(None)
        } else {
            Self::aligned(p, what).map(Some)
        }
    }

    fn aligned(p: *mut T, what: &str) -> Result<Self> {
        if !p.is_aligned() {
            return Err(Error::InvalidArgument(format!("{what} is misaligned")));
        }
        Ok(OutPtr(p))
    }

    /// Stores `v` (the previous contents are neither read nor dropped).
    ///
    /// # Safety
    /// The pointer must be valid for writes of a `T` (the C caller's
    /// contract for every output argument; NULL and alignment were checked).
    pub(crate) unsafe fn write(&self, v: T) {
        // SAFETY: non-NULL and aligned (checked at construction); valid for
        // writes per this function's contract.
        unsafe { self.0.write(v) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn last_error() -> String {
        // SAFETY: last_error_ptr always points to a live NUL-terminated string.
        unsafe { CStr::from_ptr(last_error_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn panics_become_internal_errors() {
        let r = call("pcclTest", || panic!("boom {}", 42));
        assert_eq!(r, pcclInternalError);
        assert_eq!(last_error(), "pcclTest: internal error: panic: boom 42");
        let r = call("pcclTest2", || std::panic::panic_any(7u8));
        assert_eq!(r, pcclInternalError);
        assert!(last_error().contains("unknown panic payload"));
    }

    #[test]
    fn errors_map_to_codes_and_messages() {
        assert_eq!(call("f", || Ok(())), pcclSuccess);
        let r = call("pcclX", || Err(Error::InvalidUsage("nope\0x".into())));
        assert_eq!(r, crate::types::pcclInvalidUsage);
        assert_eq!(last_error(), "pcclX: invalid usage: nope x");
        // A later success keeps the last failure's message.
        assert_eq!(call("f", || Ok(())), pcclSuccess);
        assert_eq!(last_error(), "pcclX: invalid usage: nope x");
    }

    #[test]
    fn the_c_result_codes_are_the_error_enums_codes() {
        use crate::types::*;
        let table = [
            (pcclNotInitialized, "not initialized"),
            (pcclInternalError, "internal error"),
            (pcclInvalidArgument, "invalid argument"),
            (pcclInvalidUsage, "invalid usage"),
            (pcclTooFewPeers, "too few peers"),
            (pcclMasterConnectionFailed, "master connection failed"),
            (pcclRankConnectionFailed, "rank connection failed"),
            (pcclRankConnectionLost, "rank connection lost"),
            (pcclNoSharedStateAvailable, "no shared state available"),
            (pcclPendingAsyncOps, "pending async ops"),
            (pcclUpdateTopologyFailed, "update topology failed"),
            (
                pcclTopologyOptimizationFailed,
                "topology optimization failed",
            ),
        ];
        for (code, what) in table {
            let e = Error::from_code(code, "cause".into());
            assert_eq!(e.code(), code, "{what}");
            assert_eq!(e.to_string(), format!("{what}: cause"));
        }
        assert_eq!(pcclSuccess, 0);
    }

    #[test]
    fn last_error_is_thread_local() {
        let _ = call("pcclMain", || Err(Error::Internal("main".into())));
        let other = std::thread::spawn(last_error).join().expect("thread");
        assert_eq!(other, "");
        assert!(last_error().contains("main"));
    }

    #[test]
    fn out_pointers() {
        let mut x = 0u64;
        assert!(OutPtr::<u64>::required(std::ptr::null_mut(), "x").is_err());
        assert!(matches!(
            OutPtr::<u64>::optional(std::ptr::null_mut(), "x"),
            Ok(None)
        ));
        let mis = (&mut x as *mut u64 as usize + 1) as *mut u64;
        assert!(OutPtr::required(mis, "x").is_err());
        let o = OutPtr::required(&mut x as *mut u64, "x").expect("valid");
        // SAFETY: points to a live local u64.
        unsafe { o.write(9) };
        assert_eq!(x, 9);
    }
}
