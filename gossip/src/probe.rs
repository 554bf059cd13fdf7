//! The prober's shell: runs the [`swim`](crate::swim) detector of one pool
//! over QUIC datagrams, publishes its accusations and refutations in the
//! node's signed state, and keeps the verdicts the catalog reads.
//!
//! Datagrams (bincode through the one codec module, a version tag first):
//! - `Ping{seq}`: a direct probe, answered by the target's QUIC stack with
//!   an ACK frame (see `quic::watch_ack`), which the transport hands back as
//!   `Ack{seq}`. The answer is authentic because only the holder of the
//!   connection's keys (the target's certificate) can produce it.
//! - `PingReq{seq, target, nonce}` to a helper, which sends the target
//!   `IndirectPing{seq', origin, nonce}`; the target answers the helper with
//!   `IndirectAck{seq', sig}`, a signature by its node key over the pool, its
//!   id and generation, the origin and the nonce, and the helper relays it as
//!   `Relayed{seq, sig}`. So a helper can neither answer for a dead target
//!   nor replay an old answer. No answer in time: `Nack{seq}` (Lifeguard).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chitchat::{Chitchat, ChitchatId, NodeState};
use meshnode_transport::codec;
use meshnode_transport::pki::sign::verify_node_signature;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Mutex};
use tracing::{debug, info, warn};

use crate::gate::Guard;
use crate::keys::{self, ACCUSE_KEY, ALIVE_KEY, LEAVING_KEY, SUSPECT_KEY};
use crate::metrics::{LOCAL_HEALTH, PAUSES, PROBES, PROBE_RTT, SUSPICIONS};
use crate::plane::{Datagram, Plane};
use crate::signed;
use crate::swim::{Action, Detector, Health, MemberView, Own, SwimConfig};

/// The prober's clock: often enough for 200 ms probe timeouts.
const TICK: Duration = Duration::from_millis(50);
/// The prober re-reads the whole state at least this often.
const RESYNC: Duration = Duration::from_secs(2);
/// Relayed probes in flight at once on behalf of others.
const MAX_RELAYS: usize = 256;
/// Signatures for indirect probes per second, at most (each ~30 us).
const MAX_SIGNATURES_PER_S: u32 = 200;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Msg {
    Ping {
        seq: u32,
    },
    Ack {
        seq: u32,
    },
    PingReq {
        seq: u32,
        target: String,
        nonce: u64,
    },
    IndirectPing {
        seq: u32,
        origin: String,
        nonce: u64,
    },
    IndirectAck {
        seq: u32,
        sig: Vec<u8>,
    },
    Relayed {
        seq: u32,
        target: String,
        sig: Vec<u8>,
    },
    Nack {
        seq: u32,
    },
}

#[derive(Serialize, Deserialize)]
enum Wire {
    V1(Msg),
}

fn encode(m: Msg) -> Option<Vec<u8>> {
    codec::encode(&Wire::V1(m)).ok()
}

fn decode(b: &[u8]) -> Option<Msg> {
    match codec::decode::<Wire>(b) {
        Ok(Wire::V1(m)) => Some(m),
        Err(_) => None,
    }
}

/// An `Ack{seq}` as the transport hands it to the prober.
pub(crate) fn ack_bytes(seq: u32) -> Vec<u8> {
    encode(Msg::Ack { seq }).unwrap_or_default()
}

/// The detector's verdicts, read by the catalog and the member list.
#[derive(Default)]
pub(crate) struct Verdicts {
    /// Node id -> (generation, dead).
    dead: RwLock<HashMap<String, (u64, bool)>>,
}

impl Verdicts {
    /// Whether the detector holds this node (this generation) dead; `None`
    /// when it does not judge it (a node that does not answer probes, or one
    /// adopted less than a tick ago): chitchat's view applies then.
    pub fn judged(&self, id: &str, generation: u64) -> Option<bool> {
        self.dead
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .filter(|(g, _)| *g == generation)
            .map(|(_, dead)| *dead)
    }
}

/// What the prober needs of its pool.
pub(crate) struct ProbeCtx {
    pub chitchat: Arc<Mutex<Chitchat>>,
    pub signing: Arc<crate::pool::Signing>,
    pub plane: Arc<Plane>,
    pub guard: Guard,
    pub verdicts: Arc<Verdicts>,
    /// Bumped when the state or the verdicts changed: the catalog recomputes.
    pub changed: watch::Sender<u64>,
    pub pool: &'static str,
    pub swim: SwimConfig,
}

struct Relay {
    origin: SocketAddr,
    origin_seq: u32,
    target: String,
    deadline: Duration,
}

