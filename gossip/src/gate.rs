//! The gatekeeper: every gossip message is decoded with meshnode's own codec
//! ([`crate::wire`]) and checked here before chitchat sees it.
//!
//! Sans-IO: [`Gate::admit`] takes a decoded message and the time, and returns
//! what may pass plus what was dropped and why. What it removes:
//!
//! - node deltas about the receiving node itself (any generation);
//! - node deltas whose node id is not a SPIFFE identity of this mesh (and, in
//!   a LAN pool, of this cluster);
//! - node deltas whose metadata chitchat would trust blindly: a
//!   `last_gc_version`, a `SetMaxVersion`, a deletion status (meshnode never
//!   deletes: tombstones are signed empty values), an empty delta, a version
//!   at or below `from_version_excluded`;
//! - a new (node, generation) unless the delta starts from version 0 and
//!   carries the node's certificate (`cert`), which must chain to the mesh CA,
//!   name exactly that node id, be unexpired and unrevoked (WAN pool: a
//!   gateway certificate); older generations than the one verified;
//! - every value whose signature by that certificate's key, over pool, node
//!   id, generation, key, version and payload, fails; one bad value drops the
//!   node's whole delta (chitchat assumes a delta holds every version in its
//!   range, so a hole would be silently lost);
//! - claims the certificate does not back: `node` with another cluster or a
//!   gateway flag without a gateway certificate, `wan:` summaries from a
//!   non-gateway, `role:ca` without the CA key's signature, unknown roles;
//! - digest entries of nodes (or generations) not verified;
//! - whole messages naming more nodes than [`Limits::max_nodes`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use meshnode_transport::pki::sign::{public_key, verify_node_signature};
use meshnode_transport::{Identity, PeerCert};

use crate::federation::REMOTE_PREFIX;
use crate::keys::{self, CA_ROLE_KEY, NODE_KEY, ROLE_PREFIX};
use crate::quic::PoolKind;
use crate::signed::{self, CERT_KEY};
use crate::wire::{Limits, Message, NodeDelta, NodeDigest, NodeId, Status};

/// Keys one node may publish in a pool (services, roles, revocations, summaries).
pub const MAX_KEYS_PER_NODE: usize = 2_048;
/// A key longer than this is refused (keys are `svc:<name>:<port>` and alike).
const MAX_KEY_LEN: usize = 256;
/// A value (payload and signature) longer than this is refused: chitchat
/// cannot send a node's state past one value of ~65 KB.
const MAX_VALUE_LEN: usize = keys::MAX_VALUE_LEN + 128;
/// A node may start a new generation at most this often, so one insider
/// cannot fill every peer with generations of itself.
const GENERATION_CHURN: Duration = Duration::from_secs(1);
/// Verified nodes nobody has mentioned for this long are forgotten (chitchat
/// forgets dead nodes after 15 minutes).
const FORGET_AFTER: Duration = Duration::from_secs(20 * 60);

/// What the gate trusts: the mesh CA, the revocations in force.
pub trait Authority: Send + Sync {
    /// Chain to the mesh CA, validity, mesh and revocation of a node certificate (DER).
    fn verify_cert(&self, der: &[u8]) -> Result<PeerCert, String>;
    /// Whether a certificate verified earlier is still good (expiry, revocation).
    fn still_valid(&self, cert: &PeerCert, unix_now: i64) -> bool;
    /// Whether `sig` is the CA key's signature of `msg`.
    fn verify_ca(&self, msg: &[u8], sig: &[u8]) -> bool;
}

impl Authority for meshnode_transport::tls::TlsMaterial {
    fn verify_cert(&self, der: &[u8]) -> Result<PeerCert, String> {
        self.verify_peer(der).map_err(|e| e.to_string())
    }

    fn still_valid(&self, cert: &PeerCert, unix_now: i64) -> bool {
        cert.not_after > unix_now && !self.revocations().is_revoked(cert)
    }

    fn verify_ca(&self, msg: &[u8], sig: &[u8]) -> bool {
        self.ca_certs()
            .iter()
            .any(|ca| meshnode_transport::pki::sign::verify_ca_signature(ca, msg, sig).is_ok())
    }
}

/// One thing the gate removed, for the `reason` label and the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dropped {
    pub reason: &'static str,
    pub node: String,
}

#[derive(Debug, Default)]
pub struct Verdict {
    /// What may reach chitchat (`None`: nothing of the message).
    pub message: Option<Message>,
    pub dropped: Vec<Dropped>,
    /// The admitted node deltas that carried versions this gate had not
    /// seen before (SYN-ACK and ACK only): what a receiver passes on.
    pub fresh: Vec<NodeDelta>,
}

struct Known {
    generation: u64,
    cert: PeerCert,
    public_key: Vec<u8>,
    keys: HashSet<String>,
    since: Duration,
    last_seen: Duration,
    /// The highest version admitted for this generation: a delta that goes
    /// beyond it is news, which the transport passes on.
    max_seen: u64,
    /// What this member adds to chitchat's digest ([`crate::wire::digest_entry_len`]).
    digest_len: usize,
}

pub struct Gate {
    /// chitchat's `cluster_id`: every signature covers it.
    pool: String,
    kind: PoolKind,
    mesh: String,
    /// Our own node id and generation.
    me: String,
    my_generation: u64,
    authority: Arc<dyn Authority>,
    limits: Limits,
    nodes: HashMap<String, Known>,
    last_prune: Duration,
    /// Whether `admit` returns the news (`Verdict::fresh`): only a pool
    /// that pushes needs it, and it copies every admitted delta.
    collect_fresh: bool,
    /// Node ids (with the generation) this gate refused for what their
    /// certificate is (revoked, expired, not of the CA) or because the pool
    /// is full: [`Gate::synced`] does not wait for them. Capped.
    refused: HashMap<String, u64>,
    /// Whether this node has held, at least once, every version a peer's
    /// digest listed: a full state exchange completed.
    synced: bool,
}

/// Most refused node ids remembered for [`Gate::synced`].
const MAX_REFUSED: usize = 4_096;

