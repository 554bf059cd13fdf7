//! The admin HTTP API on loopback: `/v1/health`, `/v1/members`, `/v1/services`,
//! `/v1/status`, `/metrics`, and `POST /v1/leave`.

pub mod client;
mod types;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use meshnode_gossip::{Catalog, GossipHandle, Member, MemberState};
use meshnode_transport::PeerCert;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tracing::debug;

use crate::drain::Drain;
pub use types::{PoolCounts, RemoteEntry, Status};

/// A certificate closer to expiry than this is a warning.
const EXPIRY_WARNING_SECS: i64 = 24 * 3600;

pub struct AdminState {
    pub gossip: GossipHandle,
    /// Gateways only: the WAN pool.
    pub wan: Option<GossipHandle>,
    /// When the trusted CA certificate expires (Unix seconds).
    pub ca_not_after: Option<i64>,
    pub me: PeerCert,
    pub has_seeds: bool,
    pub local_services: usize,
    pub upstreams: usize,
    pub drain: Drain,
    pub metrics: Option<PrometheusHandle>,
    pub leave: Arc<Notify>,
}

pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(req, &state).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(error = %e, "admin connection");
            }
        });
    }
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec_pretty(body)
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes());
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn error(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": msg }))
}

async fn route(req: Request<Incoming>, s: &AdminState) -> Response<Full<Bytes>> {
    let query = req.uri().query().unwrap_or("");
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/v1/health") => {
            if joined(s, &s.gossip.members().await) {
                json(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
            } else {
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &serde_json::json!({ "status": "joining" }),
                )
            }
        }
        (&Method::GET, "/v1/members") => {
            if query.split('&').any(|kv| kv == "pool=wan") {
                return match &s.wan {
                    Some(wan) => json(StatusCode::OK, &wan.members().await),
                    None => error(
                        StatusCode::NOT_FOUND,
                        "this node is not in a WAN pool (only gateways are)",
                    ),
                };
            }
            json(StatusCode::OK, &s.gossip.members().await)
        }
        (&Method::GET, "/v1/services") => json(StatusCode::OK, &services(&s.gossip.catalog())),
        (&Method::GET, "/v1/status") => json(StatusCode::OK, &status(s).await),
        (&Method::GET, "/metrics") => match &s.metrics {
            Some(h) => Response::builder()
                .header("content-type", "text/plain; version=0.0.4")
                .body(Full::new(Bytes::from(h.render())))
                .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))),
            None => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "no metrics recorder in this process",
            ),
        },
        (&Method::POST, "/v1/leave") => {
            s.leave.notify_one();
            json(
                StatusCode::ACCEPTED,
                &serde_json::json!({ "status": "leaving" }),
            )
        }
        (
            _,
            "/v1/health" | "/v1/members" | "/v1/services" | "/v1/status" | "/metrics" | "/v1/leave",
        ) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

/// Local instances as they are, plus one entry per other cluster that has the
/// service (see [`RemoteEntry`]).
fn services(cat: &Catalog) -> BTreeMap<String, Vec<serde_json::Value>> {
    let mut out: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for (name, list) in &cat.services {
        out.entry(name.clone())
            .or_default()
            .extend(list.iter().filter_map(|i| serde_json::to_value(i).ok()));
    }
    for (name, routes) in &cat.remote {
        let mut by_cluster: BTreeMap<&str, RemoteEntry> = BTreeMap::new();
        for r in routes {
            let e = by_cluster.entry(&r.cluster).or_insert_with(|| RemoteEntry {
                cluster: r.cluster.clone(),
                remote: true,
                health: String::new(),
                healthy: 0,
                reachable: false,
                tags: r.tags.clone(),
                gateways: Vec::new(),
                via: Vec::new(),
                rtt_ms: None,
            });
            e.reachable |= r.reachable;
            if r.reachable {
                e.healthy = e.healthy.max(r.healthy);
                e.rtt_ms = match (e.rtt_ms, r.rtt_ms) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            for g in &r.gateways {
                if !e.gateways.contains(g) {
                    e.gateways.push(g.clone());
                }
            }
            e.via.push(r.via.clone());
        }
        let list = out.entry(name.clone()).or_default();
        for (_, mut e) in by_cluster {
            e.health = if e.reachable && e.healthy > 0 {
                "passing"
            } else {
                "critical"
            }
            .to_string();
            if let Ok(v) = serde_json::to_value(&e) {
                list.push(v);
            }
        }
    }
    out
}

fn joined(s: &AdminState, members: &[Member]) -> bool {
    has_joined(s.has_seeds, s.me.identity.node(), members)
}

/// Joined: no seeds to join, or at least one other live member seen. Shared by
/// `/v1/health` and the systemd `READY=1` notification.
pub(crate) fn has_joined(has_seeds: bool, me: &str, members: &[Member]) -> bool {
    !has_seeds
        || members
            .iter()
            .any(|m| m.state == MemberState::Alive && m.node != me)
}

fn counts(members: &[Member]) -> PoolCounts {
    let count = |st: MemberState| members.iter().filter(|m| m.state == st).count();
    PoolCounts {
        alive: count(MemberState::Alive),
        dead: count(MemberState::Dead),
        left: count(MemberState::Left),
    }
}

async fn status(s: &AdminState) -> Status {
    let members = s.gossip.members().await;
    let wan = match &s.wan {
        Some(w) => Some(counts(&w.members().await)),
        None => None,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let expires_in = s.me.not_after - now;
    let mut warnings = Vec::new();
    if expires_in < EXPIRY_WARNING_SECS {
        warnings.push(format!(
            "node certificate expires in {}s",
            expires_in.max(0)
        ));
    }
    let ca_expires_in = s.ca_not_after.map(|t| t - now);
    if let Some(left) = ca_expires_in.filter(|l| *l < EXPIRY_WARNING_SECS) {
        warnings.push(format!("mesh CA certificate expires in {}s", left.max(0)));
    }
    if !joined(s, &members) {
        warnings.push(
            "no other live member yet: check seeds and that they are reachable over UDP".into(),
        );
    }
    let catalog = s.gossip.catalog();
    Status {
        identity: s.me.identity.to_string(),
        node: s.me.identity.node().to_string(),
        cluster: s.me.identity.cluster().to_string(),
        mesh: s.me.identity.mesh().to_string(),
        gateway: s.me.is_gateway(),
        cert_not_after: s.me.not_after,
        cert_expires_in_seconds: expires_in,
        ca_not_after: s.ca_not_after,
        ca_expires_in_seconds: ca_expires_in,
        pools: types::Pools {
            lan: counts(&members),
            wan,
        },
        local_services: s.local_services,
        catalog_services: catalog.services.len(),
        catalog_instances: catalog.services.values().map(Vec::len).sum(),
        upstreams: s.upstreams,
        active_streams: s.drain.active(),
        warnings,
    }
}
