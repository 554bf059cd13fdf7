//! The catalog and the member list, derived as pure functions of node states.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::federation::{decode_remote, REMOTE_PREFIX};
use crate::keys::{self, Health, NodeInfo, Protocol, LEAVING_KEY, NODE_KEY, SERVICE_PREFIX};

/// One node's state as gossip knows it, detached from chitchat's types.
#[derive(Clone, Debug)]
pub struct NodeSnapshot {
    pub node: String,
    /// Increases on every restart; the highest one is the current incarnation.
    pub generation: u64,
    pub gossip_addr: SocketAddr,
    /// The failure detector's verdict.
    pub live: bool,
    /// Shared: a snapshot is kept between rebuilds while its version holds.
    pub kvs: Arc<BTreeMap<String, String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    Alive,
    Suspect,
    Dead,
    Left,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Member {
    pub node: String,
    pub cluster: String,
    pub addr: SocketAddr,
    pub state: MemberState,
    pub gateway: bool,
}

/// A service instance as seen in the catalog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Instance {
    pub service: String,
    pub node: String,
    pub cluster: String,
    /// The hosting node's QUIC address: where tunnels to this instance go.
    pub node_addr: SocketAddr,
    pub addr: String,
    pub port: u16,
    pub protocol: Protocol,
    pub tags: Vec<String>,
    pub health: Health,
    /// The check output that made `health`, and since when (absent: no
    /// check, or a node that does not publish it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<keys::CheckRecord>,
}

/// A way to another cluster's service: through one gateway of this cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RemoteRoute {
    pub service: String,
    /// The cluster that hosts the service.
    pub cluster: String,
    /// The local gateway that forwards there, and its LAN QUIC address.
    pub via: String,
    pub via_addr: SocketAddr,
    pub healthy: u32,
    pub tags: Vec<String>,
    /// The remote cluster's gateways.
    pub gateways: Vec<String>,
    pub reachable: bool,
    pub rtt_ms: Option<u32>,
}

/// Services by name, each with its instances sorted by (node, port).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Catalog {
    pub services: BTreeMap<String, Vec<Instance>>,
    /// Services of other clusters, as the local gateways re-publish them,
    /// sorted by (cluster, via).
    pub remote: BTreeMap<String, Vec<RemoteRoute>>,
    /// Records that failed to decode (from a newer or broken peer) and were skipped.
    pub bad_records: usize,
}

// === impl MemberState ===

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Dead => "dead",
            MemberState::Left => "left",
        }
    }
}

/// Keeps the newest incarnation of each node: restarts leave the old generation
/// behind as a dead entry until chitchat garbage-collects it.
pub fn current(nodes: &[NodeSnapshot]) -> Vec<&NodeSnapshot> {
    let mut newest: BTreeMap<&str, &NodeSnapshot> = BTreeMap::new();
    for n in nodes {
        match newest.get(n.node.as_str()) {
            Some(have) if have.generation >= n.generation => {}
            _ => {
                newest.insert(&n.node, n);
            }
        }
    }
    newest.into_values().collect()
}

fn info(n: &NodeSnapshot) -> Option<NodeInfo> {
    keys::decode_node(n.kvs.get(NODE_KEY)?).ok()
}

/// The member list: one entry per node name.
pub fn members(nodes: &[NodeSnapshot]) -> Vec<Member> {
    current(nodes)
        .into_iter()
        .map(|n| {
            let info = info(n);
            let state = if n.kvs.contains_key(LEAVING_KEY) {
                MemberState::Left
            } else if n.live {
                MemberState::Alive
            } else {
                MemberState::Dead
            };
            Member {
                node: n.node.clone(),
                cluster: info.as_ref().map(|i| i.cluster.clone()).unwrap_or_default(),
                addr: info.as_ref().map(|i| i.advertise).unwrap_or(n.gossip_addr),
                state,
                gateway: info.is_some_and(|i| i.gateway),
            }
        })
        .collect()
}

/// Live, not leaving nodes that hold the CA key, as (node, QUIC address).
pub fn ca_nodes(nodes: &[NodeSnapshot]) -> Vec<(String, SocketAddr)> {
    live_with(nodes, keys::CA_ROLE_KEY)
}

