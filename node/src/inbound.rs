//! The tunnel server: accepts streams from mesh peers and connects them to the
//! local application instance they name, or, on a gateway, forwards them one
//! hop on: to a gateway of another cluster (WAN), or from there to the node
//! of this cluster that hosts an instance (LAN).
//!
//! Who the caller is: the peer's certificate, unless the peer holds a gateway
//! certificate and carries the original caller in the header. A carried
//! identity from any other peer is refused. The service the caller acts as
//! must be named by the caller's certificate (checked by the first node that
//! sees the caller's certificate: the destination, or the caller's gateway).
//!
//! Streams for an instance on this node are authorized ([`crate::authz`])
//! before this node connects to the application.

use std::sync::Arc;
use std::time::Duration;

use meshnode_gossip::federation::WanView;
use meshnode_gossip::GossipHandle;
use meshnode_transport::tunnel::{self, Header, Status, TraceContext, TunnelError, ANY_PORT};
use meshnode_transport::{Accepted, Endpoint, Identity, PeerCert};
use rand::seq::SliceRandom;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info_span, warn, Instrument};

use crate::authz::{Authorizer, Caller};
use crate::drain::Drain;
use crate::metrics::{LogLimit, LABELS, TUNNEL_ACTIVE, TUNNEL_BYTES, TUNNEL_STREAMS};
use crate::policy::schema::Action;

/// Refused streams are logged at most this often (they are all counted).
static REFUSED_LOG: LogLimit = LogLimit::new(std::time::Duration::from_secs(10));
/// Denials by policy are logged at most once a second (all are counted).
static DENIED_LOG: LogLimit = LogLimit::new(std::time::Duration::from_secs(1));
use crate::registry::Registry;
use crate::upstream::{open_to, STATUS_TIMEOUT};

/// Connecting to a local application should be near-instant; a slow one is broken.
const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Next hops a gateway tries for one stream.
const FORWARD_ATTEMPTS: usize = 2;
/// A remote gateway answers after its own LAN hop, which may retry once.
const WAN_STATUS_TIMEOUT: Duration = Duration::from_secs(6);

/// What the tunnel server needs to know and reach.
pub struct Inbound {
    pub registry: Arc<Registry>,
    pub drain: Drain,
    pub me: PeerCert,
    /// This node forwards between clusters (config and certificate agree).
    pub gateway: bool,
    pub endpoint: Endpoint,
    pub lan: GossipHandle,
    /// Gateways only: the WAN pool's view of the other clusters.
    pub wan: Option<watch::Receiver<Arc<WanView>>>,
    pub authz: Authorizer,
    /// Whether this node has loaded the mesh's policy since it started.
    pub policy_loaded: Arc<dyn Fn() -> bool + Send + Sync>,
    /// End-to-end sessions with callers of other clusters.
    pub e2e: tunnel::e2e::E2e,
    /// Accept a caller carried by gateways without an end-to-end session
    /// (`cross_cluster_identity = "gateway"`).
    pub trust_carried: bool,
    /// Connections to the local applications of HTTP services.
    pub apps: Arc<crate::http::AppPool>,
    /// The node's attempt engine: a gateway picks and rates the instances
    /// it forwards to with the same outlier and load state as upstreams.
    pub dialer: Arc<crate::upstream::Dialer>,
    /// Local rate limits of this node's HTTP instances.
    pub limiters: Arc<crate::http::Limiters>,
}

/// Who is calling, as far as this node can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CallerId {
    pub identity: Identity,
    /// The service the caller acts as (checked against its certificate, or
    /// carried by a gateway that checked it).
    pub service: Option<String>,
}

impl CallerId {
    fn as_caller(&self) -> Caller<'_> {
        Caller {
            identity: &self.identity,
            service: self.service.as_deref(),
        }
    }
}

impl std::fmt::Display for CallerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.service {
            Some(s) => write!(f, "{} as {s}", self.identity),
            None => write!(f, "{}", self.identity),
        }
    }
}

pub async fn serve(mut incoming: mpsc::Receiver<Accepted>, ctx: Arc<Inbound>) {
    while let Some(Accepted { conn, peer }) = incoming.recv().await {
        let ctx = ctx.clone();
        let span = info_span!("inbound", peer = %peer.identity);
        tokio::spawn(
            async move {
                let peer = Arc::new(peer);
                while let Ok((send, recv)) = conn.accept_bi().await {
                    tokio::spawn(handle_stream(send, recv, peer.clone(), ctx.clone()));
                }
            }
            .instrument(span),
        );
    }
}

/// What to do with a stream, decided from the header and who sent it. Pure.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// Connect to an instance on this node.
    Local,
    /// Forward to a gateway of this other cluster.
    Wan(String),
    /// Forward to a node of this cluster (the stream came from another cluster).
    Lan,
    Refuse(Status, &'static str),
}

