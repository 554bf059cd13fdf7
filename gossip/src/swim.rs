//! Failure detection by probing: SWIM with Lifeguard's refinements, sans-IO.
//!
//! Every `probe_interval` the detector probes one member (round robin over a
//! shuffled list, so each member is probed once per N intervals): a direct
//! ping, and on no answer within `probe_timeout` an indirect ping through
//! `indirect_checks` other members. A member that answers neither by the end
//! of the interval is *accused*: the accusation is published in this node's
//! own signed gossip state ([`Accusation`]), so it is attributable and only
//! its author can make it. Every node that sees an accusation naming a
//! member's current *incarnation* starts a suspicion timer; the member
//! *refutes* it by publishing a higher incarnation (its signed `alive` value,
//! which no one else can forge), and a timer that runs out marks the member
//! dead. The incarnation moves only to refute, as in SWIM: the member's other
//! changes (services, health, its own accusations) neither refute nor revive.
//! An earlier shape took the member's state version for this, so a change the
//! member made just before dying, reaching some observers after the
//! accusations, cancelled them there (and revived a member already dead).
//!
//! Lifeguard's refinements:
//! - Suspicion timeouts start long and shrink with independent accusers
//!   (`min .. max`, logarithmically in the accusers): one accuser alone,
//!   honest or not, gives the suspect the longest time to refute.
//! - Local health: a score (0..=`max_lhm`) that grows when this node's own
//!   probes fail without the helpers' nacks arriving (so the problem is
//!   likely here), or when it has to refute an accusation, and shrinks with
//!   every answered probe. Probe interval and timeout scale with `1 + score`.
//! - A node that was paused (SIGSTOP, a stalled VM) notices the gap between
//!   ticks, restarts every suspicion timer from the resume and forgets its
//!   in-flight probe, so it accuses no one for its own absence.
//!
//! Time and randomness are arguments; the shell (`probe`) does the I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use rand::seq::SliceRandom;
use rand::RngExt;

/// Probing parameters. The defaults are tuned for a LAN (see ARCHITECTURE.md).
#[derive(Clone, Debug)]
pub struct SwimConfig {
    /// One member probed per interval (scaled by local health).
    pub probe_interval: Duration,
    /// Wait this long for a direct answer before asking helpers.
    pub probe_timeout: Duration,
    /// Helpers asked for an indirect probe.
    pub indirect_checks: usize,
    /// Shortest suspicion: `suspicion_mult x max(1, log10 n) x probe_interval`.
    pub suspicion_mult: f64,
    /// Longest suspicion (a lone accuser): this many times the shortest.
    pub suspicion_max_mult: f64,
    /// The local health score's ceiling.
    pub max_lhm: u32,
    /// A gap between two ticks longer than this means this node was paused.
    pub pause: Duration,
}

impl Default for SwimConfig {
    fn default() -> Self {
        Self {
            probe_interval: Duration::from_millis(500),
            probe_timeout: Duration::from_millis(200),
            indirect_checks: 3,
            suspicion_mult: 3.0,
            suspicion_max_mult: 4.0,
            max_lhm: 8,
            pause: Duration::from_secs(2),
        }
    }
}

impl SwimConfig {
    /// The WAN pool of gateways: round trips of tens to hundreds of
    /// milliseconds, so longer timeouts (memberlist's WAN profile is slower
    /// still: 5 s probes, 3 s timeouts).
    pub fn wan() -> Self {
        Self {
            probe_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_millis(500),
            suspicion_mult: 4.0,
            ..Self::default()
        }
    }
}

/// "`id` at `generation` did not answer my probes while at `incarnation`."
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Accusation {
    pub id: String,
    pub generation: u64,
    pub incarnation: u64,
}

/// One member as the gossip state shows it (newest generation of each node id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberView {
    pub id: String,
    pub generation: u64,
    pub addr: SocketAddr,
    /// The member's incarnation: its signed `alive` value, raised only to refute.
    pub incarnation: u64,
    /// The member's state version: grows with every value it signs. Only
    /// for accusations in the earlier shape (`legacy_accuses`).
    pub state_version: u64,
    /// What the member accuses others of (its signed `accuse` value).
    pub accuses: Vec<Accusation>,
    /// Accusations in the earlier shape (its `suspect` value, published by
    /// nodes from before the incarnation), naming state versions: read only
    /// to refute the ones naming this node.
    pub legacy_accuses: Vec<Accusation>,
    /// Gracefully leaving: not probed, not accused.
    pub leaving: bool,
}

/// This node's own incarnation and state version, for [`Detector::sync`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Own {
    pub incarnation: u64,
    pub state_version: u64,
}

/// What the detector wants sent. Indirect probes name the target by id:
/// the helper resolves its address itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Ping {
        to: SocketAddr,
        target: String,
        seq: u32,
    },
    PingReq {
        via: SocketAddr,
        helper: String,
        target: String,
        seq: u32,
    },
}

/// A member's health in this node's view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    Alive,
    /// Accused by these members (this one included, if it accused); dead
    /// at `since` + the Lifeguard timeout unless refuted.
    Suspect {
        since: Duration,
        accusers: BTreeSet<String>,
    },
    Dead {
        since: Duration,
    },
}

