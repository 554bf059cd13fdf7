//! The DNS interface's sockets: UDP on a thread of its own, TCP on the
//! runtime, and a task that rebuilds the [`Zone`] when the catalog or the
//! upstreams change.
//!
//! UDP answers on a dedicated thread with a blocking socket: a query is a
//! read, a lookup and a write, and the data path's runtime never waits for
//! it (nor it for the data path). TCP (for answers over the UDP size, RFC
//! 7766) is bounded like the admin API: at most [`MAX_TCP_CONNS`] at once,
//! [`TCP_IDLE`] between queries, [`TCP_QUERIES`] per connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use meshnode_gossip::GossipHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::{debug, info};

use super::{respond, Outcome, Transport, Zone, ZoneInput};
use crate::config::DnsSettings;

/// TCP connections served at once; more are closed at accept.
pub const MAX_TCP_CONNS: usize = 64;
/// A TCP connection closes after this long without a query.
pub const TCP_IDLE: Duration = Duration::from_secs(10);
/// Queries one TCP connection may send.
pub const TCP_QUERIES: usize = 256;
/// How often the zone looks at the upstreams (they change on reload only).
const UPSTREAM_POLL: Duration = Duration::from_secs(1);
/// How often the UDP thread looks at its stop flag when idle.
const UDP_POLL: Duration = Duration::from_millis(500);

type Shared = Arc<RwLock<Arc<Zone>>>;

/// The running server: its address and its tasks (aborting them stops the
/// UDP thread too).
pub struct Running {
    pub addr: SocketAddr,
    pub tasks: Vec<JoinHandle<()>>,
}

/// Counters per outcome, registered once.
struct Counters([metrics::Counter; Outcome::ALL.len()]);

impl Counters {
    fn new(transport: &'static str) -> Counters {
        Counters(Outcome::ALL.map(|o| {
            metrics::counter!(crate::metrics::DNS_QUERIES, "transport" => transport, "outcome" => o.as_str())
        }))
    }

    fn count(&self, o: Outcome) {
        // `ALL` lists the variants in declaration order.
        self.0[o as usize].increment(1);
    }
}

/// Sets the stop flag when dropped (with the task that holds it).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Binds `settings.listen` (UDP and TCP, the same port) and serves.
pub async fn start(
    settings: &DnsSettings,
    gossip: GossipHandle,
    reloader: Arc<crate::reload::Reloader>,
    cluster: String,
    node: String,
) -> std::io::Result<Running> {
    let udp = std::net::UdpSocket::bind(settings.listen)?;
    let addr = udp.local_addr()?;
    udp.set_read_timeout(Some(UDP_POLL))?;
    let tcp = TcpListener::bind(addr).await?;
    let zone: Shared = Arc::new(RwLock::new(Arc::new(build(
        settings, &gossip, &reloader, &cluster, &node, 1,
    ))));
    let stop = Arc::new(AtomicBool::new(false));
    {
        let zone = zone.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("meshnode-dns".into())
            .spawn(move || serve_udp(udp, zone, stop))?;
    }
    let guard = StopOnDrop(stop);
    let mut tasks = vec![tokio::spawn(async move {
        let _guard = guard;
        std::future::pending::<()>().await
    })];
    tasks.push(tokio::spawn(serve_tcp(tcp, zone.clone())));
    tasks.push(tokio::spawn(keep_zone(
        settings.clone(),
        gossip,
        reloader,
        cluster,
        node,
        zone,
    )));
    info!(%addr, mode = ?settings.mode, domain = %settings.domain, "DNS interface up");
    Ok(Running { addr, tasks })
}

fn build(
    s: &DnsSettings,
    gossip: &GossipHandle,
    reloader: &crate::reload::Reloader,
    cluster: &str,
    node: &str,
    serial: u32,
) -> Zone {
    let catalog = gossip.catalog();
    let upstreams = reloader.upstreams();
    let zone = Zone::build(&ZoneInput {
        catalog: &catalog,
        upstreams: &upstreams,
        cluster,
        node,
        mode: s.mode,
        ttl: s.ttl,
        domain: &s.domain,
        serial,
    });
    metrics::gauge!(crate::metrics::DNS_NAMES).set(zone.len() as f64);
    zone
}

/// Rebuilds the zone when the catalog changes, and when the upstreams do
/// (looked at every [`UPSTREAM_POLL`]: they change on reload only).
async fn keep_zone(
    s: DnsSettings,
    gossip: GossipHandle,
    reloader: Arc<crate::reload::Reloader>,
    cluster: String,
    node: String,
    zone: Shared,
) {
    let mut catalog = gossip.watch_catalog();
    let mut upstreams = reloader.upstreams();
    let mut tick = tokio::time::interval(UPSTREAM_POLL);
    let mut serial: u32 = 1;
    loop {
        tokio::select! {
            changed = catalog.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = tick.tick() => {
                let now = reloader.upstreams();
                if now == upstreams {
                    continue;
                }
                upstreams = now;
            }
        }
        serial = serial.wrapping_add(1);
        let next = Arc::new(build(&s, &gossip, &reloader, &cluster, &node, serial));
        *zone.write().unwrap_or_else(|e| e.into_inner()) = next;
    }
}

/// Datagrams taken (and answers sent) per system call.
const BATCH: usize = 32;
/// Room for one query: EDNS clients may send more than 512 bytes.
const MAX_QUERY: usize = 4096;

