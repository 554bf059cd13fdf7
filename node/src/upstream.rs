//! Upstream listeners: local apps connect here and are tunnelled to an instance
//! of the service somewhere in the mesh.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use meshnode_gossip::{GossipHandle, Instance, RemoteRoute};
use meshnode_transport::alpn::Alpn;
use meshnode_transport::tunnel::{self, Header, Status, TunnelError, ANY_PORT};
use meshnode_transport::Endpoint;
use rand::RngExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::balance::{self, Pick, Scope};
use crate::config::UpstreamConfig;
use crate::drain::Drain;
use crate::metrics::{
    LogLimit, OUTLIER_EJECTIONS, TUNNEL_ACTIVE, TUNNEL_BYTES, TUNNEL_CONNECT_SECONDS,
    TUNNEL_STREAMS, UPSTREAM_RETRIES,
};
use crate::outlier::{Key, Outliers};
use crate::routes::Subset;

/// A receiver answers within its local connect timeout (1 s); silence past this
/// means the peer is gone, and the next instance is tried.
pub(crate) const STATUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Through gateways the status comes after up to two more hops, each of which
/// may retry (see `forward`): the caller waits for all of that.
pub(crate) const REMOTE_STATUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Denials are logged at most once a second (all are counted).
static DENIED_LOG: LogLimit = LogLimit::new(std::time::Duration::from_secs(1));

/// An open tunnel: a plain stream (the QUIC connection is end to end), or
/// an end-to-end session through gateways.
pub(crate) enum Tunnel {
    Plain(quinn::SendStream, quinn::RecvStream),
    /// A plain stream whose status has not been read yet: it comes in
    /// front of the first bytes read (HTTP requests sent at once).
    Pending(
        quinn::SendStream,
        tunnel::e2e::StatusFirst<quinn::RecvStream>,
    ),
    Sealed(Box<tunnel::e2e::ClientSession>),
}

/// Why a connection could not be tunnelled.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// The destination's policy denied it (named: the instance that said so).
    Denied(String),
    NoInstance(String),
    Failed(String),
}

impl Refusal {
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Refusal::Denied(_) => "denied",
            Refusal::NoInstance(_) => "no_instance",
            Refusal::Failed(_) => "failed",
        }
    }
}

/// Shared by every upstream of a node: where to send, and what we learned from failures.
pub struct Dialer {
    endpoint: Endpoint,
    /// The route tables of HTTP services, following the policy store.
    routes: watch::Receiver<Arc<crate::routes::Routes>>,
    /// The resilience settings of HTTP services, following the policy store.
    resilience: watch::Receiver<Arc<crate::resilience::Policies>>,
    /// Retry budgets and circuit-breaker counts by service, and the
    /// origin of the budgets' clock.
    ledger: crate::resilience::Ledger,
    born: tokio::time::Instant,
    /// Idle HTTP exchanges on tunnel streams, for the next request.
    streams: Arc<crate::http::StreamPool>,
    /// Cross-cluster streams carry an end-to-end session (`None`: the mesh
    /// still trusts the caller gateways carry, see `cross_cluster_identity`).
    e2e: Option<tunnel::e2e::E2e>,
    gossip: GossipHandle,
    cluster: String,
    state: Arc<Mutex<Load>>,
    /// Golden metrics, `top`'s table and the access log.
    telemetry: Arc<crate::telemetry::Telemetry>,
}

#[derive(Default)]
struct Load {
    outliers: Outliers,
    active: HashMap<Key, u64>,
    /// HTTP response latencies (peak-EWMA), the cost of per-request balancing.
    latencies: crate::ewma::Latencies,
    /// Observations since the last prune of `latencies` and `outliers`.
    since_prune: u32,
}

/// Decrements an instance's active count when its stream (or request) ends.
pub(crate) struct ActiveGuard {
    load: Arc<Mutex<Load>>,
    key: Key,
}

fn key(i: &Instance) -> Key {
    (i.node.clone(), i.port)
}

fn pick_key(p: &Pick<'_>) -> Key {
    match p {
        Pick::Local(i) => key(i),
        Pick::Remote(r) => (format!("{}>{}", r.via, r.cluster), 0),
    }
}

