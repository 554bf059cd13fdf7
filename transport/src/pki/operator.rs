//! Operator certificates: `spiffe://<mesh>/operator/<name>`, issued by the
//! mesh CA for people and automation that sign policy documents. They carry
//! only the clientAuth usage and no node identity, so no verifier of the
//! mesh admits them as a node (their URI is not a node's SPIFFE ID).

use std::path::Path;
use std::time::Duration;

use rcgen::{
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::files::{write_file, write_private_file};
use super::identity::check_name;
use super::{Ca, PkiError};

/// The subject OU of operator certificates.
pub const OPERATOR_OU: &str = "operator";
pub const OPERATOR_CERT_FILE: &str = "operator.pem";
pub const OPERATOR_KEY_FILE: &str = "operator.key";

/// What an operator certificate says (after its chain was checked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorCert {
    pub mesh: String,
    pub name: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// Hex SHA-256 of the SubjectPublicKeyInfo, as [`super::PeerCert::key_id`].
    pub key_id: String,
    /// The raw public key (an uncompressed P-256 point).
    pub public_key: Vec<u8>,
}

/// A freshly issued operator certificate and its key (PEM).
pub struct IssuedOperator {
    pub uri: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl OperatorCert {
    /// `spiffe://<mesh>/operator/<name>`.
    pub fn uri(&self) -> String {
        operator_uri(&self.mesh, &self.name)
    }

    /// Parses an operator certificate (DER): exactly one URI SAN of the
    /// operator form. Does not check the chain.
    pub fn from_der(der: &[u8]) -> Result<Self, PkiError> {
        let bad = |reason: String| PkiError::BadCertificate {
            what: "operator certificate".to_string(),
            reason,
        };
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| bad(e.to_string()))?;
        let uri = super::cert::single_uri(&cert).map_err(bad)?;
        let (mesh, name) = parse_operator_uri(uri).ok_or_else(|| {
            bad(format!(
                "{uri:?} is not an operator identity (spiffe://<mesh>/operator/<name>)"
            ))
        })?;
        Ok(Self {
            mesh,
            name,
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            key_id: super::hex(&super::sha256(cert.public_key().raw)),
            public_key: cert.public_key().subject_public_key.data.to_vec(),
        })
    }
}

pub fn operator_uri(mesh: &str, name: &str) -> String {
    format!("spiffe://{mesh}/operator/{name}")
}

/// `(mesh, name)` of `spiffe://<mesh>/operator/<name>`.
pub fn parse_operator_uri(uri: &str) -> Option<(String, String)> {
    let rest = uri.strip_prefix("spiffe://")?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [mesh, "operator", name]
            if check_name("mesh", mesh).is_ok() && check_name("operator", name).is_ok() =>
        {
            Some((mesh.to_string(), name.to_string()))
        }
        _ => None,
    }
}

impl Ca {
    /// Issues an operator certificate with a new P-256 key.
    pub fn issue_operator(
        &self,
        name: &str,
        validity: Duration,
    ) -> Result<IssuedOperator, PkiError> {
        check_name("operator", name)?;
        let uri = operator_uri(self.mesh(), name);
        let key = KeyPair::generate()?;
        let mut p = rcgen::CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "meshnode");
        dn.push(DnType::OrganizationalUnitName, OPERATOR_OU);
        dn.push(DnType::CommonName, name);
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Client only: an operator certificate can never serve as a node.
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.subject_alt_names = vec![SanType::URI(uri.clone().try_into()?)];
        p.use_authority_key_identifier_extension = true;
        super::ca::set_validity(&mut p, validity);
        p.serial_number = Some(super::ca::random_serial());
        let cert = p.signed_by(&key, self.issuer())?;
        Ok(IssuedOperator {
            uri,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl IssuedOperator {
    /// Writes `operator.pem` (0644), `operator.key` (0600) and `ca.pem` into `dir`.
    pub fn save(&self, dir: &Path, ca_pem: &str) -> Result<(), PkiError> {
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Write {
            path: dir.display().to_string(),
            source,
        })?;
        write_private_file(&dir.join(OPERATOR_KEY_FILE), self.key_pem.as_bytes())?;
        write_file(
            &dir.join(OPERATOR_CERT_FILE),
            self.cert_pem.as_bytes(),
            0o644,
        )?;
        write_file(&dir.join(super::ca::CA_CERT_FILE), ca_pem.as_bytes(), 0o644)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{first_cert_der, PeerCert, DEFAULT_CA_VALIDITY};

    #[test]
    fn an_operator_certificate_names_an_operator_and_is_no_node() {
        let ca = Ca::generate("acme", DEFAULT_CA_VALIDITY).unwrap();
        let op = ca
            .issue_operator("alice", Duration::from_secs(3600))
            .unwrap();
        assert_eq!(op.uri, "spiffe://acme/operator/alice");
        let der = first_cert_der(&op.cert_pem).unwrap();
        let parsed = OperatorCert::from_der(&der).unwrap();
        assert_eq!(
            (parsed.mesh.as_str(), parsed.name.as_str()),
            ("acme", "alice")
        );
        assert!(parsed.not_after > parsed.not_before);
        assert!(
            PeerCert::from_der(&der).is_err(),
            "an operator certificate must not parse as a node's"
        );
        let node = ca
            .issue("east", "a", crate::pki::Role::Node, Duration::from_secs(60))
            .unwrap();
        assert!(OperatorCert::from_der(&first_cert_der(&node.cert_pem).unwrap()).is_err());
        assert!(ca
            .issue_operator("bad name", Duration::from_secs(60))
            .is_err());
    }

    #[test]
    fn operator_uris_parse_strictly() {
        assert_eq!(
            parse_operator_uri("spiffe://acme/operator/ops-bot"),
            Some(("acme".into(), "ops-bot".into()))
        );
        for bad in [
            "spiffe://acme/operator/",
            "spiffe://acme/operator/a/b",
            "spiffe://acme/cluster/east/node/a",
            "http://acme/operator/a",
            "spiffe://ac me/operator/a",
        ] {
            assert_eq!(parse_operator_uri(bad), None, "{bad}");
        }
    }
}
