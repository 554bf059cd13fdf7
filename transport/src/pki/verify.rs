//! rustls verifiers for the mesh. They wrap, never replace, the standard WebPKI
//! chain check (signature, validity, EKU) and then add meshnode's rule: the peer
//! holds a node certificate of *this* mesh. Pool-level rules (same cluster for
//! the LAN pool, gateway-only for the WAN pool) are checked on the verified
//! [`PeerCert`] after the handshake, per protocol.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use super::revocation::RevocationSet;
use super::PeerCert;

/// The pure part: does this (chain-verified) certificate belong to `mesh`?
pub fn check_mesh(end_entity: &[u8], mesh: &str) -> Result<PeerCert, String> {
    let peer = PeerCert::from_der(end_entity).map_err(|e| e.to_string())?;
    if peer.identity.mesh() != mesh {
        return Err(format!(
            "peer {} belongs to mesh {:?}, not {:?}",
            peer.identity,
            peer.identity.mesh(),
            mesh
        ));
    }
    Ok(peer)
}

/// The chain-verified certificate must be of `mesh` and not revoked.
fn admit(end_entity: &[u8], mesh: &str, revoked: &RevocationSet) -> Result<(), Refusal> {
    let peer = PeerCert::from_der(end_entity).map_err(|e| Refusal {
        reason: "bad_identity",
        detail: e.to_string(),
    })?;
    if peer.identity.mesh() != mesh {
        return Err(Refusal {
            reason: "other_mesh",
            detail: format!("{} is not of mesh {mesh:?}", peer.identity),
        });
    }
    if revoked.is_revoked(&peer) {
        return Err(Refusal {
            reason: "revoked",
            detail: format!("{} is revoked", peer.identity),
        });
    }
    Ok(())
}

/// Why a peer certificate was refused: `reason` is a label from a small fixed
/// set, `detail` is for this node's log only.
#[derive(Debug)]
pub struct Refusal {
    pub reason: &'static str,
    pub detail: String,
}

impl From<rustls::Error> for Refusal {
    fn from(e: rustls::Error) -> Self {
        use rustls::CertificateError as C;
        let reason = match &e {
            rustls::Error::InvalidCertificate(c) => match c {
                C::Expired | C::ExpiredContext { .. } => "expired",
                C::NotValidYet | C::NotValidYetContext { .. } => "not_yet_valid",
                C::Revoked => "revoked",
                C::UnknownIssuer => "unknown_ca",
                C::BadSignature
                | C::UnsupportedSignatureAlgorithmContext { .. }
                | C::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => "bad_signature",
                C::InvalidPurpose | C::InvalidPurposeContext { .. } => "bad_purpose",
                C::BadEncoding | C::UnhandledCriticalExtension => "malformed",
                _ => "invalid",
            },
            _ => "invalid",
        };
        Refusal {
            reason,
            detail: e.to_string(),
        }
    }
}

static REFUSAL_LOG: crate::LogLimit = crate::LogLimit::new(std::time::Duration::from_secs(10));

/// Counts and logs a refusal here, with its detail, and answers the peer with
/// a generic error: only `certificate_expired` and `certificate_revoked`
/// say more, because a node needs them to tell its operator why it is
/// refused. The rest (`access_denied`) names no mesh, CA or identity.
fn refuse(side: &'static str, r: Refusal) -> rustls::Error {
    metrics::counter!(crate::metrics::HANDSHAKES_REFUSED, "side" => side, "reason" => r.reason)
        .increment(1);
    if REFUSAL_LOG.allow_for(r.reason) {
        tracing::info!(side, reason = r.reason, detail = %r.detail, "peer certificate refused (logged at most once per 10 s per reason; see meshnode_handshakes_refused_total)");
    } else {
        tracing::debug!(side, reason = r.reason, detail = %r.detail, "peer certificate refused");
    }
    rustls::Error::InvalidCertificate(match r.reason {
        "expired" | "not_yet_valid" => rustls::CertificateError::Expired,
        "revoked" => rustls::CertificateError::Revoked,
        _ => rustls::CertificateError::ApplicationVerificationFailure,
    })
}

fn reject(reason: String) -> rustls::Error {
    tracing::debug!(%reason, "rejected peer certificate");
    rustls::Error::General(reason)
}

/// Server side: verifies a client's certificate.
pub struct MeshClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    mesh: String,
    revoked: Arc<RevocationSet>,
}

/// Client side: verifies a server's certificate. SPIFFE IDs are not DNS names,
/// so the server name is not checked; the identity check replaces it.
pub struct MeshServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    mesh: String,
    revoked: Arc<RevocationSet>,
}

/// A joiner's view of the server: it knows only the CA's SHA-256 fingerprint
/// (from the token). The server's chain must include a certificate with that
/// fingerprint; the rest is [`MeshServerVerifier`]'s check with that
/// certificate as the only root and its trust domain as the mesh.
pub struct FingerprintVerifier {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
    /// No roots: only its signature checks are used, which need none.
    signatures: MeshServerVerifier,
}

// === impl MeshClientVerifier ===

impl MeshClientVerifier {
    pub fn new(
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
        mesh: &str,
        revoked: Arc<RevocationSet>,
    ) -> Result<Self, rustls::server::VerifierBuilderError> {
        let inner = WebPkiClientVerifier::builder_with_provider(roots, provider).build()?;
        Ok(Self {
            inner,
            mesh: mesh.to_string(),
            revoked,
        })
    }
}

