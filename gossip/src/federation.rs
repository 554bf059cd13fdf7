//! Federation: what gateways tell each other about their clusters (the WAN
//! pool), and what they re-publish into their own cluster (the LAN pool).
//!
//! Pure functions of snapshots, like the catalog:
//! - [`summarize`]: the own cluster's services as one gateway publishes them
//!   into the WAN pool (`sum:<service>`).
//! - [`WanView::derive`]: every cluster, its gateways and their summaries, as
//!   the WAN pool knows them.
//! - [`remote_records`]: the LAN keys (`wan:<cluster>:<service>`) a gateway
//!   publishes so that every node of its cluster knows what exists elsewhere.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::catalog::{current, Catalog, Member, NodeSnapshot};
use crate::keys::{self, Health, KeyError, LEAVING_KEY, NODE_KEY};

/// WAN key prefix of a gateway's per-service summary of its cluster.
pub const SUMMARY_PREFIX: &str = "sum:";
/// LAN key prefix of a gateway's record of another cluster's service.
pub const REMOTE_PREFIX: &str = "wan:";
/// Tags carried per summary; more are dropped (summaries are for routing, not inventory).
const MAX_TAGS: usize = 32;

/// One service of one cluster, as its gateways summarize it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSummary {
    /// Instances that are not critical.
    pub healthy: u32,
    pub instances: u32,
    /// The union of the instances' tags, sorted.
    pub tags: Vec<String>,
}

/// Another cluster's service, as a gateway re-publishes it into its own cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteService {
    pub service: String,
    pub cluster: String,
    pub healthy: u32,
    pub tags: Vec<String>,
    /// The remote cluster's gateways (live ones; all known ones when none is live).
    pub gateways: Vec<String>,
    /// Whether the publishing gateway can reach a live gateway of that cluster.
    pub reachable: bool,
    /// The publishing gateway's round-trip time to the nearest of them.
    pub rtt_ms: Option<u32>,
}

#[derive(Serialize, Deserialize)]
enum WireSummary {
    V1(ServiceSummary),
}

#[derive(Serialize, Deserialize)]
enum WireRemote {
    V1(RemoteService),
}

/// A gateway in the WAN pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WanGateway {
    pub node: String,
    pub cluster: String,
    /// Its WAN address: gossip and tunnels from other clusters go there.
    pub addr: SocketAddr,
    pub live: bool,
}

/// One cluster as the WAN pool knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterView {
    pub gateways: Vec<WanGateway>,
    pub services: BTreeMap<String, ServiceSummary>,
}

/// Every cluster of the mesh, from the WAN pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WanView {
    pub clusters: BTreeMap<String, ClusterView>,
    pub bad_records: usize,
}

pub fn encode_summary(s: &ServiceSummary) -> Result<String, KeyError> {
    keys::encode(&WireSummary::V1(s.clone()))
}

pub fn decode_summary(s: &str) -> Result<ServiceSummary, KeyError> {
    let WireSummary::V1(v) = keys::decode(s)?;
    Ok(v)
}

pub fn encode_remote(r: &RemoteService) -> Result<String, KeyError> {
    keys::encode(&WireRemote::V1(r.clone()))
}

pub fn decode_remote(s: &str) -> Result<RemoteService, KeyError> {
    let WireRemote::V1(v) = keys::decode(s)?;
    Ok(v)
}

/// The WAN node id of a gateway: node names are unique per cluster only.
pub fn wan_node_id(cluster: &str, node: &str) -> String {
    format!("{cluster}/{node}")
}

fn strip_cluster(id: &str) -> &str {
    id.split_once('/').map_or(id, |(_, n)| n)
}

/// The own cluster's services, one summary each, for the WAN pool.
pub fn summarize(catalog: &Catalog, cluster: &str) -> BTreeMap<String, ServiceSummary> {
    let mut out = BTreeMap::new();
    for (name, instances) in &catalog.services {
        let mut sum = ServiceSummary::default();
        let mut tags = BTreeSet::new();
        for i in instances.iter().filter(|i| i.cluster == cluster) {
            sum.instances += 1;
            if i.health != Health::Critical {
                sum.healthy += 1;
            }
            tags.extend(i.tags.iter().cloned());
        }
        if sum.instances > 0 {
            sum.tags = tags.into_iter().take(MAX_TAGS).collect();
            out.insert(name.clone(), sum);
        }
    }
    out
}

/// The WAN pool's member list, with plain node names.
pub fn wan_members(nodes: &[NodeSnapshot]) -> Vec<Member> {
    let mut members = crate::catalog::members(nodes);
    for m in &mut members {
        m.node = strip_cluster(&m.node).to_string();
    }
    members.sort_by(|a, b| (&a.cluster, &a.node).cmp(&(&b.cluster, &b.node)));
    members
}

