//! A running gossip pool: chitchat over QUIC, plus the derived catalog.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chitchat::{
    spawn_chitchat, Chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig,
    NodeState,
};
use meshnode_transport::pki::sign::NodeSigner;
use meshnode_transport::Identity;
use tokio::sync::{watch, Mutex};
use tracing::{debug, info};

use crate::catalog::{self, Catalog, Member, MemberState, NodeSnapshot};
use crate::federation::{wan_members, wan_node_id};
use crate::gate::{Authority, Gate, Guard};
use crate::keys::{self, NodeInfo, ServiceRecord, LEAVING_KEY, NODE_KEY, SERVICE_PREFIX};
use crate::metrics::{BAD_RECORDS, MEMBERS};
use crate::plane::{Plane, Probing};
use crate::probe::{ProbeCtx, Verdicts};
use crate::quic::PoolKind;
use crate::signed::{self, CERT_KEY};
use crate::wire::Limits;

/// Gossip timing. The defaults were chosen by measurement (see ARCHITECTURE.md).
#[derive(Clone, Debug)]
pub struct Tuning {
    /// One gossip round every `interval`, to up to 3 peers.
    pub interval: Duration,
    /// A node is declared dead after about `phi_threshold` mean heartbeat intervals of silence.
    pub phi_threshold: f64,
    /// How long a dead node stays listed (as dead) before it is forgotten.
    pub dead_node_grace: Duration,
}

#[derive(Clone)]
pub struct GossipConfig {
    /// From the node's certificate: the node id and the cluster.
    pub me: Identity,
    /// The LAN pool of `me`'s cluster, or the WAN pool of gateways.
    pub kind: PoolKind,
    /// Increases on every start: the node's incarnation.
    pub generation: u64,
    pub advertise: SocketAddr,
    pub gateway: bool,
    pub seeds: Vec<SocketAddr>,
    pub services: Vec<ServiceRecord>,
    pub tuning: Tuning,
    /// Signs every value this node publishes (the key of `cert_der`).
    pub signer: Arc<NodeSigner>,
    /// This node's certificate (DER), published first so peers can check the rest.
    pub cert_der: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    #[error("cannot start gossip: {0}")]
    Start(String),
    #[error("service {name}:{port} cannot be published: {source}")]
    Record {
        name: String,
        port: u16,
        source: keys::KeyError,
    },
}

/// A handle to the running pool. Cheap to clone.
#[derive(Clone)]
pub struct GossipHandle {
    inner: Arc<Inner>,
}

struct Inner {
    signing: Arc<Signing>,
    /// Pushes and probes (None: chitchat alone, as in the in-memory simulations).
    plane: Option<Arc<Plane>>,
    verdicts: Option<Arc<Verdicts>>,
    /// The gate in front of chitchat (None: chitchat alone).
    guard: Option<Guard>,
    /// Set once chitchat's task has ended, with why.
    ended: watch::Receiver<Option<String>>,
    handle: Mutex<Option<ChitchatHandle>>,
    chitchat: Arc<Mutex<Chitchat>>,
    catalog: watch::Receiver<Arc<Catalog>>,
    tuning: Tuning,
    kind: PoolKind,
}

/// What every signature of this node in this pool covers besides key, version and payload.
pub(crate) struct Signing {
    pub signer: Arc<NodeSigner>,
    pub pool: String,
    pub node_id: String,
    pub generation: u64,
}

// === impl GossipConfig ===

impl GossipConfig {
    /// chitchat's `cluster_id` of the pool: `<mesh>/<cluster>` or `<mesh>/wan`.
    /// Plaintext and no security boundary, but every signature covers it.
    pub fn pool_id(&self) -> String {
        match self.kind {
            PoolKind::Lan { .. } => format!("{}/{}", self.me.mesh(), self.me.cluster()),
            PoolKind::Wan => format!("{}/wan", self.me.mesh()),
        }
    }