/// Where one attempt went, owned.
#[derive(Clone, Debug)]
pub(crate) enum Target {
    Local(Instance),
    Remote(RemoteRoute),
}

impl Target {
    pub(crate) fn key(&self) -> Key {
        match self {
            Target::Local(i) => pick_key(&Pick::Local(i)),
            Target::Remote(r) => pick_key(&Pick::Remote(r)),
        }
    }

    /// For logs: `node` or `gateway>cluster`.
    pub(crate) fn name(&self) -> String {
        self.key().0
    }

    pub(crate) fn cluster(&self) -> &str {
        match self {
            Target::Local(i) => &i.cluster,
            Target::Remote(r) => &r.cluster,
        }
    }
}

fn scope<'a>(own_cluster: &'a str, up: &'a UpstreamConfig) -> Scope<'a> {
    Scope {
        own_cluster,
        failover: &up.failover,
        pinned: up.cluster.as_deref(),
    }
}

// === impl Dialer ===

impl Dialer {
    pub fn new(
        endpoint: Endpoint,
        e2e: Option<tunnel::e2e::E2e>,
        gossip: GossipHandle,
        cluster: &str,
    ) -> Self {
        Self {
            endpoint,
            e2e,
            gossip,
            cluster: cluster.to_string(),
            state: Arc::new(Mutex::new(Load::default())),
            routes: watch::channel(Arc::new(crate::routes::Routes::default())).1,
            resilience: watch::channel(Arc::new(crate::resilience::Policies::default())).1,
            ledger: crate::resilience::Ledger::default(),
            born: meshnode_transport::clock::tokio_now(),
            streams: Arc::default(),
            telemetry: Arc::new(crate::telemetry::Telemetry::quiet("-", cluster)),
        }
    }

    /// Records into this node's telemetry (the default writes no access log).
    pub fn with_telemetry(mut self, telemetry: Arc<crate::telemetry::Telemetry>) -> Self {
        self.telemetry = telemetry;
        self
    }

    pub fn telemetry(&self) -> &Arc<crate::telemetry::Telemetry> {
        &self.telemetry
    }

    /// Routes HTTP requests by these tables (the policy store's `routes`).
    pub fn with_routes(mut self, routes: watch::Receiver<Arc<crate::routes::Routes>>) -> Self {
        self.routes = routes;
        self
    }

    /// Applies `resilience` documents (the policy store's) to HTTP requests.
    pub fn with_resilience(
        mut self,
        policies: watch::Receiver<Arc<crate::resilience::Policies>>,
    ) -> Self {
        self.resilience = policies;
        self
    }

    pub(crate) fn resilience(&self, service: &str) -> Option<Arc<crate::resilience::Policy>> {
        self.resilience.borrow().get(service)
    }

    fn since_born(&self) -> u64 {
        meshnode_transport::clock::tokio_since(self.born).as_secs()
    }

    /// `service`'s circuit-breaker counts at this node.
    pub(crate) fn breaker(&self, service: &str) -> Arc<crate::resilience::Breaker> {
        self.ledger.breaker(service)
    }

    /// A request of `service` deposits into its retry budget.
    pub(crate) fn budget_request(&self, service: &str, ratio: f64) {
        self.ledger.request(service, ratio, self.since_born());
    }

    /// Takes a retry from `service`'s budget, if one is left.
    pub(crate) fn try_retry(&self, service: &str, ratio: f64) -> bool {
        self.ledger.try_retry(service, ratio, self.since_born())
    }

    pub(crate) fn streams(&self) -> &Arc<crate::http::StreamPool> {
        &self.streams
    }

    pub(crate) fn routes(&self) -> Arc<crate::routes::Routes> {
        self.routes.borrow().clone()
    }

