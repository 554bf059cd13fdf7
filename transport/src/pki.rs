//! The mesh PKI: SPIFFE identities, the mesh CA, certificate parsing and the
//! rustls verifiers that add meshnode's checks on top of the standard chain check.

mod ca;
mod cert;
pub(crate) mod files;
mod identity;
pub mod verify;

pub use ca::{Ca, IssuedCert, DEFAULT_CA_VALIDITY, DEFAULT_NODE_VALIDITY};
pub use cert::{not_after, PeerCert, Role};
pub use files::{read_private_key, write_private_file};
pub use identity::{check_name, Identity, IdentityError};

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
}
