//! The admin HTTP API on loopback: `/v1/health`, `/v1/members`, `/v1/services`,
//! `/v1/status`, `/metrics`, and `POST /v1/leave`.
//!
//! Who may call what is [`access::Access`]. The listener itself is bounded:
//! headers must arrive within [`HEADER_TIMEOUT`] (also between requests on a
//! kept-alive connection), a connection lives at most [`MAX_CONN_LIFE`], at
//! most [`MAX_CONNS`] are served at once (more are closed at accept), and
//! accept errors (EMFILE) back off instead of spinning.

mod access;
pub mod client;
mod explain;
mod types;
mod ui;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use meshnode_gossip::{Catalog, GossipHandle, Member, MemberState};
use meshnode_transport::pki::Identity;
use meshnode_transport::tls::TlsMaterial;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tracing::{debug, info, warn};

use crate::ca::CaNode;
use crate::drain::Drain;
use crate::revocations::Revocations;
pub use access::Access;
pub use types::{PoolCounts, RemoteEntry, Status};

/// The secret every state-changing request needs, in the data dir (0600).
pub const SECRET_FILE: &str = "admin.secret";
/// A connection must send a request's headers within this (first request or
/// the next one on a kept-alive connection).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// No admin connection lives longer (clients reconnect).
pub const MAX_CONN_LIFE: Duration = Duration::from_secs(300);
/// Connections served at once; more are closed as they are accepted.
pub const MAX_CONNS: usize = 128;
/// Cap on a request head (and hyper's read buffer).
const MAX_HEAD: usize = 16 * 1024;
/// Request bodies are small JSON documents.
const MAX_BODY: usize = 64 * 1024;

/// A certificate closer to expiry than this is a warning.
const EXPIRY_WARNING_SECS: i64 = 24 * 3600;

pub struct AdminState {
    pub gossip: GossipHandle,
    /// Gateways only: the WAN pool.
    pub wan: Option<GossipHandle>,
    /// The node's credentials: the current certificate (renewed in place) and revocations.
    pub tls: Arc<TlsMaterial>,
    /// Set on CA nodes.
    pub ca: Option<Arc<CaNode>>,
    pub revocations: Arc<Revocations>,
    pub policy: Arc<crate::policy::PolicyAgent>,
    /// Who may call what (the admin secret is in it).
    pub access: Access,
    pub has_seeds: bool,
    /// This node's instances and their checks.
    pub(crate) registry: Arc<crate::registry::Registry>,
    /// Applies reloads, and holds the upstreams as they run (with the
    /// service each acts as resolved).
    pub(crate) reloader: Arc<crate::reload::Reloader>,
    pub(crate) dialer: Arc<crate::upstream::Dialer>,
    /// The policy snapshot streams are authorized with (explain reads it too).
    pub(crate) authz: crate::authz::Authorizer,
    pub drain: Drain,
    pub metrics: Option<PrometheusHandle>,
    pub leave: Arc<Notify>,
    pub refusal_log: crate::metrics::LogLimit,
}

pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNS));
    let full_log = crate::metrics::LogLimit::new(Duration::from_secs(10));
    loop {
        let stream = accept(&listener, "admin API").await;
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!(crate::metrics::ADMIN_REFUSED, "reason" => "too_many_connections")
                .increment(1);
            if full_log.allow() {
                warn!(limit = MAX_CONNS, "admin API at its connection limit; closing new connections (logged once per 10 s)");
            }
            drop(stream);
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(req, &state).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .serve_connection(TokioIo::new(stream), svc);
            match tokio::time::timeout(MAX_CONN_LIFE, conn).await {
                Ok(Err(e)) => debug!(error = %e, "admin connection"),
                Ok(Ok(())) => {}
                Err(_) => debug!("admin connection closed at its maximum lifetime"),
            }
        });
    }
}