    /// Whether connections to `up` are HTTP, routed per request: the
    /// upstream's `protocol`, else what the service's instances declare.
    pub(crate) fn is_http(&self, up: &UpstreamConfig) -> bool {
        match up.protocol {
            Some(p) => p == crate::config::UpstreamProtocol::Http,
            None => self
                .gossip
                .catalog()
                .instances(&up.service)
                .iter()
                .any(|i| i.protocol.is_http()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Load> {
        lock_load(&self.state)
    }

    /// One HTTP response of `service` from `target`, `rtt` after its
    /// attempt started: its latency estimate, and for an instance of this
    /// cluster the 5xx and latency outlier counts.
    pub(crate) fn observe(
        &self,
        service: &str,
        target: &Target,
        rtt: std::time::Duration,
        status: hyper::StatusCode,
    ) {
        let now = meshnode_transport::clock::tokio_now();
        let k = target.key();
        let mut load = self.lock();
        if let Target::Local(i) = target {
            let catalog = std::cell::OnceCell::new();
            let peers = || {
                catalog
                    .get_or_init(|| self.gossip.catalog())
                    .instances(service)
                    .iter()
                    .filter(|p| p.cluster == i.cluster)
                    .map(key)
                    .collect::<Vec<Key>>()
            };
            // Only a response above the floor asks for the peers' estimates.
            let slow = rtt >= crate::outlier::SLOW_FLOOR && {
                let mut estimates: Vec<f64> = peers()
                    .iter()
                    .filter(|p| **p != k)
                    .filter_map(|p| load.latencies.known(p, now))
                    .collect();
                crate::outlier::is_slow(rtt, &mut estimates)
            };
            let ejected =
                load.outliers
                    .handle_response(&k, status.is_server_error(), slow, now, peers);
            if let Some((period, cause)) = ejected {
                warn!(service = %service, target = %target.name(), ?period, cause = cause.label(), "ejecting instance after repeated bad responses");
                metrics::counter!(OUTLIER_EJECTIONS, "service" => service.to_string(), "cause" => cause.label())
                    .increment(1);
            }
        }
        load.latencies.observe(&k, rtt, now);
        load.since_prune += 1;
        if load.since_prune >= 1024 {
            load.since_prune = 0;
            load.latencies.prune(now);
            load.outliers.prune(now);
        }
    }

    /// The attempts a new connection for `up` would make, in order.
    pub(crate) fn plan(&self, up: &UpstreamConfig) -> Vec<Target> {
        self.plan_subset(up, &Subset::Any)
    }

    /// [`Dialer::plan`] among the instances of one subset (instances of
    /// other clusters are chosen there, by the header's subset).
    pub(crate) fn plan_subset(&self, up: &UpstreamConfig, subset: &Subset) -> Vec<Target> {
        self.plan_with(up, subset, false)
    }

    /// [`Dialer::plan_subset`]; `by_latency`: power of two choices over
    /// peak-EWMA latency times requests in flight (HTTP requests), not
    /// open streams.
    pub(crate) fn plan_with(
        &self,
        up: &UpstreamConfig,
        subset: &Subset,
        by_latency: bool,
    ) -> Vec<Target> {
        let catalog = self.gossip.catalog();
        let load = self.lock();
        let now = meshnode_transport::clock::tokio_now();
        let mut rng = rand::rng();
        let all = catalog.instances(&up.service);
        let chosen: Vec<Instance>;
        let instances = match subset {
            Subset::Any => all,
            Subset::Tag(_) => {
                chosen = all
                    .iter()
                    .filter(|i| subset.matches(&i.tags))
                    .cloned()
                    .collect();
                &chosen
            }
        };
        let mut picks = balance::plan(
            instances,
            catalog.remote_routes(&up.service),
            &scope(&self.cluster, up),
            |p| load.outliers.is_unreachable(&pick_key(p), now),
            |i| {
                let k = key(i);
                let active = load.active.get(&k).copied().unwrap_or(0);
                if by_latency {
                    load.latencies.cost(&k, active, now)
                } else {
                    active
                }
            },
            |n| rng.random_range(0..n),
        );
        // Instances ejected for bad answers go after the own cluster's
        // others, and still before other clusters (see outlier.rs).
        let locals = picks
            .iter()
            .position(|p| !matches!(p, Pick::Local(_)))
            .unwrap_or(picks.len());
        picks[..locals].sort_by_key(|p| load.outliers.is_ejected(&pick_key(p), now));
        picks
            .into_iter()
            .map(|p| match p {
                Pick::Local(i) => Target::Local(i.clone()),
                Pick::Remote(r) => Target::Remote(r.clone()),
            })
            .collect()
    }

    /// The instances of this cluster a gateway forwards a stream for
    /// `service` to, at most `attempts`, in order: healthy ones, ejected ones
    /// last (only if all are), the first by power of two choices on streams
    /// in flight. The same outlier and load state as this node's upstreams:
    /// [`Dialer::failed`], [`Dialer::succeeded`] and [`Dialer::begin`] keep it.
    pub(crate) fn plan_forward(
        &self,
        service: &str,
        port: u16,
        subset: Option<&str>,
        me: &str,
        attempts: usize,
    ) -> Vec<Instance> {
        let catalog = self.gossip.catalog();
        let load = self.lock();
        let now = meshnode_transport::clock::tokio_now();
        let mut rng = rand::rng();
        let candidates: Vec<Instance> = catalog
            .instances(service)
            .iter()
            .filter(|i| i.node != me)
            .filter(|i| port == meshnode_transport::tunnel::ANY_PORT || i.port == port)
            .filter(|i| subset.is_none_or(|s| i.tags.iter().any(|t| t == s)))
            .cloned()
            .collect();
        balance::order(
            &candidates,
            &self.cluster,
            &[],
            |i| load.outliers.is_ejected(&key(i), now),
            |i| load.active.get(&key(i)).copied().unwrap_or(0),
            |n| rng.random_range(0..n),
        )
        .into_iter()
        .take(attempts)
        .cloned()
        .collect()
    }

    /// Every cluster the catalog has for `up.service`, as [`Dialer::plan`] sees it.
    pub(crate) fn explain(&self, up: &UpstreamConfig) -> Vec<crate::explain::ClusterRow> {
        let catalog = self.gossip.catalog();
        let load = self.lock();
        let now = meshnode_transport::clock::tokio_now();
        crate::explain::clusters(
            catalog.instances(&up.service),
            catalog.remote_routes(&up.service),
            &scope(&self.cluster, up),
            |p| load.outliers.is_ejected(&pick_key(p), now),
            |p| load.outliers.is_unreachable(&pick_key(p), now),
        )
    }

    /// Opens a tunnel to some healthy instance of `up.service`, retrying others on failure.
    /// `tcp`: the application's connection; what it has already sent may
    /// go out early (see `tunnel::e2e`), and is then replayed to a retry.
    pub(crate) async fn open(
        &self,
        up: &UpstreamConfig,
        want: Want<'_>,
    ) -> Result<(Tunnel, Target, ActiveGuard), Refusal> {
        let candidates = self.candidates(up, &want)?;
        let mut early = Vec::new();
        let mut last = String::new();
        for (attempt, target) in candidates.into_iter().enumerate() {
            self.count_retry(up, attempt);
            match self
                .try_target(
                    &up.service,
                    up.as_service.as_deref(),
                    &target,
                    &mut early,
                    &want,
                )
                .await
            {
                Ok(tunnel) => {
                    self.succeeded(&target);
                    let guard = self.begin(&target);
                    return Ok((tunnel, target, guard));
                }
                Err(e) => self.failed(&up.service, &target, e, &mut last)?,
            }
        }
        Err(Refusal::Failed(format!(
            "every attempt failed (last: {last})"
        )))
    }

    /// The attempts for one connection or request, or why there are none.
    pub(crate) fn candidates(
        &self,
        up: &UpstreamConfig,
        want: &Want<'_>,
    ) -> Result<Vec<Target>, Refusal> {
        let candidates = self.plan_with(up, want.subset, want.http);
        if candidates.is_empty() {
            return Err(Refusal::NoInstance(format!(
                "no healthy instance of {:?}{} in the catalog{}",
                up.service,
                match want.subset {
                    Subset::Any => String::new(),
                    Subset::Tag(t) => format!(" tagged {t}"),
                },
                up.cluster
                    .as_deref()
                    .map(|c| format!(" for cluster {c}"))
                    .unwrap_or_default()
            )));
        }
        Ok(candidates)
    }

    pub(crate) fn count_retry(&self, up: &UpstreamConfig, attempt: usize) {
        if attempt > 0 {
            metrics::counter!(UPSTREAM_RETRIES, "service" => up.service.clone()).increment(1);
        }
    }

    /// An attempt that reached its instance: its failures are forgotten.
    pub(crate) fn succeeded(&self, target: &Target) {
        self.lock().outliers.handle_success(&target.key());
    }

    /// Counts a stream (or request) in flight at `target` until the guard drops.
    pub(crate) fn begin(&self, target: &Target) -> ActiveGuard {
        let k = target.key();
        *self.lock().active.entry(k.clone()).or_default() += 1;
        ActiveGuard {
            load: self.state.clone(),
            key: k,
        }
    }

    /// A failed attempt: `Err` stops trying (a denial: policy is mesh-wide),
    /// `Ok` goes on to the next instance; a fault of the instance counts
    /// towards its ejection. `last` keeps the reason for the final error.
    pub(crate) fn failed(
        &self,
        service: &str,
        target: &Target,
        e: TunnelError,
        last: &mut String,
    ) -> Result<(), Refusal> {
        match e {
            TunnelError::Refused(Status::Denied) => {
                // Policy is mesh-wide: another instance would deny too, and
                // a denial says nothing bad about this one.
                Err(Refusal::Denied(target.name()))
            }
            TunnelError::Refused(s @ (Status::PolicyPending | Status::Draining)) => {
                // Not the instance's fault either: try the next, no ejection.
                debug!(service = %service, target = %target.name(), status = %s, "instance cannot take the stream now");
                *last = format!("{}: {s}", target.name());
                Ok(())
            }
            e => {
                debug!(service = %service, target = %target.name(), error = %e, "tunnel attempt failed");
                if let Some(period) = self
                    .lock()
                    .outliers
                    .handle_failure(&target.key(), meshnode_transport::clock::tokio_now())
                {
                    warn!(service = %service, target = %target.name(), ?period, "ejecting instance after repeated failures");
                    metrics::counter!(OUTLIER_EJECTIONS, "service" => service.to_string(), "cause" => crate::outlier::Cause::Connect.label())
                        .increment(1);
                }
                *last = format!("{}: {e}", target.name());
                Ok(())
            }
        }
    }

    pub(crate) async fn try_target(
        &self,
        service: &str,
        acting_as: Option<&str>,
        target: &Target,
        early: &mut Vec<u8>,
        want: &Want<'_>,
    ) -> Result<Tunnel, TunnelError> {
        let (addr, node, gateway, mut header, wait) = match target {
            Target::Local(i) => (
                i.node_addr,
                &i.node,
                false,
                Header::new(service, i.port),
                STATUS_TIMEOUT,
            ),
            Target::Remote(r) => (
                r.via_addr,
                &r.via,
                true,
                Header {
                    cluster: Some(r.cluster.clone()),
                    end_to_end: self.e2e.is_some(),
                    // The destination gateway picks an instance: of this subset.
                    subset: want.subset.as_header(),
                    ..Header::new(service, ANY_PORT)
                },
                REMOTE_STATUS_TIMEOUT,
            ),
        };
        header.http = want.http;
        header.trace = want.trace;
        match (target, &self.e2e) {
            (Target::Remote(r), Some(e2e)) => {
                // The caller's own word goes inside the session; the outer
                // header only routes, and names no service acted as.
                let inner = Header {
                    cluster: Some(r.cluster.clone()),
                    source_service: acting_as.map(str::to_string),
                    end_to_end: true,
                    http: want.http,
                    subset: header.subset.clone(),
                    ..Header::new(service, ANY_PORT)
                };
                let header = &header;
                let tcp = want.early_from;
                let top_up = |buf: &mut Vec<u8>| {
                    let Some(tcp) = tcp else { return };
                    let mut chunk = [0u8; 4096];
                    while buf.len() < tunnel::e2e::MAX_EARLY {
                        let room = (tunnel::e2e::MAX_EARLY - buf.len()).min(chunk.len());
                        match tcp.try_read(&mut chunk[..room]) {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => break,
                        }
                    }
                };
                let (session, dest) = open_with(
                    &self.endpoint,
                    addr,
                    node,
                    &self.cluster,
                    gateway,
                    |send, recv| async move {
                        e2e.open(
                            send,
                            recv,
                            &tunnel::e2e::Ask {
                                outer: header,
                                inner: &inner,
                                cluster: &r.cluster,
                                wait: wait + tunnel::e2e::SESSION_TIMEOUT,
                            },
                            early,
                            top_up,
                        )
                        .await
                    },
                )
                .await?;
                debug!(%service, destination = %dest.identity, via = %r.via, "end-to-end session up");
                Ok(Tunnel::Sealed(Box::new(session)))
            }
            _ if want.pipeline => {
                // The request goes out with the header; the status is read
                // in front of the response (`StatusFirst`).
                header.source_service = acting_as.map(str::to_string);
                let (send, recv) = open_with(
                    &self.endpoint,
                    addr,
                    node,
                    &self.cluster,
                    gateway,
                    |mut send, recv| async move {
                        let bytes = tunnel::encode_header(&header)?;
                        send.write_all(&bytes)
                            .await
                            .map_err(|e| TunnelError::Stream(e.to_string()))?;
                        Ok((send, recv))
                    },
                )
                .await?;
                Ok(Tunnel::Pending(send, tunnel::e2e::StatusFirst::new(recv)))
            }
            _ => {
                header.source_service = acting_as.map(str::to_string);
                let (send, recv) = open_to(
                    &self.endpoint,
                    addr,
                    node,
                    &self.cluster,
                    gateway,
                    &header,
                    wait,
                )
                .await?;
                let mut send = send;
                if !early.is_empty() {
                    // Read ahead for a refused end-to-end attempt: it goes first.
                    send.write_all(early)
                        .await
                        .map_err(|e| TunnelError::Stream(e.to_string()))?;
                    early.clear();
                }
                Ok(Tunnel::Plain(send, recv))
            }
        }
    }
}

/// Opens a tunnel stream to the node `node` of `cluster` at `addr` (a gateway
/// when `gateway`), checking that the certificate that answers is that node's.
pub(crate) async fn open_to(
    endpoint: &Endpoint,
    addr: std::net::SocketAddr,
    node: &str,
    cluster: &str,
    gateway: bool,
    header: &Header,
    wait: std::time::Duration,
) -> Result<(quinn::SendStream, quinn::RecvStream), TunnelError> {
    open_with(
        endpoint,
        addr,
        node,
        cluster,
        gateway,
        |mut send, mut recv| async move {
            tunnel::open(&mut send, &mut recv, header, wait).await?;
            Ok((send, recv))
        },
    )
    .await
}

/// [`open_to`] with what to do on the fresh stream (`then`) left to the caller.
pub(crate) async fn open_with<T, F, Fut>(
    endpoint: &Endpoint,
    addr: std::net::SocketAddr,
    node: &str,
    cluster: &str,
    gateway: bool,
    then: F,
) -> Result<T, TunnelError>
where
    F: FnOnce(quinn::SendStream, quinn::RecvStream) -> Fut,
    Fut: std::future::Future<Output = Result<T, TunnelError>>,
{
    let (conn, peer) = endpoint
        .connect(addr, Alpn::Tunnel)
        .await
        .map_err(|e| TunnelError::Stream(e.to_string()))?;
    // The address came from gossip; the certificate says who really answered.
    if peer.identity.node() != node
        || peer.identity.cluster() != cluster
        || (gateway && !peer.is_gateway())
    {
        return Err(TunnelError::Stream(format!(
            "{} answered at {addr} where gossip has {}node {node} of cluster {cluster}",
            peer.identity,
            if gateway { "gateway " } else { "" },
        )));
    }
    let opened = async {
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| TunnelError::Stream(e.to_string()))?;
        then(send, recv).await
    };
    let result = opened.await;
    if let Err(TunnelError::Timeout(_) | TunnelError::Stream(_) | TunnelError::Closed(_)) = &result
    {
        // Silence or a broken connection: the peer may be dead or restarted.
        // A refusal, by contrast, proves the connection works.
        endpoint.forget(addr, Alpn::Tunnel);
    }
    result
}

fn lock_load(load: &Mutex<Load>) -> std::sync::MutexGuard<'_, Load> {
    load.lock().unwrap_or_else(|e| e.into_inner())
}

/// What one opening asks for beyond the upstream's own settings.
pub(crate) struct Want<'a> {
    /// Only instances of this subset (a route's choice).
    pub subset: &'a Subset,
    /// The stream carries one HTTP request.
    pub http: bool,
    /// An application connection whose first bytes may go out early with
    /// an end-to-end session (L4 only).
    pub early_from: Option<&'a TcpStream>,
    /// Send at once, not waiting for the status, on a plain stream
    /// ([`Tunnel::Pending`]); sessions through gateways still wait.
    pub pipeline: bool,
    /// The call's trace context, carried in the stream's header (a new
    /// stream's: a pooled HTTP stream keeps the one it was opened with).
    pub trace: Option<tunnel::TraceContext>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let mut load = lock_load(&self.load);
        if let Some(n) = load.active.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                load.active.remove(&self.key);
            }
        }
    }
}

