//! Tunnel streams: one QUIC bidi stream per proxied TCP connection.
//!
//! Wire: the caller sends a length-prefixed [`Header`], the receiver answers
//! with one [`Status`] byte, then bytes flow both ways. TCP FIN maps to stream
//! finish, a TCP reset to a stream reset, and back.

pub mod e2e;
mod header;
mod splice;

pub use header::{
    decode_frame, decode_header, encode_header, Header, HeaderError, Status, TraceContext,
    ANY_PORT, MAX_HEADER_LEN,
};
pub use splice::{relay, splice, Ending, SpliceStats};

use quinn::{RecvStream, SendStream, VarInt};
use tokio::time::{timeout, Duration};

/// Stream error codes used in RESET_STREAM / STOP_SENDING.
pub mod code {
    use quinn::VarInt;
    /// The header was truncated, oversized or malformed.
    pub const BAD_HEADER: VarInt = VarInt::from_u32(0x10);
    /// One side's TCP connection was reset.
    pub const RESET: VarInt = VarInt::from_u32(0x11);
    /// The node is shutting down.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(0x12);
}

/// A peer that opens a stream and sends nothing is dropped after this long.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("stream closed before {0}")]
    Closed(&'static str),
    #[error("stream error: {0}")]
    Stream(String),
    #[error("peer refused the stream: {0}")]
    Refused(Status),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

/// Caller side: writes the header and waits for the status.
/// `wait` bounds the wait for the status: a peer that died silently must not
/// hold the caller for longer than it takes to try another instance.
pub async fn open(
    send: &mut SendStream,
    recv: &mut RecvStream,
    header: &Header,
    wait: Duration,
) -> Result<(), TunnelError> {
    let bytes = encode_header(header)?;
    send.write_all(&bytes)
        .await
        .map_err(|e| TunnelError::Stream(e.to_string()))?;
    let mut status = [0u8; 1];
    timeout(wait, recv.read_exact(&mut status))
        .await
        .map_err(|_| TunnelError::Timeout("the tunnel status"))?
        .map_err(|e| match e {
            quinn::ReadExactError::FinishedEarly(_) => TunnelError::Closed("the tunnel status"),
            quinn::ReadExactError::ReadError(e) => TunnelError::Stream(e.to_string()),
        })?;
    match Status::from_u8(status[0]) {
        Some(Status::Ok) => Ok(()),
        Some(other) => Err(TunnelError::Refused(other)),
        None => Err(TunnelError::Stream(format!(
            "unknown status byte {}",
            status[0]
        ))),
    }
}

/// Receiver side: reads and decodes the header. On a bad header the caller
/// should reset the stream with [`code::BAD_HEADER`] (see [`refuse_bad_header`]).
pub async fn read_header(recv: &mut RecvStream) -> Result<Header, TunnelError> {
    let mut len = [0u8; 2];
    let read = async {
        recv.read_exact(&mut len).await.map_err(read_err)?;
        let len = usize::from(u16::from_be_bytes(len));
        if len > MAX_HEADER_LEN {
            return Err(TunnelError::Header(HeaderError::TooLarge(len)));
        }
        let mut body = vec![0u8; len];
        recv.read_exact(&mut body).await.map_err(read_err)?;
        Ok(decode_header(&body)?)
    };
    timeout(HEADER_TIMEOUT, read)
        .await
        .map_err(|_| TunnelError::Timeout("the tunnel header"))?
}

fn read_err(e: quinn::ReadExactError) -> TunnelError {
    match e {
        quinn::ReadExactError::FinishedEarly(_) => TunnelError::Header(HeaderError::Truncated),
        quinn::ReadExactError::ReadError(e) => TunnelError::Stream(e.to_string()),
    }
}

/// Receiver side: answers with a status byte.
pub async fn respond(send: &mut SendStream, status: Status) -> Result<(), TunnelError> {
    send.write_all(&[status as u8])
        .await
        .map_err(|e| TunnelError::Stream(e.to_string()))
}

/// Resets both halves of a stream whose header could not be read, and counts it.
pub fn refuse_bad_header(send: &mut SendStream, recv: &mut RecvStream, err: &TunnelError) {
    let kind = match err {
        TunnelError::Header(h) => h.kind(),
        TunnelError::Timeout(_) => "timeout",
        _ => "stream",
    };
    metrics::counter!(crate::metrics::TUNNEL_HEADER_ERRORS, "kind" => kind).increment(1);
    let _ = send.reset(code::BAD_HEADER);
    let _ = recv.stop(code::BAD_HEADER);
}

/// Refuses a stream with a status and then finishes it.
pub async fn refuse(send: &mut SendStream, status: Status) {
    if respond(send, status).await.is_ok() {
        let _ = send.finish();
    }
}

/// Convert an application error code to a readable label.
pub fn code_name(code: VarInt) -> &'static str {
    match code {
        c if c == code::BAD_HEADER => "bad_header",
        c if c == code::RESET => "reset",
        c if c == code::SHUTDOWN => "shutdown",
        _ => "other",
    }
}
