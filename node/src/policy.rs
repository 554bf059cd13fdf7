//! Mesh-wide policy documents on every node: verified, adopted (highest
//! order wins), persisted in `<data_dir>/policy`, and published in gossip by
//! the few nodes [`meshnode_gossip::replica`] picks for each document.
//!
//! A document enters a node three ways: `POST /v1/policy` (an operator's
//! `meshnode policy apply`), a `pol:<kind>/<name>` value of any member of
//! the LAN pool (or, on gateways, of the WAN pool), and the data dir at
//! start. All three run the same checks ([`PolicyStore::offer`]): the
//! signature and signer ([`SignedDocument::verify`]), then the schema of
//! the kind ([`schema::parse`]), then the order against the version held.

pub mod schema;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use meshnode_gossip::GossipHandle;
use meshnode_transport::pki::policy::{PolicyTrust, SignedDocument};
use meshnode_transport::pki::{sha256, unix_now, write_atomic};
use meshnode_transport::tls::TlsMaterial;
use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::metrics::{POLICY_ADOPTED, POLICY_DOCUMENTS, POLICY_PUBLISHED, POLICY_REFUSED};

/// Adopted documents, one text form per line.
pub const FILE: &str = "policy";
/// Gossip keys: `pol:<kind>/<name>`.
pub const PREFIX: &str = "pol:";
/// A tombstone is kept (and gossiped) this long after it was signed.
pub const TOMBSTONE_RETENTION_SECS: i64 = 30 * 86_400;
/// Distinct document texts whose verdict is remembered (each is verified
/// and counted once); the memory is dropped whole when full.
const SEEN_CAP: usize = 8_192;

pub type Order = (u64, i64, [u8; 32]);
/// `(kind, name)`.
pub type DocKey = (String, String);
/// What a text verified as (None: refused).
type Verdict = Option<(DocKey, Order)>;

/// A value derived from the store's documents, rebuilt whenever the store
/// adopts one: built now (documents loaded from the data dir are in force
/// before the first request), then followed.
pub fn follow<T: Send + Sync + 'static>(
    store: Arc<PolicyStore>,
    build: fn(&PolicyStore) -> T,
) -> watch::Receiver<Arc<T>> {
    let (tx, rx) = watch::channel(Arc::new(build(&store)));
    let mut changed = store.subscribe();
    tokio::spawn(async move {
        while changed.changed().await.is_ok() {
            if tx.send(Arc::new(build(&store))).is_err() {
                return;
            }
        }
    });
    rx
}

pub fn gossip_key(kind: &str, name: &str) -> String {
    format!("{PREFIX}{kind}/{name}")
}

/// A document this node holds.
#[derive(Clone, Debug)]
pub struct Held {
    pub doc: SignedDocument,
    /// The validated body (None for a tombstone).
    pub parsed: Option<schema::Document>,
    /// Unix seconds.
    pub adopted_at: i64,
}

/// What became of an offered document.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    Adopted,
    /// The very version held.
    Unchanged,
    /// Older than the version held.
    Stale {
        held: u64,
    },
    /// An expired tombstone: nothing to keep.
    Ignored,
    Refused {
        reason: &'static str,
        message: String,
    },
}

/// How a listing shows a document.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub kind: String,
    pub name: String,
    pub version: u64,
    pub signer: String,
    pub signed_at: i64,
    pub deleted: bool,
    pub digest: String,
}

#[derive(Default)]
pub struct PolicyStore {
    docs: RwLock<BTreeMap<(String, String), Held>>,
    /// sha256(text) -> its order if it verified (None: refused).
    seen: Mutex<HashMap<[u8; 32], Verdict>>,
    changed: watch::Sender<u64>,
}

impl Held {
    pub fn summary(&self) -> Summary {
        let h = &self.doc.header;
        Summary {
            kind: h.kind.clone(),
            name: h.name.clone(),
            version: h.version,
            signer: self.doc.signer_name(),
            signed_at: h.signed_at,
            deleted: h.deleted,
            digest: self.doc.digest_hex(),
        }
    }
}