pub(crate) fn route(
    header: &Header,
    peer: &PeerCert,
    me: &PeerCert,
    gateway: bool,
    trust_carried: bool,
) -> (Route, CallerId) {
    let refuse = |status, why| {
        (
            Route::Refuse(status, why),
            CallerId {
                identity: peer.identity.clone(),
                service: None,
            },
        )
    };
    let caller = match &header.caller {
        Some(_) if !peer.is_gateway() => {
            return refuse(
                Status::Forbidden,
                "carried identity from a non-gateway peer",
            )
        }
        Some(c) if c.mesh() != me.identity.mesh() => {
            return refuse(Status::Forbidden, "carried identity of another mesh")
        }
        Some(c) => CallerId {
            identity: c.clone(),
            service: header.source_service.clone(),
        },
        None => match &header.source_service {
            Some(s) if !peer.may_act_as(s) => {
                return refuse(
                    Status::Denied,
                    "the caller's certificate does not name the service it acts as",
                )
            }
            service => CallerId {
                identity: peer.identity.clone(),
                service: service.clone(),
            },
        },
    };
    let mine = me.identity.cluster();
    let from_other_cluster = peer.identity.cluster() != mine;
    if from_other_cluster && !(peer.is_gateway() && gateway) {
        return (
            Route::Refuse(
                Status::Forbidden,
                "streams from another cluster must come gateway to gateway",
            ),
            caller,
        );
    }
    let want = header.cluster.as_deref().unwrap_or(mine);
    let route = if want != mine {
        if from_other_cluster {
            Route::Refuse(
                Status::Forbidden,
                "gateways do not relay between two other clusters",
            )
        } else if !gateway {
            Route::Refuse(
                Status::Forbidden,
                "stream for another cluster sent to a non-gateway",
            )
        } else {
            Route::Wan(want.to_string())
        }
    } else if from_other_cluster {
        Route::Lan
    } else {
        Route::Local
    };
    // Where the stream ends here or in this cluster, a caller that crossed
    // clusters proves itself end to end: what a gateway says is not enough.
    let crossed = from_other_cluster || header.caller.is_some();
    if matches!(route, Route::Local | Route::Lan) && crossed && !header.end_to_end && !trust_carried
    {
        return (
            Route::Refuse(
                Status::Forbidden,
                "a stream from another cluster must carry an end-to-end session",
            ),
            caller,
        );
    }
    (route, caller)
}

async fn handle_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    peer: Arc<PeerCert>,
    ctx: Arc<Inbound>,
) {
    let header = match tunnel::read_header(&mut recv).await {
        Ok(h) => h,
        Err(e) => {
            debug!(peer = %peer.identity, error = %e, "bad tunnel header; resetting stream");
            tunnel::refuse_bad_header(&mut send, &mut recv, &e);
            return;
        }
    };
    let (route, caller) = route(&header, &peer, &ctx.me, ctx.gateway, ctx.trust_carried);
    let service = header.service.clone();
    // Labels from the header are bounded: a name neither hosted here nor in
    // the catalog is `other`, and each label keeps at most 256 values.
    let known = ctx.registry.lookup(&service, ANY_PORT, None).is_some() || {
        let cat = ctx.lan.catalog();
        cat.services.contains_key(&service) || cat.remote.contains_key(&service)
    };
    let service_label = LABELS.value("service", &service, known);
    let caller_label = LABELS.value("caller", &caller.identity.to_string(), true);
    let count = |direction: &'static str, result: &'static str| {
        metrics::counter!(TUNNEL_STREAMS, "service" => service_label.clone(), "direction" => direction,
            "result" => result, "caller" => caller_label.clone())
        .increment(1);
    };
    if ctx.drain.is_draining() {
        count("in", "draining");
        return tunnel::refuse(&mut send, Status::Draining).await;
    }
    match route {
        Route::Refuse(status, why) => {
            if status == Status::Denied {
                // An impersonation attempt is an authorization decision too.
                crate::authz::count_identity_denial(&service_label);
            }
            if REFUSED_LOG.allow() {
                warn!(peer = %peer.identity, %caller, service = %service.escape_debug(), reason = why, "tunnel stream refused (logged at most once per 10 s; see meshnode_tunnel_streams_total)");
            }
            count("in", status.as_str());
            tunnel::refuse(&mut send, status).await
        }
        Route::Local => {
            // A plain stream is authorized before the lookup, so a denied
            // caller learns nothing of what is hosted here; an end-to-end
            // one is authorized inside its session, on the proven identity.
            if !header.end_to_end {
                if let Err(status) =
                    authorize(&ctx, &service, &service_label, &caller, &peer, header.http)
                {
                    count("in", status.as_str());
                    return tunnel::refuse(&mut send, status).await;
                }
            }
            let Some(target) = local_target(&ctx.registry, &header) else {
                count("in", "no_such_service");
                return tunnel::refuse(&mut send, Status::NoSuchService).await;
            };
            serve_here(
                send,
                recv,
                target,
                &header,
                &peer,
                &caller,
                &ctx,
                &service_label,
                &count,
            )
            .await;
        }
        Route::Lan => {
            // This gateway is the destination cluster's: pick an instance here.
            if header.port == ANY_PORT {
                if let Some(target) = local_target(&ctx.registry, &header) {
                    if !header.end_to_end {
                        if let Err(status) =
                            authorize(&ctx, &service, &service_label, &caller, &peer, header.http)
                        {
                            count("in", status.as_str());
                            return tunnel::refuse(&mut send, status).await;
                        }
                    }
                    return serve_here(
                        send,
                        recv,
                        target,
                        &header,
                        &peer,
                        &caller,
                        &ctx,
                        &service_label,
                        &count,
                    )
                    .await;
                }
            }
            let hops = lan_hops(&ctx, &header);
            forward(send, recv, hops, &caller, &service, &ctx, &count).await;
        }
        Route::Wan(cluster) => {
            let hops = wan_hops(&ctx, &header, &cluster);
            forward(send, recv, hops, &caller, &service, &ctx, &count).await;
        }
    }
}

