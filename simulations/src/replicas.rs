//! Who publishes the mesh-wide objects (policy documents, revocations) of a
//! pool at N = 1,000, over time, through applies, mass failures and joins.
//!
//! Not the gossip layer itself (a thousand simulated nodes cost minutes of
//! CPU per simulated minute there; see the pool scenarios): every node runs
//! meshnode's real decision, [`replica::plan`], over its *own* view of the
//! pool, and views lag reality like gossip does. A change of what a node
//! publishes reaches each other node after a delay drawn from `spread` (a
//! push reaches most nodes within a few hundred milliseconds, a paced
//! exchange repairs the rest within seconds); a death is seen by each node
//! after a delay drawn from `detect` (the probes' suspicion timeouts). So
//! nodes disagree about who is alive and who publishes what, as they do.
//!
//! What is counted: per object, the live nodes whose gossip state carries
//! a copy. A dead node's state stays in chitchat until its GC (15 min) and
//! is not counted; nor are the withdrawn (signed empty) values.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};

use meshnode_gossip::replica::{self, score};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// One tick of the model.
pub const TICK_MS: u64 = 100;

#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    pub n: usize,
    pub documents: usize,
    pub revocations: usize,
    pub k: usize,
    /// Ticks for a publication change to reach another node (min, max).
    pub spread: (u64, u64),
    /// Ticks for a death to be seen by another node (min, max).
    pub detect: (u64, u64),
    pub seed: u64,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        Self {
            n: 1_000,
            documents: 60,
            revocations: 20,
            k: replica::REPLICAS,
            spread: (1, 20),
            detect: (20, 60),
            seed: 42,
        }
    }
}

/// One sample a second.
#[derive(Clone, Debug)]
pub struct Sample {
    pub t_s: f64,
    /// Most live copies of any object.
    pub max_copies: usize,
    pub mean_copies: f64,
    /// Fewest live copies of any object (0: an object no live node publishes).
    pub min_copies: usize,
    /// Objects with more than k live copies.
    pub over_k: usize,
    /// Nodes that do not yet hold the newest version of an object.
    pub stale_holders: usize,
}

#[derive(Clone, Debug)]
pub struct Phase {
    pub name: &'static str,
    pub at_s: f64,
    /// Seconds until every object had between 1 and k live copies again
    /// and every live node held every newest version.
    pub settled_after_s: Option<f64>,
    /// Most copies of one object while settling.
    pub peak_copies: usize,
}

#[derive(Clone, Debug)]
pub struct ReplicaReport {
    pub config: ReplicaConfig,
    pub samples: Vec<Sample>,
    pub phases: Vec<Phase>,
    /// Largest `max_copies` over all samples taken while settled.
    pub settled_max: usize,
    /// Smallest `min_copies` over the samples taken while settled.
    pub settled_min: usize,
    /// What one-copy-per-node (the scheme before) would hold: live nodes.
    pub every_node_copies: usize,
    pub plan_calls: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// `to` learns that `from` publishes `key` at `order` (None: withdrew).
    Publish {
        to: usize,
        from: usize,
        key: usize,
        order: Option<u64>,
    },
    /// `to` learns that `who` is dead.
    Dead { to: usize, who: usize },
    /// `to` hears from `who` again (a healed partition).
    Alive { to: usize, who: usize },
}

struct Model {
    cfg: ReplicaConfig,
    rng: StdRng,
    ids: Vec<String>,
    keys: Vec<String>,
    /// Per key: node indices by descending score.
    ranking: Vec<Vec<usize>>,
    alive: Vec<bool>,
    /// What each node publishes (key -> order).
    publishes: Vec<HashMap<usize, u64>>,
    /// What each node holds (key -> order).
    held: Vec<HashMap<usize, u64>>,
    /// What each node believes: key -> publisher -> order.
    seen: Vec<HashMap<usize, HashMap<usize, u64>>>,
    seen_dead: Vec<HashSet<usize>>,
    /// Objects each node originated (an operator applied them there) and
    /// no holder has taken over yet.
    origin: Vec<HashSet<usize>>,
    /// The newest order of each key anywhere.
    newest: Vec<u64>,
    queue: BinaryHeap<Reverse<(u64, u64, Event)>>,
    /// While partitioned: each node's side; messages between sides are lost.
    side: Option<Vec<bool>>,
    seq: u64,
    now: u64,
    dirty: Vec<HashSet<usize>>,
    plan_calls: u64,
}

