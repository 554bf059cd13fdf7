//! The mesh root CA: creation, loading, and issuing node certificates.

use std::path::Path;
use std::time::Duration;

use rand::RngExt;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use super::cert::{GATEWAY_OU, NODE_OU};
use super::files::{read_private_key, read_text, write_file, write_private_file};
use super::identity::check_name;
use super::{Identity, PkiError, Role};

/// Root CA lifetime. Ten years: rotation of the root is an explicit operator act.
pub const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Offline-issued node certificates (`meshnode cert issue`): one year. Certificates
/// issued by a CA node at join and renewal use the CA node's `cert_ttl` (72 h).
pub const DEFAULT_NODE_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Backdating absorbs clock skew between the CA and the verifying nodes; a
/// quarter of the validity at most, so second-long test certificates stay sane.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";

/// A mesh root CA whose private key is at hand.
pub struct Ca {
    mesh: String,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// See [`Ca::issued_key`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedKey {
    pub key_id: String,
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
    pub operator: bool,
}

/// A freshly issued node certificate with its private key (PEM).
pub struct IssuedCert {
    pub identity: Identity,
    pub cert_pem: String,
    pub key_pem: String,
}

// === impl Ca ===

impl Ca {
    /// Creates a new root CA for `mesh`.
    pub fn generate(mesh: &str, validity: Duration) -> Result<Self, PkiError> {
        check_name("mesh", mesh)?;
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "meshnode");
        dn.push(DnType::CommonName, format!("meshnode CA {mesh}"));
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        // The mesh name is carried as the CA's only URI SAN, so a loaded CA knows its trust domain.
        p.subject_alt_names = vec![SanType::URI(format!("spiffe://{mesh}").try_into()?)];
        set_validity(&mut p, validity);
        p.serial_number = Some(random_serial());
        let cert = p.self_signed(&key)?;
        Ok(Self {
            mesh: mesh.to_string(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(p, key),
        })
    }

    /// Loads `ca.pem` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        Self::load_files(&dir.join(CA_CERT_FILE), &dir.join(CA_KEY_FILE))
    }

    /// Loads a CA from its certificate and key files (a CA node's `tls.ca` and `ca.key`).
    pub fn load_files(cert: &Path, key: &Path) -> Result<Self, PkiError> {
        let cert_pem = read_text(cert)?;
        let (key_pem, _) = read_private_key(key)?;
        let key = KeyPair::from_pem(&key_pem)?;
        let mesh = mesh_of_ca_pem(&cert_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(Self {
            mesh,
            cert_pem,
            issuer,
        })
    }

    /// Writes `ca.pem` (0644) and `ca.key` (0600) into `dir`, creating it.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Write {
            path: dir.display().to_string(),
            source,
        })?;
        write_private_file(
            &dir.join(CA_KEY_FILE),
            self.issuer.key().serialize_pem().as_bytes(),
        )?;
        write_file(&dir.join(CA_CERT_FILE), self.cert_pem.as_bytes(), 0o644)
    }

    pub fn mesh(&self) -> &str {
        &self.mesh
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a node certificate with a new key pair.
    pub fn issue(
        &self,
        cluster: &str,
        node: &str,
        role: Role,
        validity: Duration,
    ) -> Result<IssuedCert, PkiError> {
        self.issue_as(cluster, node, role, &[], validity)
    }

    /// [`Ca::issue`] for a node that may act as `services`.
    pub fn issue_as(
        &self,
        cluster: &str,
        node: &str,
        role: Role,
        services: &[String],
        validity: Duration,
    ) -> Result<IssuedCert, PkiError> {
        let identity = Identity::new(&self.mesh, cluster, node)?;
        let key = KeyPair::generate()?;
        let p = node_params(&identity, role, services, validity, None)?;
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            identity,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs the public key of a certificate signing request (DER) for
    /// `identity`. Only the key and its proof of possession are taken from
    /// the request: subject, SANs, usages, validity and serial are ours.
    /// `not_before_floor` (Unix seconds) keeps a certificate for a revoked
    /// name from predating its revocation.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        identity: &Identity,
        role: Role,
        services: &[String],
        validity: Duration,
        not_before_floor: Option<i64>,
    ) -> Result<String, PkiError> {
        if identity.mesh() != self.mesh {
            return Err(PkiError::Csr(format!(
                "{identity} is not in this CA's mesh {:?}",
                self.mesh
            )));
        }
        let csr = csr_public_key(csr_der)?;
        let mut p = node_params(identity, role, services, validity, not_before_floor)?;
        p.use_authority_key_identifier_extension = true;
        let signed = rcgen::CertificateSigningRequestParams {
            params: p,
            public_key: csr,
        }
        .signed_by(&self.issuer)?;
        Ok(signed.pem())
    }

    /// SHA-256 fingerprint of the CA certificate (DER).
    pub fn fingerprint(&self) -> Result<[u8; 32], PkiError> {
        let der = super::files::parse_certs("CA certificate", &self.cert_pem)?;
        let first = der.first().ok_or_else(|| PkiError::NoPem {
            what: "CA certificate".into(),
            expected: "a CERTIFICATE block",
        })?;
        Ok(super::fingerprint(first))
    }

    pub(super) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// What revoking a certificate needs, once it is proven to be this CA's:
    /// its key id, serial, `notAfter`, and whether it is an operator's.
    pub fn issued_key(&self, cert_der: &[u8]) -> Result<IssuedKey, PkiError> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let bad = |reason: String| PkiError::BadCertificate {
            what: "certificate to revoke".into(),
            reason,
        };
        let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| bad(e.to_string()))?;
        let ca_der = self.fingerprint_der()?;
        let (_, ca) = X509Certificate::from_der(&ca_der).map_err(|e| bad(e.to_string()))?;
        cert.verify_signature(Some(ca.public_key()))
            .map_err(|_| bad("it was not issued by this mesh's CA".into()))?;
        Ok(IssuedKey {
            key_id: super::hex(&super::sha256(cert.public_key().raw)),
            serial: super::hex(cert.raw_serial()),
            not_after: cert.validity().not_after.timestamp(),
            operator: super::operator::OperatorCert::from_der(cert_der).is_ok(),
        })
    }

    fn fingerprint_der(&self) -> Result<Vec<u8>, PkiError> {
        super::first_cert_der(&self.cert_pem)
    }

    /// Signs `msg` with the CA key (revocation entries).
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, PkiError> {
        use rcgen::SigningKey;
        Ok(self.issuer.key().sign(msg)?)
    }
}