/// A stream for an instance here: in its end-to-end session (authorized
/// inside it), or plain, which the caller of this function authorized.
#[allow(clippy::too_many_arguments)]
async fn serve_here(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    target: Target,
    header: &Header,
    peer: &PeerCert,
    caller: &CallerId,
    ctx: &Inbound,
    service_label: &str,
    count: &impl Fn(&'static str, &'static str),
) {
    if header.end_to_end {
        serve_end_to_end(send, recv, target, header, peer, ctx, service_label, count).await;
    } else {
        connect_local(send, recv, target, header, peer, caller, ctx, count).await;
    }
}

/// The authorization decision for a stream to an instance here: counted,
/// logged when it denies, and the status to refuse with.
/// `http`: the stream carries HTTP requests (each is decided again when
/// the service's intentions have HTTP conditions).
fn authorize(
    ctx: &Inbound,
    service: &str,
    service_label: &str,
    caller: &CallerId,
    peer: &PeerCert,
    http: bool,
) -> Result<(), Status> {
    let request = if http {
        crate::authz::Request::HttpStream
    } else {
        crate::authz::Request::Stream
    };
    let decided = decide(
        &ctx.authz.snapshot(),
        &*ctx.policy_loaded,
        service,
        service_label,
        caller,
        peer,
        request,
    );
    if let Err(status) = decided {
        record_refusal(ctx, caller, service_label, http, status);
    }
    decided
}

/// [`authorize`] from its parts (also for the later requests of an HTTP stream).
fn decide(
    snapshot: &crate::authz::Snapshot,
    policy_loaded: &(dyn Fn() -> bool + Send + Sync),
    service: &str,
    service_label: &str,
    caller: &CallerId,
    peer: &PeerCert,
    request: crate::authz::Request<'_>,
) -> Result<(), Status> {
    let loaded = policy_loaded();
    let decision = snapshot.decide_for(service, caller.as_caller(), loaded, request);
    crate::authz::count(service_label, &decision);
    let status = match decision.reason {
        crate::authz::Reason::PolicyPending => Status::PolicyPending,
        _ => Status::Denied,
    };
    if decision.action == Action::Allow {
        return Ok(());
    }
    if DENIED_LOG.allow() {
        match &decision.reason {
            crate::authz::Reason::Rule { index } => {
                let source = snapshot.rule_source(service, *index).unwrap_or_default();
                warn!(%caller, via = %peer.identity, service = %service.escape_debug(), rule = index, %source, "stream denied by intention (logged at most once a second; see meshnode_authz_decisions_total)")
            }
            crate::authz::Reason::Default { .. } => {
                warn!(%caller, via = %peer.identity, service = %service.escape_debug(), "stream denied by the mesh default (no intention allows it; logged at most once a second)")
            }
            crate::authz::Reason::PolicyPending => {
                warn!(%caller, via = %peer.identity, service = %service.escape_debug(), "stream refused: this node has not loaded the mesh's policy since it started (logged at most once a second)")
            }
        }
    }
    Err(status)
}

