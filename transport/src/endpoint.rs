//! The node's single QUIC endpoint: accepts connections, dispatches them by
//! ALPN, and dials peers through a connection pool.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;
use tracing::{debug, info_span, Instrument};

use crate::admission::{Admission, Decision, Limits as AdmissionLimits};
use crate::alpn::Alpn;
use crate::metrics::{HANDSHAKES, HANDSHAKE_ADMISSION};
use crate::pki::PeerCert;
use crate::pool::{ConnectError, Pool};
use crate::tls::{endpoint_config, transport_config, Link, TlsError, TlsMaterial, TUNNEL_STREAMS};

/// A handshake that has not finished by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A pooled connection at least this old is dropped when its peer dials us anew.
const STALE_AFTER: Duration = Duration::from_secs(2);
/// Accepted connections waiting for their protocol's consumer.
const ACCEPT_QUEUE: usize = 256;

static ADMISSION_LOG: crate::LogLimit = crate::LogLimit::new(Duration::from_secs(10));
static REFUSED_LOG: crate::LogLimit = crate::LogLimit::new(Duration::from_secs(10));

/// A handshake refused for a reason other than the certificate's.
fn refused_handshake(reason: &'static str, detail: &str) {
    metrics::counter!(crate::metrics::HANDSHAKES_REFUSED, "side" => "server", "reason" => reason)
        .increment(1);
    if REFUSED_LOG.allow_for(reason) {
        tracing::info!(reason, detail, "incoming connection refused (logged at most once per 10 s per reason; see meshnode_handshakes_refused_total)");
    } else {
        debug!(reason, detail, "incoming connection refused");
    }
}

pub struct EndpointConfig {
    pub bind: SocketAddr,
    pub tls: Arc<TlsMaterial>,
}

/// A verified incoming connection and who is on the other end.
pub struct Accepted {
    pub conn: quinn::Connection,
    pub peer: PeerCert,
}

/// An incoming `meshnode-join/1` connection: from a machine without a
/// certificate (a join) or from a member (a renewal, or a forwarded join).
pub struct JoinConn {
    pub conn: quinn::Connection,
    pub peer: Option<PeerCert>,
}

/// Incoming connections, one queue per protocol.
pub struct Incoming {
    pub gossip: mpsc::Receiver<Accepted>,
    /// WAN pool gossip; only gateways consume it, other nodes drop these connections.
    pub wan: mpsc::Receiver<Accepted>,
    pub tunnel: mpsc::Receiver<Accepted>,
    pub join: mpsc::Receiver<JoinConn>,
}

