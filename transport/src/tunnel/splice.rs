//! Copies bytes between a TCP connection and a tunnel stream, both ways,
//! carrying half-close (FIN <-> finish) and aborts (RST <-> reset) across.

use std::io::{self, IoSlice};

use bytes::{Buf, Bytes, BytesMut};
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::code;

/// Large enough to keep a 1 MiB stream window busy with few syscalls.
const BUF_LEN: usize = 64 * 1024;

/// Stream chunks taken per read: one per QUIC packet, so 64 cover ~90 kB.
const MAX_CHUNKS: usize = 64;

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
            // Bulk reads go straight into reference-counted buffers so that
            // quinn takes them without copying (`write` would copy every
            // read). Small reads are copied out and the buffer reused from
            // its start: splitting them off too would walk each stream's
            // cursor through its whole 64 KiB buffer, touching a new page
            // every 4 KiB of small messages (the 10,000-stream soak grew
            // 0.3 MiB a minute that way, towards 640 MiB).
            let mut buf = BytesMut::with_capacity(BUF_LEN);
            loop {
                if buf.capacity() < BUF_LEN / 4 {
                    buf.reserve(BUF_LEN);
                }
                match tcp_read.read_buf(&mut buf).await {
                    Ok(0) => {
                        let _ = send.finish();
                        return Ok(());
                    }
                    Ok(n) => {
                        send.write_chunk(take_read(&mut buf))
                            .await
                            .map_err(|_| Ending::PeerAbort)?;
                        to_peer += n as u64;
                    }
                    Err(_) => return Err(Ending::LocalAbort),
                }
            }
        };
        let down = async {
            // Every QUIC packet arrives as its own chunk of about 1.4 kB: take
            // all that are ready and hand them to TCP in one vectored write,
            // not one write (and one wakeup of the application) per packet.
            let mut chunks: [Bytes; MAX_CHUNKS] = std::array::from_fn(|_| Bytes::new());
            loop {
                match recv.read_chunks(&mut chunks).await {
                    Ok(Some(n)) => {
                        from_peer += write_all_chunks(&mut tcp_write, &mut chunks[..n])
                            .await
                            .map_err(|_| Ending::LocalAbort)?;
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

/// Reads up to this size are copied out of the read buffer (see `splice`).
const COPY_BELOW: usize = 4 * 1024;

/// The bytes just read into `buf`, leaving `buf` empty: a copy when they are
/// few, so the buffer is reused from the same offset; else the buffer's
/// filled part itself, without a copy.
fn take_read(buf: &mut BytesMut) -> Bytes {
    if buf.len() < COPY_BELOW {
        let chunk = Bytes::copy_from_slice(buf);
        buf.clear();
        chunk
    } else {
        buf.split().freeze()
    }
}

/// Copies one tunnel stream into another until it finishes (then finishes the
/// other). `Err(true)` when reading failed, `Err(false)` when writing did.
/// Diagnostic: with `MESHNODE_RELAY_CAPTURE=FILE` in a gateway's
/// environment, every byte its relays carry is appended to FILE, to check
/// what a gateway sees of cross-cluster streams (ciphertext only, under end
/// to end sessions). Off unless set; read once.
static CAPTURE: std::sync::LazyLock<Option<std::sync::Mutex<std::fs::File>>> =
    std::sync::LazyLock::new(|| {
        let path = std::env::var_os("MESHNODE_RELAY_CAPTURE")?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .ok()?;
        tracing::warn!(path = %std::path::Path::new(&path).display(), "MESHNODE_RELAY_CAPTURE is set: every relayed byte is written to this file");
        Some(std::sync::Mutex::new(file))
    });

fn capture(chunks: &[Bytes]) {
    if let Some(f) = CAPTURE.as_ref() {
        use std::io::Write;
        if let Ok(mut f) = f.lock() {
            for c in chunks {
                let _ = f.write_all(c);
            }
        }
    }
}

async fn pump(from: &mut RecvStream, to: &mut SendStream, count: &mut u64) -> Result<(), bool> {
    let mut chunks: [Bytes; MAX_CHUNKS] = std::array::from_fn(|_| Bytes::new());
    loop {
        match from.read_chunks(&mut chunks).await {
            Ok(Some(n)) => {
                capture(&chunks[..n]);
                *count += chunks[..n].iter().map(|c| c.len() as u64).sum::<u64>();
                to.write_all_chunks(&mut chunks[..n])
                    .await
                    .map_err(|_| false)?;
            }
            Ok(None) => {
                let _ = to.finish();
                return Ok(());
            }
            Err(_) => return Err(true),
        }
    }
}

/// Writes every chunk to `w`, as few vectored writes as the socket takes,
/// and returns the bytes written. Chunks are consumed (left empty).
async fn write_all_chunks<W: AsyncWrite + Unpin>(
    w: &mut W,
    chunks: &mut [Bytes],
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut first = 0;
    while first < chunks.len() {
        if chunks[first].is_empty() {
            first += 1;
            continue;
        }
        let written = {
            let mut slices = [IoSlice::new(&[]); MAX_CHUNKS];
            let mut count = 0;
            for (slot, chunk) in slices.iter_mut().zip(&chunks[first..]) {
                *slot = IoSlice::new(chunk);
                count += 1;
            }
            w.write_vectored(&slices[..count]).await?
        };
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        total += written as u64;
        let mut left = written;
        while left > 0 && first < chunks.len() {
            let chunk = &mut chunks[first];
            if chunk.len() <= left {
                left -= chunk.len();
                *chunk = Bytes::new();
                first += 1;
            } else {
                chunk.advance(left);
                left = 0;
            }
        }
    }
    Ok(total)
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

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// Takes at most `limit` bytes per write, from one slice or several.
    struct Trickle {
        out: Vec<u8>,
        limit: usize,
        calls: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored_inner(&[IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored_inner(bufs)
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Trickle {
        fn poll_write_vectored_inner(&mut self, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
            self.calls += 1;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.limit - n);
                self.out.extend_from_slice(&b[..take]);
                n += take;
                if n == self.limit {
                    break;
                }
            }
            Poll::Ready(Ok(n))
        }
    }

    fn chunks(parts: &[&[u8]]) -> Vec<Bytes> {
        parts.iter().map(|p| Bytes::copy_from_slice(p)).collect()
    }

    #[tokio::test]
    async fn partial_vectored_writes_keep_every_byte_in_order() {
        for limit in [1, 2, 3, 5, 7, 100] {
            let mut w = Trickle {
                out: Vec::new(),
                limit,
                calls: 0,
            };
            let mut c = chunks(&[b"abc", b"", b"defgh", b"i", b"", b"jklmnop"]);
            let n = write_all_chunks(&mut w, &mut c).await.unwrap();
            assert_eq!(w.out, b"abcdefghijklmnop", "limit {limit}");
            assert_eq!(n, 16);
            assert!(c.iter().all(Bytes::is_empty));
        }
    }

    #[tokio::test]
    async fn all_chunks_go_in_one_write_when_the_socket_takes_them() {
        let mut w = Trickle {
            out: Vec::new(),
            limit: usize::MAX / 2,
            calls: 0,
        };
        let mut c: Vec<Bytes> = (0..MAX_CHUNKS)
            .map(|i| Bytes::from(vec![i as u8; 1400]))
            .collect();
        write_all_chunks(&mut w, &mut c).await.unwrap();
        assert_eq!(w.calls, 1);
        assert_eq!(w.out.len(), 1400 * MAX_CHUNKS);
    }

    #[tokio::test]
    async fn a_writer_that_takes_nothing_is_an_error_not_a_spin() {
        let mut w = Trickle {
            out: Vec::new(),
            limit: 0,
            calls: 0,
        };
        let mut c = chunks(&[b"abc"]);
        let err = write_all_chunks(&mut w, &mut c).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WriteZero);
    }

    #[test]
    fn small_reads_reuse_the_same_bytes_of_the_buffer_and_bulk_reads_are_not_copied() {
        let mut buf = BytesMut::with_capacity(BUF_LEN);
        let start = buf.as_ptr();
        for i in 0..10_000u32 {
            buf.extend_from_slice(&i.to_le_bytes()[..1]);
            let chunk = take_read(&mut buf);
            assert_eq!(chunk.len(), 1);
            assert_eq!(buf.as_ptr(), start, "round {i}: the cursor moved");
        }
        buf.extend_from_slice(&[7u8; COPY_BELOW]);
        let filled = buf.as_ptr();
        let chunk = take_read(&mut buf);
        assert_eq!(chunk.as_ptr(), filled, "a bulk read is handed on as it is");
        assert_eq!(chunk.len(), COPY_BELOW);
        assert!(buf.is_empty());
    }
}
