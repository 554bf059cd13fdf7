//! Signatures on what a node says in gossip: ECDSA P-256 with the node's own
//! key (the key of its certificate), checked against the public key of that
//! certificate; and checks of signatures made with the CA key.

use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, UnparsedPublicKey};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::PkiError;

/// Signs with a node's private key (PKCS#8, ECDSA P-256, as rcgen makes them).
pub struct NodeSigner {
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

impl std::fmt::Debug for NodeSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSigner").finish_non_exhaustive()
    }
}

impl NodeSigner {
    /// From the DER of a PKCS#8 P-256 private key.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, PkiError> {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
            .map_err(|e| PkiError::BadCertificate {
                what: "node key".into(),
                reason: format!("not a PKCS#8 ECDSA P-256 key: {e}"),
            })?;
        Ok(Self { key, rng })
    }

    /// From a PEM PKCS#8 key.
    pub fn from_pem(pem: &str) -> Result<Self, PkiError> {
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).map_err(
            |_| PkiError::NoPem {
                what: "node key".into(),
                expected: "a PKCS#8 private key",
            },
        )?;
        Self::from_pkcs8(der.secret_pkcs8_der())
    }

    /// A 64-byte fixed-width signature of `msg`.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, PkiError> {
        self.key
            .sign(&self.rng, msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| PkiError::BadCertificate {
                what: "node key".into(),
                reason: "signing failed".into(),
            })
    }

    /// The public key (uncompressed EC point), as [`public_key`] returns it.
    pub fn public_key(&self) -> &[u8] {
        self.key.public_key().as_ref()
    }
}

/// The public key of a certificate (DER): the raw subjectPublicKey bits, an
/// uncompressed EC point for P-256 keys.
pub fn public_key(cert_der: &[u8]) -> Result<Vec<u8>, PkiError> {
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| PkiError::BadCertificate {
        what: "certificate".into(),
        reason: e.to_string(),
    })?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

/// Checks a [`NodeSigner`] signature against a P-256 public key.
pub fn verify_node_signature(public_key: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, public_key)
        .verify(msg, sig)
        .is_ok()
}

/// Why a CA signature was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CaSignatureError {
    #[error("CA certificate: {0}")]
    Certificate(String),
    #[error("unsupported CA key type {0}")]
    KeyType(String),
    #[error("bad signature")]
    BadSignature,
}

/// Checks a signature made with the CA key ([`super::Ca::sign`]) against the
/// CA certificate (DER).
pub fn verify_ca_signature(ca_der: &[u8], msg: &[u8], sig: &[u8]) -> Result<(), CaSignatureError> {
    let (_, cert) = X509Certificate::from_der(ca_der)
        .map_err(|e| CaSignatureError::Certificate(e.to_string()))?;
    let spki = cert.public_key();
    let alg = spki.algorithm.algorithm.to_id_string();
    let params = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    let algorithm: &dyn signature::VerificationAlgorithm = match (alg.as_str(), params.as_deref()) {
        // id-ecPublicKey with prime256v1 / secp384r1
        ("1.2.840.10045.2.1", Some("1.2.840.10045.3.1.7")) => &signature::ECDSA_P256_SHA256_ASN1,
        ("1.2.840.10045.2.1", Some("1.3.132.0.34")) => &signature::ECDSA_P384_SHA384_ASN1,
        ("1.3.101.112", _) => &signature::ED25519,
        (other, _) => return Err(CaSignatureError::KeyType(other.to_string())),
    };
    UnparsedPublicKey::new(algorithm, &spki.subject_public_key.data)
        .verify(msg, sig)
        .map_err(|_| CaSignatureError::BadSignature)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::pki::join::NodeKey;
    use crate::pki::{Ca, Identity};

    #[test]
    fn node_signatures_verify_against_the_certificate_key_only() {
        let key = NodeKey::generate().unwrap();
        let signer = NodeSigner::from_pem(&key.pem()).unwrap();
        let ca = Ca::generate("acme", Duration::from_secs(3600)).unwrap();
        let id = Identity::new("acme", "east", "a").unwrap();
        let cert_pem = ca
            .sign_csr(
                &key.csr("a").unwrap(),
                &id,
                crate::pki::Role::Node,
                &[],
                Duration::from_secs(600),
                None,
            )
            .unwrap();
        let der = crate::pki::first_cert_der(&cert_pem).unwrap();
        let pk = public_key(&der).unwrap();
        assert_eq!(pk, signer.public_key());
        let sig = signer.sign(b"hello").unwrap();
        assert!(verify_node_signature(&pk, b"hello", &sig));
        assert!(!verify_node_signature(&pk, b"hellO", &sig));
        let other = NodeSigner::from_pem(&NodeKey::generate().unwrap().pem()).unwrap();
        assert!(!verify_node_signature(other.public_key(), b"hello", &sig));
        let ca_sig = ca.sign(b"role").unwrap();
        let ca_der = crate::pki::first_cert_der(ca.cert_pem()).unwrap();
        assert!(verify_ca_signature(&ca_der, b"role", &ca_sig).is_ok());
        assert!(verify_ca_signature(&ca_der, b"rolE", &ca_sig).is_err());
        assert!(verify_ca_signature(&der, b"role", &ca_sig).is_err());
    }
}
