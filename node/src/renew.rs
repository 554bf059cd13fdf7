//! Automatic renewal of the node certificate at two thirds of its lifetime,
//! over the mesh (a CA node, directly or through a relay), authenticated by
//! the current certificate and a CSR for the same key. The new certificate is
//! swapped into the TLS resolvers (live connections keep running) and written
//! to the certificate file. Without a reachable CA node the node keeps its
//! current certificate, warns, and retries.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meshnode_transport::join::{Request, Response};
use meshnode_transport::pki::join::NodeKey;
use meshnode_transport::pki::{unix_now, write_atomic};
use tracing::{info, warn};

use crate::join::JoinService;
use crate::metrics::CERT_RENEWALS;

pub struct Renewer {
    pub svc: Arc<JoinService>,
    pub key: NodeKey,
    pub cert_path: PathBuf,
    /// The WAN pool, on gateways: it carries the certificate too.
    pub wan: Option<meshnode_gossip::GossipHandle>,
}

/// When to renew a certificate valid from `not_before` to `not_after`.
pub fn renew_at(not_before: i64, not_after: i64) -> i64 {
    not_before + (not_after - not_before).max(0) * 2 / 3
}

/// How long to wait before retrying a failed renewal: a tenth of what is
/// left, between 1 s and 5 min.
pub fn retry_after(left: i64) -> Duration {
    Duration::from_secs((left / 10).clamp(1, 300) as u64)
}

impl Renewer {
    pub async fn run(self) {
        loop {
            let me = self.svc.endpoint.me();
            let wait = renew_at(me.not_before, me.not_after) - unix_now();
            if wait > 0 {
                tokio::time::sleep(Duration::from_secs(wait as u64)).await;
                continue;
            }
            match self.renew_once().await {
                Ok(not_after) => {
                    metrics::counter!(CERT_RENEWALS, "result" => "ok").increment(1);
                    info!(not_after, "node certificate renewed");
                }
                Err(e) => {
                    metrics::counter!(CERT_RENEWALS, "result" => "failed").increment(1);
                    let left = me.not_after - unix_now();
                    warn!(error = %e, expires_in_seconds = left, "certificate renewal failed; keeping the current certificate");
                    tokio::time::sleep(retry_after(left)).await;
                }
            }
        }
    }

    async fn renew_once(&self) -> Result<i64, String> {
        let tls = self.svc.endpoint.tls().clone();
        let me = tls.me();
        let csr = self
            .key
            .csr(me.identity.node())
            .map_err(|e| e.to_string())?;
        let req = Request::Renew {
            cert: tls.cert_der().to_vec(),
            csr,
        };
        match self.svc.handle(&req, crate::join::Origin::Local).await {
            Response::Issued { cert_pem, .. } => {
                let new = tls.renew(&cert_pem).map_err(|e| e.to_string())?;
                // Peers check this node's gossip values against the certificate it publishes.
                let der = tls.cert_der();
                self.svc.gossip.publish_cert(&der).await;
                if let Some(wan) = &self.wan {
                    wan.publish_cert(&der).await;
                }
                write_atomic(&self.cert_path, cert_pem.as_bytes(), 0o644)
                    .map_err(|e| format!("renewed, but not saved: {e}"))?;
                Ok(new.not_after)
            }
            Response::Refused { reason, message } => Err(format!("{}: {message}", reason.as_str())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_two_thirds_and_retries_within_bounds() {
        assert_eq!(renew_at(0, 300), 200);
        assert_eq!(renew_at(100, 100), 100);
        assert_eq!(retry_after(5), Duration::from_secs(1));
        assert_eq!(retry_after(600), Duration::from_secs(60));
        assert_eq!(retry_after(1_000_000), Duration::from_secs(300));
        assert_eq!(retry_after(-5), Duration::from_secs(1));
    }
}
