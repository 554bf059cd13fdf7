//! ALPN protocol ids: one QUIC port carries several protocols, told apart at the handshake.

/// The chitchat gossip pool: one uni stream per gossip message.
pub const GOSSIP: &[u8] = b"meshnode-gossip/1";
/// The WAN pool of all gateways of the mesh; only gateway certificates may join.
pub const WAN_GOSSIP: &[u8] = b"meshnode-wan/1";
/// Proxied connections: one bidi stream per TCP connection.
pub const TUNNEL: &[u8] = b"meshnode-tunnel/1";
/// The join handshake of a new machine.
pub const JOIN: &[u8] = b"meshnode-join/1";

/// The protocols a node serves.
pub const ALL: [&[u8]; 4] = [GOSSIP, WAN_GOSSIP, TUNNEL, JOIN];

/// A protocol as a small copyable value, for map keys and metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Alpn {
    Gossip,
    WanGossip,
    Tunnel,
    Join,
}

// === impl Alpn ===

impl Alpn {
    pub fn as_bytes(self) -> &'static [u8] {
        match self {
            Alpn::Gossip => GOSSIP,
            Alpn::WanGossip => WAN_GOSSIP,
            Alpn::Tunnel => TUNNEL,
            Alpn::Join => JOIN,
        }
    }

    pub fn from_bytes(b: &[u8]) -> Option<Alpn> {
        match b {
            GOSSIP => Some(Alpn::Gossip),
            WAN_GOSSIP => Some(Alpn::WanGossip),
            TUNNEL => Some(Alpn::Tunnel),
            JOIN => Some(Alpn::Join),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Alpn::Gossip => "gossip",
            Alpn::WanGossip => "wan_gossip",
            Alpn::Tunnel => "tunnel",
            Alpn::Join => "join",
        }
    }
}
