//! The HTTP data path (ARCHITECTURE.md, "HTTP services").
//!
//! Caller side: an upstream of an HTTP service serves HTTP/1.1 and
//! prior-knowledge HTTP/2 to the local application (hyper-util's auto
//! server) and routes each request on its own ([`crate::routes`]): one
//! tunnel stream per request, its header marked `http`, carrying the
//! request and its response as HTTP/1.1 (chunked bodies, trailers).
//!
//! Destination side: a stream marked `http` is served by hyper's HTTP/1.1
//! server, and its one request goes to the application over a pooled
//! connection in the protocol the service declares (`http`: HTTP/1.1,
//! `http2`: h2c).

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::PathAndQuery;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshnode_gossip::Protocol;
use rand::RngExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::debug;

use crate::config::UpstreamConfig;
use crate::metrics::{
    LogLimit, HTTP_BREAKER_OPEN, HTTP_BUDGET_EXHAUSTED, HTTP_FAULTS, HTTP_MIRRORED,
    HTTP_RATE_LIMITED, HTTP_REQUESTS, HTTP_RETRIES, HTTP_STREAMS, LABELS,
};
use crate::policy::schema::CircuitBreaker;
use crate::policy::schema::HOP_BY_HOP;
use crate::resilience::{Admitted, Breaker, Limit};
use crate::routes::{RequestView, Subset};
use crate::telemetry::{Access, Kind};
use crate::upstream::{Dialer, Refusal, Tunnel, Want};
use crate::uri_path::BadPath;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every response body this module hands to hyper.
pub(crate) type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Says which hop made an error response, and why.
pub const ERROR_HEADER: &str = "x-meshnode-error";
/// Marks a response a `fault` of a resilience document made.
pub const FAULT_HEADER: &str = "x-meshnode-fault";
/// A connection to the local application should be near-instant.
const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Idle pooled HTTP/1.1 connections kept per application address.
const MAX_IDLE: usize = 64;
/// gRPC's trailers, declared on the hop between nodes for a gRPC response
/// (HTTP/1.1 sends only trailers its `trailer` header names; the others
/// must be declared by the application, as HTTP/1.1 asks of it anyway).
const GRPC_TRAILERS: &str = "grpc-status, grpc-message, grpc-status-details-bin";

static ERROR_LOG: LogLimit = LogLimit::new(Duration::from_secs(1));

fn body<B>(b: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed_unsync()
}

