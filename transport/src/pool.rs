//! One pooled connection per (peer address, protocol), re-dialled when it dies.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::alpn::Alpn;
use crate::endpoint::{peer_cert, Tracker};
use crate::metrics::HANDSHAKES;
use crate::pki::PeerCert;
use crate::tls::TlsMaterial;

/// Dialling a peer that does not answer gives up after this long, so callers can
/// retry elsewhere quickly.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// TLS needs a server name; the mesh verifier checks the SPIFFE ID instead.
const SERVER_NAME: &str = "meshnode";

type Slot = Arc<tokio::sync::Mutex<Option<Pooled>>>;

struct Pooled {
    conn: quinn::Connection,
    peer: PeerCert,
    made: Instant,
    /// New streams go to a fresh connection from here on: three quarters of
    /// the way to the earlier expiry of the two certificates of this
    /// connection, so streams still on it get the last quarter to finish
    /// before the connection is closed for an expired certificate.
    rotate_at: Instant,
}

pub(crate) struct Pool {
    quic: quinn::Endpoint,
    clients: Vec<(Alpn, quinn::ClientConfig)>,
    slots: Mutex<HashMap<(SocketAddr, Alpn), Slot>>,
    tls: Arc<TlsMaterial>,
    tracker: Arc<Tracker>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot dial {addr}: {reason}")]
    Dial { addr: SocketAddr, reason: String },
    #[error("no answer from {addr} within {CONNECT_TIMEOUT:?}")]
    Timeout { addr: SocketAddr },
    #[error("handshake with {addr} failed: {reason}")]
    Handshake { addr: SocketAddr, reason: String },
}

// === impl Pool ===

impl Pool {
    pub(crate) fn new(
        quic: quinn::Endpoint,
        clients: Vec<(Alpn, quinn::ClientConfig)>,
        tls: Arc<TlsMaterial>,
        tracker: Arc<Tracker>,
    ) -> Self {
        Self {
            quic,
            clients,
            slots: Mutex::new(HashMap::new()),
            tls,
            tracker,
        }
    }

