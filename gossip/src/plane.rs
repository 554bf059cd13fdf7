//! What the gossip transport and the pool share: the anti-entropy pacer,
//! the push targets, and the queues to the per-peer senders and the prober.
//!
//! The shape of the protocol around chitchat (see ARCHITECTURE.md, "Gossip"):
//! - a local change is **pushed** at once as an unsolicited chitchat message
//!   carrying only that change to [`fanout`] live peers, and a receiver
//!   that learns something new from it passes it on the same way (infect and
//!   die: each node forwards a change once);
//! - chitchat's full digest exchanges are **paced** ([`crate::pacing`]);
//! - liveness comes from **probes** ([`crate::swim`]), sent as QUIC datagrams
//!   on the pool's connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use chitchat::ChitchatMessage;
use rand::RngExt;
use tokio::sync::mpsc;

use crate::metrics::{DROPPED, PUSHES, SYNS_HELD};
use crate::pacing::{AntiEntropy, PacingConfig};
use crate::wire::{self, Message, NodeDelta};

/// What [`GossipHandle::spawn`](crate::GossipHandle::spawn) needs to probe
/// and push over a transport: from [`QuicTransport::probing`](crate::QuicTransport::probing).
#[derive(Clone)]
pub struct Probing {
    pub plane: Arc<Plane>,
    pub guard: crate::gate::Guard,
}

/// Peers a change is pushed (and passed on) to, in a pool of `n`: ln n + 4.
///
/// Each node passes a change on once (infect and die), so a node hears it
/// unless all of the ~n x fanout pushes miss it: a share of about e^-fanout
/// of the pool is missed, and the chance that *anyone* is missed is about
/// n e^-fanout = e^-4, 2 % (with 3 peers it was ~5 % of every pool, which
/// then waited for anti-entropy). Cost: about `fanout` messages per node per
/// change, 7 at N = 10, 9 at N = 100, 11 at N = 1,000.
pub fn fanout(n: usize) -> usize {
    (n.max(1) as f64).ln().ceil() as usize + 4
}
const OUT_QUEUE: usize = 1024;
const PROBE_QUEUE: usize = 1024;

/// What the plane sends: the transport carries it (the QUIC transport's
/// per-peer senders; an in-memory network in the simulations).
pub enum Out {
    /// A serialized chitchat message: one uni stream.
    Stream(SocketAddr, Vec<u8>),
    /// A probe: one QUIC datagram.
    Datagram(SocketAddr, Bytes),
    /// A direct probe, number `seq`: a datagram answered by the QUIC ACK.
    Probe(SocketAddr, Bytes, u32),
}

/// A probe datagram from a verified pool member.
pub struct Datagram {
    /// The SPIFFE id of the connection's certificate.
    pub from_id: String,
    pub from: SocketAddr,
    pub bytes: Bytes,
}

pub struct Plane {
    start: Instant,
    pacing: Mutex<AntiEntropy>,
    members: AtomicUsize,
    /// Set when news arrived or this node changed: the prober re-reads the state.
    dirty: AtomicBool,
    peers: Mutex<Vec<SocketAddr>>,
    out: mpsc::Sender<Out>,
    out_rx: Mutex<Option<mpsc::Receiver<Out>>>,
    probes: mpsc::Sender<Datagram>,
    probes_rx: Mutex<Option<mpsc::Receiver<Datagram>>>,
    exchanges: mpsc::Sender<SocketAddr>,
    exchanges_rx: Mutex<Option<mpsc::Receiver<SocketAddr>>>,
}

impl Plane {
    pub fn new(pacing: PacingConfig) -> Arc<Self> {
        let (out, out_rx) = mpsc::channel(OUT_QUEUE);
        let (probes, probes_rx) = mpsc::channel(PROBE_QUEUE);
        let (exchanges, exchanges_rx) = mpsc::channel(16);
        Arc::new(Self {
            start: meshnode_transport::clock::tokio_now(),
            pacing: Mutex::new(AntiEntropy::new(pacing)),
            members: AtomicUsize::new(1),
            dirty: AtomicBool::new(true),
            peers: Mutex::new(Vec::new()),
            out,
            out_rx: Mutex::new(Some(out_rx)),
            probes,
            probes_rx: Mutex::new(Some(probes_rx)),
            exchanges,
            exchanges_rx: Mutex::new(Some(exchanges_rx)),
        })
    }

