//! End-to-end sessions: a TLS 1.3 session between the calling node and the
//! destination node, run inside a cross-cluster tunnel stream after its
//! status, so the gateways in between relay ciphertext only.
//!
//! ```text
//! caller -> dest : outer header (end_to_end) ........ relayed by the gateways
//! caller -> dest : the ClientHello, at once (not waiting for the status)
//! dest -> caller : outer status (routing: found an instance?)
//! both           : the rest of the TLS 1.3 handshake, both node certificates (ALPN meshnode-e2e/1)
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
/// The caller's side reads the outer status before the TLS bytes.
pub type ClientIo = Join<StatusFirst<RecvStream>, SendStream>;
pub type ClientSession = tokio_rustls::client::TlsStream<ClientIo>;
pub type ServerSession = tokio_rustls::server::TlsStream<Io>;

/// A refusal status met where TLS bytes were expected.
#[derive(Debug)]
struct Refused(u8);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tunnel status {}", self.0)
    }
}

impl std::error::Error for Refused {}

/// Reads the outer status byte first, then passes the stream through: the
/// caller sends its ClientHello with the header and reads the status with
/// the server's first flight, one round trip through the gateways saved.
pub struct StatusFirst<R> {
    inner: R,
    pending: bool,
}

impl<R> StatusFirst<R> {
    /// `inner`, whose first byte is a tunnel status.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            pending: true,
        }
    }
}

/// The refusal status inside an error (and its sources) that a
/// [`StatusFirst`] reader returned, if it is one.
pub fn refusal(e: &(dyn std::error::Error + 'static)) -> Option<Status> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(Refused(b)) = err.downcast_ref::<Refused>() {
            return Status::from_u8(*b);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(Refused(b)) = io.get_ref().and_then(|i| i.downcast_ref::<Refused>()) {
                return Status::from_u8(*b);
            }
        }
        cur = err.source();
    }
    None
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for StatusFirst<R> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = self.get_mut();
        if this.pending {
            let mut byte = [0u8; 1];
            let mut one = tokio::io::ReadBuf::new(&mut byte);
            match std::pin::Pin::new(&mut this.inner).poll_read(cx, &mut one) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            if one.filled().is_empty() {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "stream closed before the tunnel status",
                )));
            }
            this.pending = false;
            if byte[0] != Status::Ok as u8 {
                return Poll::Ready(Err(std::io::Error::other(Refused(byte[0]))));
            }
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

/// A refusal status inside an I/O error, as a tunnel error.
fn io_error(e: std::io::Error, what: &str) -> TunnelError {
    if let Some(Refused(b)) = e.get_ref().and_then(|i| i.downcast_ref::<Refused>()) {
        return match Status::from_u8(*b) {
            Some(s) => TunnelError::Refused(s),
            None => TunnelError::Stream(format!("unknown status byte {b}")),
        };
    }
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        return TunnelError::Closed("the tunnel status");
    }
    TunnelError::Stream(format!("{what}: {e}"))
}

/// Bounds the handshake and the inner header and status.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(5);
/// Most application bytes a caller sends ahead of the inner status.
pub const MAX_EARLY: usize = 16 * 1024;

/// What a caller asks for: `outer` routes through the gateways, `inner` is
/// what the destination acts on, `cluster` the destination's cluster, and
/// `wait` bounds the whole opening.
#[derive(Clone, Copy)]
pub struct Ask<'a> {
    pub outer: &'a Header,
    pub inner: &'a Header,
    pub cluster: &'a str,
    pub wait: Duration,
}

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

    /// Caller side, on a fresh tunnel stream: writes `outer`, runs the
    /// handshake (its first flight goes out with the header), then sends
    /// `inner` (the header the destination acts on) and reads its answer.
    /// `cluster`: the destination node must hold a certificate of this
    /// cluster. `wait` bounds it all.
    pub async fn open(
        &self,
        mut send: SendStream,
        recv: RecvStream,
        ask: &Ask<'_>,
        early: &mut Vec<u8>,
        top_up: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(ClientSession, PeerCert), TunnelError> {
        let Ask {
            outer,
            inner,
            cluster,
            wait,
        } = *ask;
        let work = async {
            send.write_all(&encode_header(outer)?)
                .await
                .map_err(|e| TunnelError::Stream(e.to_string()))?;
            // The verifier checks identity by SPIFFE ID, not by this name.
            let name =
                ServerName::try_from("meshnode").map_err(|e| TunnelError::Stream(e.to_string()))?;
            let io = tokio::io::join(
                StatusFirst {
                    inner: recv,
                    pending: true,
                },
                send,
            );
            let mut s = self
                .connector
                .connect(name, io)
                .await
                .map_err(|e| io_error(e, "end-to-end handshake"))?;
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
            // What the application already sent rides with the inner header,
            // so a request-first protocol loses no round trip to the inner
            // status; the destination holds it until it has authorized the
            // stream, and the caller keeps it to replay elsewhere if refused.
            top_up(early);
            s.write_all(early)
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
        timeout(wait, work)
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
    // TLS records carry up to 16 KiB; the default 8 KiB copy buffers halve them.
    match tokio::io::copy_bidirectional_with_sizes(&mut tcp, &mut session, 64 * 1024, 64 * 1024)
        .await
    {
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