/// A response this node made itself: status, why (in [`ERROR_HEADER`]).
fn error_response(status: StatusCode, why: &'static str, detail: String) -> Response<Body> {
    let mut r = Response::new(body(Full::new(Bytes::from(format!("{detail}\n")))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(ERROR_HEADER, HeaderValue::from_static(why));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

fn count(service: &str, direction: &'static str, subset: &Subset, result: &'static str) {
    metrics::counter!(HTTP_REQUESTS,
        "service" => LABELS.value("service", service, true),
        "direction" => direction,
        "subset" => LABELS.value("subset", &String::from(subset.clone()), true),
        "result" => result)
    .increment(1);
}

/// Drops the headers of one hop: the fixed ones and any the `connection`
/// header names. `te: trailers` is the one TE value HTTP/2 allows and
/// gRPC needs: it is kept when `keep_te_trailers`.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for n in named {
        headers.remove(n);
    }
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
    if keep_te_trailers && trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The protocol an HTTP/1.1 upgrade request asks for (`connection:
/// upgrade` with an `upgrade` header, as a WebSocket handshake), if any.
pub(crate) fn upgrade_of(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// Puts the upgrade headers back after [`strip_hop_by_hop`]: an upgrade is
/// the one hop-by-hop exchange every hop of the mesh passes on.
fn keep_upgrade(headers: &mut HeaderMap, protocol: &HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol.clone());
}

/// Once both sides of a `101 Switching Protocols` have switched, copies
/// bytes both ways until either side closes; `hold` (an in-flight count)
/// lives as long as the upgraded connection.
fn splice_upgrades(
    a: hyper::upgrade::OnUpgrade,
    b: hyper::upgrade::OnUpgrade,
    hold: impl Send + 'static,
) {
    tokio::spawn(async move {
        let _hold = hold;
        match tokio::join!(a, b) {
            (Ok(a), Ok(b)) => {
                let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
                if let Err(e) = tokio::io::copy_bidirectional(&mut a, &mut b).await {
                    debug!(error = %e, "upgraded HTTP connection ended with an error");
                }
            }
            (a, b) => {
                debug!(client = ?a.err(), server = ?b.err(), "an HTTP upgrade did not complete");
            }
        }
    });
}

/// The W3C trace context header, parsed once.
pub(crate) static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// W3C trace context: a valid `traceparent` is kept as it came; a missing
/// or malformed one is replaced by a new trace (and `tracestate`, which
/// means nothing without it, dropped). `ids`: a random trace and parent id.
/// True when the request's own was kept.
pub(crate) fn trace_context(headers: &mut HeaderMap, ids: (u128, u64)) -> bool {
    let valid = headers
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(valid_traceparent);
    if valid {
        return true;
    }
    headers.remove("tracestate");
    // All-zero ids are invalid; the chance is nil, but stay valid anyway.
    let (trace, parent) = (ids.0.max(1), ids.1.max(1));
    if let Ok(v) = HeaderValue::from_str(&format!("00-{trace:032x}-{parent:016x}-01")) {
        headers.insert(TRACEPARENT.clone(), v);
    }
    false
}

/// `version-traceid-parentid-flags`, lower-case hex, ids not all zero,
/// version not `ff`; a version above 00 may carry more fields after.
pub(crate) fn valid_traceparent(v: &str) -> bool {
    let b = v.as_bytes();
    let hex = |s: &[u8]| {
        s.iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    let zero = |s: &[u8]| s.iter().all(|c| *c == b'0');
    if b.len() < 55 || !hex(&b[0..2]) || &b[0..2] == b"ff" {
        return false;
    }
    if (&b[0..2] == b"00" && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
        return false;
    }
    b[2] == b'-'
        && b[35] == b'-'
        && b[52] == b'-'
        && hex(&b[3..35])
        && !zero(&b[3..35])
        && hex(&b[36..52])
        && !zero(&b[36..52])
        && hex(&b[53..55])
}

/// The request as it goes onto a tunnel stream: origin-form target, a
/// `host` header, no hop-by-hop headers, `te: trailers` (so the
/// destination may send trailers back over HTTP/1.1).
fn for_tunnel(parts: &mut hyper::http::request::Parts) {
    strip_hop_by_hop(&mut parts.headers, false);
    if !parts.headers.contains_key(header::HOST) {
        if let Some(a) = parts.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                parts.headers.insert(header::HOST, v);
            }
        }
    }
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    if let Ok(u) = Uri::try_from(target) {
        parts.uri = u;
    }
    parts.version = hyper::Version::HTTP_11;
    parts
        .headers
        .insert(header::TE, HeaderValue::from_static("trailers"));
}

// === caller side ===

/// Serves one application connection to an HTTP upstream until it closes.
pub(crate) async fn serve_caller(tcp: TcpStream, up: Arc<UpstreamConfig>, dialer: Arc<Dialer>) {
    let _ = tcp.set_nodelay(true);
    let svc = hyper::service::service_fn(move |req| {
        let up = up.clone();
        let dialer = dialer.clone();
        async move { Ok::<_, Infallible>(forward(req, up, dialer).await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
        .await
    {
        debug!(error = %e, "HTTP upstream connection ended with an error");
    }
}

/// Where a request went, for its telemetry.
#[derive(Default)]
struct Landed {
    /// The instance (node, or gateway and cluster) that answered.
    instance: Option<String>,
    cluster: Option<String>,
    traceparent: Option<HeaderValue>,
    /// This node's span when it exports traces: the trace context as the
    /// application sent it (or a new trace), this hop's span id, and
    /// whether it is the trace's root (the application sent none).
    span: Option<(meshnode_transport::tunnel::TraceContext, [u8; 8], bool)>,
    /// The request target as sent on: its path canonical (as it came when
    /// it has no canonical form).
    uri: Option<Uri>,
    /// The request body's bytes, as they stream through (none without a body).
    sent: Option<Arc<std::sync::atomic::AtomicU64>>,
}

/// An exchange's body bytes, added to its pair when the response body
/// ends or is dropped (the request body's are counted as they stream, so
/// they are done by then, but for a request still streaming after its
/// response).
struct Bytes2Pair {
    received: u64,
    sent: Option<Arc<std::sync::atomic::AtomicU64>>,
    pair: Arc<crate::telemetry::PairStats>,
}

impl Bytes2Pair {
    /// A method, so a closure that calls it owns the whole value (and its
    /// `Drop`), not just the one field a field access would capture.
    fn received(&mut self, n: usize) {
        self.received += n as u64;
    }
}

impl Drop for Bytes2Pair {
    fn drop(&mut self) {
        let sent = self
            .sent
            .as_ref()
            .map_or(0, |s| s.load(std::sync::atomic::Ordering::Relaxed));
        self.pair.add_bytes(sent, self.received);
    }
}

/// A response's result label and whether it is an error (for `top` and
/// the access log): the mesh's refusal when the mesh made it (its error
/// header: only meshnode sets it, applications' are removed at the
/// destination; always an error, denials and rate limits included), a
/// fault this node injected (an error), else the status class (an error
/// when 5xx). Header names are static: no name is parsed per request.
fn result_of(resp: &Response<Body>) -> (&'static str, bool) {
    static ERROR: HeaderName = HeaderName::from_static(ERROR_HEADER);
    static FAULT: HeaderName = HeaderName::from_static(FAULT_HEADER);
    if let Some(e) = resp.headers().get(&ERROR) {
        let e = e.as_bytes();
        let result = crate::telemetry::RESULTS
            .iter()
            .find(|r| r.as_bytes() == e)
            .copied()
            .unwrap_or("other");
        return (result, true);
    }
    if resp.headers().contains_key(&FAULT) {
        return ("fault", true);
    }
    (class(resp.status()), resp.status().is_server_error())
}

/// One request from a local application: forwarded, then recorded
/// (golden metrics, `top`, the access log) with its latency to the
/// response head.
async fn forward(
    req: Request<Incoming>,
    up: Arc<UpstreamConfig>,
    dialer: Arc<Dialer>,
) -> Response<Body> {
    let started = meshnode_transport::clock::tokio_now();
    // Only a traced request needs the wall clock (its span's start).
    let wall = dialer
        .telemetry()
        .tracer
        .enabled()
        .then(meshnode_transport::clock::wall);
    let method = req.method().clone();
    let mut landed = Landed::default();
    // Boxed: the routing and exchange state is several KiB, and a future
    // that holds it inline is copied whole each time hyper moves the
    // request's task (callgrind: +63,000 instructions a request).
    let resp = Box::pin(route_and_send(req, &up, &dialer, &mut landed)).await;
    let took = meshnode_transport::clock::tokio_since(started);
    let telemetry = dialer.telemetry();
    let (result, error) = result_of(&resp);
    let cluster = landed.cluster.as_deref().unwrap_or("-");
    let pair = telemetry.out_pair(Kind::Http, up.as_service.as_deref(), &up.service, cluster);
    pair.record(result, error, took, None);
    let mut bytes = Bytes2Pair {
        received: 0,
        sent: landed.sent.take(),
        pair,
    };
    let resp = resp.map(|inner| {
        body(inner.map_frame(move |f| {
            if let Some(d) = f.data_ref() {
                bytes.received(d.len());
            }
            f
        }))
    });
    telemetry.access.log(error, || Access {
        direction: "out",
        kind: "http",
        source: telemetry.identity.clone(),
        source_service: up.as_service.clone().unwrap_or_else(|| "-".into()),
        service: up.service.clone(),
        cluster: cluster.to_string(),
        instance: landed.instance.unwrap_or_else(|| "-".into()),
        method: method.to_string(),
        path: landed.uri.as_ref().map_or("-", |u| u.path()).to_string(),
        result: result.to_string(),
        status: resp.status().as_u16(),
        duration: took,
        trace_id: crate::telemetry::trace_id(landed.traceparent.as_ref()),
        ..Access::default()
    });
    if let (Some((context, span_id, root)), Some(wall)) = (landed.span, wall) {
        use crate::trace::Value::{Int, Str};
        telemetry.tracer.export(crate::trace::SpanRecord {
            context,
            span_id,
            root,
            name: format!("{} {}", method, up.service),
            kind: crate::trace::Kind::Client,
            start: wall,
            end: meshnode_transport::clock::wall(),
            error,
            attributes: {
                let mut a = crate::trace::caller_attributes(
                    &up.service,
                    up.as_service.as_deref(),
                    cluster,
                    result,
                );
                a.extend([
                    ("http.request.method", Str(method.to_string())),
                    (
                        "url.path",
                        Str(landed.uri.as_ref().map_or("-", |u| u.path()).to_string()),
                    ),
                    (
                        "http.response.status_code",
                        Int(i64::from(resp.status().as_u16())),
                    ),
                ]);
                a
            },
        });
    }
    resp
}

/// Routes one request, opens a tunnel stream to an instance of the
/// chosen subset, exchanges it there.
async fn route_and_send(
    mut req: Request<Incoming>,
    up: &Arc<UpstreamConfig>,
    dialer: &Arc<Dialer>,
    landed: &mut Landed,
) -> Response<Body> {
    // An upgrade (WebSocket) is routed like any request; once the instance
    // answers 101, the two connections are spliced.
    let upgrade = upgrade_of(req.headers())
        .filter(|_| req.version() == hyper::Version::HTTP_11)
        .map(|p| (p, hyper::upgrade::on(&mut req)));
    let (mut parts, req_body) = req.into_parts();
    // Routes see the path the destination will authorize and serve.
    let normalized = normalize_target(&mut parts.uri);
    landed.uri = Some(parts.uri.clone());
    if let Err(e) = normalized {
        count(&up.service, "out", &Subset::Any, "bad_path");
        return bad_path(e);
    }
    let (split_roll, mirror_roll, ids, fault_rolls) = {
        let mut rng = rand::rng();
        (
            rng.random_range(0..100u32),
            rng.random_range(0.0..100.0f64),
            (rng.random::<u128>(), rng.random::<u64>()),
            (
                rng.random_range(0.0..100.0f64),
                rng.random_range(0.0..100.0f64),
            ),
        )
    };
    let resilience = dialer.resilience(&up.service);
    let table = dialer.routes().table(&up.service);
    let mut subset = Subset::Any;
    let mut mirror = None;
    // The matched route's own timeouts and retries (the table lives as
    // long as the request, so they are borrowed, not copied).
    let mut on_route = None;
    if let Some(t) = &table {
        let view = RequestView {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &parts.headers,
        };
        if let Some(sel) = t.select(&view, split_roll, mirror_roll) {
            subset = sel.subset.clone();
            mirror = sel.mirror.cloned();
            on_route = Some(sel.resilience);
            let rule = sel.rule;
            t.rewrite(rule, &mut parts.headers);
        }
    }
    if let Some(policy) = &resilience {
        let faults = policy.faults(&parts.headers, fault_rolls.0, fault_rolls.1);
        if let Some(d) = faults.delay {
            count_fault(&up.service, "delay");
            tokio::time::sleep(d).await;
        }
        if let Some(status) = faults.abort {
            count_fault(&up.service, "abort");
            count(&up.service, "out", &subset, "fault");
            return fault_response(status);
        }
    }
    let breaker = resilience
        .as_ref()
        .and_then(|p| Some((p.circuit_breaker.as_ref()?, dialer.breaker(&up.service))));
    let limits = breaker.as_ref().map(|(cb, breaker)| Limits { cb, breaker });
    // Held until the response body ends, and until the response head.
    let (in_flight, pending) = match limits
        .map(|l| Ok::<_, Limit>((l.enter(Limit::Requests)?, l.enter(Limit::Pending)?)))
    {
        Some(Err(limit)) => {
            count(&up.service, "out", &subset, "breaker_open");
            return breaker_open(&up.service, limit);
        }
        Some(Ok(held)) => held,
        None => (None, None),
    };
    for_tunnel(&mut parts);
    if let Some((protocol, _)) = &upgrade {
        keep_upgrade(&mut parts.headers, protocol);
        mirror = None;
    }
    let app_traced = trace_context(&mut parts.headers, ids);
    if dialer.telemetry().tracer.enabled() {
        let context = parts
            .headers
            .get(&TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::trace::parse_traceparent);
        if let Some(context) = context {
            // The hops after this one see this node's span as the parent.
            let mine = crate::trace::span_id();
            let onward = crate::trace::traceparent(&meshnode_transport::tunnel::TraceContext {
                parent_id: mine,
                ..context
            });
            if let Ok(v) = HeaderValue::from_str(&onward) {
                parts.headers.insert(TRACEPARENT.clone(), v);
                landed.span = Some((context, mine, !app_traced));
            }
        }
    }
    landed.traceparent = parts.headers.get(&TRACEPARENT).cloned();
    if let Some(m) = mirror {
        // Only a request without a body can be copied without holding it.
        if hyper::body::Body::is_end_stream(&req_body) {
            tokio::spawn(send_mirror(parts.clone(), up.clone(), dialer.clone(), m));
        }
    }
    let safe = hyper::body::Body::is_end_stream(&req_body)
        && matches!(
            parts.method,
            hyper::Method::GET | hyper::Method::HEAD | hyper::Method::OPTIONS
        );
    // A route's settings take the place of the service document's.
    let retries = on_route
        .and_then(|r| r.retries.as_ref())
        .or_else(|| resilience.as_ref().and_then(|p| p.retries.as_ref()));
    let timeout = on_route
        .and_then(|r| r.timeout)
        .or_else(|| resilience.as_ref().and_then(|p| p.timeout));
    let idle_timeout = on_route
        .and_then(|r| r.idle_timeout)
        .or_else(|| resilience.as_ref().and_then(|p| p.settings.idle_timeout));
    let retried = retries.is_some();
    landed.sent = (!hyper::body::Body::is_end_stream(&req_body))
        .then(|| Arc::new(std::sync::atomic::AtomicU64::new(0)));
    let req_body = match request_body(req_body, retried, landed.sent.clone()).await {
        Ok(b) => b,
        Err(e) => {
            count(&up.service, "out", &subset, "bad_request");
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("meshnode: reading the request body: {e}"),
            );
        }
    };
    let call = Call {
        up,
        dialer,
        subset: &subset,
        parts: &parts,
        safe,
        limits,
    };
    let exchange = exchange(call, req_body, retries);
    let sent = match timeout {
        Some(limit) => match tokio::time::timeout(limit, exchange).await {
            Ok(sent) => sent,
            Err(_) => {
                count(&up.service, "out", &subset, "timeout");
                return error_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    format!("meshnode: no response from {} within {limit:?}", up.service),
                );
            }
        },
        None => exchange.await,
    };
    drop(pending);
    match sent {
        Ok((mut resp, target, active)) => {
            landed.instance = Some(target.name());
            landed.cluster = Some(target.cluster().to_string());
            count(&up.service, "out", &subset, class(resp.status()));
            if let Some((_, client)) = upgrade {
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    let protocol = resp.headers().get(header::UPGRADE).cloned();
                    let instance = hyper::upgrade::on(&mut resp);
                    splice_upgrades(client, instance, active);
                    let (mut rp, _) = resp.into_parts();
                    strip_hop_by_hop(&mut rp.headers, false);
                    if let Some(p) = protocol {
                        keep_upgrade(&mut rp.headers, &p);
                    }
                    return Response::from_parts(rp, body(Empty::<Bytes>::new()));
                }
            }
            let (mut rp, rb) = resp.into_parts();
            strip_hop_by_hop(&mut rp.headers, false);
            // Only this node injects faults: a fault header from over the
            // tunnel would make a real failure look like a rehearsal.
            rp.headers.remove(FAULT_HEADER);
            // The instance stays busy until the body is done, and the
            // request counts towards `max_requests` until then.
            let rb = body(rb.map_frame(move |f| {
                let _ = (&active, &in_flight);
                f
            }));
            match idle_timeout {
                Some(idle) => Response::from_parts(rp, body(IdleBody::new(rb, idle))),
                None => Response::from_parts(rp, rb),
            }
        }
        Err(Sent::Refused(refusal)) => {
            count(&up.service, "out", &subset, refusal.label());
            let (status, why) = match &refusal {
                Refusal::Denied(_) => (StatusCode::FORBIDDEN, "denied"),
                Refusal::NoInstance(_) => (StatusCode::SERVICE_UNAVAILABLE, "no_instance"),
                Refusal::Failed(_) => (StatusCode::BAD_GATEWAY, "failed"),
            };
            if ERROR_LOG.allow() {
                tracing::warn!(service = %up.service, subset = %String::from(subset.clone()), refusal = ?refusal, "HTTP request refused by the mesh (logged at most once a second)");
            }
            error_response(status, why, format!("meshnode: {refusal:?}"))
        }
        Err(Sent::Breaker(limit)) => {
            count(&up.service, "out", &subset, "breaker_open");
            breaker_open(&up.service, limit)
        }
        Err(Sent::Timeout(limit)) => {
            count(&up.service, "out", &subset, "timeout");
            error_response(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!(
                    "meshnode: no response from {} within the per-try timeout {limit:?}",
                    up.service
                ),
            )
        }
        Err(Sent::Exchange(target, e)) => {
            count(&up.service, "out", &subset, "failed");
            landed.instance = Some(target.clone());
            if ERROR_LOG.allow() {
                tracing::warn!(service = %up.service, target = %target, error = %e, "HTTP exchange over the mesh failed (logged at most once a second)");
            }
            error_response(
                StatusCode::BAD_GATEWAY,
                "exchange_failed",
                format!("meshnode: {} at {target}: {e}", up.service),
            )
        }
    }
}

/// A response body cut with an error when no frame arrives for `idle`
/// (`idle_timeout`): a stalled instance does not hold the client, the
/// stream and the breaker's count forever.
struct IdleBody {
    inner: Body,
    idle: Duration,
    /// When the last frame came. The timer is not moved per frame (a
    /// timer-wheel update each): when it fires early, it is set again
    /// from here.
    last: tokio::time::Instant,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl IdleBody {
    fn new(inner: Body, idle: Duration) -> Self {
        IdleBody {
            inner,
            idle,
            last: meshnode_transport::clock::tokio_now(),
            sleep: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

impl hyper::body::Body for IdleBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        use std::future::Future;
        use std::task::Poll;
        let this = &mut *self;
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            this.last = meshnode_transport::clock::tokio_now();
            return Poll::Ready(frame);
        }
        loop {
            if this.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let due = this.last + this.idle;
            if meshnode_transport::clock::tokio_now() >= due {
                debug!(idle = ?this.idle, "HTTP response body idle: cut");
                return Poll::Ready(Some(Err(format!(
                    "no data for {:?} (idle_timeout)",
                    this.idle
                )
                .into())));
            }
            // Data came since the timer was set: wait from the last frame.
            this.sleep.as_mut().reset(due);
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Request bodies up to this size are held while retries may need them.
pub const RETRY_BODY_CAP: u64 = 64 * 1024;

/// A request's body as the exchange sees it.
enum ReqBody {
    None,
    /// Streamed through, once.
    Once(Body),
    /// Held in full (a retried request's body under [`RETRY_BODY_CAP`]).
    Held(Bytes),
}

impl ReqBody {
    /// The body for the next attempt.
    fn for_attempt(&mut self) -> Option<Body> {
        match std::mem::replace(self, ReqBody::None) {
            ReqBody::None => None,
            ReqBody::Once(b) => Some(b),
            ReqBody::Held(bytes) => {
                *self = ReqBody::Held(bytes.clone());
                Some(body(Full::new(bytes)))
            }
        }
    }
}

/// Holds a body whose size is known and at most [`RETRY_BODY_CAP`] when
/// `retried` (so a retry can send it again); streams any other.
async fn request_body(
    b: Incoming,
    retried: bool,
    sent: Option<Arc<std::sync::atomic::AtomicU64>>,
) -> Result<ReqBody, BoxError> {
    use hyper::body::Body as _;
    use std::sync::atomic::Ordering;
    if b.is_end_stream() {
        return Ok(ReqBody::None);
    }
    let small = b.size_hint().upper().is_some_and(|n| n <= RETRY_BODY_CAP);
    if !(retried && small) {
        return Ok(ReqBody::Once(body(b.map_frame(move |f| {
            if let (Some(d), Some(sent)) = (f.data_ref(), &sent) {
                sent.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
            f
        }))));
    }
    // The limit holds even if the peer sends more than it declared.
    let held = http_body_util::Limited::new(b, RETRY_BODY_CAP as usize)
        .collect()
        .await?
        .to_bytes();
    // Counted once, however many tries carry it.
    if let Some(sent) = &sent {
        sent.store(held.len() as u64, Ordering::Relaxed);
    }
    Ok(ReqBody::Held(held))
}

/// One request under its service's `retries` (if any): a failed attempt
/// the document lists goes again, to another instance first, after a
/// jittered back-off, while attempts and the retry budget last. A request
/// whose body is streamed (not held: see [`request_body`]) goes once.
async fn exchange(
    call: Call<'_>,
    mut req_body: ReqBody,
    retries: Option<&crate::policy::schema::Retries>,
) -> Result<Exchanged, Sent> {
    use crate::resilience::Failure;
    let Some(retries) = retries else {
        return send(call, req_body.for_attempt(), &[]).await;
    };
    let Call {
        up,
        dialer,
        parts,
        limits,
        ..
    } = call;
    // The retry in flight, under `max_retries`.
    let mut retrying: Option<Admitted> = None;
    // A body that is not held cannot go twice.
    let has_body = matches!(req_body, ReqBody::Once(_));
    dialer.budget_request(&up.service, retries.budget);
    let mut avoid = Vec::new();
    let mut made = 0u32;
    loop {
        made += 1;
        let attempt = send(call, req_body.for_attempt(), &avoid);
        let result = match retries.per_try_timeout {
            Some(limit) => tokio::time::timeout(limit, attempt)
                .await
                .unwrap_or(Err(Sent::Timeout(limit))),
            None => attempt.await,
        };
        let (failure, target) = match &result {
            Ok((resp, target, _)) if resp.status().is_server_error() => {
                (Failure::Status(resp.status().as_u16()), Some(target.name()))
            }
            Ok(_) => return result,
            Err(Sent::Refused(Refusal::Failed(_))) => (Failure::Connect, None),
            Err(Sent::Exchange(name, _)) => (Failure::Reset, Some(name.clone())),
            Err(Sent::Timeout(_)) => (Failure::Reset, None),
            Err(Sent::Refused(_) | Sent::Breaker(_)) => return result,
        };
        if has_body || !crate::resilience::retryable(retries, parts.method.as_str(), failure, made)
        {
            return result;
        }
        // A retry over `max_retries` is not made: the failure goes back.
        // (This request's previous retry is over.)
        drop(retrying.take());
        retrying = match limits.map(|l| l.enter(Limit::Retries)) {
            Some(Err(limit)) => {
                count_breaker(&up.service, limit);
                return result;
            }
            Some(Ok(admitted)) => admitted,
            None => None,
        };
        if !dialer.try_retry(&up.service, retries.budget) {
            metrics::counter!(HTTP_BUDGET_EXHAUSTED, "service" => LABELS.value("service", &up.service, true))
                .increment(1);
            return result;
        }
        metrics::counter!(HTTP_RETRIES, "service" => LABELS.value("service", &up.service, true), "reason" => failure.label())
            .increment(1);
        drop(result);
        avoid.extend(target);
        let jitter = rand::rng().random_range(0.0..1.0f64);
        tokio::time::sleep(crate::resilience::backoff(made, jitter)).await;
    }
}

/// Sets the request target's path to its canonical form
/// ([`crate::uri_path`]), keeping the query; `Err`: it has none.
fn normalize_target(uri: &mut Uri) -> Result<(), BadPath> {
    let Some(pq) = uri.path_and_query() else {
        return Ok(());
    };
    let path = match crate::uri_path::normalize(pq.path())? {
        Cow::Borrowed(_) => return Ok(()),
        Cow::Owned(p) => p,
    };
    let pq = match pq.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = std::mem::take(uri).into_parts();
    // The canonical path holds only characters the old one had (or their
    // decoded unreserved forms), so it parses; refused if it ever did not.
    parts.path_and_query = Some(PathAndQuery::try_from(pq).map_err(|_| BadPath::BadEscape)?);
    *uri = Uri::from_parts(parts).map_err(|_| BadPath::BadEscape)?;
    Ok(())
}

fn bad_path(e: BadPath) -> Response<Body> {
    error_response(
        StatusCode::BAD_REQUEST,
        "bad_path",
        format!("meshnode: the request path has no canonical form: {e}"),
    )
}

fn count_fault(service: &str, fault: &'static str) {
    metrics::counter!(HTTP_FAULTS, "service" => LABELS.value("service", service, true), "fault" => fault)
        .increment(1);
}

/// An injected abort: the status the document names, and a header that
/// says the mesh made it (so a rehearsal is told from a real failure).
fn fault_response(status: u16) -> Response<Body> {
    let mut resp = Response::new(body(Full::new(Bytes::from_static(
        b"meshnode: fault injected by a resilience document\n",
    ))));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    resp.headers_mut()
        .insert(FAULT_HEADER, HeaderValue::from_static("abort"));
    resp
}

/// Why a request got no response from an instance.
enum Sent {
    /// No instance took it.
    Refused(Refusal),
    /// The instance (named) took it, and the exchange failed: not sent
    /// again, the request may have reached the application.
    Exchange(String, hyper::Error),
    /// The last try's per-try timeout passed.
    Timeout(Duration),
    /// A circuit-breaker limit was reached.
    Breaker(Limit),
}

/// One request on its way: where to, and under which limits. `safe`: see
/// [`send`].
#[derive(Clone, Copy)]
struct Call<'a> {
    up: &'a UpstreamConfig,
    dialer: &'a Dialer,
    subset: &'a Subset,
    parts: &'a hyper::http::request::Parts,
    safe: bool,
    limits: Option<Limits<'a>>,
}

/// A service's circuit breaker as one request sees it.
#[derive(Clone, Copy)]
struct Limits<'a> {
    cb: &'a CircuitBreaker,
    breaker: &'a Arc<Breaker>,
}

impl Limits<'_> {
    fn enter(&self, limit: Limit) -> Result<Option<Admitted>, Limit> {
        self.breaker.try_enter(limit, limit.of(self.cb))
    }
}

/// Names the limit in the header, as `x-envoy-overloaded` says Envoy's.
pub const LIMIT_HEADER: &str = "x-meshnode-limit";

fn count_breaker(service: &str, limit: Limit) {
    metrics::counter!(HTTP_BREAKER_OPEN, "service" => LABELS.value("service", service, true), "limit" => limit.name())
        .increment(1);
}

/// A request the circuit breaker turned away at once: 503, the limit named.
fn breaker_open(service: &str, limit: Limit) -> Response<Body> {
    count_breaker(service, limit);
    let mut r = error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "circuit_open",
        format!(
            "meshnode: {service}'s circuit breaker is open: {} reached",
            limit.name()
        ),
    );
    r.headers_mut()
        .insert(LIMIT_HEADER, HeaderValue::from_static(limit.name()));
    r
}

type Exchanged = (
    Response<Incoming>,
    crate::upstream::Target,
    crate::upstream::ActiveGuard,
);
type Sender = hyper::client::conn::http1::SendRequest<Body>;

/// A caller stays below the destination's idle close, so it rarely sends
/// on a stream the destination is closing.
const STREAM_IDLE: Duration = Duration::from_secs(4);
/// The destination closes a stream that brings no request for this long.
const STREAM_IDLE_CLOSE: Duration = Duration::from_secs(5);
/// Idle tunnel streams kept per instance.
const MAX_IDLE_STREAMS: usize = 64;

/// Idle HTTP/1.1 exchanges on tunnel streams, per instance (and, through a
/// gateway, per subset): a request reuses one where it can, as HTTP/1.1
/// keep-alive reuses connections, and pays for no stream opening.
#[derive(Default)]
pub struct StreamPool {
    idle: Mutex<HashMap<StreamKey, Vec<IdleStream>>>,
}

/// An instance, and the subset asked of it (through a gateway).
type StreamKey = (crate::outlier::Key, Option<String>);
/// An idle stream, and since when.
type IdleStream = (Sender, tokio::time::Instant);

impl StreamPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<StreamKey, Vec<IdleStream>>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle stream to `key` ready for a request, if one is fresh enough.
    fn take(&self, key: &StreamKey) -> Option<Sender> {
        let now = meshnode_transport::clock::tokio_now();
        let mut idle = self.lock();
        let list = idle.get_mut(key)?;
        while let Some((s, since)) = list.pop() {
            if s.is_ready() && now.duration_since(since) < STREAM_IDLE {
                return Some(s);
            }
        }
        None
    }

    /// Keeps `sender` once its exchange is done.
    fn put(self: &Arc<Self>, key: StreamKey, mut sender: Sender) {
        let pool = self.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                let mut idle = pool.lock();
                let list = idle.entry(key).or_default();
                if list.len() < MAX_IDLE_STREAMS {
                    list.push((sender, meshnode_transport::clock::tokio_now()));
                }
            }
        });
    }
}