    /// The frame dictionary of this pool (see [`frame`](crate::frame)): its
    /// id, and the prefix that every node id of the pool starts with.
    pub fn dictionary(&self) -> Arc<crate::frame::Dictionary> {
        let prefix = match self.kind {
            PoolKind::Lan { .. } => {
                format!(
                    "spiffe://{}/cluster/{}/node/",
                    self.me.mesh(),
                    self.me.cluster()
                )
            }
            PoolKind::Wan => format!("spiffe://{}/cluster/", self.me.mesh()),
        };
        crate::frame::Dictionary::for_pool(&self.pool_id(), &prefix)
    }

    /// The guard for this pool's transport: checks every incoming message
    /// against `authority` before chitchat sees it.
    pub fn guard(&self, authority: Arc<dyn Authority>, limits: Limits) -> Guard {
        Guard::new(Gate::new(
            self.pool_id(),
            self.kind.clone(),
            &self.me,
            self.generation,
            authority,
            limits,
        ))
    }
}

// === impl Signing ===

impl Signing {
    fn seal(&self, key: &str, version: u64, payload: &str) -> Option<String> {
        let input = signed::signing_input(
            &self.pool,
            &self.node_id,
            self.generation,
            key,
            version,
            payload,
        );
        match self.signer.sign(&input) {
            Ok(sig) => Some(signed::seal(payload, &sig)),
            Err(e) => {
                tracing::error!(key, error = %e, "cannot sign a gossip value; not published");
                None
            }
        }
    }

    /// Publishes `payload` under `key` (an empty payload is a tombstone),
    /// signed for the version chitchat will give it. Unchanged payloads are
    /// left alone, so nothing is re-versioned.
    pub(crate) fn put(&self, state: &mut NodeState, key: &str, payload: &str) {
        let current = state.get(key).map(signed::raw_payload);
        if current == Some(payload) || (current.is_none() && payload.is_empty()) {
            return;
        }
        // chitchat's `set` gives a changed value exactly this version.
        let version = state.max_version() + 1;
        if let Some(value) = self.seal(key, version, payload) {
            state.set(key, value);
        }
    }
}

// === impl Tuning ===

impl Default for Tuning {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(250),
            phi_threshold: 8.0,
            dead_node_grace: Duration::from_secs(15 * 60),
        }
    }
}

// === impl GossipHandle ===

