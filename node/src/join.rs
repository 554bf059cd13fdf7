//! Serving `meshnode-join/1`: a CA node signs; any other node relays the
//! request to a live CA node of its pool and relays the answer back. The
//! joiner's private key never leaves its machine: only a CSR travels.

use std::sync::Arc;
use std::time::Duration;

use meshnode_gossip::catalog::ca_nodes;
use meshnode_gossip::signed::{decode_cert, CERT_KEY};
use meshnode_gossip::{GossipHandle, MemberState};
use meshnode_transport::alpn::Alpn;
use meshnode_transport::join::{self, Refusal, Request, Response};
use meshnode_transport::{Endpoint, Identity, JoinConn};
use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, info, warn};

use crate::join_slots::{Admit, Slots};
use crate::metrics::{LogLimit, JOIN_CONNECTIONS_REFUSED};

use crate::ca::{CaNode, PoolView};
use crate::metrics::JOIN_REQUESTS;

/// Requests handled at once for machines without a certificate (joins).
const CONCURRENT_ANONYMOUS: usize = 8;
/// Requests handled at once for members (renewals, relayed joins): a share
/// of their own, so a flood of anonymous requests cannot starve renewals.
const CONCURRENT_MEMBERS: usize = 8;
/// Streams one connection may open.
const REQUESTS_PER_CONN: usize = 8;
/// A relayed request waits this long for the CA node.
const RELAY_TIMEOUT: Duration = Duration::from_secs(10);
/// Anonymous connections per source address, and in all.
pub const ANONYMOUS_PER_SOURCE: usize = 8;
pub const ANONYMOUS_TOTAL: usize = 256;
/// An anonymous connection is closed this long after its handshake, whatever
/// it is doing: a join is one request and answer.
pub const ANONYMOUS_DEADLINE: Duration = Duration::from_secs(30);

pub struct JoinService {
    pub ca: Option<Arc<CaNode>>,
    pub endpoint: Endpoint,
    pub gossip: GossipHandle,
    pub advertise: std::net::SocketAddr,
}

pub async fn serve(mut incoming: mpsc::Receiver<JoinConn>, svc: Arc<JoinService>) {
    let anonymous = Arc::new(Semaphore::new(CONCURRENT_ANONYMOUS));
    let members = Arc::new(Semaphore::new(CONCURRENT_MEMBERS));
    let slots = Arc::new(Mutex::new(Slots::new(
        ANONYMOUS_PER_SOURCE,
        ANONYMOUS_TOTAL,
    )));
    // Admitted anonymous connections by slot id, so an eviction can close one.
    let open: Arc<Mutex<HashMap<u64, quinn::Connection>>> = Arc::default();
    while let Some(jc) = incoming.recv().await {
        let remote = jc.conn.remote_address();
        let slot = if jc.peer.is_none() {
            let (verdict, id) = lock(&slots).admit(remote.ip());
            match verdict {
                Admit::Yes => {}
                Admit::Evict(old) => {
                    if let Some(c) = lock(&open).remove(&old) {
                        c.close(quinn::VarInt::from_u32(CLOSE_BUSY), b"busy");
                    }
                    refused("evicted");
                }
                Admit::PerSource | Admit::Full => {
                    let reason = if verdict == Admit::PerSource {
                        "per_source"
                    } else {
                        "full"
                    };
                    refused(reason);
                    if REFUSED_LOG.allow() {
                        info!(%remote, reason, "anonymous join connection refused (logged at most once per 10 s; see meshnode_join_connections_refused_total)");
                    }
                    jc.conn.close(quinn::VarInt::from_u32(CLOSE_BUSY), b"busy");
                    continue;
                }
            }
            if let Some(id) = id {
                lock(&open).insert(id, jc.conn.clone());
            }
            id
        } else {
            None
        };
        let svc = svc.clone();
        let permits = if jc.peer.is_some() {
            members.clone()
        } else {
            anonymous.clone()
        };
        let (slots, open) = (slots.clone(), open.clone());
        tokio::spawn(async move {
            let conn = jc.conn.clone();
            let work = serve_conn(jc, svc, permits, slot.map(|id| (id, slots.clone())));
            if slot.is_some() {
                if tokio::time::timeout(ANONYMOUS_DEADLINE, work)
                    .await
                    .is_err()
                {
                    debug!(%remote, "anonymous join connection reached its deadline");
                }
            } else {
                work.await;
            }
            conn.close(quinn::VarInt::from_u32(0), b"done");
            if let Some(id) = slot {
                lock(&slots).remove(id);
                lock(&open).remove(&id);
            }
        });
    }
}

/// Close code for join connections refused or evicted for lack of room.
const CLOSE_BUSY: u32 = 0x42;

static REFUSED_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));

