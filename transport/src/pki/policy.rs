//! Signed policy documents: the envelope, its signature and the checks every
//! node runs before it adopts one. What a document *says* (its TOML schema)
//! is the agent's business (`meshnode_node::policy`); this module only binds
//! the text to a kind, a name, a version, a signing time and a signer.
//!
//! A document is signed by an operator certificate
//! (`spiffe://<mesh>/operator/<name>`, carried in the envelope) or by the CA
//! key. It is adopted if the signature checks out, the operator certificate
//! chained to the mesh CA *at the signing time* (so a document outlives its
//! signer's certificate if it was signed within that certificate's
//! validity), the signing time is not in the future, and the signer's key
//! was not revoked at or before the signing time.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::operator::OperatorCert;
use super::sign::{verify_node_signature, NodeSigner};
use super::{Ca, PkiError};
use crate::codec;

/// The kinds of document the mesh knows.
pub const KINDS: [&str; 4] = ["intentions", "routes", "resilience", "defaults"];
/// The longest text form (base64), so the gossip value holding it stays
/// within the 8 KiB value cap of meshnode's key schema.
pub const MAX_TEXT_LEN: usize = 8 * 1024;
/// How far in the future a signing time may be (clock skew).
pub const MAX_SKEW_SECS: i64 = 300;
const DOMAIN: &[u8] = b"meshnode-policy-v1\0";

/// What the signature binds besides the source text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocHeader {
    pub mesh: String,
    pub kind: String,
    pub name: String,
    /// Higher wins; ties go to the later `signed_at`, then the higher digest.
    pub version: u64,
    /// Unix seconds.
    pub signed_at: i64,
    /// A tombstone: the document is withdrawn (`source` is empty).
    pub deleted: bool,
}

#[derive(Serialize, Deserialize)]
struct Body {
    header: DocHeader,
    source: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum SignerWire {
    Ca,
    /// The operator certificate (DER).
    Operator(Vec<u8>),
}

#[derive(Serialize, Deserialize)]
enum Wire {
    V1 {
        body: Vec<u8>,
        signer: SignerWire,
        sig: Vec<u8>,
    },
}

/// Who signed a verified document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Signer {
    Ca,
    Operator(OperatorCert),
}

/// A document with its signature; [`SignedDocument::verify`] is the only
/// way to get one from bytes.
#[derive(Clone, Debug)]
pub struct SignedDocument {
    pub header: DocHeader,
    /// The TOML text as the operator wrote it (empty for a tombstone).
    pub source: String,
    pub signer: Signer,
    digest: [u8; 32],
    text: String,
}

/// Why a document was refused; [`PolicyError::reason`] is the metric label.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("the document is malformed: {0}")]
    Malformed(String),
    #[error(
        "the signed document is {0} bytes, over the {MAX_TEXT_LEN}-byte limit of one gossip value: split it or shorten it"
    )]
    TooLarge(usize),
    #[error("the document is for mesh {0:?}, not this one")]
    OtherMesh(String),
    #[error("the signature does not match the document")]
    BadSignature,
    #[error("the signer is not an operator of this mesh: {0}")]
    NotOperator(String),
    #[error("the signer's certificate does not chain to the mesh CA: {0}")]
    UnknownCa(String),
    #[error("the document was signed outside its signer's certificate validity: {0}")]
    ExpiredSigner(String),
    #[error("the signer's key was revoked at {revoked_at}, before the signing time {signed_at}")]
    RevokedSigner { revoked_at: i64, signed_at: i64 },
    #[error("the document is signed {0} s in the future")]
    Future(i64),
    #[error("{0}")]
    Pki(String),
}

impl From<PkiError> for PolicyError {
    fn from(e: PkiError) -> Self {
        PolicyError::Pki(e.to_string())
    }
}

