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
use crate::registry::{Registry, Slot};

/// What one probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass(String),
    /// An exec check's exit code 1.
    Warn(String),
    Fail(String),
}

impl Outcome {
    pub fn output(&self) -> &str {
        match self {
            Outcome::Pass(o) | Outcome::Warn(o) | Outcome::Fail(o) => o,
        }
    }
}

/// Runs one probe: TCP connected, HTTP answered 2xx/3xx, or the program
/// exited 0 pass; an exit code of 1 warns; anything else fails.
pub async fn probe(target: &CheckTarget, timeout: Duration) -> Outcome {
    match tokio::time::timeout(timeout, run_probe(target)).await {
        Ok(r) => r,
        Err(_) => Outcome::Fail(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        )),
    }
}

async fn run_probe(target: &CheckTarget) -> Outcome {
    let simple = |r: Result<(), String>| match r {
        Ok(()) => Outcome::Pass("ok".into()),
        Err(e) => Outcome::Fail(e),
    };
    match target {
        CheckTarget::Tcp(addr) => simple(
            TcpStream::connect(addr.as_str())
                .await
                .map(drop)
                .map_err(|e| format!("connect {addr}: {e}")),
        ),
        CheckTarget::Http(url) => simple(http_get(url).await),
        CheckTarget::Exec(argv) => exec(argv).await,
        // Never probed: the application reports in.
        CheckTarget::Ttl(_) => Outcome::Fail("a ttl check is not probed".into()),
    }
}

/// Runs the program (no shell), killed if the probe's timeout drops this
/// future; its output is the first non-empty line of stdout, else stderr.
async fn exec(argv: &[String]) -> Outcome {
    let Some((program, args)) = argv.split_first() else {
        return Outcome::Fail("no program".into());
    };
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    let out = match out {
        Ok(o) => o,
        Err(e) => return Outcome::Fail(format!("cannot run {program}: {e}")),
    };
    let first_line = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(String::from)
    };
    let text = first_line(&out.stdout).or_else(|| first_line(&out.stderr));
    match out.status.code() {
        Some(0) => Outcome::Pass(text.unwrap_or_else(|| "exit 0".into())),
        Some(1) => Outcome::Warn(text.unwrap_or_else(|| "exit 1".into())),
        Some(c) => Outcome::Fail(text.map_or(format!("exit {c}"), |t| format!("exit {c}: {t}"))),
        None => Outcome::Fail("killed by a signal".into()),
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

/// A report of a ttl check's application (`meshnode check ...`).
#[derive(Clone, Debug)]
pub struct Report {
    pub outcome: Outcome,
}

/// Starts one loop per checked instance, from the health it has (a reload
/// keeps it); each publishes health changes through the registry and ends
/// when its generation is replaced. The caller aborts the returned loops at
/// a reload, so none outlives its generation by a probe.
pub fn spawn_checks(
    checks: Vec<(Slot, CheckConfig, meshnode_gossip::Health)>,
    registry: Arc<Registry>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut loops = Vec::with_capacity(checks.len());
    for (slot, check, initial) in checks {
        let registry = registry.clone();
        loops.push(tokio::spawn(async move {
            let name = registry.name(slot);
            let mut state = HealthState::new(check.rise, check.fall);
            if initial != meshnode_gossip::Health::Critical {
                state.set(initial);
            }
            let mut first = true;
            let mut reports = match check.target {
                CheckTarget::Ttl(_) => Some(registry.ttl_inbox(slot)),
                _ => None,
            };
            let mut tick = tokio::time::interval(check.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let outcome = match (&check.target, reports.as_mut()) {
                    (CheckTarget::Ttl(ttl), Some(rx)) => {
                        match tokio::time::timeout(*ttl, rx.recv()).await {
                            Ok(Some(r)) => r.outcome,
                            Ok(None) => return,
                            Err(_) => Outcome::Fail(format!(
                                "no report within the ttl of {}",
                                humantime::format_duration(*ttl)
                            )),
                        }
                    }
                    _ => {
                        tick.tick().await;
                        probe(&check.target, check.timeout).await
                    }
                };
                let pass = matches!(outcome, Outcome::Pass(_));
                metrics::counter!(HEALTH_CHECKS, "service" => name.clone(),
                    "result" => match outcome { Outcome::Pass(_) => "pass", Outcome::Warn(_) => "warn", Outcome::Fail(_) => "fail" })
                .increment(1);
                registry.note_probe(slot, outcome.output());
                let before = state.health();
                let after = match (&check.target, &outcome) {
                    // An application's report is its verdict.
                    (CheckTarget::Ttl(_), Outcome::Pass(_)) => {
                        state.handle_probe(true);
                        state.set(meshnode_gossip::Health::Passing)
                    }
                    (CheckTarget::Ttl(_), Outcome::Fail(_)) => {
                        state.set(meshnode_gossip::Health::Critical)
                    }
                    (_, Outcome::Warn(_)) => state.handle_warning(),
                    _ => state.handle_probe(pass),
                };
                if !pass {
                    debug!(service = %name, reason = outcome.output(), "health check failed");
                }
                if before != after || first {
                    match &outcome {
                        Outcome::Pass(_) => {
                            info!(service = %name, health = %after, "health changed")
                        }
                        // A check that never passed says why once, at its first result.
                        o if before == after => {
                            warn!(service = %name, health = %after, reason = o.output(), "health check has not passed yet")
                        }
                        o => {
                            warn!(service = %name, health = %after, reason = o.output(), "health changed")
                        }
                    }
                    if !registry.set_health(slot, after, outcome.output()).await {
                        return;
                    }
                }
                first = false;
            }
        }));
    }
    loops
}