    pub(crate) async fn connect(
        &self,
        addr: SocketAddr,
        alpn: Alpn,
    ) -> Result<(quinn::Connection, PeerCert), ConnectError> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            match slots.get(&(addr, alpn)) {
                Some(slot) => slot.clone(),
                None => {
                    // Prune only when the map grows, never on the per-stream path.
                    slots.retain(|_, s| Arc::strong_count(s) > 1 || slot_is_live(s));
                    slots.entry((addr, alpn)).or_default().clone()
                }
            }
        };
        // Concurrent callers for the same peer wait for one handshake.
        let mut guard = slot.lock().await;
        if let Some(p) = guard.as_ref() {
            if p.conn.close_reason().is_none() && crate::clock::now() < p.rotate_at {
                return Ok((p.conn.clone(), p.peer.clone()));
            }
        }
        *guard = None;
        let dialled = self.dial(addr, alpn).await;
        metrics::counter!(HANDSHAKES, "direction" => "out", "alpn" => alpn.as_str(),
            "result" => if dialled.is_ok() { "ok" } else { "failed" })
        .increment(1);
        let (conn, peer) = dialled?;
        self.tracker.track(&conn, &peer);
        *guard = Some(self.pooled(conn.clone(), peer.clone()));
        Ok((conn, peer))
    }

    /// Pools `conn` (which `addr` dialled) for `connect` to return, unless a
    /// live connection is pooled or being dialled: then the two sides keep
    /// one each, as when both dial at once.
    pub(crate) fn adopt(
        &self,
        addr: SocketAddr,
        alpn: Alpn,
        conn: &quinn::Connection,
        peer: &PeerCert,
    ) {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots.entry((addr, alpn)).or_default().clone()
        };
        let Ok(mut guard) = slot.try_lock() else {
            return;
        };
        if guard
            .as_ref()
            .is_some_and(|p| p.conn.close_reason().is_none() && crate::clock::now() < p.rotate_at)
        {
            return;
        }
        *guard = Some(self.pooled(conn.clone(), peer.clone()));
    }

    fn pooled(&self, conn: quinn::Connection, peer: PeerCert) -> Pooled {
        let left = peer.not_after.min(self.tls.me().not_after) - crate::pki::unix_now();
        let now = crate::clock::now();
        Pooled {
            conn,
            peer,
            made: now,
            rotate_at: now + Duration::from_secs(left.max(0) as u64 * 3 / 4),
        }
    }

    /// Forgets the pooled `alpn` connection to `addr`, so the next `connect`
    /// dials afresh. The old connection is not closed: streams still on it
    /// finish, or it dies by idle timeout if the peer is gone.
    pub(crate) fn forget(&self, addr: SocketAddr, alpn: Alpn) {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(addr, alpn));
    }

    /// Forgets (and, for gossip, closes) the pooled `alpn` connection to
    /// `addr` if it was made before `than`: the peer restarted then.
    pub(crate) fn forget_older(&self, addr: SocketAddr, alpn: Alpn, than: Instant) {
        self.forget_if(addr, alpn, |p| p.made < than);
    }

    /// Forgets the pooled `alpn` connection to `addr` if it is older than
    /// `min_age`. Called when `addr` dials us afresh with that protocol: a peer
    /// that restarted on the same address dials anew while our old connection
    /// to it lingers, dead, until its idle timeout. The age floor keeps two
    /// peers that dial each other at the same time from making each other
    /// re-dial forever. Gossip connections carry only short streams and are
    /// closed; tunnel connections may carry long streams and are left to end.
    pub(crate) fn forget_stale(&self, addr: SocketAddr, alpn: Alpn, min_age: Duration) {
        self.forget_if(addr, alpn, |p| crate::clock::since(p.made) >= min_age);
    }

    /// Forgets the pooled connection if `pred` holds for it; a gossip one
    /// is also closed (it carries only short streams).
    fn forget_if(&self, addr: SocketAddr, alpn: Alpn, pred: impl Fn(&Pooled) -> bool) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let matches = slots
            .get(&(addr, alpn))
            .is_some_and(|slot| slot.try_lock().is_ok_and(|g| g.as_ref().is_some_and(&pred)));
        if !matches {
            return;
        }
        if let Some(slot) = slots.remove(&(addr, alpn)) {
            if matches!(alpn, Alpn::Gossip | Alpn::WanGossip) {
                if let Ok(g) = slot.try_lock() {
                    if let Some(p) = g.as_ref() {
                        p.conn.close(quinn::VarInt::from_u32(0), b"superseded");
                    }
                }
            }
        }
    }

    /// The RTT estimate of the live pooled connection to `addr`, if any.
    pub(crate) fn rtt(&self, addr: SocketAddr, alpn: Alpn) -> Option<Duration> {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(addr, alpn))?
            .clone();
        let guard = slot.try_lock().ok()?;
        let p = guard.as_ref()?;
        p.conn.close_reason().is_none().then(|| p.conn.rtt())
    }

    async fn dial(
        &self,
        addr: SocketAddr,
        alpn: Alpn,
    ) -> Result<(quinn::Connection, PeerCert), ConnectError> {
        let cfg = self
            .clients
            .iter()
            .find(|(a, _)| *a == alpn)
            .map(|(_, c)| c.clone())
            .ok_or_else(|| ConnectError::Dial {
                addr,
                reason: format!("no client config for {}", alpn.as_str()),
            })?;
        let connecting = self
            .quic
            .connect_with(cfg, addr, SERVER_NAME)
            .map_err(|e| ConnectError::Dial {
                addr,
                reason: e.to_string(),
            })?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| ConnectError::Timeout { addr })?
            .map_err(|e| {
                self.watch_refusal(&e, addr);
                ConnectError::Handshake {
                    addr,
                    reason: e.to_string(),
                }
            })?;
        // With TLS 1.3 the server checks our certificate after our side
        // has finished: its refusal arrives as the connection's close.
        let tls = self.tls.clone();
        let watched = conn.clone();
        tokio::spawn(async move {
            let e = watched.closed().await;
            if crate::tls::refused_as_revoked(&e) {
                note_revoked(&tls, addr);
            }
        });
        let peer = peer_cert(&conn).ok_or_else(|| ConnectError::Handshake {
            addr,
            reason: "server presented no usable certificate".into(),
        })?;
        Ok((conn, peer))
    }
}

fn note_revoked(tls: &TlsMaterial, addr: SocketAddr) {
    static LOG: crate::LogLimit = crate::LogLimit::new(Duration::from_secs(10));
    tls.refused_as_revoked().note(crate::pki::unix_now());
    metrics::counter!(crate::metrics::SELF_REVOKED).increment(1);
    if LOG.allow() {
        tracing::error!(peer = %addr, "a peer refused this node's certificate as revoked: an operator revoked this node; it needs a new identity (meshnode join with a new token) (logged once per 10 s)");
    }
}

impl Pool {
    fn watch_refusal(&self, e: &quinn::ConnectionError, addr: SocketAddr) {
        if crate::tls::refused_as_revoked(e) {
            note_revoked(&self.tls, addr);
        }
    }
}

fn slot_is_live(slot: &Slot) -> bool {
    match slot.try_lock() {
        Ok(guard) => guard
            .as_ref()
            .is_some_and(|p| p.conn.close_reason().is_none()),
        // Someone is dialling right now.
        Err(_) => true,
    }
}