fn rebuild(parts: &hyper::http::request::Parts, body_once: &mut Option<Body>) -> Request<Body> {
    let b = body_once
        .take()
        .unwrap_or_else(|| body(Empty::<Bytes>::new()));
    Request::from_parts(parts.clone(), b)
}

/// Sends one request to an instance of `subset`: on an idle stream to the
/// chosen instance if there is one, else on a new stream, trying the
/// dialer's candidates in turn. `safe`: a bodiless GET, HEAD or OPTIONS,
/// which goes out with a new stream's header (no wait for the status) and
/// may be sent again after a refusal or a broken stream; any other request
/// waits for the status and goes out once. `body_once`: its body, if any.
async fn send(
    call: Call<'_>,
    mut body_once: Option<Body>,
    avoid: &[String],
) -> Result<Exchanged, Sent> {
    let Call {
        up,
        dialer,
        subset,
        parts,
        safe,
        limits,
    } = call;
    // A traced request's `traceparent` names this node's span: a new
    // stream carries it in its header, for the gateways on the way.
    let trace = dialer
        .telemetry()
        .tracer
        .enabled()
        .then(|| {
            parts
                .headers
                .get(&TRACEPARENT)
                .and_then(|v| v.to_str().ok())
                .and_then(crate::trace::parse_traceparent)
        })
        .flatten();
    let want = Want {
        subset,
        http: true,
        early_from: None,
        pipeline: safe,
        trace,
    };
    let mut candidates = dialer.candidates(up, &want).map_err(Sent::Refused)?;
    // A retry goes to another instance first, when there is one.
    if !avoid.is_empty() {
        candidates.sort_by_cached_key(|t| avoid.contains(&t.name()));
    }
    let pool = dialer.streams();
    let mut last = String::new();
    for (attempt, target) in candidates.into_iter().enumerate() {
        dialer.count_retry(up, attempt);
        let key = (target.key(), subset.as_header());
        let tried = meshnode_transport::clock::tokio_now();
        while let Some(mut sender) = pool.take(&key) {
            let active = dialer.begin(&target);
            match sender
                .try_send_request(rebuild(parts, &mut body_once))
                .await
            {
                Ok(resp) => {
                    let rtt = meshnode_transport::clock::tokio_since(tried);
                    dialer.observe(&up.service, &target, rtt, resp.status());
                    count_stream(&up.service, "reused");
                    pool.put(key, sender);
                    return Ok((resp, target, active));
                }
                Err(mut e) => match e.take_message() {
                    // Never sent: the stream was closing; the next one.
                    Some(req) => body_once = Some(req.into_body()),
                    // A stream that broke under the request: only a safe
                    // request goes again (to a new stream, below).
                    None if safe => break,
                    None => return Err(Sent::Exchange(target.name(), e.into_error())),
                },
            }
        }
        // A new stream counts towards `max_connections` while it is open.
        let stream = match limits.map(|l| l.enter(Limit::Connections)) {
            Some(Err(limit)) => return Err(Sent::Breaker(limit)),
            Some(Ok(admitted)) => admitted,
            None => None,
        };
        let tunnel = match dialer
            .try_target(
                &up.service,
                up.as_service.as_deref(),
                &target,
                &mut Vec::new(),
                &want,
            )
            .await
        {
            Ok(t) => t,
            Err(e) => {
                dialer
                    .failed(&up.service, &target, e, &mut last)
                    .map_err(Sent::Refused)?;
                continue;
            }
        };
        let active = dialer.begin(&target);
        let sent = match handshake(tunnel, stream).await {
            Ok(mut sender) => sender
                .send_request(rebuild(parts, &mut body_once))
                .await
                .map(|resp| (resp, sender)),
            Err(e) => Err(e),
        };
        match sent {
            Ok((resp, sender)) => {
                dialer.succeeded(&target);
                let rtt = meshnode_transport::clock::tokio_since(tried);
                dialer.observe(&up.service, &target, rtt, resp.status());
                count_stream(&up.service, "opened");
                pool.put(key, sender);
                return Ok((resp, target, active));
            }
            Err(e) => {
                drop(active);
                let refused = meshnode_transport::tunnel::e2e::refusal(&e);
                if refused.is_none() && !safe {
                    return Err(Sent::Exchange(target.name(), e));
                }
                let e = match refused {
                    Some(s) => meshnode_transport::tunnel::TunnelError::Refused(s),
                    None => meshnode_transport::tunnel::TunnelError::Stream(e.to_string()),
                };
                dialer
                    .failed(&up.service, &target, e, &mut last)
                    .map_err(Sent::Refused)?;
            }
        }
    }
    Err(Sent::Refused(Refusal::Failed(format!(
        "every attempt failed (last: {last})"
    ))))
}

