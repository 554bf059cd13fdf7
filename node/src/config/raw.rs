//! The loosely typed mirror of the config file, and its validation.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use meshnode_gossip::Protocol;
use serde::Deserialize;

use crate::telemetry::AccessMode;

use super::{
    CaSettings, CheckConfig, CheckTarget, Config, ConfigError, GossipSettings, LoadError,
    LogFormat, ServiceConfig, TelemetrySettings, TlsPaths, UpstreamConfig, UpstreamProtocol,
};

// Defaults, each with its reason.
/// One UDP port for gossip, tunnels and join (design contract).
const DEFAULT_BIND: &str = "0.0.0.0:9470";
/// The admin API stays on loopback by default: its reads need no secret.
const DEFAULT_ADMIN: &str = "127.0.0.1:9471";
const DEFAULT_DATA_DIR: &str = "/var/lib/meshnode";
/// Consul's default check interval; fast enough to fail over within seconds.
const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(2);
const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// Two successes before a failed instance takes traffic again (avoids flapping).
const DEFAULT_RISE: u32 = 2;
/// Three failures in a row before an instance is critical (one lost probe is not an outage).
const DEFAULT_FALL: u32 = 3;
/// Measured: 250 ms rounds spread a change to 30 nodes in well under a second (ARCHITECTURE.md).
const DEFAULT_GOSSIP_INTERVAL: Duration = Duration::from_millis(250);
const DEFAULT_PHI: f64 = 8.0;
/// Node certificates signed by a CA node: short-lived, renewed at two thirds.
const DEFAULT_CERT_TTL: Duration = Duration::from_secs(72 * 3600);
/// Seconds-long lifetimes exist for tests of renewal; production uses hours.
const MIN_CERT_TTL: Duration = Duration::from_secs(5);
const MAX_CERT_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// One runtime thread: the proxy shares the VM's cores with its applications,
/// and bench/dataplane.sh shows one thread moving more bytes per CPU second
/// than two (no cross-thread wakeups between the TCP and QUIC tasks).
pub const DEFAULT_WORKERS: usize = 1;
const MAX_WORKERS: i64 = 256;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawConfig {
    node: Option<String>,
    cluster: Option<String>,
    mesh: Option<String>,
    data_dir: Option<String>,
    bind: Option<String>,
    advertise: Option<String>,
    admin: Option<String>,
    admin_allow_remote: bool,
    seeds: Vec<String>,
    gateway: bool,
    workers: Option<i64>,
    log_format: Option<String>,
    log_level: Option<String>,
    wan_advertise: Option<String>,
    wan_seeds: Vec<String>,
    cross_cluster_identity: Option<String>,
    tls: Option<RawTls>,
    service: Vec<RawService>,
    upstream: Vec<RawUpstream>,
    gossip: Option<RawGossip>,
    ca: Option<RawCa>,
    telemetry: Option<RawTelemetry>,
    dns: Option<RawDns>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawDns {
    listen: Option<String>,
    mode: Option<String>,
    ttl: Option<String>,
    domain: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawTelemetry {
    access_log: Option<String>,
    access_log_rate: Option<i64>,
    otlp_endpoint: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawCa {
    key: Option<String>,
    cert_ttl: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawTls {
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawService {
    name: Option<String>,
    address: Option<String>,
    port: Option<i64>,
    protocol: Option<String>,
    tags: Vec<String>,
    check: Option<RawCheck>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawCheck {
    http: Option<String>,
    tcp: Option<String>,
    exec: Option<Vec<String>>,
    ttl: Option<String>,
    interval: Option<String>,
    timeout: Option<String>,
    rise: Option<i64>,
    fall: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawUpstream {
    service: Option<String>,
    listen: Option<String>,
    failover: Vec<String>,
    cluster: Option<String>,
    #[serde(rename = "as")]
    as_service: Option<String>,
    protocol: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawGossip {
    interval: Option<String>,
    phi_threshold: Option<f64>,
    max_members: Option<i64>,
}

/// Collects problems as validation walks the keys.
#[derive(Default)]
struct Errors(Vec<ConfigError>);

// === impl Errors ===

impl Errors {
    fn push(&mut self, key: impl Into<String>, msg: impl Into<String>) {
        self.0.push(ConfigError::new(key, msg));
    }

    fn addr(&mut self, key: &str, value: &str) -> Option<SocketAddr> {
        match value.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.push(
                    key,
                    format!("{value:?} is not an ip:port address (e.g. \"10.0.1.5:9470\")"),
                );
                None
            }
        }
    }

    fn duration(&mut self, key: &str, value: Option<&str>, default: Duration) -> Duration {
        let Some(value) = value else { return default };
        match humantime::parse_duration(value) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.push(key, "must be longer than zero");
                default
            }
            Err(_) => {
                self.push(
                    key,
                    format!("{value:?} is not a duration (e.g. \"500ms\", \"2s\", \"1h\")"),
                );
                default
            }
        }
    }

    fn name(&mut self, key: &str, value: &str) {
        if let Err(e) = meshnode_transport::pki::Identity::new("m", "c", value) {
            let _ = e;
            self.push(
                key,
                format!("{value:?} is not a valid name: use 1-63 characters from a-z, A-Z, 0-9, '-', '_' and '.'"),
            );
        }
    }
}

/// "line L, column C" (both from 1) of a byte offset into `text`.
fn position(text: &str, offset: usize) -> String {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}")
}

fn service_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

// === impl RawConfig ===

impl RawConfig {
    /// Deserializes TOML. Syntax and type errors stop here (with their key);
    /// unknown keys are all collected and reported.
    pub fn parse(text: &str) -> Result<RawConfig, LoadError> {
        parse_toml(text).map_err(LoadError::Invalid)
    }

    /// Checks every key and builds the typed config, or returns every problem found.
    pub fn validate(self) -> Result<Config, Vec<ConfigError>> {
        let mut e = Errors::default();
        let node = self.node.clone().unwrap_or_else(hostname);
        e.name("node", &node);
        let cluster = match &self.cluster {
            Some(c) => {
                e.name("cluster", c);
                c.clone()
            }
            None => {
                e.push("cluster", "missing: name the cluster this node belongs to");
                String::new()
            }
        };
        let mesh = match &self.mesh {
            Some(m) => {
                e.name("mesh", m);
                m.clone()
            }
            None => {
                e.push(
                    "mesh",
                    "missing: name the mesh (the trust domain of the CA)",
                );
                String::new()
            }
        };
        let data_dir = PathBuf::from(self.data_dir.as_deref().unwrap_or(DEFAULT_DATA_DIR));
        let bind = e.addr("bind", self.bind.as_deref().unwrap_or(DEFAULT_BIND));
        let advertise = self
            .advertise
            .as_deref()
            .and_then(|a| e.addr("advertise", a));
        if let Some(a) = advertise {
            if a.ip().is_unspecified() || a.port() == 0 {
                e.push(
                    "advertise",
                    "must be a concrete address other nodes can reach",
                );
            }
        }
        let admin = e.addr("admin", self.admin.as_deref().unwrap_or(DEFAULT_ADMIN));
        if let Some(a) = admin {
            if !a.ip().is_loopback() && !self.admin_allow_remote {
                e.push(
                    "admin",
                    format!("{a} is not a loopback address: the admin API can make the node leave and mint join tokens; keep it on 127.0.0.1, or set admin_allow_remote = true (then every endpoint but /v1/health and /metrics needs the admin secret)"),
                );
            }
        }
        let seeds: Vec<SocketAddr> = self
            .seeds
            .iter()
            .enumerate()
            .filter_map(|(i, s)| e.addr(&format!("seeds[{i}]"), s))
            .collect();
        let wan_advertise = self
            .wan_advertise
            .as_deref()
            .and_then(|a| e.addr("wan_advertise", a));
        let wan_seeds: Vec<SocketAddr> = self
            .wan_seeds
            .iter()
            .enumerate()
            .filter_map(|(i, s)| e.addr(&format!("wan_seeds[{i}]"), s))
            .collect();
        if !self.gateway {
            if self.wan_advertise.is_some() {
                e.push(
                    "wan_advertise",
                    "only gateways (gateway = true) join the WAN pool",
                );
            }
            if !self.wan_seeds.is_empty() {
                e.push(
                    "wan_seeds",
                    "only gateways (gateway = true) join the WAN pool",
                );
            }
        }
        let tls = self.tls.unwrap_or_default();
        let tls = TlsPaths {
            ca: tls
                .ca
                .map(PathBuf::from)
                .unwrap_or_else(|| data_dir.join("ca.pem")),
            cert: tls
                .cert
                .map(PathBuf::from)
                .unwrap_or_else(|| data_dir.join("node.pem")),
            key: tls
                .key
                .map(PathBuf::from)
                .unwrap_or_else(|| data_dir.join("node.key")),
        };
        let services = validate_services(&mut e, self.service);
        let upstreams = validate_upstreams(&mut e, self.upstream, admin, bind);
        let gossip = self.gossip.unwrap_or_default();
        let gossip = GossipSettings {
            interval: e.duration(
                "gossip.interval",
                gossip.interval.as_deref(),
                DEFAULT_GOSSIP_INTERVAL,
            ),
            phi_threshold: match gossip.phi_threshold {
                None => DEFAULT_PHI,
                Some(p) if (1.0..=100.0).contains(&p) => p,
                Some(p) => {
                    e.push(
                        "gossip.phi_threshold",
                        format!("{p} is out of range: use 1 to 100 (default {DEFAULT_PHI})"),
                    );
                    DEFAULT_PHI
                }
            },
            max_members: match gossip.max_members {
                None => meshnode_gossip::wire::DEFAULT_MAX_NODES,
                Some(n) if (2..=65_535).contains(&n) => n as usize,
                Some(n) => {
                    e.push(
                        "gossip.max_members",
                        format!(
                            "{n} is out of range: use 2 to 65535 (default {})",
                            meshnode_gossip::wire::DEFAULT_MAX_NODES
                        ),
                    );
                    meshnode_gossip::wire::DEFAULT_MAX_NODES
                }
            },
        };
        let workers = match self.workers {
            None => DEFAULT_WORKERS,
            Some(n) if (1..=MAX_WORKERS).contains(&n) => n as usize,
            Some(n) => {
                e.push(
                    "workers",
                    format!(
                        "{n} is out of range: use 1 to {MAX_WORKERS} (default {DEFAULT_WORKERS})"
                    ),
                );
                DEFAULT_WORKERS
            }
        };
        let log_format = match self.log_format.as_deref() {
            None => LogFormat::Text,
            Some(v) => v.parse().unwrap_or_else(|bad: super::BadLogFormat| {
                e.push("log_format", bad.to_string());
                LogFormat::Text
            }),
        };
        let log_level = match self.log_level {
            None => super::DEFAULT_LOG_LEVEL.to_string(),
            Some(v) => match tracing_subscriber::EnvFilter::builder().parse(&v) {
                Ok(_) if !v.trim().is_empty() => v,
                Ok(_) => {
                    e.push("log_level", "empty: use a level such as \"info\" or directives such as \"info,meshnode_node=debug\"");
                    v
                }
                Err(bad) => {
                    e.push("log_level", format!("{v:?} is not a log filter ({bad}): use a level (error, warn, info, debug, trace) or directives such as \"info,meshnode_node=debug\""));
                    v
                }
            },
        };
        let cross_cluster_identity = match self.cross_cluster_identity.as_deref() {
            None | Some("end_to_end") => super::CrossClusterIdentity::EndToEnd,
            Some("gateway") => super::CrossClusterIdentity::Gateway,
            Some(other) => {
                e.push(
                    "cross_cluster_identity",
                    format!("{other:?} is not one of \"end_to_end\", \"gateway\""),
                );
                super::CrossClusterIdentity::EndToEnd
            }
        };
        let telemetry = {
            let raw = self.telemetry.unwrap_or_default();
            let access_log = match raw.access_log.as_deref() {
                None | Some("sampled") => AccessMode::Sampled,
                Some("all") => AccessMode::All,
                Some("off") => AccessMode::Off,
                Some(other) => {
                    e.push(
                        "telemetry.access_log",
                        format!("{other:?} is not one of \"off\", \"sampled\", \"all\""),
                    );
                    AccessMode::Sampled
                }
            };
            let access_log_rate = match raw.access_log_rate {
                None => super::DEFAULT_ACCESS_LOG_RATE,
                Some(n) if (1..=100_000).contains(&n) => n as u32,
                Some(n) => {
                    e.push(
                        "telemetry.access_log_rate",
                        format!(
                            "{n} is out of range: lines per second, 1 to 100000 (default {})",
                            super::DEFAULT_ACCESS_LOG_RATE
                        ),
                    );
                    super::DEFAULT_ACCESS_LOG_RATE
                }
            };
            let otlp_endpoint = raw.otlp_endpoint.filter(|v| {
                crate::trace::traces_url(v)
                    .map_err(|m| e.push("telemetry.otlp_endpoint", m))
                    .is_ok()
            });
            TelemetrySettings {
                access_log,
                access_log_rate,
                otlp_endpoint,
            }
        };
        let dns = self
            .dns
            .and_then(|raw| validate_dns(&mut e, raw, admin, bind, &upstreams));
        let ca = self.ca.map(|ca| {
            let cert_ttl = e.duration("ca.cert_ttl", ca.cert_ttl.as_deref(), DEFAULT_CERT_TTL);
            if !(MIN_CERT_TTL..=MAX_CERT_TTL).contains(&cert_ttl) {
                e.push(
                    "ca.cert_ttl",
                    format!(
                        "{} is out of range: use 5s to 90d (default 72h)",
                        humantime::format_duration(cert_ttl)
                    ),
                );
            }
            CaSettings {
                key: ca
                    .key
                    .map(PathBuf::from)
                    .unwrap_or_else(|| data_dir.join("ca.key")),
                cert_ttl,
            }
        });
        match (bind, admin) {
            (Some(bind), Some(admin)) if e.0.is_empty() => Ok(Config {
                node,
                cluster,
                mesh,
                data_dir,
                bind,
                advertise,
                admin,
                admin_allow_remote: self.admin_allow_remote,
                seeds,
                gateway: self.gateway,
                workers,
                log_format,
                log_level,
                wan_advertise,
                wan_seeds,
                cross_cluster_identity,
                tls,
                services,
                upstreams,
                gossip,
                ca,
                telemetry,
                dns,
            }),
            _ => Err(e.0),
        }
    }
}

fn validate_services(e: &mut Errors, raw: Vec<RawService>) -> Vec<ServiceConfig> {
    let mut out: Vec<ServiceConfig> = Vec::new();
    for (i, s) in raw.into_iter().enumerate() {
        let k = |f: &str| format!("service[{i}].{f}");
        let name = s.name.unwrap_or_default();
        if name.is_empty() {
            e.push(k("name"), "missing: every service needs a name");
        } else if !service_name_ok(&name) {
            e.push(
                k("name"),
                format!(
                    "{name:?} is not a valid service name: use a-z, A-Z, 0-9, '-', '_' and '.'"
                ),
            );
        }
        let address = s.address.unwrap_or_else(|| "127.0.0.1".to_string());
        if address.parse::<std::net::IpAddr>().is_err() {
            e.push(k("address"), format!("{address:?} is not an IP address"));
        }
        let port = match s.port {
            Some(p) if (1..=65535).contains(&p) => p as u16,
            Some(p) => {
                e.push(k("port"), format!("{p} is not a port: use 1-65535"));
                0
            }
            None => {
                e.push(k("port"), "missing: the port the application listens on");
                0
            }
        };
        let protocol = match s.protocol.as_deref() {
            None | Some("tcp") => Protocol::Tcp,
            Some("http") => Protocol::Http,
            Some("http2") => Protocol::Http2,
            Some(other) => {
                e.push(
                    k("protocol"),
                    format!("{other:?} is not a protocol: use \"tcp\", \"http\" (HTTP/1.1) or \"http2\" (HTTP/2 without TLS, e.g. gRPC)"),
                );
                Protocol::Tcp
            }
        };
        let check = s.check.and_then(|c| {
            let kinds = [c.http.is_some(), c.tcp.is_some(), c.exec.is_some(), c.ttl.is_some()]
                .iter()
                .filter(|x| **x)
                .count();
            if kinds > 1 {
                e.push(k("check"), "set one of http, tcp, exec or ttl, not several");
                return None;
            }
            let target = if let Some(url) = c.http {
                if !url.starts_with("http://") {
                    e.push(k("check.http"), format!("{url:?} must be an http:// URL"));
                }
                CheckTarget::Http(url)
            } else if let Some(addr) = c.tcp {
                if addr.parse::<SocketAddr>().is_err() {
                    e.push(
                        k("check.tcp"),
                        format!("{addr:?} is not an ip:port address"),
                    );
                }
                CheckTarget::Tcp(addr)
            } else if let Some(argv) = c.exec {
                match argv.first() {
                    Some(p) if p.starts_with('/') => {}
                    Some(p) => e.push(
                        k("check.exec"),
                        format!("{p:?} must be an absolute path (no shell, no PATH lookup)"),
                    ),
                    None => e.push(
                        k("check.exec"),
                        "the program and its arguments, e.g. [\"/usr/local/bin/check-api\", \"--quick\"]",
                    ),
                }
                CheckTarget::Exec(argv)
            } else if let Some(ttl) = c.ttl {
                let d = e.duration(&k("check.ttl"), Some(&ttl), DEFAULT_CHECK_INTERVAL);
                if c.interval.is_some() || c.timeout.is_some() {
                    e.push(
                        k("check"),
                        "a ttl check has no interval or timeout: the application reports in",
                    );
                }
                CheckTarget::Ttl(d)
            } else {
                e.push(
                    k("check"),
                    "set http = \"http://...\", tcp = \"host:port\", exec = [\"/path\", ...] or ttl = \"30s\"",
                );
                return None;
            };
            let interval = e.duration(
                &k("check.interval"),
                c.interval.as_deref(),
                DEFAULT_CHECK_INTERVAL,
            );
            let timeout = e.duration(
                &k("check.timeout"),
                c.timeout.as_deref(),
                DEFAULT_CHECK_TIMEOUT,
            );
            if timeout > interval {
                e.push(k("check.timeout"), "must not be longer than check.interval");
            }
            let mut threshold = |f: &str, v: Option<i64>, d: u32| match v {
                None => d,
                Some(n) if (1..=100).contains(&n) => n as u32,
                Some(n) => {
                    e.push(
                        k(&format!("check.{f}")),
                        format!("{n} is out of range: use 1 to 100"),
                    );
                    d
                }
            };
            let rise = threshold("rise", c.rise, DEFAULT_RISE);
            let fall = threshold("fall", c.fall, DEFAULT_FALL);
            Some(CheckConfig {
                target,
                interval,
                timeout,
                rise,
                fall,
            })
        });
        if out.iter().any(|o| o.name == name && o.port == port) && port != 0 {
            e.push(
                k("port"),
                format!("service {name:?} is already registered on port {port}"),
            );
        }
        out.push(ServiceConfig {
            name,
            address,
            port,
            protocol,
            tags: s.tags,
            check,
        });
    }
    out
}

fn validate_dns(
    e: &mut Errors,
    raw: RawDns,
    admin: Option<SocketAddr>,
    bind: Option<SocketAddr>,
    upstreams: &[UpstreamConfig],
) -> Option<super::DnsSettings> {
    let listen = match raw.listen.as_deref() {
        None => {
            e.push(
                "dns.listen",
                "missing: the address the DNS interface answers on, e.g. \"127.0.0.1:8600\" (remove [dns] to turn it off)",
            );
            None
        }
        Some(l) => e.addr("dns.listen", l),
    };
    if let Some(l) = listen {
        if !l.ip().is_loopback() {
            e.push(
                "dns.listen",
                format!("{l} is not a loopback address: the DNS interface answers anyone who reaches it with the catalog's names and addresses; keep it on 127.0.0.1"),
            );
        }
        let same_port =
            |o: SocketAddr| o.port() == l.port() && (o.ip() == l.ip() || o.ip().is_unspecified());
        if admin.is_some_and(same_port) {
            e.push("dns.listen", "collides with admin (DNS takes TCP too)");
        }
        if bind.is_some_and(same_port) {
            e.push("dns.listen", "collides with bind (DNS takes UDP too)");
        }
        if upstreams.iter().any(|u| same_port(u.listen)) {
            e.push(
                "dns.listen",
                "collides with an upstream's listen (DNS takes TCP too)",
            );
        }
    }
    let mode = match raw.mode.as_deref() {
        None | Some("upstreams") => crate::dns::DnsMode::Upstreams,
        Some("instances") => crate::dns::DnsMode::Instances,
        Some(other) => {
            e.push(
                "dns.mode",
                format!("{other:?} is not one of \"upstreams\" (answer this node's upstream addresses), \"instances\" (answer the own cluster's healthy instances)"),
            );
            crate::dns::DnsMode::Upstreams
        }
    };
    let ttl = e.duration(
        "dns.ttl",
        raw.ttl.as_deref(),
        std::time::Duration::from_secs(super::DEFAULT_DNS_TTL.into()),
    );
    if ttl > std::time::Duration::from_secs(3600) || ttl.subsec_nanos() != 0 {
        e.push(
            "dns.ttl",
            format!(
                "{} is out of range: whole seconds, 1s to 1h (default {}s)",
                humantime::format_duration(ttl),
                super::DEFAULT_DNS_TTL
            ),
        );
    }
    let domain = raw
        .domain
        .unwrap_or_else(|| super::DEFAULT_DNS_DOMAIN.to_string());
    let domain_ok = !domain.is_empty()
        && domain.len() <= 200
        && domain.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if !domain_ok {
        e.push(
            "dns.domain",
            format!("{domain:?} is not a lower-case domain name without a final dot (e.g. \"mesh\" or \"mesh.internal\")"),
        );
    }
    Some(super::DnsSettings {
        listen: listen?,
        mode,
        ttl: ttl.as_secs().min(3600) as u32,
        domain,
    })
}

fn validate_upstreams(
    e: &mut Errors,
    raw: Vec<RawUpstream>,
    admin: Option<SocketAddr>,
    bind: Option<SocketAddr>,
) -> Vec<UpstreamConfig> {
    let mut out: Vec<UpstreamConfig> = Vec::new();
    for (i, u) in raw.into_iter().enumerate() {
        let k = |f: &str| format!("upstream[{i}].{f}");
        let service = u.service.unwrap_or_default();
        if !service_name_ok(&service) {
            e.push(
                k("service"),
                "missing or invalid: name the mesh service to reach",
            );
        }
        let Some(listen) = u.listen.as_deref().and_then(|l| e.addr(&k("listen"), l)) else {
            if u.listen.is_none() {
                e.push(
                    k("listen"),
                    "missing: the local address apps connect to, e.g. \"127.0.0.1:15432\"",
                );
            }
            continue;
        };
        if Some(listen) == admin {
            e.push(k("listen"), "is the admin API's address");
        }
        if bind.is_some_and(|b| {
            b.port() == listen.port() && (b.ip().is_unspecified() || b.ip() == listen.ip())
        }) {
            e.push(
                k("listen"),
                "collides with bind (QUIC uses UDP, but keep them apart to avoid confusion)",
            );
        }
        if out.iter().any(|o| o.listen == listen) {
            e.push(k("listen"), format!("{listen} is used by another upstream"));
        }
        for (j, c) in u.failover.iter().enumerate() {
            e.name(&k(&format!("failover[{j}]")), c);
        }
        if let Some(c) = &u.cluster {
            e.name(&k("cluster"), c);
            if !u.failover.is_empty() {
                e.push(
                    k("failover"),
                    "cannot be combined with cluster: an upstream pinned to one cluster has no failover",
                );
            }
        }
        if let Some(s) = &u.as_service {
            e.name(&k("as"), s);
        }
        let protocol = match u.protocol.as_deref() {
            None => None,
            Some("tcp") => Some(UpstreamProtocol::Tcp),
            Some("http") => Some(UpstreamProtocol::Http),
            Some(other) => {
                e.push(
                    k("protocol"),
                    format!("{other:?} is not an upstream protocol: use \"tcp\" or \"http\" (default: what the service's instances declare)"),
                );
                None
            }
        };
        out.push(UpstreamConfig {
            service,
            listen,
            failover: u.failover,
            cluster: u.cluster,
            as_service: u.as_service,
            protocol,
        });
    }
    out
}

/// Deserializes TOML into `T`: syntax and type errors stop here (with their
/// key and position); unknown keys are all collected and reported by name.
pub(crate) fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
) -> Result<T, Vec<ConfigError>> {
    let mut unknown = Vec::new();
    let de = toml::Deserializer::new(text);
    let mut on_unknown = |path: serde_ignored::Path<'_>| unknown.push(dotted(&path));
    let ignored = serde_ignored::Deserializer::new(de, &mut on_unknown);
    let raw: Result<T, _> = serde_path_to_error::deserialize(ignored);
    match raw {
        Ok(raw) if unknown.is_empty() => Ok(raw),
        Ok(_) => Err(unknown
            .into_iter()
            .map(|k| ConfigError::new(k, "unknown key (check its spelling and section)"))
            .collect()),
        Err(e) => {
            let key = e.path().to_string();
            let key = if key == "." {
                "(file)".to_string()
            } else {
                key
            };
            let inner = e.into_inner();
            let mut msg = inner.message().trim().to_string();
            if let Some(span) = inner.span() {
                msg = format!("{} ({msg})", position(text, span.start));
            }
            Err(vec![ConfigError::new(key, msg)])
        }
    }
}

/// `service[2].nmae` from serde_ignored's path.
fn dotted(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", dotted(parent)),
        Path::Map { parent, key } => {
            let p = dotted(parent);
            if p.is_empty() {
                key.clone()
            } else {
                format!("{p}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => dotted(parent),
    }
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".to_string())
}
