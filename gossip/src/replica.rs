//! Who publishes a mesh-wide object (a policy document, a revocation) in a
//! pool, so that gossip state holds a few copies of it rather than one per
//! node, and the object outlives any node.
//!
//! Every node *holds* every object it verified (in memory and in its data
//! dir); it *publishes* one under its key only if it is among the `k` live
//! members that rendezvous-hash highest for that key (a *holder*), or, as a
//! repair, if it may repair and none of those `k` publishes a version at
//! least as new as the one it holds. A node may repair an object it
//! *originated* in this pool (an operator applied it on this node, a
//! gateway brought it in from its other pool, the data dir had it and the
//! pool does not) or one it *already publishes* (a former holder the live
//! set moved past, one side of a healed partition whose old holders hold
//! the winner). Nodes that merely learnt the object from this pool's gossip
//! never repair: the holders read the same gossip. Once a holder publishes
//! it, the others of the `k` take it from there and the repairing node
//! withdraws. When a holder dies, the next node in rendezvous order (which
//! holds the object like everyone) takes over.
//!
//! The simulation found why repair must be that narrow: with any node that
//! holds a version no holder publishes allowed to repair, every node that
//! adopted an applied document before seeing a holder's copy published
//! one too (948 copies at N = 1,000), and every node that saw the holders
//! die before seeing their successors' copies did (138).
//!
//! Sans-IO: the caller passes the live set and what every live member
//! publishes, already verified and reduced to an order (higher is newer).

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Publishers per object and pool.
pub const REPLICAS: usize = 3;

/// The rendezvous score of `node` for `key`: FNV-1a over both, finished
/// with the SplitMix64 mixer. Stable across builds and platforms (every
/// node must compute the same ranking); not keyed, which is fine: a node
/// cannot choose its id (the CA does), and ranking high only means
/// publishing.
pub fn score(key: &str, node: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes().chain([0xff]).chain(node.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The `k` members of `live` that rank highest for `key` (ties by id).
pub fn holders<'a>(key: &str, live: &'a [String], k: usize) -> Vec<&'a str> {
    let mut ranked: Vec<(u64, &str)> = live.iter().map(|n| (score(key, n), n.as_str())).collect();
    ranked.sort_unstable_by(|a, b| b.cmp(a));
    ranked.dedup_by(|a, b| a.1 == b.1);
    ranked.into_iter().take(k).map(|(_, n)| n).collect()
}

/// What a node holds of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held<O> {
    /// The order of the version held (higher is newer).
    pub order: O,
    /// Whether this node may repair it: it originated the object in this
    /// pool, or already publishes it (see the module docs).
    pub may_repair: bool,
}

/// Whether one of the `k` holders publishes a version at least `ours`.
pub fn covered<O: Ord>(
    key: &str,
    ours: &O,
    live: &[String],
    published: &HashMap<String, Vec<(String, O)>>,
    k: usize,
) -> bool {
    let top = holders(key, live, k);
    published.get(key).is_some_and(|ps| {
        ps.iter()
            .any(|(node, order)| order >= ours && top.contains(&node.as_str()))
    })
}

/// The keys `me` should publish now.
///
/// - `live`: the live members of the pool, `me` among them;
/// - `held`: key -> what `me` holds;
/// - `published`: key -> (member, order) of what live members publish (verified).
pub fn plan<O: Ord>(
    me: &str,
    live: &[String],
    held: &BTreeMap<String, Held<O>>,
    published: &HashMap<String, Vec<(String, O)>>,
    k: usize,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (key, ours) in held {
        let top = holders(key, live, k);
        if top.contains(&me) || (ours.may_repair && !covered(key, &ours.order, live, published, k))
        {
            out.insert(key.clone());
        }
    }
    out
}

/// The objects a node originated in one pool (see the module docs), until
/// a holder publishes them. An object loaded from the data dir counts only
/// once the pool has completed a full state exchange: before that, the
/// node cannot tell whether the pool has it.
#[derive(Debug, Default)]
pub struct Origins {
    keys: HashMap<String, bool>,
}

impl Origins {
    /// `after_sync`: only once the pool is synced (loaded from disk).
    pub fn mark(&mut self, key: &str, after_sync: bool) {
        let e = self.keys.entry(key.to_string()).or_insert(after_sync);
        *e = *e && after_sync;
    }

    /// Whether this node may repair `key`: it originated it, or it
    /// publishes it already.
    pub fn may_repair(&self, key: &str, synced: bool, publishing: bool) -> bool {
        publishing
            || self
                .keys
                .get(key)
                .is_some_and(|after_sync| !after_sync || synced)
    }