/// Accepts local connections until the listener is dropped.
/// Accepts on one upstream's listener until its config becomes `None` (a
/// reload removed it): then the listener closes and connections already
/// accepted run on. A changed config applies to the next connection.
pub async fn serve(
    listener: TcpListener,
    mut config: watch::Receiver<Option<UpstreamConfig>>,
    dialer: Arc<Dialer>,
    drain: Drain,
) {
    let Some(first) = config.borrow().clone() else {
        return;
    };
    info!(service = %first.service, listen = %first.listen, "upstream listening");
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            changed = config.changed() => {
                if changed.is_err() || config.borrow().is_none() {
                    info!(service = %first.service, listen = %first.listen, "upstream removed; its open connections run on");
                    return;
                }
                continue;
            }
        };
        let (tcp, from) = match accepted {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "upstream accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        if drain.is_draining() {
            drop(tcp);
            continue;
        }
        let Some(up) = config.borrow().clone() else {
            return;
        };
        let dialer = dialer.clone();
        let guard = drain.enter();
        tokio::spawn(async move {
            let _guard = guard;
            if dialer.is_http(&up) {
                crate::http::serve_caller(tcp, Arc::new(up.clone()), dialer).await;
            } else {
                proxy(tcp, &up, &dialer).await;
            }
            debug!(%from, service = %up.service, "upstream connection done");
        });
    }
}

