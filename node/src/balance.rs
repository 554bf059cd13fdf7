//! Choosing instances for one connection: locality tiers, then power of two
//! choices on active streams. Pure: the caller supplies ejection state, load and randomness.

use meshnode_gossip::{Health, Instance, RemoteRoute};

/// How many instances one connection may try (the first plus retries).
pub const MAX_ATTEMPTS: usize = 3;

/// The instances to try, in order.
///
/// Tiers: the own cluster, then the clusters of `failover` in order, then any
/// other cluster. Critical instances are never chosen. Ejected instances are
/// skipped, unless every healthy instance is ejected (then ejection is ignored:
/// trying a suspect instance beats refusing every connection).
/// The first pick is the less loaded of two random candidates of the best
/// non-empty tier; retries follow by tier, then by load.
pub fn order<'a>(
    instances: &'a [Instance],
    own_cluster: &str,
    failover: &[String],
    ejected: impl Fn(&Instance) -> bool,
    active: impl Fn(&Instance) -> u64,
    mut random: impl FnMut(usize) -> usize,
) -> Vec<&'a Instance> {
    let healthy: Vec<&Instance> = instances
        .iter()
        .filter(|i| i.health != Health::Critical)
        .collect();
    let mut usable: Vec<&Instance> = healthy.iter().copied().filter(|i| !ejected(i)).collect();
    if usable.is_empty() {
        usable = healthy;
    }
    let tier = |i: &Instance| -> usize {
        if i.cluster == own_cluster {
            0
        } else {
            failover
                .iter()
                .position(|c| *c == i.cluster)
                .map_or(failover.len() + 1, |p| p + 1)
        }
    };
    usable.sort_by_key(|i| (tier(i), active(i)));
    if usable.len() >= 2 {
        let best = tier(usable[0]);
        let n = usable.iter().take_while(|i| tier(i) == best).count();
        if n >= 2 {
            let a = random(n);
            let b = (a + 1 + random(n - 1)) % n;
            let pick = if active(usable[b]) < active(usable[a]) {
                b
            } else {
                a
            };
            let first = usable.remove(pick);
            usable.insert(0, first);
        }
    }
    usable.truncate(MAX_ATTEMPTS);
    usable
}

/// One attempt of a connection: an instance of the own cluster, or another
/// cluster through one of the local gateways.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick<'a> {
    Local(&'a Instance),
    Remote(&'a RemoteRoute),
}

/// Where a connection may go, as an upstream's config says.
pub struct Scope<'a> {
    pub own_cluster: &'a str,
    /// Cluster order after the own cluster; empty means "every other cluster, nearest first".
    pub failover: &'a [String],
    /// Only this cluster, when set.
    pub pinned: Option<&'a str>,
}

/// The attempts for one connection, in order, at most [`MAX_ATTEMPTS`]:
/// healthy own-cluster instances that are not ejected (see [`order`]), then
/// other clusters through gateways (see [`remote_order`]), and only then
/// ejected ones: with every local instance ejected, another cluster is a
/// better bet than a suspect instance.
pub fn plan<'a>(
    instances: &'a [Instance],
    routes: &'a [RemoteRoute],
    scope: &Scope<'_>,
    ejected: impl Fn(&Pick<'_>) -> bool,
    active: impl Fn(&Instance) -> u64,
    mut random: impl FnMut(usize) -> usize,
) -> Vec<Pick<'a>> {
    let local_ok = scope.pinned.is_none_or(|c| c == scope.own_cluster);
    let local: Vec<Pick<'a>> = if local_ok {
        order(
            instances,
            scope.own_cluster,
            &[],
            |i| ejected(&Pick::Local(i)),
            &active,
            &mut random,
        )
        .into_iter()
        .filter(|i| i.cluster == scope.own_cluster)
        .map(Pick::Local)
        .collect()
    } else {
        Vec::new()
    };
    let remote: Vec<Pick<'a>> = if scope.pinned == Some(scope.own_cluster) {
        Vec::new()
    } else {
        remote_order(routes, scope, &mut random)
            .into_iter()
            .map(Pick::Remote)
            .collect()
    };
    let (fresh_local, stale_local): (Vec<_>, Vec<_>) = local.into_iter().partition(|p| !ejected(p));
    let (fresh_remote, stale_remote): (Vec<_>, Vec<_>) =
        remote.into_iter().partition(|p| !ejected(p));
    let mut out: Vec<Pick<'a>> = fresh_local
        .into_iter()
        .chain(fresh_remote)
        .chain(stale_local)
        .chain(stale_remote)
        .collect();
    out.truncate(MAX_ATTEMPTS);
    out
}