/// A stream that carries an end-to-end session: the outer status says an
/// instance is here and its application took a connection; the caller then
/// proves who it is inside the session, and authorization and the bytes run
/// inside it.
#[allow(clippy::too_many_arguments)]
async fn serve_end_to_end(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    target: Target,
    outer: &Header,
    via: &PeerCert,
    ctx: &Inbound,
    service_label: &str,
    count: &impl Fn(&'static str, &'static str),
) {
    // The application's connection comes first, so a dead application is
    // refused on the outer stream, where the gateway sees it, tries another
    // instance and counts it towards this one's ejection (inside the
    // session only the caller would see it). A caller the session then
    // does not authorize leaves only a connection opened and closed.
    let Some(app) = take_app(ctx, &target, outer.http, &mut send, count).await else {
        return;
    };
    let (mut session, peer, inner) = match ctx.e2e.accept(send, recv).await {
        Ok(x) => x,
        Err(e) => {
            if REFUSED_LOG.allow() {
                warn!(via = %via.identity, service = %outer.service.escape_debug(), error = %e, "end-to-end session failed (logged at most once per 10 s)");
            }
            count("in", "session_failed");
            return;
        }
    };
    // From here on the caller label is the identity proven in the session,
    // not the one the gateways carried.
    let caller_label = LABELS.value("caller", &peer.identity.to_string(), true);
    let count = |direction: &'static str, result: &'static str| {
        metrics::counter!(TUNNEL_STREAMS, "service" => service_label.to_string(), "direction" => direction,
            "result" => result, "caller" => caller_label.clone())
        .increment(1);
    };
    // The inner header is the caller's own word; the outer one passed
    // through gateways. They must agree on what is asked for.
    let port_ok = inner.port == ANY_PORT || inner.port == outer.port || outer.port == ANY_PORT;
    let mine = ctx.me.identity.cluster();
    if inner.service != outer.service
        || !port_ok
        || inner.cluster.as_deref().is_some_and(|c| c != mine)
    {
        if REFUSED_LOG.allow() {
            warn!(caller = %peer.identity, via = %via.identity, outer = %outer.service.escape_debug(), inner = %inner.service.escape_debug(), "end-to-end stream refused: the gateways' header does not match the caller's (logged at most once per 10 s)");
        }
        count("in", "forbidden");
        let _ = tunnel::e2e::respond(&mut session, Status::Forbidden).await;
        return;
    }
    let caller = CallerId {
        identity: peer.identity.clone(),
        service: inner.source_service.clone(),
    };
    if let Some(s) = caller.service.as_deref().filter(|s| !peer.may_act_as(s)) {
        crate::authz::count_identity_denial(service_label);
        if DENIED_LOG.allow() {
            warn!(caller = %peer.identity, acting_as = %s.escape_debug(), "end-to-end stream denied: the caller's certificate does not name the service it acts as");
        }
        count("in", "denied");
        let _ = tunnel::e2e::respond(&mut session, Status::Denied).await;
        return;
    }
    if let Err(status) = authorize(ctx, &outer.service, service_label, &caller, via, outer.http) {
        count("in", status.as_str());
        let _ = tunnel::e2e::respond(&mut session, status).await;
        return;
    }
    if tunnel::e2e::respond(&mut session, Status::Ok)
        .await
        .is_err()
    {
        count("in", "peer_gone");
        return;
    }
    let _guard = ctx.drain.enter();
    let tcp = match app {
        App::Tcp(tcp) => tcp,
        App::Http(conn) => {
            let rules = stream_rules(
                ctx,
                &outer.service,
                service_label,
                &caller,
                via,
                target.0,
                outer.trace,
            );
            crate::http::serve_stream(
                session,
                conn,
                ctx.apps.clone(),
                target,
                outer.service.clone(),
                rules,
            )
            .await;
            count("in", "http");
            return;
        }
    };
    let active = metrics::gauge!(TUNNEL_ACTIVE, "direction" => "in");
    active.increment(1.0);
    let started = meshnode_transport::clock::tokio_now();
    let wall = meshnode_transport::clock::wall();
    let stats = tunnel::e2e::splice_session(tcp, session).await;
    active.decrement(1.0);
    // The outer header's context: each gateway on the way put its span.
    let trace = outer.trace.map(|t| (t, wall));
    record_tcp(ctx, &caller, service_label, started, &stats, trace);
    metrics::counter!(TUNNEL_BYTES, "service" => service_label.to_string(), "direction" => "in")
        .increment(stats.from_peer);
    metrics::counter!(TUNNEL_BYTES, "service" => service_label.to_string(), "direction" => "out")
        .increment(stats.to_peer);
    count("in", stats.ending.as_str());
    debug!(%caller, via = %via.identity, service = %outer.service, sent = stats.to_peer, received = stats.from_peer, "end-to-end stream closed");
}

/// One proxied connection served here, ended: golden metrics, `top` and
/// the access log. The caller's bytes arrive from the peer.
fn record_tcp(
    ctx: &Inbound,
    caller: &CallerId,
    service_label: &str,
    started: tokio::time::Instant,
    stats: &tunnel::SpliceStats,
    trace: Option<(TraceContext, std::time::SystemTime)>,
) {
    let took = meshnode_transport::clock::tokio_since(started);
    let telemetry = ctx.dialer.telemetry();
    let (result, error) = (stats.ending.as_str(), stats.ending != tunnel::Ending::Done);
    let source = (caller.service.as_deref(), caller.identity.cluster());
    telemetry
        .in_pair(crate::telemetry::Kind::Tcp, source, service_label)
        .record(result, error, took, Some((stats.from_peer, stats.to_peer)));
    telemetry.access.log(error, || crate::telemetry::Access {
        direction: "in",
        kind: "tcp",
        source: caller.identity.to_string(),
        source_service: caller.service.clone().unwrap_or_else(|| "-".into()),
        service: service_label.to_string(),
        cluster: telemetry.cluster.clone(),
        instance: telemetry.node.clone(),
        result: result.to_string(),
        bytes_sent: stats.from_peer,
        bytes_received: stats.to_peer,
        duration: took,
        trace_id: trace
            .map(|(t, _)| crate::trace::hex(&t.trace_id))
            .unwrap_or_default(),
        ..Default::default()
    });
    if let Some((context, start)) = trace {
        use crate::trace::Value::{Int, Str};
        telemetry.tracer.export(crate::trace::SpanRecord {
            context,
            span_id: crate::trace::span_id(),
            root: false,
            name: format!("tcp {service_label}"),
            kind: crate::trace::Kind::Server,
            start,
            end: meshnode_transport::clock::wall(),
            error,
            attributes: vec![
                ("meshnode.direction", Str("in".into())),
                ("meshnode.service", Str(service_label.to_string())),
                ("meshnode.source", Str(caller.identity.to_string())),
                (
                    "meshnode.source_service",
                    Str(caller.service.clone().unwrap_or_else(|| "-".into())),
                ),
                ("meshnode.result", Str(result.into())),
                ("meshnode.bytes_sent", Int(stats.from_peer as i64)),
                ("meshnode.bytes_received", Int(stats.to_peer as i64)),
            ],
        });
    }
}

