//! Metric names of the agent, declared once, and the Prometheus recorder;
//! the one rule for label values that come from the network
//! ([`LabelGuard`]), and rate-limited logging ([`LogLimit`]).

use std::collections::{HashMap, HashSet};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const TUNNEL_STREAMS: &str = "meshnode_tunnel_streams_total";
pub const TUNNEL_BYTES: &str = "meshnode_tunnel_bytes_total";
pub const TUNNEL_ACTIVE: &str = "meshnode_tunnel_active_streams";
pub const TUNNEL_CONNECT_SECONDS: &str = "meshnode_tunnel_connect_seconds";
pub const UPSTREAM_RETRIES: &str = "meshnode_upstream_retries_total";
pub const OUTLIER_EJECTIONS: &str = "meshnode_outlier_ejections_total";
pub const HEALTH_CHECKS: &str = "meshnode_health_checks_total";
pub const CERT_EXPIRY_SECONDS: &str = "meshnode_cert_expiry_seconds";
pub const CA_EXPIRY_SECONDS: &str = "meshnode_ca_expiry_seconds";
pub const JOIN_REQUESTS: &str = "meshnode_join_requests_total";
pub const CERT_RENEWALS: &str = "meshnode_cert_renewals_total";
pub const REVOCATIONS: &str = "meshnode_revocations";
pub const POLICY_DOCUMENTS: &str = "meshnode_policy_documents";
pub const POLICY_PUBLISHED: &str = "meshnode_policy_published";
pub const POLICY_ADOPTED: &str = "meshnode_policy_adopted_total";
pub const POLICY_REFUSED: &str = "meshnode_policy_refused_total";
pub const ADMIN_REFUSED: &str = "meshnode_admin_refused_total";
pub const JOIN_CONNECTIONS_REFUSED: &str = "meshnode_join_connections_refused_total";
pub const AUTHZ_DECISIONS: &str = "meshnode_authz_decisions_total";
pub const HTTP_REQUESTS: &str = "meshnode_http_requests_total";
pub const HTTP_MIRRORED: &str = "meshnode_http_mirrored_total";
pub const HTTP_STREAMS: &str = "meshnode_http_streams_total";
pub const HTTP_FAULTS: &str = "meshnode_http_faults_injected_total";
pub const HTTP_RETRIES: &str = "meshnode_http_retries_total";
pub const HTTP_RATE_LIMITED: &str = "meshnode_http_rate_limited_total";
/// Requests (and retries) a circuit-breaker limit turned away, by `limit`.
pub const HTTP_BREAKER_OPEN: &str = "meshnode_http_breaker_open_total";
pub const HTTP_BUDGET_EXHAUSTED: &str = "meshnode_http_retry_budget_exhausted_total";
/// DNS queries by transport (udp, tcp) and outcome (answer, nodata, nxdomain, ...).
pub const DNS_QUERIES: &str = "meshnode_dns_queries_total";
/// DNS TCP connections closed at accept (over the limit).
pub const DNS_REFUSED: &str = "meshnode_dns_connections_refused_total";
/// Names in the DNS zone.
pub const DNS_NAMES: &str = "meshnode_dns_names";

/// Histogram buckets for connect and request latency, loopback to WAN.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0,
];

pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        TUNNEL_STREAMS,
        "Tunnel streams by service, direction (in, out) and result"
    );
    describe_counter!(
        TUNNEL_BYTES,
        Unit::Bytes,
        "Tunnelled bytes by service and direction (in, out)"
    );
    describe_gauge!(TUNNEL_ACTIVE, "Tunnel streams open now, by direction");
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests by service, direction (out: sent by an upstream, in: served to an application), subset and status class (2xx..5xx, or the refusal)"
    );
    describe_counter!(
        HTTP_STREAMS,
        "Tunnel streams HTTP requests went out on, by service and whether the stream was opened for the request or reused"
    );
    describe_counter!(
        HTTP_MIRRORED,
        "Copies of HTTP requests sent by a route's mirror, by service and result"
    );
    describe_counter!(
        HTTP_RATE_LIMITED,
        "HTTP requests a destination instance's local rate limit answered with 429, by service"
    );
    describe_counter!(
        HTTP_BREAKER_OPEN,
        "HTTP requests a circuit breaker answered with 503 at once, and retries it did not make, by service and limit (max_connections, max_pending, max_requests, max_retries)"
    );
    describe_counter!(
        HTTP_RETRIES,
        "HTTP requests sent again by a resilience document's retries, by service and reason (connect_failure, reset, status)"
    );
    describe_counter!(
        HTTP_BUDGET_EXHAUSTED,
        "HTTP retries the retry budget refused, by service"
    );
    describe_counter!(
        HTTP_FAULTS,
        "Faults a resilience document injected into HTTP requests at the caller, by service and fault (abort, delay)"
    );
    describe_counter!(
        JOIN_REQUESTS,
        "Join and renewal requests answered by this node, by result (ok or the refusal)"
    );
    describe_counter!(
        CERT_RENEWALS,
        "Renewals of this node's certificate, by result (ok, failed)"
    );
    describe_gauge!(REVOCATIONS, "Revocation entries in force on this node");
    describe_gauge!(
        POLICY_DOCUMENTS,
        "Policy documents this node holds (tombstones included)"
    );
    describe_gauge!(
        POLICY_PUBLISHED,
        "Policy documents and revocations this node publishes in gossip, by pool and kind"
    );
    describe_counter!(
        POLICY_ADOPTED,
        "Policy documents adopted, by source (local, gossip)"
    );
    describe_counter!(
        POLICY_REFUSED,
        "Policy documents refused, by reason (each distinct document counted once)"
    );
    describe_counter!(
        JOIN_CONNECTIONS_REFUSED,
        "Anonymous join connections refused or evicted, by reason (per_source, full, evicted)"
    );
    describe_counter!(
        AUTHZ_DECISIONS,
        "Authorization decisions at the destination, by service, decision (allow, deny) and reason (rule, default, policy_pending, identity)"
    );
    describe_counter!(
        DNS_QUERIES,
        "DNS queries answered, by transport (udp, tcp) and outcome (answer, nodata, nxdomain, refused, formerr, notimp, dropped)"
    );
    describe_counter!(
        DNS_REFUSED,
        "DNS TCP connections closed at accept because the server had its limit of open connections"
    );
    describe_gauge!(DNS_NAMES, "Service names in the DNS zone");
    describe_counter!(
        ADMIN_REFUSED,
        "Admin API requests and connections refused, by reason (secret, host, origin, too_many_connections)"
    );
    describe_histogram!(
        TUNNEL_CONNECT_SECONDS,
        Unit::Seconds,
        "Time from accepting an upstream connection to an open tunnel (including retries)"
    );
    describe_counter!(
        UPSTREAM_RETRIES,
        "Upstream connection attempts retried on another instance, by service"
    );
    describe_counter!(
        OUTLIER_EJECTIONS,
        "Instances ejected by outlier detection, by service"
    );
    describe_counter!(
        HEALTH_CHECKS,
        "Health check probes by service and result (pass, fail)"
    );
    describe_gauge!(
        CERT_EXPIRY_SECONDS,
        Unit::Seconds,
        "Seconds until the node certificate expires"
    );
    describe_gauge!(
        CA_EXPIRY_SECONDS,
        Unit::Seconds,
        "Seconds until the mesh CA certificate expires"
    );
    meshnode_transport::metrics::describe();
    meshnode_gossip::metrics::describe();
    crate::telemetry::describe();
    crate::trace::describe();
}

/// Histogram buckets for the lifetime of proxied TCP connections.
const LIFETIME_BUCKETS: [f64; 10] = [
    0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0,
];

/// Installs the process-wide Prometheus recorder. Call once, from the binary.
pub fn install(node: &str) -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
        .map_err(|e| e.to_string())?
        .set_buckets_for_metric(
            Matcher::Full(crate::telemetry::CONNECTION_SECONDS.into()),
            &LIFETIME_BUCKETS,
        )
        .map_err(|e| e.to_string())?
        .add_global_label("node", node)
        .install_recorder()
        .map_err(|e| e.to_string())?;
    describe();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// What a label value becomes when it is not known or its label is full.
pub const OTHER: &str = "other";
/// Distinct values one label may take in this process.
pub const MAX_LABEL_VALUES: usize = 256;

/// Label values that come from the network (a service name in a tunnel
/// header, a caller identity) are bounded: a value the caller of
/// [`LabelGuard::value`] does not vouch for (`known`: a service hosted here
/// or in the catalog, a cluster of the mesh) becomes [`OTHER`], and each
/// label keeps at most `cap` distinct values, the rest folded into
/// [`OTHER`]. Without this, anyone who can open a stream can mint series.
pub struct LabelGuard {
    cap: usize,
    seen: Mutex<HashMap<&'static str, HashSet<String>>>,
}

impl LabelGuard {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            seen: Mutex::new(HashMap::new()),
        }
    }

    pub fn value(&self, label: &'static str, value: &str, known: bool) -> String {
        if !known || value == OTHER {
            return OTHER.to_string();
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let set = seen.entry(label).or_default();
        if set.contains(value) {
            return value.to_string();
        }
        if set.len() >= self.cap {
            return OTHER.to_string();
        }
        set.insert(value.to_string());
        value.to_string()
    }
}

/// The process's label guard, used by every metric with a network-sourced label.
pub static LABELS: LazyLock<LabelGuard> = LazyLock::new(|| LabelGuard::new(MAX_LABEL_VALUES));

pub use meshnode_transport::LogLimit;

#[cfg(test)]
mod label_tests {
    use super::*;

    #[test]
    fn unknown_values_and_values_past_the_cap_fold_into_other() {
        let g = LabelGuard::new(3);
        assert_eq!(g.value("service", "api", true), "api");
        assert_eq!(g.value("service", "evil", false), OTHER);
        assert_eq!(g.value("service", "b", true), "b");
        assert_eq!(g.value("service", "c", true), "c");
        assert_eq!(g.value("service", "d", true), OTHER, "cap reached");
        assert_eq!(g.value("service", "api", true), "api", "known values stay");
        assert_eq!(g.value("caller", "d", true), "d", "per label");
        let distinct: HashSet<String> = (0..10_000)
            .map(|i| g.value("service", &format!("s{i}"), i % 2 == 0))
            .collect();
        assert!(distinct.len() <= 4, "{distinct:?}");
    }
}