/// Live nodes that have not left and carry `key`, with their advertise address.
fn live_with(nodes: &[NodeSnapshot], key: &str) -> Vec<(String, SocketAddr)> {
    current(nodes)
        .into_iter()
        .filter(|n| n.live && !n.kvs.contains_key(LEAVING_KEY) && n.kvs.contains_key(key))
        .filter_map(|n| Some((n.node.clone(), info(n)?.advertise)))
        .collect()
}

/// WAN pool: live gateways that front a CA node of their cluster (their
/// `ca_via`, which the gate verified), as (`cluster/node`, WAN address).
pub fn ca_fronts(nodes: &[NodeSnapshot]) -> Vec<(String, SocketAddr)> {
    live_with(nodes, keys::CA_VIA_KEY)
}

impl Catalog {
    /// Derives the catalog: instances of live nodes that have not left.
    pub fn derive(nodes: &[NodeSnapshot]) -> Catalog {
        let mut cat = Catalog::default();
        for n in current(nodes) {
            if !n.live || n.kvs.contains_key(LEAVING_KEY) {
                continue;
            }
            let Some(info) = info(n) else {
                cat.bad_records += 1;
                continue;
            };
            for (k, v) in n.kvs.range(SERVICE_PREFIX.to_string()..) {
                if !k.starts_with(SERVICE_PREFIX) {
                    break;
                }
                let Ok(rec) = keys::decode_service(v) else {
                    cat.bad_records += 1;
                    continue;
                };
                let check = n
                    .kvs
                    .get(&keys::check_key(&rec.name, rec.port))
                    .filter(|v| !v.is_empty())
                    .and_then(|v| keys::decode_check(v).ok());
                cat.services
                    .entry(rec.name.clone())
                    .or_default()
                    .push(Instance {
                        service: rec.name,
                        node: n.node.clone(),
                        cluster: info.cluster.clone(),
                        node_addr: info.advertise,
                        addr: rec.address,
                        port: rec.port,
                        protocol: rec.protocol,
                        tags: rec.tags,
                        health: rec.health,
                        check,
                    });
            }
            if !info.gateway {
                continue;
            }
            for (k, v) in n.kvs.range(REMOTE_PREFIX.to_string()..) {
                if !k.starts_with(REMOTE_PREFIX) {
                    break;
                }
                let Ok(r) = decode_remote(v) else {
                    cat.bad_records += 1;
                    continue;
                };
                cat.remote
                    .entry(r.service.clone())
                    .or_default()
                    .push(RemoteRoute {
                        service: r.service,
                        cluster: r.cluster,
                        via: n.node.clone(),
                        via_addr: info.advertise,
                        healthy: r.healthy,
                        tags: r.tags,
                        gateways: r.gateways,
                        reachable: r.reachable,
                        rtt_ms: r.rtt_ms,
                    });
            }
        }
        for list in cat.services.values_mut() {
            list.sort_by(|a, b| (&a.node, a.port).cmp(&(&b.node, b.port)));
        }
        for list in cat.remote.values_mut() {
            list.sort_by(|a, b| (&a.cluster, &a.via).cmp(&(&b.cluster, &b.via)));
        }
        cat
    }

