//! Revocations: entries signed by the mesh CA, spread by gossip, persisted by
//! every node, and checked by both TLS verifiers.
//!
//! An entry revokes public keys (by [`PeerCert::key_id`], so a certificate
//! re-issued for the same key is refused too) and, optionally, a whole
//! identity: every certificate of that SPIFFE ID whose `notBefore` is not
//! after the revocation time. The CA never issues a certificate for that
//! identity that predates the revocation, so the name can be used again.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Ca, Identity, PeerCert, PkiError};
use crate::codec;

/// What a revocation says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub mesh: String,
    /// Revokes every certificate of this identity with `notBefore <= revoked_at`.
    pub identity: Option<Identity>,
    /// Key ids (hex SHA-256 of the SubjectPublicKeyInfo).
    pub keys: Vec<String>,
    /// Serial numbers (hex) of the certificates the CA knew for these keys; informative.
    pub serials: Vec<String>,
    /// Unix seconds.
    pub revoked_at: i64,
    /// Unix seconds after which no certificate it covers can still be valid;
    /// the entry is dropped then.
    pub expires: i64,
    pub reason: String,
}

#[derive(Serialize, Deserialize)]
enum Wire {
    V1 { body: Vec<u8>, sig: Vec<u8> },
}

/// A revocation with the CA's signature over its encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedRevocation {
    body: Vec<u8>,
    sig: Vec<u8>,
    pub revocation: Revocation,
}

#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("revocation entry is malformed: {0}")]
    Malformed(String),
    #[error("revocation entry is not signed by this mesh's CA")]
    BadSignature,
    #[error("revocation entry is for mesh {0:?}, not this one")]
    OtherMesh(String),
    #[error("the CA key type cannot sign revocations: {0}")]
    KeyType(String),
    #[error(transparent)]
    Pki(#[from] PkiError),
}

// === impl SignedRevocation ===

impl SignedRevocation {
    pub fn sign(ca: &Ca, revocation: Revocation) -> Result<Self, RevocationError> {
        let body =
            codec::encode(&revocation).map_err(|e| RevocationError::Malformed(e.to_string()))?;
        let sig = ca.sign(&body)?;
        Ok(Self {
            body,
            sig,
            revocation,
        })
    }

    /// Decodes the text form (base64) and verifies the signature against the CA certificate (DER).
    pub fn verify(text: &str, ca_der: &[u8], mesh: &str) -> Result<Self, RevocationError> {
        if text.len() > 16 * 1024 {
            return Err(RevocationError::Malformed("too long".into()));
        }
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|e| RevocationError::Malformed(e.to_string()))?;
        let Wire::V1 { body, sig } =
            codec::decode(&bytes).map_err(|e| RevocationError::Malformed(e.to_string()))?;
        verify_signature(ca_der, &body, &sig)?;
        let revocation: Revocation =
            codec::decode(&body).map_err(|e| RevocationError::Malformed(e.to_string()))?;
        if revocation.mesh != mesh {
            return Err(RevocationError::OtherMesh(revocation.mesh));
        }
        Ok(Self {
            body,
            sig,
            revocation,
        })
    }

    /// The text form: base64 of the versioned wire encoding.
    pub fn to_text(&self) -> String {
        let wire = Wire::V1 {
            body: self.body.clone(),
            sig: self.sig.clone(),
        };
        // Bodies are small (a few keys); encoding a Vec pair cannot exceed the limit.
        STANDARD.encode(codec::encode(&wire).unwrap_or_default())
    }

    /// A short stable id: the gossip key suffix and the store's key.
    pub fn id(&self) -> String {
        super::hex(&super::sha256(&self.body)[..8])
    }
}

fn verify_signature(ca_der: &[u8], body: &[u8], sig: &[u8]) -> Result<(), RevocationError> {
    use super::sign::{verify_ca_signature, CaSignatureError};
    verify_ca_signature(ca_der, body, sig).map_err(|e| match e {
        CaSignatureError::Certificate(m) => {
            RevocationError::Malformed(format!("CA certificate: {m}"))
        }
        CaSignatureError::KeyType(t) => RevocationError::KeyType(t),
        CaSignatureError::BadSignature => RevocationError::BadSignature,
    })
}

/// The revocations in force, shared by the verifiers and the connection
/// tracker. Every change bumps a watch so live connections are re-checked.
pub struct RevocationSet {
    state: RwLock<State>,
    changed: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    entries: BTreeMap<String, SignedRevocation>,
    /// Key id -> the earliest revocation time that lists it.
    keys: HashMap<String, i64>,
    identities: HashMap<Identity, i64>,
}

impl Default for RevocationSet {
    fn default() -> Self {
        Self {
            state: RwLock::new(State::default()),
            changed: watch::channel(0).0,
        }
    }
}

impl RevocationSet {
    /// Adds an entry (verified by the caller). Returns false if it was known
    /// or has expired at `now`.
    pub fn insert(&self, entry: SignedRevocation, now: i64) -> bool {
        if entry.revocation.expires <= now {
            return false;
        }
        let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
        let id = entry.id();
        if s.entries.contains_key(&id) {
            return false;
        }
        s.entries.insert(id, entry);
        s.rebuild();
        drop(s);
        self.changed.send_modify(|v| *v += 1);
        true
    }

    /// Drops expired entries; returns how many went.
    pub fn prune(&self, now: i64) -> usize {
        let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
        let before = s.entries.len();
        s.entries.retain(|_, e| e.revocation.expires > now);
        let gone = before - s.entries.len();
        if gone > 0 {
            s.rebuild();
        }
        gone
    }

