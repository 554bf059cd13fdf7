//! The meshnode agent: configuration, upstream listeners, the tunnel server,
//! health checks, load balancing and outlier detection, and the admin API.

pub mod admin;
pub mod app;
pub mod authz;
pub mod balance;
pub mod ca;
pub mod config;
pub mod dns;
mod drain;
pub mod ewma;
pub mod explain;
mod federation;
pub mod health;
mod http;
mod inbound;
mod join;
mod join_slots;
pub mod lock;
pub mod metrics;
mod notify;
pub mod outlier;
pub mod policy;
mod registry;
pub mod reload;
mod renew;
mod replicate;
pub mod resilience;
mod revocations;
pub mod routes;
pub mod telemetry;
pub mod trace;
mod upstream;
pub mod uri_path;

pub use app::{build, check_credentials, AppError, Bound, Hooks};
pub use config::Config;