impl Gate {
    pub fn new(
        pool: String,
        kind: PoolKind,
        me: &Identity,
        my_generation: u64,
        authority: Arc<dyn Authority>,
        limits: Limits,
    ) -> Self {
        Self {
            pool,
            kind,
            mesh: me.mesh().to_string(),
            me: me.uri(),
            my_generation,
            authority,
            limits,
            nodes: HashMap::new(),
            last_prune: Duration::ZERO,
            collect_fresh: true,
            refused: HashMap::new(),
            synced: false,
        }
    }

    /// chitchat's digest of the pool as admitted so far, in bytes: every
    /// member's entry, ours (an IPv6 address at worst), the count.
    pub fn digest_len(&self) -> usize {
        let me = crate::wire::digest_entry_len(
            &self.me,
            &std::net::SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), 0),
        );
        2 + me + self.nodes.values().map(|k| k.digest_len).sum::<usize>()
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether a full state exchange has completed: once a SYN or SYN-ACK
    /// came whose digest this gate had admitted every version of (after the
    /// SYN-ACK's own delta), for every node of the pool it lists other than
    /// ones refused for their certificate. Never resets.
    pub fn synced(&self) -> bool {
        self.synced
    }

    fn covers(&self, digest: &[(NodeId, NodeDigest)]) -> bool {
        digest.iter().all(|(id, d)| {
            if id.node_id == self.me || !self.in_pool(&id.node_id) {
                return true;
            }
            if self
                .refused
                .get(&id.node_id)
                .is_some_and(|g| *g >= id.generation)
            {
                return true;
            }
            self.nodes.get(&id.node_id).is_some_and(|k| {
                k.generation > id.generation
                    || (k.generation == id.generation && k.max_seen >= d.max_version)
            })
        })
    }

    fn in_pool(&self, node_id: &str) -> bool {
        node_id.parse::<Identity>().is_ok_and(|identity| {
            identity.mesh() == self.mesh
                && match &self.kind {
                    PoolKind::Lan { cluster } => identity.cluster() == cluster,
                    PoolKind::Wan => true,
                }
        })
    }

    /// Verified nodes (other than this one).
    pub fn verified(&self) -> usize {
        self.nodes.len()
    }

    /// Checks a message. `now` is any monotonic clock, `unix_now` wall-clock seconds.
    pub fn admit(&mut self, msg: Message, now: Duration, unix_now: i64) -> Verdict {
        if now.saturating_sub(self.last_prune) > Duration::from_secs(60) {
            self.last_prune = now;
            self.nodes
                .retain(|_, k| now.saturating_sub(k.last_seen) < FORGET_AFTER);
        }
        let mut dropped = Vec::new();
        let mut fresh = Vec::new();
        let message = match msg {
            Message::Syn { cluster_id, digest } => {
                self.synced = self.synced || self.covers(&digest);
                Message::Syn {
                    cluster_id,
                    digest: self.filter_digest(digest, now, &mut dropped),
                }
            }
            // The delta first: a node it proves may then keep its digest
            // entry, which is what makes chitchat create the node and apply
            // the delta within this one message.
            Message::SynAck { digest, delta } => {
                let delta =
                    self.filter_delta(delta, now, unix_now, &mut dropped, &mut fresh, false);
                self.synced = self.synced || self.covers(&digest);
                Message::SynAck {
                    digest: self.filter_digest(digest, now, &mut dropped),
                    delta,
                }
            }
            Message::Ack { delta } => Message::Ack {
                delta: self.filter_delta(delta, now, unix_now, &mut dropped, &mut fresh, true),
            },
            Message::BadCluster => Message::BadCluster,
        };
        Verdict {
            message: Some(message),
            dropped,
            fresh,
        }
    }

    fn filter_digest(
        &mut self,
        digest: Vec<(NodeId, NodeDigest)>,
        now: Duration,
        dropped: &mut Vec<Dropped>,
    ) -> Vec<(NodeId, NodeDigest)> {
        let mut out = Vec::with_capacity(digest.len());
        for (id, d) in digest {
            let keep = if id.node_id == self.me {
                // Our own entry tells the peer's view of us; other
                // generations of ours are the past.
                id.generation == self.my_generation
            } else {
                match self.nodes.get_mut(&id.node_id) {
                    Some(k) if k.generation == id.generation => {
                        k.last_seen = now;
                        true
                    }
                    _ => false,
                }
            };
            if keep {
                out.push((id, d));
            } else {
                dropped.push(Dropped {
                    reason: "unverified_digest",
                    node: id.node_id,
                });
            }
        }
        out
    }

    fn filter_delta(
        &mut self,
        delta: Vec<NodeDelta>,
        now: Duration,
        unix_now: i64,
        dropped: &mut Vec<Dropped>,
        fresh: &mut Vec<NodeDelta>,
        skip_seen: bool,
    ) -> Vec<NodeDelta> {
        let mut out = Vec::with_capacity(delta.len());
        for nd in delta {
            match self.check(&nd, now, unix_now, skip_seen) {
                Ok(news) => {
                    if news && self.collect_fresh {
                        fresh.push(nd.clone());
                    }
                    out.push(nd)
                }
                Err(reason) => {
                    if matches!(reason, "bad_cert" | "expired_or_revoked" | "pool_full")
                        && (self.refused.len() < MAX_REFUSED
                            || self.refused.contains_key(&nd.id.node_id))
                    {
                        let g = self.refused.entry(nd.id.node_id.clone()).or_insert(0);
                        *g = (*g).max(nd.id.generation);
                    }
                    dropped.push(Dropped {
                        reason,
                        node: nd.id.node_id,
                    })
                }
            }
        }
        out
    }

    /// Whether every version of `nd` was admitted before (same generation).
    fn seen_before(&self, nd: &NodeDelta) -> bool {
        self.nodes.get(nd.id.node_id.as_str()).is_some_and(|k| {
            k.generation == nd.id.generation && nd.max_version() <= k.max_seen && k.max_seen > 0
        })
    }

    /// The generation this gate verified for `node_id` and the highest
    /// version it admitted for it (chitchat may lag behind: it refuses a
    /// delta that starts above what it has).
    pub fn max_seen(&self, node_id: &str) -> Option<(u64, u64)> {
        self.nodes.get(node_id).map(|k| (k.generation, k.max_seen))
    }

    /// The public key and generation this gate verified for `node_id`.
    pub fn public_key(&self, node_id: &str) -> Option<(u64, Vec<u8>)> {
        self.nodes
            .get(node_id)
            .map(|k| (k.generation, k.public_key.clone()))
    }

    /// Checks one node's delta; on success records what it proved, and says
    /// whether the delta went beyond every version admitted before.
    ///
    /// With `skip_seen` (ACKs), a delta that brings nothing beyond what was
    /// admitted before is another copy of a push (a node hears each change
    /// from several peers; checking every copy's signatures cost more CPU
    /// than anything else a pool does): `Err("duplicate")` once its shape
    /// passed, before any signature is checked. SYN-ACKs (answers to our
    /// own SYNs) are always checked: they fill what chitchat refused from
    /// pushes that came too early.
    fn check(
        &mut self,
        nd: &NodeDelta,
        now: Duration,
        unix_now: i64,
        skip_seen: bool,
    ) -> Result<bool, &'static str> {
        let node_id = nd.id.node_id.as_str();
        if node_id == self.me {
            return Err("self");
        }
        let identity: Identity = node_id.parse().map_err(|_| "foreign_id")?;
        let in_pool = identity.mesh() == self.mesh
            && match &self.kind {
                PoolKind::Lan { cluster } => identity.cluster() == cluster,
                PoolKind::Wan => true,
            };
        if !in_pool {
            return Err("foreign_id");
        }
        if nd.last_gc_version != 0 || !nd.set_max_version.is_empty() || nd.key_values.is_empty() {
            return Err("inconsistent");
        }
        for kv in &nd.key_values {
            if kv.status != Status::Set || kv.version <= nd.from_version_excluded {
                return Err("inconsistent");
            }
            if kv.key.is_empty() || kv.key.len() > MAX_KEY_LEN || !kv.key.is_ascii() {
                return Err("bad_key");
            }
            if kv.value.len() > MAX_VALUE_LEN {
                return Err("oversized");
            }
        }

        let known = self.nodes.get(node_id);
        let new_generation = match known {
            Some(k) if nd.id.generation < k.generation => return Err("stale_generation"),
            Some(k) => nd.id.generation > k.generation,
            None => true,
        };
        if skip_seen && !new_generation && self.seen_before(nd) {
            return Err("duplicate");
        }
        if new_generation {
            // A new incarnation must prove itself in this very delta.
            if nd.from_version_excluded != 0 || !nd.key_values.iter().any(|kv| kv.key == CERT_KEY) {
                return Err("unverified");
            }
            if known.is_some_and(|k| now.saturating_sub(k.since) < GENERATION_CHURN) {
                return Err("generation_churn");
            }
            if known.is_none() && self.nodes.len() >= self.limits.max_nodes {
                return Err("pool_full");
            }
            if known.is_none()
                && self.digest_len() + crate::wire::digest_entry_len(node_id, &nd.id.addr)
                    > self.limits.max_digest
            {
                return Err("pool_full");
            }
        }

        // The key that signs: from a certificate in this delta, else the one verified before.
        let fresh_cert = match nd.key_values.iter().find(|kv| kv.key == CERT_KEY) {
            Some(kv) => {
                let (payload, _) = signed::open(&kv.value).ok_or("bad_signature")?;
                let der = signed::decode_cert(payload).ok_or("bad_cert")?;
                let cert = self.authority.verify_cert(&der).map_err(|_| "bad_cert")?;
                if cert.identity != identity || (self.kind == PoolKind::Wan && !cert.is_gateway()) {
                    return Err("bad_cert");
                }
                let pk = public_key(&der).map_err(|_| "bad_cert")?;
                Some((cert, pk))
            }
            None => None,
        };
        let (cert, pk) = match (&fresh_cert, known) {
            (Some((c, pk)), _) => (c, pk.as_slice()),
            (None, Some(k)) if !new_generation => (&k.cert, k.public_key.as_slice()),
            (None, _) => return Err("unverified"),
        };
        if !self.authority.still_valid(cert, unix_now) {
            return Err("expired_or_revoked");
        }

        for kv in &nd.key_values {
            let (payload, sig) = signed::open(&kv.value).ok_or("bad_signature")?;
            let input = signed::signing_input(
                &self.pool,
                node_id,
                nd.id.generation,
                &kv.key,
                kv.version,
                payload,
            );
            if !verify_node_signature(pk, &input, &sig) {
                return Err("bad_signature");
            }
            if !payload.is_empty() {
                self.check_claim(&identity, cert, node_id, &kv.key, payload)?;
            }
        }

        let prior_keys = match known {
            Some(k) if !new_generation => Some(&k.keys),
            _ => None,
        };
        let added = nd
            .key_values
            .iter()
            .filter(|kv| !prior_keys.is_some_and(|p| p.contains(&kv.key)))
            .count();
        if prior_keys.map_or(0, HashSet::len) + added > MAX_KEYS_PER_NODE {
            return Err("too_many_keys");
        }

        // Admitted: record what it proved.
        let fresh = fresh_cert.clone();
        let entry = if new_generation {
            let (cert, public_key) = fresh.ok_or("unverified")?;
            self.nodes.insert(
                node_id.to_string(),
                Known {
                    generation: nd.id.generation,
                    cert,
                    public_key,
                    keys: HashSet::new(),
                    since: now,
                    last_seen: now,
                    max_seen: 0,
                    digest_len: crate::wire::digest_entry_len(node_id, &nd.id.addr),
                },
            );
            self.nodes.get_mut(node_id)
        } else {
            let k = self.nodes.get_mut(node_id);
            if let (Some(k), Some((cert, public_key))) = (k, fresh) {
                k.cert = cert;
                k.public_key = public_key;
            }
            self.nodes.get_mut(node_id)
        };
        let mut news = false;
        if let Some(k) = entry {
            k.last_seen = now;
            k.keys.extend(nd.key_values.iter().map(|kv| kv.key.clone()));
            let max = nd.max_version();
            news = max > k.max_seen;
            k.max_seen = k.max_seen.max(max);
        }
        Ok(news)
    }

    /// Claims a value makes that only the certificate or the CA can back.
    fn check_claim(
        &self,
        identity: &Identity,
        cert: &PeerCert,
        node_id: &str,
        key: &str,
        payload: &str,
    ) -> Result<(), &'static str> {
        if key == NODE_KEY {
            let info = keys::decode_node(payload).map_err(|_| "bad_record")?;
            if info.cluster != identity.cluster() || (info.gateway && !cert.is_gateway()) {
                return Err("bad_role");
            }
        } else if key == CA_ROLE_KEY {
            let sig = signed::decode_ca_proof(payload).ok_or("bad_role")?;
            if !self
                .authority
                .verify_ca(&signed::ca_role_input(node_id), &sig)
            {
                return Err("bad_role");
            }
        } else if key == keys::CA_VIA_KEY {
            // A gateway fronting a CA node of its own cluster, proven by the CA.
            let via = keys::decode_ca_via(payload).map_err(|_| "bad_record")?;
            let ca: Identity = via.node.parse().map_err(|_| "bad_role")?;
            let sig = signed::decode_ca_proof(&via.proof).ok_or("bad_role")?;
            if !cert.is_gateway()
                || ca.mesh() != identity.mesh()
                || ca.cluster() != identity.cluster()
                || !self
                    .authority
                    .verify_ca(&signed::ca_role_input(&ca.uri()), &sig)
            {
                return Err("bad_role");
            }
        } else if key == keys::SUSPECT_KEY || key == keys::ACCUSE_KEY {
            keys::decode_accusations(payload).map_err(|_| "bad_record")?;
        } else if key.starts_with(ROLE_PREFIX)
            || (key.starts_with(REMOTE_PREFIX) && !cert.is_gateway())
        {
            // Unknown roles, and remote summaries from a non-gateway.
            return Err("bad_role");
        }
        Ok(())
    }
}

