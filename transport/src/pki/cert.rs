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

impl PeerCert {
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
