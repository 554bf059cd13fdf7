//! `meshnode explain`: why a new connection to a service would go where it
//! goes. Pure: [`clusters`] reads the catalog and the caller's ejection
//! state the way [`crate::balance::plan`] does, and says for each cluster
//! whether it is a candidate, in which order, and why.

use std::collections::BTreeMap;

use meshnode_gossip::{Health, Instance, RemoteRoute};
use serde::Serialize;

use crate::balance::{self, Pick, Scope};

/// One cluster as a candidate for a new connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClusterRow {
    pub cluster: String,
    /// Position in the order of clusters tried (from 1); `None`: not tried.
    pub order: Option<usize>,
    pub why: String,
    /// Own cluster: instances by state. Other clusters: healthy instances
    /// the remote gateways report.
    pub healthy: u32,
    pub critical: u32,
    pub ejected: u32,
    /// Other clusters: the local gateways that reach it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub via: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<u32>,
}

/// Every cluster the catalog knows for the service, candidates first in the
/// order they are tried, then the others with the reason they are not.
/// `ejected`: any ejection; `unreachable`: an ejection for connect
/// failures, the only kind that puts other clusters first (see outlier.rs).
pub fn clusters(
    instances: &[Instance],
    routes: &[RemoteRoute],
    scope: &Scope<'_>,
    ejected: impl Fn(&Pick<'_>) -> bool,
    unreachable: impl Fn(&Pick<'_>) -> bool,
) -> Vec<ClusterRow> {
    let mut rows = Vec::new();
    let own = scope.own_cluster;
    let local: Vec<&Instance> = instances.iter().filter(|i| i.cluster == own).collect();
    let critical = local
        .iter()
        .filter(|i| i.health == Health::Critical)
        .count() as u32;
    let healthy: Vec<&&Instance> = local
        .iter()
        .filter(|i| i.health != Health::Critical)
        .collect();
    let ejected_n = healthy.iter().filter(|i| ejected(&Pick::Local(i))).count() as u32;
    let unreachable_n = healthy
        .iter()
        .filter(|i| unreachable(&Pick::Local(i)))
        .count() as u32;
    let healthy_n = healthy.len() as u32;
    let local_ok = scope.pinned.is_none_or(|c| c == own);
    let fresh_local = healthy_n > unreachable_n;
    let mut own_row = ClusterRow {
        cluster: own.to_string(),
        order: None,
        why: String::new(),
        healthy: healthy_n,
        critical,
        ejected: ejected_n,
        via: Vec::new(),
        rtt_ms: None,
    };
    own_row.why = if !local_ok {
        format!(
            "own cluster, but the upstream is pinned to cluster {}",
            scope.pinned.unwrap_or_default()
        )
    } else if healthy_n == 0 {
        if local.is_empty() {
            "own cluster: no instance".to_string()
        } else {
            "own cluster: no healthy instance".to_string()
        }
    } else if !fresh_local {
        "own cluster: every healthy instance is ejected (tried after the other clusters)"
            .to_string()
    } else if ejected_n == healthy_n {
        "own cluster: every healthy instance is ejected for bad answers (still tried before other clusters)"
            .to_string()
    } else {
        "own cluster: local instances come first".to_string()
    };
    // Remote clusters, in the order `remote_order` gives (its random tie
    // break only orders gateways within a cluster, and clusters of equal
    // rank and RTT by name).
    let ordered = balance::remote_order(routes, scope, |_| 0);
    let mut remote_rank: Vec<String> = Vec::new();
    for r in &ordered {
        if !remote_rank.contains(&r.cluster) {
            remote_rank.push(r.cluster.clone());
        }
    }
    let mut by_cluster: BTreeMap<&str, Vec<&RemoteRoute>> = BTreeMap::new();
    for r in routes.iter().filter(|r| r.cluster != own) {
        by_cluster.entry(&r.cluster).or_default().push(r);
    }
    let remote_row = |cluster: &str, rs: &[&RemoteRoute]| {
        let reachable: Vec<&&RemoteRoute> = rs.iter().filter(|r| r.reachable).collect();
        let rtt = rs.iter().filter_map(|r| r.rtt_ms).min();
        let all_ejected = !rs.is_empty() && rs.iter().all(|r| ejected(&Pick::Remote(r)));
        let why = if scope.pinned.is_some_and(|c| c != cluster) {
            format!(
                "the upstream is pinned to cluster {}",
                scope.pinned.unwrap_or_default()
            )
        } else if scope.pinned.is_none()
            && !scope.failover.is_empty()
            && !scope.failover.iter().any(|c| c == cluster)
        {
            "not in the upstream's failover list".to_string()
        } else if reachable.is_empty() {
            "no local gateway reaches its gateways".to_string()
        } else if rs.iter().all(|r| r.healthy == 0) {
            "its gateways report no healthy instance".to_string()
        } else if all_ejected {
            "its route is ejected after failures (tried last)".to_string()
        } else if let Some(p) = scope.failover.iter().position(|c| c == cluster) {
            format!("failover[{p}] in the upstream's order")
        } else if scope.pinned.is_some() {
            "the cluster the upstream is pinned to".to_string()
        } else {
            match rtt {
                Some(ms) => format!("nearest first: {ms} ms from a local gateway"),
                None => "round-trip time unknown (after measured clusters)".to_string(),
            }
        };
        ClusterRow {
            cluster: cluster.to_string(),
            order: None,
            why,
            healthy: rs.iter().map(|r| r.healthy).max().unwrap_or(0),
            critical: 0,
            ejected: rs.iter().filter(|r| ejected(&Pick::Remote(r))).count() as u32,
            via: reachable.iter().map(|r| r.via.clone()).collect(),
            rtt_ms: rtt,
        }
    };
    // The order `plan` tries: fresh local, fresh remote, ejected local, ejected remote.
    let mut tried: Vec<ClusterRow> = Vec::new();
    let mut stale: Vec<ClusterRow> = Vec::new();
    let mut untried: Vec<ClusterRow> = Vec::new();
    if local_ok && fresh_local {
        tried.push(own_row);
    } else if local_ok && healthy_n > 0 {
        stale.push(own_row);
    } else {
        untried.push(own_row);
    }
    let local_only = scope.pinned == Some(own);
    for cluster in &remote_rank {
        let rs = by_cluster.remove(cluster.as_str()).unwrap_or_default();
        let row = remote_row(cluster, &rs);
        if local_only {
            untried.push(row);
        } else if rs.iter().any(|r| !ejected(&Pick::Remote(r))) {
            tried.push(row);
        } else {
            stale.push(row);
        }
    }
    for (cluster, rs) in by_cluster {
        untried.push(remote_row(cluster, &rs));
    }
    tried.extend(stale);
    for (i, row) in tried.iter_mut().enumerate() {
        row.order = Some(i + 1);
    }
    rows.extend(tried);
    rows.extend(untried);
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::fixtures::{inst, route};

    fn scope<'a>(failover: &'a [String], pinned: Option<&'a str>) -> Scope<'a> {
        Scope {
            own_cluster: "east",
            failover,
            pinned,
        }
    }

    #[test]
    fn local_first_then_nearest_and_every_excluded_cluster_says_why() {
        let instances = [
            inst("a", "east", Health::Passing),
            inst("b", "east", Health::Critical),
        ];
        let routes = [
            route("west", "gw", 2, Some(40)),
            route("north", "gw", 1, Some(10)),
            route("south", "gw", 0, Some(5)),
        ];
        let rows = clusters(&instances, &routes, &scope(&[], None), |_| false, |_| false);
        let names: Vec<_> = rows.iter().map(|r| (r.cluster.as_str(), r.order)).collect();
        assert_eq!(
            names,
            [
                ("east", Some(1)),
                ("north", Some(2)),
                ("west", Some(3)),
                ("south", None)
            ]
        );
        assert_eq!((rows[0].healthy, rows[0].critical), (1, 1));
        assert!(rows[1].why.contains("10 ms"), "{}", rows[1].why);
        assert!(rows[3].why.contains("no healthy"), "{}", rows[3].why);
    }

    #[test]
    fn failover_lists_pins_and_ejection_reorder_clusters() {
        let instances = [inst("a", "east", Health::Passing)];
        let routes = [
            route("west", "gw", 2, Some(40)),
            route("north", "gw", 1, Some(10)),
        ];
        let fo = vec!["west".to_string()];
        let rows = clusters(&instances, &routes, &scope(&fo, None), |_| false, |_| false);
        assert_eq!(rows[1].cluster, "west");
        assert!(rows[1].why.starts_with("failover[0]"));
        assert_eq!(rows[2].order, None);
        assert!(rows[2].why.contains("failover list"));
        // Every local instance ejected: other clusters come first.
        let local = |p: &Pick<'_>| matches!(p, Pick::Local(_));
        let rows = clusters(&instances, &routes, &scope(&[], None), local, local);
        assert_eq!(rows[0].cluster, "north");
        let east = rows.iter().find(|r| r.cluster == "east").unwrap();
        assert_eq!(east.order, Some(3));
        assert!(east.why.contains("ejected"));
        // Ejected for bad answers only: still tried before other clusters.
        let rows = clusters(&instances, &routes, &scope(&[], None), local, |_| false);
        assert_eq!(rows[0].cluster, "east");
        assert!(rows[0].why.contains("bad answers"), "{}", rows[0].why);
        // Pinned to west: east and north are not tried.
        let rows = clusters(
            &instances,
            &routes,
            &scope(&[], Some("west")),
            |_| false,
            |_| false,
        );
        assert_eq!(rows[0].cluster, "west");
        assert_eq!(rows[0].order, Some(1));
        assert!(rows[1..].iter().all(|r| r.order.is_none()));
    }
}