/// A stream refused here (authorization, or no such service): golden
/// metrics and an access line, as for a request that got an answer.
fn record_refusal(
    ctx: &Inbound,
    caller: &CallerId,
    service_label: &str,
    http: bool,
    status: Status,
) {
    let telemetry = ctx.dialer.telemetry();
    let kind = if http {
        crate::telemetry::Kind::Http
    } else {
        crate::telemetry::Kind::Tcp
    };
    let source = (caller.service.as_deref(), caller.identity.cluster());
    telemetry.in_pair(kind, source, service_label).record(
        status.as_str(),
        true,
        Duration::ZERO,
        None,
    );
    telemetry.access.log(true, || crate::telemetry::Access {
        direction: "in",
        kind: if http { "http" } else { "tcp" },
        source: caller.identity.to_string(),
        source_service: caller.service.clone().unwrap_or_else(|| "-".into()),
        service: service_label.to_string(),
        cluster: telemetry.cluster.clone(),
        instance: telemetry.node.clone(),
        result: status.as_str().to_string(),
        ..Default::default()
    });
}

/// Connects to the application and answers the stream's status: refused
/// (`connect_failed`) when the application does not take the connection,
/// else ok. `None`: the stream is done with (refused, or the peer left).
async fn take_app(
    ctx: &Inbound,
    target: &Target,
    http: bool,
    send: &mut quinn::SendStream,
    count: &impl Fn(&'static str, &'static str),
) -> Option<App> {
    let app = match open_app(ctx, target, http).await {
        Ok(app) => app,
        Err(e) => {
            debug!(target = %target.0, error = %e, "local application refused the connection");
            count("in", "connect_failed");
            tunnel::refuse(send, Status::ConnectFailed).await;
            return None;
        }
    };
    if tunnel::respond(send, Status::Ok).await.is_err() {
        count("in", "peer_gone");
        return None;
    }
    Some(app)
}

/// Per-request checks of an HTTP stream that serves several requests.
fn stream_rules(
    ctx: &Inbound,
    service: &str,
    service_label: &str,
    caller: &CallerId,
    peer: &PeerCert,
    target: std::net::SocketAddr,
    stream_trace: Option<TraceContext>,
) -> crate::http::StreamRules {
    let (service, label, caller, peer) = (
        service.to_string(),
        service_label.to_string(),
        Arc::new(caller.clone()),
        peer.clone(),
    );
    let (authz, loaded) = (ctx.authz.clone(), ctx.policy_loaded.clone());
    let (dialer, limiters, svc) = (ctx.dialer.clone(), ctx.limiters.clone(), service.clone());
    // The caller as a per-source bucket key: rendered once per stream, and
    // only when a limit is per source.
    let (source, whom) = (std::sync::OnceLock::<Arc<str>>::new(), caller.clone());
    let telemetry = ctx.dialer.telemetry().clone();
    let seen = crate::http::Seen {
        pair: telemetry.in_pair(
            crate::telemetry::Kind::Http,
            (caller.service.as_deref(), caller.identity.cluster()),
            service_label,
        ),
        telemetry,
        source: Arc::from(caller.identity.to_string()),
        source_service: Arc::from(caller.service.as_deref().unwrap_or("-")),
        stream_trace,
    };
    crate::http::StreamRules {
        seen,
        authorize: Box::new(move |method, path, first| {
            let snapshot = authz.snapshot();
            // The stream's own decision covers its first request, unless
            // the rules look at requests.
            if first && !snapshot.has_conditions(&service) {
                return Ok(());
            }
            let request = crate::authz::Request::Http { method, path };
            decide(
                &snapshot, &*loaded, &service, &label, &caller, &peer, request,
            )
        }),
        drain: ctx.drain.clone(),
        limit: Box::new(
            move || match dialer.resilience(&svc).and_then(|p| p.rate_limit.clone()) {
                Some(limit) => {
                    let source = source.get_or_init(|| Arc::from(whom.to_string()));
                    limiters.take(&svc, target, source, &limit)
                }
                None => Ok(()),
            },
        ),
    }
}

