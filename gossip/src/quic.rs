//! chitchat's `Transport` over the node's QUIC endpoint.
//!
//! One uni stream per gossip message on a pooled `meshnode-gossip/3`
//! connection (`meshnode-wan/3` for the WAN pool of gateways; `/2` or `/1`
//! with a peer that offers only those), each message one frame of the
//! connection's [`Codec`]. A node pair
//! shares one connection: the side that did not dial adopts the other's
//! (unless it had its own already), and both read streams on every
//! connection of the pool. Only peers
//! admitted to the pool get their frames parsed: a LAN pool admits
//! certificates of its own cluster, the WAN pool only gateway certificates:
//! chitchat's decoder is expensive on hostile input, so nothing
//! reaches it unauthenticated. The sender address handed to chitchat (which it
//! replies to) is the connection's remote address, never a claim in the frame.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::anyhow;
use async_trait::async_trait;
use chitchat::transport::{Socket, Transport};
use chitchat::{ChitchatMessage, Serializable};
use meshnode_transport::alpn::Alpn;
use meshnode_transport::{Accepted, Endpoint, PeerCert};
use tokio::sync::mpsc;
use tracing::{debug, trace};

use crate::frame::{Codec, Dictionary, FrameError, MAX_WIRE};
use crate::gate::Guard;
use crate::metrics::{BYTES, DROPPED, MESSAGES};
use crate::pacing::PacingConfig;
use crate::plane::{Datagram, Out, Plane, Probing};

/// Queued outbound messages per peer; gossip is lossy by design, so overflow drops.
const PEER_QUEUE: usize = 32;
const IN_QUEUE: usize = 1024;
/// Gossip messages of one pool checked at once on the blocking pool.
const CHECKS_AT_ONCE: usize = 1;
/// Messages with at most this many values to verify are checked inline:
/// about 15 ms of signatures at most, which covers what a pool sends while
/// it forms (a SYN-ACK with the states of dozens of new nodes). Only larger
/// ones (a frame holds at most ~650 values) take the blocking pool, whose
/// threads and malloc arenas cost RSS (BENCHMARKS.md, "Signed gossip").
const INLINE_CHECKS: usize = 256;
/// A per-peer sender with nothing to send for this long exits.
const PEER_IDLE: Duration = Duration::from_secs(60);
const CLOSE_WRONG_POOL: quinn::VarInt = quinn::VarInt::from_u32(0x20);

/// Hands chitchat a socket over QUIC. `open` may be called once.
pub struct QuicTransport {
    parts: Mutex<Option<Parts>>,
    plane: Arc<Plane>,
}

struct Parts {
    endpoint: Endpoint,
    incoming: mpsc::Receiver<Accepted>,
    kind: PoolKind,
    guard: Guard,
    dict: Arc<Dictionary>,
    plane: Arc<Plane>,
}

/// Which gossip pool a transport carries, and so who may take part in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolKind {
    /// The pool of one cluster: only certificates naming that cluster.
    Lan { cluster: String },
    /// The pool of all gateways of the mesh: only gateway certificates.
    Wan,
}

struct QuicSocket {
    plane: Arc<Plane>,
    inbox: mpsc::Receiver<Inbound>,
}

/// A checked message for chitchat.
type Inbound = (SocketAddr, ChitchatMessage);

// === impl QuicTransport ===

impl PoolKind {
    /// Whether a verified peer may gossip in this pool.
    pub fn admits(&self, peer: &PeerCert) -> bool {
        match self {
            PoolKind::Lan { cluster } => peer.identity.cluster() == cluster,
            PoolKind::Wan => peer.is_gateway(),
        }
    }

    pub fn alpn(&self) -> Alpn {
        match self {
            PoolKind::Lan { .. } => Alpn::Gossip,
            PoolKind::Wan => Alpn::WanGossip,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            PoolKind::Lan { .. } => "lan",
            PoolKind::Wan => "wan",
        }
    }
}