fn count_stream(service: &str, kind: &'static str) {
    metrics::counter!(HTTP_STREAMS, "service" => LABELS.value("service", service, true), "stream" => kind)
        .increment(1);
}

/// An HTTP/1.1 client on an open tunnel; its connection task runs until
/// the stream closes.
/// `stream`: its count under `max_connections`, held as long as it is open.
async fn handshake(tunnel: Tunnel, stream: Option<Admitted>) -> Result<Sender, hyper::Error> {
    match tunnel {
        Tunnel::Plain(send, recv) => handshake_on(tokio::io::join(recv, send), stream).await,
        Tunnel::Pending(send, recv) => handshake_on(tokio::io::join(recv, send), stream).await,
        Tunnel::Sealed(session) => handshake_on(*session, stream).await,
    }
}

async fn handshake_on<IO>(io: IO, stream: Option<Admitted>) -> Result<Sender, hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await?;
    tokio::spawn(async move {
        let _open = stream;
        if let Err(e) = conn.with_upgrades().await {
            debug!(error = %e, "HTTP tunnel stream ended with an error");
        }
    });
    Ok(sender)
}

async fn send_mirror(
    parts: hyper::http::request::Parts,
    up: Arc<UpstreamConfig>,
    dialer: Arc<Dialer>,
    subset: Subset,
) {
    let call = Call {
        up: &up,
        dialer: &dialer,
        subset: &subset,
        parts: &parts,
        safe: true,
        limits: None,
    };
    let result = match send(call, None, &[]).await {
        Ok((resp, _, _active)) => {
            // Read to the end so the stream can serve again, then dropped.
            let _ = resp.into_body().collect().await;
            "ok"
        }
        Err(Sent::Refused(r)) => r.label(),
        Err(Sent::Exchange(..) | Sent::Timeout(_)) => "failed",
        Err(Sent::Breaker(_)) => "breaker_open",
    };
    metrics::counter!(HTTP_MIRRORED,
        "service" => LABELS.value("service", &up.service, true),
        "result" => result)
    .increment(1);
}

