//! ALPN protocol ids: one QUIC port carries several protocols, told apart at the handshake.

/// The chitchat gossip pool: one uni stream per gossip message.
pub const GOSSIP: &[u8] = b"meshnode-gossip/1";
/// The gossip pool with zstd-compressed frames. Newer nodes offer and prefer
/// it; a node that knows only `/1` still gets `/1`, so versions can mix.
pub const GOSSIP_V2: &[u8] = b"meshnode-gossip/2";
/// The gossip pool with zstd frames primed by the pool's dictionary (its id
/// and node-id prefix, which every message repeats). Preferred over `/2`.
pub const GOSSIP_V3: &[u8] = b"meshnode-gossip/3";
/// The WAN pool of all gateways of the mesh; only gateway certificates may join.
pub const WAN_GOSSIP: &[u8] = b"meshnode-wan/1";
/// The WAN pool with zstd-compressed frames.
pub const WAN_GOSSIP_V2: &[u8] = b"meshnode-wan/2";
/// The WAN pool with zstd frames primed by the pool's dictionary.
pub const WAN_GOSSIP_V3: &[u8] = b"meshnode-wan/3";
/// Proxied connections: one bidi stream per TCP connection.
pub const TUNNEL: &[u8] = b"meshnode-tunnel/1";
/// The join handshake of a new machine.
pub const JOIN: &[u8] = b"meshnode-join/1";
/// The end-to-end TLS session a caller runs with the destination node
/// inside a cross-cluster tunnel stream (not a QUIC protocol: never offered
/// on the endpoint).
pub const E2E: &[u8] = b"meshnode-e2e/1";

/// The protocols a node serves, in its order of preference (rustls picks the
/// first of these that the client offers).
pub const ALL: [&[u8]; 8] = [
    GOSSIP_V3,
    GOSSIP_V2,
    GOSSIP,
    WAN_GOSSIP_V3,
    WAN_GOSSIP_V2,
    WAN_GOSSIP,
    TUNNEL,
    JOIN,
];

/// How a negotiated gossip protocol frames its messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// chitchat's bytes as they are (`/1`, and anything not gossip).
    Raw,
    /// One zstd frame per message (`/2`).
    Zstd,
    /// One zstd frame per message, primed with the pool's dictionary (`/3`).
    PoolDictionary,
}

/// The framing of a negotiated protocol.
pub fn framing(negotiated: &[u8]) -> Framing {
    match negotiated {
        GOSSIP_V3 | WAN_GOSSIP_V3 => Framing::PoolDictionary,
        GOSSIP_V2 | WAN_GOSSIP_V2 => Framing::Zstd,
        _ => Framing::Raw,
    }
}

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

    /// What a client dialling for this protocol offers, newest version first.
    pub fn offers(self) -> &'static [&'static [u8]] {
        match self {
            Alpn::Gossip => &[GOSSIP_V3, GOSSIP_V2, GOSSIP],
            Alpn::WanGossip => &[WAN_GOSSIP_V3, WAN_GOSSIP_V2, WAN_GOSSIP],
            Alpn::Tunnel => &[TUNNEL],
            Alpn::Join => &[JOIN],
        }
    }

    /// The protocol of a negotiated ALPN id, whatever its version.
    pub fn from_bytes(b: &[u8]) -> Option<Alpn> {
        match b {
            GOSSIP | GOSSIP_V2 | GOSSIP_V3 => Some(Alpn::Gossip),
            WAN_GOSSIP | WAN_GOSSIP_V2 | WAN_GOSSIP_V3 => Some(Alpn::WanGossip),
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