impl PolicyError {
    pub fn reason(&self) -> &'static str {
        match self {
            PolicyError::Malformed(_) | PolicyError::Pki(_) => "malformed",
            PolicyError::TooLarge(_) => "too_large",
            PolicyError::OtherMesh(_) => "other_mesh",
            PolicyError::BadSignature => "bad_signature",
            PolicyError::NotOperator(_) => "not_operator",
            PolicyError::UnknownCa(_) => "unknown_ca",
            PolicyError::ExpiredSigner(_) => "expired_signer",
            PolicyError::RevokedSigner { .. } => "revoked_signer",
            PolicyError::Future(_) => "future",
        }
    }
}

/// What a verifier trusts: the mesh, its CA and its revocations.
pub trait PolicyTrust {
    fn mesh(&self) -> &str;
    /// Whether `sig` is the CA key's signature over `msg`.
    fn verify_ca(&self, msg: &[u8], sig: &[u8]) -> bool;
    /// Chain of an operator certificate (DER) to the mesh CA, with the
    /// clientAuth usage, as of `at` (Unix seconds). `Err((expired, detail))`.
    fn verify_operator_chain(&self, der: &[u8], at: i64) -> Result<(), (bool, String)>;
    /// When the key was revoked, if it was.
    fn key_revoked_at(&self, key_id: &str) -> Option<i64>;
}

/// The private half that signs: an operator's key and certificate, or the CA.
#[allow(clippy::large_enum_variant)] // one per command, never in a collection
pub enum SigningKey<'a> {
    Ca(&'a Ca),
    Operator { cert_der: Vec<u8>, key: NodeSigner },
}

impl SignedDocument {
    /// Signs `source` under `header`. Refuses what would not fit in one gossip value.
    pub fn sign(
        key: &SigningKey<'_>,
        header: DocHeader,
        source: String,
    ) -> Result<Self, PolicyError> {
        let body = codec::encode(&Body {
            header: header.clone(),
            source: source.clone(),
        })
        .map_err(|e| PolicyError::Malformed(e.to_string()))?;
        let msg = [DOMAIN, &body].concat();
        let (signer_wire, signer, sig) = match key {
            SigningKey::Ca(ca) => (SignerWire::Ca, Signer::Ca, ca.sign(&msg)?),
            SigningKey::Operator { cert_der, key } => {
                let cert = OperatorCert::from_der(cert_der)
                    .map_err(|e| PolicyError::NotOperator(e.to_string()))?;
                if cert.public_key != key.public_key() {
                    return Err(PolicyError::NotOperator(
                        "the key is not the operator certificate's".into(),
                    ));
                }
                (
                    SignerWire::Operator(cert_der.clone()),
                    Signer::Operator(cert),
                    key.sign(&msg)?,
                )
            }
        };
        let wire = Wire::V1 {
            body: body.clone(),
            signer: signer_wire,
            sig,
        };
        let bytes = codec::encode(&wire).map_err(|e| PolicyError::Malformed(e.to_string()))?;
        let text = STANDARD.encode(bytes);
        if text.len() > MAX_TEXT_LEN {
            return Err(PolicyError::TooLarge(text.len()));
        }
        Ok(Self {
            header,
            source,
            signer,
            digest: super::sha256(&body),
            text,
        })
    }

    /// The text form of a document signed with any certificate's key, with
    /// no check of the certificate: what an insider holding a node key could
    /// produce. For tests of the verifier (it refuses these as `not_operator`).
    pub fn sign_unchecked(
        cert_der: &[u8],
        key: &NodeSigner,
        header: DocHeader,
        source: String,
    ) -> Result<String, PolicyError> {
        let body = codec::encode(&Body { header, source })
            .map_err(|e| PolicyError::Malformed(e.to_string()))?;
        let sig = key.sign(&[DOMAIN, &body].concat())?;
        let wire = Wire::V1 {
            body,
            signer: SignerWire::Operator(cert_der.to_vec()),
            sig,
        };
        let bytes = codec::encode(&wire).map_err(|e| PolicyError::Malformed(e.to_string()))?;
        Ok(STANDARD.encode(bytes))
    }

