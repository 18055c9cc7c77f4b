//! Log setup for binaries and the C/Python layers: `PCCL_LOG` (or
//! `RUST_LOG`) holds a `tracing` filter such as `info` or `pccl_core=debug`.
//!
//! Without either, the filter is [`DEFAULT_FILTER`]: warnings and errors,
//! plus the info lines of the [`PROGRESS_TARGET`] target, which report
//! long waits a newcomer would otherwise sit through silently (waiting for
//! admission in `connect()`, a long shared-state fetch). An explicit filter
//! is taken as given (`warn` drops those lines; `warn,pccl::progress=info`
//! keeps them).

use std::sync::OnceLock;

use tracing_subscriber::{reload, EnvFilter, Registry};

/// Target of the progress lines of long waits (admission, shared-state
/// fetches), logged at info level.
pub const PROGRESS_TARGET: &str = "pccl::progress";

/// The filter used when neither `PCCL_LOG` nor `RUST_LOG` is set:
/// `warn`, plus the progress lines of long waits.
pub const DEFAULT_FILTER: &str = "warn,pccl::progress=info";

static RELOAD: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs a stderr logger once; later calls only change the level when
/// `level` is given. Safe to call from any thread, any number of times.
pub fn init(level: Option<&str>) {
    use tracing_subscriber::prelude::*;
    if let Some(h) = RELOAD.get() {
        if let Some(l) = level {
            let _ = h.modify(|f| *f = EnvFilter::new(l));
        }
        return;
    }
    let filter = match level {
        Some(l) => EnvFilter::new(l),
        None => std::env::var("PCCL_LOG")
            .or_else(|_| std::env::var("RUST_LOG"))
            .map(EnvFilter::new)
            .unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER)),
    };
    let (layer, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    if tracing_subscriber::registry()
        .with(layer)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        let _ = RELOAD.set(handle);
    }
}