impl GossipHandle {
    /// Starts chitchat on `transport`: [`QuicTransport`](crate::QuicTransport)
    /// in a node, an in-memory network in the simulations.
    ///
    /// With `probing` (the QUIC transport's [`Probing`]), liveness comes from
    /// the SWIM prober, local changes are pushed at once, and chitchat's full
    /// exchanges are paced; without it chitchat runs alone (its phi detector
    /// decides liveness and every round exchanges digests).
    pub async fn spawn(
        cfg: GossipConfig,
        transport: &dyn chitchat::transport::Transport,
        probing: Option<Probing>,
    ) -> Result<Self, GossipError> {
        let info = NodeInfo {
            cluster: cfg.me.cluster().to_string(),
            advertise: cfg.advertise,
            gateway: cfg.gateway,
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let pool_id = cfg.pool_id();
        // The SPIFFE identity of the certificate: the gate checks that every
        // node's values are signed by the key of a certificate naming its id.
        let node_id = cfg.me.uri();
        let signing = Arc::new(Signing {
            signer: cfg.signer.clone(),
            pool: pool_id.clone(),
            node_id: node_id.clone(),
            generation: cfg.generation,
        });
        let mut payloads = vec![
            (CERT_KEY.to_string(), signed::encode_cert(&cfg.cert_der)),
            (
                NODE_KEY.to_string(),
                keys::encode_node(&info).map_err(|e| GossipError::Start(e.to_string()))?,
            ),
        ];
        for rec in &cfg.services {
            payloads.push((rec.key(), encode_record(rec)?));
        }
        if probing.is_some() {
            // Says "I answer probes": only such members are probed and
            // accused (an older node in a mixed pool is judged by chitchat).
            payloads.push((keys::ALIVE_KEY.to_string(), "0".to_string()));
        }
        // chitchat sets initial values one by one from version 1, the
        // certificate first (deltas carry values in version order).
        let mut initial = Vec::with_capacity(payloads.len());
        for (i, (key, payload)) in payloads.into_iter().enumerate() {
            let value = signing
                .seal(&key, i as u64 + 1, &payload)
                .ok_or_else(|| GossipError::Start("cannot sign the node's values".into()))?;
            initial.push((key, value));
        }
        let chitchat_config = ChitchatConfig {
            chitchat_id: ChitchatId::new(node_id, cfg.generation, cfg.advertise),
            // Plaintext; signatures cover it, so values cannot move between pools.
            cluster_id: pool_id,
            gossip_interval: cfg.tuning.interval,
            listen_addr: cfg.advertise,
            seed_nodes: cfg.seeds.iter().map(ToString::to_string).collect(),
            failure_detector_config: if probing.is_some() {
                // The prober decides liveness. chitchat's phi only judges
                // when to forget a node (its GC) and which peers its rounds
                // pick; heartbeats now arrive at the pace of anti-entropy,
                // so the window takes long intervals and starts from a slow
                // prior.
                FailureDetectorConfig {
                    phi_threshold: cfg.tuning.phi_threshold,
                    // chitchat allocates the window per member up front;
                    // 20 intervals of anti-entropy are minutes of history.
                    sampling_window_size: 20,
                    max_interval: Duration::from_secs(3600),
                    initial_interval: Duration::from_secs(5),
                    dead_node_grace_period: cfg.tuning.dead_node_grace,
                }
            } else {
                FailureDetectorConfig {
                    phi_threshold: cfg.tuning.phi_threshold,
                    // Heartbeat intervals kept per node for the mean: 200 is 50 s
                    // of history at 250 ms rounds. chitchat allocates the whole
                    // window per node up front (8 B a slot): its default of 1,000
                    // cost 0.4 MiB per pool at N = 60 for no better estimate.
                    sampling_window_size: 200,
                    // A silence longer than this is not a heartbeat interval but an outage.
                    max_interval: cfg.tuning.interval * 40,
                    // The prior for a new node's mean interval: the real interval, not
                    // chitchat's 5 s default, or new nodes take ages to judge.
                    initial_interval: cfg.tuning.interval,
                    dead_node_grace_period: cfg.tuning.dead_node_grace,
                }
            },
            marked_for_deletion_grace_period: cfg.tuning.dead_node_grace,
            catchup_callback: None,
            extra_liveness_predicate: None,
        };
        let handle = spawn_chitchat(chitchat_config, initial, transport)
            .await
            .map_err(|e| GossipError::Start(e.to_string()))?;
        let chitchat = handle.chitchat();
        let (ended_tx, ended) = watch::channel(None);
        let termination = handle.termination_watcher();
        tokio::spawn(async move {
            let why = match termination.await {
                Ok(()) => "chitchat's task stopped".to_string(),
                Err(e) => format!("chitchat's task failed: {e}"),
            };
            let _ = ended_tx.send(Some(why));
        });
        let watcher = chitchat.lock().await.live_nodes_watcher();
        let (tx, catalog) = watch::channel(Arc::new(Catalog::default()));
        let (changed_tx, changed) = watch::channel(0u64);
        let guard = probing.as_ref().map(|p| p.guard.clone());
        let (plane, verdicts) = match probing {
            Some(p) => {
                let verdicts = Arc::new(Verdicts::default());
                tokio::spawn(crate::probe::run(ProbeCtx {
                    chitchat: chitchat.clone(),
                    signing: signing.clone(),
                    plane: p.plane.clone(),
                    guard: p.guard,
                    verdicts: verdicts.clone(),
                    changed: changed_tx,
                    pool: cfg.kind.as_str(),
                    swim: match cfg.kind {
                        PoolKind::Lan { .. } => crate::swim::SwimConfig::default(),
                        PoolKind::Wan => crate::swim::SwimConfig::wan(),
                    },
                }));
                (Some(p.plane), Some(verdicts))
            }
            None => (None, None),
        };
        tokio::spawn(catalog_loop(
            watcher,
            changed,
            chitchat.clone(),
            tx,
            cfg.kind.clone(),
            verdicts.clone(),
        ));
        info!(node = %cfg.me, pool = cfg.kind.as_str(), advertise = %cfg.advertise, seeds = cfg.seeds.len(), "gossip started");
        let exchanges = plane.as_ref().and_then(|p| p.take_exchanges());
        let this = Self {
            inner: Arc::new(Inner {
                signing,
                plane,
                verdicts,
                guard,
                ended,
                handle: Mutex::new(Some(handle)),
                chitchat,
                catalog,
                tuning: cfg.tuning,
                kind: cfg.kind,
            }),
        };
        if let Some(mut rx) = exchanges {
            // Full exchanges the prober asks for, with chitchat's own SYN.
            let weak = Arc::downgrade(&this.inner);
            tokio::spawn(async move {
                while let Some(addr) = rx.recv().await {
                    let Some(inner) = weak.upgrade() else { return };
                    let handle = inner.handle.lock().await;
                    if let Some(h) = handle.as_ref() {
                        let _ = h.gossip(addr);
                    }
                }
            });
        }
        Ok(this)
    }

    /// Resolves when chitchat's task has ended (it failed, or [`Self::shutdown`]
    /// ran), with why. A node must not outlive its gossip: it would keep
    /// answering health checks while the rest of the pool sees it dead.
    pub async fn ended(&self) -> String {
        let mut rx = self.inner.ended.clone();
        let why = match rx.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            Err(_) => "chitchat's task is gone".to_string(),
        };
        why
    }