/// Routes to other clusters, in order: reachable routes to clusters that
/// report healthy instances; clusters in the `failover` order when it is
/// given (others are not used), otherwise by the local gateways' RTT to them
/// (unknown RTT last), then by name. Within a cluster the local gateways come
/// in random order, so load spreads over them.
pub fn remote_order<'a>(
    routes: &'a [RemoteRoute],
    scope: &Scope<'_>,
    mut random: impl FnMut(usize) -> usize,
) -> Vec<&'a RemoteRoute> {
    let mut usable: Vec<&RemoteRoute> = routes
        .iter()
        .filter(|r| r.reachable && r.healthy > 0 && r.cluster != scope.own_cluster)
        .filter(|r| scope.pinned.is_none_or(|c| c == r.cluster))
        .filter(|r| {
            scope.pinned.is_some()
                || scope.failover.is_empty()
                || scope.failover.contains(&r.cluster)
        })
        .collect();
    // Shuffle first; the sort below is stable, so ties keep the random order.
    for i in (1..usable.len()).rev() {
        let j = random(i + 1);
        usable.swap(i, j);
    }
    // The cluster's nearest RTT as any local gateway measured it.
    let cluster_rtt = |c: &str| {
        routes
            .iter()
            .filter(|r| r.cluster == c)
            .filter_map(|r| r.rtt_ms)
            .min()
            .unwrap_or(u32::MAX)
    };
    usable.sort_by_cached_key(|r| {
        let rank = scope
            .failover
            .iter()
            .position(|c| *c == r.cluster)
            .unwrap_or(0);
        (rank, cluster_rtt(&r.cluster), r.cluster.clone())
    });
    usable
}

/// Catalog entries for tests of the modules that choose instances.
#[cfg(test)]
pub(crate) mod fixtures {
    use meshnode_gossip::{Health, Instance, Protocol, RemoteRoute};

    pub(crate) fn inst(node: &str, cluster: &str, health: Health) -> Instance {
        Instance {
            service: "api".into(),
            node: node.into(),
            cluster: cluster.into(),
            node_addr: "127.0.0.1:9470".parse().unwrap(),
            addr: "127.0.0.1".into(),
            port: 8080,
            protocol: Protocol::Tcp,
            tags: vec![],
            health,
            check: None,
        }
    }

