//! The joiner's side of issuance: a key pair made on this machine and a
//! certificate signing request that proves possession of it. The private key
//! never leaves the machine; only the CSR is sent.

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

use super::PkiError;

/// A node's private key.
pub struct NodeKey {
    key: KeyPair,
}

impl NodeKey {
    /// A new ECDSA P-256 key pair.
    pub fn generate() -> Result<Self, PkiError> {
        Ok(Self {
            key: KeyPair::generate()?,
        })
    }

    /// Loads a PKCS#8 PEM key (renewal keeps the node's key).
    pub fn from_pem(pem: &str) -> Result<Self, PkiError> {
        Ok(Self {
            key: KeyPair::from_pem(pem)?,
        })
    }

    pub fn pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A CSR (DER) for this key. Its subject is informative only: the CA sets
    /// every field of the certificate from the authenticated request.
    pub fn csr(&self, node: &str) -> Result<Vec<u8>, PkiError> {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node);
        p.distinguished_name = dn;
        let csr = p.serialize_request(&self.key)?;
        Ok(csr.der().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::pki::{Ca, Identity, PeerCert, Role};

    #[test]
    fn csr_is_signed_with_our_fields_and_its_key() {
        let ca = Ca::generate("acme", Duration::from_secs(3600)).unwrap();
        let key = NodeKey::generate().unwrap();
        let csr = key.csr("vm-1").unwrap();
        let id = Identity::new("acme", "east", "vm-1").unwrap();
        let pem = ca
            .sign_csr(&csr, &id, Role::Gateway, &[], Duration::from_secs(60), None)
            .unwrap();
        let der = crate::pki::files::parse_certs("t", &pem).unwrap();
        let peer = PeerCert::from_der(&der[0]).unwrap();
        assert_eq!(peer.identity, id);
        assert_eq!(peer.role, Role::Gateway);
        assert_eq!(peer.key_id, crate::pki::ca::csr_key_id(&csr).unwrap());
        assert!(peer.not_after - peer.not_before <= 75);
        // The result loads as TLS material with the joiner's key.
        crate::tls::TlsMaterial::from_pem(ca.cert_pem(), &pem, &key.pem()).unwrap();
    }

    #[test]
    fn tampered_or_garbage_csr_is_refused() {
        let ca = Ca::generate("acme", Duration::from_secs(3600)).unwrap();
        let id = Identity::new("acme", "east", "vm-1").unwrap();
        let mut csr = NodeKey::generate().unwrap().csr("vm-1").unwrap();
        let n = csr.len();
        csr[n - 5] ^= 0xff;
        for bad in [csr.as_slice(), b"", b"\x30\x03\x02\x01\x01"] {
            let err = ca
                .sign_csr(bad, &id, Role::Node, &[], Duration::from_secs(60), None)
                .unwrap_err();
            assert!(matches!(err, PkiError::Csr(_)), "{err}");
        }
    }

    #[test]
    fn not_before_floor_is_respected() {
        let ca = Ca::generate("acme", Duration::from_secs(3600)).unwrap();
        let id = Identity::new("acme", "east", "vm-1").unwrap();
        let csr = NodeKey::generate().unwrap().csr("vm-1").unwrap();
        let floor = time::OffsetDateTime::now_utc().unix_timestamp() - 10;
        let pem = ca
            .sign_csr(
                &csr,
                &id,
                Role::Node,
                &[],
                Duration::from_secs(3600),
                Some(floor),
            )
            .unwrap();
        let der = crate::pki::files::parse_certs("t", &pem).unwrap();
        assert!(PeerCert::from_der(&der[0]).unwrap().not_before > floor);
    }
}
