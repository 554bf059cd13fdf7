//! The scenarios. Each starts real `GossipHandle`s (meshnode's chitchat
//! configuration, key schema, gate, prober, pushes, anti-entropy pacing and
//! catalog) on a [`SimNet`] and measures in virtual time. Every node
//! publishes one `probe` instance, so "node X is in node Y's catalog" is
//! "Y's catalog lists X's probe", the same derivation the data path uses
//! (live nodes only).
//!
//! [`Shape::Chitchat`] runs the protocol shape meshnode had before the
//! SWIM/push/pacing plane (chitchat alone: a digest exchange with three
//! peers every 250 ms, phi-accrual liveness), for the before/after figures.

use std::collections::HashMap;
use std::time::Duration;

use meshnode_gossip::federation::{encode_summary, ServiceSummary, WanView, SUMMARY_PREFIX};
use meshnode_gossip::{
    GossipConfig, GossipHandle, Health, PoolKind, Protocol, ServiceRecord, Tuning,
};
use meshnode_transport::Identity;
use tokio::time::Instant;

use crate::{addr, SimNet, SimPki};

/// Which protocol shape the nodes run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// meshnode's: SWIM probes with Lifeguard, pushes, paced anti-entropy.
    Plane,
    /// Before the plane: chitchat alone, every 250 ms, phi-accrual liveness.
    Chitchat,
}

impl Shape {
    pub fn as_str(self) -> &'static str {
        match self {
            Shape::Plane => "plane",
            Shape::Chitchat => "chitchat",
        }
    }
}

/// Starts one node on `net` in `shape`.
async fn spawn_node(
    net: &SimNet,
    pki: &SimPki,
    cfg: GossipConfig,
    shape: Shape,
) -> anyhow::Result<GossipHandle> {
    Ok(match shape {
        Shape::Chitchat => GossipHandle::spawn(cfg.clone(), &pki.gated(net, &cfg), None).await?,
        Shape::Plane => {
            let t = pki.gated_probing(net, &cfg);
            let h = GossipHandle::spawn(cfg.clone(), &t, t.probing()).await?;
            net.attach(cfg.advertise, cfg.me.uri(), t.plane());
            h
        }
    })
}

/// Push hops are counted with this latency on every gossip message.
pub const HOP: Duration = Duration::from_millis(100);

/// Catalog polls happen this often (virtual time): the time resolution.
const POLL: Duration = Duration::from_millis(50);
const FANOUT: usize = 3;
/// Quiet time after formation before a detection window starts.
pub const SETTLE: Duration = Duration::from_secs(10);

pub struct Pool {
    pub net: SimNet,
    pub nodes: Vec<GossipHandle>,
    pub tuning: Tuning,
}

fn record(name: &str, port: u16) -> ServiceRecord {
    ServiceRecord {
        name: name.into(),
        address: "127.0.0.1".into(),
        port,
        protocol: Protocol::Tcp,
        tags: vec![],
        health: Health::Passing,
    }
}

fn probe() -> ServiceRecord {
    record("probe", 1)
}

/// Starts `n` nodes of one cluster; the first three are everyone's seeds.
pub async fn start_pool(n: usize, seed: u64, shape: Shape) -> anyhow::Result<Pool> {
    let net = SimNet::new(seed);
    let pki = SimPki::new("sim")?;
    let tuning = Tuning::default();
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let (signer, cert_der) = pki.credentials("lan", &format!("n{i}"), false)?;
        let cfg = GossipConfig {
            me: Identity::new("sim", "lan", &format!("n{i}"))?,
            kind: PoolKind::Lan {
                cluster: "lan".into(),
            },
            generation: 1,
            advertise: addr(i),
            gateway: false,
            seeds: (0..n.min(FANOUT)).filter(|s| *s != i).map(addr).collect(),
            services: vec![probe()],
            tuning: tuning.clone(),
            signer,
            cert_der,
        };
        nodes.push(spawn_node(&net, &pki, cfg, shape).await?);
    }
    Ok(Pool { net, nodes, tuning })
}

impl Pool {
    /// How many probes node `i`'s catalog lists.
    pub fn seen_by(&self, i: usize) -> usize {
        self.nodes[i].catalog().instances("probe").len()
    }

