//! rustls and quinn configuration: TLS 1.3 only, ring only, mutual authentication always.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, SignatureScheme};

use crate::alpn;
use crate::pki::files::{parse_certs, read_certs};
use crate::pki::revocation::RevocationSet;
use crate::pki::verify::{FingerprintVerifier, MeshClientVerifier, MeshServerVerifier};
use crate::pki::{read_private_key, PeerCert, PkiError};

/// A node's credentials: the CA it trusts, the certificate it presents (swapped
/// in place on renewal: rustls asks the resolvers at every handshake, so live
/// connections keep running and new ones use the new certificate) and the
/// revocations in force.
pub struct TlsMaterial {
    ca: Vec<CertificateDer<'static>>,
    roots: Arc<RootCertStore>,
    mesh: String,
    current: RwLock<Arc<Current>>,
    revoked: Arc<RevocationSet>,
    /// Peers that refused this node's own certificate as revoked.
    refused_as_revoked: SelfRevoked,
}

/// How often, and when last, a peer refused this node's certificate as
/// revoked (a `certificate_revoked` alert at the handshake, or a live
/// connection closed with "certificate revoked"): a revoked node cannot
/// learn its revocation by gossip, since nobody gossips with it.
#[derive(Default)]
pub struct SelfRevoked {
    count: std::sync::atomic::AtomicU64,
    last: std::sync::atomic::AtomicI64,
}

impl SelfRevoked {
    pub fn note(&self, unix_now: i64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.count.fetch_add(1, Relaxed);
        self.last.store(unix_now, Relaxed);
    }

    /// `(refusals, last one in Unix seconds)`, if any.
    pub fn get(&self) -> Option<(u64, i64)> {
        use std::sync::atomic::Ordering::Relaxed;
        let n = self.count.load(Relaxed);
        (n > 0).then(|| (n, self.last.load(Relaxed)))
    }
}

/// Whether a connection error says the peer refused our certificate as revoked.
pub fn refused_as_revoked(e: &quinn::ConnectionError) -> bool {
    match e {
        quinn::ConnectionError::ConnectionClosed(c) => {
            // A TLS alert is the crypto error 0x100 + alert: certificate_revoked is 44.
            c.error_code == quinn::TransportErrorCode::crypto(0x2c)
        }
        quinn::ConnectionError::ApplicationClosed(c) => {
            c.error_code == quinn::VarInt::from_u32(crate::endpoint::CLOSE_REVOKED)
                && c.reason.as_ref() == b"certificate revoked"
        }
        _ => false,
    }
}

