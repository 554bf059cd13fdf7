//! The key schema of a node's gossip state.
//!
//! | key | value |
//! |---|---|
//! | `node` | [`NodeInfo`] |
//! | `svc:<name>:<port>` | [`ServiceRecord`] |
//! | `chk:<name>:<port>` | [`CheckRecord`]: the check output that made the instance's health, and since when |
//! | `leaving` | `"1"` once the node leaves gracefully |
//! | `role:ca` | `"1"` on nodes that hold the CA key (they sign joins and renewals) |
//! | `rev:<id>` | a CA-signed revocation (base64), re-published by every node that verified it |
//! | `suspect` | the members this node's probes found silent ([`Accusation`](crate::swim::Accusation)s) |
//! | `alive` | a counter the node bumps to refute an accusation of itself |
//! | `wan:<cluster>:<service>` | gateways only: a [`RemoteService`](crate::federation::RemoteService) of another cluster |
//!
//! In the WAN pool a gateway publishes `node` and, per service of its cluster,
//! `sum:<service>` with a [`ServiceSummary`](crate::federation::ServiceSummary);
//! while its cluster has a live CA node, also `ca_via` with a [`CaVia`]: that
//! node's `role:ca` proof, so gateways of clusters without a CA node relay
//! joins and renewals to it (through this gateway).
//!
//! Values are base64 of the bincode [`codec`] encoding
//! of a versioned enum. Keys stay ASCII (chitchat slices key bytes) and values
//! stay under [`MAX_VALUE_LEN`]: a chitchat value above ~65 KB is never sent and
//! blocks every later update of its node.

use std::fmt;
use std::net::SocketAddr;

use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use base64::Engine;
use meshnode_transport::codec;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

pub const NODE_KEY: &str = "node";
pub const LEAVING_KEY: &str = "leaving";
pub const SERVICE_PREFIX: &str = "svc:";
/// `chk:<name>:<port>`: a [`CheckRecord`] (a key of its own, so nodes
/// without it still read the service records).
pub const CHECK_PREFIX: &str = "chk:";
/// Longest check output kept and gossiped.
pub const MAX_CHECK_OUTPUT: usize = 256;
/// Roles a node announces besides [`NodeInfo`]: `role:ca` on nodes holding the CA key.
pub const ROLE_PREFIX: &str = "role:";
pub const CA_ROLE_KEY: &str = "role:ca";
/// WAN pool: a gateway fronts a CA node of its cluster ([`CaVia`]). Not under
/// `role:`, which older gates refuse as an unknown role.
pub const CA_VIA_KEY: &str = "ca_via";
/// `rev:<id>`: a CA-signed revocation, re-published by every node that verified it.
pub const REVOCATION_PREFIX: &str = "rev:";
/// This node's accusations, each naming the accused's incarnation (see
/// [`crate::swim`]).
pub const ACCUSE_KEY: &str = "accuse";
/// Accusations in the earlier shape, naming the accused's state version.
/// No longer published; read only to refute those naming this node, so a
/// pool mixing both shapes does not declare a live new node dead.
pub const SUSPECT_KEY: &str = "suspect";
/// The node's incarnation: a counter raised only to refute an accusation.
pub const ALIVE_KEY: &str = "alive";
/// Cap on one encoded value.
pub const MAX_VALUE_LEN: usize = 8 * 1024;

/// What a node says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub cluster: String,
    /// The node's QUIC address (gossip and tunnels).
    pub advertise: SocketAddr,
    pub gateway: bool,
    /// meshnode version of the node.
    pub version: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    /// HTTP/1.1.
    Http,
    /// HTTP/2 without TLS (prior knowledge, h2c), as gRPC servers speak it.
    Http2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Passing,
    Warning,
    Critical,
}

/// One service instance hosted by the publishing node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub name: String,
    /// Address of the application on its node (usually loopback).
    pub address: String,
    pub port: u16,
    pub protocol: Protocol,
    pub tags: Vec<String>,
    pub health: Health,
}

/// Why an instance has its health: the check's output when it entered
/// that health (published on each change, not on every probe).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRecord {
    /// `ok`, or why the check failed (at most [`MAX_CHECK_OUTPUT`] bytes).
    pub output: String,
    /// Unix seconds: when the instance entered its current health.
    pub since: i64,
}

/// A gateway's claim that a CA node of its own cluster is live: the CA
/// node's identity and the CA's signature over it (its `role:ca` proof), so
/// the claim is only as good as a real CA node of that cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaVia {
    /// The CA node's SPIFFE identity.
    pub node: String,
    /// The `role:ca` payload of that node (base64 of the CA's signature).
    pub proof: String,
}

#[derive(Serialize, Deserialize)]
enum WireCaVia {
    V1(CaVia),
}

pub fn encode_ca_via(v: &CaVia) -> Result<String, KeyError> {
    encode(&WireCaVia::V1(v.clone()))
}