#[derive(Clone, Debug)]
struct Peer {
    generation: u64,
    addr: SocketAddr,
    incarnation: u64,
    leaving: bool,
    health: Health,
}

#[derive(Clone, Debug)]
struct Probe {
    seq: u32,
    target: String,
    started: Duration,
    /// Helpers asked (0 while the probe is direct).
    helpers: usize,
    nacks: usize,
}

/// The detector of one pool member.
pub struct Detector {
    cfg: SwimConfig,
    me: String,
    my_generation: u64,
    my_incarnation: u64,
    peers: BTreeMap<String, Peer>,
    /// Probe order: a shuffled list of ids, consumed from the back.
    order: Vec<String>,
    /// Probed before the rest of `order`: members others suspect.
    urgent: Vec<String>,
    probe: Option<Probe>,
    next_probe: Duration,
    seq: u32,
    lhm: u32,
    last_tick: Option<Duration>,
    /// What this node accuses others of, as published.
    accusing: BTreeMap<String, Accusation>,
    accusing_changed: bool,
    /// Confirmations of others' accusations, published after a random part
    /// of a probe interval unless enough accusers are known by then.
    pending: BTreeMap<String, (Accusation, Duration)>,
    refute: bool,
    verdicts_changed: bool,
    /// Pauses noticed so far.
    pauses: u64,
    /// A probe of a dead member, to find one that came back (after a
    /// partition, say): `(seq, target)`.
    revival: Option<(u32, String)>,
    next_revival: Duration,
    /// Dead members that answered: the shell starts a full exchange with each.
    revived: Vec<SocketAddr>,
    /// Members declared dead since the last call, with their accusers.
    died: Vec<(String, Vec<String>)>,
}

/// How often a node may probe one dead member (with a probability of dead
/// over live members, so a pool tries about once per interval in all, as
/// serf's reconnects do, and every node tries after a partition).
pub const REVIVAL_EVERY: Duration = Duration::from_secs(5);

impl Detector {
    pub fn new(cfg: SwimConfig, me: String, my_generation: u64) -> Self {
        Self {
            cfg,
            me,
            my_generation,
            my_incarnation: 0,
            peers: BTreeMap::new(),
            order: Vec::new(),
            urgent: Vec::new(),
            probe: None,
            next_probe: Duration::ZERO,
            seq: 0,
            lhm: 0,
            last_tick: None,
            accusing: BTreeMap::new(),
            accusing_changed: false,
            pending: BTreeMap::new(),
            refute: false,
            verdicts_changed: false,
            pauses: 0,
            revival: None,
            next_revival: REVIVAL_EVERY,
            revived: Vec::new(),
            died: Vec::new(),
        }
    }

    /// Updates the membership from the gossip state: `mine` is this node's
    /// own incarnation and state version.
    pub fn sync(&mut self, members: &[MemberView], mine: Own, now: Duration) {
        let my_incarnation = mine.incarnation;
        self.my_incarnation = my_incarnation;
        let mut seen = BTreeSet::new();
        for m in members {
            if m.id == self.me {
                continue;
            }
            seen.insert(m.id.clone());
            match self.peers.get_mut(&m.id) {
                Some(p) if p.generation == m.generation => {
                    if m.incarnation > p.incarnation {
                        p.incarnation = m.incarnation;
                        // A higher signed incarnation refutes every accusation of a lower one.
                        if !matches!(p.health, Health::Alive) {
                            p.health = Health::Alive;
                            self.verdicts_changed = true;
                        }
                    }
                    p.addr = m.addr;
                    if m.leaving != p.leaving {
                        p.leaving = m.leaving;
                        self.verdicts_changed = true;
                    }
                }
                Some(p) if p.generation > m.generation => {}
                _ => {
                    // New, or restarted with a newer generation.
                    self.peers.insert(
                        m.id.clone(),
                        Peer {
                            generation: m.generation,
                            addr: m.addr,
                            incarnation: m.incarnation,
                            leaving: m.leaving,
                            health: Health::Alive,
                        },
                    );
                    self.verdicts_changed = true;
                }
            }
        }
        let before = self.peers.len();
        self.peers.retain(|id, _| seen.contains(id));
        self.verdicts_changed |= self.peers.len() != before;

        // My own accusations that the accused has refuted (or that name a
        // node or generation that is gone) are withdrawn.
        let peers = &self.peers;
        let before = self.accusing.len();
        self.accusing.retain(|id, a| {
            peers.get(id).is_some_and(|p| {
                p.generation == a.generation && p.incarnation <= a.incarnation && !p.leaving
            })
        });
        self.accusing_changed |= self.accusing.len() != before;

        // Accusations by live members against a member's current incarnation.
        let mut accusers: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for m in members {
            if m.id == self.me {
                // Our own published accusations are `self.accusing`.
                continue;
            }
            let credible = self.peers.get(&m.id).is_some_and(|p| {
                p.generation == m.generation && !matches!(p.health, Health::Dead { .. })
            });
            // Nodes from before the incarnation accuse a state version;
            // any newer state of ours refutes them, as it did there.
            if m.legacy_accuses.iter().any(|a| {
                a.id == self.me
                    && a.generation == self.my_generation
                    && a.incarnation >= mine.state_version
            }) {
                self.refute = true;
            }
            for a in &m.accuses {
                if a.id == self.me {
                    // Refuted by any newer state of ours, whoever accuses.
                    if a.generation == self.my_generation && a.incarnation >= my_incarnation {
                        self.refute = true;
                    }
                    continue;
                }
                if !credible {
                    continue;
                }
                if let Some(p) = self.peers.get(&a.id) {
                    if a.generation == p.generation && a.incarnation >= p.incarnation && !p.leaving
                    {
                        accusers
                            .entry(a.id.as_str())
                            .or_default()
                            .insert(m.id.clone());
                    }
                }
            }
        }
        for (id, a) in &self.accusing {
            if self
                .peers
                .get(id)
                .is_some_and(|p| p.incarnation <= a.incarnation)
            {
                accusers
                    .entry(id.as_str())
                    .or_default()
                    .insert(self.me.clone());
            }
        }
        let mut urgent = Vec::new();
        for (id, p) in self.peers.iter_mut() {
            let by = accusers.remove(id.as_str());
            match (&mut p.health, by) {
                (Health::Alive, Some(by)) => {
                    if !by.contains(&self.me) && by.len() <= self.cfg.indirect_checks {
                        urgent.push(id.clone());
                    }
                    p.health = Health::Suspect {
                        since: now,
                        accusers: by,
                    };
                    self.verdicts_changed = true;
                }
                (Health::Suspect { accusers, .. }, Some(by)) => {
                    accusers.extend(by);
                }
                (Health::Suspect { .. }, None) => {
                    p.health = Health::Alive;
                    self.verdicts_changed = true;
                }
                _ => {}
            }
        }
        // Confirm (or clear) others' suspicions with our own probe first.
        for id in urgent {
            if !self.urgent.contains(&id) {
                self.urgent.push(id);
            }
        }
    }