impl PolicyStore {
    /// Runs every check on `text` and adopts it if it is newer than what is
    /// held. `source` labels the adoption metric (`local`, `gossip`, `disk`).
    /// Refusals are counted here; [`PolicyStore::offer_seen`] counts each
    /// distinct text once.
    pub fn offer(
        &self,
        text: &str,
        trust: &dyn PolicyTrust,
        now: i64,
        source: &'static str,
    ) -> Offer {
        let text = text.trim();
        let hash = sha256(text.as_bytes());
        let doc = match SignedDocument::verify(text, trust, now) {
            Ok(d) => d,
            Err(e) => {
                self.remember(hash, None);
                return self.refuse(e.reason(), e.to_string());
            }
        };
        let parsed = if doc.header.deleted {
            None
        } else {
            match schema::parse(&doc.source) {
                Ok(p) if p.kind == doc.header.kind && p.name == doc.header.name => Some(p),
                Ok(p) => {
                    self.remember(hash, None);
                    return self.refuse(
                        "invalid",
                        format!(
                            "the text is a {} document for {:?}, signed as {} {:?}",
                            p.kind, p.name, doc.header.kind, doc.header.name
                        ),
                    );
                }
                Err(errors) => {
                    self.remember(hash, None);
                    let msg = errors
                        .iter()
                        .map(|e| format!("{}: {}", e.key, e.message))
                        .collect::<Vec<_>>()
                        .join("; ");
                    return self.refuse("invalid", msg);
                }
            }
        };
        self.remember(hash, Some((doc.key(), doc.order())));
        if doc.header.deleted && doc.header.signed_at + TOMBSTONE_RETENTION_SECS < now {
            return Offer::Ignored;
        }
        let key = doc.key();
        let mut docs = self.docs.write().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = docs.get(&key) {
            match doc.order().cmp(&held.doc.order()) {
                std::cmp::Ordering::Equal => return Offer::Unchanged,
                std::cmp::Ordering::Less => {
                    let held = held.doc.header.version;
                    drop(docs);
                    metrics::counter!(POLICY_REFUSED, "reason" => "stale").increment(1);
                    return Offer::Stale { held };
                }
                std::cmp::Ordering::Greater => {}
            }
        }
        info!(
            kind = %doc.header.kind,
            name = %doc.header.name,
            version = doc.header.version,
            deleted = doc.header.deleted,
            signer = %doc.signer_name(),
            source,
            "policy document adopted"
        );
        docs.insert(
            key,
            Held {
                doc,
                parsed,
                adopted_at: now,
            },
        );
        metrics::gauge!(POLICY_DOCUMENTS).set(docs.len() as f64);
        drop(docs);
        metrics::counter!(POLICY_ADOPTED, "source" => source).increment(1);
        self.changed.send_modify(|v| *v += 1);
        Offer::Adopted
    }

