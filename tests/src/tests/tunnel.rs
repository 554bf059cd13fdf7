//! The data path: upstream -> QUIC tunnel -> local app, and what the receiver does with bad input.

use std::net::Ipv4Addr;
use std::time::Duration;

use meshnode_transport::alpn::Alpn;
use meshnode_transport::tls::TlsMaterial;
use meshnode_transport::tunnel::{self, code, Header};
use ring::digest::{Context, SHA256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::tests::{loopback_endpoint, material, start_pool};
use crate::{echo_server, echo_service, free_tcp, subnet, upstream, wait_until, NodeProc, Pki};

/// Two nodes host `echo`, node-1 has an upstream to it. Returns (nodes, upstream address).
async fn echo_mesh(
    pki: &Pki,
    net: [u8; 2],
) -> (
    Vec<NodeProc>,
    std::net::SocketAddr,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let ip = |h| Ipv4Addr::new(127, net[0], net[1], h);
    let (e2, t2) = echo_server(ip(2)).await;
    let (e3, t3) = echo_server(ip(3)).await;
    let up = free_tcp(ip(1));
    let nodes = start_pool(
        pki,
        net,
        vec![
            upstream("echo", up),
            echo_service("echo", e2),
            echo_service("echo", e3),
        ],
    )
    .await;
    let ready = wait_until(Duration::from_secs(10), || async {
        nodes[0]
            .instances("echo")
            .await
            .iter()
            .filter(|(_, h)| h == "passing")
            .count()
            == 2
    })
    .await;
    assert!(
        ready.is_some(),
        "echo instances never became passing: {:?}",
        nodes[0].instances("echo").await
    );
    (nodes, up, vec![t2, t3])
}

/// The port of the `echo` instance on `node`, as `observer`'s catalog has it.
async fn echo_port(observer: &NodeProc, node: &str) -> u16 {
    observer.get("/v1/services").await.unwrap()["echo"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["node"] == node)
        .unwrap()["port"]
        .as_u64()
        .unwrap() as u16
}

#[tokio::test(flavor = "multi_thread")]
async fn echo_half_close_and_64_mib_through_the_mesh() {
    let pki = Pki::new();
    let (nodes, up, _apps) = echo_mesh(&pki, subnet()).await;

    // Small echo with half-close: we send, close our write side, and still read the reply and EOF.
    let mut s = TcpStream::connect(up).await.unwrap();
    s.write_all(b"hello mesh").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"hello mesh");

    // 64 MiB both ways, checked by hash.
    const LEN: usize = 64 * 1024 * 1024;
    let s = TcpStream::connect(up).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let mut ctx = Context::new(&SHA256);
        let mut x = 0x9e3779b97f4a7c15u64;
        let mut chunk = vec![0u8; 256 * 1024];
        for _ in 0..LEN / chunk.len() {
            for b in chunk.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            ctx.update(&chunk);
            w.write_all(&chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
        ctx.finish()
    });
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0usize;
    let read = async {
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            total += n;
            ctx.update(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .expect("64 MiB echo timed out");
    let sent = writer.await.unwrap();
    assert_eq!(total, LEN);
    assert_eq!(ctx.finish().as_ref(), sent.as_ref());

    // Both directions were counted.
    let metrics = crate::http_get(nodes[0].spec.admin, "/metrics")
        .await
        .unwrap();
    assert!(
        metrics.contains("meshnode_tunnel_bytes_total{"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meshnode_tunnel_connect_seconds_bucket"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn traffic_is_spread_and_survives_a_killed_instance() {
    let pki = Pki::new();
    let (mut nodes, up, _apps) = echo_mesh(&pki, subnet()).await;
    let roundtrip = || async {
        let mut s = TcpStream::connect(up).await.ok()?;
        s.write_all(b"ping").await.ok()?;
        s.shutdown().await.ok()?;
        let mut v = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut v))
            .await
            .ok()?
            .ok()?;
        (v == b"ping").then_some(())
    };
    for _ in 0..20 {
        assert!(roundtrip().await.is_some());
    }
    let m = crate::http_get(nodes[1].spec.admin, "/metrics")
        .await
        .unwrap();
    let m3 = crate::http_get(nodes[2].spec.admin, "/metrics")
        .await
        .unwrap();
    assert!(
        m.contains("meshnode_tunnel_streams_total{")
            && m3.contains("meshnode_tunnel_streams_total{"),
        "both instances should have taken streams"
    );

    nodes[1].kill9();
    let mut failed = 0;
    for _ in 0..20 {
        if roundtrip().await.is_none() {
            failed += 1;
        }
    }
    // Connect failures are retried on the other instance: nothing reaches the app as an error.
    assert_eq!(failed, 0);
}

/// One echo round trip on an open connection, bounded in time.
async fn echo_once(
    s: &mut TcpStream,
    msg: String,
) -> Result<std::io::Result<bool>, tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_secs(10), async move {
        s.write_all(msg.as_bytes()).await?;
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).await?;
        Ok(buf == msg.as_bytes())
    })
    .await
}

