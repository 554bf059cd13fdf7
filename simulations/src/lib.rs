//! meshnode's real gossip layer — chitchat as meshnode configures it, its
//! key schema and its catalog and WAN-view derivation — on an in-memory
//! network with virtual time. Only the network is simulated.
//!
//! Everything runs on one current-thread tokio runtime that starts paused:
//! when every task waits, the clock jumps to the next timer, so a minute of
//! gossip among a thousand nodes takes seconds of CPU. Loss and partitions
//! draw from a seeded RNG; chitchat picks its gossip peers with OS entropy,
//! so runs differ in detail and the scenarios report and assert bounds and
//! distributions, not exact traces.
// A measuring crate: it reads wall and virtual clocks itself (the
// disallowed-methods rule of clippy.toml is for the mesh's own code).
#![allow(clippy::disallowed_methods)]

pub mod plot;
pub mod replicas;
pub mod scenarios;

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use meshnode_gossip::chitchat::transport::{Socket, Transport};
use meshnode_gossip::chitchat::{ChitchatMessage, Deserializable, Serializable};
use meshnode_gossip::frame::{Codec, FrameError};
use meshnode_gossip::plane::{Datagram, Out, Plane, Probing};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::mpsc;

/// The largest gossip frame meshnode's QUIC transport carries (chitchat's own
/// UDP limit), after compression; bigger frames are dropped there, and here.
pub const MAX_FRAME: usize = meshnode_gossip::frame::MAX_WIRE;
/// Messages queued per node before the network drops, like a full socket buffer.
const INBOX: usize = 1024;

/// One gossip message in flight: chitchat's serialized bytes, and the
/// message itself when chitchat built it on this side (the chitchat-only
/// path hands that on as is). Messages decoded from bytes are never
/// serialized again: chitchat's serializer asserts on some decoded deltas.
struct Packet {
    from: SocketAddr,
    raw: Vec<u8>,
    msg: Option<ChitchatMessage>,
}

type Inbox = mpsc::Sender<Packet>;

/// The in-memory network: every node's inbox, the faults in force, counters.
#[derive(Clone)]
pub struct SimNet {
    inner: Arc<Mutex<Net>>,
}

struct Net {
    inboxes: HashMap<SocketAddr, Inbox>,
    rng: StdRng,
    /// Probability of dropping a message, 0..1.
    loss: f64,
    /// How long a gossip message takes to arrive (0: at once).
    latency: std::time::Duration,
    /// Nodes that are down: nothing to or from them is delivered.
    down: HashSet<SocketAddr>,
    /// Partition groups: messages cross only within a group. Empty: no partition.
    group: HashMap<SocketAddr, u32>,
    pub stats: NetStats,
    /// Keep every `sample_every`-th message (0: none), up to [`MAX_SAMPLES`].
    sample_every: u64,
    samples: Vec<Vec<u8>>,
    /// Nodes with a [`Plane`] (probes and pushes): their id and plane.
    planes: HashMap<SocketAddr, (String, Arc<Plane>)>,
}

/// What a QUIC packet adds to a datagram's payload on the wire: IPv4 and
/// UDP headers (28), a short header with quinn's 8-byte connection id and a
/// 2-byte packet number (11), the AEAD tag (16) and the DATAGRAM frame's
/// type and length (2). A model, checked against the bench's nftables
/// counts (a probe's ping came to 62 B there).
pub const DATAGRAM_OVERHEAD: u64 = 57;
/// A packet holding only an ACK frame: how a direct probe is answered.
pub const ACK_PACKET: u64 = 60;
/// What QUIC adds to a gossip message on its own uni stream: one packet's
/// headers, the STREAM frame's, and the peer's ACK packet.
pub const STREAM_OVERHEAD: u64 = DATAGRAM_OVERHEAD + 6 + ACK_PACKET;

/// Serialized messages kept by [`SimNet::sample`] at most.
pub const MAX_SAMPLES: usize = 64;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub messages: u64,
    /// chitchat's serialized bytes, before the frame codec.
    pub bytes: u64,
    /// Bytes on the wire: frames as `meshnode-gossip/2` sends them (zstd).
    pub wire_bytes: u64,
    pub dropped_loss: u64,
    pub dropped_partition: u64,
    /// Messages whose frame is over [`MAX_FRAME`]: chitchat would have to split them.
    pub oversize: u64,
    /// The largest serialized message, and the largest frame.
    pub max_message: u64,
    pub max_wire: u64,
    /// Probe traffic: datagrams and the ACKs that answer direct probes, on
    /// the wire (see [`DATAGRAM_OVERHEAD`], [`ACK_PACKET`]).
    pub probe_packets: u64,
    pub probe_wire_bytes: u64,
    /// chitchat SYNs delivered: anti-entropy exchanges started.
    pub syns: u64,
}

