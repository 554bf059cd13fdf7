//! Copies bytes between a TCP connection and a tunnel stream, both ways,
//! carrying half-close (FIN <-> finish) and aborts (RST <-> reset) across.

use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::code;

/// Large enough to keep a 1 MiB stream window busy with few syscalls.
const BUF_LEN: usize = 64 * 1024;

/// How a spliced connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Both directions finished cleanly.
    Done,
    /// The local TCP side failed or was reset; the stream was reset.
    LocalAbort,
    /// The peer reset the stream or the connection was lost; the TCP side was reset.
    PeerAbort,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpliceStats {
    /// Bytes read from TCP and written to the stream.
    pub to_peer: u64,
    /// Bytes read from the stream and written to TCP.
    pub from_peer: u64,
    pub ending: Ending,
}

// === impl Ending ===

impl Ending {
    pub fn as_str(self) -> &'static str {
        match self {
            Ending::Done => "ok",
            Ending::LocalAbort => "local_abort",
            Ending::PeerAbort => "peer_abort",
        }
    }
}

/// Runs until both directions are finished or one side aborts.
pub async fn splice(mut tcp: TcpStream, mut send: SendStream, mut recv: RecvStream) -> SpliceStats {
    let _ = tcp.set_nodelay(true);
    let mut to_peer = 0u64;
    let mut from_peer = 0u64;
    let result = {
        let (mut tcp_read, mut tcp_write) = tcp.split();
        let up = async {
            let mut buf = vec![0u8; BUF_LEN];
            loop {
                match tcp_read.read(&mut buf).await {
                    Ok(0) => {
                        let _ = send.finish();
                        return Ok(());
                    }
                    Ok(n) => {
                        send.write_all(&buf[..n])
                            .await
                            .map_err(|_| Ending::PeerAbort)?;
                        to_peer += n as u64;
                    }
                    Err(_) => return Err(Ending::LocalAbort),
                }
            }
        };
        let down = async {
            loop {
                match recv.read_chunk(BUF_LEN, true).await {
                    Ok(Some(chunk)) => {
                        tcp_write
                            .write_all(&chunk.bytes)
                            .await
                            .map_err(|_| Ending::LocalAbort)?;
                        from_peer += chunk.bytes.len() as u64;
                    }
                    Ok(None) => {
                        let _ = tcp_write.shutdown().await;
                        return Ok(());
                    }
                    Err(_) => return Err(Ending::PeerAbort),
                }
            }
        };
        tokio::try_join!(up, down)
    };
    let ending = match result {
        Ok(_) => Ending::Done,
        Err(ending) => {
            // Whichever side failed, abort both: the stream with a reset, TCP with an RST.
            let _ = send.reset(code::RESET);
            let _ = recv.stop(code::RESET);
            if ending == Ending::PeerAbort {
                let _ = tcp.set_zero_linger();
            }
            ending
        }
    };
    SpliceStats {
        to_peer,
        from_peer,
        ending,
    }
}

/// Copies one tunnel stream into another until it finishes (then finishes the
/// other). `Err(true)` when reading failed, `Err(false)` when writing did.
async fn pump(from: &mut RecvStream, to: &mut SendStream, count: &mut u64) -> Result<(), bool> {
    loop {
        match from.read_chunk(BUF_LEN, true).await {
            Ok(Some(chunk)) => {
                let n = chunk.bytes.len() as u64;
                to.write_chunk(chunk.bytes).await.map_err(|_| false)?;
                *count += n;
            }
            Ok(None) => {
                let _ = to.finish();
                return Ok(());
            }
            Err(_) => return Err(true),
        }
    }
}

/// Relays between two tunnel streams (a gateway's hop): `a` is the caller's
/// side, `b` the next hop's. Finish and reset are carried across both ways.
pub async fn relay(
    mut a_send: SendStream,
    mut a_recv: RecvStream,
    mut b_send: SendStream,
    mut b_recv: RecvStream,
) -> SpliceStats {
    let mut to_peer = 0u64;
    let mut from_peer = 0u64;
    let result = {
        // Caller -> next hop: a failure on the caller's side is a "local" abort.
        let up = async {
            pump(&mut a_recv, &mut b_send, &mut to_peer)
                .await
                .map_err(|read| {
                    if read {
                        Ending::LocalAbort
                    } else {
                        Ending::PeerAbort
                    }
                })
        };
        let down = async {
            pump(&mut b_recv, &mut a_send, &mut from_peer)
                .await
                .map_err(|read| {
                    if read {
                        Ending::PeerAbort
                    } else {
                        Ending::LocalAbort
                    }
                })
        };
        tokio::try_join!(up, down)
    };
    let ending = match result {
        Ok(_) => Ending::Done,
        Err(ending) => {
            for s in [&mut a_send, &mut b_send] {
                let _ = s.reset(code::RESET);
            }
            for r in [&mut a_recv, &mut b_recv] {
                let _ = r.stop(code::RESET);
            }
            ending
        }
    };
    SpliceStats {
        to_peer,
        from_peer,
        ending,
    }
}
