//! # pccl-core
//!
//! A fault-tolerant collective communication library for training across the
//! public internet: a master that coordinates membership with micro-consensus,
//! peers that run ring all-reduce over pools of TCP connections, and a shared
//! state kept bit-identical across peers.

pub mod error;
pub mod types;

pub use error::{Error, Result};
pub use types::*;

mod bufpool;
pub(crate) mod collectives;
pub mod comm;
pub mod diloco;
pub mod hash;
pub mod kernels;
pub mod logging;
pub mod master;
pub mod net;
pub mod quant;
pub mod shared_state;
pub mod transport;
pub mod wire;

pub use comm::{
    AsyncReduceHandle, Communicator, CommunicatorConfig, Element, RawReduceOp, ReduceBuffers,
};
pub use master::{MasterConfig, MasterNode};
pub use shared_state::{SharedState, SharedTensor, SyncProgress, SyncProgressCallback};

/// Whether this build handles CUDA device buffers: `false` in every build.
///
/// The `cuda` cargo feature exists (so that builds asking for it keep
/// working) but no CUDA code is behind it yet, so it does not change this
/// value: CUDA tensors (`DeviceType::Cuda`) are rejected with
/// [`Error::InvalidArgument`] by `Communicator::sync_shared_state`, and
/// all-reduce buffers must be host memory, with or without the feature.
pub const CUDA_SUPPORT: bool = false;

/// Default port of the master (`CCOIP_PROTOCOL_PORT_MASTER`).
pub const DEFAULT_MASTER_PORT: u16 = 48148;
/// First port tried for a peer's shared-state listener.
pub const DEFAULT_SHARED_STATE_PORT: u16 = 48149;
/// First port tried for a peer's p2p listener.
pub const DEFAULT_P2P_PORT: u16 = 48150;
/// First port tried for a peer's bandwidth-benchmark listener.
pub const DEFAULT_BENCHMARK_PORT: u16 = 48151;
