//! Shared helpers of the stress and benchmark binaries.

pub mod bench;
pub mod hog;
pub mod swarm;