    /// A holder publishes it now: this node no longer originates it.
    pub fn settle(&mut self, key: &str) {
        self.keys.remove(key);
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("spiffe://acme/cluster/east/node/n{i}"))
            .collect()
    }

    #[test]
    fn every_node_agrees_on_the_holders_and_they_spread_over_the_pool() {
        let live = nodes(100);
        let mut shuffled = live.clone();
        shuffled.reverse();
        let mut count: HashMap<&str, usize> = HashMap::new();
        for d in 0..300 {
            let key = format!("pol:routes/svc-{d}");
            let a = holders(&key, &live, 3);
            assert_eq!(
                a,
                holders(&key, &shuffled, 3),
                "order of the live list matters not"
            );
            assert_eq!(a.len(), 3);
            for n in a {
                *count.entry(n).or_default() += 1;
            }
        }
        // 900 slots over 100 nodes: no node carries a crowd.
        assert!(count.values().all(|&c| c <= 25), "{count:?}");
        assert_eq!(
            score("a", "b"),
            6_137_638_104_319_202_169,
            "the score must never change"
        );
    }

    #[test]
    fn the_holders_publish_and_an_outsider_only_until_they_do() {
        let live = nodes(10);
        let key = "pol:intentions/api".to_string();
        let top: Vec<String> = holders(&key, &live, 3)
            .into_iter()
            .map(String::from)
            .collect();
        let outsider = live.iter().find(|n| !top.contains(n)).unwrap().clone();
        let origin = BTreeMap::from([(
            key.clone(),
            Held {
                order: 2u64,
                may_repair: true,
            },
        )]);
        let learnt = BTreeMap::from([(
            key.clone(),
            Held {
                order: 2u64,
                may_repair: false,
            },
        )]);
        let held = origin.clone();
        let mut published = HashMap::new();
        // Nobody publishes it yet: the holders and the outsider that
        // originated it do; an outsider that only learnt it does not.
        for n in &live {
            assert!(plan(n, &live, &held, &published, 3).contains(&key));
        }
        assert!(plan(&outsider, &live, &learnt, &published, 3).is_empty());
        for t in &top {
            assert!(plan(t, &live, &learnt, &published, 3).contains(&key));
        }
        // A holder publishes an older version: still not covered.
        published.insert(key.clone(), vec![(top[0].clone(), 1u64)]);
        assert!(plan(&outsider, &live, &held, &published, 3).contains(&key));
        // A non-holder publishes it: does not count.
        published.insert(key.clone(), vec![(outsider.clone(), 2u64)]);
        let other = live
            .iter()
            .find(|n| !top.contains(n) && **n != outsider)
            .unwrap();
        assert!(plan(other, &live, &held, &published, 3).contains(&key));
        // A holder publishes it (or newer): the outsider withdraws, holders stay.
        published.insert(key.clone(), vec![(top[1].clone(), 3u64)]);
        assert!(plan(&outsider, &live, &held, &published, 3).is_empty());
        assert!(plan(&top[2], &live, &held, &published, 3).contains(&key));
    }

    #[test]
    fn origins_from_disk_wait_for_the_first_full_exchange() {
        let mut o = Origins::default();
        o.mark("pol:a", true);
        assert!(!o.may_repair("pol:a", false, false));
        assert!(o.may_repair("pol:a", true, false));
        assert!(o.may_repair("pol:b", false, true), "publishing already");
        o.mark("pol:a", false);
        assert!(o.may_repair("pol:a", false, false), "applied here: at once");
        o.settle("pol:a");
        assert!(!o.may_repair("pol:a", true, false));
        assert!(o.is_empty());
    }

    #[test]
    fn when_a_holder_dies_the_next_in_rank_takes_over() {
        let mut live = nodes(20);
        let key = "rev:00ff".to_string();
        let before: Vec<String> = holders(&key, &live, 3)
            .into_iter()
            .map(String::from)
            .collect();
        let mut ranked = live.clone();
        ranked.sort_by_key(|n| std::cmp::Reverse(score(&key, n)));
        let next = ranked[3].clone();
        live.retain(|n| *n != before[0]);
        let after = holders(&key, &live, 3);
        assert!(after.contains(&next.as_str()));
        assert!(after.contains(&before[1].as_str()) && after.contains(&before[2].as_str()));
        let held = BTreeMap::from([(
            key.clone(),
            Held {
                order: (),
                may_repair: false,
            },
        )]);
        assert!(plan(&next, &live, &held, &HashMap::new(), 3).contains(&key));
    }
}
