//! The tunnel server: accepts streams from mesh peers and connects them to the
//! local application instance they name.

use std::sync::Arc;
use std::time::Duration;

use meshnode_transport::tunnel::{self, Status};
use meshnode_transport::{Accepted, PeerCert};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, info_span, Instrument};

use crate::drain::Drain;
use crate::metrics::{TUNNEL_ACTIVE, TUNNEL_BYTES, TUNNEL_STREAMS};
use crate::registry::Registry;

/// Connecting to a local application should be near-instant; a slow one is broken.
const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

pub async fn serve(mut incoming: mpsc::Receiver<Accepted>, registry: Arc<Registry>, drain: Drain) {
    while let Some(Accepted { conn, peer }) = incoming.recv().await {
        let registry = registry.clone();
        let drain = drain.clone();
        let span = info_span!("inbound", peer = %peer.identity);
        tokio::spawn(
            async move {
                let peer = Arc::new(peer);
                while let Ok((send, recv)) = conn.accept_bi().await {
                    tokio::spawn(handle_stream(
                        send,
                        recv,
                        peer.clone(),
                        registry.clone(),
                        drain.clone(),
                    ));
                }
            }
            .instrument(span),
        );
    }
}

async fn handle_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    peer: Arc<PeerCert>,
    registry: Arc<Registry>,
    drain: Drain,
) {
    let header = match tunnel::read_header(&mut recv).await {
        Ok(h) => h,
        Err(e) => {
            debug!(peer = %peer.identity, error = %e, "bad tunnel header; resetting stream");
            tunnel::refuse_bad_header(&mut send, &mut recv, &e);
            return;
        }
    };
    let service = header.service.clone();
    let count = |result: &'static str| {
        metrics::counter!(TUNNEL_STREAMS, "service" => service.clone(), "direction" => "in", "result" => result)
            .increment(1);
    };
    if drain.is_draining() {
        count("draining");
        return tunnel::refuse(&mut send, Status::Draining).await;
    }
    let Some(target) = registry.target(&header.service, header.port) else {
        count("no_such_service");
        return tunnel::refuse(&mut send, Status::NoSuchService).await;
    };
    let tcp = match tokio::time::timeout(LOCAL_CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            debug!(%target, error = %e, "local application refused the connection");
            count("connect_failed");
            return tunnel::refuse(&mut send, Status::ConnectFailed).await;
        }
        Err(_) => {
            count("connect_failed");
            return tunnel::refuse(&mut send, Status::ConnectFailed).await;
        }
    };
    if tunnel::respond(&mut send, Status::Ok).await.is_err() {
        count("peer_gone");
        return;
    }
    let _guard = drain.enter();
    let active = metrics::gauge!(TUNNEL_ACTIVE, "direction" => "in");
    active.increment(1.0);
    let stats = tunnel::splice(tcp, send, recv).await;
    active.decrement(1.0);
    // The caller's bytes arrive from the peer; ours go out to it.
    metrics::counter!(TUNNEL_BYTES, "service" => service.clone(), "direction" => "in")
        .increment(stats.from_peer);
    metrics::counter!(TUNNEL_BYTES, "service" => service.clone(), "direction" => "out")
        .increment(stats.to_peer);
    count(stats.ending.as_str());
    debug!(caller = %peer.identity, %service, sent = stats.to_peer, received = stats.from_peer, ending = stats.ending.as_str(), "stream closed");
}