impl NetStats {
    /// Everything on the wire: frames with QUIC and IP overhead, and probes.
    pub fn total_wire_bytes(&self) -> u64 {
        self.stream_wire_bytes() + self.probe_wire_bytes
    }

    /// Gossip messages on the wire (frames and QUIC/IP overhead), no probes.
    pub fn stream_wire_bytes(&self) -> u64 {
        self.wire_bytes + self.messages * STREAM_OVERHEAD
    }
}

struct SimSocket {
    me: SocketAddr,
    net: SimNet,
    rx: mpsc::Receiver<Packet>,
}

impl SimNet {
    pub fn new(seed: u64) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Net {
                inboxes: HashMap::new(),
                rng: StdRng::seed_from_u64(seed),
                loss: 0.0,
                latency: std::time::Duration::ZERO,
                down: HashSet::new(),
                group: HashMap::new(),
                stats: NetStats::default(),
                sample_every: 0,
                samples: Vec::new(),
                planes: HashMap::new(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Net> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_loss(&self, loss: f64) {
        self.lock().loss = loss.clamp(0.0, 1.0);
    }

    /// Every gossip message (not probes) arrives `latency` after it was
    /// sent: what makes push hops countable in virtual time.
    pub fn set_latency(&self, latency: std::time::Duration) {
        self.lock().latency = latency;
    }

    pub fn set_down(&self, addr: SocketAddr, down: bool) {
        let mut n = self.lock();
        if down {
            n.down.insert(addr);
        } else {
            n.down.remove(&addr);
        }
    }

    /// Splits the network: `groups[i]` is the group of node `i`'s address.
    pub fn partition(&self, groups: HashMap<SocketAddr, u32>) {
        self.lock().group = groups;
    }

    pub fn heal(&self) {
        self.lock().group.clear();
    }

    pub fn stats(&self) -> NetStats {
        self.lock().stats
    }

    /// Keeps chitchat's serialized bytes of every `every`-th message sent
    /// from now on (up to [`MAX_SAMPLES`]): real messages, as fuzzing seeds.
    pub fn sample(&self, every: u64) {
        self.lock().sample_every = every;
    }

    pub fn samples(&self) -> Vec<Vec<u8>> {
        self.lock().samples.clone()
    }

    /// Carries `plane`'s pushes and probes for the node at `addr` (SPIFFE
    /// id `node_id`). A direct probe is acknowledged at once when the link
    /// passes both ways (the QUIC ACK); datagrams go to the target's prober.
    /// Must run inside the simulation's runtime.
    pub fn attach(&self, addr: SocketAddr, node_id: String, plane: Arc<Plane>) {
        let Some(mut out) = plane.take_out() else {
            return;
        };
        self.lock().planes.insert(addr, (node_id.clone(), plane));
        let net = self.clone();
        tokio::spawn(async move {
            while let Some(o) = out.recv().await {
                match o {
                    Out::Stream(to, bytes) => net.deliver_raw(addr, to, bytes, None),
                    Out::Datagram(to, bytes) => net.datagram(addr, &node_id, to, bytes),
                    Out::Probe(to, bytes, seq) => net.probe(addr, to, bytes.len() as u64, seq),
                }
            }
        });
    }

    /// Whether a packet from `from` to `to` gets through (drawing loss).
    fn passes(n: &mut Net, from: SocketAddr, to: SocketAddr) -> bool {
        if n.down.contains(&from) || n.down.contains(&to) {
            return false;
        }
        if !n.group.is_empty() && n.group.get(&from) != n.group.get(&to) {
            n.stats.dropped_partition += 1;
            return false;
        }
        if n.loss > 0.0 && n.rng.random::<f64>() < n.loss {
            n.stats.dropped_loss += 1;
            return false;
        }
        true
    }

    fn datagram(&self, from: SocketAddr, from_id: &str, to: SocketAddr, bytes: bytes::Bytes) {
        let mut n = self.lock();
        n.stats.probe_packets += 1;
        n.stats.probe_wire_bytes += bytes.len() as u64 + DATAGRAM_OVERHEAD;
        if !Self::passes(&mut n, from, to) {
            return;
        }
        if let Some((_, plane)) = n.planes.get(&to) {
            plane.deliver_probe(Datagram {
                from_id: from_id.to_string(),
                from,
                bytes,
            });
        }
    }

    fn probe(&self, from: SocketAddr, to: SocketAddr, len: u64, seq: u32) {
        let mut n = self.lock();
        n.stats.probe_packets += 1;
        n.stats.probe_wire_bytes += len + DATAGRAM_OVERHEAD;
        if !Self::passes(&mut n, from, to) {
            return;
        }
        n.stats.probe_packets += 1;
        n.stats.probe_wire_bytes += ACK_PACKET;
        if !Self::passes(&mut n, to, from) {
            return;
        }
        let target = n.planes.get(&to).map(|(id, _)| id.clone());
        if let (Some(id), Some((_, plane))) = (target, n.planes.get(&from)) {
            plane.probe_acked(id, to, seq);
        }
    }

    fn deliver(&self, from: SocketAddr, to: SocketAddr, msg: ChitchatMessage) {
        let raw = msg.serialize_to_vec();
        self.deliver_raw(from, to, raw, Some(msg));
    }

    fn deliver_raw(
        &self,
        from: SocketAddr,
        to: SocketAddr,
        raw: Vec<u8>,
        msg: Option<ChitchatMessage>,
    ) {
        // Compress outside the lock: it is the costliest step of a delivery.
        let frame = Codec::Zstd.encode(&raw);
        let mut n = self.lock();
        n.stats.messages += 1;
        if n.sample_every > 0
            && n.stats.messages.is_multiple_of(n.sample_every)
            && n.samples.len() < MAX_SAMPLES
        {
            n.samples.push(raw.clone());
        }
        n.stats.bytes += raw.len() as u64;
        n.stats.max_message = n.stats.max_message.max(raw.len() as u64);
        let wire = match frame {
            Ok(f) => f.len() as u64,
            Err(FrameError::Oversized(len)) => len as u64,
            Err(_) => raw.len() as u64,
        };
        n.stats.wire_bytes += wire;
        n.stats.max_wire = n.stats.max_wire.max(wire);
        if wire as usize > MAX_FRAME {
            n.stats.oversize += 1;
            return;
        }
        if !Self::passes(&mut n, from, to) {
            return;
        }
        // chitchat's header: a 2-byte magic, the protocol version, the type.
        if raw.get(3) == Some(&0) {
            n.stats.syns += 1;
        }
        if let Some(inbox) = n.inboxes.get(&to) {
            let packet = Packet { from, raw, msg };
            if n.latency.is_zero() {
                let _ = inbox.try_send(packet);
            } else {
                let (inbox, latency) = (inbox.clone(), n.latency);
                tokio::spawn(async move {
                    tokio::time::sleep(latency).await;
                    let _ = inbox.try_send(packet);
                });
            }
        }
    }
}

impl SimNet {
    fn open_inbox(&self, listen_addr: SocketAddr) -> mpsc::Receiver<Packet> {
        let (tx, rx) = mpsc::channel(INBOX);
        self.lock().inboxes.insert(listen_addr, tx);
        rx
    }
}

#[async_trait]
impl Transport for SimNet {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        Ok(Box::new(SimSocket {
            me: listen_addr,
            net: self.clone(),
            rx: self.open_inbox(listen_addr),
        }))
    }
}

/// A node's gossip on the [`SimNet`] as over QUIC: the node's [`Plane`]
/// paces its SYNs and reads what arrives, and every message arriving goes
/// through the gate as bytes (decode, signature and freshness checks), as
/// `read_frame` does on a QUIC stream. Spawn the node with
/// [`PlaneTransport::probing`], then [`SimNet::attach`] its plane.
pub struct PlaneTransport {
    net: SimNet,
    probing: Probing,
}

impl PlaneTransport {
    pub fn probing(&self) -> Option<Probing> {
        Some(self.probing.clone())
    }

