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
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, info, warn};

use crate::ca::{CaNode, PoolView};
use crate::metrics::JOIN_REQUESTS;

/// Requests handled at once by this node; more wait. Anonymous clients can
/// reach this protocol, so its cost is bounded.
const CONCURRENT: usize = 16;
/// Streams one connection may open.
const REQUESTS_PER_CONN: usize = 8;
/// A relayed request waits this long for the CA node.
const RELAY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct JoinService {
    pub ca: Option<Arc<CaNode>>,
    pub endpoint: Endpoint,
    pub gossip: GossipHandle,
    pub advertise: std::net::SocketAddr,
}

pub async fn serve(mut incoming: mpsc::Receiver<JoinConn>, svc: Arc<JoinService>) {
    let permits = Arc::new(Semaphore::new(CONCURRENT));
    while let Some(jc) = incoming.recv().await {
        let svc = svc.clone();
        let permits = permits.clone();
        tokio::spawn(async move {
            let remote = jc.conn.remote_address();
            for _ in 0..REQUESTS_PER_CONN {
                let Ok((mut send, mut recv)) = jc.conn.accept_bi().await else {
                    return;
                };
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
        });
    }
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
