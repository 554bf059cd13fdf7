//! `meshnode-flood`: QUIC Initials at a target, for `bench/flood.sh`.
//!
//! `meshnode-flood MODE ADDR RATE SECONDS`
//! - `ignore-retry`: fresh client Initials (a new connection each, made by
//!   quinn-proto, sans-IO) sent from one UDP socket and never answered: what
//!   a flood that ignores Retry looks like. No state is kept per Initial.
//! - `answer-retry`: real quinn client connections from one source, which
//!   answer Retry and so prove their address, then are dropped.
//!
//! Paced to RATE per second; prints `sent N` at the end.
// A measuring crate: it reads wall and virtual clocks itself (the
// disallowed-methods rule of clippy.toml is for the mesh's own code).
#![allow(clippy::disallowed_methods)]

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

fn client_crypto() -> anyhow::Result<Arc<quinn::crypto::rustls::QuicClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    tls.alpn_protocols = vec![meshnode_transport::alpn::TUNNEL.to_vec()];
    Ok(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(
        tls,
    )?))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: meshnode-flood ignore-retry|answer-retry ADDR RATE SECONDS";
    let [mode, addr, rate, secs] = args.as_slice() else {
        bail!("{usage}");
    };
    let addr: SocketAddr = addr.parse().context("ADDR must be IP:PORT")?;
    let rate: u64 = rate.parse().context("RATE must be a number")?;
    let secs: u64 = secs.parse().context("SECONDS must be a number")?;
    if rate == 0 {
        bail!("RATE must be at least 1");
    }
    let sent = match mode.as_str() {
        "ignore-retry" => ignore_retry(addr, rate, secs)?,
        "answer-retry" => answer_retry(addr, rate, secs)?,
        _ => bail!("{usage}"),
    };
    println!("sent {sent}");
    Ok(())
}

/// Waits until the `n`-th send of a `rate`-per-second schedule is due.
fn pace(start: Instant, n: u64, rate: u64) {
    let due = start + Duration::from_micros(n * 1_000_000 / rate);
    let now = Instant::now();
    if due > now {
        std::thread::sleep(due - now);
    }
}

fn ignore_retry(addr: SocketAddr, rate: u64, secs: u64) -> anyhow::Result<u64> {
    let crypto = client_crypto()?;
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    let mut endpoint = new_proto_endpoint();
    let start = Instant::now();
    let mut buf = Vec::with_capacity(1500);
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        // A fresh endpoint now and then: each keeps a slot per connection.
        if n.is_multiple_of(1000) {
            endpoint = new_proto_endpoint();
        }
        let cfg = quinn_proto::ClientConfig::new(crypto.clone());
        let (_, mut conn) = endpoint.connect(Instant::now(), cfg, addr, "meshnode")?;
        buf.clear();
        if let Some(t) = conn.poll_transmit(Instant::now(), 1, &mut buf) {
            let _ = socket.send_to(&buf[..t.size], addr);
        }
        n += 1;
        pace(start, n, rate);
    }
    Ok(n)
}

fn new_proto_endpoint() -> quinn_proto::Endpoint {
    quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    )
}

fn answer_retry(addr: SocketAddr, rate: u64, secs: u64) -> anyhow::Result<u64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut endpoint = quinn::Endpoint::client("0.0.0.0:0".parse()?)?;
        endpoint.set_default_client_config(quinn::ClientConfig::new(client_crypto()?));
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_secs(secs) {
            if let Ok(connecting) = endpoint.connect(addr, "meshnode") {
                // Each answers Retry on its own; none is kept past 2 s.
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(2), connecting).await;
                });
            }
            n += 1;
            let due = start + Duration::from_micros(n * 1_000_000 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        Ok::<u64, anyhow::Error>(n)
    })
}