    pub(crate) fn route(cluster: &str, via: &str, healthy: u32, rtt: Option<u32>) -> RemoteRoute {
        RemoteRoute {
            service: "api".into(),
            cluster: cluster.into(),
            via: via.into(),
            via_addr: "127.0.0.1:9470".parse().unwrap(),
            healthy,
            tags: vec![],
            gateways: vec!["gw".into()],
            reachable: true,
            rtt_ms: rtt,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    use super::fixtures::{inst, route};

    fn picks(v: &[Pick<'_>]) -> Vec<String> {
        v.iter()
            .map(|p| match p {
                Pick::Local(i) => i.node.clone(),
                Pick::Remote(r) => format!("{}>{}", r.via, r.cluster),
            })
            .collect()
    }

    fn scope<'a>(failover: &'a [String], pinned: Option<&'a str>) -> Scope<'a> {
        Scope {
            own_cluster: "east",
            failover,
            pinned,
        }
    }

    #[test]
    fn local_first_then_other_clusters_nearest_first() {
        let locals = vec![inst("e1", "east", Health::Passing)];
        let routes = vec![
            route("west", "gw", 2, Some(40)),
            route("south", "gw", 1, Some(5)),
            route("north", "gw", 0, Some(1)),
        ];
        let got = plan(&locals, &routes, &scope(&[], None), |_| false, |_| 0, |_| 0);
        assert_eq!(picks(&got), vec!["e1", "gw>south", "gw>west"]);
        // The failover list decides the order and excludes other clusters.
        let fo = vec!["west".to_string()];
        let got = plan(&[], &routes, &scope(&fo, None), |_| false, |_| 0, |_| 0);
        assert_eq!(picks(&got), vec!["gw>west"]);
        // Pinned to a cluster: only that one, even when local instances exist.
        let got = plan(
            &locals,
            &routes,
            &scope(&[], Some("west")),
            |_| false,
            |_| 0,
            |_| 0,
        );
        assert_eq!(picks(&got), vec!["gw>west"]);
        let got = plan(
            &locals,
            &routes,
            &scope(&[], Some("east")),
            |_| false,
            |_| 0,
            |_| 0,
        );
        assert_eq!(picks(&got), vec!["e1"]);
    }

    #[test]
    fn ejected_locals_go_after_remote_clusters_and_unreachable_routes_never_count() {
        let locals = vec![
            inst("e1", "east", Health::Passing),
            inst("e2", "east", Health::Passing),
            inst("e3", "east", Health::Critical),
        ];
        let mut dead = route("south", "gw", 3, Some(1));
        dead.reachable = false;
        let routes = vec![
            route("west", "gw1", 2, None),
            route("west", "gw2", 2, None),
            dead,
        ];
        let got = plan(
            &locals,
            &routes,
            &scope(&[], None),
            |p| matches!(p, Pick::Local(_)),
            |_| 0,
            |_| 0,
        );
        let got = picks(&got);
        assert_eq!(got.len(), 3);
        assert!(
            got[0].ends_with(">west") && got[1].ends_with(">west"),
            "{got:?}"
        );
        assert!(got[2].starts_with('e'), "{got:?}");
    }

    #[test]
    fn gateways_of_a_cluster_share_the_load() {
        let routes = vec![
            route("west", "gw1", 1, Some(3)),
            route("west", "gw2", 1, Some(3)),
        ];
        let mut x = 7u64;
        let mut firsts: HashMap<String, u32> = HashMap::new();
        for _ in 0..200 {
            let got = remote_order(&routes, &scope(&[], None), |n| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                ((x >> 33) as usize) % n
            });
            *firsts.entry(got[0].via.clone()).or_default() += 1;
        }
        assert!(firsts.values().all(|n| *n > 50), "{firsts:?}");
    }

    fn nodes(v: &[&Instance]) -> Vec<String> {
        v.iter().map(|i| i.node.clone()).collect()
    }

    #[test]
    fn own_cluster_first_then_failover_order_and_never_critical() {
        let all = vec![
            inst("w1", "west", Health::Passing),
            inst("c1", "central", Health::Passing),
            inst("e1", "east", Health::Critical),
            inst("e2", "east", Health::Warning),
        ];
        let fo = vec!["central".to_string(), "west".to_string()];
        let got = order(&all, "east", &fo, |_| false, |_| 0, |_| 0);
        assert_eq!(nodes(&got), vec!["e2", "c1", "w1"]);
        // With no local instance left, the failover order decides.
        let got = order(&all[..2], "east", &fo, |_| false, |_| 0, |_| 0);
        assert_eq!(nodes(&got), vec!["c1", "w1"]);
    }

    #[test]
    fn ejected_instances_are_skipped_unless_all_are_ejected() {
        let all = vec![
            inst("a", "east", Health::Passing),
            inst("b", "east", Health::Passing),
        ];
        let got = order(&all, "east", &[], |i| i.node == "a", |_| 0, |_| 0);
        assert_eq!(nodes(&got), vec!["b"]);
        let got = order(&all, "east", &[], |_| true, |_| 0, |_| 0);
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn two_choices_prefers_the_less_loaded() {
        let all = vec![
            inst("a", "east", Health::Passing),
            inst("b", "east", Health::Passing),
            inst("c", "east", Health::Passing),
        ];
        let load: HashMap<&str, u64> = [("a", 9), ("b", 1), ("c", 5)].into();
        // Sorted by load: b(1), c(5), a(9). Random picks indexes 1 (c) and then 2 (a) -> c wins.
        let mut seq = [1usize, 0].into_iter();
        let got = order(
            &all,
            "east",
            &[],
            |_| false,
            |i| load[i.node.as_str()],
            |_| seq.next().unwrap_or(0),
        );
        assert_eq!(nodes(&got)[0], "c");
    }

    #[test]
    fn load_spreads_evenly_over_many_picks() {
        let all: Vec<Instance> = (0..4)
            .map(|n| inst(&format!("n{n}"), "east", Health::Passing))
            .collect();
        let mut active: HashMap<String, u64> = HashMap::new();
        let mut x = 12345u64;
        for _ in 0..400 {
            let mut rnd = |n: usize| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) as usize) % n
            };
            let pick = order(
                &all,
                "east",
                &[],
                |_| false,
                |i| active.get(&i.node).copied().unwrap_or(0),
                &mut rnd,
            )[0]
            .node
            .clone();
            *active.entry(pick).or_default() += 1;
        }
        // Streams never finish here, so P2C must keep the counts within a small band.
        let (min, max) = (
            active.values().min().unwrap(),
            active.values().max().unwrap(),
        );
        assert!(max - min <= 3, "{active:?}");
    }
}