impl WanView {
    /// Clusters and their services from WAN snapshots. A cluster's summary is
    /// merged over its live gateways (the highest healthy count wins: the
    /// gateways of one cluster see the same catalog, give or take a round);
    /// when none is live, the last summaries of its dead gateways are kept, so
    /// an unreachable cluster stays listed, as unreachable.
    pub fn derive(nodes: &[NodeSnapshot]) -> WanView {
        let mut view = WanView::default();
        // (cluster -> (from live gateways?, summaries)) merged below.
        let mut sums: BTreeMap<String, (bool, BTreeMap<String, ServiceSummary>)> = BTreeMap::new();
        for n in current(nodes) {
            if n.kvs.contains_key(LEAVING_KEY) {
                continue;
            }
            let Some(info) = n.kvs.get(NODE_KEY).and_then(|v| keys::decode_node(v).ok()) else {
                view.bad_records += 1;
                continue;
            };
            let cluster = view.clusters.entry(info.cluster.clone()).or_default();
            cluster.gateways.push(WanGateway {
                node: strip_cluster(&n.node).to_string(),
                cluster: info.cluster.clone(),
                addr: info.advertise,
                live: n.live,
            });
            let entry = sums.entry(info.cluster.clone()).or_default();
            if entry.0 && !n.live {
                continue;
            }
            if n.live && !entry.0 {
                *entry = (true, BTreeMap::new());
            }
            for (k, v) in n.kvs.range(SUMMARY_PREFIX.to_string()..) {
                let Some(service) = k.strip_prefix(SUMMARY_PREFIX) else {
                    break;
                };
                let Ok(sum) = decode_summary(v) else {
                    view.bad_records += 1;
                    continue;
                };
                let have = entry.1.entry(service.to_string()).or_default();
                if sum.healthy > have.healthy || have.instances == 0 {
                    *have = sum;
                }
            }
        }
        for (cluster, (_, services)) in sums {
            if let Some(c) = view.clusters.get_mut(&cluster) {
                c.services = services;
            }
        }
        view
    }

    /// Live gateways of `cluster`.
    pub fn live_gateways(&self, cluster: &str) -> Vec<&WanGateway> {
        self.clusters
            .get(cluster)
            .map(|c| c.gateways.iter().filter(|g| g.live).collect())
            .unwrap_or_default()
    }
}

/// The `wan:<cluster>:<service>` records a gateway of `own_cluster` publishes
/// into its LAN pool. `rtt` gives this gateway's RTT to a WAN address, if known.
pub fn remote_records(
    view: &WanView,
    own_cluster: &str,
    rtt: impl Fn(SocketAddr) -> Option<Duration>,
) -> Vec<RemoteService> {
    let mut out = Vec::new();
    for (cluster, c) in &view.clusters {
        if cluster == own_cluster {
            continue;
        }
        let live: Vec<&WanGateway> = c.gateways.iter().filter(|g| g.live).collect();
        let reachable = !live.is_empty();
        let shown: Vec<&WanGateway> = if reachable {
            live
        } else {
            c.gateways.iter().collect()
        };
        let rtt_ms = shown
            .iter()
            .filter(|g| g.live)
            .filter_map(|g| rtt(g.addr))
            .min()
            .map(rtt_bucket);
        let gateways: Vec<String> = shown.iter().map(|g| g.node.clone()).collect();
        for (service, sum) in &c.services {
            out.push(RemoteService {
                service: service.clone(),
                cluster: cluster.clone(),
                healthy: sum.healthy,
                tags: sum.tags.clone(),
                gateways: gateways.clone(),
                reachable,
                rtt_ms,
            });
        }
    }
    out
}

/// RTT rounded up to a power of two of milliseconds: precise enough to rank
/// clusters, coarse enough that jitter does not re-publish records every second.
pub fn rtt_bucket(d: Duration) -> u32 {
    let ms = u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1);
    ms.checked_next_power_of_two().unwrap_or(u32::MAX)
}

