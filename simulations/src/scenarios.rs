//! The scenarios. Each starts real `GossipHandle`s (meshnode's chitchat
//! configuration, key schema and catalog) on a [`SimNet`] and measures in
//! virtual time. Every node publishes one `probe` instance, so "node X is in
//! node Y's catalog" is "Y's catalog lists X's probe", the same derivation
//! the data path uses (live nodes only).

use std::collections::HashMap;
use std::time::Duration;

use meshnode_gossip::federation::{encode_summary, ServiceSummary, WanView, SUMMARY_PREFIX};
use meshnode_gossip::{
    GossipConfig, GossipHandle, Health, PoolKind, Protocol, ServiceRecord, Tuning,
};
use meshnode_transport::Identity;
use tokio::time::Instant;

use crate::{addr, SimNet, SimPki};

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
pub async fn start_pool(n: usize, seed: u64) -> anyhow::Result<Pool> {
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
        nodes.push(GossipHandle::spawn(cfg.clone(), &pki.gated(&net, &cfg), None).await?);
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
    pub formation_s: f64,
    /// A new service on node 0 until every node's catalog lists it.
    pub convergence_s: f64,
    pub rounds: f64,
    pub lower_bound_rounds: u32,
    /// Idle gossip per node on the wire (zstd frames), bytes per second
    /// (10 s window after convergence).
    pub idle_bytes_per_node_s: f64,
    /// The same before compression: chitchat's serialized messages.
    pub idle_raw_bytes_per_node_s: f64,
    pub max_message_bytes: u64,
    pub max_frame_bytes: u64,
    pub oversize_messages: u64,
}

/// Convergence of a service change with `n` nodes.
pub async fn convergence(n: usize, seed: u64) -> anyhow::Result<Convergence> {
    let pool = start_pool(n, seed).await?;
    let limit = Duration::from_secs(120 + n as u64 / 10);
    let formation = pool
        .formed(limit)
        .await
        .ok_or_else(|| anyhow::anyhow!("{n} nodes did not form a pool within {limit:?}"))?;
    // Let the pool settle, then measure idle traffic.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = pool.net.stats();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = pool.net.stats();
    let idle = (after.wire_bytes - before.wire_bytes) as f64 / n as f64 / 10.0;
    let idle_raw = (after.bytes - before.bytes) as f64 / n as f64 / 10.0;
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
    let stats = pool.net.stats();
    let interval = pool.tuning.interval.as_secs_f64();
    pool.shutdown().await;
    Ok(Convergence {
        n,
        formation_s: formation.as_secs_f64(),
        convergence_s: conv.as_secs_f64(),
        rounds: conv.as_secs_f64() / interval,
        lower_bound_rounds: crate::lower_bound_rounds(n, FANOUT),
        idle_bytes_per_node_s: idle,
        idle_raw_bytes_per_node_s: idle_raw,
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
) -> anyhow::Result<Detection> {
    let pool = start_pool(n, seed).await?;
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
pub async fn partition(n: usize, split: Duration, seed: u64) -> anyhow::Result<Partition> {
    let pool = start_pool(n, seed).await?;
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
        let gw = GossipHandle::spawn(cfg.clone(), &pki.gated(&net, &cfg), None).await?;
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
    let pool = start_pool(6, seed).await?;
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