async fn proxy(tcp: TcpStream, up: &UpstreamConfig, dialer: &Dialer) {
    let started = meshnode_transport::clock::tokio_now();
    let wall = meshnode_transport::clock::wall();
    // A traced node starts a trace per connection; its span is the
    // parent of every hop's.
    let trace = dialer
        .telemetry()
        .tracer
        .enabled()
        .then(|| crate::trace::new_trace(crate::trace::span_id()));
    let want = Want {
        subset: &Subset::Any,
        http: false,
        early_from: Some(&tcp),
        pipeline: false,
        trace,
    };
    let mut call = TcpCall {
        up,
        dialer,
        started: (started, wall),
        trace,
    };
    let (tunnel, target, _active) = match dialer.open(up, want).await {
        Ok(x) => x,
        Err(refusal) => {
            match &refusal {
                Refusal::Denied(by) => {
                    if DENIED_LOG.allow() {
                        warn!(service = %up.service, acting_as = up.as_service.as_deref().unwrap_or("-"), destination = %by, "denied by the service's authorization policy; resetting the local connection (logged at most once a second)");
                    }
                }
                Refusal::NoInstance(e) | Refusal::Failed(e) => {
                    warn!(service = %up.service, error = %e, "cannot reach service; closing the local connection");
                }
            }
            metrics::counter!(TUNNEL_STREAMS, "service" => up.service.clone(), "direction" => "out", "result" => refusal.label()).increment(1);
            call.ended(None, refusal.label(), true, (0, 0));
            // A reset, not a clean close: the application sees the refusal.
            let _ = tcp.set_zero_linger();
            return;
        }
    };
    metrics::histogram!(TUNNEL_CONNECT_SECONDS)
        .record(meshnode_transport::clock::tokio_since(started).as_secs_f64());
    let active = metrics::gauge!(TUNNEL_ACTIVE, "direction" => "out");
    active.increment(1.0);
    let stats = match tunnel {
        Tunnel::Plain(send, recv) => tunnel::splice(tcp, send, recv).await,
        // L4 connections never ask for a pending status.
        Tunnel::Pending(mut send, _) => {
            let _ = send.reset(tunnel::code::RESET);
            return;
        }
        Tunnel::Sealed(session) => tunnel::e2e::splice_session(tcp, *session).await,
    };
    active.decrement(1.0);
    metrics::counter!(TUNNEL_BYTES, "service" => up.service.clone(), "direction" => "out")
        .increment(stats.to_peer);
    metrics::counter!(TUNNEL_BYTES, "service" => up.service.clone(), "direction" => "in")
        .increment(stats.from_peer);
    metrics::counter!(TUNNEL_STREAMS, "service" => up.service.clone(), "direction" => "out", "result" => stats.ending.as_str()).increment(1);
    let ending = stats.ending;
    call.ended(
        Some(&target),
        ending.as_str(),
        ending != tunnel::Ending::Done,
        (stats.to_peer, stats.from_peer),
    );
    debug!(service = %up.service, target = %target.name(), cluster = %target.cluster(), sent = stats.to_peer, received = stats.from_peer, "tunnel closed");
}

