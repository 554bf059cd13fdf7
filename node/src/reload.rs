//! Config reload without a restart (SIGHUP, `systemctl reload`,
//! `meshnode reload`).
//!
//! [`plan`] is the pure core: it compares the running config with a new one
//! and says what applies live (services and their checks, upstreams, the
//! log level) and which changed keys need a restart (everything else:
//! identity, addresses, the data dir, TLS paths, gossip tuning, which
//! chitchat reads once). [`Reloader`] is the shell that applies a plan: it
//! binds new upstream listeners first (a failure refuses the whole reload),
//! then swaps the registry's generation, restarts the check loops, publishes
//! the instances in one gossip change, and retargets the upstream accept
//! loops. Established streams are untouched: they run in tasks of their own,
//! and the gossip pool never sees the node leave.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use meshnode_transport::tls::TlsMaterial;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{Config, ConfigError, LoadError, UpstreamConfig};
use crate::drain::Drain;
use crate::health;
use crate::registry::Registry;
use crate::upstream::{self, Dialer};

/// What an upstream listener does at a reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Added,
    Removed,
    Changed,
}

/// What a reload from `old` to `new` does.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The services (or their checks) differ: a new registry generation.
    pub services: bool,
    /// Per listen address, in address order.
    pub upstreams: Vec<(SocketAddr, Change)>,
    pub log_level: bool,
    /// Changed keys that only a restart applies (dotted, as in the file).
    pub kept: Vec<String>,
}

impl Plan {
    /// Nothing applies and nothing is kept.
    pub fn is_empty(&self) -> bool {
        !self.services && self.upstreams.is_empty() && !self.log_level && self.kept.is_empty()
    }
}

/// Keys a reload applies; every other key needs a restart.
const LIVE: [&str; 3] = ["services", "upstreams", "log_level"];

/// Compares two validated configs. Pure.
pub fn plan(old: &Config, new: &Config) -> Plan {
    let mut upstreams: BTreeMap<SocketAddr, Change> = BTreeMap::new();
    for o in &old.upstreams {
        match new.upstreams.iter().find(|n| n.listen == o.listen) {
            None => {
                upstreams.insert(o.listen, Change::Removed);
            }
            Some(n) if n != o => {
                upstreams.insert(o.listen, Change::Changed);
            }
            Some(_) => {}
        }
    }
    for n in &new.upstreams {
        if !old.upstreams.iter().any(|o| o.listen == n.listen) {
            upstreams.insert(n.listen, Change::Added);
        }
    }
    Plan {
        services: old.services != new.services,
        upstreams: upstreams.into_iter().collect(),
        log_level: old.log_level != new.log_level,
        kept: fixed_changes(old, new),
    }
}

/// The keys outside [`LIVE`] whose values differ, one level into tables
/// (`gossip.interval`), named as the file names them.
fn fixed_changes(old: &Config, new: &Config) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(old), serde_json::to_value(new))
    else {
        return Vec::new();
    };
    let null = serde_json::Value::Null;
    let mut out = Vec::new();
    for (key, av) in &a {
        if LIVE.contains(&key.as_str()) {
            continue;
        }
        let bv = b.get(key).unwrap_or(&null);
        if av == bv {
            continue;
        }
        match (av, bv) {
            (serde_json::Value::Object(am), serde_json::Value::Object(bm)) => {
                let mut keys: Vec<&String> = am.keys().chain(bm.keys()).collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    if am.get(k) != bm.get(k) {
                        out.push(format!("{key}.{k}"));
                    }
                }
            }
            _ => out.push(key.clone()),
        }
    }
    out.sort();
    out
}

/// Parses filter directives and makes them the process's log filter.
pub type SetFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Sets the process's log filter; `overridden` when `MESHNODE_LOG` fixed it.
pub struct LogControl {
    pub set: SetFilter,
    pub overridden: bool,
}

/// A key a reload left as it runs, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Kept {
    pub key: String,
    pub reason: String,
}

