//! Shared helpers of the stress and benchmark binaries.