/// A cheap handle to the endpoint.
#[derive(Clone)]
pub struct Endpoint {
    quic: quinn::Endpoint,
    tls: Arc<TlsMaterial>,
    pool: Arc<Pool>,
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot bind QUIC endpoint on udp {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

// === impl Endpoint ===

impl Endpoint {
    /// Binds the UDP socket and starts accepting. Must run inside a tokio runtime.
    pub fn bind(cfg: EndpointConfig) -> Result<(Endpoint, Incoming), EndpointError> {
        let server = cfg
            .tls
            .server_config(Arc::new(transport_config(Link::Server)))?;
        let tracker = Arc::new(Tracker::default());
        let bind_err = |source| EndpointError::Bind {
            addr: cfg.bind,
            source,
        };
        let socket = std::net::UdpSocket::bind(cfg.bind).map_err(bind_err)?;
        let quic = quinn::Endpoint::new(
            endpoint_config(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind_err)?;
        let clients = [Alpn::Gossip, Alpn::WanGossip, Alpn::Tunnel, Alpn::Join]
            .into_iter()
            .map(|a| {
                let link = match a {
                    Alpn::Gossip | Alpn::WanGossip => Link::Gossip,
                    Alpn::Tunnel | Alpn::Join => Link::Tunnel,
                };
                let transport = Arc::new(transport_config(link));
                Ok((a, cfg.tls.client_config(a.offers(), transport)?))
            })
            .collect::<Result<Vec<_>, TlsError>>()?;
        let pool = Arc::new(Pool::new(
            quic.clone(),
            clients,
            cfg.tls.clone(),
            tracker.clone(),
        ));
        let (gossip_tx, gossip) = mpsc::channel(ACCEPT_QUEUE);
        let (wan_tx, wan) = mpsc::channel(ACCEPT_QUEUE);
        let (tunnel_tx, tunnel) = mpsc::channel(ACCEPT_QUEUE);
        let (join_tx, join) = mpsc::channel(ACCEPT_QUEUE);
        let router = Router {
            gossip: gossip_tx,
            wan: wan_tx,
            tunnel: tunnel_tx,
            join: join_tx,
        };
        tokio::spawn(accept_loop(
            quic.clone(),
            router,
            pool.clone(),
            tracker.clone(),
        ));
        tokio::spawn(enforce(tracker, cfg.tls.clone()));
        Ok((
            Endpoint {
                quic,
                tls: cfg.tls,
                pool,
            },
            Incoming {
                gossip,
                wan,
                tunnel,
                join,
            },
        ))
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.quic.local_addr()
    }

    /// This node's current certificate.
    pub fn me(&self) -> PeerCert {
        self.tls.me()
    }

    /// The node's credentials (renewal, revocations, CA).
    pub fn tls(&self) -> &Arc<TlsMaterial> {
        &self.tls
    }

    /// A pooled connection to `addr` speaking `alpn`, dialled if needed.
    ///
    /// The handshake verified the server's chain and mesh. Note that with TLS 1.3
    /// a finished client handshake does not prove the server accepted *our*
    /// certificate: that shows on the first stream.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        alpn: Alpn,
    ) -> Result<(quinn::Connection, PeerCert), ConnectError> {
        self.pool.connect(addr, alpn).await
    }

    /// Pools a connection the peer dialled, for sending to it too, unless a
    /// live one is pooled already: one gossip connection per node pair
    /// instead of one per direction. Only for protocols where both sides
    /// read streams on every connection (gossip); a tunnel's acceptor never
    /// opens streams.
    pub fn adopt(&self, conn: &quinn::Connection, peer: &PeerCert, alpn: Alpn) {
        self.pool.adopt(conn.remote_address(), alpn, conn, peer);
    }

    /// Forgets the pooled connection to `addr` after it failed us, so the next
    /// `connect` dials again instead of reusing a connection to a dead peer.
    pub fn forget(&self, addr: SocketAddr, alpn: Alpn) {
        self.pool.forget(addr, alpn);
    }

    /// Forgets the pooled connection to `addr` if it was made before `than`:
    /// the peer at `addr` restarted then (its gossip says so), so ours went
    /// to the old process.
    pub fn forget_older(&self, addr: SocketAddr, alpn: Alpn, than: std::time::Instant) {
        self.pool.forget_older(addr, alpn, than);
    }

    /// The smoothed round-trip time of the pooled connection to `addr`, if one is open.
    pub fn rtt(&self, addr: SocketAddr, alpn: Alpn) -> Option<Duration> {
        self.pool.rtt(addr, alpn)
    }

    /// Closes every connection and stops accepting.
    pub fn close(&self) {
        self.quic
            .close(quinn::VarInt::from_u32(0), b"node shutting down");
    }

    /// Waits until all connections are closed (bounded by the peers' idle timeout).
    pub async fn wait_idle(&self) {
        self.quic.wait_idle().await;
    }
}

/// Reads the verified peer certificate of an established connection.
pub fn peer_cert(conn: &quinn::Connection) -> Option<PeerCert> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    PeerCert::from_der(certs.first()?).ok()
}

struct Router {
    gossip: mpsc::Sender<Accepted>,
    wan: mpsc::Sender<Accepted>,
    tunnel: mpsc::Sender<Accepted>,
    join: mpsc::Sender<JoinConn>,
}

/// Every live connection with a verified peer, so that a revocation or an
/// expired peer certificate closes it: TLS checks a certificate only at the
/// handshake. The same once-a-second sweep keeps each one's receive window
/// sized to its path (see [`crate::window`]).
#[derive(Default)]
pub(crate) struct Tracker {
    conns: Mutex<HashMap<usize, Tracked>>,
}

struct Tracked {
    conn: quinn::Connection,
    peer: PeerCert,
    since: Instant,
    /// The receive window last applied.
    window: u32,
}

impl Tracker {
    pub(crate) fn track(self: &Arc<Self>, conn: &quinn::Connection, peer: &PeerCert) {
        let id = conn.stable_id();
        self.lock().insert(
            id,
            Tracked {
                conn: conn.clone(),
                peer: peer.clone(),
                since: crate::clock::now(),
                window: crate::window::MIN_RECEIVE_WINDOW,
            },
        );
        let me = self.clone();
        let conn = conn.clone();
        tokio::spawn(async move {
            conn.closed().await;
            me.lock().remove(&id);
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<usize, Tracked>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Closes connections whose peer was revoked (at once) or whose peer
/// certificate expired (checked every second), and retunes the receive
/// window of every connection at least [`crate::window::RETUNE_EVERY`] old.
async fn enforce(tracker: Arc<Tracker>, tls: Arc<TlsMaterial>) {
    let mut changed = tls.revocations().subscribe();
    loop {
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            () = tokio::time::sleep(crate::window::RETUNE_EVERY) => {}
        }
        let now = crate::pki::unix_now();
        let revoked = tls.revocations();
        for t in tracker.lock().values_mut() {
            let why: &[u8] = if revoked.is_revoked(&t.peer) {
                b"certificate revoked"
            } else if t.peer.not_after < now {
                b"certificate expired"
            } else {
                if crate::clock::since(t.since) >= crate::window::RETUNE_EVERY {
                    t.window = crate::window::retune(&t.conn, t.window);
                }
                continue;
            };
            tracing::info!(peer = %t.peer.identity, reason = %String::from_utf8_lossy(why), "closing connection");
            metrics::counter!(crate::metrics::CLOSED_BY_PKI, "reason" => if why == b"certificate revoked" { "revoked" } else { "expired" }).increment(1);
            t.conn.close(quinn::VarInt::from_u32(CLOSE_REVOKED), why);
        }
    }
}

/// Application close code for connections cut by revocation or expiry.
pub const CLOSE_REVOKED: u32 = 0x40;

async fn accept_loop(
    quic: quinn::Endpoint,
    router: Router,
    pool: Arc<Pool>,
    tracker: Arc<Tracker>,
) {
    let router = Arc::new(router);
    let admission = Arc::new(Mutex::new(Admission::new(AdmissionLimits::default())));
    let clock = crate::clock::now();
    while let Some(incoming) = quic.accept().await {
        let remote = incoming.remote_address();
        let decision = admission.lock().unwrap_or_else(|e| e.into_inner()).decide(
            remote.ip(),
            incoming.remote_address_validated(),
            crate::clock::since(clock),
        );
        match decision {
            Decision::Accept => {}
            Decision::Retry => {
                metrics::counter!(HANDSHAKE_ADMISSION, "decision" => decision.as_str())
                    .increment(1);
                // Fails only if this Initial cannot be retried (it carried
                // a token already): then it is dropped.
                if incoming.may_retry() {
                    let _ = incoming.retry();
                } else {
                    incoming.ignore();
                }
                continue;
            }
            Decision::IgnoreBusy | Decision::IgnoreRate => {
                metrics::counter!(HANDSHAKE_ADMISSION, "decision" => decision.as_str())
                    .increment(1);
                if ADMISSION_LOG.allow() {
                    tracing::info!(%remote, decision = decision.as_str(), "incoming handshakes shed (logged at most once per 10 s; see meshnode_quic_admission_total)");
                }
                incoming.ignore();
                continue;
            }
        }
        let router = router.clone();
        let pool = pool.clone();
        let tracker = tracker.clone();
        let admission = admission.clone();
        tokio::spawn(
            async move {
                let outcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(incoming)).await;
                admission.lock().unwrap_or_else(|e| e.into_inner()).done();
                match outcome {
                    Ok(Ok((alpn, conn, peer))) => {
                        metrics::counter!(HANDSHAKES, "direction" => "in", "alpn" => alpn.as_str(), "result" => "ok").increment(1);
                        if let Some(peer) = &peer {
                            tracker.track(&conn, peer);
                        }
                        let sent = match (alpn, peer) {
                            (Alpn::Join, peer) => router.join.send(JoinConn { conn, peer }).await.is_ok(),
                            (alpn, Some(peer)) => {
                                // A peer dials us afresh when it (re)started or lost its
                                // connection: an old one of ours to it is likely dead too.
                                pool.forget_stale(remote, alpn, STALE_AFTER);
                                let tx = match alpn {
                                    Alpn::Gossip => &router.gossip,
                                    Alpn::WanGossip => &router.wan,
                                    _ => {
                                        conn.set_max_concurrent_bi_streams(TUNNEL_STREAMS.into());
                                        &router.tunnel
                                    }
                                };
                                tx.send(Accepted { conn, peer }).await.is_ok()
                            }
                            (alpn, None) => {
                                metrics::counter!(HANDSHAKES, "direction" => "in", "alpn" => alpn.as_str(), "result" => "refused").increment(1);
                                refused_handshake("no_certificate", alpn.as_str());
                                conn.close(quinn::VarInt::from_u32(0x01), b"a client certificate of the mesh is required");
                                true
                            }
                        };
                        if !sent {
                            debug!("no consumer for {} connections", alpn.as_str());
                        }
                    }
                    Ok(Err(reason)) => {
                        metrics::counter!(HANDSHAKES, "direction" => "in", "alpn" => "unknown", "result" => "refused").increment(1);
                        // Certificate refusals were counted by the verifier.
                        let lower = reason.to_ascii_lowercase();
                        if lower.contains("application protocol")
                            || lower.contains("known protocol")
                            || lower.contains("alpn")
                        {
                            refused_handshake("alpn", &reason);
                        } else {
                            debug!(%reason, "incoming handshake refused");
                        }
                    }
                    Err(_) => {
                        metrics::counter!(HANDSHAKES, "direction" => "in", "alpn" => "unknown", "result" => "timeout").increment(1);
                        debug!("incoming handshake timed out");
                    }
                }
            }
            .instrument(info_span!("accept", %remote)),
        );
    }
}

/// The ALPN id the handshake of `conn` settled on (with its version).
pub fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
}

async fn handshake(
    incoming: quinn::Incoming,
) -> Result<(Alpn, quinn::Connection, Option<PeerCert>), String> {
    let conn = incoming
        .accept()
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let alpn = negotiated_alpn(&conn)
        .and_then(|p| Alpn::from_bytes(&p))
        .ok_or_else(|| "no meshnode ALPN negotiated".to_string())?;
    // None only when the client sent no certificate: one it sent was verified.
    let peer = peer_cert(&conn);
    Ok((alpn, conn, peer))
}
