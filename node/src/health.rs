//! Health checks: the pure state machine and the async checkers.

mod check;
mod state;

pub use check::{probe, spawn_checks};
pub use state::HealthState;
