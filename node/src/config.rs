//! The agent's configuration: the TOML contract of `../shared/design.md`.
//!
//! Parsing happens in two steps. [`RawConfig`] mirrors the file with loose types
//! (addresses and durations as strings) so that nearly any well-formed TOML
//! deserializes; unknown keys are collected, not fatal. [`RawConfig::validate`]
//! then checks every key and reports *all* problems at once, each naming its
//! dotted key (`service[1].check.interval`).

mod raw;
pub(crate) use raw::parse_toml;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshnode_gossip::Protocol;
use serde::Serialize;

pub use raw::{hostname, RawConfig, DEFAULT_WORKERS};

/// The validated configuration.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub node: String,
    pub cluster: String,
    pub mesh: String,
    pub data_dir: PathBuf,
    pub bind: SocketAddr,
    pub advertise: Option<SocketAddr>,
    pub admin: SocketAddr,
    /// Allows a non-loopback `admin` address; then every endpoint but
    /// `/v1/health` and `/metrics` needs the admin secret.
    pub admin_allow_remote: bool,
    pub seeds: Vec<SocketAddr>,
    pub gateway: bool,
    /// Threads of the node's async runtime (data plane, gossip, admin API).
    pub workers: usize,
    /// How the agent writes its log lines to stderr (`MESHNODE_LOG_FORMAT`
    /// overrides it).
    pub log_format: LogFormat,
    /// What the agent logs: a level or `tracing` filter directives
    /// (`info,meshnode_node=debug`); `MESHNODE_LOG` overrides it. A reload
    /// applies a new value.
    pub log_level: String,
    pub wan_advertise: Option<SocketAddr>,
    pub wan_seeds: Vec<SocketAddr>,
    /// Cross-cluster callers: `end_to_end` (default) runs a TLS session with
    /// the destination node inside every cross-cluster stream and refuses
    /// streams without one; `gateway` trusts the caller the gateways carry
    /// (meshes with nodes from before end-to-end sessions, while they upgrade).
    pub cross_cluster_identity: CrossClusterIdentity,
    pub tls: TlsPaths,
    pub services: Vec<ServiceConfig>,
    pub upstreams: Vec<UpstreamConfig>,
    pub gossip: GossipSettings,
    /// Set on CA nodes: the node holds the CA key and signs joins and renewals.
    pub ca: Option<CaSettings>,
    pub telemetry: TelemetrySettings,
    /// `[dns]`: the DNS interface, when `listen` is set.
    pub dns: Option<DnsSettings>,
}

/// `[dns]`: see [`crate::dns`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DnsSettings {
    /// UDP and TCP, on a loopback address.
    pub listen: SocketAddr,
    pub mode: crate::dns::DnsMode,
    /// Seconds, for answers and (as the SOA minimum) for negative answers.
    pub ttl: u32,
    /// The zone, lower case without the final dot (default `mesh`).
    pub domain: String,
}

/// `[dns] ttl` when none is set: short, so a client that cached an
/// instance (`mode = "instances"`) moves on within seconds of a failure.
pub const DEFAULT_DNS_TTL: u32 = 5;
/// `[dns] domain` when none is set.
pub const DEFAULT_DNS_DOMAIN: &str = "mesh";

/// `[telemetry]`: the access log.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TelemetrySettings {
    /// `off`, `sampled` (default: errors and denials always, the rest at
    /// most `access_log_rate` lines a second) or `all`.
    pub access_log: crate::telemetry::AccessMode,
    pub access_log_rate: u32,
    /// An OTLP/HTTP collector (`http://host:4318`) to export trace spans
    /// to; none: no spans.
    pub otlp_endpoint: Option<String>,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            access_log: crate::telemetry::AccessMode::Sampled,
            access_log_rate: DEFAULT_ACCESS_LOG_RATE,
            otlp_endpoint: None,
        }
    }
}

/// Access lines a second (not errors) at `access_log = "sampled"`.
pub const DEFAULT_ACCESS_LOG_RATE: u32 = 100;

