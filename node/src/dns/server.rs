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
use tracing::{debug, info, warn};

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
        if let Some(i) = Outcome::ALL.iter().position(|x| *x == o) {
            self.0[i].increment(1);
        }
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
) -> std::io::Result<Running> {
    let udp = std::net::UdpSocket::bind(settings.listen)?;
    let addr = udp.local_addr()?;
    udp.set_read_timeout(Some(UDP_POLL))?;
    let tcp = TcpListener::bind(addr).await?;
    let zone: Shared = Arc::new(RwLock::new(Arc::new(build(
        settings, &gossip, &reloader, &cluster, 1,
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
    serial: u32,
) -> Zone {
    let catalog = gossip.catalog();
    let upstreams = reloader.upstreams();
    let zone = Zone::build(&ZoneInput {
        catalog: &catalog,
        upstreams: &upstreams,
        cluster,
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
        let next = Arc::new(build(&s, &gossip, &reloader, &cluster, serial));
        *zone.write().unwrap_or_else(|e| e.into_inner()) = next;
    }
}

fn serve_udp(socket: std::net::UdpSocket, zone: Shared, stop: Arc<AtomicBool>) {
    let counters = Counters::new("udp");
    // A query is at most 512 bytes without EDNS; EDNS clients may send more.
    let mut buf = vec![0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let (n, peer) = match socket.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                // ICMP errors from an earlier send surface here on Linux.
                debug!(error = %e, "DNS UDP receive");
                continue;
            }
        };
        let z = zone.read().unwrap_or_else(|e| e.into_inner()).clone();
        let (answer, outcome) = respond(&z, &buf[..n], Transport::Udp);
        counters.count(outcome);
        if let Some(answer) = answer {
            if let Err(e) = socket.send_to(&answer, peer) {
                debug!(error = %e, %peer, "DNS UDP send");
            }
        }
    }
    debug!("DNS UDP thread stopped");
}

async fn serve_tcp(listener: TcpListener, zone: Shared) {
    let permits = Arc::new(Semaphore::new(MAX_TCP_CONNS));
    let counters = Arc::new(Counters::new("tcp"));
    let mut backoff = Duration::from_millis(10);
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => {
                backoff = Duration::from_millis(10);
                s
            }
            Err(e) => {
                warn!(error = %e, retry_in = ?backoff, "DNS cannot accept a TCP connection");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
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
