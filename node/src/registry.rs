//! The node's own service instances: what it hosts, their health, and where
//! inbound tunnels for them connect.
//!
//! A reload replaces the instances as a new *generation*. Check loops name
//! their instance by [`Slot`] (generation and index), so a loop of an older
//! generation can neither report into the new one nor keep running: its
//! next `set_health` returns false and it ends.

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

/// One checked instance of one generation of the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub generation: u64,
    pub index: usize,
}

/// One generation: the instances of one config.
struct Inner {
    generation: u64,
    services: Vec<ServiceConfig>,
    records: Vec<ServiceRecord>,
    /// Per checked instance (by index): why it has its health, published.
    checks: HashMap<usize, CheckRecord>,
    /// Per checked instance: the latest probe's output and when (local only).
    last: HashMap<usize, (String, i64)>,
    /// ttl checks: where reports for (service, port) go.
    ttl: HashMap<(String, u16), tokio::sync::mpsc::Sender<crate::health::Report>>,
    targets: HashMap<(String, u16), SocketAddr>,
}

pub struct Registry {
    inner: Mutex<Inner>,
    /// ttl checks: the token an application presents for its service.
    tokens: Mutex<HashMap<String, String>>,
    /// Held from reading the records to publishing them, so a check loop of
    /// a replaced generation cannot publish its records after the new ones.
    publishing: tokio::sync::Mutex<()>,
    gossip: GossipHandle,
}

/// Whether a reloaded instance is the same as a running one: then it keeps
/// its health, its check record and its latest output (no flap to critical
/// while the new check loop starts).
fn same_instance(a: &ServiceConfig, b: &ServiceConfig) -> bool {
    a.name == b.name && a.port == b.port && a.address == b.address && a.check == b.check
}

impl Inner {
    /// Services without a check are passing; checked ones start critical
    /// until probed, unless `previous` runs the same instance.
    fn new(generation: u64, services: &[ServiceConfig], previous: Option<&Inner>) -> Self {
        let now = unix_now();
        let mut records = Vec::with_capacity(services.len());
        let mut checks = HashMap::new();
        let mut last = HashMap::new();
        for (i, s) in services.iter().enumerate() {
            let carried = previous.and_then(|p| {
                let j = p.services.iter().position(|o| same_instance(o, s))?;
                Some((p, j))
            });
            let health = match (carried, &s.check) {
                (_, None) => Health::Passing,
                (Some((p, j)), Some(_)) => p.records.get(j).map_or(Health::Critical, |r| r.health),
                (None, Some(_)) => Health::Critical,
            };
            records.push(ServiceRecord {
                name: s.name.clone(),
                address: s.address.clone(),
                port: s.port,
                protocol: s.protocol,
                tags: s.tags.clone(),
                health,
            });
            if s.check.is_none() {
                continue;
            }
            let record = carried
                .and_then(|(p, j)| p.checks.get(&j).cloned())
                .unwrap_or_else(|| CheckRecord {
                    output: "not checked yet".into(),
                    since: now,
                });
            checks.insert(i, record);
            if let Some(out) = carried.and_then(|(p, j)| p.last.get(&j).cloned()) {
                last.insert(i, out);
            }
        }
        let targets = services
            .iter()
            .filter_map(|s| {
                let ip = s.address.parse().ok()?;
                Some(((s.name.clone(), s.port), SocketAddr::new(ip, s.port)))
            })
            .collect();
        Self {
            generation,
            services: services.to_vec(),
            records,
            checks,
            last,
            ttl: HashMap::new(),
            targets,
        }
    }

    fn check_values(&self) -> std::collections::BTreeMap<String, String> {
        self.checks
            .iter()
            .filter_map(|(i, c)| {
                let r = self.records.get(*i)?;
                Some((check_key(&r.name, r.port), encode_check(c).ok()?))
            })
            .collect()
    }
}

