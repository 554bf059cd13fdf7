//! Serving `meshnode-join/1`: a CA node signs; any other node relays the
//! request toward a live CA node and relays the answer back. The joiner's
//! private key never leaves its machine: only a CSR travels.
//!
//! Where a request goes ([`next_hop`], pure), by who sent it:
//! 1. a live CA node of the own pool (proven by `role:ca`), from anyone;
//! 2. else, on a gateway, a gateway of another cluster that fronts a CA
//!    node of its own (its WAN `ca_via`, proven by the same CA signature),
//!    unless the request came from another cluster (so it crosses the WAN
//!    at most once and never loops between gateways);
//! 3. else, on a plain node, a gateway of the own pool, for a request of
//!    its own (a renewal) or a joiner's (never one relayed by a member).
//!
//! So a join or renewal in a cluster without a CA node takes at most three
//! relays: node, its gateway, the CA cluster's gateway, the CA node.

use std::sync::Arc;
use std::time::Duration;

use meshnode_gossip::catalog::{ca_fronts, ca_nodes};
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
/// How long a relay waits for a way to a CA node to appear (the joiner
/// waits 20 s for its answer: 3 s here and 10 s per hop fit).
const ROUTE_WAIT: Duration = Duration::from_secs(3);
const ROUTE_POLL: Duration = Duration::from_millis(200);
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
    /// Gateways: the WAN pool, where gateways fronting a CA node say so.
    pub wan: Option<GossipHandle>,
    pub advertise: std::net::SocketAddr,
}

/// Who handed a request to this node.
#[derive(Clone, Copy, Debug)]
pub enum Origin<'a> {
    /// This node's own (a renewal).
    Local,
    /// A machine without a certificate (a joiner).
    Anonymous,
    /// A member, relaying or renewing.
    Member(&'a meshnode_transport::PeerCert),
}

/// Where [`next_hop`] sends a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    /// A CA node of the own pool.
    Ca,
    /// A gateway of another cluster that fronts a CA node (over the WAN).
    CaFront,
    /// A gateway of the own pool.
    Gateway,
    /// Nowhere: refuse `no_ca`.
    None,
}