/// What a reload did.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The config file read.
    pub config: String,
    /// The parts that changed and now run: `service`, `upstream`, `log_level`.
    pub applied: Vec<String>,
    pub upstreams: Vec<UpstreamChange>,
    pub kept: Vec<Kept>,
    /// Instances and upstreams after the reload.
    pub services: usize,
    pub upstream_count: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct UpstreamChange {
    pub listen: SocketAddr,
    pub change: Change,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("this agent was not started from a config file; nothing to reload")]
    NoSource,
    #[error("{0}")]
    Load(#[from] LoadError),
    #[error("config refused, the running one is kept: {0}")]
    Credentials(String),
    #[error("config refused, the running one is kept: upstream {service}: cannot bind tcp {addr}: {source}")]
    Bind {
        service: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("config refused, the running one is kept: cannot write check tokens: {0}")]
    Tokens(std::io::Error),
}

impl ReloadError {
    /// The keys at fault, when the file is invalid.
    pub fn keys(&self) -> &[ConfigError] {
        match self {
            ReloadError::Load(LoadError::Invalid(errors)) => errors,
            _ => &[],
        }
    }
}

struct RunningUpstream {
    config: watch::Sender<Option<UpstreamConfig>>,
    task: tokio::task::JoinHandle<()>,
}

struct State {
    /// The config as it runs: the file's live keys, the start's fixed ones.
    cfg: Config,
    checks: Vec<tokio::task::JoinHandle<()>>,
    upstreams: BTreeMap<SocketAddr, RunningUpstream>,
}

/// Applies reloads; one at a time.
pub struct Reloader {
    source: Option<PathBuf>,
    state: tokio::sync::Mutex<State>,
    registry: Arc<Registry>,
    dialer: Arc<Dialer>,
    drain: Drain,
    tls: Arc<TlsMaterial>,
    log: Option<LogControl>,
    /// The upstreams as they run (`as` resolved), for status and explain.
    view: Arc<RwLock<Vec<UpstreamConfig>>>,
}

/// What [`Reloader::start`] needs from `build`.
pub(crate) struct Parts {
    pub source: Option<PathBuf>,
    pub registry: Arc<Registry>,
    pub dialer: Arc<Dialer>,
    pub drain: Drain,
    pub tls: Arc<TlsMaterial>,
    pub log: Option<LogControl>,
}

impl Reloader {
    /// Starts the check loops and upstream listeners of the first config.
    /// `listeners` are bound already, one per upstream in config order.
    pub(crate) fn start(
        cfg: Config,
        listeners: Vec<TcpListener>,
        parts: Parts,
    ) -> Result<Arc<Self>, crate::app::AppError> {
        let me = parts.tls.me();
        let checks = health::spawn_checks(parts.registry.checks(), parts.registry.clone());
        let mut upstreams = BTreeMap::new();
        let mut view = Vec::new();
        for (up, listener) in cfg.upstreams.iter().zip(listeners) {
            let resolved = resolve(up, &me);
            view.push(resolved.clone());
            upstreams.insert(
                up.listen,
                spawn_upstream(listener, resolved, &parts.dialer, &parts.drain),
            );
        }
        Ok(Arc::new(Self {
            source: parts.source,
            state: tokio::sync::Mutex::new(State {
                cfg,
                checks,
                upstreams,
            }),
            registry: parts.registry,
            dialer: parts.dialer,
            drain: parts.drain,
            tls: parts.tls,
            log: parts.log,
            view: Arc::new(RwLock::new(view)),
        }))
    }

    /// The upstreams as they run.
    pub fn upstreams(&self) -> Vec<UpstreamConfig> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the config file again and applies it.
    pub async fn reload_from_source(&self) -> Result<Report, ReloadError> {
        let path = self.source.as_ref().ok_or(ReloadError::NoSource)?;
        let cfg = Config::load(path)?;
        self.reload(cfg, &path.display().to_string()).await
    }