impl Model {
    fn new(cfg: ReplicaConfig) -> Self {
        let keys: Vec<String> = (0..cfg.documents)
            .map(|d| format!("pol:routes/svc-{d}"))
            .chain((0..cfg.revocations).map(|r| format!("rev:{r:016x}")))
            .collect();
        let mut m = Self {
            rng: StdRng::seed_from_u64(cfg.seed),
            ids: Vec::new(),
            ranking: vec![Vec::new(); keys.len()],
            newest: vec![1; keys.len()],
            keys,
            alive: Vec::new(),
            publishes: Vec::new(),
            held: Vec::new(),
            seen: Vec::new(),
            seen_dead: Vec::new(),
            origin: Vec::new(),
            queue: BinaryHeap::new(),
            side: None,
            seq: 0,
            now: 0,
            dirty: Vec::new(),
            plan_calls: 0,
            cfg,
        };
        for _ in 0..m.cfg.n {
            m.add_node();
        }
        // Steady state to start from: everyone holds version 1 of every
        // object, the k holders publish it, and everyone knows that.
        for key in 0..m.keys.len() {
            let top: Vec<usize> = m.ranking[key][..m.cfg.k].to_vec();
            for &h in &top {
                m.publishes[h].insert(key, 1);
            }
            for node in 0..m.ids.len() {
                m.held[node].insert(key, 1);
                let seen = m.seen[node].entry(key).or_default();
                for &h in &top {
                    seen.insert(h, 1);
                }
            }
        }
        m
    }

    fn add_node(&mut self) -> usize {
        let i = self.ids.len();
        let id = format!("spiffe://acme/cluster/c/node/n{i}");
        for (key, ranking) in self.ranking.iter_mut().enumerate() {
            let s = score(&self.keys[key], &id);
            let ids = &self.ids;
            let pos = ranking.partition_point(|&j| {
                (score(&self.keys[key], &ids[j]), ids[j].as_str()) > (s, id.as_str())
            });
            ranking.insert(pos, i);
        }
        self.ids.push(id);
        self.alive.push(true);
        self.publishes.push(HashMap::new());
        self.held.push(HashMap::new());
        self.seen.push(HashMap::new());
        self.seen_dead.push(HashSet::new());
        self.origin.push(HashSet::new());
        self.dirty.push(HashSet::new());
        i
    }

    fn delay(&mut self, (lo, hi): (u64, u64)) -> u64 {
        self.rng.random_range(lo..=hi)
    }

    fn schedule(&mut self, after: u64, e: Event) {
        self.seq += 1;
        self.queue.push(Reverse((self.now + after, self.seq, e)));
    }

    /// `node`'s view of the top candidates for `key`: the first k nodes of
    /// the ranking it does not know dead (the rest cannot change the plan).
    fn candidates(&self, node: usize, key: usize) -> Vec<String> {
        self.ranking[key]
            .iter()
            .filter(|j| !self.seen_dead[node].contains(j))
            .take(self.cfg.k)
            .map(|&j| self.ids[j].clone())
            .collect()
    }

