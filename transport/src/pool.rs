//! One pooled connection per (peer address, protocol), re-dialled when it dies.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::alpn::Alpn;
use crate::endpoint::peer_cert;
use crate::metrics::HANDSHAKES;
use crate::pki::PeerCert;

/// Dialling a peer that does not answer gives up after this long, so callers can
/// retry elsewhere quickly.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// TLS needs a server name; the mesh verifier checks the SPIFFE ID instead.
const SERVER_NAME: &str = "meshnode";

type Slot = Arc<tokio::sync::Mutex<Option<(quinn::Connection, PeerCert, Instant)>>>;

pub(crate) struct Pool {
    quic: quinn::Endpoint,
    clients: Vec<(Alpn, quinn::ClientConfig)>,
    slots: Mutex<HashMap<(SocketAddr, Alpn), Slot>>,
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
    pub(crate) fn new(quic: quinn::Endpoint, clients: Vec<(Alpn, quinn::ClientConfig)>) -> Self {
        Self {
            quic,
            clients,
            slots: Mutex::new(HashMap::new()),
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
        if let Some((conn, peer, _)) = guard.as_ref() {
            if conn.close_reason().is_none() {
                return Ok((conn.clone(), peer.clone()));
            }
        }
        *guard = None;
        let dialled = self.dial(addr, alpn).await;
        metrics::counter!(HANDSHAKES, "direction" => "out", "alpn" => alpn.as_str(),
            "result" => if dialled.is_ok() { "ok" } else { "failed" })
        .increment(1);
        let (conn, peer) = dialled?;
        *guard = Some((conn.clone(), peer.clone(), Instant::now()));
        Ok((conn, peer))
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

    /// Forgets the pooled `alpn` connection to `addr` if it is older than
    /// `min_age`. Called when `addr` dials us afresh with that protocol: a peer
    /// that restarted on the same address dials anew while our old connection
    /// to it lingers, dead, until its idle timeout. The age floor keeps two
    /// peers that dial each other at the same time from making each other
    /// re-dial forever. Gossip connections carry only short streams and are
    /// closed; tunnel connections may carry long streams and are left to end.
    pub(crate) fn forget_stale(&self, addr: SocketAddr, alpn: Alpn, min_age: Duration) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let stale = slots.get(&(addr, alpn)).is_some_and(|slot| {
            slot.try_lock().is_ok_and(|g| {
                g.as_ref()
                    .is_some_and(|(_, _, made)| made.elapsed() >= min_age)
            })
        });
        if !stale {
            return;
        }
        if let Some(slot) = slots.remove(&(addr, alpn)) {
            if matches!(alpn, Alpn::Gossip | Alpn::WanGossip) {
                if let Ok(g) = slot.try_lock() {
                    if let Some((conn, _, _)) = g.as_ref() {
                        conn.close(quinn::VarInt::from_u32(0), b"superseded");
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
        let (conn, _, _) = guard.as_ref()?;
        conn.close_reason().is_none().then(|| conn.rtt())
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
            .map_err(|e| ConnectError::Handshake {
                addr,
                reason: e.to_string(),
            })?;
        let peer = peer_cert(&conn).ok_or_else(|| ConnectError::Handshake {
            addr,
            reason: "server presented no usable certificate".into(),
        })?;
        Ok((conn, peer))
    }
}

fn slot_is_live(slot: &Slot) -> bool {
    match slot.try_lock() {
        Ok(guard) => guard
            .as_ref()
            .is_some_and(|(conn, _, _)| conn.close_reason().is_none()),
        // Someone is dialling right now.
        Err(_) => true,
    }
}
