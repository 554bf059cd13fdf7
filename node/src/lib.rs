//! The meshnode agent.
pub mod config;