    /// Applies `new` as far as it can change live; a config that `run`
    /// would refuse is refused here and nothing changes.
    pub async fn reload(&self, new: Config, source: &str) -> Result<Report, ReloadError> {
        let mut state = self.state.lock().await;
        let plan = plan(&state.cfg, &new);
        let me = self.tls.me();
        crate::app::check_act_as(&new, &me).map_err(|e| ReloadError::Credentials(e.to_string()))?;
        // Bind before anything changes: a taken port refuses the reload.
        let mut bound = BTreeMap::new();
        for (addr, change) in &plan.upstreams {
            if *change != Change::Added {
                continue;
            }
            let up = new.upstreams.iter().find(|u| u.listen == *addr);
            let service = up.map(|u| u.service.clone()).unwrap_or_default();
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ReloadError::Bind {
                    service,
                    addr: *addr,
                    source,
                })?;
            bound.insert(*addr, listener);
        }
        let mut applied = Vec::new();
        if plan.services {
            let dir = state.cfg.data_dir.join(crate::app::CHECK_TOKENS_DIR);
            self.registry
                .write_check_tokens(&new.services, &dir)
                .map_err(ReloadError::Tokens)?;
            for t in state.checks.drain(..) {
                t.abort();
            }
            self.registry.replace(&new.services);
            state.checks = health::spawn_checks(self.registry.checks(), self.registry.clone());
            if let Err(e) = self.registry.publish().await {
                warn!(error = %e, "cannot publish the reloaded services");
            }
            applied.push("service".to_string());
        }
        for (addr, change) in &plan.upstreams {
            match change {
                Change::Removed => {
                    if let Some(r) = state.upstreams.remove(addr) {
                        let _ = r.config.send(None);
                    }
                }
                Change::Changed => {
                    let up = new.upstreams.iter().find(|u| u.listen == *addr);
                    if let (Some(r), Some(up)) = (state.upstreams.get(addr), up) {
                        let _ = r.config.send(Some(resolve(up, &me)));
                    }
                }
                Change::Added => {
                    let up = new.upstreams.iter().find(|u| u.listen == *addr);
                    if let (Some(listener), Some(up)) = (bound.remove(addr), up) {
                        let running =
                            spawn_upstream(listener, resolve(up, &me), &self.dialer, &self.drain);
                        state.upstreams.insert(*addr, running);
                    }
                }
            }
        }
        if !plan.upstreams.is_empty() {
            applied.push("upstream".to_string());
            *self.view.write().unwrap_or_else(|e| e.into_inner()) =
                new.upstreams.iter().map(|u| resolve(u, &me)).collect();
        }
        let mut kept: Vec<Kept> = plan
            .kept
            .iter()
            .map(|key| Kept {
                key: key.clone(),
                reason: "needs a restart".into(),
            })
            .collect();
        let mut log_level = state.cfg.log_level.clone();
        if plan.log_level {
            match &self.log {
                Some(log) if log.overridden => kept.push(Kept {
                    key: "log_level".into(),
                    reason: "MESHNODE_LOG overrides it".into(),
                }),
                Some(log) => match (log.set)(&new.log_level) {
                    Ok(()) => {
                        log_level = new.log_level.clone();
                        applied.push("log_level".to_string());
                    }
                    Err(e) => kept.push(Kept {
                        key: "log_level".into(),
                        reason: e,
                    }),
                },
                None => kept.push(Kept {
                    key: "log_level".into(),
                    reason: "this process has no log filter to change".into(),
                }),
            }
        }
        state.cfg.services = new.services.clone();
        state.cfg.upstreams = new.upstreams.clone();
        state.cfg.log_level = log_level;
        for k in &kept {
            warn!(key = %k.key, reason = %k.reason, "reload: key changed but not applied; the running value is kept");
        }
        let report = Report {
            config: source.to_string(),
            applied,
            upstreams: plan
                .upstreams
                .iter()
                .map(|(listen, change)| UpstreamChange {
                    listen: *listen,
                    change: *change,
                })
                .collect(),
            kept,
            services: self.registry.len(),
            upstream_count: state.upstreams.len(),
        };
        info!(config = %source, applied = ?report.applied, kept = report.kept.len(), services = report.services, upstreams = report.upstream_count, "config reloaded");
        Ok(report)
    }

    /// Stops every check loop and upstream listener (at shutdown).
    pub async fn abort(&self) {
        let state = self.state.lock().await;
        for t in &state.checks {
            t.abort();
        }
        for r in state.upstreams.values() {
            r.task.abort();
        }
    }
}

