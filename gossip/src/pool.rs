//! A running gossip pool: chitchat over QUIC, plus the derived catalog.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chitchat::{
    spawn_chitchat, Chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig,
    NodeState,
};
use meshnode_transport::Identity;
use tokio::sync::{watch, Mutex};
use tracing::{debug, info};

use crate::catalog::{self, Catalog, Member, MemberState, NodeSnapshot};
use crate::federation::{wan_members, wan_node_id};
use crate::keys::{self, NodeInfo, ServiceRecord, LEAVING_KEY, NODE_KEY, SERVICE_PREFIX};
use crate::metrics::{BAD_RECORDS, MEMBERS};
use crate::quic::PoolKind;

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
    handle: Mutex<Option<ChitchatHandle>>,
    chitchat: Arc<Mutex<Chitchat>>,
    catalog: watch::Receiver<Arc<Catalog>>,
    tuning: Tuning,
    kind: PoolKind,
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
    pub async fn spawn(
        cfg: GossipConfig,
        transport: &dyn chitchat::transport::Transport,
    ) -> Result<Self, GossipError> {
        let info = NodeInfo {
            cluster: cfg.me.cluster().to_string(),
            advertise: cfg.advertise,
            gateway: cfg.gateway,
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let mut initial = vec![(
            NODE_KEY.to_string(),
            keys::encode_node(&info).map_err(|e| GossipError::Start(e.to_string()))?,
        )];
        for rec in &cfg.services {
            initial.push((rec.key(), encode_record(rec)?));
        }
        let (node_id, pool_id) = match cfg.kind {
            PoolKind::Lan { .. } => (cfg.me.node().to_string(), cfg.me.cluster().to_string()),
            // Node names are unique per cluster only.
            PoolKind::Wan => (
                wan_node_id(cfg.me.cluster(), cfg.me.node()),
                "wan".to_string(),
            ),
        };
        let chitchat_config = ChitchatConfig {
            chitchat_id: ChitchatId::new(node_id, cfg.generation, cfg.advertise),
            // Plaintext and no security boundary: the certificate check in the transport is.
            cluster_id: format!("{}/{pool_id}", cfg.me.mesh()),
            gossip_interval: cfg.tuning.interval,
            listen_addr: cfg.advertise,
            seed_nodes: cfg.seeds.iter().map(ToString::to_string).collect(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: cfg.tuning.phi_threshold,
                sampling_window_size: 1000,
                // A silence longer than this is not a heartbeat interval but an outage.
                max_interval: cfg.tuning.interval * 40,
                // The prior for a new node's mean interval: the real interval, not
                // chitchat's 5 s default, or new nodes take ages to judge.
                initial_interval: cfg.tuning.interval,
                dead_node_grace_period: cfg.tuning.dead_node_grace,
            },
            marked_for_deletion_grace_period: cfg.tuning.dead_node_grace,
            catchup_callback: None,
            extra_liveness_predicate: None,
        };
        let handle = spawn_chitchat(chitchat_config, initial, transport)
            .await
            .map_err(|e| GossipError::Start(e.to_string()))?;
        let chitchat = handle.chitchat();
        let watcher = chitchat.lock().await.live_nodes_watcher();
        let (tx, catalog) = watch::channel(Arc::new(Catalog::default()));
        tokio::spawn(catalog_loop(
            watcher,
            chitchat.clone(),
            tx,
            cfg.kind.clone(),
        ));
        info!(node = %cfg.me, pool = cfg.kind.as_str(), advertise = %cfg.advertise, seeds = cfg.seeds.len(), "gossip started");
        Ok(Self {
            inner: Arc::new(Inner {
                handle: Mutex::new(Some(handle)),
                chitchat,
                catalog,
                tuning: cfg.tuning,
                kind: cfg.kind,
            }),
        })
    }

    /// Every node the pool knows, live or dead, all generations.
    pub async fn snapshot(&self) -> Vec<NodeSnapshot> {
        snapshot(&*self.inner.chitchat.lock().await)
    }

    /// Every value under `prefix` that any node publishes (live or not), by
    /// key; read under the lock without copying the rest of the state.
    pub async fn prefixed_values(&self, prefix: &str) -> BTreeMap<String, String> {
        let cc = self.inner.chitchat.lock().await;
        let mut out = BTreeMap::new();
        for state in cc.node_states().values() {
            for (k, v) in state.key_values() {
                if k.starts_with(prefix) {
                    out.entry(k.to_string()).or_insert_with(|| v.to_string());
                }
            }
        }
        out
    }

    /// The member list (for the WAN pool: gateways, with plain node names).
    pub async fn members(&self) -> Vec<Member> {
        let nodes = self.snapshot().await;
        match self.inner.kind {
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
        let encoded = records
            .iter()
            .map(|r| Ok((r.key(), encode_record(r)?)))
            .collect::<Result<BTreeMap<_, _>, GossipError>>()?;
        self.publish_prefixed(SERVICE_PREFIX, encoded).await;
        Ok(())
    }

    /// Replaces every key of this node's state that starts with `prefix` by
    /// `entries` (whose keys must start with `prefix`). Unchanged values are
    /// not re-versioned, so an identical call gossips nothing.
    pub async fn publish_prefixed(&self, prefix: &str, encoded: BTreeMap<String, String>) {
        let mut cc = self.inner.chitchat.lock().await;
        let state = cc.self_node_state();
        let stale: Vec<String> = state
            .key_values()
            .filter(|(k, _)| k.starts_with(prefix) && !encoded.contains_key(*k))
            .map(|(k, _)| k.to_string())
            .collect();
        for k in stale {
            state.delete(&k);
        }
        for (k, v) in encoded {
            if state.get(&k) != Some(v.as_str()) {
                state.set(k, v);
            }
        }
    }

    /// Leaves the pool gracefully: marks this node as leaving and withdraws its
    /// instances, pushes that to live peers at once, and waits two rounds so it spreads.
    pub async fn leave(&self) {
        let peers = {
            let mut cc = self.inner.chitchat.lock().await;
            let me = cc.self_chitchat_id().clone();
            let state = cc.self_node_state();
            state.set(LEAVING_KEY, "1");
            let svc: Vec<String> = state
                .key_values()
                .filter(|(k, _)| k.starts_with(SERVICE_PREFIX))
                .map(|(k, _)| k.to_string())
                .collect();
            for k in svc {
                state.delete(&k);
            }
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

fn encode_record(rec: &ServiceRecord) -> Result<String, GossipError> {
    keys::encode_service(rec).map_err(|source| GossipError::Record {
        name: rec.name.clone(),
        port: rec.port,
        source,
    })
}

fn to_snapshot(id: &ChitchatId, state: &NodeState, live: bool) -> NodeSnapshot {
    NodeSnapshot {
        node: id.node_id.to_string(),
        generation: id.generation_id,
        gossip_addr: id.gossip_advertise_addr,
        live,
        kvs: state
            .key_values()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn snapshot(cc: &Chitchat) -> Vec<NodeSnapshot> {
    let live: HashSet<&ChitchatId> = cc.live_nodes().collect();
    cc.node_states()
        .iter()
        .map(|(id, state)| to_snapshot(id, state, live.contains(id)))
        .collect()
}

async fn catalog_loop(
    mut watcher: watch::Receiver<BTreeMap<ChitchatId, NodeState>>,
    chitchat: Arc<Mutex<Chitchat>>,
    tx: watch::Sender<Arc<Catalog>>,
    kind: PoolKind,
) {
    loop {
        let live: Vec<NodeSnapshot> = watcher
            .borrow_and_update()
            .iter()
            .map(|(id, s)| to_snapshot(id, s, true))
            .collect();
        let cat = Catalog::derive(&live);
        if matches!(kind, PoolKind::Lan { .. }) {
            metrics::gauge!(BAD_RECORDS).set(cat.bad_records as f64);
        }
        // For the WAN pool the "catalog" is empty: the watch is only a change signal.
        tx.send_replace(Arc::new(cat));
        let members = catalog::members(&snapshot(&*chitchat.lock().await));
        for state in [MemberState::Alive, MemberState::Dead, MemberState::Left] {
            let n = members.iter().filter(|m| m.state == state).count();
            metrics::gauge!(MEMBERS, "pool" => kind.as_str(), "state" => state.as_str())
                .set(n as f64);
        }
        if watcher.changed().await.is_err() {
            return;
        }
    }
}