/// An instance on this node: the application's address and protocol.
type Target = (std::net::SocketAddr, meshnode_gossip::Protocol);

/// The instance on this node a header asks for: the named port, or any
/// non-critical instance of the service (of the header's subset) for
/// [`ANY_PORT`].
fn local_target(registry: &Registry, header: &Header) -> Option<Target> {
    registry.lookup(&header.service, header.port, header.subset.as_deref())
}

/// A connection to the local application, made before the stream's status
/// (a refused connect lets the caller try another instance).
enum App {
    Tcp(TcpStream),
    Http(crate::http::AppConn),
}

async fn open_app(ctx: &Inbound, target: &Target, http: bool) -> std::io::Result<App> {
    if http {
        return ctx.apps.checkout(target.0, target.1).await.map(App::Http);
    }
    match tokio::time::timeout(LOCAL_CONNECT_TIMEOUT, TcpStream::connect(target.0)).await {
        Ok(r) => r.map(App::Tcp),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out",
        )),
    }
}

#[allow(clippy::too_many_arguments)]
async fn connect_local(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    target: Target,
    header: &Header,
    peer: &PeerCert,
    caller: &CallerId,
    ctx: &Inbound,
    count: &impl Fn(&'static str, &'static str),
) {
    let service = header.service.as_str();
    let Some(app) = take_app(ctx, &target, header.http, &mut send, count).await else {
        return;
    };
    let _guard = ctx.drain.enter();
    let tcp = match app {
        App::Tcp(tcp) => tcp,
        App::Http(conn) => {
            let io = tokio::io::join(recv, send);
            let label = LABELS.value("service", service, true);
            let rules = stream_rules(ctx, service, &label, caller, peer, target.0, header.trace);
            crate::http::serve_stream(
                io,
                conn,
                ctx.apps.clone(),
                target,
                service.to_string(),
                rules,
            )
            .await;
            count("in", "http");
            return;
        }
    };
    let active = metrics::gauge!(TUNNEL_ACTIVE, "direction" => "in");
    active.increment(1.0);
    let started = meshnode_transport::clock::tokio_now();
    let wall = meshnode_transport::clock::wall();
    let stats = tunnel::splice(tcp, send, recv).await;
    active.decrement(1.0);
    record_tcp(
        ctx,
        caller,
        &LABELS.value("service", service, true),
        started,
        &stats,
        header.trace.map(|t| (t, wall)),
    );
    // The caller's bytes arrive from the peer; ours go out to it.
    metrics::counter!(TUNNEL_BYTES, "service" => LABELS.value("service", service, true), "direction" => "in")
        .increment(stats.from_peer);
    metrics::counter!(TUNNEL_BYTES, "service" => LABELS.value("service", service, true), "direction" => "out")
        .increment(stats.to_peer);
    count("in", stats.ending.as_str());
    debug!(%caller, via = %peer.identity, %service, sent = stats.to_peer, received = stats.from_peer, ending = stats.ending.as_str(), "stream closed");
}

/// One next hop of a gateway: a node's address, who must answer there, and the header to send.
struct Hop {
    addr: std::net::SocketAddr,
    node: String,
    cluster: String,
    gateway: bool,
    header: Header,
    wait: Duration,
    /// An instance of this cluster, rated by the attempt engine.
    instance: Option<crate::upstream::Target>,
}

/// Gateways of `cluster` that the WAN pool says are alive, in random order.
fn wan_hops(ctx: &Inbound, header: &Header, cluster: &str) -> Vec<Hop> {
    let Some(view) = ctx.wan.as_ref().map(|w| w.borrow().clone()) else {
        return Vec::new();
    };
    let mut gws: Vec<_> = view.live_gateways(cluster).into_iter().cloned().collect();
    gws.shuffle(&mut rand::rng());
    gws.into_iter()
        .take(FORWARD_ATTEMPTS)
        .map(|g| Hop {
            addr: g.addr,
            node: g.node,
            cluster: cluster.to_string(),
            gateway: true,
            header: Header {
                cluster: Some(cluster.to_string()),
                // `caller` and `source_service` are set by `forward`, like on every hop.
                end_to_end: header.end_to_end,
                http: header.http,
                subset: header.subset.clone(),
                trace: header.trace,
                ..Header::new(header.service.clone(), header.port)
            },
            wait: WAN_STATUS_TIMEOUT,
            instance: None,
        })
        .collect()
}

/// Healthy instances of this cluster on other nodes, chosen by the node's
/// attempt engine like an upstream's (ejection, streams in flight).
fn lan_hops(ctx: &Inbound, header: &Header) -> Vec<Hop> {
    let mine = ctx.me.identity.cluster();
    ctx.dialer
        .plan_forward(
            &header.service,
            header.port,
            header.subset.as_deref(),
            ctx.me.identity.node(),
            FORWARD_ATTEMPTS,
        )
        .into_iter()
        .map(|i| Hop {
            addr: i.node_addr,
            node: i.node.clone(),
            cluster: mine.to_string(),
            gateway: false,
            header: Header {
                end_to_end: header.end_to_end,
                http: header.http,
                trace: header.trace,
                ..Header::new(header.service.clone(), i.port)
            },
            wait: STATUS_TIMEOUT,
            instance: Some(crate::upstream::Target::Local(i)),
        })
        .collect()
}