pub fn decode_ca_via(s: &str) -> Result<CaVia, KeyError> {
    let WireCaVia::V1(v) = decode(s)?;
    Ok(v)
}

#[derive(Serialize, Deserialize)]
enum WireCheck {
    V1(CheckRecord),
}

pub fn check_key(name: &str, port: u16) -> String {
    format!("{CHECK_PREFIX}{name}:{port}")
}

pub fn encode_check(rec: &CheckRecord) -> Result<String, KeyError> {
    encode(&WireCheck::V1(rec.clone()))
}

pub fn decode_check(s: &str) -> Result<CheckRecord, KeyError> {
    let WireCheck::V1(rec) = decode(s)?;
    Ok(rec)
}

/// `s` cut to at most [`MAX_CHECK_OUTPUT`] bytes on a character boundary.
pub fn clip_output(s: &str) -> String {
    if s.len() <= MAX_CHECK_OUTPUT {
        return s.to_string();
    }
    let mut end = MAX_CHECK_OUTPUT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[derive(Serialize, Deserialize)]
enum WireNode {
    V1(NodeInfo),
}

#[derive(Serialize, Deserialize)]
enum WireService {
    V1(ServiceRecord),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("value is {0} bytes encoded, over the {MAX_VALUE_LEN}-byte cap")]
    TooLarge(usize),
    #[error("not base64: {0}")]
    Base64(String),
    #[error(transparent)]
    Codec(#[from] codec::CodecError),
}

// === impl Protocol / Health ===

impl Protocol {
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
        }
    }
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl ServiceRecord ===

impl ServiceRecord {
    pub fn key(&self) -> String {
        service_key(&self.name, self.port)
    }
}

pub fn service_key(name: &str, port: u16) -> String {
    format!("{SERVICE_PREFIX}{name}:{port}")
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<String, KeyError> {
    let s = B64.encode(codec::encode(v)?);
    if s.len() > MAX_VALUE_LEN {
        return Err(KeyError::TooLarge(s.len()));
    }
    Ok(s)
}

pub(crate) fn decode<T: DeserializeOwned>(s: &str) -> Result<T, KeyError> {
    if s.len() > MAX_VALUE_LEN {
        return Err(KeyError::TooLarge(s.len()));
    }
    let bytes = B64
        .decode(s.as_bytes())
        .map_err(|e| KeyError::Base64(e.to_string()))?;
    Ok(codec::decode(&bytes)?)
}

#[derive(Serialize, Deserialize)]
enum WireAccusations {
    V1(Vec<crate::swim::Accusation>),
}

pub fn encode_accusations(list: &[crate::swim::Accusation]) -> Result<String, KeyError> {
    encode(&WireAccusations::V1(list.to_vec()))
}

/// At most [`MAX_ACCUSATIONS`](crate::swim::MAX_ACCUSATIONS) accusations, or an error.
pub fn decode_accusations(s: &str) -> Result<Vec<crate::swim::Accusation>, KeyError> {
    let WireAccusations::V1(list) = decode(s)?;
    if list.len() > crate::swim::MAX_ACCUSATIONS {
        return Err(KeyError::TooLarge(s.len()));
    }
    Ok(list)
}

pub fn encode_node(info: &NodeInfo) -> Result<String, KeyError> {
    encode(&WireNode::V1(info.clone()))
}

pub fn decode_node(s: &str) -> Result<NodeInfo, KeyError> {
    let WireNode::V1(info) = decode(s)?;
    Ok(info)
}

pub fn encode_service(rec: &ServiceRecord) -> Result<String, KeyError> {
    encode(&WireService::V1(rec.clone()))
}

pub fn decode_service(s: &str) -> Result<ServiceRecord, KeyError> {
    let WireService::V1(rec) = decode(s)?;
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    pub(crate) fn record(name: &str, port: u16) -> ServiceRecord {
        ServiceRecord {
            name: name.into(),
            address: "127.0.0.1".into(),
            port,
            protocol: Protocol::Tcp,
            tags: vec!["version=v1".into()],
            health: Health::Passing,
        }
    }

    #[test]
    fn round_trips() {
        let info = NodeInfo {
            cluster: "east".into(),
            advertise: "127.0.0.2:9470".parse().unwrap(),
            gateway: false,
            version: "0.1.0".into(),
        };
        assert_eq!(decode_node(&encode_node(&info).unwrap()).unwrap(), info);
        let rec = record("api", 8080);
        assert_eq!(decode_service(&encode_service(&rec).unwrap()).unwrap(), rec);
        assert_eq!(rec.key(), "svc:api:8080");
    }

    #[test]
    fn oversized_record_is_refused() {
        let mut rec = record("api", 1);
        rec.tags = vec!["t".repeat(MAX_VALUE_LEN)];
        assert!(matches!(encode_service(&rec), Err(KeyError::TooLarge(_))));
    }

    proptest! {
        #[test]
        fn garbage_values_never_panic(s in ".{0,300}") {
            let _ = decode_service(&s);
            let _ = decode_node(&s);
        }
    }
}
