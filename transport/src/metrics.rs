//! Metric names of the transport layer, declared once, and rate-limited logging.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const HANDSHAKES: &str = "meshnode_quic_handshakes_total";
pub const TUNNEL_HEADER_ERRORS: &str = "meshnode_tunnel_header_errors_total";
pub const CLOSED_BY_PKI: &str = "meshnode_connections_closed_total";
pub const HANDSHAKES_REFUSED: &str = "meshnode_handshakes_refused_total";
pub const HANDSHAKE_ADMISSION: &str = "meshnode_quic_admission_total";
pub const SELF_REVOKED: &str = "meshnode_own_certificate_refused_as_revoked_total";

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
        HANDSHAKES_REFUSED,
        "Peer certificates refused in a handshake, by side (server: a client's, client: a server's) and reason"
    );
    metrics::describe_counter!(
        HANDSHAKE_ADMISSION,
        "Incoming QUIC Initials not given a handshake, by decision (retry: address validation; busy: too many in flight; rate: the source is over its rate)"
    );
    metrics::describe_counter!(
        SELF_REVOKED,
        "Peers that refused this node's own certificate as revoked"
    );
    metrics::describe_counter!(
        CLOSED_BY_PKI,
        "Live connections closed because the peer's certificate was revoked or expired, by reason"
    );
}

/// Allows one log line per period and key (a reason from a fixed set; keep
/// one instance per kind of event).
pub struct LogLimit {
    period: Duration,
    last: Mutex<Vec<(&'static str, Instant)>>,
}

impl LogLimit {
    pub const fn new(period: Duration) -> Self {
        Self {
            period,
            last: Mutex::new(Vec::new()),
        }
    }

    pub fn allow(&self) -> bool {
        self.allow_for("")
    }

    /// Like [`LogLimit::allow`], counted separately for each `key`. Keys are
    /// static strings from a fixed set, so the table stays small.
    pub fn allow_for(&self, key: &'static str) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = crate::clock::now();
        match last.iter_mut().find(|(k, _)| *k == key) {
            Some((_, t)) if now.duration_since(*t) < self.period => false,
            Some((_, t)) => {
                *t = now;
                true
            }
            None => {
                last.push((key, now));
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_limit_allows_one_per_period() {
        let l = LogLimit::new(Duration::from_secs(3600));
        assert!(l.allow());
        assert!(!l.allow());
        assert!(LogLimit::new(Duration::ZERO).allow());
        assert!(l.allow_for("a"));
        assert!(!l.allow_for("a"));
        assert!(l.allow_for("b"), "keys are limited separately");
    }
}
