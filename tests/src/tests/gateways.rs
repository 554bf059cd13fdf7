//! End-to-end sessions through gateways, in namespaces with two clusters: a
//! caller of cluster a authorized at b1 by the identity it proves itself,
//! gateways that relay only ciphertext, and a gateway certificate that
//! claims another caller refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshnode_transport::alpn;
use meshnode_transport::tls::{transport_config, Link, TlsMaterial};
use meshnode_transport::tunnel::e2e::{Ask, E2e};
use meshnode_transport::tunnel::{self, Header, Status, TunnelError, ANY_PORT};
use meshnode_transport::{Identity, Role};

use super::federation::{self, Mesh};
use super::policy::{ok, operator, policy_in, write};
use crate::netns;
use crate::{named_echo_once, wait_until, MESH};

const MARKER: &[u8] = b"E2E-PLAINTEXT-MARKER-0123456789;";

const DENY_ALL: &str = "kind = \"defaults\"\nname = \"mesh\"\ndefault_intention = \"deny\"\n";
const ONLY_A1: &str = "kind = \"intentions\"\nname = \"echo\"\n[[rule]]\nsource = \"spiffe://acme/cluster/a/node/a1\"\naction = \"allow\"\n";

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A QUIC client in namespace `ns` holding the certificate in `dir`.
fn client_in(ns: &str, tls: &Arc<TlsMaterial>) -> (quinn::Endpoint, quinn::ClientConfig) {
    let socket = netns::in_netns(ns, || std::net::UdpSocket::bind("0.0.0.0:0")).expect("udp");
    let ep = quinn::Endpoint::new(
        meshnode_transport::tls::endpoint_config(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .expect("endpoint");
    let cfg = tls
        .client_config(&[alpn::TUNNEL], Arc::new(transport_config(Link::Tunnel)))
        .expect("client config");
    (ep, cfg)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_caller_is_authorized_by_its_own_identity_and_gateways_relay_only_ciphertext() {
    if !netns::available("a_caller_is_authorized_by_its_own_identity") {
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let capture = |gw: &str| work.path().join(format!("{gw}.capture"));
    let (agw_cap, bgw_cap) = (capture("agw"), capture("bgw"));
    let mesh = Mesh::start_with(federation::topology(&["bgw"]), &["b1"], |spec| {
        let file = match spec.name.as_str() {
            "agw" => &agw_cap,
            "bgw" => &bgw_cap,
            _ => return,
        };
        spec.env
            .push(("MESHNODE_RELAY_CAPTURE".into(), file.display().to_string()));
    })
    .await;
    mesh.wait_remote_healthy(1).await;
    let a1 = mesh.topo.host("a1").ns.clone();
    let up = SocketAddr::from(([127, 0, 0, 1], 15001));
    let call = |payload: Vec<u8>| {
        let a1 = a1.clone();
        async move { named_echo_once(Some(&a1), up, &payload, Duration::from_secs(10)).await }
    };
    wait_until(Duration::from_secs(20), || async {
        call(b"warm".to_vec()).await.is_ok()
    })
    .await
    .expect("a1 never reached echo in cluster b");

    // Only a1, by its own SPIFFE ID, may call echo.
    let op = operator(&mesh.pki, "alice");
    for (file, text) in [("defaults.toml", DENY_ALL), ("echo.toml", ONLY_A1)] {
        let doc = write(mesh.pki.dir.path(), file, text);
        ok(&policy_in(
            &mesh,
            "a2",
            &op,
            &["apply", doc.to_str().expect("path")],
        ));
    }
    let b1 = mesh.node("b1");
    wait_until(Duration::from_secs(15), || async {
        b1.get("/v1/policy")
            .await
            .and_then(|v| v["documents"].as_array().map(Vec::len))
            == Some(2)
    })
    .await
    .expect("b1 never held both documents");

    // 64 KiB of a known payload through both gateways, and back.
    let payload: Vec<u8> = MARKER.iter().copied().cycle().take(64 * 1024).collect();
    let before: Vec<u64> = [&agw_cap, &bgw_cap]
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .collect();
    let (who, echoed) = call(payload.clone()).await.expect("a1 is allowed");
    assert_eq!(who, "b1");
    assert_eq!(echoed, payload);
    for (i, f) in [&agw_cap, &bgw_cap].iter().enumerate() {
        let seen = std::fs::read(f).expect("capture file");
        let added = seen.len() as u64 - before[i];
        eprintln!(
            "measure: {} relayed {added} bytes of the 2 x 64 KiB exchange",
            f.display()
        );
        assert!(
            added >= 2 * 64 * 1024,
            "{} relayed only {added} bytes: the capture missed the stream",
            f.display()
        );
        assert!(
            !contains(&seen, MARKER),
            "{} saw the plaintext",
            f.display()
        );
    }
    let m = b1.get_text("/metrics").await.unwrap_or_default();
    assert!(
        m.lines()
            .any(|l| l.starts_with("meshnode_authz_decisions_total")
                && l.contains("decision=\"allow\"")
                && l.contains("reason=\"rule\"")),
        "{m}"
    );

    // A gateway certificate of cluster b, on bgw's LAN, claiming to carry a1.
    let rogue_dir = mesh.pki.issue_as("b", "rogue-gw", Role::Gateway);
    let tls = Arc::new(
        TlsMaterial::load(
            &rogue_dir.join("ca.pem"),
            &rogue_dir.join("node.pem"),
            &rogue_dir.join("node.key"),
        )
        .expect("tls"),
    );
    let (ep, cfg) = client_in(&mesh.topo.host("bgw").ns, &tls);
    let conn = ep
        .connect_with(cfg, mesh.topo.host("b1").quic(), "meshnode")
        .expect("dial")
        .await
        .expect("handshake");
    let a1_id = Identity::new(MESH, "a", "a1").expect("id");
    let header = |end_to_end| Header {
        caller: Some(a1_id.clone()),
        end_to_end,
        ..Header::new("echo", ANY_PORT)
    };
    // Its word alone: refused.
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    let r = tunnel::open(&mut send, &mut recv, &header(false), Duration::from_secs(5)).await;
    assert!(
        matches!(r, Err(TunnelError::Refused(Status::Forbidden))),
        "{r:?}"
    );
    // In a session it can only prove itself, and the intention denies it.
    let (send, recv) = conn.open_bi().await.expect("stream");
    let inner = Header {
        caller: None,
        cluster: Some("b".into()),
        ..header(true)
    };
    let r = E2e::new(&tls)
        .expect("e2e")
        .open(
            send,
            recv,
            &Ask {
                outer: &header(true),
                inner: &inner,
                cluster: "b",
                wait: Duration::from_secs(10),
            },
            &mut Vec::new(),
            |_| {},
        )
        .await
        .map(|_| ());
    assert!(
        matches!(r, Err(TunnelError::Refused(Status::Denied))),
        "{r:?}"
    );
    assert!(
        b1.log_text()
            .contains("a stream from another cluster must carry an end-to-end session"),
        "{}",
        b1.log_text()
    );
}

/// A cross-cluster connection is one trace: a1's span (the root), then
/// agw's, bgw's and b1's, each the child of the hop before, although the
/// gateways relay only an end-to-end session (the trace context rides in
/// the outer tunnel header). Each namespace has its own OTLP receiver on
/// its loopback, all feeding one list.
#[tokio::test(flavor = "multi_thread")]
async fn a_cross_cluster_connection_is_one_trace_with_a_span_at_every_node() {
    if !netns::available("a_cross_cluster_connection_is_one_trace") {
        return;
    }
    let topo = federation::topology(&["bgw"]);
    let got = super::telemetry::Received::default();
    let mut receivers = Vec::new();
    for h in topo.hosts.values() {
        let l = netns::listen(&h.ns, "127.0.0.1:4318".parse().expect("addr")).expect("receiver");
        receivers.push(super::telemetry::otlp_receiver(l, got.clone()));
    }
    let mesh = Mesh::start_with(topo, &["b1"], |spec| {
        spec.extra
            .push_str("\n[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318\"\n");
    })
    .await;
    mesh.wait_remote_healthy(1).await;
    wait_until(Duration::from_secs(20), || async {
        mesh.request(b"traced", Duration::from_secs(5))
            .await
            .is_ok()
    })
    .await
    .expect("a1 reached echo in cluster b");
    // The trace of a call that reached b1 (earlier tries may not have).
    let mut chain = Vec::new();
    wait_until(Duration::from_secs(15), || {
        let by = super::telemetry::traces(&got);
        chain = by
            .values()
            .filter(|spans| spans.iter().any(|(n, _)| n == "b1"))
            .map(|spans| spans.to_vec())
            .find(|spans| spans.len() >= 4)
            .unwrap_or_default();
        std::future::ready(!chain.is_empty())
    })
    .await
    .expect("a trace with 4 spans reached the receivers");
    let span = |node: &str| {
        chain
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, s)| s.clone())
            .unwrap_or_else(|| panic!("no span of {node}: {chain:?}"))
    };
    let (a1, agw, bgw, b1) = (span("a1"), span("agw"), span("bgw"), span("b1"));
    assert!(a1.parent_span_id.is_empty(), "a1 starts the trace");
    assert_eq!(agw.parent_span_id, a1.span_id, "agw is a1's child");
    assert_eq!(bgw.parent_span_id, agw.span_id, "bgw is agw's child");
    assert_eq!(b1.parent_span_id, bgw.span_id, "b1 is bgw's child");
    assert_eq!((a1.kind, agw.kind, bgw.kind, b1.kind), (3, 1, 1, 2));
    for s in [&agw, &bgw, &b1] {
        assert_eq!(s.trace_id, a1.trace_id);
        assert!(s.start_time_unix_nano >= a1.start_time_unix_nano, "{s:?}");
    }
    // The golden series name the other cluster at both ends.
    let ok = |node: &'static str, direction: &'static str| {
        let mesh = &mesh;
        async move {
            let text = mesh
                .node(node)
                .get_text("/metrics")
                .await
                .unwrap_or_default();
            let m = super::telemetry::samples(&text);
            super::telemetry::sum(
                &m,
                "meshnode_connections_total",
                &[
                    ("direction", direction),
                    ("source_cluster", "a"),
                    ("destination_service", "echo"),
                    ("destination_cluster", "b"),
                    ("result", "ok"),
                ],
            )
        }
    };
    wait_until(Duration::from_secs(5), || async {
        ok("a1", "out").await >= 1.0 && ok("b1", "in").await >= 1.0
    })
    .await
    .expect("a1 counts the call out to b, b1 counts it in from a");
}