fn refused(reason: &'static str) {
    metrics::counter!(JOIN_CONNECTIONS_REFUSED, "reason" => reason).increment(1);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn serve_conn(
    jc: JoinConn,
    svc: Arc<JoinService>,
    permits: Arc<Semaphore>,
    slot: Option<(u64, Arc<Mutex<Slots>>)>,
) {
    let remote = jc.conn.remote_address();
    for _ in 0..REQUESTS_PER_CONN {
        let Ok((mut send, mut recv)) = jc.conn.accept_bi().await else {
            return;
        };
        if let Some((id, slots)) = &slot {
            lock(slots).busy(*id);
        }
        let Ok(_permit) = permits.acquire().await else {
            return;
        };
        let resp = match join::read_request(&mut recv).await {
            Ok(req) => svc.handle(&req).await,
            Err(e) => Response::refused(Refusal::Malformed, e.to_string()),
        };
        let (kind, result) = match &resp {
            Response::Issued { .. } => ("issued", "ok"),
            Response::Refused { reason, .. } => ("refused", reason.as_str()),
        };
        metrics::counter!(JOIN_REQUESTS, "result" => result).increment(1);
        debug!(%remote, member = jc.peer.is_some(), kind, result, "join request");
        if let Err(e) = join::respond(&mut send, &resp).await {
            debug!(%remote, error = %e, "join answer not delivered");
        }
    }
    jc.conn
        .close(quinn::VarInt::from_u32(0), b"too many requests");
}

impl JoinService {
    /// Answers a request: signs on a CA node, relays elsewhere. Renewals of
    /// this node's own certificate come through here too.
    pub async fn handle(&self, req: &Request) -> Response {
        let pool = self.pool_view().await;
        if let Some(ca) = &self.ca {
            let ca = ca.clone();
            let req = req.clone();
            let tls = self.endpoint.tls().clone();
            // Signing is CPU work and touches files: keep it off the reactor.
            return tokio::task::spawn_blocking(move || ca.handle(&req, &pool, &tls))
                .await
                .unwrap_or_else(|e| Response::refused(Refusal::Internal, e.to_string()));
        }
        // A relay checks the name against its own pool before it bothers the CA.
        if let Request::Join { node, cluster, .. } = req {
            let same_cluster = cluster.as_deref().is_none_or(|c| c == pool.cluster);
            if same_cluster && pool.live.iter().any(|n| n == node) {
                return Response::refused(
                    Refusal::NameTaken,
                    format!("node name {node:?} is taken by a live member of cluster {:?}; choose another with --node", pool.cluster),
                );
            }
        }
        let mut resp = self.relay(req).await;
        // The CA node may be in another cluster; seeds come from our own pool.
        if let Response::Issued {
            identity, seeds, ..
        } = &mut resp
        {
            let ours = identity
                .parse::<Identity>()
                .is_ok_and(|i| i.cluster() == pool.cluster);
            if seeds.is_empty() && ours {
                *seeds = pool.addrs.clone();
            }
        }
        resp
    }

    async fn pool_view(&self) -> PoolView {
        let members = self.gossip.members().await;
        let me = self.endpoint.me();
        let alive: Vec<_> = members
            .iter()
            .filter(|m| m.state == MemberState::Alive)
            .collect();
        let mut addrs: Vec<_> = alive.iter().map(|m| m.addr).collect();
        if !addrs.contains(&self.advertise) {
            addrs.insert(0, self.advertise);
        }
        addrs.truncate(5);
        // Only a CA node checks identities against the certificates in gossip.
        let certs = if self.ca.is_some() {
            self.gossip
                .snapshot()
                .await
                .iter()
                .filter_map(|n| n.kvs.get(CERT_KEY).and_then(|c| decode_cert(c)))
                .collect()
        } else {
            Vec::new()
        };
        PoolView {
            cluster: me.identity.cluster().to_string(),
            live: alive.iter().map(|m| m.node.clone()).collect(),
            addrs,
            certs,
        }
    }

    /// Relays to the live CA nodes of our pool, one after the other.
    async fn relay(&self, req: &Request) -> Response {
        let cas = ca_nodes(&self.gossip.snapshot().await);
        if cas.is_empty() {
            return Response::refused(
                Refusal::NoCa,
                "no node holding the CA key is live in this cluster's pool",
            );
        }
        let mut last = String::new();
        for (name, addr) in cas {
            match self.endpoint.connect(addr, Alpn::Join).await {
                Ok((conn, _)) => match join::call(&conn, req, RELAY_TIMEOUT).await {
                    Ok(resp) => {
                        info!(ca = %name, "join request relayed");
                        return resp;
                    }
                    Err(e) => {
                        self.endpoint.forget(addr, Alpn::Join);
                        last = format!("{name}: {e}");
                    }
                },
                Err(e) => last = format!("{name}: {e}"),
            }
            warn!(ca = %name, error = %last, "CA node did not answer a relayed join request");
        }
        Response::refused(Refusal::NoCa, format!("no CA node answered ({last})"))
    }
}
