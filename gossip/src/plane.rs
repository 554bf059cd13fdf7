//! What the gossip transport and the pool share: the anti-entropy pacer,
//! the push targets, and the queues to the per-peer senders and the prober.
//!
//! The shape of the protocol around chitchat (see ARCHITECTURE.md, "Gossip"):
//! - a local change is **pushed** at once to [`PUSH_FANOUT`] live peers as an
//!   unsolicited chitchat message carrying only that change, and a receiver
//!   that learns something new from it passes it on the same way (infect and
//!   die: each node forwards a change once);
//! - chitchat's full digest exchanges are **paced** ([`crate::pacing`]);
//! - liveness comes from **probes** ([`crate::swim`]), sent as QUIC datagrams
//!   on the pool's connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::RngExt;
use tokio::sync::mpsc;

use crate::metrics::{DROPPED, PUSHES};
use crate::pacing::{AntiEntropy, PacingConfig};
use crate::wire::{self, Message, NodeDelta, NodeDigest};

/// What [`GossipHandle::spawn`](crate::GossipHandle::spawn) needs to probe
/// and push over a transport: from [`QuicTransport::probing`](crate::QuicTransport::probing).
#[derive(Clone)]
pub struct Probing {
    pub plane: Arc<Plane>,
    pub guard: crate::gate::Guard,
}

/// Peers a change is pushed (and passed on) to.
pub const PUSH_FANOUT: usize = 3;
const OUT_QUEUE: usize = 1024;
const PROBE_QUEUE: usize = 1024;

/// What the per-peer senders carry.
pub(crate) enum Out {
    /// A serialized chitchat message: one uni stream.
    Stream(SocketAddr, Vec<u8>),
    /// A probe: one QUIC datagram.
    Datagram(SocketAddr, Bytes),
}

/// A probe datagram from a verified pool member.
pub(crate) struct Datagram {
    /// The SPIFFE id of the connection's certificate.
    pub from_id: String,
    pub from: SocketAddr,
    pub bytes: Bytes,
}

pub struct Plane {
    start: Instant,
    pacing: Mutex<AntiEntropy>,
    members: AtomicUsize,
    peers: Mutex<Vec<SocketAddr>>,
    out: mpsc::Sender<Out>,
    out_rx: Mutex<Option<mpsc::Receiver<Out>>>,
    probes: mpsc::Sender<Datagram>,
    probes_rx: Mutex<Option<mpsc::Receiver<Datagram>>>,
}

impl Plane {
    pub fn new(pacing: PacingConfig) -> Arc<Self> {
        let (out, out_rx) = mpsc::channel(OUT_QUEUE);
        let (probes, probes_rx) = mpsc::channel(PROBE_QUEUE);
        Arc::new(Self {
            start: Instant::now(),
            pacing: Mutex::new(AntiEntropy::new(pacing)),
            members: AtomicUsize::new(1),
            peers: Mutex::new(Vec::new()),
            out,
            out_rx: Mutex::new(Some(out_rx)),
            probes,
            probes_rx: Mutex::new(Some(probes_rx)),
        })
    }

    /// The plane's monotonic clock.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    pub(crate) fn take_out(&self) -> Option<mpsc::Receiver<Out>> {
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

    pub(crate) fn deliver_probe(&self, d: Datagram) {
        if self.probes.try_send(d).is_err() {
            metrics::counter!(DROPPED, "reason" => "queue_full").increment(1);
        }
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

    /// SYNs let through and held back.
    pub fn pacing_counts(&self) -> (u64, u64) {
        lock(&self.pacing).counts()
    }

    /// Pushes node deltas to up to [`PUSH_FANOUT`] random live peers other
    /// than `exclude`. A delta that starts a node from scratch (a new member,
    /// or a new generation) goes in a SYN-ACK whose digest names only those
    /// nodes, since chitchat applies deltas only for nodes it knows and a
    /// digest entry is what makes it create one; the receiver's transport
    /// drops chitchat's answer to it. Anything else goes in an ACK, which
    /// chitchat applies without answering.
    pub(crate) fn push(
        &self,
        delta: Vec<NodeDelta>,
        exclude: Option<SocketAddr>,
        why: &'static str,
    ) {
        if delta.is_empty() {
            return;
        }
        let targets = {
            let peers = lock(&self.peers);
            pick(&peers, exclude, PUSH_FANOUT)
        };
        if targets.is_empty() {
            return;
        }
        let msg = if delta.iter().any(|nd| nd.from_version_excluded == 0) {
            Message::SynAck {
                digest: delta
                    .iter()
                    .map(|nd| {
                        (
                            nd.id.clone(),
                            NodeDigest {
                                heartbeat: 0,
                                last_gc_version: 0,
                                max_version: nd.max_version(),
                            },
                        )
                    })
                    .collect(),
                delta,
            }
        } else {
            Message::Ack { delta }
        };
        let bytes = wire::encode(&msg, wire::Blocks::Raw);
        metrics::counter!(PUSHES, "why" => why).increment(targets.len() as u64);
        for to in targets {
            self.send(to, bytes.clone());
        }
    }
}

impl Plane {
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
