//! The probes (TCP connect, HTTP GET) and the loops that run them.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::HealthState;
use crate::config::{CheckConfig, CheckTarget};
use crate::metrics::HEALTH_CHECKS;
use crate::registry::Registry;

/// Runs one probe. `Ok` means healthy: TCP connected, or HTTP answered 2xx/3xx.
pub async fn probe(target: &CheckTarget, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, run_probe(target)).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        )),
    }
}

async fn run_probe(target: &CheckTarget) -> Result<(), String> {
    match target {
        CheckTarget::Tcp(addr) => TcpStream::connect(addr.as_str())
            .await
            .map(drop)
            .map_err(|e| format!("connect {addr}: {e}")),
        CheckTarget::Http(url) => http_get(url).await,
    }
}

async fn http_get(url: &str) -> Result<(), String> {
    let uri: Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
    let authority = uri
        .authority()
        .ok_or_else(|| format!("no host in {url}"))?
        .clone();
    let port = authority.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((authority.host(), port))
        .await
        .map_err(|e| format!("connect {authority}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, authority.as_str())
        .header(hyper::header::USER_AGENT, "meshnode-health-check")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(format!("HTTP {status}"))
    }
}

/// Starts one loop per checked service; each publishes health changes through the registry.
pub fn spawn_checks(checks: Vec<(usize, CheckConfig)>, registry: Arc<Registry>) {
    for (index, check) in checks {
        let registry = registry.clone();
        tokio::spawn(async move {
            let name = registry.name(index);
            let mut state = HealthState::new(check.rise, check.fall);
            let mut tick = tokio::time::interval(check.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut first = true;
            loop {
                tick.tick().await;
                let result = probe(&check.target, check.timeout).await;
                metrics::counter!(HEALTH_CHECKS, "service" => name.clone(),
                    "result" => if result.is_ok() { "pass" } else { "fail" })
                .increment(1);
                let output = match &result {
                    Ok(()) => "ok".to_string(),
                    Err(reason) => reason.clone(),
                };
                registry.note_probe(index, &output);
                let before = state.health();
                let after = state.handle_probe(result.is_ok());
                if let Err(reason) = &result {
                    debug!(service = %name, %reason, "health check failed");
                }
                if before != after || first {
                    match &result {
                        Ok(()) => info!(service = %name, health = %after, "health changed"),
                        // A check that never passed says why once, at its first result.
                        Err(reason) if before == after => {
                            warn!(service = %name, health = %after, %reason, "health check has not passed yet")
                        }
                        Err(reason) => {
                            warn!(service = %name, health = %after, %reason, "health changed")
                        }
                    }
                    if !registry.set_health(index, after, &output).await {
                        return;
                    }
                }
                first = false;
            }
        });
    }
}