    /// Decodes the text form and runs every check against `trust` at `now`
    /// (Unix seconds). The schema of `source` is the caller's to check.
    pub fn verify(text: &str, trust: &dyn PolicyTrust, now: i64) -> Result<Self, PolicyError> {
        let text = text.trim();
        if text.len() > MAX_TEXT_LEN {
            return Err(PolicyError::TooLarge(text.len()));
        }
        let bytes = STANDARD
            .decode(text)
            .map_err(|e| PolicyError::Malformed(e.to_string()))?;
        let Wire::V1 { body, signer, sig } =
            codec::decode(&bytes).map_err(|e| PolicyError::Malformed(e.to_string()))?;
        let Body { header, source } =
            codec::decode(&body).map_err(|e| PolicyError::Malformed(e.to_string()))?;
        if header.mesh != trust.mesh() {
            return Err(PolicyError::OtherMesh(header.mesh));
        }
        if !KINDS.contains(&header.kind.as_str()) {
            return Err(PolicyError::Malformed(format!(
                "unknown kind {:?}",
                header.kind
            )));
        }
        if header.deleted && !source.is_empty() {
            return Err(PolicyError::Malformed("a tombstone carries text".into()));
        }
        let msg = [DOMAIN, &body].concat();
        let signer = match signer {
            SignerWire::Ca => {
                if !trust.verify_ca(&msg, &sig) {
                    return Err(PolicyError::BadSignature);
                }
                Signer::Ca
            }
            SignerWire::Operator(der) => {
                let cert = OperatorCert::from_der(&der)
                    .map_err(|e| PolicyError::NotOperator(e.to_string()))?;
                if cert.mesh != trust.mesh() {
                    return Err(PolicyError::NotOperator(format!(
                        "{} is of another mesh",
                        cert.uri()
                    )));
                }
                if !verify_node_signature(&cert.public_key, &msg, &sig) {
                    return Err(PolicyError::BadSignature);
                }
                trust
                    .verify_operator_chain(&der, header.signed_at)
                    .map_err(|(expired, detail)| {
                        if expired {
                            PolicyError::ExpiredSigner(detail)
                        } else {
                            PolicyError::UnknownCa(detail)
                        }
                    })?;
                if let Some(revoked_at) = trust.key_revoked_at(&cert.key_id) {
                    if revoked_at <= header.signed_at {
                        return Err(PolicyError::RevokedSigner {
                            revoked_at,
                            signed_at: header.signed_at,
                        });
                    }
                }
                Signer::Operator(cert)
            }
        };
        if header.signed_at > now + MAX_SKEW_SECS {
            return Err(PolicyError::Future(header.signed_at - now));
        }
        Ok(Self {
            header,
            source,
            signer,
            digest: super::sha256(&body),
            text: text.to_string(),
        })
    }

    /// The text form (base64): what gossip carries and the data dir keeps.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// `(kind, name)`.
    pub fn key(&self) -> (String, String) {
        (self.header.kind.clone(), self.header.name.clone())
    }

    /// Total order of the versions of one document: version, then signing
    /// time, then the digest of the signed body, so every node picks the
    /// same winner of two conflicting applies.
    pub fn order(&self) -> (u64, i64, [u8; 32]) {
        (self.header.version, self.header.signed_at, self.digest)
    }

    /// Short hex digest of the signed body.
    pub fn digest_hex(&self) -> String {
        super::hex(&self.digest[..8])
    }