    pub fn plane(&self) -> Arc<Plane> {
        self.probing.plane.clone()
    }
}

struct PlaneSocket {
    me: SocketAddr,
    net: SimNet,
    probing: Probing,
    rx: mpsc::Receiver<Packet>,
}

#[async_trait]
impl Transport for PlaneTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        Ok(Box::new(PlaneSocket {
            me: listen_addr,
            net: self.net.clone(),
            probing: self.probing.clone(),
            rx: self.net.open_inbox(listen_addr),
        }))
    }
}

async fn next_packet(rx: &mut mpsc::Receiver<Packet>) -> anyhow::Result<Packet> {
    rx.recv()
        .await
        .ok_or_else(|| anyhow::anyhow!("network closed"))
}

#[async_trait]
impl Socket for PlaneSocket {
    async fn send(&mut self, to: SocketAddr, msg: ChitchatMessage) -> anyhow::Result<()> {
        if self.probing.plane.outgoing(to, &msg) {
            self.net.deliver(self.me, to, msg);
        }
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            let p = next_packet(&mut self.rx).await?;
            let guard = &self.probing.guard;
            let Some(decoded) = guard.decode(&p.raw, p.from) else {
                continue;
            };
            if let Some((msg, fresh)) = guard.check_fresh(decoded, p.from) {
                self.probing.plane.incoming(p.from, &msg, fresh);
                return Ok((p.from, msg));
            }
        }
    }
}

