//! Metric names of the agent, declared once, and the Prometheus recorder.

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

/// Histogram buckets for connect latency, loopback to WAN.
const CONNECT_BUCKETS: [f64; 12] = [
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
        JOIN_REQUESTS,
        "Join and renewal requests answered by this node, by result (ok or the refusal)"
    );
    describe_counter!(
        CERT_RENEWALS,
        "Renewals of this node's certificate, by result (ok, failed)"
    );
    describe_gauge!(REVOCATIONS, "Revocation entries in force on this node");
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
}

/// Installs the process-wide Prometheus recorder. Call once, from the binary.
pub fn install(node: &str) -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &CONNECT_BUCKETS)
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