pub(crate) async fn run(ctx: ProbeCtx) {
    let Some(mut inbox) = ctx.plane.take_probes() else {
        warn!("the prober of this pool was already started");
        return;
    };
    let me = ctx.signing.node_id.clone();
    let my_gen = ctx.signing.generation;
    let mut det = Detector::new(ctx.swim.clone(), me.clone(), my_gen);
    // Seeded from the OS; `rand::rng()` cannot be held across an await.
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::rng().random());
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut fingerprint = 0u64;
    let mut dirty_ticks = 0u8;
    let mut last_sync = Duration::ZERO;
    // The current probe's indirect nonces: seq -> (target, nonce).
    let mut nonces: HashMap<u32, (String, u64)> = HashMap::new();
    let mut relays: HashMap<u32, Relay> = HashMap::new();
    let mut relay_seq = 0u32;
    let mut signed_this_second = (0u64, 0u32);
    let mut pauses_logged = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            d = inbox.recv() => {
                let Some(d) = d else { return };
                let now = ctx.plane.now();
                handle(&ctx, &mut det, d, now, &mut nonces, &mut relays, &mut relay_seq, &mut signed_this_second, &me, my_gen);
                continue;
            }
        }
        let now = ctx.plane.now();
        // Re-read the gossip state when news arrived (this tick and the next:
        // chitchat applies a message just after the transport hands it
        // over), and every few seconds whatever happens. Reading it is O(N).
        if ctx.plane.take_dirty() {
            dirty_ticks = 2;
        }
        let mut state_changed = false;
        if dirty_ticks > 0 || now.saturating_sub(last_sync) >= RESYNC {
            dirty_ticks = dirty_ticks.saturating_sub(1);
            let resync = now.saturating_sub(last_sync) >= RESYNC;
            let (views, fp, lagging) = {
                let cc = ctx.chitchat.lock().await;
                let fp = state_fingerprint(&cc);
                // The members' views (their accusations decoded) only when
                // some state moved: most messages that mark the state dirty
                // (anti-entropy of nothing new, copies of a push) change none.
                let views = (fp != fingerprint || resync).then(|| member_views(&cc, &me));
                (views, fp, lags(&cc, &me, &ctx.guard))
            };
            if lagging {
                ctx.plane.hurry();
                dirty_ticks = dirty_ticks.max(1);
            }
            if let Some((views, mine)) = views {
                det.sync(&views, mine, now);
                last_sync = now;
            }
            state_changed = fp != fingerprint;
            fingerprint = fp;
        }

        let actions = det.tick(now, &mut rng);
        for a in actions {
            match a {
                Action::Ping { to, seq, .. } => {
                    nonces.clear();
                    metrics::counter!(PROBES, "pool" => ctx.pool, "kind" => "direct").increment(1);
                    if let Some(b) = encode(Msg::Ping { seq }) {
                        ctx.plane.send_probe(to, b, seq);
                    }
                }
                Action::PingReq {
                    via, target, seq, ..
                } => {
                    let nonce: u64 = rng.random();
                    nonces.insert(seq, (target.clone(), nonce));
                    metrics::counter!(PROBES, "pool" => ctx.pool, "kind" => "indirect")
                        .increment(1);
                    if let Some(b) = encode(Msg::PingReq { seq, target, nonce }) {
                        ctx.plane.send_datagram(via, b);
                    }
                }
            }
        }
        // Relays that timed out: tell their origin (Lifeguard's nack).
        let expired: Vec<u32> = relays
            .iter()
            .filter(|(_, r)| now >= r.deadline)
            .map(|(s, _)| *s)
            .collect();
        for s in expired {
            if let Some(r) = relays.remove(&s) {
                if let Some(b) = encode(Msg::Nack { seq: r.origin_seq }) {
                    ctx.plane.send_datagram(r.origin, b);
                }
            }
        }

        // Publish what changed in our own state, and push it.
        if let Some(list) = det.take_accusations() {
            metrics::counter!(SUSPICIONS, "pool" => ctx.pool).increment(list.len() as u64);
            let payload = if list.is_empty() {
                String::new()
            } else {
                keys::encode_accusations(&list).unwrap_or_default()
            };
            debug!(pool = ctx.pool, accused = list.len(), "accusations changed");
            crate::pool::change_own(&ctx.chitchat, &ctx.signing, Some(&ctx.plane), |st, s| {
                s.put(st, ACCUSE_KEY, &payload)
            })
            .await;
        }
        if det.take_refute() {
            info!(
                pool = ctx.pool,
                "accused of being dead; refuting with a higher signed incarnation"
            );
            crate::pool::change_own(&ctx.chitchat, &ctx.signing, Some(&ctx.plane), |st, s| {
                let n = incarnation(st);
                s.put(st, ALIVE_KEY, &n.saturating_add(1).to_string());
            })
            .await;
        }
        metrics::gauge!(LOCAL_HEALTH, "pool" => ctx.pool).set(det.local_health() as f64);
        if det.pauses() > pauses_logged {
            pauses_logged = det.pauses();
            metrics::counter!(PAUSES, "pool" => ctx.pool).increment(1);
            warn!(
                pool = ctx.pool,
                "this node was paused; suspicion timers restarted and probes widened"
            );
        }
        for (id, accusers) in det.take_died() {
            info!(pool = ctx.pool, member = %id, ?accusers, "member declared dead: accused and not refuted in time");
        }
        for addr in det.take_revived() {
            info!(pool = ctx.pool, %addr, "a member held dead answered a probe; exchanging state with it");
            ctx.plane.exchange_with(addr);
        }
        let verdicts_changed = det.take_verdicts_changed();
        if verdicts_changed {
            publish_verdicts(&ctx, &det);
        }
        if verdicts_changed || state_changed {
            ctx.changed.send_modify(|n| *n += 1);
        }
    }
}

