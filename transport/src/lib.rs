//! meshnode's transport layer: one QUIC endpoint per node, mutual TLS with
//! certificates from the mesh's own CA, and the tunnel wire format.
//!
//! Everything that crosses the network goes through this crate: gossip rides
//! on uni streams of `meshnode-gossip/1` connections, proxied TCP connections
//! on bidi streams of `meshnode-tunnel/1` connections. There is no plaintext mode.

pub mod admission;
pub mod alpn;
pub mod clock;
pub mod codec;
pub mod endpoint;
pub mod join;
pub mod metrics;
pub mod pki;
mod pool;
pub mod tls;
pub mod tunnel;
pub mod window;

pub use endpoint::{negotiated_alpn, Accepted, Endpoint, EndpointConfig, Incoming, JoinConn};
pub use metrics::LogLimit;
pub use pki::{Identity, PeerCert, Role};
pub use pool::ConnectError;