    /// Waits (virtual time) until `cond` holds, polling every 50 ms; returns the time taken.
    pub async fn until(
        &self,
        limit: Duration,
        mut cond: impl FnMut(&Pool) -> bool,
    ) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if cond(self) {
                return Some(start.elapsed());
            }
            tokio::time::sleep(POLL).await;
        }
        cond(self).then(|| start.elapsed())
    }

    /// Until every node lists every probe.
    pub async fn formed(&self, limit: Duration) -> Option<Duration> {
        let n = self.nodes.len();
        self.until(limit, |p| (0..n).all(|i| p.seen_by(i) == n))
            .await
    }

    pub async fn shutdown(self) {
        for n in &self.nodes {
            n.shutdown().await;
        }
    }
}

#[derive(Clone, Debug)]
pub struct Convergence {
    pub n: usize,
    pub shape: Shape,
    pub formation_s: f64,
    /// A new service on node 0 until every node's catalog lists it.
    pub convergence_s: f64,
    /// [`Shape::Plane`]: push hops (every gossip message takes [`HOP`]);
    /// [`Shape::Chitchat`]: 250 ms gossip rounds (no latency).
    pub rounds: f64,
    /// The floor for `rounds`: ceil(log_{f+1} N) for fanout f (ln N + 4
    /// pushes per node; chitchat: 3 peers per round).
    pub lower_bound_rounds: u32,
    /// Idle gossip per node, all of it on the wire (frames, QUIC and IP
    /// overhead, probes and their ACKs), measured over `idle_window_s` after
    /// `settle_s`; `None` when the full window was skipped (see
    /// [`Convergence::idle_model`]).
    pub idle_bytes_per_node_s: Option<f64>,
    /// Of that, zstd frames only (the gossip messages' payload).
    pub idle_frame_bytes_per_node_s: Option<f64>,
    pub settle_s: f64,
    pub idle_window_s: f64,
    /// [`Shape::Plane`]: probes per node per second on the wire, over 60 s
    /// right after formation (their rate does not depend on the pace).
    pub probe_bytes_per_node_s: f64,
    /// Mean bytes on the wire of one anti-entropy exchange (SYN, SYN-ACK,
    /// ACK) in that window: a digest of every member, and heartbeats.
    pub exchange_bytes: f64,
    /// The idle cost at the settled pace, from those two: probes, plus one
    /// exchange per node per `idle_interval(N)`.
    pub idle_model: f64,
    /// The change's own cost: bytes on the wire in the fleet from the
    /// publish until every node knew (and 2 s more), above the idle rate.
    pub change_bytes: f64,
    pub max_message_bytes: u64,
    pub max_frame_bytes: u64,
    pub oversize_messages: u64,
}

/// How long the plane takes to reach its idle pace after formation, and a
/// window that holds at least two anti-entropy exchanges per node at it:
/// the Trickle interval doubles from 250 ms to `idle_interval(n)` (n
/// seconds, 10 s to 300 s), which takes about twice that.
pub fn idle_window(n: usize, shape: Shape) -> (Duration, Duration) {
    match shape {
        Shape::Chitchat => (Duration::from_secs(5), Duration::from_secs(10)),
        Shape::Plane => {
            let i = idle_interval(n);
            (
                2 * i + Duration::from_secs(5),
                (2 * i).max(Duration::from_secs(60)),
            )
        }
    }
}

/// The anti-entropy interval a settled pool of `n` runs at.
pub fn idle_interval(n: usize) -> Duration {
    meshnode_gossip::pacing::AntiEntropy::new(Default::default()).idle_interval(n)
}

/// Short window after formation for the probe rate and exchange size.
const SAMPLE: Duration = Duration::from_secs(60);

