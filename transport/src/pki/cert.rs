//! Reading what a node certificate says: its identity and its role.

use std::fmt;

use serde::{Deserialize, Serialize};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{Identity, PkiError};

/// Value of the subject's organizationalUnit that marks a gateway certificate.
/// Kept in the subject so `openssl x509 -noout -subject` shows the role.
pub(crate) const GATEWAY_OU: &str = "gateway";
pub(crate) const NODE_OU: &str = "node";

/// OID of meshnode's service-identity extension: the services a node's
/// certificate lets it act as, a DER `SEQUENCE OF UTF8String`. Non-critical,
/// so TLS stacks that do not know it (webpki among them) ignore it; only
/// meshnode reads it, and only from certificates whose chain it verified.
/// It sits in the IANA private-enterprise arc (1.3.6.1.4.1); meshnode has no
/// registered enterprise number, so the number is ours by convention only
/// (see ARCHITECTURE.md, "Service identity").
pub const SERVICES_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 59470, 1, 1];
/// Most services one certificate may name.
pub const MAX_CERT_SERVICES: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Node,
    Gateway,
}

/// What meshnode trusts about a peer once its chain has been verified.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCert {
    pub identity: Identity,
    pub role: Role,
    /// Unix seconds.
    pub not_after: i64,
    /// Unix seconds.
    #[serde(default)]
    pub not_before: i64,
    /// Hex SHA-256 of the SubjectPublicKeyInfo: revocations match on the key,
    /// so a re-issued certificate for a revoked key is refused too.
    #[serde(default)]
    pub key_id: String,
    /// Hex serial number.
    #[serde(default)]
    pub serial: String,
    /// The services this node may act as ([`SERVICES_OID`]); empty when the
    /// certificate names none (the node acts as itself only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
}

// === impl Role ===

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => NODE_OU,
            Role::Gateway => GATEWAY_OU,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl PeerCert ===

/// The `notAfter` of any certificate (DER), in Unix seconds: for the CA, which
/// is not a node certificate.
pub fn not_after(der: &[u8]) -> Result<i64, PkiError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| PkiError::BadCertificate {
        what: "certificate".to_string(),
        reason: e.to_string(),
    })?;
    Ok(cert.validity().not_after.timestamp())
}

/// The one URI SAN of a certificate (meshnode's certificates carry exactly one).
pub(crate) fn single_uri<'a>(cert: &'a X509Certificate<'_>) -> Result<&'a str, String> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "no subjectAltName extension".to_string())?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [uri] => Ok(uri),
        _ => Err(format!(
            "expected exactly one URI SAN, found {}",
            uris.len()
        )),
    }
}

/// Checks a list of service identities for a certificate: valid names, no
/// duplicates, at most [`MAX_CERT_SERVICES`]. Returns them sorted.
pub fn check_services(services: &[String]) -> Result<Vec<String>, PkiError> {
    let bad = |reason: String| PkiError::BadCertificate {
        what: "service identities".to_string(),
        reason,
    };
    if services.len() > MAX_CERT_SERVICES {
        return Err(bad(format!(
            "{} services, at most {MAX_CERT_SERVICES} per certificate",
            services.len()
        )));
    }
    let mut out = services.to_vec();
    for s in &out {
        super::check_name("service", s).map_err(|e| bad(e.to_string()))?;
    }
    out.sort();
    let n = out.len();
    out.dedup();
    if out.len() != n {
        return Err(bad("a service is named twice".to_string()));
    }
    Ok(out)
}

/// The extension's DER content for `services` (already checked).
pub(crate) fn encode_services(services: &[String]) -> Vec<u8> {
    yasna::construct_der(|w| {
        w.write_sequence_of(|w| {
            for s in services {
                w.next().write_utf8_string(s);
            }
        })
    })
}