    /// Advances time: suspicion timeouts, probe deadlines and the next probe.
    pub fn tick<R: rand::Rng + ?Sized>(&mut self, now: Duration, rng: &mut R) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(last) = self.last_tick {
            if now.saturating_sub(last) > self.cfg.pause {
                self.resumed(now);
            }
        }
        self.last_tick = Some(now);

        // Suspicions that ran out.
        let n = self.alive_count();
        let (min, max) = self.suspicion_bounds(n);
        let k = (self.cfg.indirect_checks as f64).min(n.saturating_sub(2) as f64);
        for (id, p) in self.peers.iter_mut() {
            if let Health::Suspect { since, accusers } = &p.health {
                let timeout = suspicion_timeout(min, max, k, accusers.len());
                if now.saturating_sub(*since) >= timeout {
                    self.died
                        .push((id.clone(), accusers.iter().cloned().collect()));
                    p.health = Health::Dead { since: now };
                    self.verdicts_changed = true;
                }
            }
        }

        let scale = 1 + self.lhm;
        let interval = self.cfg.probe_interval * scale;
        let timeout = self.cfg.probe_timeout * scale;
        if let Some(probe) = &mut self.probe {
            if probe.helpers == 0 && now >= probe.started + timeout {
                let target = probe.target.clone();
                let seq = probe.seq;
                let mut helpers: Vec<(&String, &Peer)> = self
                    .peers
                    .iter()
                    .filter(|(id, p)| {
                        **id != target && matches!(p.health, Health::Alive) && !p.leaving
                    })
                    .collect();
                helpers.shuffle(rng);
                helpers.truncate(self.cfg.indirect_checks);
                probe.helpers = helpers.len().max(1);
                for (id, p) in helpers {
                    out.push(Action::PingReq {
                        via: p.addr,
                        helper: id.clone(),
                        target: target.clone(),
                        seq,
                    });
                }
            }
            if now >= probe.started + interval {
                let probe = self.probe.take();
                if let Some(probe) = probe {
                    let jitter = self.cfg.probe_interval.mul_f64(rng.random::<f64>());
                    self.failed(probe, now, jitter);
                }
            }
        }
        self.publish_pending(now);
        if now >= self.next_revival {
            self.next_revival = now + REVIVAL_EVERY;
            let dead: Vec<(&String, &Peer)> = self
                .peers
                .iter()
                .filter(|(_, p)| !p.leaving && matches!(p.health, Health::Dead { .. }))
                .collect();
            let live = self.alive_count().max(1);
            if !dead.is_empty() && rng.random::<f64>() < dead.len() as f64 / live as f64 {
                let (id, p) = dead[rng.random_range(0..dead.len())];
                self.seq = self.seq.wrapping_add(1);
                out.push(Action::Ping {
                    to: p.addr,
                    target: id.clone(),
                    seq: self.seq,
                });
                self.revival = Some((self.seq, id.clone()));
            }
        }
        if self.probe.is_none() && now >= self.next_probe {
            if let Some(target) = self.next_target(rng) {
                if let Some(p) = self.peers.get(&target) {
                    self.seq = self.seq.wrapping_add(1);
                    out.push(Action::Ping {
                        to: p.addr,
                        target: target.clone(),
                        seq: self.seq,
                    });
                    self.probe = Some(Probe {
                        seq: self.seq,
                        target,
                        started: now,
                        helpers: 0,
                        nacks: 0,
                    });
                }
            }
            self.next_probe = now + interval;
        }
        out
    }

    /// An answer to probe `seq` from `target` (direct, or relayed by a helper
    /// and proven by the target's signature: the shell checks that).
    /// When the direct probe `seq` of `target` went out, while it is still
    /// direct (no helpers asked): an ACK now gives its round-trip time.
    pub fn direct_probe_sent(&self, target: &str, seq: u32) -> Option<Duration> {
        self.probe
            .as_ref()
            .filter(|p| p.seq == seq && p.target == target && p.helpers == 0)
            .map(|p| p.started)
    }

    pub fn on_ack(&mut self, target: &str, seq: u32) {
        if self
            .revival
            .as_ref()
            .is_some_and(|(s, t)| *s == seq && t == target)
        {
            self.revival = None;
            if let Some(p) = self.peers.get(target) {
                self.revived.push(p.addr);
            }
            return;
        }
        let matches = self
            .probe
            .as_ref()
            .is_some_and(|p| p.seq == seq && p.target == target);
        if matches {
            self.probe = None;
            self.lhm = self.lhm.saturating_sub(1);
        }
    }

    /// A helper could not reach the target of probe `seq` in time.
    pub fn on_nack(&mut self, seq: u32) {
        if let Some(p) = self.probe.as_mut().filter(|p| p.seq == seq) {
            p.nacks += 1;
        }
    }

    /// Whether a member counts as alive (suspects do; dead and unknown do not).
    pub fn health(&self, id: &str, generation: u64) -> Option<&Health> {
        self.peers
            .get(id)
            .filter(|p| p.generation == generation)
            .map(|p| &p.health)
    }

    /// The address of a member this node may probe on another's behalf.
    pub fn probe_addr(&self, id: &str) -> Option<(SocketAddr, u64)> {
        self.peers
            .get(id)
            .filter(|p| !matches!(p.health, Health::Dead { .. }))
            .map(|p| (p.addr, p.generation))
    }

    /// Live members' addresses (alive or suspect, not leaving): push targets.
    pub fn live_addrs(&self) -> Vec<SocketAddr> {
        self.peers
            .values()
            .filter(|p| !p.leaving && !matches!(p.health, Health::Dead { .. }))
            .map(|p| p.addr)
            .collect()
    }

    /// This node's accusations, when they changed since the last call.
    pub fn take_accusations(&mut self) -> Option<Vec<Accusation>> {
        if !std::mem::take(&mut self.accusing_changed) {
            return None;
        }
        Some(self.accusing.values().cloned().collect())
    }

    /// Whether this node must refute an accusation (publish a newer state).
    pub fn take_refute(&mut self) -> bool {
        let r = std::mem::take(&mut self.refute);
        if r {
            self.lhm = (self.lhm + 1).min(self.cfg.max_lhm);
        }
        r
    }

    /// Dead members that answered a probe since the last call: exchange
    /// full state with them (they may not know they were accused).
    pub fn take_revived(&mut self) -> Vec<SocketAddr> {
        std::mem::take(&mut self.revived)
    }

    /// Members declared dead since the last call, with who accused them.
    pub fn take_died(&mut self) -> Vec<(String, Vec<String>)> {
        std::mem::take(&mut self.died)
    }

    /// Whether any member's health changed since the last call.
    pub fn take_verdicts_changed(&mut self) -> bool {
        std::mem::take(&mut self.verdicts_changed)
    }

    /// Every member: id, generation, health.
    pub fn members(&self) -> impl Iterator<Item = (&str, u64, &Health)> {
        self.peers
            .iter()
            .map(|(id, p)| (id.as_str(), p.generation, &p.health))
    }

    pub fn local_health(&self) -> u32 {
        self.lhm
    }

    pub fn pauses(&self) -> u64 {
        self.pauses
    }

    /// Members by health: (alive, suspect, dead).
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for p in self.peers.values() {
            match p.health {
                Health::Alive => c.0 += 1,
                Health::Suspect { .. } => c.1 += 1,
                Health::Dead { .. } => c.2 += 1,
            }
        }
        c
    }

    fn alive_count(&self) -> usize {
        1 + self
            .peers
            .values()
            .filter(|p| !matches!(p.health, Health::Dead { .. }))
            .count()
    }

    /// Lifeguard's bounds for a pool of `n` live members.
    fn suspicion_bounds(&self, n: usize) -> (Duration, Duration) {
        let scale = (n.max(1) as f64).log10().max(1.0);
        let min = self
            .cfg
            .probe_interval
            .mul_f64(self.cfg.suspicion_mult * scale);
        (min, min.mul_f64(self.cfg.suspicion_max_mult))
    }

    fn resumed(&mut self, now: Duration) {
        self.pauses += 1;
        // What we saw before the pause is stale: start every suspicion over,
        // drop the probe, and distrust our own timing for a while.
        self.probe = None;
        self.next_probe = now;
        self.lhm = self.cfg.max_lhm;
        for p in self.peers.values_mut() {
            if let Health::Suspect { since, .. } = &mut p.health {
                *since = now;
            }
        }
    }

    /// Publishes the confirmations whose time came, unless the suspect
    /// has enough accusers by now, was refuted or is gone.
    fn publish_pending(&mut self, now: Duration) {
        let due: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, (_, at))| now >= *at)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let Some((a, _)) = self.pending.remove(&id) else {
                continue;
            };
            let still = self.peers.get(&id).is_some_and(|p| {
                p.generation == a.generation
                    && p.incarnation == a.incarnation
                    && !p.leaving
                    && matches!(&p.health, Health::Suspect { accusers, .. }
                        if !enough_others(accusers, &self.me, self.cfg.indirect_checks))
            });
            if still {
                self.accuse(a);
            }
        }
    }

    fn accuse(&mut self, a: Accusation) {
        if self.accusing.get(&a.id) == Some(&a) {
            return;
        }
        self.accusing.insert(a.id.clone(), a);
        self.accusing_changed = true;
        // Keep the published list small (it is one gossip value).
        while self.accusing.len() > MAX_ACCUSATIONS {
            if let Some(k) = self.accusing.keys().next().cloned() {
                self.accusing.remove(&k);
            }
        }
    }

    fn failed(&mut self, probe: Probe, now: Duration, jitter: Duration) {
        // Helpers that neither acked nor nacked: likely our own links or CPU.
        if probe.helpers > 0 && probe.nacks < probe.helpers {
            self.lhm = (self.lhm + 1).min(self.cfg.max_lhm);
        }
        let Some(p) = self.peers.get_mut(&probe.target) else {
            return;
        };
        if p.leaving || matches!(p.health, Health::Dead { .. }) {
            return;
        }
        let a = Accusation {
            id: probe.target.clone(),
            generation: p.generation,
            incarnation: p.incarnation,
        };
        // Enough independent accusers already bring the timeout to its
        // minimum: one more published accusation would only cost the pool a
        // signed change and its pushes (after a death, every prober would
        // publish one). Count it here, publish nothing.
        let enough = matches!(&p.health, Health::Suspect { accusers, .. }
            if enough_others(accusers, &self.me, self.cfg.indirect_checks));
        // A confirmation waits a random part of a probe interval: after a
        // death every member probes the suspect at once (urgently) and fails
        // at once, and without the wait all of them published before
        // hearing of the others (23 of 99 at N = 100, whose pushes starved
        // the host's CPU until live members missed their probes).
        let confirming = matches!(p.health, Health::Suspect { .. });
        if !enough {
            if confirming {
                self.pending
                    .entry(probe.target.clone())
                    .or_insert((a, now + jitter));
            } else {
                self.accuse(a);
            }
        }
        let Some(p) = self.peers.get_mut(&probe.target) else {
            return;
        };
        match &mut p.health {
            Health::Alive => {
                p.health = Health::Suspect {
                    since: now,
                    accusers: BTreeSet::from([self.me.clone()]),
                };
                self.verdicts_changed = true;
            }
            Health::Suspect { accusers, .. } => {
                accusers.insert(self.me.clone());
            }
            Health::Dead { .. } => {}
        }
    }

    fn next_target<R: rand::Rng + ?Sized>(&mut self, rng: &mut R) -> Option<String> {
        let probeable = |p: &Peer| !p.leaving && !matches!(p.health, Health::Dead { .. });
        while let Some(id) = self.urgent.pop() {
            if self.peers.get(&id).is_some_and(probeable) {
                return Some(id);
            }
        }
        for _ in 0..2 {
            while let Some(id) = self.order.pop() {
                if self.peers.get(&id).is_some_and(probeable) {
                    return Some(id);
                }
            }
            self.order = self
                .peers
                .iter()
                .filter(|(_, p)| probeable(p))
                .map(|(id, _)| id.clone())
                .collect();
            self.order.shuffle(rng);
        }
        None
    }
}