impl QuicTransport {
    /// `incoming` must be the endpoint's queue for `kind`'s ALPN; `guard`
    /// checks every message before chitchat parses it; `dict` is the pool's
    /// frame dictionary ([`GossipConfig::dictionary`](crate::GossipConfig::dictionary)).
    pub fn new(
        endpoint: Endpoint,
        incoming: mpsc::Receiver<Accepted>,
        kind: PoolKind,
        guard: Guard,
        dict: Arc<Dictionary>,
    ) -> Self {
        let plane = Plane::new(PacingConfig::default());
        Self {
            parts: Mutex::new(Some(Parts {
                endpoint,
                incoming,
                kind,
                guard,
                dict,
                plane: plane.clone(),
            })),
            plane,
        }
    }

    /// What the pool shares with this transport: hand it to
    /// [`GossipHandle::spawn`](crate::GossipHandle::spawn). `None` once opened.
    pub fn probing(&self) -> Option<Probing> {
        let parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        parts.as_ref().map(|p| Probing {
            plane: self.plane.clone(),
            guard: p.guard.clone(),
        })
    }
}

#[async_trait]
impl Transport for QuicTransport {
    async fn open(&self, _listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let parts = self
            .parts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| anyhow!("the QUIC gossip transport was already opened"))?;
        let (in_tx, inbox) = mpsc::channel(IN_QUEUE);
        let out_rx = parts
            .plane
            .take_out()
            .ok_or_else(|| anyhow!("the gossip plane was already opened"))?;
        let readers = Readers {
            inbox: in_tx,
            serving: Arc::new(Mutex::new(HashSet::new())),
            guard: parts.guard,
            checks: Arc::new(tokio::sync::Semaphore::new(CHECKS_AT_ONCE)),
            dict: parts.dict,
            plane: parts.plane.clone(),
            endpoint: parts.endpoint.clone(),
            alpn: parts.kind.alpn(),
            pool: parts.kind.as_str(),
        };
        tokio::spawn(accept_loop(
            parts.incoming,
            parts.endpoint.clone(),
            parts.kind.clone(),
            readers.clone(),
        ));
        tokio::spawn(send_loop(parts.endpoint, parts.kind, out_rx, readers));
        Ok(Box::new(QuicSocket {
            plane: parts.plane,
            inbox,
        }))
    }
}

#[async_trait]
impl Socket for QuicSocket {
    async fn send(&mut self, to: SocketAddr, msg: ChitchatMessage) -> anyhow::Result<()> {
        // Never wait on the network here: chitchat awaits send inline in its only task.
        if self.plane.outgoing(to, &msg) {
            self.plane.send(to, msg.serialize_to_vec());
        }
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        // Cancel-safe: chitchat polls this in a select!.
        self.inbox
            .recv()
            .await
            .ok_or_else(|| anyhow!("QUIC endpoint closed"))
    }
}

async fn accept_loop(
    mut incoming: mpsc::Receiver<Accepted>,
    endpoint: Endpoint,
    kind: PoolKind,
    readers: Readers,
) {
    while let Some(Accepted { conn, peer }) = incoming.recv().await {
        if !kind.admits(&peer) {
            debug!(peer = %peer.identity, pool = kind.as_str(), "refusing gossip from a peer outside this pool");
            metrics::counter!(DROPPED, "reason" => "wrong_pool").increment(1);
            conn.close(CLOSE_WRONG_POOL, b"not a member of this pool");
            continue;
        }
        // Send to this peer on its connection too, unless we have our own.
        endpoint.adopt(&conn, &peer, kind.alpn());
        readers.serve_accepted(conn);
    }
}

/// Reads gossip frames from every connection of the pool, dialled or
/// accepted: a peer sends on whichever connection it pooled, ours included.
#[derive(Clone)]
struct Readers {
    inbox: mpsc::Sender<Inbound>,
    /// `stable_id`s of the connections being read, so each gets one reader.
    serving: Arc<Mutex<HashSet<usize>>>,
    guard: Guard,
    /// Messages checked at once (see `read_frame`).
    checks: Arc<tokio::sync::Semaphore>,
    dict: Arc<Dictionary>,
    plane: Arc<Plane>,
    endpoint: Endpoint,
    alpn: Alpn,
    /// `lan` or `wan`, for metrics.
    pool: &'static str,
}