// === destination side ===

/// A connection to a local application, ready for one request.
pub(crate) enum AppConn {
    H1(hyper::client::conn::http1::SendRequest<Incoming>),
    H2(hyper::client::conn::http2::SendRequest<Incoming>),
}

/// Connections to the local applications of HTTP services, kept open
/// between requests: HTTP/1.1 ones idle in a list per address, one
/// HTTP/2 connection per address shared by all requests.
#[derive(Default)]
pub struct AppPool {
    h1: Mutex<HashMap<SocketAddr, Vec<hyper::client::conn::http1::SendRequest<Incoming>>>>,
    h2: Mutex<HashMap<SocketAddr, hyper::client::conn::http2::SendRequest<Incoming>>>,
}

impl AppPool {
    fn h1(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        HashMap<SocketAddr, Vec<hyper::client::conn::http1::SendRequest<Incoming>>>,
    > {
        self.h1.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn h2(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        HashMap<SocketAddr, hyper::client::conn::http2::SendRequest<Incoming>>,
    > {
        self.h2.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection to `target` ready for a request: an idle one, or a new
    /// one. Fails when the application does not accept within 1 s; the
    /// caller then refuses the stream (`connect_failed`) and its dialer
    /// tries another instance, as for TCP.
    pub(crate) async fn checkout(
        &self,
        target: SocketAddr,
        protocol: Protocol,
    ) -> std::io::Result<AppConn> {
        if protocol == Protocol::Http2 {
            if let Some(s) = self.h2().get(&target).filter(|s| !s.is_closed()).cloned() {
                return Ok(AppConn::H2(s));
            }
            let tcp = connect(target).await?;
            let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .handshake(TokioIo::new(tcp))
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(error = %e, %target, "HTTP/2 connection to the application ended");
                }
            });
            self.h2().insert(target, sender.clone());
            return Ok(AppConn::H2(sender));
        }
        loop {
            let idle = self.h1().get_mut(&target).and_then(|v| v.pop());
            match idle {
                Some(s) if s.is_ready() => return Ok(AppConn::H1(s)),
                Some(_) => continue,
                None => break,
            }
        }
        Ok(AppConn::H1(self.connect_h1(target).await?))
    }

    async fn connect_h1(
        &self,
        target: SocketAddr,
    ) -> std::io::Result<hyper::client::conn::http1::SendRequest<Incoming>> {
        let tcp = connect(target).await?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, %target, "HTTP/1.1 connection to the application ended");
            }
        });
        Ok(sender)
    }

    /// Keeps an HTTP/1.1 connection for the next request once its
    /// response is done.
    fn checkin(
        self: &Arc<Self>,
        target: SocketAddr,
        mut sender: hyper::client::conn::http1::SendRequest<Incoming>,
    ) {
        let pool = self.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                let mut idle = pool.h1();
                let list = idle.entry(target).or_default();
                if list.len() < MAX_IDLE {
                    list.push(sender);
                }
            }
        });
    }

    /// Sends one request to the application on `conn`. An idle HTTP/1.1
    /// connection the application closed meanwhile gives the request back
    /// unsent, and it goes out once more on a new connection.
    async fn send(
        self: &Arc<Self>,
        conn: AppConn,
        target: SocketAddr,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, hyper::Error> {
        match conn {
            AppConn::H2(mut s) => s.send_request(req).await,
            AppConn::H1(mut s) => match s.try_send_request(req).await {
                Ok(resp) => {
                    self.checkin(target, s);
                    Ok(resp)
                }
                Err(mut e) => match e.take_message() {
                    Some(req) => {
                        let mut fresh = match self.connect_h1(target).await {
                            Ok(f) => f,
                            Err(_) => return Err(e.into_error()),
                        };
                        let resp = fresh.send_request(req).await?;
                        self.checkin(target, fresh);
                        Ok(resp)
                    }
                    None => Err(e.into_error()),
                },
            },
        }
    }
}