/// The gate's shell: shared by a pool's readers, it decodes with meshnode's
/// codec, checks, re-encodes, and only then lets chitchat parse the message.
/// Blocking (signature checks): call it off the runtime's I/O thread.
#[derive(Clone)]
pub struct Guard {
    gate: Arc<std::sync::Mutex<Gate>>,
    /// A copy of the gate's limits, so decoding runs outside the gate's lock.
    limits: Limits,
    start: std::time::Instant,
    pool: &'static str,
    logged: Arc<meshnode_transport::LogLimit>,
}

/// Drop reasons are logged at most this often each (they are all counted).
const LOG_EVERY: Duration = Duration::from_secs(10);

impl Guard {
    pub fn new(gate: Gate) -> Self {
        let pool = gate.kind.as_str();
        Self {
            limits: gate.limits,
            gate: Arc::new(std::sync::Mutex::new(gate)),
            start: meshnode_transport::clock::now(),
            pool,
            logged: Arc::new(meshnode_transport::LogLimit::new(LOG_EVERY)),
        }
    }

    /// Checks one serialized chitchat message from `from`; what passes comes
    /// back as chitchat's message, parsed from bytes meshnode wrote.
    pub fn filter_bytes(
        &self,
        bytes: &[u8],
        from: std::net::SocketAddr,
    ) -> Option<chitchat::ChitchatMessage> {
        let msg = self.decode(bytes, from)?;
        self.check(msg, from)
    }