impl Readers {
    /// Reads a connection we dialled (see [`Readers::read`]).
    fn serve(&self, conn: quinn::Connection) {
        self.read(conn, None);
    }

    /// Reads a connection the peer dialled, accepted now: if a message on
    /// it says the peer restarted, a pooled connection to its address made
    /// before this one went to the old process and is dropped.
    fn serve_accepted(&self, conn: quinn::Connection) {
        self.read(conn, Some(meshnode_transport::clock::now()));
    }

    /// Reads uni streams from `conn` until it closes (a no-op if already read).
    /// `conn`'s peer must have been admitted to the pool.
    fn read(&self, conn: quinn::Connection, accepted: Option<std::time::Instant>) {
        let id = conn.stable_id();
        if !self
            .serving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id)
        {
            return;
        }
        let this = self.clone();
        if let Some(peer) = meshnode_transport::endpoint::peer_cert(&conn) {
            // Probes: QUIC datagrams on the same connection.
            let conn = conn.clone();
            let plane = self.plane.clone();
            let from_id = peer.identity.uri();
            tokio::spawn(async move {
                let from = conn.remote_address();
                while let Ok(bytes) = conn.read_datagram().await {
                    plane.deliver_probe(Datagram {
                        from_id: from_id.clone(),
                        from,
                        bytes,
                    });
                }
            });
        }
        tokio::spawn(async move {
            let from = conn.remote_address();
            let codec = Codec::of(&conn, &this.dict);
            while let Ok(stream) = conn.accept_uni().await {
                tokio::spawn(read_frame(
                    stream,
                    from,
                    codec.clone(),
                    this.clone(),
                    accepted,
                ));
            }
            this.serving
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        });
    }
}

async fn read_frame(
    mut stream: quinn::RecvStream,
    from: SocketAddr,
    codec: Codec,
    readers: Readers,
    accepted: Option<std::time::Instant>,
) {
    let Readers {
        inbox,
        guard,
        checks,
        plane,
        ..
    } = readers.clone();
    let bytes = match stream.read_to_end(MAX_WIRE).await {
        Ok(b) => b,
        Err(quinn::ReadToEndError::TooLong) => {
            metrics::counter!(DROPPED, "reason" => "oversized").increment(1);
            let _ = stream.stop(CLOSE_WRONG_POOL);
            return;
        }
        Err(_) => return,
    };
    let len = bytes.len() as u64;
    // Decompressing and decoding are cheap and bounded (1 MiB): done here.
    // Signature checks cost 60-75 us per value: a message of up to
    // INLINE_CHECKS values (idle digests, a changed value, a new node's
    // state, formation's SYN-ACKs) is checked here too, which keeps a hop off
    // the propagation path and the blocking pool's threads out of RSS; a
    // larger one (only a big or hostile delta) goes to the blocking pool, one
    // message of a pool at a time, so the pool keeps one thread instead of
    // one per message in flight (each with its stack and malloc arena:
    // measured +6 MiB RSS per node at N = 60 without the cap), and the
    // runtime thread that carries the data plane never waits on a flood of
    // signatures.
    let message = match codec.unframe(&bytes) {
        Ok(m) => m,
        Err(e) => {
            trace!(%from, codec = codec.as_str(), error = %e, "bad gossip frame");
            let reason = match e {
                FrameError::Oversized(_) | FrameError::Bomb => "oversized",
                FrameError::Compression | FrameError::Malformed => "malformed",
            };
            metrics::counter!(DROPPED, "reason" => reason).increment(1);
            return;
        }
    };
    let Some(decoded) = guard.decode(&message, from) else {
        return;
    };
    drop(message);
    // A peer that restarted on the same address dials us afresh; our pooled
    // connection to its address may still be the old process's, where every
    // answer would vanish until the idle timeout (minutes for gossip).
    if let Some(since) = accepted {
        if guard.announces_restart(&decoded, from) {
            readers.endpoint.forget_older(from, readers.alpn, since);
        }
    }
    let checked = if Guard::work(&decoded) <= INLINE_CHECKS {
        guard.check_fresh(decoded, from)
    } else {
        let Ok(_permit) = checks.acquire_owned().await else {
            return;
        };
        match tokio::task::spawn_blocking(move || guard.check_fresh(decoded, from)).await {
            Ok(m) => m,
            Err(e) => {
                debug!(%from, error = %e, "gossip check task failed");
                None
            }
        }
    };
    // `None`: counted by the guard.
    let Some((msg, fresh)) = checked else {
        return;
    };
    metrics::counter!(MESSAGES, "pool" => readers.pool, "direction" => "received").increment(1);
    metrics::counter!(BYTES, "pool" => readers.pool, "direction" => "received").increment(len);
    plane.incoming(from, &msg, fresh);
    if inbox.try_send((from, msg)).is_err() {
        metrics::counter!(DROPPED, "reason" => "queue_full").increment(1);
    }
}