/// Parses a CSR and checks its self-signature (proof of possession).
fn csr_public_key(csr_der: &[u8]) -> Result<rcgen::PublicKey, PkiError> {
    let der = rustls::pki_types::CertificateSigningRequestDer::from(csr_der);
    rcgen::CertificateSigningRequestParams::from_der(&der)
        .map(|p| p.public_key)
        .map_err(|e| PkiError::Csr(e.to_string()))
}

/// The SHA-256 key id of a CSR's public key, as in [`crate::PeerCert::key_id`].
pub fn csr_key_id(csr_der: &[u8]) -> Result<String, PkiError> {
    use x509_parser::prelude::FromDer;
    csr_public_key(csr_der)?;
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(csr_der)
        .map_err(|e| PkiError::Csr(e.to_string()))?;
    Ok(super::hex(&super::sha256(
        csr.certification_request_info.subject_pki.raw,
    )))
}

fn node_params(
    identity: &Identity,
    role: Role,
    services: &[String],
    validity: Duration,
    not_before_floor: Option<i64>,
) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "meshnode");
    dn.push(
        DnType::OrganizationalUnitName,
        match role {
            Role::Gateway => GATEWAY_OU,
            Role::Node => NODE_OU,
        },
    );
    dn.push(DnType::CommonName, identity.node());
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.subject_alt_names = vec![SanType::URI(identity.uri().try_into()?)];
    let services = super::cert::check_services(services)?;
    if !services.is_empty() {
        p.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
            super::cert::SERVICES_OID,
            super::cert::encode_services(&services),
        )];
    }
    p.use_authority_key_identifier_extension = true;
    set_validity(&mut p, validity);
    if let Some(floor) = not_before_floor {
        if let Ok(floor) = OffsetDateTime::from_unix_timestamp(floor + 1) {
            if p.not_before < floor {
                p.not_before = floor;
            }
        }
    }
    p.serial_number = Some(random_serial());
    Ok(p)
}

// === impl IssuedCert ===

impl IssuedCert {
    /// Writes `node.pem` (0644), `node.key` (0600) and a copy of the CA as `ca.pem` into `dir`.
    pub fn save(&self, dir: &Path, ca_pem: &str) -> Result<(), PkiError> {
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Write {
            path: dir.display().to_string(),
            source,
        })?;
        write_private_file(&dir.join("node.key"), self.key_pem.as_bytes())?;
        write_file(&dir.join("node.pem"), self.cert_pem.as_bytes(), 0o644)?;
        write_file(&dir.join(CA_CERT_FILE), ca_pem.as_bytes(), 0o644)
    }
}

pub(super) fn set_validity(p: &mut CertificateParams, validity: Duration) {
    let now = OffsetDateTime::now_utc();
    p.not_before = now - BACKDATE.min(validity / 4);
    p.not_after = now + validity;
}

pub(super) fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::rng().random();
    bytes[0] &= 0x7f; // keep it a positive INTEGER
    SerialNumber::from_slice(&bytes)
}

/// The trust domain of a CA certificate: its `spiffe://<mesh>` URI SAN.
pub fn mesh_of_ca_pem(pem: &str) -> Result<String, PkiError> {
    let certs = super::files::parse_certs("CA certificate", pem)?;
    let der = certs.first().ok_or_else(|| PkiError::BadCertificate {
        what: "CA certificate".to_string(),
        reason: "empty".to_string(),
    })?;
    mesh_of_ca_der(der)
}

