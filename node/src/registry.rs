//! The node's own service instances: what it hosts, their health, and where
//! inbound tunnels for them connect.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use meshnode_gossip::{GossipHandle, Health, ServiceRecord};
use tracing::warn;

use crate::config::ServiceConfig;

pub struct Registry {
    records: Mutex<Vec<ServiceRecord>>,
    targets: HashMap<(String, u16), SocketAddr>,
    gossip: GossipHandle,
}

impl Registry {
    /// Services without a check are passing; checked ones start critical until probed.
    pub fn new(services: &[ServiceConfig], gossip: GossipHandle) -> Self {
        let records = services
            .iter()
            .map(|s| ServiceRecord {
                name: s.name.clone(),
                address: s.address.clone(),
                port: s.port,
                protocol: s.protocol,
                tags: s.tags.clone(),
                health: if s.check.is_some() {
                    Health::Critical
                } else {
                    Health::Passing
                },
            })
            .collect();
        let targets = services
            .iter()
            .filter_map(|s| {
                let ip = s.address.parse().ok()?;
                Some(((s.name.clone(), s.port), SocketAddr::new(ip, s.port)))
            })
            .collect();
        Self {
            records: Mutex::new(records),
            targets,
            gossip,
        }
    }

    /// The records as first published.
    pub fn records(&self) -> Vec<ServiceRecord> {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn name(&self, index: usize) -> String {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(index)
            .map(|r| r.name.clone())
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// Where an inbound tunnel for (service, port) connects: only instances this node hosts.
    pub fn target(&self, service: &str, port: u16) -> Option<SocketAddr> {
        self.targets.get(&(service.to_string(), port)).copied()
    }

    /// Where a stream for `service` on any port connects (a gateway chose this
    /// node, not an instance): a non-critical instance, or `None`.
    pub fn target_any(&self, service: &str) -> Option<SocketAddr> {
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        records
            .iter()
            .filter(|r| r.name == service && r.health != Health::Critical)
            .find_map(|r| self.target(service, r.port))
    }

    /// Updates one instance's health and publishes the change. Returns false when gossip is gone.
    pub async fn set_health(&self, index: usize, health: Health) -> bool {
        let records = {
            let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
            match records.get_mut(index) {
                Some(r) => r.health = health,
                None => return false,
            }
            records.clone()
        };
        if let Err(e) = self.gossip.publish_services(&records).await {
            warn!(error = %e, "cannot publish service health");
        }
        true
    }
}
