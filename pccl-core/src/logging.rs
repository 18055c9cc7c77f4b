//! Log setup for binaries and the C/Python layers: `PCCL_LOG` (or
//! `RUST_LOG`) holds a `tracing` filter such as `info` or `pccl_core=debug`.

use std::sync::OnceLock;

use tracing_subscriber::{reload, EnvFilter, Registry};

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
            .unwrap_or_else(|_| EnvFilter::new("warn")),
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
