//! The TCP items of the former `transport` module, kept at this path for
//! compatibility: they live in [`crate::net::tcp`] (TCP) and
//! [`crate::net`] (framing, which is transport-agnostic) now. New code uses
//! the [`crate::net`] traits.

pub use crate::net::tcp::{
    bind_listener, bind_one, dial, CongestionControl, SocketTuning, CONGESTION_ENV,
};
pub use crate::net::{read_control_frame, read_hello, write_hello, FrameError};
