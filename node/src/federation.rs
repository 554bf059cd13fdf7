//! A gateway's federation loop: summarize the own cluster into the WAN pool,
//! and re-publish every other cluster's summary into the LAN pool.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use meshnode_gossip::catalog::{ca_nodes, NodeSnapshot};
use meshnode_gossip::federation::{
    encode_remote, encode_summary, remote_key, remote_records, summarize, WanView, REMOTE_PREFIX,
    SUMMARY_PREFIX,
};
use meshnode_gossip::keys::{encode_ca_via, CaVia, CA_ROLE_KEY, CA_VIA_KEY};
use meshnode_gossip::GossipHandle;
use meshnode_transport::alpn::Alpn;
use meshnode_transport::Endpoint;
use meshnode_transport::Identity;
use tokio::sync::watch;
use tracing::{debug, info};

/// Re-derive at least this often, so measured RTTs reach the LAN records.
const REFRESH: Duration = Duration::from_secs(1);

/// Starts the loop; the returned watch holds the latest WAN view.
pub fn spawn(
    lan: GossipHandle,
    wan: GossipHandle,
    endpoint: Endpoint,
    cluster: String,
) -> (watch::Receiver<Arc<WanView>>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(Arc::new(WanView::default()));
    let task = tokio::spawn(async move {
        let mut lan_changes = lan.watch_catalog();
        let mut wan_changes = wan.watch_catalog();
        let mut reachable: BTreeMap<String, bool> = BTreeMap::new();
        let mut ca_checked: Option<tokio::time::Instant> = None;
        loop {
            let summaries: BTreeMap<String, String> = summarize(&lan.catalog(), &cluster)
                .into_iter()
                .filter_map(|(svc, sum)| {
                    let v = encode_summary(&sum)
                        .map_err(|e| debug!(service = %svc, error = %e, "summary not published"))
                        .ok()?;
                    Some((format!("{SUMMARY_PREFIX}{svc}"), v))
                })
                .collect();
            wan.publish_prefixed(SUMMARY_PREFIX, summaries).await;
            // Front a live CA node of the own cluster, so gateways of clusters
            // without one relay joins and renewals here. A full LAN snapshot
            // per catalog change would be costly in a large pool; the CA
            // role changes rarely, so once per REFRESH is enough.
            if ca_checked.is_none_or(|t| meshnode_transport::clock::tokio_since(t) >= REFRESH) {
                ca_checked = Some(meshnode_transport::clock::tokio_now());
                let fronted = ca_via(&lan.snapshot().await, &endpoint.me().identity);
                wan.publish_prefixed(CA_VIA_KEY, fronted.into_iter().collect())
                    .await;
            }

            let view = WanView::derive(&wan.snapshot().await);
            let records = remote_records(&view, &cluster, |a| endpoint.rtt(a, Alpn::WanGossip));
            for r in &records {
                let was = reachable.insert(r.cluster.clone(), r.reachable);
                if was != Some(r.reachable) {
                    info!(cluster = %r.cluster, reachable = r.reachable, gateways = ?r.gateways, "remote cluster");
                }
            }
            let encoded: BTreeMap<String, String> = records
                .iter()
                .filter_map(|r| Some((remote_key(r), encode_remote(r).ok()?)))
                .collect();
            lan.publish_prefixed(REMOTE_PREFIX, encoded).await;
            tx.send_replace(Arc::new(view));

            tokio::select! {
                r = lan_changes.changed() => if r.is_err() { return },
                r = wan_changes.changed() => if r.is_err() { return },
                () = tokio::time::sleep(REFRESH) => {}
            }
        }
    });
    (rx, task)
}

/// The `ca_via` entry for the first live CA node of the own pool (its
/// `role:ca` proof, which the pool's gate verified), or none.
fn ca_via(lan: &[NodeSnapshot], me: &Identity) -> Option<(String, String)> {
    ca_nodes(lan).into_iter().find_map(|(name, _)| {
        let proof = lan
            .iter()
            .filter(|n| n.node == name)
            .max_by_key(|n| n.generation)?
            .kvs
            .get(CA_ROLE_KEY)?
            .clone();
        let node = Identity::new(me.mesh(), me.cluster(), &name).ok()?.uri();
        let value = encode_ca_via(&CaVia { node, proof }).ok()?;
        Some((CA_VIA_KEY.to_string(), value))
    })
}
