//! The node's single QUIC endpoint: accepts connections, dispatches them by
//! ALPN, and dials peers through a connection pool.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;
use tracing::{debug, info_span, Instrument};

use crate::alpn::Alpn;
use crate::metrics::HANDSHAKES;
use crate::pki::PeerCert;
use crate::pool::{ConnectError, Pool};
use crate::tls::{transport_config, TlsError, TlsMaterial};

/// A handshake that has not finished by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A pooled connection at least this old is dropped when its peer dials us anew.
const STALE_AFTER: Duration = Duration::from_secs(2);
/// Accepted connections waiting for their protocol's consumer.
const ACCEPT_QUEUE: usize = 256;

pub struct EndpointConfig {
    pub bind: SocketAddr,
    pub tls: TlsMaterial,
}

/// A verified incoming connection and who is on the other end.
pub struct Accepted {
    pub conn: quinn::Connection,
    pub peer: PeerCert,
}

/// Incoming connections, one queue per protocol.
pub struct Incoming {
    pub gossip: mpsc::Receiver<Accepted>,
    /// WAN pool gossip; only gateways consume it, other nodes drop these connections.
    pub wan: mpsc::Receiver<Accepted>,
    pub tunnel: mpsc::Receiver<Accepted>,
    pub join: mpsc::Receiver<Accepted>,
}

/// A cheap handle to the endpoint.
#[derive(Clone)]
pub struct Endpoint {
    quic: quinn::Endpoint,
    me: Arc<PeerCert>,
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
        let transport = Arc::new(transport_config());
        let server = cfg.tls.server_config(transport.clone())?;
        let quic =
            quinn::Endpoint::server(server, cfg.bind).map_err(|source| EndpointError::Bind {
                addr: cfg.bind,
                source,
            })?;
        let clients = [Alpn::Gossip, Alpn::WanGossip, Alpn::Tunnel, Alpn::Join]
            .into_iter()
            .map(|a| Ok((a, cfg.tls.client_config(a.as_bytes(), transport.clone())?)))
            .collect::<Result<Vec<_>, TlsError>>()?;
        let pool = Arc::new(Pool::new(quic.clone(), clients));
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
        tokio::spawn(accept_loop(quic.clone(), router, pool.clone()));
        Ok((
            Endpoint {
                quic,
                me: Arc::new(cfg.tls.me().clone()),
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

    /// This node's own certificate.
    pub fn me(&self) -> &PeerCert {
        &self.me
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

    /// Forgets the pooled connection to `addr` after it failed us, so the next
    /// `connect` dials again instead of reusing a connection to a dead peer.
    pub fn forget(&self, addr: SocketAddr, alpn: Alpn) {
        self.pool.forget(addr, alpn);
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
    join: mpsc::Sender<Accepted>,
}

async fn accept_loop(quic: quinn::Endpoint, router: Router, pool: Arc<Pool>) {
    let router = Arc::new(router);
    while let Some(incoming) = quic.accept().await {
        let remote = incoming.remote_address();
        let router = router.clone();
        let pool = pool.clone();
        tokio::spawn(
            async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(incoming)).await {
                    Ok(Ok((alpn, accepted))) => {
                        metrics::counter!(HANDSHAKES, "direction" => "in", "alpn" => alpn.as_str(), "result" => "ok").increment(1);
                        // A peer dials us afresh when it (re)started or lost its
                        // connection: an old one of ours to it is likely dead too.
                        pool.forget_stale(remote, alpn, STALE_AFTER);
                        let tx = match alpn {
                            Alpn::Gossip => &router.gossip,
                            Alpn::WanGossip => &router.wan,
                            Alpn::Tunnel => &router.tunnel,
                            Alpn::Join => &router.join,
                        };
                        if tx.send(accepted).await.is_err() {
                            debug!("no consumer for {} connections", alpn.as_str());
                        }
                    }
                    Ok(Err(reason)) => {
                        metrics::counter!(HANDSHAKES, "direction" => "in", "alpn" => "unknown", "result" => "refused").increment(1);
                        debug!(%reason, "incoming handshake refused");
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

async fn handshake(incoming: quinn::Incoming) -> Result<(Alpn, Accepted), String> {
    let conn = incoming
        .accept()
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .and_then(|p| Alpn::from_bytes(&p))
        .ok_or_else(|| "no meshnode ALPN negotiated".to_string())?;
    let peer = peer_cert(&conn).ok_or_else(|| "no peer certificate".to_string())?;
    Ok((alpn, Accepted { conn, peer }))
}