/// One proxied connection at the caller's node, for its telemetry.
struct TcpCall<'a> {
    up: &'a UpstreamConfig,
    dialer: &'a Dialer,
    /// When it was accepted: for durations, and the span's wall-clock start.
    started: (tokio::time::Instant, std::time::SystemTime),
    /// Its trace, when this node exports spans (the span's id is the
    /// context's `parent_id`: this is the first hop).
    trace: Option<tunnel::TraceContext>,
}

impl TcpCall<'_> {
    /// The connection ended (or was refused): golden metrics, `top`, the
    /// access log and its span. `bytes`: sent by the application, received.
    fn ended(
        &mut self,
        target: Option<&Target>,
        result: &'static str,
        error: bool,
        bytes: (u64, u64),
    ) {
        let (up, telemetry) = (self.up, self.dialer.telemetry());
        let took = meshnode_transport::clock::tokio_since(self.started.0);
        let cluster = target.map_or("-", |t| t.cluster());
        telemetry
            .out_pair(
                crate::telemetry::Kind::Tcp,
                up.as_service.as_deref(),
                &up.service,
                cluster,
            )
            .record(result, error, took, Some(bytes));
        let instance = || target.map_or_else(|| "-".into(), |t| t.name());
        telemetry.access.log(error, || crate::telemetry::Access {
            direction: "out",
            kind: "tcp",
            source: telemetry.identity.clone(),
            source_service: up.as_service.clone().unwrap_or_else(|| "-".into()),
            service: up.service.clone(),
            cluster: cluster.to_string(),
            instance: instance(),
            result: result.to_string(),
            bytes_sent: bytes.0,
            bytes_received: bytes.1,
            duration: took,
            trace_id: self
                .trace
                .map(|t| crate::trace::hex(&t.trace_id))
                .unwrap_or_default(),
            ..Default::default()
        });
        if let Some(context) = self.trace.take() {
            use crate::trace::Value::{Int, Str};
            telemetry.tracer.export(crate::trace::SpanRecord {
                context,
                span_id: context.parent_id,
                root: true,
                name: format!("tcp {}", up.service),
                kind: crate::trace::Kind::Client,
                start: self.started.1,
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
                        ("meshnode.instance", Str(instance())),
                        ("meshnode.bytes_sent", Int(bytes.0 as i64)),
                        ("meshnode.bytes_received", Int(bytes.1 as i64)),
                    ]);
                    a
                },
            });
        }
    }
}