/// Tries each hop until one accepts, answers the caller, and relays.
async fn forward(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    hops: Vec<Hop>,
    caller: &CallerId,
    service: &str,
    ctx: &Inbound,
    count: &impl Fn(&'static str, &'static str),
) {
    if hops.is_empty() {
        count("forward", "no_instance");
        return tunnel::refuse(&mut send, Status::NoSuchService).await;
    }
    let mut status = Status::ConnectFailed;
    // A traced stream gets this gateway's span: the next hop's parent.
    let tracer = &ctx.dialer.telemetry().tracer;
    let span = hops
        .first()
        .and_then(|h| h.header.trace)
        .filter(|_| tracer.enabled())
        .map(|t| {
            (
                t,
                crate::trace::span_id(),
                meshnode_transport::clock::wall(),
            )
        });
    for hop in hops {
        let mut header = hop.header;
        // The original caller travels with every forwarded stream.
        header.caller = Some(caller.identity.clone());
        header.source_service = caller.service.clone();
        if let Some((t, mine, _)) = span {
            header.trace = Some(TraceContext {
                parent_id: mine,
                ..t
            });
        }
        match open_to(
            &ctx.endpoint,
            hop.addr,
            &hop.node,
            &hop.cluster,
            hop.gateway,
            &header,
            hop.wait,
        )
        .await
        {
            Ok((next_send, next_recv)) => {
                let _load = hop.instance.as_ref().map(|t| {
                    ctx.dialer.succeeded(t);
                    ctx.dialer.begin(t)
                });
                if tunnel::respond(&mut send, Status::Ok).await.is_err() {
                    count("forward", "peer_gone");
                    let mut next_send = next_send;
                    let _ = next_send.reset(tunnel::code::RESET);
                    return;
                }
                let _guard = ctx.drain.enter();
                let active = metrics::gauge!(TUNNEL_ACTIVE, "direction" => "forward");
                active.increment(1.0);
                let stats = tunnel::relay(send, recv, next_send, next_recv).await;
                active.decrement(1.0);
                metrics::counter!(TUNNEL_BYTES, "service" => LABELS.value("service", service, true), "direction" => "forward")
                    .increment(stats.to_peer + stats.from_peer);
                count("forward", stats.ending.as_str());
                if let Some((context, span_id, start)) = span {
                    use crate::trace::Value::{Int, Str};
                    tracer.export(crate::trace::SpanRecord {
                        context,
                        span_id,
                        root: false,
                        name: format!("gateway {service}"),
                        kind: crate::trace::Kind::Internal,
                        start,
                        end: meshnode_transport::clock::wall(),
                        error: stats.ending != tunnel::Ending::Done,
                        attributes: vec![
                            ("meshnode.direction", Str("forward".into())),
                            ("meshnode.service", Str(service.to_string())),
                            ("meshnode.source", Str(caller.identity.to_string())),
                            ("meshnode.next_hop", Str(hop.node.clone())),
                            ("meshnode.cluster", Str(hop.cluster.clone())),
                            ("meshnode.result", Str(stats.ending.as_str().into())),
                            ("meshnode.bytes_sent", Int(stats.to_peer as i64)),
                            ("meshnode.bytes_received", Int(stats.from_peer as i64)),
                        ],
                    });
                }
                debug!(%caller, %service, to = %hop.node, cluster = %hop.cluster, sent = stats.to_peer, received = stats.from_peer, "forwarded stream closed");
                return;
            }
            Err(e) => {
                debug!(%caller, %service, to = %hop.node, cluster = %hop.cluster, error = %e, "forward attempt failed");
                if let TunnelError::Refused(s) = e {
                    status = s;
                }
                if matches!(e, TunnelError::Refused(Status::Denied)) {
                    // Policy is mesh-wide: no other hop would allow it.
                    break;
                }
                if let Some(t) = &hop.instance {
                    // Counts towards the instance's ejection, as for an upstream.
                    let mut last = String::new();
                    let _ = ctx.dialer.failed(service, t, e, &mut last);
                }
            }
        }
    }
    count("forward", "failed");
    tunnel::refuse(&mut send, status).await
}

#[cfg(test)]
mod tests {
    use meshnode_transport::Role;

    use super::*;

    fn cert(cluster: &str, node: &str, gateway: bool) -> PeerCert {
        PeerCert {
            identity: Identity::new("acme", cluster, node).unwrap(),
            role: if gateway { Role::Gateway } else { Role::Node },
            not_after: 0,
            not_before: 0,
            key_id: String::new(),
            serial: String::new(),
            services: vec!["web".into()],
        }
    }

    fn header(cluster: Option<&str>, caller: Option<Identity>) -> Header {
        Header {
            cluster: cluster.map(String::from),
            caller,
            end_to_end: true,
            ..Header::new("api", 1)
        }
    }