    /// The plane's monotonic clock (tokio's: virtual in the simulations).
    pub fn now(&self) -> Duration {
        meshnode_transport::clock::tokio_since(self.start)
    }

    /// The queue of what to send; taken once, by the transport.
    pub fn take_out(&self) -> Option<mpsc::Receiver<Out>> {
        lock(&self.out_rx).take()
    }

    pub(crate) fn take_probes(&self) -> Option<mpsc::Receiver<Datagram>> {
        lock(&self.probes_rx).take()
    }

    /// Queues a serialized chitchat message for `to`; drops when full, like UDP.
    pub(crate) fn send(&self, to: SocketAddr, bytes: Vec<u8>) {
        if self.out.try_send(Out::Stream(to, bytes)).is_err() {
            metrics::counter!(DROPPED, "reason" => "queue_full").increment(1);
        }
    }

    pub(crate) fn send_datagram(&self, to: SocketAddr, bytes: Vec<u8>) {
        if self.out.try_send(Out::Datagram(to, bytes.into())).is_err() {
            metrics::counter!(DROPPED, "reason" => "queue_full").increment(1);
        }
    }

    pub(crate) fn send_probe(&self, to: SocketAddr, bytes: Vec<u8>, seq: u32) {
        if self
            .out
            .try_send(Out::Probe(to, bytes.into(), seq))
            .is_err()
        {
            metrics::counter!(DROPPED, "reason" => "queue_full").increment(1);
        }
    }

    /// Hands the prober a datagram from a verified member, or the
    /// acknowledgement of a direct probe as [`Plane::probe_acked`] makes it.
    pub fn deliver_probe(&self, d: Datagram) {
        if self.probes.try_send(d).is_err() {
            metrics::counter!(DROPPED, "reason" => "queue_full").increment(1);
        }
    }

    /// The direct probe `seq` to `from` (whose certificate names `from_id`)
    /// was acknowledged.
    pub fn probe_acked(&self, from_id: String, from: SocketAddr, seq: u32) {
        self.deliver_probe(Datagram {
            from_id,
            from,
            bytes: crate::probe::ack_bytes(seq).into(),
        });
    }

    /// The live members (alive or suspect) a push may go to, and the pool size.
    pub(crate) fn set_peers(&self, peers: Vec<SocketAddr>) {
        self.members.store(peers.len() + 1, Ordering::Relaxed);
        *lock(&self.peers) = peers;
    }

    /// Whether chitchat's SYN to `to` goes out now (see [`crate::pacing`]).
    pub(crate) fn allow_syn(&self, to: SocketAddr) -> bool {
        let n = self.members.load(Ordering::Relaxed);
        let now = self.now();
        lock(&self.pacing).allow_syn(to, now, n)
    }

    /// A SYN-ACK arrived: whether it answers our SYN (else it is a push).
    pub(crate) fn on_synack(&self, from: SocketAddr, news: bool) -> bool {
        let now = self.now();
        lock(&self.pacing).on_synack(from, news, now)
    }

    /// Starts a full exchange with `to` now (chitchat's `gossip(addr)`),
    /// past the pacing: a dead member answered a probe.
    pub(crate) fn exchange_with(&self, to: SocketAddr) {
        let now = self.now();
        lock(&self.pacing).force(to, now);
        let _ = self.exchanges.try_send(to);
    }

    pub(crate) fn take_exchanges(&self) -> Option<mpsc::Receiver<SocketAddr>> {
        lock(&self.exchanges_rx).take()
    }

    /// Back to the fastest anti-entropy pace: this node's state lags what
    /// its gate admitted (a push that chitchat could not apply yet).
    pub(crate) fn hurry(&self) {
        let now = self.now();
        lock(&self.pacing).hurry(now);
    }

    /// SYNs let through and held back.
    pub fn pacing_counts(&self) -> (u64, u64) {
        lock(&self.pacing).counts()
    }

