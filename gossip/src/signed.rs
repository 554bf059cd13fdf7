//! Signed gossip values: every value a node publishes carries its node key's
//! signature over the pool, the node's identity and generation, the key, the
//! chitchat version the value is published at, and the payload.
//!
//! A value on the wire is `<payload>.<base64 signature>`: payloads are
//! base64 (or `1`), which never contains `.`. The version in the signature is
//! chitchat's own per-node counter, so an old value cannot be replayed under
//! a newer version, and a value cannot move to another node, generation, key
//! or pool. An empty payload is a tombstone: chitchat's `delete` empties a
//! value, which could carry no signature, so meshnode never deletes.

use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use base64::Engine;

/// The key under which a node publishes its certificate (base64 DER), first
/// of all its keys, so a peer can check every other value without a round trip.
pub const CERT_KEY: &str = "cert";
const DOMAIN: &[u8] = b"meshnode-gossip-value/1\0";
const CA_ROLE_DOMAIN: &[u8] = b"meshnode-ca-role/1\0";
/// A P-256 signature is 64 bytes, 86 in base64 without padding.
const SIG_B64_LEN: usize = 86;

/// What a value's signature covers, length-prefixed field by field.
pub fn signing_input(
    pool: &str,
    node_id: &str,
    generation: u64,
    key: &str,
    version: u64,
    payload: &str,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(
        DOMAIN.len() + pool.len() + node_id.len() + key.len() + payload.len() + 40,
    );
    m.extend_from_slice(DOMAIN);
    for field in [pool, node_id] {
        m.extend_from_slice(&(field.len() as u32).to_be_bytes());
        m.extend_from_slice(field.as_bytes());
    }
    m.extend_from_slice(&generation.to_be_bytes());
    m.extend_from_slice(&(key.len() as u32).to_be_bytes());
    m.extend_from_slice(key.as_bytes());
    m.extend_from_slice(&version.to_be_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    m.extend_from_slice(payload.as_bytes());
    m
}

const PROBE_DOMAIN: &[u8] = b"meshnode-probe-ack/1\0";

/// What a probe target signs when a helper pings it on `origin`'s behalf:
/// proof for `origin` that `target` (this generation) answered this very
/// probe, so a helper cannot answer for a dead target.
pub fn probe_input(pool: &str, target: &str, generation: u64, origin: &str, nonce: u64) -> Vec<u8> {
    let mut m =
        Vec::with_capacity(PROBE_DOMAIN.len() + pool.len() + target.len() + origin.len() + 28);
    m.extend_from_slice(PROBE_DOMAIN);
    for field in [pool, target, origin] {
        m.extend_from_slice(&(field.len() as u32).to_be_bytes());
        m.extend_from_slice(field.as_bytes());
    }
    m.extend_from_slice(&generation.to_be_bytes());
    m.extend_from_slice(&nonce.to_be_bytes());
    m
}

/// The value as published: payload and signature.
pub fn seal(payload: &str, sig: &[u8]) -> String {
    format!("{payload}.{}", B64.encode(sig))
}

/// Splits a published value into payload and signature bytes.
pub fn open(value: &str) -> Option<(&str, Vec<u8>)> {
    let (payload, sig) = value.rsplit_once('.')?;
    if sig.len() != SIG_B64_LEN {
        return None;
    }
    Some((payload, B64.decode(sig).ok()?))
}

/// The payload of a value already checked (or our own); `None` for a
/// tombstone or a value without a signature.
pub fn payload(value: &str) -> Option<&str> {
    let (payload, _) = value.rsplit_once('.')?;
    (!payload.is_empty()).then_some(payload)
}

/// The payload of a published value, empty for a tombstone; a value without
/// a signature is taken whole (only our own state is read this way).
pub fn raw_payload(value: &str) -> &str {
    value.rsplit_once('.').map_or(value, |(p, _)| p)
}

/// What the CA key signs to make a node a CA node (`role:ca`).
pub fn ca_role_input(node_id: &str) -> Vec<u8> {
    let mut m = CA_ROLE_DOMAIN.to_vec();
    m.extend_from_slice(node_id.as_bytes());
    m
}

/// The `role:ca` payload: the CA's signature, base64.
pub fn encode_ca_proof(sig: &[u8]) -> String {
    B64.encode(sig)
}

pub fn decode_ca_proof(payload: &str) -> Option<Vec<u8>> {
    if payload.len() > 256 {
        return None;
    }
    B64.decode(payload).ok()
}

pub fn encode_cert(der: &[u8]) -> String {
    B64.encode(der)
}

pub fn decode_cert(payload: &str) -> Option<Vec<u8>> {
    B64.decode(payload).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_and_open_round_trip_and_fields_are_unambiguous() {
        let sig = [7u8; 64];
        let v = seal("QUJD", &sig);
        assert_eq!(open(&v), Some(("QUJD", sig.to_vec())));
        assert_eq!(payload(&v), Some("QUJD"));
        assert_eq!(payload(&seal("", &sig)), None);
        assert_eq!(open("QUJD"), None);
        assert_eq!(open("QUJD.short"), None);
        // Moving bytes between fields changes the input.
        assert_ne!(
            signing_input("p", "ab", 1, "k", 1, "v"),
            signing_input("p", "a", 1, "bk", 1, "v")
        );
    }
}