struct Current {
    me: PeerCert,
    /// The node certificate alone, for mesh peers.
    plain: Arc<CertifiedKey>,
    /// Node certificate plus CA, for joiners that know only the CA's fingerprint.
    with_ca: Arc<CertifiedKey>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("node certificate {path}: {reason}")]
    NodeCert { path: String, reason: String },
    #[error("the node certificate was not issued by the configured CA ({ca}): {reason}")]
    NotFromCa { ca: String, reason: String },
    #[error("renewed certificate refused: {0}")]
    Renewal(String),
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
        let mut roots = RootCertStore::empty();
        for c in &ca {
            roots.add(c.clone())?;
        }
        let signing = provider().key_provider.load_private_key(key)?;
        let current = Current::new(me, chain, signing, &ca);
        // rustls checks that the key matches the certificate where it can.
        match current.plain.keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(e) => {
                return Err(TlsError::NodeCert {
                    path: cert_name.to_string(),
                    reason: format!("the key file does not belong to this certificate ({e})"),
                })
            }
        }
        let material = Self {
            mesh: current.me.identity.mesh().to_string(),
            ca,
            roots: Arc::new(roots),
            current: RwLock::new(Arc::new(current)),
            revoked: Arc::new(RevocationSet::default()),
            refused_as_revoked: SelfRevoked::default(),
        };
        // Fail at startup, not at the first handshake, when cert and CA do not match.
        material
            .verify_own(&material.current().plain.cert)
            .map_err(|e| TlsError::NotFromCa {
                ca: ca_name.to_string(),
                reason: e.to_string(),
            })?;
        Ok(material)
    }

    /// Checks a chain (leaf first) the way a peer would at a handshake: chain
    /// to the mesh CA, validity, mesh, and `revoked`.
    fn check_chain(
        &self,
        chain: &[CertificateDer<'_>],
        revoked: Arc<RevocationSet>,
    ) -> Result<(), rustls::Error> {
        let name = rustls::pki_types::ServerName::try_from("meshnode")
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let (leaf, rest) = chain
            .split_first()
            .ok_or_else(|| rustls::Error::General("empty chain".into()))?;
        let verifier = MeshServerVerifier::new(self.roots.clone(), provider(), &self.mesh, revoked);
        rustls::client::danger::ServerCertVerifier::verify_server_cert(
            &verifier,
            leaf,
            rest,
            &name,
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .map(|_| ())
    }

    /// Our own certificate: not subject to the revocations we enforce on peers.
    fn verify_own(&self, chain: &[CertificateDer<'_>]) -> Result<(), rustls::Error> {
        self.check_chain(chain, Arc::new(RevocationSet::default()))
    }

    fn current(&self) -> Arc<Current> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Swaps in a renewed certificate (PEM) for the same identity, role and key.
    /// Handshakes from now on present it; live connections are untouched.
    pub fn renew(&self, cert_pem: &str) -> Result<PeerCert, TlsError> {
        let chain = parse_certs("renewed certificate", cert_pem)?;
        let leaf = chain
            .first()
            .ok_or_else(|| TlsError::Renewal("empty".into()))?;
        let new = PeerCert::from_der(leaf).map_err(|e| TlsError::Renewal(e.to_string()))?;
        let old = self.current();
        if new.identity != old.me.identity || new.role != old.me.role {
            return Err(TlsError::Renewal(format!(
                "it is for {} ({}), this node is {} ({})",
                new.identity, new.role, old.me.identity, old.me.role
            )));
        }
        if new.key_id != old.me.key_id {
            return Err(TlsError::Renewal("it is not for this node's key".into()));
        }
        self.verify_own(&chain)
            .map_err(|e| TlsError::Renewal(format!("does not chain to the mesh CA: {e}")))?;
        let next = Current::new(new.clone(), chain, old.plain.key.clone(), &self.ca);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        Ok(new)
    }

    /// When the first of the trusted CA certificates expires (Unix seconds).
    pub fn ca_not_after(&self) -> Option<i64> {
        self.ca
            .iter()
            .filter_map(|c| crate::pki::not_after(c).ok())
            .min()
    }

    /// The trusted CA certificates (DER), e.g. to check revocation signatures.
    pub fn ca_certs(&self) -> &[CertificateDer<'static>] {
        &self.ca
    }

    pub fn mesh(&self) -> &str {
        &self.mesh
    }

    /// The current node certificate (DER), e.g. for a renewal request.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.current().plain.cert[0].clone()
    }

    /// Checks a certificate (DER) the way a peer would at a handshake: chain
    /// to the mesh CA, validity, mesh, revocation.
    pub fn verify_peer(&self, der: &[u8]) -> Result<PeerCert, TlsError> {
        self.check_chain(&[CertificateDer::from(der)], self.revoked.clone())?;
        Ok(PeerCert::from_der(der)?)
    }

    /// What this node's current certificate says.
    pub fn me(&self) -> PeerCert {
        self.current().me.clone()
    }

    /// Peers refusing this node's certificate as revoked.
    pub fn refused_as_revoked(&self) -> &SelfRevoked {
        &self.refused_as_revoked
    }

    /// The revocations the verifiers enforce.
    pub fn revocations(&self) -> &Arc<RevocationSet> {
        &self.revoked
    }

    /// The server side of the node's endpoint: serves every meshnode ALPN.
    ///
    /// A client certificate is requested but not required by TLS, because a
    /// joining machine has none yet; the endpoint closes every connection
    /// without one unless it negotiated `meshnode-join/1`.
    pub fn server_config(
        self: &Arc<Self>,
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ServerConfig, TlsError> {
        let tls = self.rustls_server(alpn::ALL.iter().map(|a| a.to_vec()).collect())?;
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| TlsError::Quic(e.to_string()))?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
        cfg.transport_config(transport);
        Ok(cfg)
    }

    /// A client config offering `alpn` (versions of one protocol, newest first).
    pub fn client_config(
        self: &Arc<Self>,
        alpn: &[&[u8]],
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ClientConfig, TlsError> {
        let tls = self.rustls_client(alpn.iter().map(|a| a.to_vec()).collect())?;
        quic_client(tls, transport)
    }

    /// TLS 1.3, the node's current certificate, the mesh's client verifier
    /// (chain, mesh, revocations), no resumption: a resumed TLS 1.3 session
    /// skips the certificate check, so a revoked or expired peer could come
    /// back on a ticket.
    fn rustls_server(
        self: &Arc<Self>,
        alpn: Vec<Vec<u8>>,
    ) -> Result<rustls::ServerConfig, TlsError> {
        let verifier = MeshClientVerifier::new(
            self.roots.clone(),
            provider(),
            &self.mesh,
            self.revoked.clone(),
        )?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        tls.alpn_protocols = alpn;
        tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        tls.send_tls13_tickets = 0;
        Ok(tls)
    }

    /// The client side of [`TlsMaterial::rustls_server`].
    fn rustls_client(
        self: &Arc<Self>,
        alpn: Vec<Vec<u8>>,
    ) -> Result<rustls::ClientConfig, TlsError> {
        let verifier = MeshServerVerifier::new(
            self.roots.clone(),
            provider(),
            &self.mesh,
            self.revoked.clone(),
        );
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(Resolver(self.clone())));
        tls.alpn_protocols = alpn;
        tls.resumption = rustls::client::Resumption::disabled();
        Ok(tls)
    }
}

// === end-to-end sessions (see `tunnel::e2e`) ===

impl TlsMaterial {
    /// rustls server config of an end-to-end session: TLS 1.3, the node's
    /// current certificate, the mesh's client verifier (chain, mesh,
    /// revocations), no resumption. A client certificate is requested; the
    /// session is refused after the handshake if none was sent.
    pub fn e2e_server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, TlsError> {
        self.rustls_server(vec![alpn::E2E.to_vec()])
    }

    /// The client side of [`TlsMaterial::e2e_server_config`].
    pub fn e2e_client_config(self: &Arc<Self>) -> Result<rustls::ClientConfig, TlsError> {
        self.rustls_client(vec![alpn::E2E.to_vec()])
    }
}

/// The client config of a machine that joins: no certificate of its own, and
/// the server must present a chain to the CA whose SHA-256 fingerprint the
/// token carries, or the handshake fails before the token is sent.
pub fn join_client_config(
    ca_fingerprint: [u8; 32],
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, TlsError> {
    let verifier = FingerprintVerifier::new(ca_fingerprint, provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn::JOIN.to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    quic_client(tls, transport)
}

fn quic_client(
    tls: rustls::ClientConfig,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, TlsError> {
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport);
    Ok(cfg)
}

// === impl Current ===

impl Current {
    fn new(
        me: PeerCert,
        chain: Vec<CertificateDer<'static>>,
        key: Arc<dyn rustls::sign::SigningKey>,
        ca: &[CertificateDer<'static>],
    ) -> Self {
        let mut full = chain.clone();
        full.extend(ca.iter().cloned());
        Self {
            me,
            plain: Arc::new(CertifiedKey::new(chain, key.clone())),
            with_ca: Arc::new(CertifiedKey::new(full, key)),
        }
    }
}

/// Hands rustls the current certificate at every handshake.
struct Resolver(Arc<TlsMaterial>);

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Resolver").field(&self.0.mesh).finish()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self.0.current();
        let joining = hello
            .alpn()
            .is_some_and(|mut offered| offered.any(|a| a == alpn::JOIN));
        Some(if joining {
            current.with_ca.clone()
        } else {
            current.plain.clone()
        })
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().plain.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The largest UDP payload we probe for and accept. quinn sends up to 10
/// segments in one GSO batch and the kernel refuses (EMSGSIZE, which quinn
/// drops silently) a batch over 64 KiB, so 10 of these must fit in it. Path
/// MTU discovery settles below this on 1500-byte links; on loopback and
/// jumbo-frame networks it cuts the per-packet work (crypto, syscalls, ACKs).
pub const MAX_UDP_PAYLOAD: u16 = 6_500;
// 10 segments plus the IPv4 and UDP headers must fit in one 64 KiB datagram.
const _: () = assert!(10 * MAX_UDP_PAYLOAD as usize + 20 + 8 <= 65_535);

/// Endpoint settings: advertise that we receive datagrams up to [`MAX_UDP_PAYLOAD`].
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut e = quinn::EndpointConfig::default();
    // Within quinn's 1200..=65527 bounds, so this cannot fail.
    let _ = e.max_udp_payload_size(MAX_UDP_PAYLOAD);
    e
}

/// Concurrent tunnel streams a peer may open on one connection: one per
/// proxied TCP connection (4,096 stalled the 4,097th of a node pair).
pub const TUNNEL_STREAMS: u32 = 16_384;

/// What a connection is for, as far as its liveness settings go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// The accepting side of every protocol: no keep-alives of its own (the
    /// dialler's settings decide; QUIC takes the smaller idle timeout).
    Server,
    /// Gossip: no keep-alives and a long idle timeout. Probes, pushes and
    /// anti-entropy reach every peer of a pool now and then, and the prober,
    /// not the connection, decides who is alive; keep-alives on a connection
    /// per peer would cost idle bytes that grow with the pool.
    Gossip,
    /// Tunnels and joins: keep-alives every 2 s and a 10 s idle timeout, so
    /// a pooled connection to a dead peer is noticed quickly.
    Tunnel,
}

impl Link {
    pub fn keep_alive(self) -> Option<Duration> {
        match self {
            Link::Tunnel => Some(Duration::from_secs(2)),
            Link::Server | Link::Gossip => None,
        }
    }

    pub fn idle_timeout(self) -> Duration {
        match self {
            Link::Tunnel => Duration::from_secs(10),
            Link::Server | Link::Gossip => Duration::from_secs(300),
        }
    }
}

/// QUIC transport settings of the endpoint's connections, by [`Link`]."
///
/// quinn's defaults allow 100 bidi streams, 1.25 MB per-stream windows with
/// no connection cap, and no keep-alive. The connection receive window starts
/// at [`crate::window::MIN_RECEIVE_WINDOW`] and follows the path's RTT (see
/// [`crate::window`]); the send window bounds what we buffer for a peer. quinn allocates a slot for every
/// stream the peer may open as soon as a connection is up, so the limits here
/// are small (gossip: one uni stream per message; join: a few bidi streams)
/// and an accepted tunnel connection is raised to [`TUNNEL_STREAMS`]: with
/// 16,384 on every connection, each gossip peer cost ~2 MiB of RSS.
pub fn transport_config(link: Link) -> quinn::TransportConfig {
    const STREAM_WINDOW: u32 = 1024 * 1024;
    const SEND_WINDOW: u64 = 16 * 1024 * 1024;
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(32u32.into())
        .max_concurrent_uni_streams(64u32.into())
        .stream_receive_window(STREAM_WINDOW.into())
        .receive_window(crate::window::MIN_RECEIVE_WINDOW.into())
        .send_window(SEND_WINDOW)
        .keep_alive_interval(link.keep_alive())
        .max_idle_timeout(Some(
            quinn::VarInt::from_u32(link.idle_timeout().as_millis() as u32).into(),
        ));
    // Path MTU discovery sends a binary search of probes (up to 6.5 KB each,
    // about 50 KB with quinn's 20-byte steps) on every new connection.
    // Gossip messages are small: its dialled connections skip it. The
    // accepting side serves tunnels too, whose downloads want the large
    // packets, so it searches in coarse steps (3 probes instead of ~9).
    match link {
        Link::Gossip => {
            t.mtu_discovery_config(None);
        }
        Link::Server | Link::Tunnel => {
            let mut mtu = quinn::MtuDiscoveryConfig::default();
            mtu.upper_bound(MAX_UDP_PAYLOAD);
            if link == Link::Server {
                mtu.minimum_change(1000);
            }
            t.mtu_discovery_config(Some(mtu));
        }
    }
    t
}

impl crate::pki::policy::PolicyTrust for TlsMaterial {
    fn mesh(&self) -> &str {
        &self.mesh
    }

    fn verify_ca(&self, msg: &[u8], sig: &[u8]) -> bool {
        self.ca
            .iter()
            .any(|ca| crate::pki::sign::verify_ca_signature(ca, msg, sig).is_ok())
    }

    /// The standard WebPKI client check (chain, validity, clientAuth usage),
    /// as of the signing time rather than now.
    fn verify_operator_chain(&self, der: &[u8], at: i64) -> Result<(), (bool, String)> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots.clone(),
            provider(),
        )
        .build()
        .map_err(|e| (false, e.to_string()))?;
        let at = rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
            u64::try_from(at).unwrap_or(0),
        ));
        verifier
            .verify_client_cert(&CertificateDer::from(der), &[], at)
            .map(|_| ())
            .map_err(|e| {
                use rustls::CertificateError as C;
                let expired = matches!(
                    e,
                    rustls::Error::InvalidCertificate(
                        C::Expired
                            | C::ExpiredContext { .. }
                            | C::NotValidYet
                            | C::NotValidYetContext { .. }
                    )
                );
                (expired, e.to_string())
            })
    }

    fn key_revoked_at(&self, key_id: &str) -> Option<i64> {
        self.revoked.key_revoked_at(key_id)
    }
}