impl fmt::Debug for MeshClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshClientVerifier")
            .field("mesh", &self.mesh)
            .finish()
    }
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    /// A certificate is always requested and, when sent, fully verified; TLS
    /// lets a client without one through only so that a joining machine can
    /// reach `meshnode-join/1`. The endpoint closes every other protocol's
    /// connection that has no verified peer certificate.
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| refuse("server", e.into()))?;
        admit(end_entity, &self.mesh, &self.revoked).map_err(|r| refuse("server", r))?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

// === impl MeshServerVerifier ===

impl MeshServerVerifier {
    pub fn new(
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
        mesh: &str,
        revoked: Arc<RevocationSet>,
    ) -> Self {
        Self {
            roots,
            provider,
            mesh: mesh.to_string(),
            revoked,
        }
    }
}

impl fmt::Debug for MeshServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshServerVerifier")
            .field("mesh", &self.mesh)
            .finish()
    }
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed =
            ParsedCertificate::try_from(end_entity).map_err(|e| refuse("client", e.into()))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )
        .map_err(|e| refuse("client", e.into()))?;
        admit(end_entity, &self.mesh, &self.revoked).map_err(|r| refuse("client", r))?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// === impl FingerprintVerifier ===

impl FingerprintVerifier {
    pub fn new(fingerprint: [u8; 32], provider: Arc<CryptoProvider>) -> Self {
        Self {
            fingerprint,
            signatures: MeshServerVerifier::new(
                Arc::new(RootCertStore::empty()),
                provider.clone(),
                "",
                Arc::new(RevocationSet::default()),
            ),
            provider,
        }
    }
}

impl fmt::Debug for FingerprintVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FingerprintVerifier")
            .field("fingerprint", &super::hex(&self.fingerprint))
            .finish()
    }
}

impl ServerCertVerifier for FingerprintVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| super::fingerprint(c) == self.fingerprint)
            .ok_or_else(|| {
                reject(format!(
                    "the server does not hold a certificate of the CA {} named by the token",
                    super::hex(&self.fingerprint)
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let mesh = super::ca::mesh_of_ca_der(ca).map_err(|e| reject(e.to_string()))?;
        MeshServerVerifier::new(
            Arc::new(roots),
            self.provider.clone(),
            &mesh,
            Arc::new(RevocationSet::default()),
        )
        .verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::pki::{Ca, Role};

    fn der(pem: &str) -> CertificateDer<'static> {
        crate::pki::files::parse_certs("t", pem).unwrap().remove(0)
    }

    fn verifier(ca: &Ca, mesh: &str) -> MeshServerVerifier {
        let mut roots = RootCertStore::empty();
        roots.add(der(ca.cert_pem())).unwrap();
        MeshServerVerifier::new(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
            mesh,
            Arc::new(RevocationSet::default()),
        )
    }

    fn verify(v: &MeshServerVerifier, pem: &str) -> Result<ServerCertVerified, rustls::Error> {
        let name = ServerName::try_from("meshnode").unwrap();
        v.verify_server_cert(&der(pem), &[], &name, &[], UnixTime::now())
    }

    #[test]
    fn accepts_own_mesh_and_rejects_foreign_ca_and_mesh() {
        let ca = Ca::generate("acme", Duration::from_secs(3600)).unwrap();
        let other = Ca::generate("acme", Duration::from_secs(3600)).unwrap();
        let good = ca
            .issue("east", "a", Role::Node, Duration::from_secs(60))
            .unwrap();
        let foreign = other
            .issue("east", "a", Role::Node, Duration::from_secs(60))
            .unwrap();
        assert!(verify(&verifier(&ca, "acme"), &good.cert_pem).is_ok());
        assert!(verify(&verifier(&ca, "acme"), &foreign.cert_pem).is_err());
        // Same CA, but this verifier serves another trust domain: refused,
        // and the peer learns nothing of either mesh.
        let err = verify(&verifier(&ca, "globex"), &good.cert_pem).unwrap_err();
        assert!(!err.to_string().contains("globex"), "{err}");
        assert!(!err.to_string().contains("acme"), "{err}");
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure
            )
        );
    }

    #[test]
    fn fingerprint_verifier_needs_the_named_ca_in_the_chain() {
        let ca = Ca::generate("acme", Duration::from_secs(3600)).unwrap();
        let other = Ca::generate("acme", Duration::from_secs(3600)).unwrap();
        let node = ca
            .issue("east", "a", Role::Node, Duration::from_secs(60))
            .unwrap();
        let name = ServerName::try_from("meshnode").unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let v = FingerprintVerifier::new(ca.fingerprint().unwrap(), provider.clone());
        let leaf = der(&node.cert_pem);
        assert!(v
            .verify_server_cert(&leaf, &[der(ca.cert_pem())], &name, &[], UnixTime::now())
            .is_ok());
        // No CA in the chain, or a CA with another fingerprint.
        assert!(v
            .verify_server_cert(&leaf, &[], &name, &[], UnixTime::now())
            .is_err());
        let w = FingerprintVerifier::new(other.fingerprint().unwrap(), provider);
        assert!(w
            .verify_server_cert(&leaf, &[der(ca.cert_pem())], &name, &[], UnixTime::now())
            .is_err());
        // The right CA in the chain, but a leaf it did not sign.
        let forged = other
            .issue("east", "a", Role::Node, Duration::from_secs(60))
            .unwrap();
        assert!(v
            .verify_server_cert(
                &der(&forged.cert_pem),
                &[der(ca.cert_pem())],
                &name,
                &[],
                UnixTime::now()
            )
            .is_err());
    }
}
