//! Metric names of the transport layer, declared once.

pub const HANDSHAKES: &str = "meshnode_quic_handshakes_total";
pub const TUNNEL_HEADER_ERRORS: &str = "meshnode_tunnel_header_errors_total";
pub const CLOSED_BY_PKI: &str = "meshnode_connections_closed_total";

/// Registers descriptions with whatever recorder is installed.
pub fn describe() {
    metrics::describe_counter!(
        HANDSHAKES,
        "QUIC handshakes by direction, protocol and result (ok, refused, failed)"
    );
    metrics::describe_counter!(
        TUNNEL_HEADER_ERRORS,
        "Tunnel streams reset because their header was truncated, oversized or malformed, by kind"
    );
    metrics::describe_counter!(
        CLOSED_BY_PKI,
        "Live connections closed because the peer's certificate was revoked or expired, by reason"
    );
}
