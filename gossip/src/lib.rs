//! meshnode's gossip: chitchat pools running over the node's QUIC endpoint,
//! the key schema a node publishes, and the service catalog derived from it.

pub mod catalog;
pub mod keys;
pub mod metrics;
mod pool;
mod quic;

pub use catalog::{Catalog, Instance, Member, MemberState, NodeSnapshot};
pub use keys::{Health, NodeInfo, Protocol, ServiceRecord};
pub use pool::{GossipConfig, GossipError, GossipHandle, Tuning};
pub use quic::QuicTransport;
