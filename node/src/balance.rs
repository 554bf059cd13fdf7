//! Choosing instances for one connection: locality tiers, then power of two
//! choices on active streams. Pure: the caller supplies ejection state, load and randomness.

use meshnode_gossip::{Health, Instance};

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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use meshnode_gossip::Protocol;

    use super::*;

    fn inst(node: &str, cluster: &str, health: Health) -> Instance {
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
        }
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