    /// Decodes (and decompresses, within the limits) one serialized chitchat
    /// message; needs no gate state. Malformed input is counted and `None`.
    pub fn decode(&self, bytes: &[u8], from: std::net::SocketAddr) -> Option<Message> {
        match crate::wire::decode(bytes, &self.limits) {
            Ok(m) => Some(m),
            Err(e) => {
                let reason = match e {
                    crate::wire::WireError::TooManyNodes(_) => "too_many_nodes",
                    crate::wire::WireError::Bomb(_) => "oversized",
                    _ => "malformed",
                };
                self.count(reason, &from.to_string(), &e.to_string());
                None
            }
        }
    }

    /// Signature checks a message may need: its values. Each costs about
    /// 60-75 us (see `measure_cpu_per_verified_value`).
    pub fn work(msg: &Message) -> usize {
        match msg {
            Message::SynAck { delta, .. } | Message::Ack { delta } => {
                delta.iter().map(|nd| nd.key_values.len()).sum()
            }
            _ => 0,
        }
    }

    /// Runs a decoded message through the gate; what passes comes back as
    /// chitchat's message, parsed from bytes meshnode wrote.
    pub fn check(
        &self,
        msg: Message,
        from: std::net::SocketAddr,
    ) -> Option<chitchat::ChitchatMessage> {
        self.check_fresh(msg, from).map(|(m, _)| m)
    }

    /// [`Guard::check`], also returning the admitted node deltas that were news.
    pub fn check_fresh(
        &self,
        msg: Message,
        from: std::net::SocketAddr,
    ) -> Option<(chitchat::ChitchatMessage, Vec<NodeDelta>)> {
        use chitchat::Deserializable;
        let mut gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        let verdict = gate.admit(
            msg,
            meshnode_transport::clock::since(self.start),
            meshnode_transport::pki::unix_now(),
        );
        drop(gate);
        for d in &verdict.dropped {
            if d.reason == "duplicate" {
                // Not a refusal: another copy of a push already admitted.
                metrics::counter!(crate::metrics::DROPPED, "reason" => "duplicate").increment(1);
                continue;
            }
            self.count(d.reason, &d.node, &from.to_string());
        }
        let msg = verdict.message?;
        let bytes = crate::wire::encode(&msg, crate::wire::Blocks::Raw);
        match chitchat::ChitchatMessage::deserialize(&mut &bytes[..]) {
            Ok(m) => Some((m, verdict.fresh)),
            Err(e) => {
                // Cannot happen for bytes our encoder wrote; counted if it does.
                self.count("malformed", &from.to_string(), &e.to_string());
                None
            }
        }
    }

    /// [`Guard::filter_bytes`] for a message already in chitchat's types (an
    /// in-memory transport): freshly built messages serialize safely.
    pub fn filter_message(
        &self,
        msg: &chitchat::ChitchatMessage,
        from: std::net::SocketAddr,
    ) -> Option<chitchat::ChitchatMessage> {
        use chitchat::Serializable;
        // chitchat alone (no plane): nobody reads the news.
        self.gate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .collect_fresh = false;
        self.filter_bytes(&msg.serialize_to_vec(), from)
    }

