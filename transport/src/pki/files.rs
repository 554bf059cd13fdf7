//! Key and certificate files: private keys are written 0600 and refused when
//! anyone but the owner can read them.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

use super::PkiError;

/// Writes a file that only its owner may read, refusing to replace an existing one.
pub fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    write_file(path, contents, 0o600)
}

pub(crate) fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let shown = path.display().to_string();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::Exists {
                    path: shown.clone(),
                }
            } else {
                PkiError::Write {
                    path: shown.clone(),
                    source,
                }
            }
        })?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(|source| PkiError::Write {
            path: shown,
            source,
        })
}

/// Replaces `path` atomically (write a temporary file, fsync, rename), with `mode`.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    let _ = fs::remove_file(&tmp);
    write_file(&tmp, contents, mode)?;
    fs::rename(&tmp, path).map_err(|source| PkiError::Write {
        path: path.display().to_string(),
        source,
    })
}

pub(crate) fn read_text(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Reads a PEM private key, refusing one that group or others can access.
pub fn read_private_key(path: &Path) -> Result<(String, PrivateKeyDer<'static>), PkiError> {
    let shown = path.display().to_string();
    let meta = fs::metadata(path).map_err(|source| PkiError::Read {
        path: shown.clone(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PkiError::KeyPermissions { path: shown, mode });
    }
    let pem = read_text(path)?;
    let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| PkiError::NoPem {
        what: shown,
        expected: "a PKCS#8 private key",
    })?;
    Ok((pem, der))
}

/// Reads every certificate of a PEM file, leaf first.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let pem = read_text(path)?;
    parse_certs(&path.display().to_string(), &pem)
}

pub(crate) fn parse_certs(what: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    match certs {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        Ok(_) => Err(PkiError::NoPem {
            what: what.to_string(),
            expected: "a CERTIFICATE block",
        }),
        Err(e) => Err(PkiError::BadCertificate {
            what: what.to_string(),
            reason: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_0600_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.key");
        write_private_file(&p, b"secret").unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            write_private_file(&p, b"again"),
            Err(PkiError::Exists { .. })
        ));
    }

    #[test]
    fn world_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.key");
        write_private_file(&p, b"not a key").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_private_key(&p).unwrap_err();
        assert!(matches!(err, PkiError::KeyPermissions { mode: 0o644, .. }));
        assert!(err.to_string().contains("chmod 600"));
    }
}