/// Adds `names` (comma-separated) to the response's `trailer` header.
fn declare_trailers(headers: &mut HeaderMap, names: &str) {
    let mut all: Vec<String> = headers
        .get_all(header::TRAILER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    for n in names.split(',').map(str::trim) {
        if !all.iter().any(|a| a == n) {
            all.push(n.to_string());
        }
    }
    if let Ok(v) = HeaderValue::from_str(&all.join(", ")) {
        headers.insert(header::TRAILER, v);
    }
}

async fn connect(target: SocketAddr) -> std::io::Result<TcpStream> {
    let tcp = tokio::time::timeout(APP_CONNECT_TIMEOUT, TcpStream::connect(target))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// `(method, path, first) -> Ok or the status to refuse with`.
pub(crate) type Authorize =
    dyn Fn(&str, &str, bool) -> Result<(), meshnode_transport::tunnel::Status> + Send + Sync;

/// What the destination checks on the requests of a stream (the stream
/// itself was authorized before its status).
pub(crate) struct StreamRules {
    /// The authorization decision for one request `(method, path, first)`:
    /// the first request of a stream was decided with the stream, unless
    /// the service's intentions have HTTP conditions; later ones are
    /// decided again (policy may have changed since the stream opened).
    pub authorize: Box<Authorize>,
    /// A draining node answers with `connection: close`, so callers stop
    /// reusing its streams.
    pub drain: crate::drain::Drain,
    /// The instance's rate limit, checked for every request (the first
    /// too): `Err` says when a token will be there.
    pub limit: Box<dyn Fn() -> Result<(), Duration> + Send + Sync>,
    /// Who the stream's requests come from, for telemetry.
    pub seen: Seen,
}

/// A stream's caller as telemetry records it: the pair (resolved once per
/// stream), the caller's identity and the service it acts as.
pub(crate) struct Seen {
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    pub pair: Arc<crate::telemetry::PairStats>,
    pub source: Arc<str>,
    pub source_service: Arc<str>,
    /// The trace context of the stream's header (the last traced hop's).
    pub stream_trace: Option<meshnode_transport::tunnel::TraceContext>,
}

/// Local rate limits of this node's instances (`rate_limit` of a
/// resilience document): one token bucket per service and application
/// address, so the limit holds per instance; with `per_source`, one per
/// caller identity at each instance.
#[derive(Default)]
pub struct Limiters {
    buckets: Mutex<HashMap<String, HashMap<BucketKey, crate::resilience::TokenBucket>>>,
    born: std::sync::OnceLock<tokio::time::Instant>,
}

/// An instance, and the caller when buckets are per source.
type BucketKey = (SocketAddr, Option<Arc<str>>);

/// Per-source buckets kept per service at most. Beyond it, full buckets
/// (idle callers) are forgotten; if none is, a new caller shares the
/// instance's own bucket, so a flood of identities cannot grow memory.
const MAX_SOURCE_BUCKETS: usize = 4096;

impl Limiters {
    /// Takes a token for one request to `service` at `target` under
    /// `limit`; `source`: the caller, for `per_source` limits.
    pub(crate) fn take(
        &self,
        service: &str,
        target: SocketAddr,
        source: &Arc<str>,
        limit: &crate::policy::schema::RateLimit,
    ) -> Result<(), Duration> {
        let born = *self.born.get_or_init(meshnode_transport::clock::tokio_now);
        let now = meshnode_transport::clock::tokio_since(born);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if !buckets.contains_key(service) {
            buckets.insert(service.to_string(), HashMap::new());
        }
        let Some(of_service) = buckets.get_mut(service) else {
            return Ok(());
        };
        let mut key = (target, limit.per_source.then(|| source.clone()));
        if key.1.is_some()
            && !of_service.contains_key(&key)
            && of_service.len() >= MAX_SOURCE_BUCKETS
        {
            of_service.retain(|k, b| k.1.is_none() || !b.is_full(now));
            if of_service.len() >= MAX_SOURCE_BUCKETS {
                key.1 = None;
            }
        }
        let bucket = of_service
            .entry(key)
            .or_insert_with(|| crate::resilience::TokenBucket::new(limit, now));
        if !bucket.is_for(limit) {
            // A new document: a new bucket.
            *bucket = crate::resilience::TokenBucket::new(limit, now);
        }
        bucket.try_take(now)
    }
}

/// 429 with `Retry-After` (whole seconds, at least 1).
fn rate_limited(service: &str, wait: Duration) -> Response<Body> {
    metrics::counter!(HTTP_RATE_LIMITED, "service" => LABELS.value("service", service, true))
        .increment(1);
    let mut resp = error_response(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("meshnode: {service} is rate limited here"),
    );
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

/// Serves the requests a tunnel stream carries (HTTP/1.1 keep-alive: the
/// caller reuses the stream), the first on `conn`, the others on pooled
/// connections to the application at `target`. The stream's status is
/// already sent. A stream idle for [`STREAM_IDLE_CLOSE`] is closed.
pub(crate) async fn serve_stream<IO>(
    io: IO,
    conn: AppConn,
    pool: Arc<AppPool>,
    target: (SocketAddr, Protocol),
    service: String,
    rules: StreamRules,
) where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let first = Arc::new(Mutex::new(Some(conn)));
    let rules = Arc::new(rules);
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let taken = first.lock().unwrap_or_else(|e| e.into_inner()).take();
        let pool = pool.clone();
        let service = service.clone();
        let rules = rules.clone();
        async move {
            let started = meshnode_transport::clock::tokio_now();
            // Only a traced request needs the wall clock (its span's start).
            let wall = rules
                .seen
                .telemetry
                .tracer
                .enabled()
                .then(meshnode_transport::clock::wall);
            let method = req.method().clone();
            let mut asked = Asked::default();
            let resp = serve_request(req, taken, &pool, target, &service, &rules, &mut asked).await;
            let took = meshnode_transport::clock::tokio_since(started);
            let (result, error) = result_of(&resp);
            let seen = &rules.seen;
            seen.pair.record(result, error, took, None);
            seen.telemetry.access.log(error, || Access {
                direction: "in",
                kind: "http",
                source: seen.source.to_string(),
                source_service: seen.source_service.to_string(),
                service: service.clone(),
                cluster: seen.telemetry.cluster.clone(),
                instance: seen.telemetry.node.clone(),
                method: method.to_string(),
                path: asked.uri.as_ref().map_or("-", |u| u.path()).to_string(),
                result: result.to_string(),
                status: resp.status().as_u16(),
                duration: took,
                trace_id: crate::telemetry::trace_id(asked.traceparent.as_ref()),
                ..Access::default()
            });
            if let (Some((context, span_id)), Some(wall)) = (asked.span, wall) {
                use crate::trace::Value::{Int, Str};
                seen.telemetry.tracer.export(crate::trace::SpanRecord {
                    context,
                    span_id,
                    root: false,
                    name: format!("{method} {service}"),
                    kind: crate::trace::Kind::Server,
                    start: wall,
                    end: meshnode_transport::clock::wall(),
                    error,
                    attributes: vec![
                        ("meshnode.direction", Str("in".into())),
                        ("meshnode.service", Str(service.clone())),
                        ("meshnode.source", Str(seen.source.to_string())),
                        (
                            "meshnode.source_service",
                            Str(seen.source_service.to_string()),
                        ),
                        ("meshnode.result", Str(result.into())),
                        ("http.request.method", Str(method.to_string())),
                        (
                            "http.response.status_code",
                            Int(i64::from(resp.status().as_u16())),
                        ),
                    ],
                });
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(STREAM_IDLE_CLOSE)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades()
        .await;
    if let Err(e) = served {
        debug!(error = %e, "HTTP tunnel stream served with an error");
    }
}

/// What a request asked for, for its access line.
#[derive(Default)]
struct Asked {
    /// The target served: its path canonical (a clone shares its bytes).
    uri: Option<Uri>,
    traceparent: Option<HeaderValue>,
    /// This node's span when it exports traces: the context (its parent
    /// the caller's span, or the last gateway's) and the span's id.
    span: Option<(meshnode_transport::tunnel::TraceContext, [u8; 8])>,
}

/// One request of a tunnel stream: the instance's rate limit, the
/// canonical path, authorization, then the application.
async fn serve_request(
    mut req: Request<Incoming>,
    taken: Option<AppConn>,
    pool: &Arc<AppPool>,
    target: (SocketAddr, Protocol),
    service: &str,
    rules: &StreamRules,
    asked: &mut Asked,
) -> Response<Body> {
    // A refused request leaves the stream's first connection unused.
    let unused = |taken: Option<AppConn>| {
        if let Some(AppConn::H1(s)) = taken {
            pool.checkin(target.0, s);
        }
    };
    if let Err(wait) = (rules.limit)() {
        unused(taken);
        count(service, "in", &Subset::Any, "rate_limited");
        return rate_limited(service, wait);
    }
    // Authorized is what the application gets: the canonical path (the
    // caller normalized it too, but is not trusted to).
    if let Err(e) = normalize_target(req.uri_mut()) {
        unused(taken);
        count(service, "in", &Subset::Any, "bad_path");
        return bad_path(e);
    }
    asked.uri = Some(req.uri().clone());
    let first = taken.is_some();
    if rules.seen.telemetry.tracer.enabled() {
        let context = req
            .headers()
            .get(&TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::trace::parse_traceparent);
        if let Some(mut context) = context {
            // The stream's first request came through the gateways that
            // carried the stream: their last span is its parent.
            if let Some(t) = rules
                .seen
                .stream_trace
                .filter(|t| first && t.trace_id == context.trace_id)
            {
                context.parent_id = t.parent_id;
            }
            let mine = crate::trace::span_id();
            let onward = crate::trace::traceparent(&meshnode_transport::tunnel::TraceContext {
                parent_id: mine,
                ..context
            });
            if let Ok(v) = HeaderValue::from_str(&onward) {
                req.headers_mut().insert(TRACEPARENT.clone(), v);
                asked.span = Some((context, mine));
            }
        }
    }
    asked.traceparent = req.headers().get(&TRACEPARENT).cloned();
    let conn = match (rules.authorize)(req.method().as_str(), req.uri().path(), first) {
        Err(status) => {
            unused(taken);
            Err(error_response(
                if status == meshnode_transport::tunnel::Status::Denied {
                    StatusCode::FORBIDDEN
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                },
                status.as_str(),
                format!("meshnode: {status}"),
            ))
        }
        Ok(()) => match taken {
            Some(c) => Ok(c),
            None => pool.checkout(target.0, target.1).await.map_err(|e| {
                error_response(
                    StatusCode::BAD_GATEWAY,
                    "app_failed",
                    format!("meshnode: the application at {} refused: {e}", target.0),
                )
            }),
        },
    };
    let mut resp = match conn {
        Ok(c) => to_app(req, c, pool, target.0, target.1 == Protocol::Http2).await,
        Err(r) => r,
    };
    if rules.drain.is_draining() {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    count(service, "in", &Subset::Any, class(resp.status()));
    resp
}

async fn to_app(
    mut req: Request<Incoming>,
    conn: AppConn,
    pool: &Arc<AppPool>,
    target: SocketAddr,
    h2: bool,
) -> Response<Body> {
    // An upgrade goes to an HTTP/1.1 application as it came (an h2c one
    // gets the request without it: HTTP/2 has no such upgrade).
    let upgrade = upgrade_of(req.headers())
        .filter(|_| !h2)
        .map(|p| (p, hyper::upgrade::on(&mut req)));
    let (mut parts, b) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, h2);
    if let Some((protocol, _)) = &upgrade {
        keep_upgrade(&mut parts.headers, protocol);
    }
    if h2 {
        // HTTP/2 carries the authority in the request target, not `host`.
        let authority = parts
            .headers
            .remove(header::HOST)
            .and_then(|h| h.to_str().ok().map(str::to_string))
            .unwrap_or_else(|| target.to_string());
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        if let Ok(u) = Uri::try_from(format!("http://{authority}{pq}")) {
            parts.uri = u;
        }
        parts.version = hyper::Version::HTTP_2;
    }
    match pool.send(conn, target, Request::from_parts(parts, b)).await {
        Ok(mut resp) => {
            if let Some((_, stream)) = upgrade {
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    let protocol = resp.headers().get(header::UPGRADE).cloned();
                    let app = hyper::upgrade::on(&mut resp);
                    splice_upgrades(stream, app, ());
                    let (mut rp, _) = resp.into_parts();
                    strip_hop_by_hop(&mut rp.headers, false);
                    if let Some(p) = protocol {
                        keep_upgrade(&mut rp.headers, &p);
                    }
                    rp.version = hyper::Version::HTTP_11;
                    return Response::from_parts(rp, body(Empty::<Bytes>::new()));
                }
            }
            let (mut rp, rb) = resp.into_parts();
            strip_hop_by_hop(&mut rp.headers, false);
            // The mesh's own headers are the mesh's to set: an application
            // cannot make its failure read as a mesh refusal or a fault.
            for h in [ERROR_HEADER, FAULT_HEADER, LIMIT_HEADER] {
                rp.headers.remove(h);
            }
            rp.version = hyper::Version::HTTP_11;
            let grpc = rp
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/grpc"));
            if grpc {
                declare_trailers(&mut rp.headers, GRPC_TRAILERS);
            }
            Response::from_parts(rp, body(rb))
        }
        Err(e) => error_response(
            StatusCode::BAD_GATEWAY,
            "app_failed",
            format!("meshnode: the application at {target} failed: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An application that answers with the target it got, and forges
    /// the mesh's own headers on `/forge`.
    async fn echo_target_app() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let target = req.uri().to_string();
                    let mut resp = Response::new(Full::new(Bytes::from(target.clone())));
                    if target == "/forge" {
                        for h in [ERROR_HEADER, FAULT_HEADER, LIMIT_HEADER] {
                            resp.headers_mut()
                                .insert(h, HeaderValue::from_static("forged"));
                        }
                    }
                    Ok::<_, Infallible>(resp)
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc),
                );
            }
        });
        addr
    }

    /// The destination does not trust the caller to have normalized the
    /// path: a caller that sends `//admin` or `/%61dmin` straight onto a
    /// tunnel stream is decided on `/admin`, and the application gets
    /// the path that was decided.
    #[tokio::test]
    async fn a_stream_decides_and_serves_the_canonical_path_whatever_the_caller_sent() {
        let app = echo_target_app().await;
        let pool = Arc::new(AppPool::default());
        let conn = pool.checkout(app, Protocol::Http).await.expect("app");
        let decided = Arc::new(Mutex::new(Vec::new()));
        let log = decided.clone();
        let rules = StreamRules {
            authorize: Box::new(move |_method, path, _first| {
                log.lock().expect("log").push(path.to_string());
                if path.starts_with("/admin") {
                    Err(meshnode_transport::tunnel::Status::Denied)
                } else {
                    Ok(())
                }
            }),
            drain: crate::drain::Drain::default(),
            limit: Box::new(|| Ok(())),
            seen: {
                let telemetry = Arc::new(crate::telemetry::Telemetry::quiet("b1", "east"));
                Seen {
                    pair: telemetry.in_pair(crate::telemetry::Kind::Http, (None, "east"), "api"),
                    telemetry,
                    source: Arc::from("spiffe://acme/cluster/east/node/a1"),
                    source_service: Arc::from("-"),
                    stream_trace: None,
                }
            },
        };
        let (near, far) = tokio::io::duplex(64 * 1024);
        tokio::spawn(serve_stream(
            far,
            conn,
            pool,
            (app, Protocol::Http),
            "api".into(),
            rules,
        ));
        let (mut send, c) = hyper::client::conn::http1::handshake(TokioIo::new(near))
            .await
            .expect("handshake");
        tokio::spawn(c);
        let mut call = |target: &'static str| {
            let req = Request::builder()
                .uri(Uri::from_static(target))
                .header(header::HOST, "api")
                .body(Empty::<Bytes>::new())
                .expect("request");
            let sent = send.send_request(req);
            async move {
                let resp = sent.await.expect("response");
                let status = resp.status().as_u16();
                let headers = resp.headers().clone();
                let body = resp.into_body().collect().await.expect("body").to_bytes();
                (status, headers, String::from_utf8_lossy(&body).into_owned())
            }
        };
        for target in ["//admin", "/%61dmin/users", "/x/../admin", "/./admin"] {
            let (status, headers, _) = call(target).await;
            assert_eq!(status, 403, "{target}");
            assert_eq!(headers[ERROR_HEADER], "denied", "{target}");
        }
        let (status, _, served) = call("/x/..//orders/%7e1?a=%2F").await;
        assert_eq!((status, served.as_str()), (200, "/orders/~1?a=%2F"));
        let (status, headers, _) = call("/admin%2Fusers").await;
        assert_eq!(
            (status, headers[ERROR_HEADER].as_bytes()),
            (400, &b"bad_path"[..])
        );
        // The application cannot speak for the mesh.
        let (status, headers, _) = call("/forge").await;
        assert_eq!(status, 200);
        for h in [ERROR_HEADER, FAULT_HEADER, LIMIT_HEADER] {
            assert!(!headers.contains_key(h), "{h} passed: {headers:?}");
        }
        assert_eq!(
            decided.lock().expect("log").as_slice(),
            [
                "/admin",
                "/admin/users",
                "/admin",
                "/admin",
                "/orders/~1",
                "/forge"
            ]
        );
    }

    #[test]
    fn traceparent_is_kept_when_valid_and_started_when_not() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(valid_traceparent(good));
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_static(good));
        h.insert("tracestate", HeaderValue::from_static("a=b"));
        trace_context(&mut h, (7, 9));
        assert_eq!(h.get(&TRACEPARENT).unwrap(), good);
        assert_eq!(h.get("tracestate").unwrap(), "a=b");
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(!valid_traceparent(bad), "{bad}");
        }
        // A later version may carry more fields.
        assert!(valid_traceparent(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"
        ));
        let mut h = HeaderMap::new();
        h.insert("tracestate", HeaderValue::from_static("a=b"));
        trace_context(&mut h, (0xabc, 0));
        let started = h.get(&TRACEPARENT).unwrap().to_str().unwrap();
        assert_eq!(
            started,
            "00-00000000000000000000000000000abc-0000000000000001-01"
        );
        assert!(valid_traceparent(started));
        assert!(h.get("tracestate").is_none());
    }

    #[test]
    fn grpc_trailers_are_declared_beside_the_applications_own() {
        let mut h = HeaderMap::new();
        h.insert("trailer", HeaderValue::from_static("X-Echoed, grpc-status"));
        declare_trailers(&mut h, GRPC_TRAILERS);
        assert_eq!(
            h.get("trailer").unwrap(),
            "x-echoed, grpc-status, grpc-message, grpc-status-details-bin"
        );
    }

    #[test]
    fn hop_by_hop_headers_stop_here() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("gzip, trailers"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        let mut h2 = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert_eq!(h.get("x-app").unwrap(), "kept");
        strip_hop_by_hop(&mut h2, true);
        assert_eq!(h2.get("te").unwrap(), "trailers");
        assert!(h2.get("x-private").is_none());
    }
}