    /// Whether `msg`, which came from `from`, carries a digest entry of the
    /// node at that address with a newer generation than the one verified:
    /// the sender restarted. (A member can only say this of itself: the
    /// entry's address is the connection's.)
    pub fn announces_restart(&self, msg: &Message, from: std::net::SocketAddr) -> bool {
        let digest = match msg {
            Message::Syn { digest, .. } | Message::SynAck { digest, .. } => digest,
            _ => return false,
        };
        let gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        digest.iter().any(|(id, _)| {
            id.addr == from
                && gate
                    .max_seen(&id.node_id)
                    .is_some_and(|(generation, _)| generation < id.generation)
        })
    }

    /// See [`Gate::synced`].
    pub fn synced(&self) -> bool {
        self.gate.lock().unwrap_or_else(|e| e.into_inner()).synced()
    }

    /// See [`Gate::max_seen`].
    pub fn max_seen(&self, node_id: &str) -> Option<(u64, u64)> {
        self.gate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .max_seen(node_id)
    }

    /// See [`Gate::public_key`].
    pub fn public_key(&self, node_id: &str) -> Option<(u64, Vec<u8>)> {
        self.gate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .public_key(node_id)
    }

    fn count(&self, reason: &'static str, node: &str, detail: &str) {
        metrics::counter!(crate::metrics::REFUSED, "pool" => self.pool, "reason" => reason)
            .increment(1);
        if self.logged.allow_for(reason) {
            tracing::warn!(pool = self.pool, reason, node, detail, "gossip refused (logged once per 10 s per reason; see meshnode_gossip_refused_total)");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use meshnode_transport::pki::sign::NodeSigner;
    use meshnode_transport::pki::{first_cert_der, Ca, Role};
    use meshnode_transport::tls::TlsMaterial;
    use proptest::prelude::*;

    use super::*;
    use crate::keys::{encode_node, NodeInfo};
    use crate::wire::KeyValue;

    const POOL: &str = "acme/east";
    const GEN: u64 = 100;

    struct Node {
        id: Identity,
        signer: NodeSigner,
        der: Vec<u8>,
    }

    struct Pki {
        ca: Ca,
        authority: Arc<dyn Authority>,
    }

    fn pki() -> Pki {
        let day = Duration::from_secs(86_400);
        let ca = Ca::generate("acme", day).unwrap();
        let any = ca.issue("east", "authority", Role::Node, day).unwrap();
        let tls = TlsMaterial::from_pem(ca.cert_pem(), &any.cert_pem, &any.key_pem).unwrap();
        Pki {
            ca,
            authority: Arc::new(tls),
        }
    }

    impl Pki {
        fn node(&self, cluster: &str, name: &str, role: Role) -> Node {
            let issued = self
                .ca
                .issue(cluster, name, role, Duration::from_secs(86_400))
                .unwrap();
            Node {
                id: issued.identity.clone(),
                signer: NodeSigner::from_pem(&issued.key_pem).unwrap(),
                der: first_cert_der(&issued.cert_pem).unwrap(),
            }
        }

        fn gate(&self, me: &Node) -> Gate {
            self.gate_with(me, Limits::default())
        }

        fn gate_with(&self, me: &Node, limits: Limits) -> Gate {
            Gate::new(
                POOL.into(),
                PoolKind::Lan {
                    cluster: "east".into(),
                },
                &me.id,
                1,
                self.authority.clone(),
                limits,
            )
        }
    }

    fn addr() -> SocketAddr {
        "127.0.0.1:9470".parse().unwrap()
    }

    fn info(cluster: &str, gateway: bool) -> String {
        encode_node(&NodeInfo {
            cluster: cluster.into(),
            advertise: addr(),
            gateway,
            version: "t".into(),
        })
        .unwrap()
    }

    /// A node's delta as chitchat would send it, each value signed by `by`.
    fn delta(
        of: &Node,
        by: &Node,
        generation: u64,
        from: u64,
        kvs: &[(&str, String)],
    ) -> NodeDelta {
        let node_id = of.id.uri();
        let key_values = kvs
            .iter()
            .enumerate()
            .map(|(i, (key, payload))| {
                let version = from + i as u64 + 1;
                let input =
                    signed::signing_input(POOL, &node_id, generation, key, version, payload);
                KeyValue {
                    key: key.to_string(),
                    value: signed::seal(payload, &by.signer.sign(&input).unwrap()),
                    version,
                    status: Status::Set,
                }
            })
            .collect();
        NodeDelta {
            id: NodeId {
                node_id,
                generation,
                addr: addr(),
            },
            last_gc_version: 0,
            from_version_excluded: from,
            key_values,
            set_max_version: vec![],
        }
    }

    fn full(n: &Node, extra: &[(&str, String)]) -> NodeDelta {
        let mut kvs = vec![
            (CERT_KEY, signed::encode_cert(&n.der)),
            (NODE_KEY, info(n.id.cluster(), false)),
        ];
        kvs.extend(extra.iter().cloned());
        delta(n, n, GEN, 0, &kvs)
    }

    fn reasons(gate: &mut Gate, delta: Vec<NodeDelta>) -> (usize, Vec<&'static str>) {
        reasons_at(gate, delta, 10)
    }

    fn reasons_at(gate: &mut Gate, delta: Vec<NodeDelta>, secs: u64) -> (usize, Vec<&'static str>) {
        let v = gate.admit(
            Message::Ack { delta },
            Duration::from_secs(secs),
            meshnode_transport::pki::unix_now(),
        );
        let Some(Message::Ack { delta }) = v.message else {
            panic!("not an ack")
        };
        (delta.len(), v.dropped.iter().map(|d| d.reason).collect())
    }

    fn entry(n: &Node, generation: u64, max_version: u64) -> (NodeId, NodeDigest) {
        (
            NodeId {
                node_id: n.id.uri(),
                generation,
                addr: addr(),
            },
            NodeDigest {
                heartbeat: 1,
                last_gc_version: 0,
                max_version,
            },
        )
    }

    #[test]
    fn a_digest_entry_of_the_sender_with_a_newer_generation_announces_a_restart() {
        let p = pki();
        let me = p.node("east", "me", Role::Node);
        let a = p.node("east", "a", Role::Node);
        let guard = Guard::new(p.gate(&me));
        assert!(guard
            .check(
                Message::Ack {
                    delta: vec![full(&a, &[])]
                },
                addr()
            )
            .is_some());
        let syn = |generation| Message::Syn {
            cluster_id: POOL.into(),
            digest: vec![entry(&a, generation, 1)],
        };
        assert!(
            !guard.announces_restart(&syn(GEN), addr()),
            "same generation"
        );
        assert!(guard.announces_restart(&syn(GEN + 1), addr()));
        let elsewhere: SocketAddr = "127.0.0.2:9470".parse().unwrap();
        assert!(
            !guard.announces_restart(&syn(GEN + 1), elsewhere),
            "only the sender speaks for its own address"
        );
    }

    #[test]
    fn synced_only_once_a_digest_is_covered_after_its_syn_acks_delta() {
        let p = pki();
        let me = p.node("east", "me", Role::Node);
        let a = p.node("east", "a", Role::Node);
        let b = p.node("east", "b", Role::Node);
        let mut gate = p.gate(&me);
        let syn = |digest| Message::Syn {
            cluster_id: POOL.into(),
            digest,
        };
        let now = meshnode_transport::pki::unix_now();
        // A SYN listing a and b, of which we hold nothing: not synced.
        let digest = vec![entry(&a, GEN, 2), entry(&b, GEN, 2), entry(&me, 1, 5)];
        gate.admit(syn(digest.clone()), Duration::from_secs(1), now);
        assert!(!gate.synced());
        // A SYN-ACK that brings a only: still not.
        gate.admit(
            Message::SynAck {
                digest: digest.clone(),
                delta: vec![full(&a, &[])],
            },
            Duration::from_secs(2),
            now,
        );
        assert!(!gate.synced());
        // One that brings b too, within the same message as its digest: synced.
        gate.admit(
            Message::SynAck {
                digest,
                delta: vec![full(&b, &[])],
            },
            Duration::from_secs(3),
            now,
        );
        assert!(gate.synced());
    }

    #[test]
    fn a_node_refused_for_its_certificate_does_not_hold_back_synced() {
        let p = pki();
        let me = p.node("east", "me", Role::Node);
        let a = p.node("east", "a", Role::Node);
        let rogue = Pki {
            ca: Ca::generate("acme", Duration::from_secs(3600)).unwrap(),
            authority: p.authority.clone(),
        };
        let bad = rogue.node("east", "bad", Role::Node);
        let mut gate = p.gate(&me);
        let now = meshnode_transport::pki::unix_now();
        gate.admit(
            Message::SynAck {
                digest: vec![entry(&a, GEN, 2), entry(&bad, GEN, 2)],
                delta: vec![full(&a, &[]), full(&bad, &[])],
            },
            Duration::from_secs(1),
            now,
        );
        assert!(
            gate.synced(),
            "the rogue node's entry cannot be covered, and need not be"
        );
    }

    fn digest_of(gate: &mut Gate, ids: &[(&Node, u64)]) -> usize {
        let digest = ids
            .iter()
            .map(|(n, g)| {
                (
                    NodeId {
                        node_id: n.id.uri(),
                        generation: *g,
                        addr: addr(),
                    },
                    NodeDigest::default(),
                )
            })
            .collect();
        let v = gate.admit(
            Message::Syn {
                cluster_id: POOL.into(),
                digest,
            },
            Duration::from_secs(10),
            0,
        );
        match v.message {
            Some(Message::Syn { digest, .. }) => digest.len(),
            _ => panic!("not a syn"),
        }
    }

    #[test]
    fn a_signed_node_with_its_certificate_is_admitted_then_its_digest_entry() {
        let p = pki();
        let (me, a) = (
            p.node("east", "me", Role::Node),
            p.node("east", "a", Role::Node),
        );
        let mut gate = p.gate(&me);
        assert_eq!(
            digest_of(&mut gate, &[(&a, GEN)]),
            0,
            "unverified digest entry"
        );
        let svc = ("svc:api:80", "c3Zj".to_string());
        assert_eq!(reasons(&mut gate, vec![full(&a, &[svc])]), (1, vec![]));
        assert_eq!(digest_of(&mut gate, &[(&a, GEN)]), 1);
        assert_eq!(
            digest_of(&mut gate, &[(&a, GEN + 1)]),
            0,
            "other generation"
        );
        // Later values of the same generation verify against the known certificate.
        let later = delta(&a, &a, GEN, 3, &[("svc:api:80", String::new())]);
        assert_eq!(reasons(&mut gate, vec![later]), (1, vec![]));
    }

    /// chitchat 0.11 crashes its task when its own digest nears 65.4 KB:
    /// past the budget no new member is admitted, known ones still are.
    #[test]
    fn no_new_member_past_the_digest_budget() {
        let p = pki();
        let (me, a, b) = (
            p.node("east", "me", Role::Node),
            p.node("east", "a", Role::Node),
            p.node("east", "b", Role::Node),
        );
        let probe = p.gate(&me);
        let room = probe.digest_len() + crate::wire::digest_entry_len(&a.id.uri(), &addr());
        let mut gate = p.gate_with(
            &me,
            Limits {
                max_digest: room,
                ..Limits::default()
            },
        );
        assert_eq!(reasons(&mut gate, vec![full(&a, &[])]), (1, vec![]));
        assert_eq!(gate.digest_len(), room);
        assert_eq!(reasons(&mut gate, vec![full(&b, &[])]).1, vec!["pool_full"]);
        // a's next change still passes.
        let next = delta(&a, &a, GEN, 2, &[(NODE_KEY, info("east", false))]);
        assert_eq!(reasons(&mut gate, vec![next]), (1, vec![]));
        // The default budget keeps chitchat's assertion (65,507 - 1 - digest
        // >= 100) with over 15 KB left for old generations it still keeps.
        const { assert!(crate::wire::DIGEST_BUDGET + 15_000 < 65_406) };
    }

    #[test]
    fn another_members_values_cannot_be_forged() {
        let p = pki();
        let (me, a, m) = (
            p.node("east", "me", Role::Node),
            p.node("east", "a", Role::Node),
            p.node("east", "mallory", Role::Node),
        );
        let mut gate = p.gate(&me);
        assert_eq!(reasons(&mut gate, vec![full(&a, &[])]), (1, vec![]));
        // `leaving` under a's id, signed by mallory.
        let forged = delta(&a, &m, GEN, 2, &[(keys::LEAVING_KEY, "1".into())]);
        assert_eq!(reasons(&mut gate, vec![forged]).1, vec!["bad_signature"]);
        // A higher generation of a without a certificate, or with mallory's.
        let shadow = delta(&a, &m, GEN + 1, 0, &[(NODE_KEY, info("east", false))]);
        assert_eq!(reasons(&mut gate, vec![shadow]).1, vec!["unverified"]);
        let with_cert = delta(
            &a,
            &m,
            GEN + 1,
            0,
            &[(CERT_KEY, signed::encode_cert(&m.der))],
        );
        assert_eq!(
            reasons_at(&mut gate, vec![with_cert], 20).1,
            vec!["bad_cert"]
        );
        // Phantoms: ids with no certificate at all.
        let phantom = Node {
            id: Identity::new("acme", "east", "ghost").unwrap(),
            signer: NodeSigner::from_pem(
                &meshnode_transport::pki::join::NodeKey::generate()
                    .unwrap()
                    .pem(),
            )
            .unwrap(),
            der: m.der.clone(),
        };
        assert_eq!(
            reasons(&mut gate, vec![full(&phantom, &[])]).1,
            vec!["bad_cert"]
        );
        // About the receiver itself, even correctly signed by it.
        assert_eq!(reasons(&mut gate, vec![full(&me, &[])]).1, vec!["self"]);
        // Another cluster's node in this LAN pool.
        let west = p.node("west", "w", Role::Node);
        assert_eq!(
            reasons(&mut gate, vec![full(&west, &[])]).1,
            vec!["foreign_id"]
        );
    }

    #[test]
    fn metadata_chitchat_would_trust_blindly_drops_the_node() {
        let p = pki();
        let (me, a) = (
            p.node("east", "me", Role::Node),
            p.node("east", "a", Role::Node),
        );
        let mut gate = p.gate(&me);
        let mut low_max = full(&a, &[]);
        low_max.set_max_version = vec![(2, 1)];
        let mut gc = full(&a, &[]);
        gc.last_gc_version = 5;
        let mut deleted = full(&a, &[]);
        deleted.key_values[1].status = Status::Delete;
        let mut bare = full(&a, &[]);
        bare.key_values.clear();
        bare.set_max_version = vec![(0, 9)];
        for d in [low_max, gc, deleted, bare] {
            assert_eq!(reasons(&mut gate, vec![d]).1, vec!["inconsistent"]);
        }
    }

    #[test]
    fn roles_come_only_from_certificates_and_the_ca() {
        let p = pki();
        let me = p.node("east", "me", Role::Node);
        let plain = p.node("east", "plain", Role::Node);
        let gw = p.node("east", "gw", Role::Gateway);
        let mut gate = p.gate(&me);
        let claims_gw = delta(
            &plain,
            &plain,
            GEN,
            0,
            &[
                (CERT_KEY, signed::encode_cert(&plain.der)),
                (NODE_KEY, info("east", true)),
            ],
        );
        assert_eq!(reasons(&mut gate, vec![claims_gw]).1, vec!["bad_role"]);
        let summary = full(&plain, &[("wan:west:api", "eA".into())]);
        assert_eq!(reasons(&mut gate, vec![summary]).1, vec!["bad_role"]);
        let other_cluster = delta(
            &plain,
            &plain,
            GEN,
            0,
            &[
                (CERT_KEY, signed::encode_cert(&plain.der)),
                (NODE_KEY, info("west", false)),
            ],
        );
        assert_eq!(reasons(&mut gate, vec![other_cluster]).1, vec!["bad_role"]);
        let fake_ca = full(&plain, &[(CA_ROLE_KEY, signed::encode_ca_proof(&[1; 70]))]);
        assert_eq!(reasons(&mut gate, vec![fake_ca]).1, vec!["bad_role"]);
        // A proof for another node does not transfer.
        let other_proof =
            signed::encode_ca_proof(&p.ca.sign(&signed::ca_role_input(&gw.id.uri())).unwrap());
        let stolen = full(&plain, &[(CA_ROLE_KEY, other_proof)]);
        assert_eq!(reasons(&mut gate, vec![stolen]).1, vec!["bad_role"]);
        let proof =
            signed::encode_ca_proof(&p.ca.sign(&signed::ca_role_input(&plain.id.uri())).unwrap());
        assert_eq!(
            reasons(&mut gate, vec![full(&plain, &[(CA_ROLE_KEY, proof)])]),
            (1, vec![])
        );
        let gw_delta = delta(
            &gw,
            &gw,
            GEN,
            0,
            &[
                (CERT_KEY, signed::encode_cert(&gw.der)),
                (NODE_KEY, info("east", true)),
                ("wan:west:api", "eA".into()),
            ],
        );
        assert_eq!(reasons(&mut gate, vec![gw_delta]), (1, vec![]));
    }

    #[test]
    fn only_a_gateway_fronts_a_ca_node_and_only_one_of_its_own_cluster() {
        let p = pki();
        let me = p.node("east", "me", Role::Node);
        let plain = p.node("east", "plain", Role::Node);
        let gw = p.node("east", "gw", Role::Gateway);
        let mut gate = p.gate(&me);
        let via = |node: &str, sig: Vec<u8>| {
            keys::encode_ca_via(&keys::CaVia {
                node: node.to_string(),
                proof: signed::encode_ca_proof(&sig),
            })
            .unwrap()
        };
        let sign = |uri: &str| p.ca.sign(&signed::ca_role_input(uri)).unwrap();
        let ca_east = Identity::new("acme", "east", "ca-1").unwrap().uri();
        let ca_west = Identity::new("acme", "west", "ca-1").unwrap().uri();
        let cases = [
            (&plain, via(&ca_east, sign(&ca_east)), "bad_role"),
            (&gw, via(&ca_west, sign(&ca_west)), "bad_role"),
            (&gw, via(&ca_east, sign(&ca_west)), "bad_role"),
            (&gw, via(&ca_east, vec![1; 70]), "bad_role"),
            (&gw, "not a record".to_string(), "bad_record"),
        ];
        for (who, value, reason) in cases {
            let d = full(who, &[(keys::CA_VIA_KEY, value)]);
            assert_eq!(reasons(&mut gate, vec![d]).1, vec![reason]);
        }
        let good = full(&gw, &[(keys::CA_VIA_KEY, via(&ca_east, sign(&ca_east)))]);
        assert_eq!(reasons(&mut gate, vec![good]), (1, vec![]));
    }

    #[test]
    fn generations_only_move_forward_and_not_too_fast() {
        let p = pki();
        let (me, a) = (
            p.node("east", "me", Role::Node),
            p.node("east", "a", Role::Node),
        );
        let mut gate = p.gate(&me);
        assert_eq!(reasons(&mut gate, vec![full(&a, &[])]), (1, vec![]));
        let mut older = full(&a, &[]);
        older.id.generation = GEN - 1;
        assert_eq!(reasons(&mut gate, vec![older]).1, vec!["stale_generation"]);
        // Same clock instant as the first: churn.
        let next = delta(
            &a,
            &a,
            GEN + 1,
            0,
            &[(CERT_KEY, signed::encode_cert(&a.der))],
        );
        assert_eq!(
            reasons(&mut gate, vec![next.clone()]).1,
            vec!["generation_churn"]
        );
        let v = gate.admit(
            Message::Ack { delta: vec![next] },
            Duration::from_secs(12),
            meshnode_transport::pki::unix_now(),
        );
        assert!(v.dropped.is_empty());
    }

    /// `cargo nextest run -p meshnode-gossip --run-ignored only --no-capture measure_`:
    /// CPU per admitted value (signature check, claims), over 200 nodes of 10
    /// values each, against decoding the same message alone.
    #[test]
    #[ignore]
    fn measure_cpu_per_verified_value() {
        let p = pki();
        let me = p.node("east", "me", Role::Node);
        let nodes: Vec<Node> = (0..200)
            .map(|i| p.node("east", &format!("n{i}"), Role::Node))
            .collect();
        let deltas: Vec<NodeDelta> = nodes
            .iter()
            .map(|n| {
                let svcs: Vec<(String, String)> = (0..8)
                    .map(|j| (format!("svc:s{j}:80"), "c3ZjLXJlY29yZA".to_string()))
                    .collect();
                let extra: Vec<(&str, String)> =
                    svcs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
                full(n, &extra)
            })
            .collect();
        let values: usize = deltas.iter().map(|d| d.key_values.len()).sum();
        let bytes = crate::wire::encode(
            &Message::Ack {
                delta: deltas.clone(),
            },
            crate::wire::Blocks::Raw,
        );
        let t = meshnode_transport::clock::now();
        let decoded = crate::wire::decode(&bytes, &Limits::default()).unwrap();
        let decode = meshnode_transport::clock::since(t);
        let mut gate = p.gate(&me);
        let t = meshnode_transport::clock::now();
        let v = gate.admit(
            decoded,
            Duration::from_secs(5),
            meshnode_transport::pki::unix_now(),
        );
        let admit = meshnode_transport::clock::since(t);
        assert!(v.dropped.is_empty());
        // Same nodes again, now known: values only, no certificate chain.
        let later: Vec<NodeDelta> = nodes
            .iter()
            .map(|n| delta(n, n, GEN, 10, &[("svc:s0:80", "eA".into())]))
            .collect();
        let t = meshnode_transport::clock::now();
        let v = gate.admit(
            Message::Ack { delta: later },
            Duration::from_secs(6),
            meshnode_transport::pki::unix_now(),
        );
        let known = meshnode_transport::clock::since(t);
        assert!(v.dropped.is_empty());
        println!(
            "values={values} decode={:.1}us/value first-sight (cert chain + values)={:.1}us/value known-node value={:.1}us/value",
            decode.as_secs_f64() * 1e6 / values as f64,
            admit.as_secs_f64() * 1e6 / values as f64,
            known.as_secs_f64() * 1e6 / nodes.len() as f64,
        );
    }

    fn mutate(d: &mut NodeDelta, what: u8, at: usize, byte: u8) {
        let n = d.key_values.len().max(1);
        match what % 6 {
            0 => d.id.generation ^= 1 << (at % 64),
            1 => {
                if let Some(kv) = d.key_values.get_mut(at % n) {
                    kv.version += 1 + at as u64;
                }
            }
            2 => {
                if let Some(kv) = d.key_values.get_mut(at % n) {
                    let mut b = kv.value.clone().into_bytes();
                    let i = at % b.len().max(1);
                    if let Some(x) = b.get_mut(i) {
                        *x = if byte.is_ascii_alphanumeric() && *x != byte {
                            byte
                        } else {
                            b'Z' ^ (*x & 1)
                        };
                    }
                    kv.value = String::from_utf8_lossy(&b).into_owned();
                }
            }
            3 => {
                if let Some(kv) = d.key_values.get_mut(at % n) {
                    kv.key.push(byte as char);
                }
            }
            4 => d.from_version_excluded += 1 + (at as u64 % 3),
            _ => d.id.node_id.push('x'),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever is changed in a genuine delta, what passes is exactly what was signed.
        #[test]
        fn a_tampered_value_never_passes(what in any::<u8>(), at in 0usize..512, byte in any::<u8>()) {
            let p = pki();
            let (me, a) = (p.node("east", "me", Role::Node), p.node("east", "a", Role::Node));
            let genuine = full(&a, &[("svc:api:80", "c3Zj".into())]);
            let mut d = genuine.clone();
            mutate(&mut d, what, at, byte);
            let mut gate = p.gate(&me);
            let v = gate.admit(Message::Ack { delta: vec![d.clone()] }, Duration::from_secs(5), meshnode_transport::pki::unix_now());
            let Some(Message::Ack { delta }) = v.message else { panic!() };
            for passed in &delta {
                // Only a delta whose every value is genuine may pass.
                for kv in &passed.key_values {
                    prop_assert!(genuine.key_values.contains(kv), "tampered value passed: {kv:?}");
                }
                prop_assert_eq!(&passed.id, &genuine.id);
            }
        }

        #[test]
        fn arbitrary_messages_never_panic_the_gate(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let p = pki();
            let me = p.node("east", "me", Role::Node);
            let guard = Guard::new(p.gate(&me));
            let _ = guard.filter_bytes(&bytes, addr());
        }
    }
}