    /// Whether a full state exchange with a peer has completed (see
    /// [`Gate::synced`]); false without a gate.
    pub fn synced(&self) -> bool {
        self.inner.guard.as_ref().is_some_and(Guard::synced)
    }

    /// Every node the pool knows, live or dead, all generations.
    pub async fn snapshot(&self) -> Vec<NodeSnapshot> {
        snapshot(
            &*self.inner.chitchat.lock().await,
            &self.inner.kind,
            self.inner.verdicts.as_deref(),
        )
    }

    /// What [`crate::replica::plan`] needs for objects under `prefix`: this
    /// node's id, the live members' ids (this node among them; leaving
    /// members are not live), and every non-empty value under `prefix` with
    /// the id of the node that publishes it (live or not: a dead node's
    /// copy may still be the only one this node has seen).
    pub async fn replica_view(&self, prefix: &str) -> ReplicaView {
        let cc = self.inner.chitchat.lock().await;
        let me = cc.self_chitchat_id().clone();
        let judge = judge(&cc, self.inner.verdicts.as_deref());
        let mut live = Vec::new();
        let mut values = Vec::new();
        for (id, state) in cc.node_states() {
            let alive = judge(id);
            if alive && state.get(LEAVING_KEY).is_none() {
                live.push(id.node_id.to_string());
            }
            for (k, v) in state.key_values() {
                if !k.starts_with(prefix) {
                    continue;
                }
                if let Some(p) = signed::payload(v).filter(|p| !p.is_empty()) {
                    values.push(ReplicaValue {
                        node: id.node_id.to_string(),
                        live: alive,
                        key: k.to_string(),
                        payload: p.to_string(),
                    });
                }
            }
        }
        live.sort();
        live.dedup();
        ReplicaView {
            me: me.node_id.to_string(),
            live,
            values,
        }
    }

    /// The member list (for the WAN pool: gateways, with plain node names).
    pub async fn members(&self) -> Vec<Member> {
        let nodes = self.snapshot().await;
        match &self.inner.kind {
            PoolKind::Lan { .. } => catalog::members(&nodes),
            PoolKind::Wan => wan_members(&nodes),
        }
    }

    /// The latest catalog (updated at the end of each gossip round that changed something).
    pub fn catalog(&self) -> Arc<Catalog> {
        self.inner.catalog.borrow().clone()
    }

    pub fn watch_catalog(&self) -> watch::Receiver<Arc<Catalog>> {
        self.inner.catalog.clone()
    }

    /// Replaces this node's published service instances.
    pub async fn publish_services(&self, records: &[ServiceRecord]) -> Result<(), GossipError> {
        self.publish_services_with(records, None).await
    }