fn publish_verdicts(ctx: &ProbeCtx, det: &Detector) {
    let (alive, suspect, dead) = det.counts();
    debug!(pool = ctx.pool, alive, suspect, dead, "verdicts changed");
    ctx.plane.set_peers(det.live_addrs());
    let mut map = ctx.verdicts.dead.write().unwrap_or_else(|e| e.into_inner());
    map.clear();
    for (id, generation, health) in det.members() {
        map.insert(
            id.to_string(),
            (generation, matches!(health, Health::Dead { .. })),
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn handle(
    ctx: &ProbeCtx,
    det: &mut Detector,
    d: Datagram,
    now: Duration,
    nonces: &mut HashMap<u32, (String, u64)>,
    relays: &mut HashMap<u32, Relay>,
    relay_seq: &mut u32,
    signed_this_second: &mut (u64, u32),
    me: &str,
    my_gen: u64,
) {
    let Some(msg) = decode(&d.bytes) else {
        metrics::counter!(crate::metrics::DROPPED, "reason" => "malformed_probe").increment(1);
        return;
    };
    let reply = |m: Msg| {
        if let Some(b) = encode(m) {
            ctx.plane.send_datagram(d.from, b);
        }
    };
    match msg {
        // The QUIC ACK answers it.
        Msg::Ping { .. } => {}
        Msg::Ack { seq } => {
            // Only the transport makes these (a datagram claiming to be one
            // is a peer's own word for its liveness, which is as good as
            // the ACK that carried it): on the connection of `from_id`.
            if let Some(sent) = det.direct_probe_sent(&d.from_id, seq) {
                metrics::histogram!(PROBE_RTT, "pool" => ctx.pool)
                    .record(now.saturating_sub(sent).as_secs_f64());
            }
            det.on_ack(&d.from_id, seq);
        }
        Msg::PingReq { seq, target, nonce } => {
            let Some((addr, _)) = det.probe_addr(&target) else {
                reply(Msg::Nack { seq });
                return;
            };
            if relays.len() >= MAX_RELAYS || target == d.from_id {
                return;
            }
            *relay_seq = relay_seq.wrapping_add(1);
            relays.insert(
                *relay_seq,
                Relay {
                    origin: d.from,
                    origin_seq: seq,
                    target,
                    deadline: now + ctx.swim.probe_timeout.mul_f64(0.8),
                },
            );
            if let Some(b) = encode(Msg::IndirectPing {
                seq: *relay_seq,
                origin: d.from_id.clone(),
                nonce,
            }) {
                ctx.plane.send_datagram(addr, b);
            }
        }
        Msg::IndirectPing { seq, origin, nonce } => {
            let second = now.as_secs();
            if signed_this_second.0 != second {
                *signed_this_second = (second, 0);
            }
            if signed_this_second.1 >= MAX_SIGNATURES_PER_S {
                return;
            }
            signed_this_second.1 += 1;
            let input = signed::probe_input(&ctx.signing.pool, me, my_gen, &origin, nonce);
            if let Ok(sig) = ctx.signing.signer.sign(&input) {
                reply(Msg::IndirectAck { seq, sig });
            }
        }
        Msg::IndirectAck { seq, sig } => {
            // Only the target we pinged may answer our relay.
            if relays.get(&seq).is_some_and(|r| r.target == d.from_id) {
                if let Some(r) = relays.remove(&seq) {
                    if let Some(b) = encode(Msg::Relayed {
                        seq: r.origin_seq,
                        target: r.target,
                        sig,
                    }) {
                        ctx.plane.send_datagram(r.origin, b);
                    }
                }
            }
        }
        Msg::Relayed { seq, target, sig } => {
            let Some((t, nonce)) = nonces.get(&seq) else {
                return;
            };
            if *t != target {
                return;
            }
            let Some((generation, pk)) = ctx.guard.public_key(&target) else {
                return;
            };
            if det.health(&target, generation).is_none() {
                return;
            }
            let input = signed::probe_input(&ctx.signing.pool, &target, generation, me, *nonce);
            if verify_node_signature(&pk, &input, &sig) {
                det.on_ack(&target, seq);
            } else {
                metrics::counter!(crate::metrics::DROPPED, "reason" => "bad_probe_signature")
                    .increment(1);
            }
        }
        Msg::Nack { seq } => det.on_nack(seq),
    }
}

/// Whether this node's state is behind what it knows exists: a node known
/// only from a digest (no values yet), or one whose values the gate
/// admitted beyond what chitchat holds (a push chitchat refused because an
/// earlier change is missing). The next full exchange fills either gap, so
/// the prober hurries it.
fn lags(cc: &Chitchat, me: &str, guard: &Guard) -> bool {
    // Heartbeats of a node known only from digests keep it live for
    // chitchat; one that died before we got its values does not count.
    let live: std::collections::HashSet<&ChitchatId> = cc.live_nodes().collect();
    cc.node_states().iter().any(|(id, st)| {
        &*id.node_id != me
            && ((st.max_version() == 0 && live.contains(id))
                || guard
                    .max_seen(&id.node_id)
                    .is_some_and(|(g, seen)| g == id.generation_id && seen > st.max_version()))
    })
}

/// Cheap: changes whenever a node's state version, generation or the
/// member count changes.
fn state_fingerprint(cc: &Chitchat) -> u64 {
    let mut fp = cc.node_states().len() as u64;
    for (id, st) in cc.node_states() {
        fp = fp
            .wrapping_mul(31)
            .wrapping_add(st.max_version() ^ id.generation_id);
    }
    fp
}

/// The newest generation of every node, as the detector sees members.
fn member_views(cc: &Chitchat, me: &str) -> (Vec<MemberView>, Own) {
    let mut newest: HashMap<&str, (&ChitchatId, &NodeState)> = HashMap::new();
    let mut mine = Own::default();
    for (id, st) in cc.node_states() {
        if &*id.node_id == me {
            if *id == *cc.self_chitchat_id() {
                mine = Own {
                    incarnation: incarnation(st),
                    state_version: st.max_version(),
                };
            }
            continue;
        }
        match newest.get(&*id.node_id) {
            Some((old, _)) if old.generation_id >= id.generation_id => {}
            _ => {
                newest.insert(&*id.node_id, (id, st));
            }
        }
    }
    let accusations = |st: &NodeState, key: &str| {
        st.get(key)
            .and_then(signed::payload)
            .filter(|p| !p.is_empty())
            .and_then(|p| keys::decode_accusations(p).ok())
            .unwrap_or_default()
    };
    let views = newest
        .into_values()
        // Only members that answer probes (see `ALIVE_KEY`).
        .filter(|(_, st)| st.get(ALIVE_KEY).is_some())
        .map(|(id, st)| MemberView {
            id: id.node_id.to_string(),
            generation: id.generation_id,
            addr: id.gossip_advertise_addr,
            incarnation: incarnation(st),
            state_version: st.max_version(),
            accuses: accusations(st, ACCUSE_KEY),
            legacy_accuses: accusations(st, SUSPECT_KEY),
            leaving: st
                .get(LEAVING_KEY)
                .and_then(signed::payload)
                .is_some_and(|p| p == "1"),
        })
        .collect();
    (views, mine)
}

/// A member's incarnation: its signed `alive` counter (0 when unreadable).
fn incarnation(st: &NodeState) -> u64 {
    st.get(ALIVE_KEY)
        .and_then(signed::payload)
        .and_then(|p| p.parse::<u64>().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_messages_round_trip_small_and_reject_garbage() {
        for m in [
            Msg::Ping { seq: 7 },
            Msg::Ack { seq: u32::MAX },
            Msg::PingReq {
                seq: 1,
                target: "spiffe://m/cluster/c/node/n".into(),
                nonce: 9,
            },
            Msg::Relayed {
                seq: 1,
                target: "t".into(),
                sig: vec![1; 64],
            },
            Msg::Nack { seq: 3 },
        ] {
            let b = encode(m.clone()).unwrap();
            assert_eq!(decode(&b), Some(m));
        }
        assert!(encode(Msg::Ping { seq: 300 }).unwrap().len() <= 5);
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&[9, 9, 9]), None);
        let mut b = encode(Msg::Nack { seq: 3 }).unwrap();
        b.push(0);
        assert_eq!(decode(&b), None, "trailing bytes");
    }
}
