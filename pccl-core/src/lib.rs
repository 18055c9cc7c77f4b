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