/// The services a certificate names: none without the extension; an error
/// for a malformed one (a certificate that says something we cannot read is
/// refused rather than read as naming nothing).
fn decode_services(cert: &X509Certificate<'_>) -> Result<Vec<String>, String> {
    let oid = x509_parser::der_parser::oid::Oid::from(SERVICES_OID)
        .map_err(|_| "bad services OID".to_string())?;
    let Some(ext) = cert.extensions().iter().find(|e| e.oid == oid) else {
        return Ok(Vec::new());
    };
    let names: Vec<String> = yasna::parse_der(ext.value, |r| {
        r.collect_sequence_of(|r| r.read_utf8string())
    })
    .map_err(|e| format!("service identity extension: {e}"))?;
    check_services(&names).map_err(|e| e.to_string())
}

impl PeerCert {
    /// May this node act as `service`?
    pub fn may_act_as(&self, service: &str) -> bool {
        self.services.iter().any(|s| s == service)
    }

    /// Parses a node certificate (DER). Requires exactly one URI SAN holding a node SPIFFE ID.
    /// Does not verify the chain: callers run this after rustls has.
    pub fn from_der(der: &[u8]) -> Result<Self, PkiError> {
        let bad = |reason: String| PkiError::BadCertificate {
            what: "peer certificate".to_string(),
            reason,
        };
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| bad(e.to_string()))?;
        let uri = single_uri(&cert).map_err(bad)?;
        let identity: Identity = uri.parse()?;
        let gateway = cert
            .subject()
            .iter_organizational_unit()
            .any(|ou| ou.as_str().ok() == Some(GATEWAY_OU));
        Ok(PeerCert {
            identity,
            role: if gateway { Role::Gateway } else { Role::Node },
            not_after: cert.validity().not_after.timestamp(),
            not_before: cert.validity().not_before.timestamp(),
            key_id: super::hex(&super::sha256(cert.public_key().raw)),
            serial: super::hex(cert.raw_serial()),
            services: decode_services(&cert).map_err(bad)?,
        })
    }

    /// [`PeerCert::from_der`] for the first certificate of a PEM text.
    pub fn from_pem(pem: &str) -> Result<Self, PkiError> {
        let certs = super::files::parse_certs("certificate", pem)?;
        let first = certs.first().ok_or_else(|| PkiError::NoPem {
            what: "certificate".into(),
            expected: "a CERTIFICATE block",
        })?;
        Self::from_der(first)
    }

    pub fn is_gateway(&self) -> bool {
        self.role == Role::Gateway
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rcgen::{CertificateParams, CustomExtension, KeyPair, SanType};

    use super::*;

    /// A self-signed node certificate whose services extension holds `content`.
    fn with_extension(content: Vec<u8>) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(
            "spiffe://acme/cluster/east/node/a".try_into().unwrap(),
        )];
        p.custom_extensions = vec![CustomExtension::from_oid_content(SERVICES_OID, content)];
        p.self_signed(&key).unwrap().der().to_vec()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever the extension holds, parsing gives valid names or an error.
        #[test]
        fn any_services_extension_parses_to_valid_names_or_an_error(
            content in proptest::collection::vec(any::<u8>(), 0..96),
        ) {
            if let Ok(p) = PeerCert::from_der(&with_extension(content)) {
                prop_assert!(check_services(&p.services).is_ok());
            }
        }

        #[test]
        fn encoded_services_round_trip(names in proptest::collection::btree_set("[a-z][a-z0-9-]{0,20}", 0..8)) {
            let names: Vec<String> = names.into_iter().collect();
            let p = PeerCert::from_der(&with_extension(encode_services(&names))).unwrap();
            prop_assert_eq!(p.services, names);
        }
    }

    #[test]
    fn a_malformed_or_invalid_services_extension_makes_the_certificate_unreadable() {
        let bad_name = yasna::construct_der(|w| {
            w.write_sequence_of(|w| w.next().write_utf8_string("no spaces allowed"))
        });
        for content in [vec![0x30, 0x05, 0x0c], bad_name, vec![0x04, 0x00]] {
            assert!(PeerCert::from_der(&with_extension(content)).is_err());
        }
    }
}
