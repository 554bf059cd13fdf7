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

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReportError {
    #[error("this node has no ttl check for that service (and port)")]
    NoTtlCheck,
    #[error("wrong token: read it from <data_dir>/checks/<service>.token")]
    Token,
    #[error("the service has several ttl-checked instances: give the port")]
    WhichPort,
    #[error("too many reports at once; try again")]
    Busy,
}

pub struct Registry {
    records: Mutex<Vec<ServiceRecord>>,
    /// Per checked instance (by index): why it has its health, published.
    checks: Mutex<HashMap<usize, CheckRecord>>,
    /// Per checked instance: the latest probe's output and when (local only).
    last: Mutex<HashMap<usize, (String, i64)>>,
    /// ttl checks: where reports for (service, port) go.
    ttl: Mutex<HashMap<(String, u16), tokio::sync::mpsc::Sender<crate::health::Report>>>,
    /// ttl checks: the token an application presents for its service.
    tokens: Mutex<HashMap<String, String>>,
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
            ttl: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            targets,
            gossip,
        }
    }

    /// The receiving end of instance `index`'s ttl reports.
    pub fn ttl_inbox(&self, index: usize) -> tokio::sync::mpsc::Receiver<crate::health::Report> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let key = {
            let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
            records.get(index).map(|r| (r.name.clone(), r.port))
        };
        if let Some(key) = key {
            self.ttl
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, tx);
        }
        rx
    }

    /// Writes `<dir>/<service>.token` (0640: readable by the node's group,
    /// where the application's user belongs) for every service with a ttl
    /// check; a new token at each start.
    pub fn write_check_tokens(
        &self,
        services: &[ServiceConfig],
        dir: &std::path::Path,
    ) -> std::io::Result<()> {
        use rand::RngExt;
        let names: std::collections::BTreeSet<&str> = services
            .iter()
            .filter(|s| {
                matches!(
                    s.check.as_ref().map(|c| &c.target),
                    Some(crate::config::CheckTarget::Ttl(_))
                )
            })
            .map(|s| s.name.as_str())
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        std::fs::create_dir_all(dir)?;
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        for name in names {
            let bytes: [u8; 24] = rand::rng().random();
            let token = meshnode_transport::pki::hex(&bytes);
            meshnode_transport::pki::write_atomic(
                &dir.join(format!("{name}.token")),
                format!("{token}\n").as_bytes(),
                0o640,
            )
            .map_err(|e| std::io::Error::other(e.to_string()))?;
            tokens.insert(name.to_string(), token);
        }
        Ok(())
    }

    /// A ttl report from the application of `service` (on `port`, or its
    /// only ttl-checked instance), authorized by its token.
    pub fn report(
        &self,
        service: &str,
        port: Option<u16>,
        token: &str,
        outcome: crate::health::Outcome,
    ) -> Result<(), ReportError> {
        let expected = self
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(service)
            .cloned()
            .ok_or(ReportError::NoTtlCheck)?;
        if !meshnode_transport::pki::secret_eq(token.as_bytes(), expected.as_bytes()) {
            return Err(ReportError::Token);
        }
        let ttl = self.ttl.lock().unwrap_or_else(|e| e.into_inner());
        let mut matching: Vec<_> = ttl
            .iter()
            .filter(|((s, p), _)| s == service && port.is_none_or(|want| want == *p))
            .collect();
        let tx = match (matching.len(), port) {
            (1, _) => matching.remove(0).1,
            (0, _) => return Err(ReportError::NoTtlCheck),
            (_, _) => return Err(ReportError::WhichPort),
        };
        tx.try_send(crate::health::Report { outcome })
            .map_err(|_| ReportError::Busy)
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
        // One change, one push: the health and why.
        if let Err(e) = self
            .gossip
            .publish_services_with(&records, Some((CHECK_PREFIX, self.check_values())))
            .await
        {
            warn!(error = %e, "cannot publish service health");
        }
        true
    }

    /// Publishes the records and their checks, in one change (at start).
    pub async fn publish(&self) -> Result<(), meshnode_gossip::GossipError> {
        let records = self.records();
        self.gossip
            .publish_services_with(&records, Some((CHECK_PREFIX, self.check_values())))
            .await
    }
}