    /// [`GossipHandle::publish_services`] and, in the same change, the keys
    /// under another prefix (the check records).
    pub async fn publish_services_with(
        &self,
        records: &[ServiceRecord],
        extra: Option<(&str, BTreeMap<String, String>)>,
    ) -> Result<(), GossipError> {
        let encoded = records
            .iter()
            .map(|r| Ok((r.key(), encode_record(r)?)))
            .collect::<Result<BTreeMap<_, _>, GossipError>>()?;
        let mut sets = vec![(SERVICE_PREFIX, encoded)];
        sets.extend(extra);
        self.publish_sets(sets).await;
        Ok(())
    }

    /// Replaces every key of this node's state that starts with `prefix` by
    /// `entries` (whose keys must start with `prefix`). Unchanged values are
    /// not re-versioned, so an identical call gossips nothing.
    pub async fn publish_prefixed(&self, prefix: &str, encoded: BTreeMap<String, String>) {
        self.publish_sets(vec![(prefix, encoded)]).await;
    }

    /// [`GossipHandle::publish_prefixed`] for several prefixes in one change,
    /// so one push carries them: two changes pushed back to back can arrive
    /// out of order, and a receiver refuses a delta that starts above what
    /// it holds, leaving the later change to anti-entropy (seconds).
    pub async fn publish_sets(&self, sets: Vec<(&str, BTreeMap<String, String>)>) {
        self.change(|state, signing| {
            for (prefix, encoded) in &sets {
                let stale: Vec<String> = state
                    .key_values()
                    .filter(|(k, v)| {
                        k.starts_with(prefix)
                            && !encoded.contains_key(*k)
                            && signed::payload(v).is_some()
                    })
                    .map(|(k, _)| k.to_string())
                    .collect();
                for k in stale {
                    // A signed tombstone: chitchat's delete would leave an unsigned empty value.
                    signing.put(state, &k, "");
                }
                for (k, v) in encoded {
                    signing.put(state, k, v);
                }
            }
        })
        .await;
    }

    /// Publishes a renewed certificate of this node (same key).
    pub async fn publish_cert(&self, der: &[u8]) {
        self.change(|state, signing| signing.put(state, CERT_KEY, &signed::encode_cert(der)))
            .await;
    }

    /// Changes this node's own state and pushes the change.
    async fn change(&self, f: impl FnOnce(&mut NodeState, &Signing)) {
        change_own(
            &self.inner.chitchat,
            &self.inner.signing,
            self.inner.plane.as_ref(),
            f,
        )
        .await;
    }

    /// Leaves the pool gracefully: marks this node as leaving and withdraws its
    /// instances, pushes that to live peers at once, and waits two rounds so it spreads.
    pub async fn leave(&self) {
        if let Some(plane) = &self.inner.plane {
            let delta = {
                let mut cc = self.inner.chitchat.lock().await;
                let me = cc.self_chitchat_id().clone();
                let state = cc.self_node_state();
                let before = state.max_version();
                leave_values(state, &self.inner.signing);
                own_delta(&me, state, before)
            };
            // Everyone at once, not a few: a leave must not wait on forwarding.
            plane.push_all(delta);
            tokio::time::sleep(self.inner.tuning.interval * 2).await;
            info!("left the gossip pool");
            return;
        }
        let peers = {
            let mut cc = self.inner.chitchat.lock().await;
            let me = cc.self_chitchat_id().clone();
            let state = cc.self_node_state();
            leave_values(state, &self.inner.signing);
            cc.live_nodes()
                .filter(|id| **id != me)
                .map(|id| id.gossip_advertise_addr)
                .collect::<HashSet<_>>()
        };
        if let Some(h) = self.inner.handle.lock().await.as_ref() {
            for addr in peers {
                let _ = h.gossip(addr);
            }
        }
        tokio::time::sleep(self.inner.tuning.interval * 2).await;
        info!("left the gossip pool");
    }

    /// Stops gossiping. Peers will see this node die unless it left first.
    pub async fn shutdown(&self) {
        if let Some(h) = self.inner.handle.lock().await.take() {
            if let Err(e) = h.shutdown().await {
                debug!(error = %e, "gossip shutdown");
            }
        }
    }
}