/// Every stream stays open here, so a tunnel connection that kept the
/// endpoint's small default stream limit (32) would stall the 33rd.
#[tokio::test(flavor = "multi_thread")]
async fn hundreds_of_held_connections_each_get_a_tunnel_stream() {
    const HELD: usize = 300;
    let pki = Pki::new();
    let (_nodes, up, _apps) = echo_mesh(&pki, subnet()).await;
    let mut held = Vec::with_capacity(HELD);
    for i in 0..HELD {
        let mut s = TcpStream::connect(up).await.unwrap();
        let r = echo_once(&mut s, format!("open-{i}")).await;
        assert!(matches!(r, Ok(Ok(true))), "connection {i} of {HELD}: {r:?}");
        held.push(s);
    }
    for (i, s) in held.iter_mut().enumerate() {
        let r = echo_once(s, format!("again-{i}")).await;
        assert!(matches!(r, Ok(Ok(true))), "held connection {i}: {r:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_headers_reset_the_stream_and_the_node_keeps_serving() {
    let pki = Pki::new();
    let (nodes, up, _apps) = echo_mesh(&pki, subnet()).await;
    let (ep, _incoming) = loopback_endpoint(material(&pki, "prober"));
    let (conn, peer) = ep.connect(nodes[1].spec.quic, Alpn::Tunnel).await.unwrap();
    assert_eq!(peer.identity.node(), "node-2");

    for garbage in [
        vec![0xffu8, 0xff],
        vec![0, 5, 1, 2, 3, 4, 5],
        vec![0, 200, 9],
        b"\x00\x03\x00\x01x".to_vec(),
    ] {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&garbage).await.unwrap();
        let _ = send.finish();
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(5), recv.read(&mut buf))
            .await
            .unwrap();
        match r {
            Err(quinn::ReadError::Reset(c)) => assert_eq!(c, code::BAD_HEADER),
            other => panic!("expected a reset for {garbage:?}, got {other:?}"),
        }
    }
    // The same connection still carries a good stream.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let echo_port = echo_port(&nodes[0], "node-2").await;
    tunnel::open(
        &mut send,
        &mut recv,
        &Header::new("echo", echo_port),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    send.write_all(b"still alive").await.unwrap();
    send.finish().unwrap();
    let got = recv.read_to_end(1024).await.unwrap();
    assert_eq!(got, b"still alive");
    // A header for a service the node does not host is refused with a status.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let err = tunnel::open(
        &mut send,
        &mut recv,
        &Header::new("nope", 1),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        matches!(
            err,
            Err(tunnel::TunnelError::Refused(tunnel::Status::NoSuchService))
        ),
        "{err:?}"
    );

    let metrics = crate::http_get(nodes[1].spec.admin, "/metrics")
        .await
        .unwrap();
    assert!(
        metrics.contains("meshnode_tunnel_header_errors_total{"),
        "{metrics}"
    );
    // And the upstream path still works end to end.
    let mut s = TcpStream::connect(up).await.unwrap();
    s.write_all(b"ok").await.unwrap();
    s.shutdown().await.unwrap();
    let mut v = Vec::new();
    s.read_to_end(&mut v).await.unwrap();
    assert_eq!(v, b"ok");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_from_another_ca_cannot_open_a_tunnel() {
    let pki = Pki::new();
    let (nodes, _up, _apps) = echo_mesh(&pki, subnet()).await;
    let rogue = Pki::new();
    let (ep, _incoming) = loopback_endpoint(material(&rogue, "rogue"));
    // The rogue does not trust the mesh CA either, so even the handshake fails on its side;
    // the node never accepts the rogue's certificate.
    let attempt = async {
        let (conn, _) = ep
            .connect(nodes[1].spec.quic, Alpn::Tunnel)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        tunnel::open(
            &mut send,
            &mut recv,
            &Header::new("echo", 1),
            Duration::from_secs(3),
        )
        .await
        .map_err(|e| e.to_string())
    };
    let result = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap();
    assert!(result.is_err(), "a foreign certificate opened a tunnel");
    let metrics = crate::http_get(nodes[1].spec.admin, "/metrics")
        .await
        .unwrap();
    assert!(
        !metrics.contains("direction=\"in\",result=\"ok\""),
        "no inbound stream may have succeeded: {metrics}"
    );
}

/// Opens one stream to `to` with `header` from an endpoint holding `tls`.
async fn probe_stream(
    tls: TlsMaterial,
    to: std::net::SocketAddr,
    header: &Header,
) -> Result<Vec<u8>, tunnel::TunnelError> {
    let (ep, _incoming) = loopback_endpoint(tls);
    let (conn, _) = ep.connect(to, Alpn::Tunnel).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    tunnel::open(&mut send, &mut recv, header, Duration::from_secs(5)).await?;
    send.write_all(b"who am i").await.unwrap();
    send.finish().unwrap();
    Ok(recv.read_to_end(1024).await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_carried_caller_is_refused_without_an_end_to_end_session_even_from_a_gateway() {
    let pki = Pki::new();
    let (nodes, _up, _apps) = echo_mesh(&pki, subnet()).await;
    let port = echo_port(&nodes[0], "node-2").await;
    let mut header = Header::new("echo", port);
    header.caller = Some(meshnode_transport::Identity::new("acme", "west", "client-7").unwrap());

    // A plain node of the cluster claims to carry someone else's identity: refused.
    let err = probe_stream(material(&pki, "liar"), nodes[1].spec.quic, &header).await;
    assert!(
        matches!(
            err,
            Err(tunnel::TunnelError::Refused(tunnel::Status::Forbidden))
        ),
        "{err:?}"
    );
    // A gateway's word is not enough either: a caller from another cluster
    // proves itself in an end-to-end session (tests::gateways).
    let d = pki.issue_as("east", "gw", meshnode_transport::Role::Gateway);
    let gw =
        TlsMaterial::load(&d.join("ca.pem"), &d.join("node.pem"), &d.join("node.key")).unwrap();
    let err = probe_stream(gw, nodes[1].spec.quic, &header).await;
    assert!(
        matches!(
            err,
            Err(tunnel::TunnelError::Refused(tunnel::Status::Forbidden))
        ),
        "{err:?}"
    );
    let metrics = nodes[1].get_text("/metrics").await.unwrap();
    let line = |caller: &str, result: &str| {
        metrics.lines().any(|l| {
            l.starts_with("meshnode_tunnel_streams_total{")
                && l.contains(&format!("caller=\"{caller}\""))
                && l.contains("direction=\"in\"")
                && l.contains(&format!("result=\"{result}\""))
        })
    };
    assert!(
        line("spiffe://acme/cluster/east/node/liar", "forbidden"),
        "{metrics}"
    );
    assert!(
        !line("spiffe://acme/cluster/west/node/client-7", "ok"),
        "a carried caller got through: {metrics}"
    );
    assert!(
        nodes[1]
            .log_text()
            .contains("carried identity from a non-gateway peer")
            || nodes[1]
                .log_text()
                .contains("must carry an end-to-end session"),
        "{}",
        nodes[1].log_text()
    );
}