/// Puts the [`Guard`] in front of another transport's messages (the
/// simulations' in-memory network running chitchat alone), so they run the
/// same checks as QUIC. (The simulations' plane runs on their own byte
/// transport: a message decoded from bytes must not be serialized again,
/// see ARCHITECTURE.md.)
pub struct GatedTransport<T> {
    inner: T,
    guard: Guard,
}

struct GatedSocket {
    inner: Box<dyn Socket>,
    guard: Guard,
}

impl<T> GatedTransport<T> {
    /// chitchat alone behind the gate: no pacing, no pushes, no probes.
    pub fn new(inner: T, guard: Guard) -> Self {
        Self { inner, guard }
    }
}

#[async_trait]
impl<T: Transport> Transport for GatedTransport<T> {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        Ok(Box::new(GatedSocket {
            inner: self.inner.open(listen_addr).await?,
            guard: self.guard.clone(),
        }))
    }
}

#[async_trait]
impl Socket for GatedSocket {
    async fn send(&mut self, to: SocketAddr, msg: ChitchatMessage) -> anyhow::Result<()> {
        self.inner.send(to, msg).await
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            let (from, msg) = self.inner.recv().await?;
            if let Some(msg) = self.guard.filter_message(&msg, from) {
                return Ok((from, msg));
            }
        }
    }
}

async fn send_loop(
    endpoint: Endpoint,
    kind: PoolKind,
    mut out: mpsc::Receiver<Out>,
    readers: Readers,
) {
    let mut peers: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
    while let Some(item) = out.recv().await {
        let (to, bytes) = match item {
            Out::Stream(to, b) => (to, b),
            // Probes never queue behind a peer's streams: a burst of pushes
            // waiting for stream credit must not make a live peer miss its
            // probes (and be accused for it).
            Out::Datagram(to, b) => {
                tokio::spawn(send_probe(
                    endpoint.clone(),
                    kind.clone(),
                    to,
                    b,
                    None,
                    readers.clone(),
                ));
                continue;
            }
            Out::Probe(to, b, seq) => {
                tokio::spawn(send_probe(
                    endpoint.clone(),
                    kind.clone(),
                    to,
                    b,
                    Some(seq),
                    readers.clone(),
                ));
                continue;
            }
        };
        let tx = peers
            .entry(to)
            .or_insert_with(|| spawn_peer(&endpoint, &kind, to, &readers));
        let bytes = match tx.try_send(bytes) {
            Ok(()) => continue,
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!(DROPPED, "reason" => "queue_full").increment(1);
                continue;
            }
            Err(mpsc::error::TrySendError::Closed(bytes)) => bytes,
        };
        // The peer's sender exited while idle: start a new one.
        let tx = spawn_peer(&endpoint, &kind, to, &readers);
        let _ = tx.try_send(bytes);
        peers.insert(to, tx);
        peers.retain(|_, tx| !tx.is_closed());
    }
}