impl Registry {
    pub fn new(services: &[ServiceConfig], gossip: GossipHandle) -> Self {
        Self {
            inner: Mutex::new(Inner::new(1, services, None)),
            tokens: Mutex::new(HashMap::new()),
            publishing: tokio::sync::Mutex::new(()),
            gossip,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the instances with `services` (a reload) and returns the new
    /// generation and each instance's starting health. Same instances keep
    /// their health; the caller restarts the check loops and publishes.
    pub fn replace(&self, services: &[ServiceConfig]) -> (u64, Vec<Health>) {
        let mut inner = self.lock();
        let next = Inner::new(inner.generation + 1, services, Some(&inner));
        *inner = next;
        let healths = inner.records.iter().map(|r| r.health).collect();
        (inner.generation, healths)
    }

    /// The current generation's checked instances, with their starting health.
    pub fn checks(&self) -> Vec<(Slot, crate::config::CheckConfig, Health)> {
        let inner = self.lock();
        inner
            .services
            .iter()
            .enumerate()
            .filter_map(|(index, s)| {
                let check = s.check.clone()?;
                let health = inner.records.get(index).map(|r| r.health)?;
                Some((
                    Slot {
                        generation: inner.generation,
                        index,
                    },
                    check,
                    health,
                ))
            })
            .collect()
    }

    /// The receiving end of an instance's ttl reports.
    pub fn ttl_inbox(&self, slot: Slot) -> tokio::sync::mpsc::Receiver<crate::health::Report> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut inner = self.lock();
        if inner.generation != slot.generation {
            return rx;
        }
        if let Some(key) = inner
            .records
            .get(slot.index)
            .map(|r| (r.name.clone(), r.port))
        {
            inner.ttl.insert(key, tx);
        }
        rx
    }

    /// Writes `<dir>/<service>.token` (0640: readable by the node's group,
    /// where the application's user belongs) for every service with a ttl
    /// check. A service that had a token keeps it (a reload must not lock
    /// its application out); one that lost its ttl check loses its token
    /// and its file. At start every token is new.
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
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<String> = tokens
            .keys()
            .filter(|k| !names.contains(k.as_str()))
            .cloned()
            .collect();
        for name in gone {
            tokens.remove(&name);
            match std::fs::remove_file(dir.join(format!("{name}.token"))) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        if names.is_empty() {
            return Ok(());
        }
        std::fs::create_dir_all(dir)?;
        for name in names {
            if tokens.contains_key(name) {
                continue;
            }
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
        let inner = self.lock();
        let mut matching: Vec<_> = inner
            .ttl
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
    pub fn note_probe(&self, slot: Slot, output: &str) {
        let mut inner = self.lock();
        if inner.generation == slot.generation {
            inner
                .last
                .insert(slot.index, (clip_output(output), unix_now()));
        }
    }

    /// Checked instances that are not passing: (service, port, health, the
    /// latest output, since when in that health).
    pub fn unhealthy(&self) -> Vec<(String, u16, Health, String, i64)> {
        let inner = self.lock();
        inner
            .records
            .iter()
            .enumerate()
            .filter(|(_, r)| r.health != Health::Passing)
            .filter_map(|(i, r)| {
                let c = inner.checks.get(&i)?;
                let output = inner
                    .last
                    .get(&i)
                    .map_or(c.output.clone(), |(o, _)| o.clone());
                Some((r.name.clone(), r.port, r.health, output, c.since))
            })
            .collect()
    }

    /// The check records as gossip carries them.
    pub fn check_values(&self) -> std::collections::BTreeMap<String, String> {
        self.lock().check_values()
    }

    /// The current records.
    pub fn records(&self) -> Vec<ServiceRecord> {
        self.lock().records.clone()
    }

    pub fn name(&self, slot: Slot) -> String {
        self.lock()
            .records
            .get(slot.index)
            .map(|r| r.name.clone())
            .unwrap_or_default()
    }

    /// How many instances this node hosts.
    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where an inbound tunnel for (service, port) connects: only instances this node hosts.
    pub fn target(&self, service: &str, port: u16) -> Option<SocketAddr> {
        self.lock()
            .targets
            .get(&(service.to_string(), port))
            .copied()
    }

    /// Where a stream for `service` on any port connects (a gateway chose this
    /// node, not an instance): a non-critical instance, or `None`.
    pub fn target_any(&self, service: &str) -> Option<SocketAddr> {
        let inner = self.lock();
        inner
            .records
            .iter()
            .filter(|r| r.name == service && r.health != Health::Critical)
            .find_map(|r| inner.targets.get(&(service.to_string(), r.port)).copied())
    }

    /// The instance a tunnel header asks for, and the protocol it speaks:
    /// the named port, or for [`ANY_PORT`](meshnode_transport::tunnel::ANY_PORT)
    /// a non-critical instance, of the header's subset when it names one.
    pub fn lookup(
        &self,
        service: &str,
        port: u16,
        subset: Option<&str>,
    ) -> Option<(SocketAddr, meshnode_gossip::Protocol)> {
        let inner = self.lock();
        inner
            .records
            .iter()
            .filter(|r| r.name == service)
            .filter(|r| {
                if port == meshnode_transport::tunnel::ANY_PORT {
                    r.health != Health::Critical
                        && subset.is_none_or(|s| r.tags.iter().any(|t| t == s))
                } else {
                    r.port == port
                }
            })
            .find_map(|r| {
                inner
                    .targets
                    .get(&(service.to_string(), r.port))
                    .map(|a| (*a, r.protocol))
            })
    }

    /// Updates one instance's health, with the check output that made it,
    /// and publishes both. Returns false when gossip is gone or the slot
    /// belongs to a replaced generation (its check loop then ends).
    pub async fn set_health(&self, slot: Slot, health: Health, output: &str) -> bool {
        let _publishing = self.publishing.lock().await;
        let (records, checks) = {
            let mut inner = self.lock();
            if inner.generation != slot.generation {
                return false;
            }
            let unchanged = match inner.records.get_mut(slot.index) {
                Some(r) => std::mem::replace(&mut r.health, health) == health,
                None => return false,
            };
            // `since` is when the instance entered its health: a new output
            // in the same health (a reloaded check's first result) keeps it.
            let since = match inner.checks.get(&slot.index) {
                Some(c) if unchanged => c.since,
                _ => unix_now(),
            };
            inner.checks.insert(
                slot.index,
                CheckRecord {
                    output: clip_output(output),
                    since,
                },
            );
            (inner.records.clone(), inner.check_values())
        };
        // One change, one push: the health and why.
        if let Err(e) = self
            .gossip
            .publish_services_with(&records, Some((CHECK_PREFIX, checks)))
            .await
        {
            warn!(error = %e, "cannot publish service health");
        }
        true
    }

    /// Publishes the records and their checks, in one change (at start and
    /// after a reload).
    pub async fn publish(&self) -> Result<(), meshnode_gossip::GossipError> {
        let _publishing = self.publishing.lock().await;
        let (records, checks) = {
            let inner = self.lock();
            (inner.records.clone(), inner.check_values())
        };
        self.gossip
            .publish_services_with(&records, Some((CHECK_PREFIX, checks)))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CheckConfig, CheckTarget};
    use std::time::Duration;

    fn svc(name: &str, port: u16, check: Option<&str>) -> ServiceConfig {
        ServiceConfig {
            name: name.into(),
            address: "127.0.0.1".into(),
            port,
            protocol: meshnode_gossip::Protocol::Tcp,
            tags: Vec::new(),
            check: check.map(|t| CheckConfig {
                target: CheckTarget::Tcp(t.into()),
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                rise: 2,
                fall: 2,
            }),
        }
    }

    #[test]
    fn a_reload_keeps_the_health_of_unchanged_instances_only() {
        let old = [
            svc("api", 80, Some("127.0.0.1:80")),
            svc("db", 5432, Some("127.0.0.1:5432")),
        ];
        let mut first = Inner::new(1, &old, None);
        assert!(first.records.iter().all(|r| r.health == Health::Critical));
        for r in &mut first.records {
            r.health = Health::Passing;
        }
        first.last.insert(0, ("ok".into(), 7));
        // api unchanged but moved to index 1; db's check target changed; web is new.
        let new = [
            svc("db", 5432, Some("127.0.0.1:5433")),
            svc("api", 80, Some("127.0.0.1:80")),
            svc("web", 8080, Some("127.0.0.1:8080")),
            svc("plain", 9000, None),
        ];
        let next = Inner::new(2, &new, Some(&first));
        let health: Vec<Health> = next.records.iter().map(|r| r.health).collect();
        assert_eq!(
            health,
            [
                Health::Critical,
                Health::Passing,
                Health::Critical,
                Health::Passing
            ]
        );
        assert_eq!(next.last.get(&1), Some(&("ok".to_string(), 7)));
        assert!(!next.last.contains_key(&0));
        assert!(
            !next.checks.contains_key(&3),
            "an unchecked instance has no check record"
        );
        assert_eq!(next.generation, 2);
        assert_eq!(
            next.targets.get(&("web".to_string(), 8080)),
            Some(&"127.0.0.1:8080".parse().unwrap_or_else(|e| panic!("{e}")))
        );
    }
}