    /// `ca` or `spiffe://<mesh>/operator/<name>`.
    pub fn signer_name(&self) -> String {
        match &self.signer {
            Signer::Ca => "ca".into(),
            Signer::Operator(c) => c.uri(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use super::*;
    use crate::pki::{first_cert_der, sign::verify_ca_signature, DEFAULT_CA_VALIDITY};

    /// A trust without rustls: chain = "issued by this CA's key", validity from the certificate.
    struct Trust {
        ca_der: Vec<u8>,
        revoked: HashMap<String, i64>,
    }

    impl PolicyTrust for Trust {
        fn mesh(&self) -> &str {
            "acme"
        }
        fn verify_ca(&self, msg: &[u8], sig: &[u8]) -> bool {
            verify_ca_signature(&self.ca_der, msg, sig).is_ok()
        }
        fn verify_operator_chain(&self, der: &[u8], at: i64) -> Result<(), (bool, String)> {
            use x509_parser::prelude::{FromDer, X509Certificate};
            let (_, cert) = X509Certificate::from_der(der).map_err(|e| (false, e.to_string()))?;
            let (_, ca) =
                X509Certificate::from_der(&self.ca_der).map_err(|e| (false, e.to_string()))?;
            cert.verify_signature(Some(ca.public_key()))
                .map_err(|e| (false, e.to_string()))?;
            let v = cert.validity();
            if at < v.not_before.timestamp() || at > v.not_after.timestamp() {
                return Err((true, "outside validity".into()));
            }
            Ok(())
        }
        fn key_revoked_at(&self, key_id: &str) -> Option<i64> {
            self.revoked.get(key_id).copied()
        }
    }

    fn setup() -> (Ca, Trust, SigningKey<'static>, OperatorCert) {
        let ca = Ca::generate("acme", DEFAULT_CA_VALIDITY).unwrap();
        let op = ca
            .issue_operator("alice", Duration::from_secs(3600))
            .unwrap();
        let cert_der = first_cert_der(&op.cert_pem).unwrap();
        let cert = OperatorCert::from_der(&cert_der).unwrap();
        let key = SigningKey::Operator {
            cert_der,
            key: NodeSigner::from_pem(&op.key_pem).unwrap(),
        };
        let trust = Trust {
            ca_der: first_cert_der(ca.cert_pem()).unwrap(),
            revoked: HashMap::new(),
        };
        (ca, trust, key, cert)
    }

    fn header(version: u64, signed_at: i64) -> DocHeader {
        DocHeader {
            mesh: "acme".into(),
            kind: "intentions".into(),
            name: "api".into(),
            version,
            signed_at,
            deleted: false,
        }
    }

    #[test]
    fn an_operator_document_round_trips_and_orders_by_version_then_time() {
        let (_, trust, key, cert) = setup();
        let at = cert.not_before + 10;
        let d = SignedDocument::sign(&key, header(2, at), "kind = \"intentions\"".into()).unwrap();
        let back = SignedDocument::verify(d.text(), &trust, at).unwrap();
        assert_eq!(back.header, d.header);
        assert_eq!(back.source, d.source);
        assert_eq!(back.signer_name(), "spiffe://acme/operator/alice");
        let later = SignedDocument::sign(&key, header(2, at + 1), "x".into()).unwrap();
        let higher = SignedDocument::sign(&key, header(3, at - 5), "x".into()).unwrap();
        assert!(later.order() > d.order());
        assert!(higher.order() > later.order());
    }

    #[test]
    fn the_ca_key_signs_too() {
        let (ca, trust, _, _) = setup();
        let now = crate::pki::unix_now();
        let d = SignedDocument::sign(&SigningKey::Ca(&ca), header(1, now), "x".into()).unwrap();
        let back = SignedDocument::verify(d.text(), &trust, now).unwrap();
        assert_eq!(back.signer, Signer::Ca);
        let other = Ca::generate("acme", DEFAULT_CA_VALIDITY).unwrap();
        let forged =
            SignedDocument::sign(&SigningKey::Ca(&other), header(1, now), "x".into()).unwrap();
        assert_eq!(
            SignedDocument::verify(forged.text(), &trust, now).unwrap_err(),
            PolicyError::BadSignature
        );
    }

    #[test]
    fn forged_tampered_foreign_expired_future_and_revoked_documents_are_refused() {
        let (ca, mut trust, key, cert) = setup();
        let at = cert.not_before + 10;
        let reason = |text: &str, trust: &Trust, now: i64| {
            SignedDocument::verify(text, trust, now)
                .map(|_| "ok")
                .unwrap_or_else(|e| e.reason())
        };
        // Tampered: one byte of the source changed under the signature.
        let good = SignedDocument::sign(&key, header(1, at), "rule = 1".into()).unwrap();
        let bytes = STANDARD.decode(good.text()).unwrap();
        let Wire::V1 { body, signer, sig } = codec::decode(&bytes).unwrap();
        let mut b: Body = codec::decode(&body).unwrap();
        b.source = "rule = 2".into();
        let tampered = STANDARD.encode(
            codec::encode(&Wire::V1 {
                body: codec::encode(&b).unwrap(),
                signer: signer.clone(),
                sig: sig.clone(),
            })
            .unwrap(),
        );
        assert_eq!(reason(&tampered, &trust, at), "bad_signature");
        // Unsigned (empty signature).
        let unsigned = STANDARD.encode(
            codec::encode(&Wire::V1 {
                body: body.clone(),
                signer,
                sig: vec![],
            })
            .unwrap(),
        );
        assert_eq!(reason(&unsigned, &trust, at), "bad_signature");
        // Signed by a node certificate, not an operator's.
        let node = ca
            .issue(
                "east",
                "vm-1",
                crate::pki::Role::Node,
                Duration::from_secs(600),
            )
            .unwrap();
        let node_key = SigningKey::Operator {
            cert_der: first_cert_der(&node.cert_pem).unwrap(),
            key: NodeSigner::from_pem(&node.key_pem).unwrap(),
        };
        assert!(matches!(
            SignedDocument::sign(&node_key, header(1, at), "x".into()),
            Err(PolicyError::NotOperator(_))
        ));
        let forged_signer = STANDARD.encode(
            codec::encode(&Wire::V1 {
                body: body.clone(),
                signer: SignerWire::Operator(first_cert_der(&node.cert_pem).unwrap()),
                sig: NodeSigner::from_pem(&node.key_pem)
                    .unwrap()
                    .sign(&[DOMAIN, &body].concat())
                    .unwrap(),
            })
            .unwrap(),
        );
        assert_eq!(reason(&forged_signer, &trust, at), "not_operator");
        // An operator of another CA of the same mesh name.
        let rogue = Ca::generate("acme", DEFAULT_CA_VALIDITY).unwrap();
        let rop = rogue
            .issue_operator("mallory", Duration::from_secs(600))
            .unwrap();
        let rkey = SigningKey::Operator {
            cert_der: first_cert_der(&rop.cert_pem).unwrap(),
            key: NodeSigner::from_pem(&rop.key_pem).unwrap(),
        };
        let rdoc = SignedDocument::sign(&rkey, header(9, at), "x".into()).unwrap();
        assert_eq!(reason(rdoc.text(), &trust, at), "unknown_ca");
        // Signed after the certificate expired, or before it began.
        let late = SignedDocument::sign(&key, header(1, cert.not_after + 60), "x".into()).unwrap();
        assert_eq!(
            reason(late.text(), &trust, cert.not_after + 60),
            "expired_signer"
        );
        // Signed within validity: still good long after the certificate expired.
        assert_eq!(
            reason(good.text(), &trust, cert.not_after + 86_400 * 365),
            "ok"
        );
        // From the future.
        let future = SignedDocument::sign(&key, header(1, at + 3000), "x".into()).unwrap();
        assert_eq!(reason(future.text(), &trust, at), "future");
        // Other mesh.
        let mut h = header(1, at);
        h.mesh = "globex".into();
        let foreign = SignedDocument::sign(&key, h, "x".into()).unwrap();
        assert_eq!(reason(foreign.text(), &trust, at), "other_mesh");
        // Revoked key: what it signed before the revocation stands, after it does not.
        trust.revoked.insert(cert.key_id.clone(), at + 5);
        assert_eq!(reason(good.text(), &trust, at + 100), "ok");
        let after = SignedDocument::sign(&key, header(2, at + 6), "x".into()).unwrap();
        assert_eq!(reason(after.text(), &trust, at + 100), "revoked_signer");
        // Too large.
        assert!(matches!(
            SignedDocument::sign(&key, header(1, at), "x".repeat(MAX_TEXT_LEN)),
            Err(PolicyError::TooLarge(_))
        ));
        assert_eq!(
            reason(&"A".repeat(MAX_TEXT_LEN + 1), &trust, at),
            "too_large"
        );
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(s in ".{0,400}", b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let (_, trust, _, _) = setup();
            let _ = SignedDocument::verify(&s, &trust, 0);
            let _ = SignedDocument::verify(&STANDARD.encode(&b), &trust, 0);
        }
    }
}