    fn replan(&mut self, node: usize, key: usize) {
        if !self.alive[node] {
            return;
        }
        let Some(&order) = self.held[node].get(&key) else {
            return;
        };
        self.plan_calls += 1;
        let live = self.candidates(node, key);
        let k = self.keys[key].clone();
        let may_repair =
            self.origin[node].contains(&key) || self.publishes[node].contains_key(&key);
        let held = BTreeMap::from([(k.clone(), replica::Held { order, may_repair })]);
        let published: HashMap<String, Vec<(String, u64)>> = HashMap::from([(
            k.clone(),
            self.seen[node]
                .get(&key)
                .map(|m| {
                    m.iter()
                        .filter(|(j, _)| !self.seen_dead[node].contains(j))
                        .map(|(&j, &o)| (self.ids[j].clone(), o))
                        .collect()
                })
                .unwrap_or_default(),
        )]);
        let publish =
            replica::plan(&self.ids[node], &live, &held, &published, self.cfg.k).contains(&k);
        if replica::covered(&k, &order, &live, &published, self.cfg.k) {
            self.origin[node].remove(&key);
        }
        let before = self.publishes[node].get(&key).copied();
        let after = publish.then_some(order);
        if before == after {
            return;
        }
        match after {
            Some(o) => self.publishes[node].insert(key, o),
            None => self.publishes[node].remove(&key),
        };
        self.seen[node].entry(key).or_default();
        match after {
            Some(o) => self.seen[node].entry(key).or_default().insert(node, o),
            None => self.seen[node].entry(key).or_default().remove(&node),
        };
        for to in 0..self.ids.len() {
            if to != node && self.alive[to] {
                let d = self.delay(self.cfg.spread);
                self.schedule(
                    d,
                    Event::Publish {
                        to,
                        from: node,
                        key,
                        order: after,
                    },
                );
            }
        }
    }

    fn deliver(&mut self, e: Event) {
        match e {
            Event::Publish {
                to,
                from,
                key,
                order,
            } => {
                if !self.alive[to] || self.apart(to, from) {
                    return;
                }
                let seen = self.seen[to].entry(key).or_default();
                match order {
                    Some(o) => {
                        seen.insert(from, o);
                        // Adoption: a newer verified version than held.
                        if self.held[to].get(&key).is_none_or(|h| *h < o) {
                            self.held[to].insert(key, o);
                        }
                    }
                    None => {
                        seen.remove(&from);
                    }
                }
                self.dirty[to].insert(key);
            }
            Event::Dead { to, who } => {
                if !self.alive[to] || !self.seen_dead[to].insert(who) {
                    return;
                }
                for key in 0..self.keys.len() {
                    self.dirty[to].insert(key);
                }
            }
            Event::Alive { to, who } => {
                if !self.alive[to] || !self.alive[who] || !self.seen_dead[to].remove(&who) {
                    return;
                }
                // The first exchange brings what `who` publishes.
                for (&key, &o) in &self.publishes[who] {
                    self.seen[to].entry(key).or_default().insert(who, o);
                    if self.held[to].get(&key).is_none_or(|h| *h < o) {
                        self.held[to].insert(key, o);
                    }
                }
                for key in 0..self.keys.len() {
                    self.dirty[to].insert(key);
                }
            }
        }
    }

    fn apart(&self, a: usize, b: usize) -> bool {
        self.side.as_ref().is_some_and(|s| s[a] != s[b])
    }

    /// Splits the pool into two halves: each side sees the other die.
    fn partition(&mut self) {
        let n = self.ids.len();
        self.side = Some((0..n).map(|i| i < n / 2).collect());
        for a in 0..n {
            for b in 0..n {
                if a != b && self.alive[a] && self.alive[b] && self.apart(a, b) {
                    let d = self.delay(self.cfg.detect);
                    self.schedule(d, Event::Dead { to: a, who: b });
                }
            }
        }
    }

    fn heal(&mut self) {
        let Some(side) = self.side.take() else {
            return;
        };
        let n = self.ids.len();
        for a in 0..n {
            for b in 0..n {
                if a != b && side[a] != side[b] && self.alive[a] && self.alive[b] {
                    let d = self.delay(self.cfg.spread);
                    self.schedule(d, Event::Alive { to: a, who: b });
                }
            }
        }
    }

    fn kill(&mut self, node: usize) {
        if !self.alive[node] {
            return;
        }
        self.alive[node] = false;
        for to in 0..self.ids.len() {
            if to != node && self.alive[to] {
                let d = self.delay(self.cfg.detect);
                self.schedule(d, Event::Dead { to, who: node });
            }
        }
    }