/// The LAN key of a remote service record.
pub fn remote_key(r: &RemoteService) -> String {
    format!("{REMOTE_PREFIX}{}:{}", r.cluster, r.service)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::catalog::Instance;
    use crate::keys::{encode_node, NodeInfo, Protocol};

    fn gateway(
        cluster: &str,
        node: &str,
        gen: u64,
        live: bool,
        sums: &[(&str, u32)],
    ) -> NodeSnapshot {
        let addr: SocketAddr = format!("10.0.{}.1:9470", gen).parse().unwrap();
        let mut kvs = BTreeMap::new();
        kvs.insert(
            NODE_KEY.into(),
            encode_node(&NodeInfo {
                cluster: cluster.into(),
                advertise: addr,
                gateway: true,
                version: "t".into(),
            })
            .unwrap(),
        );
        for (svc, healthy) in sums {
            let s = ServiceSummary {
                healthy: *healthy,
                instances: 2,
                tags: vec![],
            };
            kvs.insert(
                format!("{SUMMARY_PREFIX}{svc}"),
                encode_summary(&s).unwrap(),
            );
        }
        NodeSnapshot {
            node: wan_node_id(cluster, node),
            generation: gen,
            gossip_addr: addr,
            live,
            kvs: std::sync::Arc::new(kvs),
        }
    }

    fn inst(node: &str, health: Health, tags: &[&str]) -> Instance {
        Instance {
            service: "api".into(),
            node: node.into(),
            cluster: "east".into(),
            node_addr: "127.0.0.1:1".parse().unwrap(),
            addr: "127.0.0.1".into(),
            port: 1,
            protocol: Protocol::Tcp,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            health,
            check: None,
        }
    }

    #[test]
    fn summary_counts_healthy_instances_and_unions_tags() {
        let mut cat = Catalog::default();
        cat.services.insert(
            "api".into(),
            vec![
                inst("a", Health::Passing, &["v=1"]),
                inst("b", Health::Critical, &["v=2"]),
                inst("c", Health::Warning, &["v=1"]),
            ],
        );
        let s = &summarize(&cat, "east")["api"];
        assert_eq!((s.healthy, s.instances), (2, 3));
        assert_eq!(s.tags, vec!["v=1", "v=2"]);
        assert!(summarize(&cat, "west").is_empty());
    }

    #[test]
    fn live_gateways_win_and_dead_clusters_stay_listed_unreachable() {
        let nodes = vec![
            gateway("west", "gw1", 1, true, &[("api", 2)]),
            gateway("west", "gw2", 2, false, &[("api", 0), ("old", 1)]),
            gateway("south", "gw1", 3, false, &[("db", 1)]),
            gateway("east", "gw1", 4, true, &[("api", 5)]),
        ];
        let view = WanView::derive(&nodes);
        let west = &view.clusters["west"];
        assert_eq!(west.gateways.len(), 2);
        // Only the live gateway's summaries count while one is live.
        assert_eq!(west.services.keys().collect::<Vec<_>>(), vec!["api"]);
        assert_eq!(west.services["api"].healthy, 2);
        let recs = remote_records(&view, "east", |_| Some(Duration::from_millis(7)));
        let by: BTreeMap<_, _> = recs.iter().map(|r| (remote_key(r), r)).collect();
        assert_eq!(
            by.keys().collect::<Vec<_>>(),
            vec!["wan:south:db", "wan:west:api"]
        );
        let west_api = by["wan:west:api"];
        assert!(west_api.reachable);
        assert_eq!(west_api.gateways, vec!["gw1"]);
        assert_eq!(west_api.rtt_ms, Some(8));
        let south = by["wan:south:db"];
        assert!(!south.reachable);
        assert_eq!(south.gateways, vec!["gw1"]);
        assert_eq!(south.rtt_ms, None);
        assert_eq!(view.live_gateways("west").len(), 1);
        let names: Vec<_> = wan_members(&nodes)
            .into_iter()
            .map(|m| format!("{}/{}", m.cluster, m.node))
            .collect();
        assert_eq!(names, vec!["east/gw1", "south/gw1", "west/gw1", "west/gw2"]);
    }

    #[test]
    fn rtt_buckets_are_powers_of_two() {
        assert_eq!(rtt_bucket(Duration::from_micros(300)), 1);
        assert_eq!(rtt_bucket(Duration::from_millis(3)), 4);
        assert_eq!(rtt_bucket(Duration::from_millis(64)), 64);
        assert_eq!(rtt_bucket(Duration::from_secs(100_000_000)), u32::MAX);
    }

    #[test]
    fn remote_records_round_trip() {
        let r = RemoteService {
            service: "api".into(),
            cluster: "west".into(),
            healthy: 3,
            tags: vec!["v=1".into()],
            gateways: vec!["gw1".into()],
            reachable: true,
            rtt_ms: Some(3),
        };
        assert_eq!(decode_remote(&encode_remote(&r).unwrap()).unwrap(), r);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(s in ".{0,300}") {
            let _ = decode_remote(&s);
            let _ = decode_summary(&s);
        }
    }
}
