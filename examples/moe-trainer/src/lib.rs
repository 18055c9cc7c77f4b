//! The MoE trainer's library: data, model, balancing, statistics and plots.
pub mod data;
pub mod plot;
pub mod stats;