fn resolve(up: &UpstreamConfig, me: &meshnode_transport::PeerCert) -> UpstreamConfig {
    let mut up = up.clone();
    up.as_service = crate::app::acting_as(&up, me);
    up
}

fn spawn_upstream(
    listener: TcpListener,
    up: UpstreamConfig,
    dialer: &Arc<Dialer>,
    drain: &Drain,
) -> RunningUpstream {
    if let Some(s) = &up.as_service {
        info!(service = %up.service, acting_as = %s, "upstream callers act as a service");
    }
    let (config, rx) = watch::channel(Some(up));
    let task = tokio::spawn(upstream::serve(listener, rx, dialer.clone(), drain.clone()));
    RunningUpstream { config, task }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
node = "n1"
cluster = "c"
mesh = "m"
data_dir = "/tmp/x"
bind = "127.0.0.1:9470"
admin = "127.0.0.1:9471"
seeds = ["127.0.0.2:9470"]

[[service]]
name = "api"
port = 8080

[[upstream]]
service = "db"
listen = "127.0.0.1:15432"
"#;

    fn cfg(text: &str) -> Config {
        match Config::from_toml_str(text) {
            Ok(c) => c,
            Err(e) => panic!("test config: {e}"),
        }
    }

    #[test]
    fn the_same_config_plans_nothing() {
        assert!(plan(&cfg(BASE), &cfg(BASE)).is_empty());
    }

    #[test]
    fn services_upstreams_and_log_level_apply_live() {
        let new = "log_level = \"debug\"\n".to_string()
            + &BASE
                .replace("port = 8080", "port = 8081")
                .replace("127.0.0.1:15432", "127.0.0.1:15433")
            + "\n[[upstream]]\nservice = \"cache\"\nlisten = \"127.0.0.1:16379\"\n";
        let p = plan(&cfg(BASE), &cfg(&new));
        assert!(p.services && p.log_level, "{p:?}");
        assert_eq!(p.kept, Vec::<String>::new());
        let at = |s: &str| s.parse::<SocketAddr>().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            p.upstreams,
            vec![
                (at("127.0.0.1:15432"), Change::Removed),
                (at("127.0.0.1:15433"), Change::Added),
                (at("127.0.0.1:16379"), Change::Added),
            ]
        );
    }

    #[test]
    fn an_upstream_on_the_same_address_changes_in_place() {
        let new = BASE.replace("service = \"db\"", "service = \"pg\"");
        let p = plan(&cfg(BASE), &cfg(&new));
        assert_eq!(
            p.upstreams,
            vec![(
                "127.0.0.1:15432".parse().unwrap_or_else(|e| panic!("{e}")),
                Change::Changed
            )]
        );
        assert!(!p.services);
    }

    #[test]
    fn identity_addresses_and_gossip_tuning_need_a_restart() {
        let new = BASE
            .replace("node = \"n1\"", "node = \"n2\"")
            .replace("127.0.0.1:9470", "127.0.0.1:9480")
            .replace("[\"127.0.0.2:9470\"]", "[]")
            + "\n[gossip]\ninterval = \"2s\"\n";
        let p = plan(&cfg(BASE), &cfg(&new));
        assert_eq!(p.kept, ["bind", "gossip.interval", "node", "seeds"]);
        assert!(!p.services && p.upstreams.is_empty() && !p.log_level);
    }
}