    pub fn instances(&self, service: &str) -> &[Instance] {
        self.services.get(service).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn remote_routes(&self, service: &str) -> &[RemoteRoute] {
        self.remote.get(service).map(Vec::as_slice).unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{encode_node, encode_service, ServiceRecord};

    fn node(
        name: &str,
        generation: u64,
        live: bool,
        services: &[(&str, u16, Health)],
    ) -> NodeSnapshot {
        let addr: SocketAddr = format!("127.0.0.{}:9470", generation % 200 + 1)
            .parse()
            .unwrap();
        let mut kvs = BTreeMap::new();
        kvs.insert(
            NODE_KEY.to_string(),
            encode_node(&NodeInfo {
                cluster: "east".into(),
                advertise: addr,
                gateway: false,
                version: "t".into(),
            })
            .unwrap(),
        );
        for (svc, port, health) in services {
            let rec = ServiceRecord {
                name: svc.to_string(),
                address: "127.0.0.1".into(),
                port: *port,
                protocol: Protocol::Tcp,
                tags: vec![],
                health: *health,
            };
            kvs.insert(rec.key(), encode_service(&rec).unwrap());
        }
        NodeSnapshot {
            node: name.into(),
            generation,
            gossip_addr: addr,
            live,
            kvs: Arc::new(kvs),
        }
    }

    #[test]
    fn live_nodes_contribute_instances_dead_and_leaving_do_not() {
        let mut leaving = node("c", 1, true, &[("api", 3, Health::Passing)]);
        Arc::make_mut(&mut leaving.kvs).insert(LEAVING_KEY.into(), "1".into());
        let nodes = vec![
            node(
                "a",
                1,
                true,
                &[("api", 1, Health::Passing), ("db", 5432, Health::Critical)],
            ),
            node("b", 1, false, &[("api", 2, Health::Passing)]),
            leaving,
        ];
        let cat = Catalog::derive(&nodes);
        let api: Vec<_> = cat
            .instances("api")
            .iter()
            .map(|i| (i.node.as_str(), i.port))
            .collect();
        assert_eq!(api, vec![("a", 1)]);
        // Health is reported, not filtered: the balancer decides.
        assert_eq!(cat.instances("db")[0].health, Health::Critical);
        let states: Vec<_> = members(&nodes)
            .into_iter()
            .map(|m| (m.node, m.state))
            .collect();
        assert_eq!(
            states,
            vec![
                ("a".into(), MemberState::Alive),
                ("b".into(), MemberState::Dead),
                ("c".into(), MemberState::Left)
            ]
        );
    }

    #[test]
    fn newest_generation_wins_after_restart() {
        let nodes = vec![
            node("a", 1, false, &[("old", 1, Health::Passing)]),
            node("a", 2, true, &[("new", 1, Health::Passing)]),
        ];
        let cat = Catalog::derive(&nodes);
        assert!(cat.instances("old").is_empty());
        assert_eq!(cat.instances("new").len(), 1);
        assert_eq!(members(&nodes).len(), 1);
        assert_eq!(members(&nodes)[0].state, MemberState::Alive);
    }

    #[test]
    fn garbage_records_are_skipped_and_counted() {
        let mut n = node("a", 1, true, &[("api", 1, Health::Passing)]);
        Arc::make_mut(&mut n.kvs).insert("svc:evil:1".into(), "!!not base64!!".into());
        let cat = Catalog::derive(&[n]);
        assert_eq!(cat.instances("api").len(), 1);
        assert_eq!(cat.bad_records, 1);
        let mut no_info = node("b", 1, true, &[("api", 2, Health::Passing)]);
        Arc::make_mut(&mut no_info.kvs).remove(NODE_KEY);
        assert_eq!(Catalog::derive(&[no_info]).services.len(), 0);
    }

    #[test]
    fn remote_routes_come_only_from_gateways() {
        use crate::federation::{encode_remote, remote_key, RemoteService};
        let r = RemoteService {
            service: "api".into(),
            cluster: "west".into(),
            healthy: 1,
            tags: vec![],
            gateways: vec!["gw".into()],
            reachable: true,
            rtt_ms: None,
        };
        let mut gw = node("gw", 1, true, &[]);
        let mut info = keys::decode_node(&gw.kvs[NODE_KEY]).unwrap();
        info.gateway = true;
        Arc::make_mut(&mut gw.kvs).insert(NODE_KEY.into(), keys::encode_node(&info).unwrap());
        Arc::make_mut(&mut gw.kvs).insert(remote_key(&r), encode_remote(&r).unwrap());
        // A plain node publishing the same key is ignored: only gateways forward.
        let mut liar = node("liar", 2, true, &[]);
        Arc::make_mut(&mut liar.kvs).insert(remote_key(&r), encode_remote(&r).unwrap());
        let cat = Catalog::derive(&[gw, liar]);
        let routes = cat.remote_routes("api");
        assert_eq!(routes.len(), 1);
        assert_eq!(
            (routes[0].via.as_str(), routes[0].cluster.as_str()),
            ("gw", "west")
        );
    }
}
