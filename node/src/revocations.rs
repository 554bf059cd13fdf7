//! Revocations on every node: loaded from `<data_dir>/revocations` at start,
//! taken from any node's `rev:` keys in the LAN (and, on gateways, the WAN)
//! pool once their CA signature checks out, enforced by the TLS verifiers and
//! the endpoint (which closes live connections of a revoked peer), and
//! persisted. Like policy documents, each entry is published in a pool only
//! by the few nodes [`meshnode_gossip::replica`] picks for it (and by a node
//! that holds it while none of those does), so gossip state holds a few
//! copies of it rather than one per node, and it outlives the CA node that
//! made it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use meshnode_gossip::keys::REVOCATION_PREFIX;
use meshnode_gossip::GossipHandle;
use meshnode_transport::pki::revocation::SignedRevocation;
use meshnode_transport::pki::{unix_now, write_atomic};
use meshnode_transport::tls::TlsMaterial;
use tracing::{info, warn};

use crate::metrics::{POLICY_PUBLISHED, REVOCATIONS};

pub const FILE: &str = "revocations";

pub struct Revocations {
    pub tls: Arc<TlsMaterial>,
    pub path: PathBuf,
    pub lan: GossipHandle,
    pub wan: Option<GossipHandle>,
    /// Per pool: the entries this node originated there (see `replica`).
    pub origins: crate::replicate::PoolOrigins,
}

impl Revocations {
    /// Loads the persisted entries; one that no longer verifies is skipped with a warning.
    pub fn load(&self) -> usize {
        let n = self.load_entries();
        if n > 0 {
            info!(entries = n, path = %self.path.display(), "revocations loaded");
        }
        n
    }

    fn load_entries(&self) -> usize {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "cannot read revocations");
                return 0;
            }
        };
        let now = unix_now();
        let mut n = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match self.verify(line) {
                Ok(e) => {
                    self.mark_origin(&e.id(), None, true);
                    n += usize::from(self.tls.revocations().insert(e, now))
                }
                Err(e) => {
                    warn!(path = %self.path.display(), error = %e, "skipping a stored revocation")
                }
            }
        }
        n
    }

    fn verify(&self, text: &str) -> Result<SignedRevocation, String> {
        let mut last = String::from("no CA certificate");
        for ca in self.tls.ca_certs() {
            match SignedRevocation::verify(text, ca, self.tls.mesh()) {
                Ok(e) => return Ok(e),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }

    /// This node originates entry `id` in every pool but `except`.
    fn mark_origin(&self, id: &str, except: Option<&str>, after_sync: bool) {
        let pools: &[&'static str] = if self.wan.is_some() {
            &["lan", "wan"]
        } else {
            &["lan"]
        };
        let key = format!("{REVOCATION_PREFIX}{id}");
        self.origins.mark(&key, pools, except, after_sync);
    }

    /// Adopts an entry made on this node (a CA node's `revoke`).
    pub async fn adopt(&self, entry: SignedRevocation) -> Result<(), String> {
        self.mark_origin(&entry.id(), None, false);
        self.tls.revocations().insert(entry, unix_now());
        self.save()?;
        self.publish().await;
        Ok(())
    }

    fn save(&self) -> Result<(), String> {
        let mut text = String::new();
        for e in self.tls.revocations().entries() {
            text.push_str(&e.to_text());
            text.push('\n');
        }
        write_atomic(&self.path, text.as_bytes(), 0o600).map_err(|e| e.to_string())
    }

    /// Publishes this node's share of the entries in each pool.
    async fn publish(&self) {
        let entries: BTreeMap<String, String> = self
            .tls
            .revocations()
            .entries()
            .into_iter()
            .map(|e| (format!("{REVOCATION_PREFIX}{}", e.id()), e.to_text()))
            .collect();
        metrics::gauge!(REVOCATIONS).set(entries.len() as f64);
        let mut pools = vec![("lan", &self.lan)];
        pools.extend(self.wan.as_ref().map(|w| ("wan", w)));
        for (name, pool) in pools {
            let view = pool.replica_view(REVOCATION_PREFIX).await;
            // Only a live member's exact copy counts as publishing an entry.
            let mut published: HashMap<String, Vec<(String, ())>> = HashMap::new();
            for v in view.values.iter().filter(|v| v.live) {
                if entries.get(&v.key).is_some_and(|t| *t == v.payload) {
                    published
                        .entry(v.key.clone())
                        .or_default()
                        .push((v.node.clone(), ()));
                }
            }
            let mine = self.origins.plan(
                name,
                &view,
                entries.keys().map(|k| (k.clone(), ())),
                &published,
                pool.synced(),
            );
            metrics::gauge!(POLICY_PUBLISHED, "pool" => name, "kind" => "revocation")
                .set(mine.len() as f64);
            let map = mine
                .into_iter()
                .filter_map(|k| entries.get(&k).map(|t| (k, t.clone())))
                .collect();
            pool.publish_prefixed(REVOCATION_PREFIX, map).await;
        }
    }

    /// Takes new entries from the pools whenever gossip changes (and at least
    /// every second), prunes expired ones, and re-publishes.
    pub async fn run(self: Arc<Self>) {
        let mut lan = self.lan.watch_catalog();
        let mut wan = self.wan.as_ref().map(|w| w.watch_catalog());
        // Texts that did not verify, so each is checked (and logged) once.
        let mut bad: std::collections::HashSet<[u8; 32]> = Default::default();
        loop {
            let mut fresh = 0;
            let mut pools = vec![("lan", &self.lan)];
            pools.extend(self.wan.as_ref().map(|w| ("wan", w)));
            for (name, pool) in pools {
                // Every copy, not one per key: a member could put garbage
                // under an entry's key to hide the real one.
                for v in pool.replica_view(REVOCATION_PREFIX).await.values {
                    let id = v.key.trim_start_matches(REVOCATION_PREFIX);
                    if self.tls.revocations().contains(id) {
                        continue;
                    }
                    let hash = meshnode_transport::pki::sha256(v.payload.as_bytes());
                    if bad.contains(&hash) {
                        continue;
                    }
                    match self.verify(&v.payload) {
                        Ok(e) => {
                            info!(id = %e.id(), identity = ?e.revocation.identity.as_ref().map(|i| i.to_string()), keys = e.revocation.keys.len(), "revocation adopted");
                            // A gateway brings it into its other pool.
                            self.mark_origin(&e.id(), Some(name), false);
                            fresh += usize::from(self.tls.revocations().insert(e, unix_now()));
                        }
                        Err(e) => {
                            if bad.len() >= 4_096 {
                                bad.clear();
                            }
                            bad.insert(hash);
                            warn!(key = %v.key, from = %v.node, error = %e, "ignoring a revocation that does not verify")
                        }
                    }
                }
            }
            let pruned = self.tls.revocations().prune(unix_now());
            if fresh + pruned > 0 {
                if let Err(e) = self.save() {
                    warn!(error = %e, "cannot persist revocations");
                }
            }
            // Every round: who should publish changes with the live set.
            self.publish().await;
            crate::replicate::next_change(&mut lan, wan.as_mut()).await;
        }
    }
}
