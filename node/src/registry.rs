//! The node's own service instances: what it hosts, their health, and where
//! inbound tunnels for them connect.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use meshnode_gossip::keys::{check_key, clip_output, encode_check, CheckRecord, CHECK_PREFIX};
use meshnode_gossip::{GossipHandle, Health, ServiceRecord};
use meshnode_transport::pki::unix_now;
use tracing::warn;

use crate::config::ServiceConfig;

pub struct Registry {
    records: Mutex<Vec<ServiceRecord>>,
    /// Per checked instance (by index): why it has its health, published.
    checks: Mutex<HashMap<usize, CheckRecord>>,
    /// Per checked instance: the latest probe's output and when (local only).
    last: Mutex<HashMap<usize, (String, i64)>>,
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
        let now = unix_now();
        let checks = services
            .iter()
            .enumerate()
            .filter(|(_, s)| s.check.is_some())
            .map(|(i, _)| {
                (
                    i,
                    CheckRecord {
                        output: "not checked yet".into(),
                        since: now,
                    },
                )
            })
            .collect();
        Self {
            records: Mutex::new(records),
            checks: Mutex::new(checks),
            last: Mutex::new(HashMap::new()),
            targets,
            gossip,
        }
    }

    /// Records a probe's output (`ok` or why it failed), for status.
    pub fn note_probe(&self, index: usize, output: &str) {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(index, (clip_output(output), unix_now()));
    }

    /// Checked instances that are not passing: (service, port, health, the
    /// latest output, since when in that health).
    pub fn unhealthy(&self) -> Vec<(String, u16, Health, String, i64)> {
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        records
            .iter()
            .enumerate()
            .filter(|(_, r)| r.health != Health::Passing)
            .filter_map(|(i, r)| {
                let c = checks.get(&i)?;
                let output = last.get(&i).map_or(c.output.clone(), |(o, _)| o.clone());
                Some((r.name.clone(), r.port, r.health, output, c.since))
            })
            .collect()
    }

    /// The check records as gossip carries them.
    pub fn check_values(&self) -> std::collections::BTreeMap<String, String> {
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        checks
            .iter()
            .filter_map(|(i, c)| {
                let r = records.get(*i)?;
                Some((check_key(&r.name, r.port), encode_check(c).ok()?))
            })
            .collect()
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

    /// Updates one instance's health, with the check output that made it,
    /// and publishes both. Returns false when gossip is gone.
    pub async fn set_health(&self, index: usize, health: Health, output: &str) -> bool {
        let records = {
            let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
            match records.get_mut(index) {
                Some(r) => r.health = health,
                None => return false,
            }
            records.clone()
        };
        self.checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                index,
                CheckRecord {
                    output: clip_output(output),
                    since: unix_now(),
                },
            );
        if let Err(e) = self.gossip.publish_services(&records).await {
            warn!(error = %e, "cannot publish service health");
        }
        self.publish_checks().await;
        true
    }

    /// Publishes the check records (also once at start).
    pub async fn publish_checks(&self) {
        self.gossip
            .publish_prefixed(CHECK_PREFIX, self.check_values())
            .await;
    }
}