/// Whether others than `me` already accuse enough (`k` confirmations of a
/// first accusation) for the shortest timeout everywhere. `me` does not
/// count: others see only published accusations, and a node that counted
/// its own unpublished failure left the pool one short (3 published
/// accusers: 4.9 s at N = 100 instead of 3 s).
fn enough_others(accusers: &BTreeSet<String>, me: &str, k: usize) -> bool {
    accusers.iter().filter(|a| a.as_str() != me).count() > k
}

/// At most this many accusations are published at once (one gossip value).
pub const MAX_ACCUSATIONS: usize = 32;

/// Lifeguard's suspicion timeout with `accusers` independent accusers and
/// `k` expected confirmations: `max` for a lone accuser, falling
/// logarithmically to `min` at `k` confirmations.
pub fn suspicion_timeout(min: Duration, max: Duration, k: f64, accusers: usize) -> Duration {
    let confirmations = accusers.saturating_sub(1) as f64;
    if k < 1.0 {
        return min;
    }
    let frac = ((confirmations + 1.0).ln() / (k + 1.0).ln()).min(1.0);
    let t = max.as_secs_f64() - (max.as_secs_f64() - min.as_secs_f64()) * frac;
    Duration::from_secs_f64(t.max(min.as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn addr(i: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9000 + i))
    }

    fn view(i: u16, incarnation: u64, accuses: Vec<Accusation>) -> MemberView {
        MemberView {
            id: format!("n{i}"),
            generation: 1,
            addr: addr(i),
            incarnation,
            state_version: incarnation,
            accuses,
            legacy_accuses: vec![],
            leaving: false,
        }
    }

    fn own(incarnation: u64) -> Own {
        Own {
            incarnation,
            state_version: incarnation,
        }
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn detector(n: u16) -> (Detector, Vec<MemberView>) {
        let mut d = Detector::new(SwimConfig::default(), "n0".into(), 1);
        let members: Vec<_> = (0..n).map(|i| view(i, 5, vec![])).collect();
        d.sync(&members, own(5), Duration::ZERO);
        (d, members)
    }

    #[test]
    fn every_member_is_probed_once_per_round_and_answers_keep_it_alive() {
        let (mut d, _) = detector(6);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut targets = Vec::new();
        for step in 0..5u64 {
            let now = ms(step * 500);
            for a in d.tick(now, &mut rng) {
                if let Action::Ping { target, seq, .. } = a {
                    d.on_ack(&target, seq);
                    targets.push(target);
                }
            }
        }
        targets.sort();
        assert_eq!(targets, vec!["n1", "n2", "n3", "n4", "n5"]);
        assert_eq!(d.counts(), (5, 0, 0));
        assert_eq!(d.local_health(), 0);
        assert!(d.take_accusations().is_none());
    }

    /// Runs the detector for `until` in 50 ms steps; `answer` decides whether a
    /// target answers (directly or through helpers).
    fn run(
        d: &mut Detector,
        from: u64,
        until: u64,
        rng: &mut rand::rngs::StdRng,
        answer: impl Fn(&str) -> bool,
    ) -> Vec<Action> {
        let mut all = Vec::new();
        let mut t = from;
        while t < until {
            for a in d.tick(ms(t), rng) {
                match &a {
                    Action::Ping { target, seq, .. } if answer(target) => d.on_ack(target, *seq),
                    Action::PingReq { .. } => {}
                    _ => {}
                }
                all.push(a);
            }
            t += 50;
        }
        all
    }

    /// After a death every member fails its urgent probe of the suspect at
    /// once: a confirmation waits a random part of a probe interval and is
    /// not published when enough accusers are known by then.
    #[test]
    fn confirmations_wait_and_are_dropped_when_enough_accusers_are_known() {
        let accuse = |id: &str| {
            vec![Accusation {
                id: id.into(),
                generation: 1,
                incarnation: 5,
            }]
        };
        // Alone: published, a moment later.
        let (mut d, mut members) = detector(10);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        members[1].accuses = accuse("n2");
        d.sync(&members, own(5), ms(0));
        let mut published_at = None;
        let mut t = 0;
        while t < 3_000 && published_at.is_none() {
            for a in d.tick(ms(t), &mut rng) {
                if let Action::Ping { target, seq, .. } = a {
                    if target != "n2" {
                        d.on_ack(&target, seq);
                    }
                }
            }
            if d.take_accusations()
                .is_some_and(|l| l.iter().any(|a| a.id == "n2"))
            {
                published_at = Some(t);
            }
            t += 50;
        }
        // The urgent probe starts at once and fails at the end of its
        // 500 ms interval; the confirmation follows within another interval.
        let at = published_at.expect("the confirmation is published");
        assert!((500..=1_050).contains(&at), "published at {at} ms");

        // Three other accusers heard of in the meantime: nothing published.
        let (mut d, mut members) = detector(10);
        members[1].accuses = accuse("n2");
        d.sync(&members, own(5), ms(0));
        let mut t = 0;
        let mut failed = false;
        while t < 3_000 {
            for a in d.tick(ms(t), &mut rng) {
                if let Action::Ping { target, seq, .. } = a {
                    if target != "n2" {
                        d.on_ack(&target, seq);
                    }
                }
            }
            if !failed && t >= 500 {
                failed = true;
                for i in [3, 4, 5] {
                    members[i].accuses = accuse("n2");
                }
                d.sync(&members, own(5), ms(t));
            }
            assert!(
                !d.take_accusations()
                    .is_some_and(|l| l.iter().any(|a| a.id == "n2")),
                "published at {t} ms with 4 accusers known"
            );
            t += 50;
        }
        assert!(matches!(d.health("n2", 1), Some(Health::Dead { .. })));
    }

    #[test]
    fn a_silent_member_is_accused_and_dies_after_the_lone_accuser_timeout() {
        let (mut d, members) = detector(10);
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let acts = run(&mut d, 0, 6_000, &mut rng, |t| t != "n3");
        // Indirect probes went out through other members, never n3.
        assert!(acts.iter().any(|a| matches!(a, Action::PingReq { target, helper, .. } if target == "n3" && helper != "n3")));
        let accused = d.take_accusations().expect("accused");
        assert_eq!(
            accused,
            vec![Accusation {
                id: "n3".into(),
                generation: 1,
                incarnation: 5
            }]
        );
        d.sync(&members, own(5), ms(6_000));
        // n = 10: min 1.5 s, max 6 s; a lone accuser takes the max.
        assert!(
            matches!(d.health("n3", 1), Some(Health::Suspect { .. })),
            "{:?}",
            d.health("n3", 1)
        );
        run(&mut d, 6_000, 12_500, &mut rng, |t| t != "n3");
        assert!(matches!(d.health("n3", 1), Some(Health::Dead { .. })));
        assert_eq!(d.counts(), (8, 0, 1));
        assert!(!d.live_addrs().contains(&addr(3)));
    }

    #[test]
    fn independent_accusers_shorten_the_suspicion_to_the_minimum() {
        let (mut d, mut members) = detector(10);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let acc = Accusation {
            id: "n4".into(),
            generation: 1,
            incarnation: 5,
        };
        for i in [1, 2, 3] {
            members[i].accuses = vec![acc.clone()];
        }
        d.sync(&members, own(5), ms(0));
        match d.health("n4", 1) {
            Some(Health::Suspect { accusers, .. }) => assert_eq!(accusers.len(), 3),
            other => panic!("{other:?}"),
        }
        // The next probe goes to the suspect, to confirm or clear it.
        let first = d.tick(ms(0), &mut rng);
        assert!(matches!(&first[0], Action::Ping { target, .. } if target == "n4"));
        // 3 accusers (k = 3 expected confirmations, 2 here): well below the 6 s maximum.
        run(&mut d, 50, 4_000, &mut rng, |_| true);
        assert!(matches!(d.health("n4", 1), Some(Health::Dead { .. })));
        assert!(suspicion_timeout(ms(1500), ms(6000), 3.0, 3) < ms(3000));
        assert_eq!(suspicion_timeout(ms(1500), ms(6000), 3.0, 1), ms(6000));
        assert_eq!(suspicion_timeout(ms(1500), ms(6000), 3.0, 9), ms(1500));
    }

    #[test]
    fn a_higher_incarnation_refutes_and_brings_a_dead_member_back() {
        let (mut d, mut members) = detector(5);
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        members[1].accuses = vec![Accusation {
            id: "n2".into(),
            generation: 1,
            incarnation: 5,
        }];
        d.sync(&members, own(5), ms(0));
        run(&mut d, 0, 10_000, &mut rng, |t| t != "n2");
        assert!(matches!(d.health("n2", 1), Some(Health::Dead { .. })));
        members[2].incarnation = 6;
        d.sync(&members, own(5), ms(10_000));
        assert_eq!(d.health("n2", 1), Some(&Health::Alive));
        assert!(d.take_verdicts_changed());
        // Our own accusation of the old incarnation is withdrawn.
        d.take_accusations();
        assert!(!d.accusing.contains_key("n2"));
    }

    /// The N = 100 bench's stuck detection: the dead member's last change
    /// (a newer state version) reached this observer after the accusations.
    /// Under state versions it cancelled them here, and revived the member
    /// after its death; only a higher incarnation may.
    #[test]
    fn other_changes_of_the_accused_neither_refute_nor_revive() {
        let (mut d, mut members) = detector(5);
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let accusation = Accusation {
            id: "n2".into(),
            generation: 1,
            incarnation: 5,
        };
        members[1].accuses = vec![accusation.clone()];
        members[3].accuses = vec![accusation];
        d.sync(&members, own(5), ms(0));
        assert!(matches!(d.health("n2", 1), Some(Health::Suspect { .. })));
        // A late change of n2's (its services, its own accusations).
        members[2].state_version = 9;
        d.sync(&members, own(5), ms(100));
        assert!(matches!(d.health("n2", 1), Some(Health::Suspect { .. })));
        run(&mut d, 100, 10_000, &mut rng, |t| t != "n2");
        assert!(matches!(d.health("n2", 1), Some(Health::Dead { .. })));
        members[2].state_version = 10;
        d.sync(&members, own(5), ms(10_000));
        assert!(matches!(d.health("n2", 1), Some(Health::Dead { .. })));
    }

    /// A node from before the incarnation accuses a state version: any
    /// newer state of ours answers it, and we refute what names ours.
    #[test]
    fn accusations_in_the_earlier_shape_ask_for_a_refutation() {
        let (mut d, mut members) = detector(4);
        let mine = Own {
            incarnation: 0,
            state_version: 7,
        };
        members[1].legacy_accuses = vec![Accusation {
            id: "n0".into(),
            generation: 1,
            incarnation: 6,
        }];
        d.sync(&members, mine, ms(0));
        assert!(!d.take_refute(), "state version 7 already answers 6");
        members[1].legacy_accuses[0].incarnation = 7;
        d.sync(&members, mine, ms(0));
        assert!(d.take_refute());
        // They are not counted as accusations of others.
        members[1].legacy_accuses = vec![Accusation {
            id: "n2".into(),
            generation: 1,
            incarnation: 99,
        }];
        d.sync(&members, mine, ms(0));
        assert_eq!(d.health("n2", 1), Some(&Health::Alive));
    }

    #[test]
    fn an_accusation_of_this_node_asks_for_a_refutation_and_old_ones_do_not() {
        let (mut d, mut members) = detector(4);
        members[1].accuses = vec![Accusation {
            id: "n0".into(),
            generation: 1,
            incarnation: 4,
        }];
        d.sync(&members, own(5), ms(0));
        assert!(!d.take_refute(), "already refuted by incarnation 5");
        members[1].accuses = vec![Accusation {
            id: "n0".into(),
            generation: 1,
            incarnation: 5,
        }];
        d.sync(&members, own(5), ms(0));
        assert!(d.take_refute());
        assert_eq!(d.local_health(), 1);
        // Another generation of this node is not this node.
        members[1].accuses = vec![Accusation {
            id: "n0".into(),
            generation: 0,
            incarnation: 9,
        }];
        d.sync(&members, own(5), ms(0));
        assert!(!d.take_refute());
    }

    #[test]
    fn accusations_by_dead_members_or_of_other_generations_do_not_count() {
        let (mut d, mut members) = detector(5);
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        // n1 dies first.
        members[2].accuses = vec![Accusation {
            id: "n1".into(),
            generation: 1,
            incarnation: 5,
        }];
        d.sync(&members, own(5), ms(0));
        run(&mut d, 0, 8_000, &mut rng, |t| t != "n1");
        assert!(matches!(d.health("n1", 1), Some(Health::Dead { .. })));
        // Now the dead n1 "accuses" n3, and someone names an old generation of n4.
        members[2].accuses = vec![];
        members[1].accuses = vec![Accusation {
            id: "n3".into(),
            generation: 1,
            incarnation: 5,
        }];
        members[3].accuses = vec![Accusation {
            id: "n4".into(),
            generation: 0,
            incarnation: 5,
        }];
        d.sync(&members, own(5), ms(8_000));
        assert_eq!(d.health("n3", 1), Some(&Health::Alive));
        assert_eq!(d.health("n4", 1), Some(&Health::Alive));
    }

    #[test]
    fn a_paused_node_restarts_its_timers_and_accuses_no_one_for_its_absence() {
        let (mut d, mut members) = detector(10);
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        members[1].accuses = vec![Accusation {
            id: "n5".into(),
            generation: 1,
            incarnation: 5,
        }];
        d.sync(&members, own(5), ms(0));
        let acts = d.tick(ms(0), &mut rng);
        assert!(matches!(&acts[0], Action::Ping { target, .. } if target == "n5"));
        // Paused for 30 s: the probe in flight and the suspicion are stale.
        let acts = d.tick(ms(30_000), &mut rng);
        assert_eq!(d.pauses(), 1);
        assert_eq!(d.local_health(), 8);
        assert!(
            matches!(d.health("n5", 1), Some(Health::Suspect { since, .. }) if *since == ms(30_000))
        );
        assert!(
            d.take_accusations().is_none(),
            "no accusation from the stale probe"
        );
        // The new probe after the pause is answered.
        for a in acts {
            if let Action::Ping { target, seq, .. } = a {
                d.on_ack(&target, seq);
            }
        }
        // Within a second of resuming nothing is dead.
        run(&mut d, 30_050, 31_000, &mut rng, |_| true);
        assert_eq!(d.counts().2, 0);
    }

    #[test]
    fn failed_probes_without_nacks_widen_the_interval() {
        let (mut d, _) = detector(6);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        run(&mut d, 0, 2_000, &mut rng, |_| false);
        let lhm = d.local_health();
        assert!(lhm >= 2, "{lhm}");
        // With nacks from every helper, a failed probe does not count against us.
        let (mut d, _) = detector(6);
        let mut t = 0;
        while t < 2_000 {
            for a in d.tick(ms(t), &mut rng) {
                if let Action::PingReq { seq, .. } = a {
                    d.on_nack(seq);
                }
            }
            t += 50;
        }
        assert_eq!(d.local_health(), 0);
    }

    #[test]
    fn dead_members_are_probed_now_and_then_and_one_that_answers_is_reported() {
        let (mut d, mut members) = detector(3);
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        // Both peers die (a partition, seen from this side).
        members[1].accuses = vec![Accusation {
            id: "n2".into(),
            generation: 1,
            incarnation: 5,
        }];
        members[2].accuses = vec![Accusation {
            id: "n1".into(),
            generation: 1,
            incarnation: 5,
        }];
        d.sync(&members, own(5), ms(0));
        run(&mut d, 0, 20_000, &mut rng, |_| false);
        assert_eq!(d.counts(), (0, 0, 2));
        // Every 5 s a dead member is probed (2 dead, 1 live: always); this one answers.
        let mut revived = Vec::new();
        let mut t = 20_000;
        while t < 26_000 {
            for a in d.tick(ms(t), &mut rng) {
                if let Action::Ping { target, seq, .. } = a {
                    d.on_ack(&target, seq);
                }
            }
            revived.extend(d.take_revived());
            t += 50;
        }
        assert!(!revived.is_empty());
        // An answer is not a refutation: still dead until a newer incarnation.
        assert_eq!(d.counts(), (0, 0, 2));
    }

    #[test]
    fn leaving_members_are_neither_probed_nor_accused() {
        let (mut d, mut members) = detector(3);
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        members[1].leaving = true;
        members[2].leaving = true;
        d.sync(&members, own(5), ms(0));
        let acts = run(&mut d, 0, 3_000, &mut rng, |_| false);
        assert!(acts.is_empty(), "{acts:?}");
        assert!(d.live_addrs().is_empty());
    }
}