/// The agent's `log_level` when the config has none.
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// See [`Config::cross_cluster_identity`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CrossClusterIdentity {
    #[default]
    EndToEnd,
    Gateway,
}

/// The agent's log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event (journald's default view).
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// A value that is not a [`LogFormat`]; says which values are.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a log format: use \"text\" or \"json\"")]
pub struct BadLogFormat(pub String);

impl std::str::FromStr for LogFormat {
    type Err = BadLogFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(BadLogFormat(s.to_string())),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct CaSettings {
    /// The CA's private key; its certificate is `tls.ca`.
    pub key: PathBuf,
    /// Lifetime of the certificates this node signs.
    #[serde(with = "humantime_serde_compat")]
    pub cert_ttl: Duration,
}

#[derive(Clone, Debug, Serialize)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceConfig {
    pub name: String,
    pub address: String,
    pub port: u16,
    pub protocol: Protocol,
    pub tags: Vec<String>,
    pub check: Option<CheckConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckTarget {
    Tcp(String),
    Http(String),
    /// A program and its arguments (no shell): exit 0 passes, 1 warns,
    /// anything else (or the timeout) fails.
    Exec(Vec<String>),
    /// The application reports in (`meshnode check pass|warn|fail`); no
    /// report for this long makes it critical.
    #[serde(with = "humantime_serde_compat")]
    Ttl(Duration),
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CheckConfig {
    pub target: CheckTarget,
    #[serde(with = "humantime_serde_compat")]
    pub interval: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// Consecutive successes that bring a failed instance back to passing.
    pub rise: u32,
    /// Consecutive failures that make an instance critical.
    pub fall: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UpstreamConfig {
    pub service: String,
    pub listen: SocketAddr,
    /// Cluster order to try when the own cluster has no healthy instance.
    /// Empty: every other cluster with healthy instances, nearest first.
    pub failover: Vec<String>,
    /// Reach only this cluster's instances (through its gateways if it is not ours).
    pub cluster: Option<String>,
    /// The service this upstream's callers act as (`as`); it must be one the
    /// node's certificate names. Default: the certificate's only service, if
    /// it names exactly one; else the node alone.
    pub as_service: Option<String>,
    /// How the upstream treats its connections (`protocol`). `None`: HTTP
    /// when the service's instances in the catalog declare an HTTP
    /// protocol, else TCP.
    pub protocol: Option<UpstreamProtocol>,
}

/// An upstream's own protocol setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// Bytes, one tunnel per connection.
    Tcp,
    /// HTTP/1.1 and prior-knowledge HTTP/2, routed per request.
    Http,
}

#[derive(Clone, Debug, Serialize)]
pub struct GossipSettings {
    #[serde(with = "humantime_serde_compat")]
    pub interval: Duration,
    pub phi_threshold: f64,
    /// Most nodes one gossip message may name, and most verified members a
    /// node keeps per pool (extension; default 6,000).
    pub max_members: usize,
}

/// One problem with one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

/// Everything wrong with a config file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{}", render(.0))]
    Invalid(Vec<ConfigError>),
}

fn render(errors: &[ConfigError]) -> String {
    let mut s = format!(
        "config has {} error{}:",
        errors.len(),
        if errors.len() == 1 { "" } else { "s" }
    );
    for e in errors {
        s.push_str(&format!("\n  {e}"));
    }
    s
}

// === impl ConfigError ===

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

// === impl Config ===

impl Config {
    /// Parses and validates TOML text. Pure: no file or network access.
    pub fn from_toml_str(text: &str) -> Result<Config, LoadError> {
        RawConfig::parse(text)?
            .validate()
            .map_err(LoadError::Invalid)
    }

    pub fn load(path: &Path) -> Result<Config, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml_str(&text)
    }
}

/// Durations are shown the way they are written: `2s`, `250ms`.
mod humantime_serde_compat {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}

#[cfg(test)]
mod tests;