#[async_trait]
impl Socket for SimSocket {
    async fn send(&mut self, to: SocketAddr, msg: ChitchatMessage) -> anyhow::Result<()> {
        self.net.deliver(self.me, to, msg);
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            let p = next_packet(&mut self.rx).await?;
            if let Some(msg) = p.msg {
                return Ok((p.from, msg));
            }
            if let Ok(msg) = ChitchatMessage::deserialize(&mut &p.raw[..]) {
                return Ok((p.from, msg));
            }
        }
    }
}

/// Node `i`'s gossip address: 10.a.b.c:9470.
pub fn addr(i: usize) -> SocketAddr {
    let i = i as u32 + 1;
    SocketAddr::new(
        Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8).into(),
        9470,
    )
}

/// A paused current-thread runtime: virtual time.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
}

/// The lower bound on rounds for push gossip with fanout `f` to reach `n`
/// nodes: every informed node informs at most `f` more per round.
pub fn lower_bound_rounds(n: usize, fanout: usize) -> u32 {
    let mut reached = 1usize;
    let mut rounds = 0;
    while reached < n {
        reached = reached.saturating_mul(fanout + 1);
        rounds += 1;
    }
    rounds
}

/// The simulated mesh's PKI: one CA, a certificate per node, and the gate
/// every node runs on the in-memory network, as nodes do over QUIC.
pub struct SimPki {
    ca: meshnode_transport::pki::Ca,
    authority: Arc<dyn meshnode_gossip::Authority>,
}

impl SimPki {
    pub fn new(mesh: &str) -> anyhow::Result<Self> {
        use meshnode_transport::pki::{Ca, Role};
        let day = std::time::Duration::from_secs(86_400);
        let ca = Ca::generate(mesh, day)?;
        let any = ca.issue("sim", "authority", Role::Node, day)?;
        let tls = meshnode_transport::tls::TlsMaterial::from_pem(
            ca.cert_pem(),
            &any.cert_pem,
            &any.key_pem,
        )?;
        Ok(Self {
            ca,
            authority: Arc::new(tls),
        })
    }

    /// A key and certificate (DER) for `cluster`/`node`.
    pub fn credentials(
        &self,
        cluster: &str,
        node: &str,
        gateway: bool,
    ) -> anyhow::Result<(Arc<meshnode_transport::pki::sign::NodeSigner>, Vec<u8>)> {
        use meshnode_transport::pki::Role;
        let role = if gateway { Role::Gateway } else { Role::Node };
        let issued = self
            .ca
            .issue(cluster, node, role, std::time::Duration::from_secs(86_400))?;
        let signer = meshnode_transport::pki::sign::NodeSigner::from_pem(&issued.key_pem)?;
        let der = meshnode_transport::pki::first_cert_der(&issued.cert_pem)?;
        Ok((Arc::new(signer), der))
    }

    /// `net` behind the gate of the node `cfg` describes, with probes and
    /// pushes as over QUIC: spawn the node with the transport's
    /// `probing()`, then [`SimNet::attach`] its plane. Must run inside the
    /// simulation's runtime (the plane's clock is tokio's).
    pub fn gated_probing(
        &self,
        net: &SimNet,
        cfg: &meshnode_gossip::GossipConfig,
    ) -> PlaneTransport {
        PlaneTransport {
            net: net.clone(),
            probing: Probing {
                plane: Plane::new(meshnode_gossip::pacing::PacingConfig::default()),
                guard: cfg.guard(
                    self.authority.clone(),
                    meshnode_gossip::wire::Limits::default(),
                ),
            },
        }
    }

    /// `net` behind the gate of the node `cfg` describes.
    pub fn gated(
        &self,
        net: &SimNet,
        cfg: &meshnode_gossip::GossipConfig,
    ) -> meshnode_gossip::GatedTransport<SimNet> {
        meshnode_gossip::GatedTransport::new(
            net.clone(),
            cfg.guard(
                self.authority.clone(),
                meshnode_gossip::wire::Limits::default(),
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_bound_is_ceil_log_f_plus_1() {
        assert_eq!(lower_bound_rounds(1, 3), 0);
        assert_eq!(lower_bound_rounds(4, 3), 1);
        assert_eq!(lower_bound_rounds(5, 3), 2);
        assert_eq!(lower_bound_rounds(100, 3), 4);
        assert_eq!(lower_bound_rounds(1000, 3), 5);
        assert_eq!(lower_bound_rounds(10_000, 3), 7);
    }

    #[test]
    fn addresses_are_distinct() {
        let set: HashSet<_> = (0..70_000).map(addr).collect();
        assert_eq!(set.len(), 70_000);
    }
}