    /// An operator applies a new version of `key` on `node`.
    fn apply(&mut self, node: usize, key: usize) {
        self.newest[key] += 1;
        self.apply_order(node, key, self.newest[key]);
    }

    fn apply_order(&mut self, node: usize, key: usize, order: u64) {
        self.newest[key] = self.newest[key].max(order);
        self.held[node].insert(key, order);
        self.origin[node].insert(key);
        self.dirty[node].insert(key);
    }

    /// A new node: it gets the pool's state (what every live node
    /// publishes) in its first exchange, and the others learn of it (it
    /// enters their rankings at once: being known is enough to rank).
    fn join(&mut self) -> usize {
        let i = self.add_node();
        // It knows who is dead (their state is there, marked so).
        let dead: HashSet<usize> = (0..i).filter(|&j| !self.alive[j]).collect();
        self.seen_dead[i] = dead;
        for j in 0..i {
            if !self.alive[j] {
                continue;
            }
            for (&key, &o) in &self.publishes[j].clone() {
                self.seen[i].entry(key).or_default().insert(j, o);
                if self.held[i].get(&key).is_none_or(|h| *h < o) {
                    self.held[i].insert(key, o);
                }
            }
        }
        for key in 0..self.keys.len() {
            self.dirty[i].insert(key);
        }
        // Others re-plan when they hear of the newcomer (a spread delay).
        for to in 0..i {
            if self.alive[to] {
                let d = self.delay(self.cfg.spread);
                // A join notice: the receiver re-plans every key.
                self.schedule(
                    d,
                    Event::Publish {
                        to,
                        from: i,
                        key: usize::MAX,
                        order: None,
                    },
                );
            }
        }
        i
    }

    fn sample(&self) -> Sample {
        let mut copies = vec![0usize; self.keys.len()];
        for (node, p) in self.publishes.iter().enumerate() {
            if self.alive[node] {
                for &key in p.keys() {
                    copies[key] += 1;
                }
            }
        }
        let stale = (0..self.ids.len())
            .filter(|&n| self.alive[n])
            .map(|n| {
                (0..self.keys.len())
                    .filter(|&k| self.held[n].get(&k).copied().unwrap_or(0) < self.newest[k])
                    .count()
            })
            .sum();
        Sample {
            t_s: (self.now * TICK_MS) as f64 / 1e3,
            max_copies: copies.iter().copied().max().unwrap_or(0),
            min_copies: copies.iter().copied().min().unwrap_or(0),
            mean_copies: copies.iter().sum::<usize>() as f64 / copies.len().max(1) as f64,
            over_k: copies.iter().filter(|&&c| c > self.cfg.k).count(),
            stale_holders: stale,
        }
    }

    fn settled(&self, s: &Sample) -> bool {
        s.max_copies <= self.cfg.k && s.min_copies >= 1 && s.stale_holders == 0
    }
}

