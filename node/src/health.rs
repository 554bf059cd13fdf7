//! Health checks: the pure state machine and the async checkers.

mod check;
mod state;

pub use check::{probe, spawn_checks, Outcome, Report};
pub use state::HealthState;