/// Answers UDP in batches: `recvmmsg` waits for one datagram and takes up
/// to [`BATCH`] that are already queued, `sendmmsg` sends their answers in
/// one call. Under load that halves the system calls per query; a lone
/// query is answered as soon as it arrives.
fn serve_udp(socket: std::net::UdpSocket, zone: Shared, stop: Arc<AtomicBool>) {
    use nix::errno::Errno;
    use nix::sys::socket::{recvmmsg, MsgFlags, MultiHeaders, SockaddrStorage};
    use std::io::IoSliceMut;
    use std::os::fd::AsRawFd;

    let counters = Counters::new("udp");
    let fd = socket.as_raw_fd();
    let mut bufs = vec![[0u8; MAX_QUERY]; BATCH];
    let mut rx: MultiHeaders<SockaddrStorage> = MultiHeaders::preallocate(BATCH, None);
    let mut tx: MultiHeaders<SockaddrStorage> = MultiHeaders::preallocate(BATCH, None);
    let mut got: Vec<(usize, Option<SockaddrStorage>)> = Vec::with_capacity(BATCH);
    let mut answers: Vec<Vec<u8>> = Vec::with_capacity(BATCH);
    let mut peers: Vec<Option<SockaddrStorage>> = Vec::with_capacity(BATCH);
    while !stop.load(Ordering::Relaxed) {
        got.clear();
        {
            let mut slices: Vec<[IoSliceMut<'_>; 1]> =
                bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
            match recvmmsg(
                fd,
                &mut rx,
                slices.iter_mut(),
                MsgFlags::MSG_WAITFORONE,
                None,
            ) {
                Ok(results) => {
                    for r in results {
                        // A datagram longer than the buffer is cut: answering
                        // its first part would be wrong, so it gets nothing.
                        let cut = r.flags.contains(MsgFlags::MSG_TRUNC);
                        got.push((if cut { 0 } else { r.bytes }, r.address));
                    }
                }
                // The read timeout (to look at the stop flag), or a signal.
                Err(Errno::EAGAIN | Errno::EINTR) => continue,
                Err(e) => {
                    // ICMP errors from an earlier send surface here on Linux.
                    debug!(error = %e, "DNS UDP receive");
                    continue;
                }
            }
        }
        let z = zone.read().unwrap_or_else(|e| e.into_inner()).clone();
        answers.clear();
        peers.clear();
        for (i, (n, peer)) in got.iter().enumerate() {
            let (answer, outcome) = respond(&z, &bufs[i][..*n], Transport::Udp);
            counters.count(outcome);
            if let (Some(a), Some(p)) = (answer, peer) {
                answers.push(a);
                peers.push(Some(*p));
            }
        }
        send_all(fd, &mut tx, &answers, &peers);
    }
    debug!("DNS UDP thread stopped");
}

/// Sends `answers[i]` to `peers[i]` in one `sendmmsg` call. On a blocking
/// socket the kernel sends them all unless one fails; then it reports how
/// many went out before the failure, but reading that count from nix means
/// iterating results whose addresses it never initialized for a send, so
/// the rest are dropped, as lost datagrams would be: the client asks again.
fn send_all(
    fd: std::os::fd::RawFd,
    tx: &mut nix::sys::socket::MultiHeaders<nix::sys::socket::SockaddrStorage>,
    answers: &[Vec<u8>],
    peers: &[Option<nix::sys::socket::SockaddrStorage>],
) {
    use nix::sys::socket::{sendmmsg, ControlMessage, MsgFlags};
    use std::io::IoSlice;

    if answers.is_empty() {
        return;
    }
    let slices: Vec<[IoSlice<'_>; 1]> = answers.iter().map(|a| [IoSlice::new(a)]).collect();
    let none: [ControlMessage<'_>; 0] = [];
    if let Err(e) = sendmmsg(fd, tx, &slices, peers, none, MsgFlags::empty()) {
        debug!(error = %e, answers = answers.len(), "DNS UDP send");
    }
}

async fn serve_tcp(listener: TcpListener, zone: Shared) {
    let permits = Arc::new(Semaphore::new(MAX_TCP_CONNS));
    let counters = Arc::new(Counters::new("tcp"));
    loop {
        let stream = crate::admin::accept(&listener, "DNS (TCP)").await;
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!(crate::metrics::DNS_REFUSED).increment(1);
            drop(stream);
            continue;
        };
        let zone = zone.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = tcp_conn(stream, &zone, &counters).await {
                debug!(error = %e, "DNS TCP connection");
            }
        });
    }
}

/// RFC 1035 4.2.2: each message is preceded by its length in two bytes.
async fn tcp_conn(mut s: TcpStream, zone: &Shared, counters: &Counters) -> std::io::Result<()> {
    let mut buf = vec![0u8; u16::MAX as usize];
    for _ in 0..TCP_QUERIES {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, s.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        }
        let n = u16::from_be_bytes(len) as usize;
        match tokio::time::timeout(TCP_IDLE, s.read_exact(&mut buf[..n])).await {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        };
        let z = zone.read().unwrap_or_else(|e| e.into_inner()).clone();
        let (answer, outcome) = respond(&z, &buf[..n], Transport::Tcp);
        counters.count(outcome);
        let Some(answer) = answer else { continue };
        let Ok(len) = u16::try_from(answer.len()) else {
            continue;
        };
        s.write_all(&len.to_be_bytes()).await?;
        s.write_all(&answer).await?;
    }
    Ok(())
}
