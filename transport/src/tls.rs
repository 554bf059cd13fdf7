//! rustls and quinn configuration: TLS 1.3 only, ring only, mutual authentication always.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

use crate::alpn;
use crate::pki::files::{parse_certs, read_certs};
use crate::pki::verify::{MeshClientVerifier, MeshServerVerifier};
use crate::pki::{read_private_key, PeerCert, PkiError};

/// A node's credentials: the CA it trusts and the certificate it presents.
pub struct TlsMaterial {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    me: PeerCert,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("node certificate {path}: {reason}")]
    NodeCert { path: String, reason: String },
    #[error("the node certificate was not issued by the configured CA ({ca}): {reason}")]
    NotFromCa { ca: String, reason: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS configuration: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC cannot use this TLS configuration: {0}")]
    Quic(String),
}

/// The crypto provider used everywhere: one provider, never the process default
/// (two compiled-in providers make `ServerConfig::builder()` panic).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// === impl TlsMaterial ===

impl TlsMaterial {
    /// Loads PEM files; refuses a key file that others can read.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let ca_certs = read_certs(ca)?;
        let chain = read_certs(cert)?;
        let (_, key_der) = read_private_key(key)?;
        Self::new(
            ca_certs,
            chain,
            key_der,
            &cert.display().to_string(),
            &ca.display().to_string(),
        )
    }

    /// Builds material from PEM strings (used by tests and by `join`).
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        use rustls::pki_types::pem::PemObject;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| PkiError::NoPem {
                what: "node key".into(),
                expected: "a PKCS#8 private key",
            })?;
        Self::new(
            parse_certs("CA", ca_pem)?,
            parse_certs("node certificate", cert_pem)?,
            key,
            "node certificate",
            "CA",
        )
    }

    fn new(
        ca: Vec<CertificateDer<'static>>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        cert_name: &str,
        ca_name: &str,
    ) -> Result<Self, TlsError> {
        let leaf = chain.first().ok_or_else(|| TlsError::NodeCert {
            path: cert_name.to_string(),
            reason: "empty".into(),
        })?;
        let me = PeerCert::from_der(leaf).map_err(|e| TlsError::NodeCert {
            path: cert_name.to_string(),
            reason: e.to_string(),
        })?;
        let material = Self { ca, chain, key, me };
        // Fail at startup, not at the first handshake, when cert and CA do not match.
        let name = rustls::pki_types::ServerName::try_from("meshnode")
            .map_err(|e| TlsError::Quic(e.to_string()))?;
        let verifier =
            MeshServerVerifier::new(material.roots()?, provider(), material.me.identity.mesh());
        rustls::client::danger::ServerCertVerifier::verify_server_cert(
            &verifier,
            &material.chain[0],
            &material.chain[1..],
            &name,
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .map_err(|e| TlsError::NotFromCa {
            ca: ca_name.to_string(),
            reason: e.to_string(),
        })?;
        Ok(material)
    }

    /// When the first of the trusted CA certificates expires (Unix seconds).
    pub fn ca_not_after(&self) -> Option<i64> {
        self.ca
            .iter()
            .filter_map(|c| crate::pki::not_after(c).ok())
            .min()
    }

    /// What this node's own certificate says.
    pub fn me(&self) -> &PeerCert {
        &self.me
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone())?;
        }
        Ok(Arc::new(roots))
    }

    /// The server side of the node's endpoint: serves every meshnode ALPN.
    pub fn server_config(
        &self,
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ServerConfig, TlsError> {
        let verifier = MeshClientVerifier::new(self.roots()?, provider(), self.me.identity.mesh())?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        tls.alpn_protocols = alpn::ALL.iter().map(|a| a.to_vec()).collect();
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| TlsError::Quic(e.to_string()))?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
        cfg.transport_config(transport);
        Ok(cfg)
    }

    /// A client config that offers exactly one ALPN.
    pub fn client_config(
        &self,
        alpn: &[u8],
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ClientConfig, TlsError> {
        let verifier = MeshServerVerifier::new(self.roots()?, provider(), self.me.identity.mesh());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        tls.alpn_protocols = vec![alpn.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| TlsError::Quic(e.to_string()))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
        cfg.transport_config(transport);
        Ok(cfg)
    }
}

/// QUIC transport settings shared by both directions.
///
/// quinn's defaults allow 100 bidi streams (one per proxied TCP connection: too few),
/// 1.25 MB per-stream windows with no connection cap, and no keep-alive.
pub fn transport_config() -> quinn::TransportConfig {
    const STREAM_WINDOW: u32 = 1024 * 1024;
    const CONN_WINDOW: u32 = 16 * 1024 * 1024;
    const IDLE_TIMEOUT_MS: u32 = 10_000;
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(4096u32.into())
        .max_concurrent_uni_streams(1024u32.into())
        .stream_receive_window(STREAM_WINDOW.into())
        .receive_window(CONN_WINDOW.into())
        .send_window(u64::from(CONN_WINDOW))
        // A dead peer's pooled connection is noticed within the idle timeout;
        // keep-alives keep healthy idle connections open.
        .keep_alive_interval(Some(Duration::from_secs(2)))
        .max_idle_timeout(Some(quinn::VarInt::from_u32(IDLE_TIMEOUT_MS).into()));
    t
}
