//! meshnode's gossip: chitchat pools running over the node's QUIC endpoint,
//! the key schema a node publishes, the service catalog derived from it, and
//! the federation summaries gateways exchange in the WAN pool.

pub mod catalog;
pub mod federation;
pub mod frame;
pub mod gate;
pub mod keys;
pub mod metrics;
pub mod pacing;
pub mod plane;
mod pool;
mod probe;
mod quic;
pub mod replica;
pub mod signed;
pub mod swim;
pub mod wire;

pub use catalog::{Catalog, Instance, Member, MemberState, NodeSnapshot, RemoteRoute};
/// The chitchat this crate is built on (pinned), for alternative transports.
pub use chitchat;
pub use gate::{Authority, Gate, Guard};
pub use keys::{Health, NodeInfo, Protocol, ServiceRecord};
pub use pool::{GossipConfig, GossipError, GossipHandle, ReplicaValue, ReplicaView, Tuning};
pub use quic::{GatedTransport, PoolKind, QuicTransport};