/// The next connection on `listener`. On an error (EMFILE and friends) the
/// socket stays readable, so retrying at once would spin: it waits, longer
/// each time (10 ms doubling to 1 s), and tries again. Shared by the TCP
/// listeners the node serves itself (admin API, DNS).
pub(crate) async fn accept(listener: &TcpListener, what: &str) -> tokio::net::TcpStream {
    let mut backoff = Duration::from_millis(10);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => return stream,
            Err(e) => {
                warn!(error = %e, retry_in = ?backoff, "{what} cannot accept a connection");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
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
    if let Err(refused) = s
        .access
        .check(req.method(), req.uri().path(), req.headers())
    {
        metrics::counter!(crate::metrics::ADMIN_REFUSED, "reason" => refused.reason).increment(1);
        if s.refusal_log.allow() {
            info!(method = %req.method(), path = req.uri().path(), reason = refused.reason, "admin request refused (logged at most once per 10 s; see meshnode_admin_refused_total)");
        }
        return error(refused.status, &refused.message);
    }
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
        (&Method::GET, "/v1/revocations") => json(StatusCode::OK, &revocation_list(s)),
        // Cumulative counts by who called whom (`meshnode top` turns two
        // of these into rates).
        (&Method::GET | &Method::HEAD, path) if path == access::UI || path.starts_with("/ui/") => {
            ui::serve(path)
        }
        (&Method::GET, "/v1/top") => json(StatusCode::OK, &s.dialer.telemetry().top()),
        (&Method::GET, "/v1/explain") => match explain::explain(s, query).await {
            Ok(e) => json(StatusCode::OK, &e),
            Err(m) => error(StatusCode::BAD_REQUEST, &m),
        },
        (&Method::GET, "/v1/policy") => json(
            StatusCode::OK,
            &serde_json::json!({
                "loaded": s.policy.loaded(),
                "documents": s.policy.store.all().iter().map(|h| h.summary()).collect::<Vec<_>>(),
            }),
        ),
        (&Method::POST, "/v1/policy") => policy_apply(req, s).await,
        (&Method::POST, path) if path.starts_with(access::CHECK_REPORTS) => {
            check_report(req, s).await
        }
        (&Method::GET, path) if path.starts_with("/v1/policy/") => policy_get(s, path),
        (&Method::POST, "/v1/ca/tokens" | "/v1/ca/revoke") => ca_route(req, s).await,
        (&Method::POST, "/v1/reload") => match s.reloader.reload_from_source().await {
            Ok(report) => json(StatusCode::OK, &report),
            Err(e) => json(
                StatusCode::UNPROCESSABLE_ENTITY,
                &serde_json::json!({
                    "error": e.to_string(),
                    "errors": e.keys().iter().map(|k| serde_json::json!({ "key": k.key, "message": k.message })).collect::<Vec<_>>(),
                }),
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
            "/v1/health" | "/v1/members" | "/v1/services" | "/v1/status" | "/metrics" | "/v1/leave"
            | "/v1/reload" | "/v1/revocations" | "/v1/ca/tokens" | "/v1/ca/revoke" | "/v1/policy"
            | "/v1/explain" | "/v1/top",
        ) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckReport {
    /// `pass`, `warn` or `fail`.
    status: String,
    note: Option<String>,
    port: Option<u16>,
}

/// `POST /v1/check/<service>`: a ttl check's application reports in, with
/// its service's token (`<data_dir>/checks/<service>.token`).
async fn check_report(req: Request<Incoming>, s: &AdminState) -> Response<Full<Bytes>> {
    use crate::health::Outcome;
    use http_body_util::BodyExt;
    let service = req
        .uri()
        .path()
        .trim_start_matches(access::CHECK_REPORTS)
        .to_string();
    let token = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_string();
    let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("body: {e}")),
    };
    let r: CheckReport = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("body: {e}")),
    };
    let note = meshnode_gossip::keys::clip_output(r.note.as_deref().unwrap_or(&r.status));
    let outcome = match r.status.as_str() {
        "pass" => Outcome::Pass(note),
        "warn" => Outcome::Warn(note),
        "fail" => Outcome::Fail(note),
        other => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("status {other:?}: use pass, warn or fail"),
            )
        }
    };
    use crate::registry::ReportError;
    match s.registry.report(&service, r.port, &token, outcome) {
        Ok(()) => json(
            StatusCode::ACCEPTED,
            &serde_json::json!({ "service": service, "status": r.status }),
        ),
        Err(e @ ReportError::Token) => error(StatusCode::UNAUTHORIZED, &e.to_string()),
        Err(e @ ReportError::NoTtlCheck) => error(StatusCode::NOT_FOUND, &e.to_string()),
        Err(e @ ReportError::WhichPort) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e @ ReportError::Busy) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyRequest {
    /// The signed document's text form.
    document: String,
}