    pub fn is_revoked(&self, peer: &PeerCert) -> bool {
        let s = self.state.read().unwrap_or_else(|e| e.into_inner());
        s.keys.contains_key(&peer.key_id)
            || s.identities
                .get(&peer.identity)
                .is_some_and(|at| peer.not_before <= *at)
    }

    /// The latest revocation time of `identity`, for the CA's `notBefore` floor.
    pub fn identity_revoked_at(&self, identity: &Identity) -> Option<i64> {
        let s = self.state.read().unwrap_or_else(|e| e.into_inner());
        s.identities.get(identity).copied()
    }

    /// When a key (hex SHA-256 of its SPKI) was first revoked: what an
    /// operator's key signed before that time stays valid.
    pub fn key_revoked_at(&self, key_id: &str) -> Option<i64> {
        let s = self.state.read().unwrap_or_else(|e| e.into_inner());
        s.keys.get(key_id).copied()
    }

    pub fn entries(&self) -> Vec<SignedRevocation> {
        let s = self.state.read().unwrap_or_else(|e| e.into_inner());
        s.entries.values().cloned().collect()
    }

    pub fn contains(&self, id: &str) -> bool {
        let s = self.state.read().unwrap_or_else(|e| e.into_inner());
        s.entries.contains_key(id)
    }

    pub fn len(&self) -> usize {
        let s = self.state.read().unwrap_or_else(|e| e.into_inner());
        s.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fires on every insert.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

impl State {
    fn rebuild(&mut self) {
        self.keys.clear();
        self.identities.clear();
        for e in self.entries.values() {
            let r = &e.revocation;
            for k in &r.keys {
                let at = self.keys.entry(k.clone()).or_insert(r.revoked_at);
                *at = (*at).min(r.revoked_at);
            }
            if let Some(id) = &r.identity {
                let at = self.identities.entry(id.clone()).or_insert(r.revoked_at);
                *at = (*at).max(r.revoked_at);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::pki::files::parse_certs;
    use crate::pki::Role;

    fn setup() -> (Ca, Vec<u8>, PeerCert) {
        let ca = Ca::generate("acme", Duration::from_secs(3600)).unwrap();
        let der = parse_certs("t", ca.cert_pem()).unwrap().remove(0).to_vec();
        let node = ca
            .issue("east", "vm-1", Role::Node, Duration::from_secs(600))
            .unwrap();
        let peer = PeerCert::from_der(&parse_certs("t", &node.cert_pem).unwrap()[0]).unwrap();
        (ca, der, peer)
    }

    fn rev(keys: Vec<String>, identity: Option<Identity>, at: i64) -> Revocation {
        Revocation {
            mesh: "acme".into(),
            identity,
            keys,
            serials: vec![],
            revoked_at: at,
            expires: at + 3600,
            reason: "test".into(),
        }
    }

    #[test]
    fn signed_entry_round_trips_and_matches_key() {
        let (ca, der, peer) = setup();
        let now = peer.not_before + 10;
        let signed =
            SignedRevocation::sign(&ca, rev(vec![peer.key_id.clone()], None, now)).unwrap();
        let back = SignedRevocation::verify(&signed.to_text(), &der, "acme").unwrap();
        assert_eq!(back, signed);
        let set = RevocationSet::default();
        let rx = set.subscribe();
        assert!(!set.is_revoked(&peer));
        assert!(set.insert(back.clone(), now));
        assert!(!set.insert(back, now), "known entries are not re-added");
        assert!(rx.has_changed().unwrap());
        assert!(set.is_revoked(&peer));
        assert_eq!(set.prune(now + 7200), 1);
        assert!(!set.is_revoked(&peer));
    }

    #[test]
    fn identity_revocation_spares_later_certificates() {
        let (_, _, peer) = setup();
        let set = RevocationSet::default();
        let e = SignedRevocation {
            body: vec![1],
            sig: vec![],
            revocation: rev(vec![], Some(peer.identity.clone()), peer.not_before),
        };
        assert!(set.insert(e, peer.not_before));
        assert!(set.is_revoked(&peer));
        let later = PeerCert {
            not_before: peer.not_before + 1,
            key_id: "other".into(),
            ..peer.clone()
        };
        assert!(!set.is_revoked(&later));
        assert_eq!(
            set.identity_revoked_at(&peer.identity),
            Some(peer.not_before)
        );
    }

    #[test]
    fn forged_or_foreign_entries_are_refused() {
        let (ca, der, peer) = setup();
        let other = Ca::generate("acme", Duration::from_secs(3600)).unwrap();
        let forged =
            SignedRevocation::sign(&other, rev(vec![peer.key_id.clone()], None, 1)).unwrap();
        assert!(matches!(
            SignedRevocation::verify(&forged.to_text(), &der, "acme"),
            Err(RevocationError::BadSignature)
        ));
        let mut foreign = rev(vec![], None, 1);
        foreign.mesh = "globex".into();
        let foreign = SignedRevocation::sign(&ca, foreign).unwrap();
        assert!(matches!(
            SignedRevocation::verify(&foreign.to_text(), &der, "acme"),
            Err(RevocationError::OtherMesh(_))
        ));
        // A body swapped under a valid signature.
        let good = SignedRevocation::sign(&ca, rev(vec!["a".into()], None, 1)).unwrap();
        let swapped = SignedRevocation {
            body: codec::encode(&rev(vec!["b".into()], None, 1)).unwrap(),
            ..good
        };
        assert!(matches!(
            SignedRevocation::verify(&swapped.to_text(), &der, "acme"),
            Err(RevocationError::BadSignature)
        ));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(s in ".{0,300}", b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let (_, der, _) = setup();
            let _ = SignedRevocation::verify(&s, &der, "acme");
            let _ = SignedRevocation::verify(&STANDARD.encode(&b), &der, "acme");
        }
    }
}