/// Runs the timeline: 15 s steady; 10 objects get a new version applied on
/// a random node; a tenth of the nodes die at once; the k holders of one
/// object die at once; 50 nodes join; the pool splits in halves and each
/// half applies its own new version of one object; the split heals. Each
/// phase has 15 s. While split, each half is a pool of its own: it settles
/// on its own holders and version (`stale_holders` counts the other half's
/// version as missing until the heal).
pub fn run(cfg: ReplicaConfig) -> ReplicaReport {
    let mut m = Model::new(cfg.clone());
    let mut samples = Vec::new();
    let mut phases: Vec<Phase> = Vec::new();
    let per_phase = 150; // ticks
    let mut settled_max = 0;
    let mut settled_min = usize::MAX;
    for phase in 0..7 {
        let name = match phase {
            0 => "steady",
            1 => "10 new versions applied on random nodes",
            2 => "10 % of the nodes killed at once",
            3 => "all k holders of one object killed",
            4 => "50 nodes join",
            5 => "split in halves; each applies its own new version of one object",
            _ => "the split heals: the higher version wins everywhere",
        };
        let at = m.now;
        match phase {
            1 => {
                for key in 0..10.min(m.keys.len()) {
                    let node = m.rng.random_range(0..m.ids.len());
                    m.apply(node, key);
                }
            }
            2 => {
                let n = m.ids.len();
                for _ in 0..n / 10 {
                    let v = m.rng.random_range(0..n);
                    m.kill(v);
                }
            }
            3 => {
                let key = m.keys.len() - 1;
                let top: Vec<usize> = m.ranking[key]
                    .iter()
                    .copied()
                    .filter(|&j| m.alive[j])
                    .take(m.cfg.k)
                    .collect();
                for v in top {
                    m.kill(v);
                }
            }
            4 => {
                for _ in 0..50 {
                    m.join();
                }
            }
            5 => {
                m.partition();
                let n = m.ids.len();
                let v = m.newest[1];
                // Both sides sign version v + 1; the tie-break orders them,
                // modelled as v + 1 and v + 2.
                let (a, b) = loop {
                    let a = m.rng.random_range(0..n / 2);
                    let b = m.rng.random_range(n / 2..n);
                    if m.alive[a] && m.alive[b] {
                        break (a, b);
                    }
                };
                m.apply_order(a, 1, v + 1);
                m.apply_order(b, 1, v + 2);
            }
            6 => m.heal(),
            _ => {}
        }
        let mut settled_at = None;
        let mut peak = 0;
        for tick in 0..per_phase {
            step_with_joins(&mut m);
            let s = m.sample();
            if settled_at.is_none() {
                peak = peak.max(s.max_copies);
                if m.settled(&s) && m.queue.is_empty() {
                    settled_at = Some(((tick + 1) * TICK_MS) as f64 / 1e3);
                }
            } else {
                settled_max = settled_max.max(s.max_copies);
                settled_min = settled_min.min(s.min_copies);
            }
            if (m.now * TICK_MS).is_multiple_of(1000) {
                samples.push(s);
            }
        }
        phases.push(Phase {
            name,
            at_s: (at * TICK_MS) as f64 / 1e3,
            settled_after_s: settled_at,
            peak_copies: peak,
        });
    }
    let every_node_copies = m.alive.iter().filter(|a| **a).count();
    ReplicaReport {
        config: cfg,
        samples,
        phases,
        settled_max,
        settled_min: if settled_min == usize::MAX {
            0
        } else {
            settled_min
        },
        every_node_copies,
        plan_calls: m.plan_calls,
    }
}

/// [`Model::step`], where a join notice (key `usize::MAX`) makes the
/// receiver re-plan every key (its ranking gained a node).
fn step_with_joins(m: &mut Model) {
    m.now += 1;
    while let Some(Reverse((t, _, _))) = m.queue.peek() {
        if *t > m.now {
            break;
        }
        let Some(Reverse((_, _, e))) = m.queue.pop() else {
            break;
        };
        match e {
            Event::Publish {
                to,
                key: usize::MAX,
                ..
            } => {
                if m.alive[to] {
                    for key in 0..m.keys.len() {
                        m.dirty[to].insert(key);
                    }
                }
            }
            e => m.deliver(e),
        }
    }
    for node in 0..m.ids.len() {
        if m.dirty[node].is_empty() {
            continue;
        }
        let keys: Vec<usize> = m.dirty[node].drain().collect();
        for key in keys {
            m.replan(node, key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_pool_settles_within_k_copies_after_every_phase() {
        let r = run(ReplicaConfig {
            n: 60,
            documents: 8,
            revocations: 4,
            ..ReplicaConfig::default()
        });
        // While split, each half settles on its own holders: never the
        // whole pool's k copies.
        for p in r.phases.iter().filter(|p| !p.name.starts_with("split")) {
            assert!(p.settled_after_s.is_some(), "{p:?}");
        }
        assert!(r.settled_max <= 3 && r.settled_min >= 1, "{r:?}");
    }
}