    /// [`PolicyStore::offer`] for gossip, where the same text arrives again
    /// and again: a text seen before is not verified or counted again.
    /// Returns the text's `(kind, name)` and order if it verified (whether
    /// or not it won), and whether it was adopted now.
    pub fn offer_seen(
        &self,
        text: &str,
        trust: &dyn PolicyTrust,
        now: i64,
    ) -> (Option<(DocKey, Order)>, bool) {
        let hash = sha256(text.trim().as_bytes());
        let seen = self
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&hash)
            .cloned();
        match seen {
            Some(verdict) => {
                let mut adopted = false;
                if let Some((key, order)) = &verdict {
                    // Valid and newer than what is held (a pruned tombstone's
                    // key, say): offer it again.
                    let held = self.get(&key.0, &key.1).map(|h| h.doc.order());
                    if held.is_none_or(|h| h < *order) {
                        adopted = self.offer(text, trust, now, "gossip") == Offer::Adopted;
                    }
                }
                (verdict, adopted)
            }
            None => {
                let adopted = self.offer(text, trust, now, "gossip") == Offer::Adopted;
                let verdict = self
                    .seen
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&hash)
                    .cloned()
                    .flatten();
                (verdict, adopted)
            }
        }
    }

    fn remember(&self, hash: [u8; 32], verdict: Verdict) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= SEEN_CAP {
            seen.clear();
        }
        seen.insert(hash, verdict);
    }

    fn refuse(&self, reason: &'static str, message: String) -> Offer {
        metrics::counter!(POLICY_REFUSED, "reason" => reason).increment(1);
        Offer::Refused { reason, message }
    }

    /// Drops tombstones past their retention; returns how many went.
    pub fn prune(&self, now: i64) -> usize {
        let mut docs = self.docs.write().unwrap_or_else(|e| e.into_inner());
        let before = docs.len();
        docs.retain(|_, h| {
            !(h.doc.header.deleted && h.doc.header.signed_at + TOMBSTONE_RETENTION_SECS < now)
        });
        let gone = before - docs.len();
        metrics::gauge!(POLICY_DOCUMENTS).set(docs.len() as f64);
        gone
    }

    pub fn get(&self, kind: &str, name: &str) -> Option<Held> {
        self.docs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(kind.to_string(), name.to_string()))
            .cloned()
    }

    pub fn all(&self) -> Vec<Held> {
        self.docs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.docs.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fires on every adoption.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// The agent's side: persistence, gossip in both pools, and readiness.
pub struct PolicyAgent {
    pub store: Arc<PolicyStore>,
    pub tls: Arc<TlsMaterial>,
    pub path: PathBuf,
    pub lan: GossipHandle,
    pub wan: Option<GossipHandle>,
    /// No seeds: the first node of a mesh has nobody to load policy from.
    pub bootstrap: bool,
    /// Per pool: the documents this node originated there.
    pub origins: crate::replicate::PoolOrigins,
}

impl PolicyAgent {
    /// Loads the data dir's documents (before gossip starts).
    pub fn load(&self) -> usize {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "cannot read policy documents");
                return 0;
            }
        };
        let now = unix_now();
        let mut n = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match self.store.offer(line, &*self.tls, now, "disk") {
                Offer::Adopted => {
                    n += 1;
                    // The pools may not have it: repair once synced, if so.
                    if let Ok(d) = SignedDocument::verify(line, &*self.tls, now) {
                        self.mark_origin(&d, None, true);
                    }
                }
                Offer::Refused { reason, message } => {
                    warn!(path = %self.path.display(), reason, error = %message, "skipping a stored policy document")
                }
                _ => {}
            }
        }
        if n > 0 {
            info!(documents = n, path = %self.path.display(), "policy documents loaded");
        }
        n
    }

    /// Policy is loaded once a full state exchange with a peer of the LAN
    /// pool has completed (or the node has no seeds). Until then, what it
    /// holds may be missing newer documents.
    pub fn loaded(&self) -> bool {
        self.bootstrap || self.lan.synced()
    }

    /// Offers a document from the admin API; publishes at once if adopted.
    pub async fn apply(&self, text: &str) -> Offer {
        let now = unix_now();
        let offer = self.store.offer(text, &*self.tls, now, "local");
        if offer == Offer::Adopted {
            if let Ok(d) = SignedDocument::verify(text, &*self.tls, now) {
                self.mark_origin(&d, None, false);
            }
            self.save();
            self.round().await;
        }
        offer
    }

    /// This node originates `doc` in every pool but `except` (the pool it
    /// came from).
    fn mark_origin(&self, doc: &SignedDocument, except: Option<&str>, after_sync: bool) {
        let pools: &[&'static str] = if self.wan.is_some() {
            &["lan", "wan"]
        } else {
            &["lan"]
        };
        let key = gossip_key(&doc.header.kind, &doc.header.name);
        self.origins.mark(&key, pools, except, after_sync);
    }

    fn save(&self) {
        let mut text = String::new();
        for h in self.store.all() {
            text.push_str(h.doc.text());
            text.push('\n');
        }
        if let Err(e) = write_atomic(&self.path, text.as_bytes(), 0o600) {
            warn!(path = %self.path.display(), error = %e, "cannot persist policy documents");
        }
    }

    /// One pass: take what the pools publish, then publish what this node
    /// should in each pool.
    async fn round(&self) {
        let now = unix_now();
        let before = self.store.subscribe().borrow().to_owned();
        let mut pools = vec![("lan", &self.lan)];
        pools.extend(self.wan.as_ref().map(|w| ("wan", w)));
        let mut views = Vec::with_capacity(pools.len());
        for (name, pool) in &pools {
            let view = pool.replica_view(PREFIX).await;
            let mut published: HashMap<String, Vec<(String, Order)>> = HashMap::new();
            for v in &view.values {
                let (verdict, adopted) = self.store.offer_seen(&v.payload, &*self.tls, now);
                let Some((key, order)) = verdict else {
                    continue;
                };
                if adopted && self.wan.is_some() {
                    // A gateway brings it into its other pool.
                    if let Some(h) = self.store.get(&key.0, &key.1) {
                        self.mark_origin(&h.doc, Some(name), false);
                    }
                }
                // Only a copy under its own key counts as publishing it.
                if v.live && v.key == gossip_key(&key.0, &key.1) {
                    published
                        .entry(v.key.clone())
                        .or_default()
                        .push((v.node.clone(), order));
                }
            }
            views.push((*name, *pool, view, published));
        }
        let pruned = self.store.prune(now);
        if pruned > 0 || *self.store.subscribe().borrow() != before {
            self.save();
        }
        let held: BTreeMap<String, (Order, String)> = self
            .store
            .all()
            .into_iter()
            .map(|h| {
                (
                    gossip_key(&h.doc.header.kind, &h.doc.header.name),
                    (h.doc.order(), h.doc.text().to_string()),
                )
            })
            .collect();
        for (name, pool, view, published) in views {
            let synced = pool.synced() || self.bootstrap;
            let mine = self.origins.plan(
                name,
                &view,
                held.iter().map(|(k, (o, _))| (k.clone(), *o)),
                &published,
                synced,
            );
            metrics::gauge!(POLICY_PUBLISHED, "pool" => name, "kind" => "policy")
                .set(mine.len() as f64);
            let map: BTreeMap<String, String> = mine
                .into_iter()
                .filter_map(|k| held.get(&k).map(|(_, t)| (k, t.clone())))
                .collect();
            pool.publish_prefixed(PREFIX, map).await;
        }
    }

    /// Takes documents from the pools whenever gossip changes (and at least
    /// every second), and publishes this node's share.
    pub async fn run(self: Arc<Self>) {
        let mut lan = self.lan.watch_catalog();
        let mut wan = self.wan.as_ref().map(|w| w.watch_catalog());
        loop {
            self.round().await;
            crate::replicate::next_change(&mut lan, wan.as_mut()).await;
        }
    }
}
