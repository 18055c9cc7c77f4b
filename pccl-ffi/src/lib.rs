//! # libpccl: the C99 ABI of PCCL-rs
//!
//! This crate builds `libpccl.so` (soname `libpccl.so`) and `libpccl.a`,
//! which export exactly the `pccl*` functions declared in `include/pccl.h`:
//! PCCL 1.0's API plus a few `pccl`-prefixed extensions. All logic lives in
//! `pccl-core`; this crate only validates C arguments, maps handles, and
//! converts types and errors.
//!
//! Modules:
//! - [`types`]: `#[repr(C)]` mirrors of the header's types and checked
//!   conversions to `pccl_core` types;
//! - `boundary`: the wrapper every exported function runs in (panics caught,
//!   errors mapped to `pcclResult_t`, thread-local last-error message), the
//!   `pcclInit` flag, checked output pointers;
//! - `registry`: tables of live handles, so a NULL, destroyed or made-up
//!   handle gives `pcclInvalidArgument` rather than a crash;
//! - `comm`: communicator functions; `master`: master functions; this file:
//!   library-wide functions (`pcclInit`, build info, error strings, logging).
//!
//! Rules kept throughout: `unsafe` appears only where a C pointer is turned
//! into a Rust value, each block with a `// SAFETY:` comment; no panic
//! crosses `extern "C"`; handles are never dereferenced.

#![deny(unsafe_op_in_unsafe_fn)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod boundary;
mod comm;
mod master;
mod registry;
pub mod types;

use std::ffi::c_char;

use pccl_core::Error;

use boundary::{call, OutPtr};
use types::*;

/// Whether this build accepts CUDA device buffers (`pcclGetBuildInfo`):
/// `false` in every build, `--features cuda` included, until a CUDA path
/// exists (see `pccl_core::CUDA_SUPPORT`). `pcclDeviceCuda` tensor infos are
/// rejected with `pcclInvalidArgument` (`types::tensor_spec_from_raw`).
pub(crate) const HAS_CUDA: bool = pccl_core::CUDA_SUPPORT;

/// Initializes the library (idempotent, thread-safe).
#[no_mangle]
pub extern "C" fn pcclInit() -> pcclResult_t {
    call("pcclInit", || {
        pccl_core::logging::init(None);
        boundary::mark_initialized();
        Ok(())
    })
}

/// Describes this build of the library.
///
/// # Safety
/// `info` must be NULL or valid for writing a `pcclBuildInfo_t`.
#[no_mangle]
pub unsafe extern "C" fn pcclGetBuildInfo(info: *mut pcclBuildInfo_t) -> pcclResult_t {
    call("pcclGetBuildInfo", || {
        let out = OutPtr::required(info, "info")?;
        // SAFETY: non-NULL and aligned; valid for writes per the contract.
        unsafe {
            out.write(pcclBuildInfo_t {
                has_cuda_support: HAS_CUDA,
            })
        };
        Ok(())
    })
}

/// Extension: message of the last failed pccl call on this thread ("" if none).
#[no_mangle]
pub extern "C" fn pcclGetLastErrorString() -> *const c_char {
    boundary::last_error_ptr()
}

/// Extension: sets the log verbosity process-wide.
#[no_mangle]
pub extern "C" fn pcclSetLogLevel(level: pcclLogLevel_t) -> pcclResult_t {
    call("pcclSetLogLevel", || {
        let level = log_level_from_raw(level)?;
        pccl_core::logging::init(Some(level.as_filter()));
        Ok(())
    })
}

/// Extension: static name of a result code.
///
/// # Safety
/// `out` must be NULL or valid for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn pcclGetResultString(
    result: pcclResult_t,
    out: *mut *const c_char,
) -> pcclResult_t {
    call("pcclGetResultString", || {
        let out = OutPtr::required(out, "out")?;
        let name = result_name(result).ok_or_else(|| {
            Error::InvalidArgument(format!("{result} is not a pcclResult_t value"))
        })?;
        // SAFETY: non-NULL and aligned; valid for writes per the contract.
        unsafe { out.write(name.as_ptr()) };
        Ok(())
    })
}
