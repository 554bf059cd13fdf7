//! What policy documents and revocations share: per-pool origins, the
//! replica plan over one pool's view, and the wait for the next change.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use meshnode_gossip::replica::{self, Held, Origins, REPLICAS};
use meshnode_gossip::{Catalog, ReplicaView};
use tokio::sync::watch;

/// The objects a node originated, per pool (`lan`, `wan`).
#[derive(Default)]
pub struct PoolOrigins {
    pools: Mutex<HashMap<&'static str, Origins>>,
}

impl PoolOrigins {
    /// This node originates `key` in each of `pools` but `except` (the pool
    /// it came from). `after_sync`: loaded from the data dir.
    pub fn mark(&self, key: &str, pools: &[&'static str], except: Option<&str>, after_sync: bool) {
        let mut all = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        for pool in pools.iter().filter(|p| Some(**p) != except) {
            all.entry(pool).or_default().mark(key, after_sync);
        }
    }

    /// The keys this node should publish in `pool`, of `held` (key ->
    /// order), given what live members publish there. Origins a holder has
    /// taken over are settled on the way.
    pub fn plan<O: Ord + Clone>(
        &self,
        pool: &'static str,
        view: &ReplicaView,
        held: impl Iterator<Item = (String, O)>,
        published: &HashMap<String, Vec<(String, O)>>,
        synced: bool,
    ) -> std::collections::BTreeSet<String> {
        let held: BTreeMap<String, Held<O>> = {
            let mut all = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            let origins = all.entry(pool).or_default();
            held.map(|(k, order)| {
                if replica::covered(&k, &order, &view.live, published, REPLICAS) {
                    origins.settle(&k);
                }
                let publishing = view.values.iter().any(|v| v.node == view.me && v.key == k);
                let may_repair = origins.may_repair(&k, synced, publishing);
                (k, Held { order, may_repair })
            })
            .collect()
        };
        replica::plan(&view.me, &view.live, &held, published, REPLICAS)
    }
}

/// Until either pool's gossip changes, or a second passes.
pub async fn next_change(
    lan: &mut watch::Receiver<std::sync::Arc<Catalog>>,
    wan: Option<&mut watch::Receiver<std::sync::Arc<Catalog>>>,
) {
    let wan_changed = async {
        match wan {
            Some(w) => {
                let _ = w.changed().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = lan.changed() => {}
        () = wan_changed => {}
        () = tokio::time::sleep(Duration::from_secs(1)) => {}
    }
}