/// Convergence of a service change with `n` nodes, and the idle cost;
/// `full_idle`: also measure idle over the full settled window (slow in
/// CPU for large pools: every simulated node runs chitchat's 250 ms loop).
pub async fn convergence(
    n: usize,
    seed: u64,
    shape: Shape,
    full_idle: bool,
) -> anyhow::Result<Convergence> {
    let pool = start_pool(n, seed, shape).await?;
    let limit = Duration::from_secs(120 + n as u64 / 10);
    let Some(formation) = pool.formed(limit).await else {
        let seen: Vec<usize> = (0..n).map(|i| pool.seen_by(i)).collect();
        let low = (0..n).min_by_key(|i| seen[*i]).unwrap_or(0);
        let states = |m: Vec<meshnode_gossip::Member>| {
            m.iter()
                .map(|m| format!("{}={}", m.node, m.state.as_str()))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let keys: Vec<String> = pool.nodes[0]
            .snapshot()
            .await
            .iter()
            .filter(|s| s.node.ends_with(&format!("/n{low}")))
            .map(|s| {
                format!(
                    "{} live={} keys={:?}",
                    s.node,
                    s.live,
                    s.kvs.keys().collect::<Vec<_>>()
                )
            })
            .collect();
        anyhow::bail!(
            "{n} nodes did not form a pool within {limit:?}; probes each node lists: {seen:?}; node 0's members: {}; node {low}'s members: {}; node {low} as node 0 holds it: {keys:?}",
            states(pool.nodes[0].members().await),
            states(pool.nodes[low].members().await)
        );
    };
    let per = |a: u64, b: u64, w: Duration| (a - b) as f64 / n as f64 / w.as_secs_f64();
    // The probe rate and the size of an exchange, soon after formation.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let s0 = pool.net.stats();
    tokio::time::sleep(SAMPLE).await;
    let s1 = pool.net.stats();
    let probes = per(s1.probe_wire_bytes, s0.probe_wire_bytes, SAMPLE);
    let exchange_bytes = (s1.stream_wire_bytes() - s0.stream_wire_bytes()) as f64
        / (s1.syns - s0.syns).max(1) as f64;
    let idle_model = match shape {
        Shape::Plane => probes + exchange_bytes / idle_interval(n).as_secs_f64(),
        Shape::Chitchat => per(s1.total_wire_bytes(), s0.total_wire_bytes(), SAMPLE),
    };
    let (settle, window) = idle_window(n, shape);
    let (mut idle, mut idle_frames) = (None, None);
    if full_idle {
        tokio::time::sleep(settle.saturating_sub(SAMPLE + Duration::from_secs(5))).await;
        let before = pool.net.stats();
        tokio::time::sleep(window).await;
        let after = pool.net.stats();
        idle = Some(per(
            after.total_wire_bytes(),
            before.total_wire_bytes(),
            window,
        ));
        idle_frames = Some(per(after.wire_bytes, before.wire_bytes, window));
    }
    let hop = match shape {
        Shape::Plane => HOP,
        Shape::Chitchat => Duration::ZERO,
    };
    pool.net.set_latency(hop);
    let start = Instant::now();
    let before = pool.net.stats();
    pool.nodes[0]
        .publish_services(&[probe(), record("new-service", 2)])
        .await?;
    let conv = pool
        .until(limit, |p| {
            p.nodes
                .iter()
                .all(|h| !h.catalog().instances("new-service").is_empty())
        })
        .await
        .ok_or_else(|| {
            anyhow::anyhow!("the change did not reach all {n} nodes within {limit:?}")
        })?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = pool.net.stats().total_wire_bytes() - before.total_wire_bytes();
    let rate = idle.unwrap_or(idle_model);
    let change_bytes = (spent as f64 - rate * n as f64 * start.elapsed().as_secs_f64()).max(0.0);
    let stats = pool.net.stats();
    let (rounds, bound) = match shape {
        Shape::Plane => (
            conv.as_secs_f64() / HOP.as_secs_f64(),
            crate::lower_bound_rounds(n, meshnode_gossip::plane::fanout(n)),
        ),
        Shape::Chitchat => (
            conv.as_secs_f64() / pool.tuning.interval.as_secs_f64(),
            crate::lower_bound_rounds(n, FANOUT),
        ),
    };
    pool.shutdown().await;
    Ok(Convergence {
        n,
        shape,
        formation_s: formation.as_secs_f64(),
        convergence_s: conv.as_secs_f64(),
        rounds,
        lower_bound_rounds: bound,
        idle_bytes_per_node_s: idle,
        idle_frame_bytes_per_node_s: idle_frames,
        settle_s: settle.as_secs_f64(),
        idle_window_s: window.as_secs_f64(),
        probe_bytes_per_node_s: probes,
        exchange_bytes,
        idle_model,
        change_bytes,
        max_message_bytes: stats.max_message,
        max_frame_bytes: stats.max_wire,
        oversize_messages: stats.oversize,
    })
}

#[derive(Clone, Debug)]
pub struct Detection {
    pub n: usize,
    pub loss_pct: u32,
    /// Observation window under loss before the kill.
    pub window_s: f64,
    /// (observer, node) pairs in which a live node vanished from the catalog during the window.
    pub false_failures: usize,
    /// Kill of one node until every other node's catalog dropped it; None if not within 60 s.
    pub detection_s: Option<f64>,
    pub dropped: u64,
}

/// Failure detection and false failures with `loss` (0..1) on every message.
pub async fn detection(
    n: usize,
    loss: f64,
    window: Duration,
    seed: u64,
    shape: Shape,
) -> anyhow::Result<Detection> {
    let pool = start_pool(n, seed, shape).await?;
    pool.formed(Duration::from_secs(120))
        .await
        .ok_or_else(|| anyhow::anyhow!("pool did not form"))?;
    // Let the failure detectors collect heartbeat intervals first: right
    // after formation their windows hold a handful of samples.
    tokio::time::sleep(SETTLE).await;
    pool.net.set_loss(loss);
    let start = Instant::now();
    let mut false_failures = 0;
    while start.elapsed() < window {
        false_failures += (0..n).filter(|i| pool.seen_by(*i) < n).count();
        tokio::time::sleep(POLL).await;
    }
    let victim = n - 1;
    pool.net.set_down(addr(victim), true);
    pool.nodes[victim].shutdown().await;
    let detected = pool
        .until(Duration::from_secs(60), |p| {
            (0..victim).all(|i| p.seen_by(i) == n - 1)
        })
        .await;
    let dropped = pool.net.stats().dropped_loss;
    pool.shutdown().await;
    Ok(Detection {
        n,
        loss_pct: (loss * 100.0).round() as u32,
        window_s: window.as_secs_f64(),
        false_failures,
        detection_s: detected.map(|d| d.as_secs_f64()),
        dropped,
    })
}

#[derive(Clone, Debug)]
pub struct Partition {
    pub n: usize,
    pub split_s: f64,
    /// Cut until every node's catalog holds only its own half.
    pub each_side_sees_half_s: Option<f64>,
    /// Heal until every node lists all n again.
    pub reconverge_s: Option<f64>,
}

/// Splits the pool in two halves for `split`, then heals.
pub async fn partition(
    n: usize,
    split: Duration,
    seed: u64,
    shape: Shape,
) -> anyhow::Result<Partition> {
    let pool = start_pool(n, seed, shape).await?;
    pool.formed(Duration::from_secs(120))
        .await
        .ok_or_else(|| anyhow::anyhow!("pool did not form"))?;
    let half = n / 2;
    let groups: HashMap<_, _> = (0..n).map(|i| (addr(i), u32::from(i >= half))).collect();
    pool.net.partition(groups);
    let start = Instant::now();
    let sides = pool
        .until(split, |p| {
            (0..n).all(|i| p.seen_by(i) == if i < half { half } else { n - half })
        })
        .await;
    let left = split.saturating_sub(start.elapsed());
    tokio::time::sleep(left).await;
    pool.net.heal();
    let back = pool.formed(Duration::from_secs(120)).await;
    pool.shutdown().await;
    Ok(Partition {
        n,
        split_s: split.as_secs_f64(),
        each_side_sees_half_s: sides.map(|d| d.as_secs_f64()),
        reconverge_s: back.map(|d| d.as_secs_f64()),
    })
}

#[derive(Clone, Debug)]
pub struct Federation {
    pub clusters: usize,
    /// Start until every gateway's WAN view lists every cluster with its summary.
    pub summaries_everywhere_s: Option<f64>,
    /// One cluster's summary change until every gateway's view shows it.
    pub change_everywhere_s: Option<f64>,
    pub idle_bytes_per_gateway_s: f64,
}

/// The WAN pool: one gateway per cluster, each publishing `sum:` summaries
/// of its cluster; every gateway derives the `WanView` the federation loop uses.
pub async fn federation(clusters: usize, seed: u64) -> anyhow::Result<Federation> {
    let net = SimNet::new(seed);
    let pki = SimPki::new("sim")?;
    let tuning = Tuning::default();
    let mut gws = Vec::with_capacity(clusters);
    for i in 0..clusters {
        let cluster = format!("c{i}");
        let (signer, cert_der) = pki.credentials(&cluster, "gw", true)?;
        let cfg = GossipConfig {
            me: Identity::new("sim", &cluster, "gw")?,
            kind: PoolKind::Wan,
            generation: 1,
            advertise: addr(i),
            gateway: true,
            seeds: (0..clusters.min(FANOUT))
                .filter(|s| *s != i)
                .map(addr)
                .collect(),
            services: vec![],
            tuning: tuning.clone(),
            signer,
            cert_der,
        };
        let gw = spawn_node(&net, &pki, cfg, Shape::Plane).await?;
        publish_summary(&gw, &format!("svc-{i}"), 2).await?;
        gws.push(gw);
    }
    let all_listed = |expect_healthy: Option<(usize, u32)>| {
        let gws = &gws;
        async move {
            for gw in gws {
                let view = WanView::derive(&gw.snapshot().await);
                if view.clusters.len() != clusters {
                    return false;
                }
                if view.clusters.values().any(|c| c.services.is_empty()) {
                    return false;
                }
                if let Some((which, healthy)) = expect_healthy {
                    let ok = view
                        .clusters
                        .get(&format!("c{which}"))
                        .and_then(|c| c.services.get(&format!("svc-{which}")))
                        .is_some_and(|s| s.healthy == healthy);
                    if !ok {
                        return false;
                    }
                }
            }
            true
        }
    };
    let start = Instant::now();
    let mut everywhere = None;
    while start.elapsed() < Duration::from_secs(120) {
        if all_listed(None).await {
            everywhere = Some(start.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = net.stats();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle = (net.stats().wire_bytes - before.wire_bytes) as f64 / clusters as f64 / 10.0;
    publish_summary(&gws[0], "svc-0", 7).await?;
    let start = Instant::now();
    let mut change = None;
    while start.elapsed() < Duration::from_secs(60) {
        if all_listed(Some((0, 7))).await {
            change = Some(start.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for gw in &gws {
        gw.shutdown().await;
    }
    Ok(Federation {
        clusters,
        summaries_everywhere_s: everywhere,
        change_everywhere_s: change,
        idle_bytes_per_gateway_s: idle,
    })
}

/// What a gateway's federation loop publishes: its LAN catalog summarized
/// by the node's own [`summarize`](meshnode_gossip::federation::summarize).
async fn publish_cluster(
    wan: &GossipHandle,
    lan: &GossipHandle,
    cluster: &str,
) -> anyhow::Result<()> {
    let mut values = std::collections::BTreeMap::new();
    for (service, sum) in meshnode_gossip::federation::summarize(&lan.catalog(), cluster) {
        let encoded = encode_summary(&sum).map_err(|e| anyhow::anyhow!("{e}"))?;
        values.insert(format!("{SUMMARY_PREFIX}{service}"), encoded);
    }
    wan.publish_prefixed(SUMMARY_PREFIX, values).await;
    Ok(())
}

async fn publish_summary(gw: &GossipHandle, service: &str, healthy: u32) -> anyhow::Result<()> {
    let sum = ServiceSummary {
        healthy,
        instances: healthy,
        tags: vec![],
    };
    let encoded = encode_summary(&sum).map_err(|e| anyhow::anyhow!("{e}"))?;
    gw.publish_prefixed(
        SUMMARY_PREFIX,
        [(format!("{SUMMARY_PREFIX}{service}"), encoded)].into(),
    )
    .await;
    Ok(())
}

/// Real gossip messages for fuzzing seeds: a 6-node pool forms, a service is
/// added, and a node dies, so SYNs, SYN-ACKs and ACKs with digests, deltas
/// and key deletions all pass; every 5th message is kept.
pub async fn corpus(seed: u64) -> anyhow::Result<Vec<Vec<u8>>> {
    let pool = start_pool(6, seed, Shape::Plane).await?;
    pool.net.sample(5);
    let limit = Duration::from_secs(60);
    pool.formed(limit)
        .await
        .ok_or_else(|| anyhow::anyhow!("6 nodes did not form a pool within {limit:?}"))?;
    pool.nodes[0]
        .publish_services(&[probe(), record("new-service", 2)])
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    pool.nodes[1].publish_services(&[]).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    pool.net.set_down(crate::addr(5), true);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let samples = pool.net.samples();
    pool.shutdown().await;
    Ok(samples)
}

#[derive(Clone, Debug)]
pub struct Federated {
    pub clusters: usize,
    pub per_cluster: usize,
    pub loss_pct: u32,
    /// Start until every LAN pool formed and every gateway's WAN view
    /// lists every cluster.
    pub formation_s: Option<f64>,
    /// A new service on a node of cluster 0 until every gateway's WAN view
    /// lists it: LAN push, the gateway's summary, WAN push.
    pub change_s: Option<f64>,
    /// All gossip on the wire (LAN and WAN) per node per second, over 60 s
    /// right after formation, under `loss_pct`.
    pub bytes_per_node_s: f64,
    /// (observer, member) polls in that window in which a live node was
    /// missing from a LAN catalog or a live gateway was held dead on the WAN.
    pub false_failures: usize,
    /// Kill of cluster 1's gateway until every other gateway's WAN view
    /// and every node of cluster 1 dropped it.
    pub detection_s: Option<f64>,
}

fn wan_addr(i: usize) -> std::net::SocketAddr {
    std::net::SocketAddr::new(addr(i).ip(), 9471)
}

/// `clusters` clusters of `per_cluster` nodes each, node 0 of each its
/// gateway, the gateways in one WAN pool, every pool on the plane. The
/// scenario plays the gateways' federation loop: a gateway republishes its
/// summary when its LAN catalog changes (polled every 250 ms).
pub async fn federated(
    clusters: usize,
    per_cluster: usize,
    loss: f64,
    seed: u64,
) -> anyhow::Result<Federated> {
    let net = SimNet::new(seed);
    let pki = SimPki::new("sim")?;
    let tuning = Tuning::default();
    let mut lans: Vec<Vec<GossipHandle>> = Vec::with_capacity(clusters);
    let mut wans = Vec::with_capacity(clusters);
    for c in 0..clusters {
        let cluster = format!("c{c}");
        let base = c * per_cluster;
        let mut nodes = Vec::with_capacity(per_cluster);
        for j in 0..per_cluster {
            let gateway = j == 0;
            let (signer, cert_der) = pki.credentials(&cluster, &format!("n{j}"), gateway)?;
            let lan = GossipConfig {
                me: Identity::new("sim", &cluster, &format!("n{j}"))?,
                kind: PoolKind::Lan {
                    cluster: cluster.clone(),
                },
                generation: 1,
                advertise: addr(base + j),
                gateway,
                seeds: (0..per_cluster.min(FANOUT))
                    .filter(|s| *s != j)
                    .map(|s| addr(base + s))
                    .collect(),
                services: vec![probe()],
                tuning: tuning.clone(),
                signer: signer.clone(),
                cert_der: cert_der.clone(),
            };
            if gateway {
                let wan = GossipConfig {
                    kind: PoolKind::Wan,
                    advertise: wan_addr(base),
                    seeds: (0..clusters.min(FANOUT))
                        .filter(|s| *s != c)
                        .map(|s| wan_addr(s * per_cluster))
                        .collect(),
                    services: vec![],
                    ..lan.clone()
                };
                let gw = spawn_node(&net, &pki, wan, Shape::Plane).await?;
                publish_summary(&gw, "probe", per_cluster as u32).await?;
                wans.push(gw);
            }
            nodes.push(spawn_node(&net, &pki, lan, Shape::Plane).await?);
        }
        lans.push(nodes);
    }
    let lan_missing = |lans: &Vec<Vec<GossipHandle>>, skip: Option<usize>| -> usize {
        let mut missing = 0;
        for nodes in lans {
            for (j, h) in nodes.iter().enumerate() {
                if Some(j) == skip {
                    continue;
                }
                let want = per_cluster - usize::from(skip.is_some());
                missing += want.saturating_sub(h.catalog().instances("probe").len());
            }
        }
        missing
    };
    // WAN: (clusters listed with a live gateway, service listed) per gateway.
    async fn wan_state(gw: &GossipHandle, service: &str) -> (usize, bool) {
        let view = WanView::derive(&gw.snapshot().await);
        let live = view
            .clusters
            .values()
            .filter(|c| c.gateways.iter().any(|g| g.live))
            .count();
        let listed = view
            .clusters
            .get("c0")
            .is_some_and(|c| c.services.contains_key(service));
        (live, listed)
    }
    let step = Duration::from_millis(250);
    let start = Instant::now();
    let mut formation = None;
    while start.elapsed() < Duration::from_secs(300) {
        if lan_missing(&lans, None) == 0 {
            let mut all = true;
            for gw in &wans {
                if wan_state(gw, "probe").await.0 != clusters {
                    all = false;
                    break;
                }
            }
            if all {
                formation = Some(start.elapsed().as_secs_f64());
                break;
            }
        }
        tokio::time::sleep(step).await;
    }
    // Idle, under loss: bytes and false failures.
    tokio::time::sleep(Duration::from_secs(5)).await;
    net.set_loss(loss);
    let before = net.stats();
    let window = Instant::now();
    let mut false_failures = 0;
    while window.elapsed() < SAMPLE {
        false_failures += lan_missing(&lans, None);
        for gw in &wans {
            false_failures += clusters - wan_state(gw, "probe").await.0;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let bytes = (net.stats().total_wire_bytes() - before.total_wire_bytes()) as f64
        / (clusters * per_cluster) as f64
        / window.elapsed().as_secs_f64();
    net.set_loss(0.0);
    // A change crossing clusters.
    net.set_latency(HOP);
    let start = Instant::now();
    let mut published = false;
    let mut change = None;
    lans[0][per_cluster - 1]
        .publish_services(&[probe(), record("new-service", 2)])
        .await?;
    while start.elapsed() < Duration::from_secs(120) {
        if !published && !lans[0][0].catalog().instances("new-service").is_empty() {
            publish_cluster(&wans[0], &lans[0][0], "c0").await?;
            published = true;
        }
        if published {
            let mut all = true;
            for gw in &wans {
                if !wan_state(gw, "new-service").await.1 {
                    all = false;
                    break;
                }
            }
            if all {
                change = Some(start.elapsed().as_secs_f64());
                break;
            }
        }
        tokio::time::sleep(step).await;
    }
    net.set_latency(Duration::ZERO);
    // Kill cluster 1's gateway (both its pools).
    let mut detection = None;
    if clusters > 1 {
        net.set_down(addr(per_cluster), true);
        net.set_down(wan_addr(per_cluster), true);
        lans[1][0].shutdown().await;
        wans[1].shutdown().await;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            let lan_done = lans[1]
                .iter()
                .skip(1)
                .all(|h| h.catalog().instances("probe").len() == per_cluster - 1);
            let mut wan_done = lan_done;
            for (c, gw) in wans.iter().enumerate() {
                if c == 1 || !wan_done {
                    continue;
                }
                let view = WanView::derive(&gw.snapshot().await);
                wan_done = view
                    .clusters
                    .get("c1")
                    .is_none_or(|c| c.gateways.iter().all(|g| !g.live));
            }
            if wan_done {
                detection = Some(start.elapsed().as_secs_f64());
                break;
            }
            tokio::time::sleep(POLL).await;
        }
    }
    for (c, nodes) in lans.iter().enumerate() {
        for (j, h) in nodes.iter().enumerate() {
            if !(c == 1 && j == 0) {
                h.shutdown().await;
            }
        }
    }
    for (c, gw) in wans.iter().enumerate() {
        if c != 1 {
            gw.shutdown().await;
        }
    }
    Ok(Federated {
        clusters,
        per_cluster,
        loss_pct: (loss * 100.0).round() as u32,
        formation_s: formation,
        change_s: change,
        bytes_per_node_s: bytes,
        false_failures,
        detection_s: detection,
    })
}