/// Sends one probe datagram on the pooled connection to `to` (dialled if
/// needed); `seq` for a direct probe, whose QUIC acknowledgement is watched.
async fn send_probe(
    endpoint: Endpoint,
    kind: PoolKind,
    to: SocketAddr,
    d: bytes::Bytes,
    seq: Option<u32>,
    readers: Readers,
) {
    let (conn, peer) = match endpoint.connect(to, kind.alpn()).await {
        Ok((conn, peer)) if kind.admits(&peer) => {
            readers.serve(conn.clone());
            (conn, peer)
        }
        _ => {
            metrics::counter!(DROPPED, "reason" => "probe").increment(1);
            return;
        }
    };
    let acks = conn.stats().frame_rx.acks;
    let len = d.len() as u64;
    if conn.send_datagram(d).is_err() {
        metrics::counter!(DROPPED, "reason" => "probe").increment(1);
        return;
    }
    metrics::counter!(BYTES, "pool" => kind.as_str(), "direction" => "probe_sent").increment(len);
    if let Some(seq) = seq {
        watch_ack(conn, acks, readers.plane.clone(), peer.identity.uri(), seq).await;
    }
}

/// A direct probe is answered by the peer's QUIC stack: any ACK frame
/// arriving on the connection after the probe went out (quinn acknowledges
/// an ack-eliciting packet within its 25 ms ack delay). The ACK is authentic
/// (the connection's keys protect it) and costs the peer one small packet and
/// no ack of its own, where an answering datagram would cost two.
async fn watch_ack(
    conn: quinn::Connection,
    before: u64,
    plane: Arc<Plane>,
    peer: String,
    seq: u32,
) {
    let step = Duration::from_millis(5);
    for _ in 0..ACK_WATCH_STEPS {
        tokio::time::sleep(step).await;
        if conn.stats().frame_rx.acks > before {
            plane.probe_acked(peer, conn.remote_address(), seq);
            return;
        }
        if conn.close_reason().is_some() {
            return;
        }
    }
}

/// How long a probe's acknowledgement is watched for, in 5 ms steps: past
/// any probe timeout (200 ms, widened up to 9x by local health).
const ACK_WATCH_STEPS: u32 = 400;

/// One sender per peer, so a slow handshake with one peer never delays the others.
fn spawn_peer(
    endpoint: &Endpoint,
    kind: &PoolKind,
    to: SocketAddr,
    readers: &Readers,
) -> mpsc::Sender<Vec<u8>> {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(PEER_QUEUE);
    let endpoint = endpoint.clone();
    let kind = kind.clone();
    let readers = readers.clone();
    tokio::spawn(async move {
        while let Ok(Some(item)) = tokio::time::timeout(PEER_IDLE, rx.recv()).await {
            let conn = match endpoint.connect(to, kind.alpn()).await {
                Ok((conn, peer)) if kind.admits(&peer) => {
                    // The peer may adopt this connection and answer on it.
                    readers.serve(conn.clone());
                    (conn, peer)
                }
                Ok((_, peer)) => {
                    debug!(%to, peer = %peer.identity, pool = kind.as_str(), "seed or peer is outside this pool; not gossiping with it");
                    metrics::counter!(DROPPED, "reason" => "wrong_pool").increment(1);
                    continue;
                }
                Err(e) => {
                    trace!(%to, error = %e, "gossip dial failed");
                    metrics::counter!(DROPPED, "reason" => "dial").increment(1);
                    // Whatever queued up while dialling is stale by now.
                    while rx.try_recv().is_ok() {}
                    continue;
                }
            };
            let (conn, _) = conn;
            let bytes = item;
            let frame = match Codec::of(&conn, &readers.dict).encode(&bytes) {
                Ok(frame) => frame,
                Err(e) => {
                    debug!(%to, error = %e, "gossip message not sent");
                    metrics::counter!(DROPPED, "reason" => "oversized").increment(1);
                    continue;
                }
            };
            let len = frame.len() as u64;
            let sent = async {
                let mut s = conn.open_uni().await?;
                s.write_all(&frame).await?;
                s.finish()?;
                anyhow::Ok(())
            };
            match sent.await {
                Ok(()) => {
                    metrics::counter!(MESSAGES, "pool" => kind.as_str(), "direction" => "sent")
                        .increment(1);
                    metrics::counter!(BYTES, "pool" => kind.as_str(), "direction" => "sent")
                        .increment(len);
                }
                Err(e) => {
                    trace!(%to, error = %e, "gossip send failed");
                    metrics::counter!(DROPPED, "reason" => "dial").increment(1);
                }
            }
        }
    });
    tx
}