/// The relay rule (module docs). Pure.
pub fn next_hop(origin: Origin<'_>, me: &meshnode_transport::PeerCert, has_ca: bool) -> Hop {
    if has_ca {
        return Hop::Ca;
    }
    let foreign =
        matches!(origin, Origin::Member(p) if p.identity.cluster() != me.identity.cluster());
    match (me.is_gateway(), origin) {
        (true, _) if !foreign => Hop::CaFront,
        (false, Origin::Local | Origin::Anonymous) => Hop::Gateway,
        _ => Hop::None,
    }
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
            Ok(req) => {
                let origin = match &jc.peer {
                    Some(p) => Origin::Member(p),
                    None => Origin::Anonymous,
                };
                svc.handle(&req, origin).await
            }
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
    /// this node's own certificate come through here too (`Origin::Local`).
    pub async fn handle(&self, req: &Request, origin: Origin<'_>) -> Response {
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
        let mut resp = self.relay(req, origin).await;
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

    /// Where [`next_hop`] leads now: the hop and its live candidates.
    async fn route(
        &self,
        origin: Origin<'_>,
    ) -> (Hop, Vec<(String, std::net::SocketAddr)>, &'static str) {
        let cas = ca_nodes(&self.gossip.snapshot().await);
        let me = self.endpoint.me();
        let hop = next_hop(origin, &me, !cas.is_empty());
        let (targets, what): (Vec<(String, std::net::SocketAddr)>, &str) = match hop {
            Hop::Ca => (cas, "CA node"),
            Hop::CaFront => {
                let fronts = match &self.wan {
                    Some(wan) => ca_fronts(&wan.snapshot().await),
                    None => Vec::new(),
                };
                let own = format!("{}/", me.identity.cluster());
                let fronts: Vec<_> = fronts
                    .into_iter()
                    .filter(|(name, _)| !name.starts_with(&own))
                    .collect();
                (fronts, "gateway fronting a CA node")
            }
            Hop::Gateway => {
                let gateways = self
                    .gossip
                    .members()
                    .await
                    .into_iter()
                    .filter(|m| m.gateway && m.state == MemberState::Alive)
                    .filter(|m| m.node != me.identity.node())
                    .map(|m| (m.node, m.addr))
                    .collect();
                (gateways, "gateway")
            }
            Hop::None => (Vec::new(), ""),
        };
        (hop, targets, what)
    }

    /// Relays along [`next_hop`], trying the candidates one after the other.
    /// A node that knows no way yet waits up to [`ROUTE_WAIT`] for one: right
    /// after a gateway starts, its pools list peers before their values
    /// (a CA node's role, a gateway's `ca_via`) arrive.
    async fn relay(&self, req: &Request, origin: Origin<'_>) -> Response {
        let deadline = meshnode_transport::clock::tokio_now() + ROUTE_WAIT;
        let (hop, targets, what) = loop {
            let found = self.route(origin).await;
            if !found.1.is_empty() || meshnode_transport::clock::tokio_now() >= deadline {
                break found;
            }
            tokio::time::sleep(ROUTE_POLL).await;
        };
        if targets.is_empty() {
            let why = match hop {
                Hop::Ca | Hop::None => "no node holding the CA key is live in this cluster's pool, and no relay leads to one".to_string(),
                Hop::CaFront => "no node holding the CA key is live in this cluster's pool, and no gateway of another cluster fronts one (is a CA node live there, and the WAN pool formed?)".to_string(),
                Hop::Gateway => "no node holding the CA key is live in this cluster's pool, and it has no live gateway to relay to another cluster".to_string(),
            };
            return Response::refused(Refusal::NoCa, why);
        }
        let mut last = String::new();
        for (name, addr) in targets {
            match self.endpoint.connect(addr, Alpn::Join).await {
                Ok((conn, _)) => match join::call(&conn, req, RELAY_TIMEOUT).await {
                    Ok(resp) => {
                        info!(to = %name, via = what, "join request relayed");
                        return resp;
                    }
                    Err(e) => {
                        self.endpoint.forget(addr, Alpn::Join);
                        last = format!("{name}: {e}");
                    }
                },
                Err(e) => last = format!("{name}: {e}"),
            }
            warn!(to = %name, via = what, error = %last, "a relayed join request got no answer");
        }
        Response::refused(Refusal::NoCa, format!("no {what} answered ({last})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshnode_transport::pki::{Ca, Role};

    fn cert(ca: &Ca, cluster: &str, node: &str, role: Role) -> meshnode_transport::PeerCert {
        let issued = ca
            .issue(cluster, node, role, std::time::Duration::from_secs(3600))
            .unwrap_or_else(|e| panic!("issue: {e}"));
        let der = meshnode_transport::pki::first_cert_der(&issued.cert_pem)
            .unwrap_or_else(|e| panic!("pem: {e}"));
        meshnode_transport::PeerCert::from_der(&der).unwrap_or_else(|e| panic!("parse: {e}"))
    }

    #[test]
    fn a_request_crosses_the_wan_at_most_once_and_never_loops() {
        let ca = Ca::generate("acme", std::time::Duration::from_secs(86_400))
            .unwrap_or_else(|e| panic!("{e}"));
        let west_node = cert(&ca, "west", "w1", Role::Node);
        let west_gw = cert(&ca, "west", "wgw", Role::Gateway);
        let east_gw = cert(&ca, "east", "egw", Role::Gateway);
        // A CA node in the pool wins, from anyone.
        for origin in [Origin::Local, Origin::Anonymous, Origin::Member(&west_gw)] {
            assert_eq!(next_hop(origin, &east_gw, true), Hop::Ca);
            assert_eq!(next_hop(origin, &west_node, true), Hop::Ca);
        }
        // West has no CA node: the node goes to its gateway, the gateway over the WAN.
        assert_eq!(next_hop(Origin::Anonymous, &west_node, false), Hop::Gateway);
        assert_eq!(next_hop(Origin::Local, &west_node, false), Hop::Gateway);
        assert_eq!(
            next_hop(Origin::Member(&west_node), &west_gw, false),
            Hop::CaFront
        );
        assert_eq!(next_hop(Origin::Anonymous, &west_gw, false), Hop::CaFront);
        // A member's relay never goes to another plain node's gateway again.
        assert_eq!(
            next_hop(Origin::Member(&west_gw), &west_node, false),
            Hop::None
        );
        // A gateway that lost its CA node does not send another cluster's request on.
        assert_eq!(
            next_hop(Origin::Member(&west_gw), &east_gw, false),
            Hop::None
        );
    }
}