/// [`mesh_of_ca_pem`] for a DER certificate.
pub fn mesh_of_ca_der(der: &[u8]) -> Result<String, PkiError> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::{FromDer, X509Certificate};
    let bad = |reason: String| PkiError::BadCertificate {
        what: "CA certificate".to_string(),
        reason,
    };
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| bad(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| bad(e.to_string()))?
        .ok_or_else(|| bad("no spiffe://<mesh> URI SAN: not a meshnode CA".to_string()))?;
    for n in &san.value.general_names {
        if let GeneralName::URI(u) = n {
            if let Some(mesh) = u.strip_prefix("spiffe://") {
                check_name("mesh", mesh)?;
                return Ok(mesh.to_string());
            }
        }
    }
    Err(bad(
        "no spiffe://<mesh> URI SAN: not a meshnode CA".to_string()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::PeerCert;
    use x509_parser::prelude::FromDer;

    #[test]
    fn issued_cert_carries_identity_and_role() {
        let ca = Ca::generate("acme", DEFAULT_CA_VALIDITY).unwrap();
        let gw = ca
            .issue("east", "gw-1", Role::Gateway, Duration::from_secs(3600))
            .unwrap();
        let der = crate::pki::files::parse_certs("t", &gw.cert_pem).unwrap();
        let peer = PeerCert::from_der(&der[0]).unwrap();
        assert_eq!(
            peer.identity.to_string(),
            "spiffe://acme/cluster/east/node/gw-1"
        );
        assert_eq!(peer.role, Role::Gateway);
        let node = ca
            .issue("east", "vm-1", Role::Node, Duration::from_secs(3600))
            .unwrap();
        let der = crate::pki::files::parse_certs("t", &node.cert_pem).unwrap();
        assert_eq!(PeerCert::from_der(&der[0]).unwrap().role, Role::Node);
    }

    #[test]
    fn service_identities_ride_in_their_own_extension_beside_one_uri_san() {
        let ca = Ca::generate("acme", DEFAULT_CA_VALIDITY).unwrap();
        let svc = vec!["web".to_string(), "api".to_string()];
        let c = ca
            .issue_as("east", "vm-1", Role::Node, &svc, Duration::from_secs(60))
            .unwrap();
        let der = crate::pki::first_cert_der(&c.cert_pem).unwrap();
        let peer = PeerCert::from_der(&der).unwrap();
        assert_eq!(peer.services, ["api", "web"]);
        assert!(peer.may_act_as("web") && !peer.may_act_as("db"));
        // Still exactly one URI SAN: the node's SPIFFE ID.
        let (_, x) = x509_parser::prelude::X509Certificate::from_der(&der).unwrap();
        assert_eq!(
            crate::pki::cert::single_uri(&x).unwrap(),
            "spiffe://acme/cluster/east/node/vm-1"
        );
        // rustls still verifies it: the extension is not critical.
        let plain = ca
            .issue("east", "vm-2", Role::Node, Duration::from_secs(60))
            .unwrap();
        let der = crate::pki::first_cert_der(&plain.cert_pem).unwrap();
        assert!(PeerCert::from_der(&der).unwrap().services.is_empty());
        for bad in [
            vec!["web".to_string(), "web".to_string()],
            vec!["no spaces".to_string()],
            (0..33).map(|i| format!("s{i}")).collect(),
        ] {
            assert!(ca
                .issue_as("east", "vm-3", Role::Node, &bad, Duration::from_secs(60))
                .is_err());
        }
    }

    #[test]
    fn only_this_cas_certificates_can_be_revoked_by_file() {
        let ca = Ca::generate("acme", DEFAULT_CA_VALIDITY).unwrap();
        let op = ca.issue_operator("alice", Duration::from_secs(60)).unwrap();
        let der = crate::pki::first_cert_der(&op.cert_pem).unwrap();
        let k = ca.issued_key(&der).unwrap();
        assert!(k.operator);
        assert_eq!(k.key_id.len(), 64);
        let other = Ca::generate("acme", DEFAULT_CA_VALIDITY).unwrap();
        assert!(other.issued_key(&der).is_err());
        let node = ca
            .issue("east", "a", Role::Node, Duration::from_secs(60))
            .unwrap();
        let nk = ca
            .issued_key(&crate::pki::first_cert_der(&node.cert_pem).unwrap())
            .unwrap();
        assert!(!nk.operator);
        assert!(ca.issued_key(b"not a certificate").is_err());
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("acme", DEFAULT_CA_VALIDITY).unwrap();
        ca.save(dir.path()).unwrap();
        let loaded = Ca::load(dir.path()).unwrap();
        assert_eq!(loaded.mesh(), "acme");
        assert!(Ca::generate("bad mesh", DEFAULT_CA_VALIDITY).is_err());
        assert!(matches!(ca.save(dir.path()), Err(PkiError::Exists { .. })));
    }
}