/// See [`GossipHandle::replica_view`].
#[derive(Clone, Debug, Default)]
pub struct ReplicaView {
    pub me: String,
    pub live: Vec<String>,
    pub values: Vec<ReplicaValue>,
}

#[derive(Clone, Debug)]
pub struct ReplicaValue {
    /// The publishing node's id (its SPIFFE identity).
    pub node: String,
    pub live: bool,
    pub key: String,
    pub payload: String,
}

/// Marks this node as leaving and withdraws its instances.
fn leave_values(state: &mut NodeState, signing: &Signing) {
    signing.put(state, LEAVING_KEY, "1");
    let svc: Vec<String> = state
        .key_values()
        .filter(|(k, _)| k.starts_with(SERVICE_PREFIX))
        .map(|(k, _)| k.to_string())
        .collect();
    for k in svc {
        signing.put(state, &k, "");
    }
}

/// Applies `f` to this node's own state under chitchat's lock and, when it
/// changed anything and a plane is there, pushes exactly the change.
pub(crate) async fn change_own(
    chitchat: &Mutex<Chitchat>,
    signing: &Signing,
    plane: Option<&Arc<Plane>>,
    f: impl FnOnce(&mut NodeState, &Signing),
) {
    let delta = {
        let mut cc = chitchat.lock().await;
        let me = cc.self_chitchat_id().clone();
        let state = cc.self_node_state();
        let before = state.max_version();
        f(state, signing);
        (state.max_version() > before).then(|| own_delta(&me, state, before))
    };
    if let (Some(delta), Some(plane)) = (delta, plane) {
        plane.mark_dirty();
        plane.push(vec![delta], None, "change");
    }
}

/// This node's values above version `after`, as one node delta in version
/// order (what chitchat itself would send a peer at `after`).
fn own_delta(id: &ChitchatId, state: &NodeState, after: u64) -> crate::wire::NodeDelta {
    use crate::wire::{KeyValue, NodeDelta, NodeId, Status};
    let mut key_values: Vec<KeyValue> = state
        .key_values_including_deleted()
        .filter(|(_, v)| v.version > after)
        .map(|(k, v)| KeyValue {
            key: k.to_string(),
            value: v.value.clone(),
            version: v.version,
            // meshnode never deletes (tombstones are signed empty values).
            status: Status::Set,
        })
        .collect();
    key_values.sort_by_key(|kv| kv.version);
    NodeDelta {
        id: NodeId {
            node_id: id.node_id.to_string(),
            generation: id.generation_id,
            addr: id.gossip_advertise_addr,
        },
        last_gc_version: state.last_gc_version(),
        from_version_excluded: after,
        key_values,
        set_max_version: Vec::new(),
    }
}

fn encode_record(rec: &ServiceRecord) -> Result<String, GossipError> {
    keys::encode_service(rec).map_err(|source| GossipError::Record {
        name: rec.name.clone(),
        port: rec.port,
        source,
    })
}

/// A node as the catalog sees it: named by its node name (WAN pool:
/// `<cluster>/<node>`), with the payloads of its values; tombstones and
/// anything unsigned are left out. `None` for an id that is not a SPIFFE
/// identity (the gate admits no such node).
fn to_snapshot(
    id: &ChitchatId,
    state: &NodeState,
    live: bool,
    kind: &PoolKind,
) -> Option<NodeSnapshot> {
    let identity: Identity = id.node_id.parse().ok()?;
    let node = match kind {
        PoolKind::Lan { .. } => identity.node().to_string(),
        PoolKind::Wan => wan_node_id(identity.cluster(), identity.node()),
    };
    Some(NodeSnapshot {
        node,
        generation: id.generation_id,
        gossip_addr: id.gossip_advertise_addr,
        live,
        kvs: Arc::new(
            state
                .key_values()
                .filter_map(|(k, v)| Some((k.to_string(), signed::payload(v)?.to_string())))
                .collect(),
        ),
    })
}

/// Every node; live per the prober's verdicts when there are any, else per chitchat.
fn snapshot(cc: &Chitchat, kind: &PoolKind, verdicts: Option<&Verdicts>) -> Vec<NodeSnapshot> {
    let alive = judge(cc, verdicts);
    cc.node_states()
        .iter()
        .filter_map(|(id, state)| to_snapshot(id, state, alive(id), kind))
        .collect()
}

