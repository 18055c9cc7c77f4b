//! The MoE trainer's library: data, model, balancing, the peer loop, the
//! local swarm driver, the report, statistics and plots.
pub mod balance;
pub mod cli;
pub mod data;
pub mod local;
pub mod model;
pub mod peer;
pub mod plot;
pub mod report;
pub mod stats;