/// `POST /v1/policy`: a signed document from `meshnode policy apply` or `delete`.
async fn policy_apply(req: Request<Incoming>, s: &AdminState) -> Response<Full<Bytes>> {
    use crate::policy::Offer;
    use http_body_util::BodyExt;
    let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("body: {e}")),
    };
    let r: PolicyRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("body: {e}")),
    };
    let status = match s.policy.apply(&r.document).await {
        Offer::Adopted => "adopted",
        Offer::Unchanged => "unchanged",
        Offer::Ignored => "ignored",
        Offer::Stale { held } => {
            return error(
                StatusCode::CONFLICT,
                &format!(
                "this node holds version {held}, newer than the one sent: fetch it and apply again"
            ),
            )
        }
        Offer::Refused { reason, message } => {
            return json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({ "error": message, "reason": reason }),
            )
        }
    };
    match meshnode_transport::pki::policy::SignedDocument::verify(
        &r.document,
        &*s.tls,
        meshnode_transport::pki::unix_now(),
    ) {
        Ok(d) => json(
            StatusCode::OK,
            &serde_json::json!({
                "status": status,
                "kind": d.header.kind,
                "name": d.header.name,
                "version": d.header.version,
                "deleted": d.header.deleted,
                "digest": d.digest_hex(),
            }),
        ),
        Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

/// `GET /v1/policy/<kind>/<name>`.
fn policy_get(s: &AdminState, path: &str) -> Response<Full<Bytes>> {
    let rest = path.trim_start_matches("/v1/policy/");
    let Some((kind, name)) = rest.split_once('/') else {
        return error(StatusCode::NOT_FOUND, "use /v1/policy/<kind>/<name>");
    };
    match s.policy.store.get(kind, name) {
        Some(h) => json(
            StatusCode::OK,
            &serde_json::json!({
                "summary": h.summary(),
                "source": h.doc.source,
                "document": h.parsed,
                "adopted_at": h.adopted_at,
            }),
        ),
        None => error(
            StatusCode::NOT_FOUND,
            &format!("no {kind} document named {name:?} on this node"),
        ),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    ttl: Option<String>,
    uses: Option<u32>,
    cluster: Option<String>,
    #[serde(default)]
    gateway: bool,
    #[serde(default)]
    services: Vec<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    node: Option<String>,
    cluster: Option<String>,
    serial: Option<String>,
    /// A whole certificate (PEM): an operator's, or one issued offline.
    cert: Option<String>,
    /// Revoke a name nobody here knows (a certificate issued offline that
    /// never joined this pool).
    #[serde(default)]
    force: bool,
    reason: Option<String>,
}

/// `POST /v1/ca/tokens` and `POST /v1/ca/revoke`: CA nodes only.
async fn ca_route(req: Request<Incoming>, s: &AdminState) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt;
    // The secret was checked with every other state-changing request.
    let Some(ca) = &s.ca else {
        return error(
            StatusCode::NOT_FOUND,
            "this node holds no CA key (configure a [ca] section on a CA node)",
        );
    };
    let path = req.uri().path().to_string();
    let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("body: {e}")),
    };
    let bad = |e: serde_json::Error| error(StatusCode::BAD_REQUEST, &format!("body: {e}"));
    if path == "/v1/ca/tokens" {
        let r: TokenRequest = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return bad(e),
        };
        let ttl = match r.ttl.as_deref().map(humantime::parse_duration) {
            None => std::time::Duration::from_secs(3600),
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                return error(StatusCode::BAD_REQUEST, &format!("ttl: {e} (e.g. \"1h\")"))
            }
        };
        return match ca.create_token(ttl, r.uses.unwrap_or(1), r.cluster, r.gateway, &r.services) {
            Ok(t) => json(
                StatusCode::OK,
                &serde_json::json!({ "token": t.encode(), "id": t.id_hex(), "expires": t.expires }),
            ),
            Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        };
    }
    let r: RevokeRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad(e),
    };
    let reason = r
        .reason
        .clone()
        .unwrap_or_else(|| "revoked by operator".into());
    if let Some(pem) = &r.cert {
        if r.node.is_some() || r.serial.is_some() {
            return error(StatusCode::BAD_REQUEST, "give a cert, a node or a serial");
        }
        let entry = match ca.revoke_certificate(pem, &reason) {
            Ok(e) => e,
            Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
        };
        let view = revocation_view(&entry);
        return match s.revocations.adopt(entry).await {
            Ok(()) => json(StatusCode::OK, &view),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e),
        };
    }
    let me = s.tls.me();
    let identity = match &r.node {
        Some(node) => {
            let cluster = r.cluster.as_deref().unwrap_or(me.identity.cluster());
            match Identity::new(me.identity.mesh(), cluster, node) {
                Ok(i) => Some(i),
                Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
            }
        }
        None => None,
    };
    if identity.is_none() && r.serial.is_none() {
        return error(StatusCode::BAD_REQUEST, "give a node or a serial");
    }
    if identity.as_ref() == Some(&me.identity) {
        return error(StatusCode::BAD_REQUEST, "a CA node cannot revoke itself");
    }
    if let (Some(id), false) = (&identity, r.force) {
        // A typo would otherwise revoke nothing and say it did.
        let in_pool = id.cluster() == me.identity.cluster()
            && s.gossip
                .snapshot()
                .await
                .iter()
                .any(|n| n.node == id.node());
        if !in_pool && !ca.has_issued(id) {
            return error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "no certificate of {id} is known here (not in this CA node's issuance log, not a member of its pool): check the name and --cluster, or add --force to revoke the name anyway (a certificate issued offline)"
                ),
            );
        }
    }
    let entry = match ca.revoke(identity.as_ref(), r.serial.as_deref(), &reason) {
        Ok(e) => e,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let view = revocation_view(&entry);
    match s.revocations.adopt(entry).await {
        Ok(()) => json(StatusCode::OK, &view),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

fn revocation_view(e: &meshnode_transport::pki::revocation::SignedRevocation) -> serde_json::Value {
    let r = &e.revocation;
    serde_json::json!({
        "id": e.id(),
        "identity": r.identity.as_ref().map(|i| i.to_string()),
        "keys": r.keys,
        "serials": r.serials,
        "revoked_at": r.revoked_at,
        "expires": r.expires,
        "reason": r.reason,
    })
}

fn revocation_list(s: &AdminState) -> Vec<serde_json::Value> {
    s.tls
        .revocations()
        .entries()
        .iter()
        .map(revocation_view)
        .collect()
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
    has_joined(s.has_seeds, s.tls.me().identity.node(), members)
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
    let now = meshnode_transport::clock::wall()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let me = s.tls.me();
    let expires_in = me.not_after - now;
    let mut warnings = Vec::new();
    if expires_in < EXPIRY_WARNING_SECS {
        warnings.push(format!(
            "node certificate expires in {}s",
            expires_in.max(0)
        ));
    }
    let ca_not_after = s.tls.ca_not_after();
    let ca_expires_in = ca_not_after.map(|t| t - now);
    if let Some(left) = ca_expires_in.filter(|l| *l < EXPIRY_WARNING_SECS) {
        warnings.push(format!("mesh CA certificate expires in {}s", left.max(0)));
    }
    // A revoked node hears from nobody: say so instead of blaming the seeds.
    let refused = s.tls.refused_as_revoked().get();
    if let Some((n, last)) = refused.filter(|(_, last)| now - last < 300) {
        warnings.push(format!(
            "peers refuse this node's certificate as revoked ({n} refusals, the last {}s ago): an operator revoked it; this machine needs a new identity (meshnode join with a new token)",
            (now - last).max(0)
        ));
    } else if !joined(s, &members) {
        warnings.push(
            "no other live member yet: check seeds and that they are reachable over UDP".into(),
        );
    }
    for (service, port, health, output, since) in s.registry.unhealthy() {
        warnings.push(format!(
            "service {service} (port {port}) is {} for {}s: {output}",
            health.as_str(),
            (now - since).max(0)
        ));
    }
    let policy_loaded = s.policy.loaded();
    if !policy_loaded {
        warnings
            .push("policy not yet loaded: no full state exchange with a peer has completed".into());
    }
    let catalog = s.gossip.catalog();
    Status {
        identity: me.identity.to_string(),
        node: me.identity.node().to_string(),
        cluster: me.identity.cluster().to_string(),
        mesh: me.identity.mesh().to_string(),
        gateway: me.is_gateway(),
        ca: s.ca.is_some(),
        revocations: s.tls.revocations().len(),
        refused_as_revoked_at: refused.map(|(_, last)| last),
        policy: types::PolicyState {
            loaded: policy_loaded,
            documents: s.policy.store.len(),
        },
        cert_not_after: me.not_after,
        cert_expires_in_seconds: expires_in,
        ca_not_after,
        ca_expires_in_seconds: ca_expires_in,
        pools: types::Pools {
            lan: counts(&members),
            wan,
        },
        local_services: s.registry.len(),
        catalog_services: catalog.services.len(),
        catalog_instances: catalog.services.values().map(Vec::len).sum(),
        upstreams: s.reloader.upstreams().len(),
        active_streams: s.drain.active(),
        warnings,
    }
}