    #[test]
    fn routes_by_cluster_and_role() {
        let node = cert("east", "n1", false);
        let gw = cert("east", "gw", true);
        let west_gw = cert("west", "gw", true);
        let west_node = cert("west", "n1", false);
        let a = Identity::new("acme", "east", "a").unwrap();
        // Plain local stream: the caller is the peer.
        let (r, c) = route(&header(None, None), &node, &node, false, false);
        assert_eq!((r, c.identity), (Route::Local, node.identity.clone()));
        // To another cluster: only through a gateway.
        let (r, _) = route(&header(Some("west"), None), &node, &gw, true, false);
        assert_eq!(r, Route::Wan("west".into()));
        let (r, _) = route(&header(Some("west"), None), &node, &node, false, false);
        assert!(matches!(r, Route::Refuse(Status::Forbidden, _)));
        // Arriving from another cluster's gateway at our gateway: forward in the cluster,
        // with the carried caller.
        let (r, c) = route(
            &header(Some("east"), Some(a.clone())),
            &west_gw,
            &gw,
            true,
            false,
        );
        assert_eq!((r, c.identity), (Route::Lan, a.clone()));
        // A non-gateway of another cluster cannot reach in, nor can a gateway relay transit.
        let (r, _) = route(&header(None, None), &west_node, &gw, true, false);
        assert!(matches!(r, Route::Refuse(Status::Forbidden, _)));
        let (r, _) = route(&header(Some("south"), None), &west_gw, &gw, true, false);
        assert!(matches!(r, Route::Refuse(Status::Forbidden, _)));
        // The destination accepts a carried caller only from a gateway.
        let (r, c) = route(&header(None, Some(a.clone())), &gw, &node, false, false);
        assert_eq!((r, c.identity), (Route::Local, a.clone()));
        let (r, c) = route(
            &header(None, Some(a.clone())),
            &cert("east", "n2", false),
            &node,
            false,
            false,
        );
        assert!(matches!(r, Route::Refuse(Status::Forbidden, _)));
        assert_eq!(c.identity.node(), "n2");
        let other_mesh = Identity::new("evil", "east", "a").unwrap();
        let (r, _) = route(&header(None, Some(other_mesh)), &gw, &node, false, false);
        assert!(matches!(r, Route::Refuse(Status::Forbidden, _)));
    }

    #[test]
    fn a_caller_acts_only_as_a_service_its_certificate_names() {
        let node = cert("east", "n1", false);
        let gw = cert("east", "gw", true);
        let west_gw = cert("west", "gw", true);
        let mut h = header(None, None);
        h.source_service = Some("web".into());
        let (r, c) = route(&h, &node, &node, false, false);
        assert_eq!(r, Route::Local);
        assert_eq!(c.service.as_deref(), Some("web"));
        h.source_service = Some("admin".into());
        let (r, _) = route(&h, &node, &node, false, false);
        assert!(matches!(r, Route::Refuse(Status::Denied, _)));
        // A gateway checks it on the first hop, then carries it: the remote
        // gateway and the destination take it with the carried caller.
        let mut h = header(Some("west"), None);
        h.source_service = Some("admin".into());
        let (r, _) = route(&h, &node, &gw, true, false);
        assert!(matches!(r, Route::Refuse(Status::Denied, _)));
        let a = Identity::new("acme", "west", "a").unwrap();
        let mut h = header(Some("east"), Some(a.clone()));
        h.source_service = Some("admin".into());
        let (r, c) = route(&h, &west_gw, &gw, true, false);
        assert_eq!(r, Route::Lan);
        assert_eq!(
            c,
            CallerId {
                identity: a,
                service: Some("admin".into())
            }
        );
    }

    #[test]
    fn a_caller_from_another_cluster_must_prove_itself_end_to_end() {
        let node = cert("east", "n1", false);
        let gw = cert("east", "gw", true);
        let west_gw = cert("west", "gw", true);
        let a = Identity::new("acme", "west", "a").unwrap();
        let mut carried = header(None, Some(a.clone()));
        carried.end_to_end = false;
        // A gateway's word alone is not enough, at the node or at the gateway.
        let (r, _) = route(&carried, &gw, &node, false, false);
        assert!(matches!(r, Route::Refuse(Status::Forbidden, _)), "{r:?}");
        let mut lan = header(Some("east"), Some(a));
        lan.end_to_end = false;
        let (r, _) = route(&lan, &west_gw, &gw, true, false);
        assert!(matches!(r, Route::Refuse(Status::Forbidden, _)), "{r:?}");
        // Unless the mesh still trusts gateways (upgrading from older nodes).
        let (r, _) = route(&carried, &gw, &node, false, true);
        assert_eq!(r, Route::Local);
        // With a session, it routes; a stream within the cluster needs none.
        lan.end_to_end = true;
        assert_eq!(route(&lan, &west_gw, &gw, true, false).0, Route::Lan);
        let mut plain = header(None, None);
        plain.end_to_end = false;
        assert_eq!(route(&plain, &node, &node, false, false).0, Route::Local);
    }
}
