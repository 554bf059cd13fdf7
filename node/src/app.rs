//! Bind, then run: `build` opens every socket and returns their real
//! addresses (tests use port 0); `Bound::run` serves until shutdown.

use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use meshnode_gossip::federation::WanView;
use meshnode_gossip::{GossipConfig, GossipHandle, PoolKind, QuicTransport, Tuning};
use meshnode_transport::endpoint::EndpointError;
use meshnode_transport::tls::{TlsError, TlsMaterial};
use meshnode_transport::{Endpoint, EndpointConfig, PeerCert};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::ca::{CaError, CaNode};
use crate::config::{Config, CrossClusterIdentity};
use crate::drain::Drain;
use crate::federation;

use crate::inbound::{self, Inbound};
use crate::join::{self, JoinService};
use crate::metrics::{CA_EXPIRY_SECONDS, CERT_EXPIRY_SECONDS};
use crate::registry::Registry;
use crate::renew::Renewer;
use crate::revocations::Revocations;
use crate::upstream::Dialer;
use meshnode_gossip::keys::{CA_ROLE_KEY, ROLE_PREFIX};
use meshnode_transport::pki::join::NodeKey;

/// Open streams get this long to finish after SIGTERM or `leave`.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{key}: config says {config:?} but the node certificate says {cert:?} (identity {identity})")]
    IdentityMismatch {
        key: &'static str,
        config: String,
        cert: String,
        identity: String,
    },
    #[error("gateway: the config says gateway = true but {identity} has no gateway certificate; issue one with `meshnode cert issue --gateway`")]
    NotAGateway { identity: String },
    #[error("upstream[{index}].as: {identity} may not act as service {service:?}: its certificate names {names}; issue one that does with `meshnode cert issue --service {service}` (or join with a token from `meshnode token create --services {service}`)")]
    ActAs {
        index: usize,
        service: String,
        identity: String,
        names: String,
    },
    #[error("advertise: cannot detect an address other nodes can reach (bind is {bind}); set advertise = \"IP:PORT\"")]
    Advertise { bind: SocketAddr },
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("cannot bind {what} on tcp {addr}: {source}")]
    Bind {
        what: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Gossip(#[from] meshnode_gossip::GossipError),
    #[error("ca: {0}")]
    Ca(#[from] CaError),
    #[error("data_dir: {0}")]
    Lock(#[from] crate::lock::LockError),
    #[error("cannot write {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// Where the ttl checks' tokens go, in the data dir.
pub const CHECK_TOKENS_DIR: &str = "checks";

impl AppError {
    /// Errors the operator fixes in the config or its files (CLI exit code 64).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            AppError::Tls(_)
                | AppError::IdentityMismatch { .. }
                | AppError::Advertise { .. }
                | AppError::NotAGateway { .. }
                | AppError::ActAs { .. }
                | AppError::Ca(_)
                | AppError::Lock(_)
        )
    }
}

/// A node whose sockets are open.
pub struct Bound {
    pub quic_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub upstream_addrs: Vec<SocketAddr>,
    /// The DNS interface's address (UDP and TCP), when `[dns]` is set.
    pub dns_addr: Option<SocketAddr>,
    pub identity: PeerCert,
    endpoint: Endpoint,
    gossip: GossipHandle,
    wan: Option<GossipHandle>,
    has_seeds: bool,
    drain: Drain,
    leave: Arc<Notify>,
    reloader: Arc<crate::reload::Reloader>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Held until the process exits.
    _lock: crate::lock::DataDirLock,
}

/// Loads the node's certificate, CA and key and checks them against the
/// config: the chain, the names in the certificate, the gateway role, the
/// key file's mode (refused when group or others can read it). `build` starts with it, and `meshnode validate` runs it too, so a
/// config that validates also starts.
pub fn check_credentials(cfg: &Config) -> Result<Arc<TlsMaterial>, AppError> {
    let tls = Arc::new(TlsMaterial::load(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)?);
    let me = tls.me();
    for (key, config, cert) in [
        ("mesh", &cfg.mesh, me.identity.mesh()),
        ("cluster", &cfg.cluster, me.identity.cluster()),
        ("node", &cfg.node, me.identity.node()),
    ] {
        if config != cert {
            return Err(AppError::IdentityMismatch {
                key,
                config: config.clone(),
                cert: cert.to_string(),
                identity: me.identity.to_string(),
            });
        }
    }
    if cfg.gateway && !me.is_gateway() {
        return Err(AppError::NotAGateway {
            identity: me.identity.to_string(),
        });
    }
    check_act_as(cfg, &me)?;
    Ok(tls)
}

/// Every upstream's `as` must be a service the certificate names (at start
/// and at every reload).
pub fn check_act_as(cfg: &Config, me: &PeerCert) -> Result<(), AppError> {
    for (index, up) in cfg.upstreams.iter().enumerate() {
        if let Some(service) = up.as_service.as_deref().filter(|s| !me.may_act_as(s)) {
            return Err(AppError::ActAs {
                index,
                service: service.to_string(),
                identity: me.identity.to_string(),
                names: if me.services.is_empty() {
                    "no service".to_string()
                } else {
                    me.services.join(", ")
                },
            });
        }
    }
    Ok(())
}

/// The service an upstream's callers act as: its `as`, else the
/// certificate's only service, else none (the node alone).
pub fn acting_as(up: &crate::config::UpstreamConfig, me: &PeerCert) -> Option<String> {
    match (&up.as_service, me.services.as_slice()) {
        (Some(s), _) => Some(s.clone()),
        (None, [only]) => Some(only.clone()),
        (None, _) => None,
    }
}

/// What the process around the node gives it.
#[derive(Default)]
pub struct Hooks {
    pub metrics: Option<PrometheusHandle>,
    /// The config file, which a reload reads again.
    pub config_path: Option<std::path::PathBuf>,
    /// Changes the process's log filter at a reload.
    pub log: Option<crate::reload::LogControl>,
}

pub async fn build(cfg: Config, hooks: Hooks) -> Result<Bound, AppError> {
    let Hooks {
        metrics,
        config_path,
        log,
    } = hooks;
    // Before anything touches the data dir or the pool: a second agent on the
    // same dir would take over this node's member entry.
    let lock = crate::lock::acquire(&cfg.data_dir)?;
    let tls = check_credentials(&cfg)?;
    let me = tls.me();
    let ca = match &cfg.ca {
        Some(settings) => Some(Arc::new(CaNode::open(
            settings,
            &cfg.tls.ca,
            &cfg.data_dir,
        )?)),
        None => None,
    };
    let (node_key, _) =
        meshnode_transport::pki::read_private_key(&cfg.tls.key).map_err(TlsError::from)?;
    let signer = Arc::new(
        meshnode_transport::pki::sign::NodeSigner::from_pem(&node_key).map_err(TlsError::from)?,
    );
    let node_key = NodeKey::from_pem(&node_key).map_err(TlsError::from)?;
    let cert_der = tls.cert_der().to_vec();
    let authority: Arc<dyn meshnode_gossip::Authority> = tls.clone();
    let limits = meshnode_gossip::wire::Limits {
        max_nodes: cfg.gossip.max_members,
        ..Default::default()
    };
    let (endpoint, incoming) = Endpoint::bind(EndpointConfig {
        bind: cfg.bind,
        tls: tls.clone(),
    })?;
    let quic_addr = endpoint.local_addr().map_err(|source| AppError::Bind {
        what: "QUIC".into(),
        addr: cfg.bind,
        source,
    })?;
    let advertise = match cfg.advertise {
        Some(a) => a,
        None => {
            // A cluster's first gateway has no LAN seed: its WAN seeds still tell the route.
            let toward: Vec<SocketAddr> = cfg.seeds.iter().chain(&cfg.wan_seeds).copied().collect();
            detect_advertise(quic_addr, &toward).ok_or(AppError::Advertise { bind: cfg.bind })?
        }
    };
    let generation = meshnode_transport::clock::wall()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let services_cfg = cfg.services.clone();
    let tuning = Tuning {
        interval: cfg.gossip.interval,
        phi_threshold: cfg.gossip.phi_threshold,
        ..Tuning::default()
    };
    let gossip_cfg = GossipConfig {
        me: me.identity.clone(),
        kind: PoolKind::Lan {
            cluster: me.identity.cluster().to_string(),
        },
        generation,
        advertise,
        gateway: cfg.gateway,
        seeds: cfg
            .seeds
            .iter()
            .copied()
            .filter(|s| *s != advertise)
            .collect(),
        services: Vec::new(),
        tuning: tuning.clone(),
        signer: signer.clone(),
        cert_der: cert_der.clone(),
    };
    // Publish instances through the registry, so initial health is right from the first round.
    let kind = gossip_cfg.kind.clone();
    let guard = gossip_cfg.guard(authority.clone(), limits);
    let transport = QuicTransport::new(
        endpoint.clone(),
        incoming.gossip,
        kind,
        guard,
        gossip_cfg.dictionary(),
    );
    let probing = transport.probing();
    let gossip = GossipHandle::spawn(gossip_cfg, &transport, probing).await?;
    let mut tasks = Vec::new();

    // Gateways also join the WAN pool of all gateways, on the same endpoint.
    let (wan, wan_view): (Option<GossipHandle>, Option<watch::Receiver<Arc<WanView>>>) =
        if cfg.gateway {
            let wan_advertise = cfg.wan_advertise.unwrap_or(advertise);
            let wan_cfg = GossipConfig {
                me: me.identity.clone(),
                kind: PoolKind::Wan,
                generation,
                advertise: wan_advertise,
                gateway: true,
                seeds: cfg
                    .wan_seeds
                    .iter()
                    .copied()
                    .filter(|s| *s != wan_advertise)
                    .collect(),
                services: Vec::new(),
                tuning: tuning.clone(),
                signer: signer.clone(),
                cert_der: cert_der.clone(),
            };
            let guard = wan_cfg.guard(authority.clone(), limits);
            let transport = QuicTransport::new(
                endpoint.clone(),
                incoming.wan,
                PoolKind::Wan,
                guard,
                wan_cfg.dictionary(),
            );
            let probing = transport.probing();
            let wan = GossipHandle::spawn(wan_cfg, &transport, probing).await?;
            let (view, task) = federation::spawn(
                gossip.clone(),
                wan.clone(),
                endpoint.clone(),
                me.identity.cluster().to_string(),
            );
            tasks.push(task);
            (Some(wan), Some(view))
        } else {
            tasks.push(tokio::spawn(refuse_wan(incoming.wan)));
            (None, None)
        };
    let registry = Arc::new(Registry::new(&services_cfg, gossip.clone()));
    registry.publish().await?;
    registry
        .write_check_tokens(&services_cfg, &cfg.data_dir.join(CHECK_TOKENS_DIR))
        .map_err(|source| AppError::Io {
            what: "check tokens".into(),
            source,
        })?;
    if let Some(ca) = &ca {
        // The CA role is proven by the CA key's signature over this node's id,
        // so no other member can claim it (the gate checks it).
        let proof = ca.sign_role(&me.identity.uri())?;
        gossip
            .publish_prefixed(ROLE_PREFIX, [(CA_ROLE_KEY.to_string(), proof)].into())
            .await;
    }
    let revocations = Arc::new(Revocations {
        tls: tls.clone(),
        path: cfg.data_dir.join(crate::revocations::FILE),
        lan: gossip.clone(),
        wan: wan.clone(),
        origins: Default::default(),
    });
    // Persisted revocations are in force before the first peer is admitted.
    revocations.load();
    tasks.push(tokio::spawn(revocations.clone().run()));
    let policy = Arc::new(crate::policy::PolicyAgent {
        store: Arc::new(crate::policy::PolicyStore::default()),
        tls: tls.clone(),
        path: cfg.data_dir.join(crate::policy::FILE),
        lan: gossip.clone(),
        wan: wan.clone(),
        bootstrap: cfg.seeds.iter().all(|s| *s == advertise),
        origins: Default::default(),
    });
    // After the revocations: a document its signer signed after being revoked is refused.
    policy.load();
    tasks.push(tokio::spawn(policy.clone().run()));
    let join_svc = Arc::new(JoinService {
        ca: ca.clone(),
        endpoint: endpoint.clone(),
        gossip: gossip.clone(),
        wan: wan.clone(),
        advertise,
    });
    tasks.push(tokio::spawn(join::serve(incoming.join, join_svc.clone())));
    tasks.push(tokio::spawn(
        Renewer {
            svc: join_svc,
            key: node_key,
            cert_path: cfg.tls.cert.clone(),
            wan: wan.clone(),
        }
        .run(),
    ));
    let admin_secret = write_admin_secret(&cfg.data_dir)?;

    let drain = Drain::default();
    let e2e = meshnode_transport::tunnel::e2e::E2e::new(&tls)?;
    let authz = crate::authz::Authorizer::follow(policy.store.clone());
    let dialer = Arc::new(
        Dialer::new(
            endpoint.clone(),
            (cfg.cross_cluster_identity == CrossClusterIdentity::EndToEnd).then(|| e2e.clone()),
            gossip.clone(),
            me.identity.cluster(),
        )
        .with_routes(crate::policy::follow(
            policy.store.clone(),
            crate::routes::Routes::from_store,
        ))
        .with_resilience(crate::policy::follow(
            policy.store.clone(),
            crate::resilience::Policies::from_store,
        ))
        .with_telemetry(Arc::new(
            crate::telemetry::Telemetry::new(
                &cfg.node,
                &cfg.cluster,
                cfg.telemetry.access_log,
                cfg.telemetry.access_log_rate,
            )
            .with_identity(me.identity.to_string())
            .with_tracer(match cfg.telemetry.otlp_endpoint.as_deref() {
                // Validated with the config; a URL that fails here exports nothing.
                Some(e) => match crate::trace::traces_url(e) {
                    Ok(url) => crate::trace::Tracer::start(url, &cfg.node, &cfg.cluster),
                    Err(_) => crate::trace::Tracer::disabled(),
                },
                None => crate::trace::Tracer::disabled(),
            }),
        )),
    );
    tasks.push(tokio::spawn(inbound::serve(
        incoming.tunnel,
        Arc::new(Inbound {
            registry: registry.clone(),
            drain: drain.clone(),
            me: me.clone(),
            gateway: cfg.gateway,
            endpoint: endpoint.clone(),
            lan: gossip.clone(),
            wan: wan_view,
            authz: authz.clone(),
            e2e: e2e.clone(),
            trust_carried: cfg.cross_cluster_identity == CrossClusterIdentity::Gateway,
            apps: Arc::new(crate::http::AppPool::default()),
            dialer: dialer.clone(),
            limiters: Arc::default(),
            policy_loaded: {
                let policy = policy.clone();
                Arc::new(move || policy.loaded())
            },
        }),
    )));

    let mut upstream_addrs = Vec::new();
    let mut listeners = Vec::new();
    for up in &cfg.upstreams {
        let listener = TcpListener::bind(up.listen)
            .await
            .map_err(|source| AppError::Bind {
                what: format!("upstream {}", up.service),
                addr: up.listen,
                source,
            })?;
        upstream_addrs.push(listener.local_addr().unwrap_or(up.listen));
        listeners.push(listener);
    }
    let has_seeds = !cfg.seeds.iter().all(|s| *s == advertise);
    let admin_bind = cfg.admin;
    let admin_allow_remote = cfg.admin_allow_remote;
    let dns_settings = cfg.dns.clone();
    let reloader = crate::reload::Reloader::start(
        cfg,
        listeners,
        crate::reload::Parts {
            source: config_path,
            registry: registry.clone(),
            dialer: dialer.clone(),
            drain: drain.clone(),
            tls: tls.clone(),
            log,
        },
    )?;

    let dns_addr = match &dns_settings {
        Some(d) => {
            let running = crate::dns::server::start(
                d,
                gossip.clone(),
                reloader.clone(),
                me.identity.cluster().to_string(),
                me.identity.node().to_string(),
            )
            .await
            .map_err(|source| AppError::Bind {
                what: "DNS interface".into(),
                addr: d.listen,
                source,
            })?;
            tasks.extend(running.tasks);
            Some(running.addr)
        }
        None => None,
    };

    let admin_listener = TcpListener::bind(admin_bind)
        .await
        .map_err(|source| AppError::Bind {
            what: "admin API".into(),
            addr: admin_bind,
            source,
        })?;
    let admin_addr = admin_listener.local_addr().unwrap_or(admin_bind);
    let leave = Arc::new(Notify::new());
    let state = Arc::new(AdminState {
        gossip: gossip.clone(),
        wan: wan.clone(),
        tls: tls.clone(),
        ca,
        revocations,
        policy,
        access: crate::admin::Access {
            addr: admin_addr,
            remote: admin_allow_remote,
            secret: admin_secret,
        },
        refusal_log: crate::metrics::LogLimit::new(Duration::from_secs(10)),
        has_seeds,
        registry: registry.clone(),
        reloader: reloader.clone(),
        authz,
        dialer: dialer.clone(),
        drain: drain.clone(),
        metrics,
        leave: leave.clone(),
    });
    tasks.push(tokio::spawn(admin::serve(admin_listener, state)));
    tasks.push(tokio::spawn(cert_expiry_gauge(tls.clone())));

    info!(identity = %me.identity, quic = %quic_addr, %advertise, admin = %admin_addr, "node up");
    Ok(Bound {
        quic_addr,
        admin_addr,
        upstream_addrs,
        dns_addr,
        identity: me,
        endpoint,
        gossip,
        wan,
        has_seeds,
        drain,
        leave,
        reloader,
        tasks,
        _lock: lock,
    })
}

impl Bound {
    /// Applies config reloads (SIGHUP; `POST /v1/reload` uses the same one).
    pub fn reloader(&self) -> Arc<crate::reload::Reloader> {
        self.reloader.clone()
    }

    /// Serves until `shutdown` resolves or `POST /v1/leave` arrives, then leaves
    /// the pool, drains open streams (up to [`DRAIN_DEADLINE`]) and closes.
    ///
    /// If a gossip pool's task ends on its own, the node stops its watchdog
    /// and returns the reason at once: gossip death is process death, so
    /// systemd restarts it.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), String> {
        let notifier = crate::notify::Notifier::from_env().map(Arc::new);
        let mut notify_tasks = Vec::new();
        if let Some(n) = &notifier {
            notify_tasks.push(tokio::spawn(notify_ready(
                n.clone(),
                self.gossip.clone(),
                self.has_seeds,
                self.identity.identity.node().to_string(),
            )));
            if let Some(every) = crate::notify::watchdog_interval() {
                notify_tasks.push(tokio::spawn(watchdog(
                    n.clone(),
                    self.gossip.clone(),
                    every,
                )));
            }
        }
        let wan_ended = async {
            match &self.wan {
                Some(wan) => wan.ended().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown => info!("shutdown requested"),
            () = self.leave.notified() => info!("leave requested"),
            why = self.gossip.ended() => return Err(self.died("LAN", why, &notify_tasks)),
            why = wan_ended => return Err(self.died("WAN", why, &notify_tasks)),
        }
        if let Some(n) = &notifier {
            n.send("STOPPING=1\nSTATUS=leaving the pool and draining");
        }
        match &self.wan {
            Some(wan) => {
                tokio::join!(self.gossip.leave(), wan.leave());
            }
            None => self.gossip.leave().await,
        }
        let left_open = self.drain.drain(DRAIN_DEADLINE).await;
        if left_open > 0 {
            warn!(
                streams = left_open,
                "drain deadline passed; closing open streams"
            );
        }
        for t in self.tasks.iter().chain(&notify_tasks) {
            t.abort();
        }
        self.reloader.abort().await;
        self.gossip.shutdown().await;
        if let Some(wan) = &self.wan {
            wan.shutdown().await;
        }
        self.endpoint.close();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        info!("stopped");
        Ok(())
    }

    fn died(&self, pool: &str, why: String, notify: &[tokio::task::JoinHandle<()>]) -> String {
        // The watchdog stops first: systemd must not hear WATCHDOG=1 again.
        for t in notify.iter().chain(&self.tasks) {
            t.abort();
        }
        self.endpoint.close();
        let msg = format!("the {pool} gossip pool stopped ({why}); exiting so the node restarts");
        tracing::error!("{msg}");
        msg
    }
}

/// `READY=1` once the node has joined its pool: another live member seen, or
/// no seeds to join (the first node).
async fn notify_ready(
    n: Arc<crate::notify::Notifier>,
    gossip: GossipHandle,
    has_seeds: bool,
    me: String,
) {
    loop {
        let members = gossip.members().await;
        if crate::admin::has_joined(has_seeds, &me, &members) {
            let alive = members
                .iter()
                .filter(|m| m.state == meshnode_gossip::MemberState::Alive)
                .count();
            n.send(&format!("READY=1\nSTATUS=joined; {alive} alive member(s)"));
            info!(alive, "ready (sd_notify)");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `WATCHDOG=1` while gossip answers: a wedged runtime or gossip loop stops the
/// pings and systemd restarts the node.
async fn watchdog(n: Arc<crate::notify::Notifier>, gossip: GossipHandle, every: Duration) {
    loop {
        if tokio::time::timeout(every, gossip.members()).await.is_ok() {
            n.send("WATCHDOG=1");
        } else {
            warn!("gossip did not answer within the watchdog interval; not pinging systemd");
        }
        tokio::time::sleep(every).await;
    }
}

/// The address peers should use: the bound one, or, when bound to 0.0.0.0,
/// the local address the kernel would use to reach the first seed.
fn detect_advertise(bound: SocketAddr, seeds: &[SocketAddr]) -> Option<SocketAddr> {
    if !bound.ip().is_unspecified() {
        return Some(bound);
    }
    let seed = seeds.first()?;
    let probe = UdpSocket::bind((bound.ip(), 0)).ok()?;
    probe.connect(seed).ok()?;
    let ip = probe.local_addr().ok()?.ip();
    Some(SocketAddr::new(ip, bound.port()))
}

/// Only gateways take part in the WAN pool.
async fn refuse_wan(mut incoming: tokio::sync::mpsc::Receiver<meshnode_transport::Accepted>) {
    while let Some(a) = incoming.recv().await {
        a.conn
            .close(quinn::VarInt::from_u32(0x20), b"this node is not a gateway");
    }
}

/// A fresh secret for the state-changing endpoints of the admin API,
/// readable by the node's user only: `meshnode leave`, `token create` and
/// `cert revoke` read it from the data dir, so other local users (and web
/// pages in a local browser) cannot make the node leave or mint tokens.
fn write_admin_secret(data_dir: &std::path::Path) -> Result<String, AppError> {
    use rand::RngExt;
    let secret = meshnode_transport::pki::hex(&rand::rng().random::<[u8; 32]>());
    let path = data_dir.join(crate::admin::SECRET_FILE);
    meshnode_transport::pki::write_atomic(&path, secret.as_bytes(), 0o600)
        .map_err(TlsError::from)?;
    Ok(secret)
}

async fn cert_expiry_gauge(tls: Arc<TlsMaterial>) {
    let ca_not_after = tls.ca_not_after();
    loop {
        let now = meshnode_transport::pki::unix_now();
        metrics::gauge!(CERT_EXPIRY_SECONDS).set((tls.me().not_after - now) as f64);
        if let Some(ca) = ca_not_after {
            metrics::gauge!(CA_EXPIRY_SECONDS).set((ca - now) as f64);
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}