#[cfg(test)]
mod limiter_tests {
    use super::*;
    use crate::policy::schema::RateLimit;

    fn limit(per_source: bool) -> RateLimit {
        RateLimit {
            rps: 0.001,
            burst: 2,
            per_source,
        }
    }

    #[test]
    fn per_source_buckets_are_apart_and_bounded() {
        let l = Limiters::default();
        let target: SocketAddr = ([127, 0, 0, 1], 8080).into();
        let (a, b): (Arc<str>, Arc<str>) =
            (Arc::from("spiffe://m/cluster/c/node/a"), Arc::from("b"));
        let per = limit(true);
        assert!(l.take("api", target, &a, &per).is_ok());
        assert!(l.take("api", target, &a, &per).is_ok());
        assert!(
            l.take("api", target, &a, &per).is_err(),
            "a's burst is used up"
        );
        assert!(
            l.take("api", target, &b, &per).is_ok(),
            "b has its own bucket"
        );
        // Without per_source, one bucket for the instance.
        let shared = limit(false);
        assert!(l.take("web", target, &a, &shared).is_ok());
        assert!(l.take("web", target, &b, &shared).is_ok());
        assert!(l.take("web", target, &b, &shared).is_err());
        // A flood of identities: memory stays bounded, and the newcomers
        // share the instance's bucket once the table is full of callers
        // that are not idle.
        for i in 0..MAX_SOURCE_BUCKETS + 100 {
            let s: Arc<str> = Arc::from(format!("caller-{i}"));
            let _ = l.take("api", target, &s, &per);
        }
        let held = l.buckets.lock().map(|b| b["api"].len()).unwrap_or(0);
        assert!(held <= MAX_SOURCE_BUCKETS + 1, "{held} buckets");
    }
}