    /// Pushes node deltas to up to [`fanout`] random live peers other than
    /// `exclude`, as an unsolicited chitchat ACK, which chitchat applies
    /// without answering. Only updates of nodes the receivers know: chitchat
    /// applies deltas only to nodes it has a state for, and only a digest
    /// entry creates one, so a new member (or generation) spreads by
    /// anti-entropy, which the news of it speeds up to every round.
    pub(crate) fn push(
        &self,
        mut delta: Vec<NodeDelta>,
        exclude: Option<SocketAddr>,
        why: &'static str,
    ) {
        delta.retain(|nd| nd.from_version_excluded > 0);
        if delta.is_empty() {
            return;
        }
        let targets = {
            let peers = lock(&self.peers);
            pick(&peers, exclude, fanout(peers.len() + 1))
        };
        if targets.is_empty() {
            return;
        }
        let bytes = wire::encode(&Message::Ack { delta }, wire::Blocks::Raw);
        metrics::counter!(PUSHES, "why" => why).increment(targets.len() as u64);
        for to in targets {
            self.send(to, bytes.clone());
        }
    }
}

impl Plane {
    /// Whether chitchat's message to `to` goes out (SYNs are paced).
    pub fn outgoing(&self, to: SocketAddr, msg: &ChitchatMessage) -> bool {
        match msg {
            ChitchatMessage::Syn { .. } if !self.allow_syn(to) => {
                metrics::counter!(SYNS_HELD).increment(1);
                false
            }
            _ => true,
        }
    }

    /// A message passed the gate (`fresh`: its news, see
    /// [`Verdict::fresh`](crate::gate::Verdict)). The news of an ACK (a
    /// push, or the last leg of a peer's exchange) is passed on, once per
    /// node that learns it; a SYN-ACK's news (the answer to our own SYN,
    /// mostly what the pool knows already) only speeds up anti-entropy.
    pub fn incoming(&self, from: SocketAddr, msg: &ChitchatMessage, fresh: Vec<NodeDelta>) {
        if !fresh.is_empty() {
            self.mark_dirty();
        }
        // A member new to us (or a new generation) spreads by anti-entropy
        // only (see `push`): every round until the pool agrees again.
        if fresh.iter().any(|nd| nd.from_version_excluded == 0) {
            self.hurry();
        }
        match msg {
            ChitchatMessage::SynAck { .. } => {
                self.on_synack(from, !fresh.is_empty());
            }
            ChitchatMessage::Ack { .. } => self.push(fresh, Some(from), "forward"),
            _ => {}
        }
    }

    /// The gossip state changed (or is about to: chitchat applies a message
    /// right after the transport hands it over).
    pub(crate) fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Release);
    }

    pub(crate) fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::AcqRel)
    }

    /// Pushes one node delta to every live peer (a graceful leave).
    pub(crate) fn push_all(&self, nd: NodeDelta) {
        let targets = lock(&self.peers).clone();
        let bytes = wire::encode(&Message::Ack { delta: vec![nd] }, wire::Blocks::Raw);
        metrics::counter!(PUSHES, "why" => "leave").increment(targets.len() as u64);
        for to in targets {
            self.send(to, bytes.clone());
        }
    }
}

/// Up to `k` distinct random addresses of `peers` other than `exclude`.
fn pick(peers: &[SocketAddr], exclude: Option<SocketAddr>, k: usize) -> Vec<SocketAddr> {
    let mut pool: Vec<SocketAddr> = peers
        .iter()
        .copied()
        .filter(|p| Some(*p) != exclude)
        .collect();
    let mut rng = rand::rng();
    let k = k.min(pool.len());
    for i in 0..k {
        let j = rng.random_range(i..pool.len());
        pool.swap(i, j);
    }
    pool.truncate(k);
    pool
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fanout_grows_with_the_log_of_the_pool() {
        assert_eq!(fanout(1), 4);
        assert_eq!(fanout(10), 7);
        assert_eq!(fanout(100), 9);
        assert_eq!(fanout(1000), 11);
    }

    #[test]
    fn pick_takes_distinct_peers_and_never_the_excluded_one() {
        let peers: Vec<SocketAddr> = (0..10)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 9000 + i)))
            .collect();
        for _ in 0..100 {
            let got = pick(&peers, Some(peers[3]), 3);
            assert_eq!(got.len(), 3);
            assert!(!got.contains(&peers[3]));
            let mut d = got.clone();
            d.sort();
            d.dedup();
            assert_eq!(d.len(), 3);
        }
        assert_eq!(pick(&peers[..2], Some(peers[0]), 3), vec![peers[1]]);
        assert!(pick(&[], None, 3).is_empty());
    }
}
