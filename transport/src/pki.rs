//! The mesh PKI: SPIFFE identities, the mesh CA, certificate parsing and the
//! rustls verifiers that add meshnode's checks on top of the standard chain check.

mod ca;
mod cert;
pub(crate) mod files;
mod identity;
pub mod join;
pub mod operator;
pub mod policy;
pub mod revocation;
pub mod sign;
pub mod token;
pub mod verify;

pub use ca::{
    csr_key_id, mesh_of_ca_der, mesh_of_ca_pem, Ca, IssuedCert, IssuedKey, DEFAULT_CA_VALIDITY,
    DEFAULT_NODE_VALIDITY,
};
pub use cert::{check_services, not_after, PeerCert, Role, MAX_CERT_SERVICES, SERVICES_OID};
pub use files::{read_private_key, write_atomic, write_private_file};
pub use identity::{check_name, Identity, IdentityError};

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

pub use crate::clock::unix_now;

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Compares two secrets in constant time (for equal lengths; a length
/// mismatch is answered at once, which reveals only the length).
pub fn secret_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

/// Bytes of a lower- or upper-case hex text; `None` if it is not hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// The DER of the first certificate of a PEM text.
pub fn first_cert_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    let certs = files::parse_certs("certificate", pem)?;
    certs
        .first()
        .map(|c| c.to_vec())
        .ok_or_else(|| PkiError::NoPem {
            what: "certificate".into(),
            expected: "a CERTIFICATE block",
        })
}

/// The SHA-256 fingerprint of a certificate (DER), as carried in join tokens.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    sha256(der)
}

/// Everything that can go wrong with certificates and keys.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} already exists; refusing to overwrite it (move it away first)")]
    Exists { path: String },
    #[error(
        "private key {path} is accessible by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    KeyPermissions { path: String, mode: u32 },
    #[error("{what}: no PEM block found (expected {expected})")]
    NoPem {
        what: String,
        expected: &'static str,
    },
    #[error("{what}: {reason}")]
    BadCertificate { what: String, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("signing request: {0}")]
    Csr(String),
}
