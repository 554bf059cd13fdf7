//! End-to-end sessions: a TLS 1.3 session between the calling node and the
//! destination node, run inside a cross-cluster tunnel stream after its
//! status, so the gateways in between relay ciphertext only.
//!
//! ```text
//! caller -> dest : outer header (end_to_end) ........ relayed by the gateways
//! dest -> caller : outer status (routing: found an instance?)
//! both           : TLS 1.3 handshake, both node certificates (ALPN meshnode-e2e/1)
//! caller -> dest : inner header, inside TLS (the service, the service acted as)
//! dest -> caller : inner status, inside TLS (authorization, local connect)
//! both           : the application's bytes, inside TLS
//! ```
//!
//! Both sides verify the other's chain to the mesh CA, its mesh and its
//! revocation; the caller also requires a node of the cluster it asked
//! for. No resumption: a resumed session would skip the certificate check.

use std::sync::Arc;
use std::time::Duration;

use quinn::{RecvStream, SendStream};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Join};
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{
    decode_header, encode_header, Header, HeaderError, Status, TunnelError, MAX_HEADER_LEN,
};
use crate::tls::{TlsError, TlsMaterial};
use crate::PeerCert;

/// A tunnel stream as one duplex byte stream.
pub type Io = Join<RecvStream, SendStream>;
pub type ClientSession = tokio_rustls::client::TlsStream<Io>;
pub type ServerSession = tokio_rustls::server::TlsStream<Io>;

/// Bounds the handshake and the inner header and status.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(5);

/// The rustls configs of this node's end-to-end sessions, built once
/// (they read the current certificate and revocations at every handshake).
#[derive(Clone)]
pub struct E2e {
    connector: TlsConnector,
    acceptor: TlsAcceptor,
}

impl E2e {
    pub fn new(tls: &Arc<TlsMaterial>) -> Result<Self, TlsError> {
        Ok(Self {
            connector: TlsConnector::from(Arc::new(tls.e2e_client_config()?)),
            acceptor: TlsAcceptor::from(Arc::new(tls.e2e_server_config()?)),
        })
    }

    /// Caller side, after the outer status: the handshake, then `inner` (the
    /// header the destination acts on) and its answer. `cluster`: the
    /// destination node must hold a certificate of this cluster.
    pub async fn connect(
        &self,
        send: SendStream,
        recv: RecvStream,
        cluster: &str,
        inner: &Header,
    ) -> Result<(ClientSession, PeerCert), TunnelError> {
        let work = async {
            // The verifier checks identity by SPIFFE ID, not by this name.
            let name =
                ServerName::try_from("meshnode").map_err(|e| TunnelError::Stream(e.to_string()))?;
            let mut s = self
                .connector
                .connect(name, tokio::io::join(recv, send))
                .await
                .map_err(|e| TunnelError::Stream(format!("end-to-end handshake: {e}")))?;
            let peer = peer_of(s.get_ref().1.peer_certificates())?;
            if peer.identity.cluster() != cluster {
                return Err(TunnelError::Stream(format!(
                    "end-to-end session answered by {}, not a node of cluster {cluster}",
                    peer.identity
                )));
            }
            s.write_all(&encode_header(inner)?)
                .await
                .map_err(|e| TunnelError::Stream(e.to_string()))?;
            s.flush()
                .await
                .map_err(|e| TunnelError::Stream(e.to_string()))?;
            let status = s
                .read_u8()
                .await
                .map_err(|_| TunnelError::Closed("the end-to-end status"))?;
            match Status::from_u8(status) {
                Some(Status::Ok) => Ok((s, peer)),
                Some(other) => Err(TunnelError::Refused(other)),
                None => Err(TunnelError::Stream(format!("unknown status byte {status}"))),
            }
        };
        timeout(SESSION_TIMEOUT, work)
            .await
            .map_err(|_| TunnelError::Timeout("the end-to-end session"))?
    }

    /// Destination side, after it sent the outer status: the handshake and
    /// the inner header. The caller's identity is the certificate it proved.
    pub async fn accept(
        &self,
        send: SendStream,
        recv: RecvStream,
    ) -> Result<(ServerSession, PeerCert, Header), TunnelError> {
        let work = async {
            let mut s = self
                .acceptor
                .accept(tokio::io::join(recv, send))
                .await
                .map_err(|e| TunnelError::Stream(format!("end-to-end handshake: {e}")))?;
            let peer = peer_of(s.get_ref().1.peer_certificates())?;
            let len = usize::from(
                s.read_u16()
                    .await
                    .map_err(|_| TunnelError::Header(HeaderError::Truncated))?,
            );
            if len > MAX_HEADER_LEN {
                return Err(TunnelError::Header(HeaderError::TooLarge(len)));
            }
            let mut body = vec![0u8; len];
            s.read_exact(&mut body)
                .await
                .map_err(|_| TunnelError::Header(HeaderError::Truncated))?;
            let inner = decode_header(&body)?;
            Ok((s, peer, inner))
        };
        timeout(SESSION_TIMEOUT, work)
            .await
            .map_err(|_| TunnelError::Timeout("the end-to-end session"))?
    }
}

/// The verified peer certificate of a finished handshake (rustls checked
/// the chain, the mesh and revocations; a session without one is refused).
fn peer_of(
    certs: Option<&[rustls::pki_types::CertificateDer<'_>]>,
) -> Result<PeerCert, TunnelError> {
    let der = certs
        .and_then(|c| c.first())
        .ok_or_else(|| TunnelError::Stream("end-to-end peer sent no certificate".into()))?;
    PeerCert::from_der(der).map_err(|e| TunnelError::Stream(e.to_string()))
}

/// Writes the inner status of a session (and flushes it through TLS).
pub async fn respond<S: tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    status: Status,
) -> std::io::Result<()> {
    s.write_all(&[status as u8]).await?;
    s.flush().await
}

/// Splices a local TCP connection with a session until both sides are
/// done; returns (bytes from TCP into the session, bytes from the session
/// into TCP) and how it ended.
pub async fn splice_session<S>(mut tcp: tokio::net::TcpStream, mut session: S) -> super::SpliceStats
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = tcp.set_nodelay(true);
    match tokio::io::copy_bidirectional(&mut tcp, &mut session).await {
        Ok((to_peer, from_peer)) => super::SpliceStats {
            to_peer,
            from_peer,
            ending: super::Ending::Done,
        },
        Err(_) => {
            let _ = tcp.set_zero_linger();
            super::SpliceStats {
                to_peer: 0,
                from_peer: 0,
                ending: super::Ending::PeerAbort,
            }
        }
    }
}