/// Whether a node counts as live: this node always, else the prober's
/// verdict when it judges the node, else chitchat's live set.
fn judge<'a>(
    cc: &'a Chitchat,
    verdicts: Option<&'a Verdicts>,
) -> impl Fn(&ChitchatId) -> bool + 'a {
    let live: HashSet<&ChitchatId> = cc.live_nodes().collect();
    let me = cc.self_chitchat_id();
    move |id| match verdicts.and_then(|v| v.judged(&id.node_id, id.generation_id)) {
        _ if id == me => true,
        Some(dead) => !dead,
        None => live.contains(id),
    }
}

/// Each node's snapshot as of its state version, kept between catalog
/// rebuilds: a node's values are copied out of chitchat's state (and its id
/// parsed) only when its version moved, so a rebuild costs a pass over the
/// members rather than a copy of every value of every member.
#[derive(Default)]
struct SnapshotCache {
    nodes: HashMap<ChitchatId, (u64, NodeSnapshot)>,
}

impl SnapshotCache {
    fn snapshot(
        &mut self,
        cc: &Chitchat,
        kind: &PoolKind,
        verdicts: Option<&Verdicts>,
    ) -> Vec<NodeSnapshot> {
        let judge = judge(cc, verdicts);
        let states = cc.node_states();
        self.nodes.retain(|id, _| states.contains_key(id));
        let mut out = Vec::with_capacity(states.len());
        for (id, state) in states {
            let alive = judge(id);
            let version = state.max_version();
            let mut snap = match self.nodes.get(id) {
                Some((v, snap)) if *v == version => snap.clone(),
                _ => {
                    let Some(snap) = to_snapshot(id, state, alive, kind) else {
                        continue;
                    };
                    self.nodes.insert(id.clone(), (version, snap.clone()));
                    snap
                }
            };
            snap.live = alive;
            out.push(snap);
        }
        out
    }
}

/// Catalog rebuilds are at most this frequent. The first change after a quiet
/// spell is applied at once; a burst (a pool forming, a death's accusations)
/// is applied in one rebuild per gap instead of one per signal. The prober
/// signals at most once per 50 ms tick anyway; a longer gap (100 ms was
/// tried) cost the simulation a hop of propagation now and then.
const CATALOG_MIN_GAP: Duration = Duration::from_millis(50);

async fn catalog_loop(
    mut watcher: watch::Receiver<BTreeMap<ChitchatId, NodeState>>,
    mut changed: watch::Receiver<u64>,
    chitchat: Arc<Mutex<Chitchat>>,
    tx: watch::Sender<Arc<Catalog>>,
    kind: PoolKind,
    verdicts: Option<Arc<Verdicts>>,
) {
    let mut cache = SnapshotCache::default();
    loop {
        watcher.borrow_and_update();
        changed.borrow_and_update();
        // Live per the prober when there is one, else per chitchat (its
        // live set is what the watcher carries).
        let mut nodes = cache.snapshot(&*chitchat.lock().await, &kind, verdicts.as_deref());
        let members = catalog::members(&nodes);
        for state in [MemberState::Alive, MemberState::Dead, MemberState::Left] {
            let n = members.iter().filter(|m| m.state == state).count();
            metrics::gauge!(MEMBERS, "pool" => kind.as_str(), "state" => state.as_str())
                .set(n as f64);
        }
        nodes.retain(|n| n.live);
        let cat = Catalog::derive(&nodes);
        if matches!(kind, PoolKind::Lan { .. }) {
            metrics::gauge!(BAD_RECORDS).set(cat.bad_records as f64);
        }
        // For the WAN pool the "catalog" is empty: the watch is only a change signal.
        tx.send_replace(Arc::new(cat));
        tokio::time::sleep(CATALOG_MIN_GAP).await;
        let ok = if verdicts.is_some() {
            tokio::select! {
                r = watcher.changed() => r.is_ok(),
                r = changed.changed() => r.is_ok(),
            }
        } else {
            watcher.changed().await.is_ok()
        };
        if !ok {
            return;
        }
    }
}
