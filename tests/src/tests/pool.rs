//! Membership, catalog propagation, failure detection and graceful leave.

use std::time::Duration;

use crate::tests::start_pool;
use crate::{echo_server, echo_service, subnet, wait_until, NodeProc, NodeSpec, Pki};

/// Kill -9 must be noticed, and the instance withdrawn, on every survivor within this bound.
/// Measured ~1.5-2.5 s with 250 ms rounds and phi 8.
const DETECTION_BOUND: Duration = Duration::from_secs(6);
/// A new instance must reach every node within this bound. Measured well under 1 s.
const PROPAGATION_BOUND: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_form_a_pool_and_report_health() {
    let pki = Pki::new();
    let nodes = start_pool(&pki, subnet(), vec![String::new(); 3]).await;
    for n in &nodes {
        let members = n.members().await;
        assert_eq!(members.len(), 3, "{members:?}");
        let health = n.get("/v1/health").await.unwrap();
        assert_eq!(health["status"], "ok");
        let status = n.get("/v1/status").await.unwrap();
        assert_eq!(status["pools"]["lan"]["alive"], 3);
        assert!(status["cert_expires_in_seconds"].as_i64().unwrap() > 3000);
        assert_eq!(
            status["identity"],
            format!("spiffe://acme/cluster/east/node/{}", n.spec.name)
        );
    }
    let metrics = crate::http_get(nodes[0].spec.admin, "/metrics")
        .await
        .unwrap();
    assert!(metrics.contains("meshnode_gossip_members{"), "{metrics}");
    assert!(
        metrics.contains("meshnode_gossip_messages_total{"),
        "{metrics}"
    );
    assert!(
        metrics.contains("# HELP meshnode_gossip_members"),
        "{metrics}"
    );
    // Logs to a file (as under journald) are plain text: no colour codes.
    let log = nodes[0].log_text();
    assert!(log.contains("INFO"), "{log}");
    assert!(!log.contains('\x1b'), "ANSI codes in a log file: {log:?}");
}

/// `log_format = "json"`: every line the agent writes is one JSON object
/// with a level, a target and the event's fields, for log shippers.
#[tokio::test(flavor = "multi_thread")]
async fn log_format_json_writes_one_object_per_line() {
    let pki = Pki::new();
    let net = subnet();
    let mut spec = NodeSpec::new(net, 1, "node-1");
    spec.top = "log_format = \"json\"\n".to_string();
    let dir = pki.issue("east", "node-1");
    let node = NodeProc::start(spec, &dir);
    let up = wait_until(Duration::from_secs(15), || async {
        node.members().await.len() == 1
    })
    .await;
    assert!(up.is_some(), "node never came up: {}", node.log_text());
    let log = node.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log lines");
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line:?}"));
        assert!(v["level"].is_string(), "{line}");
        assert!(v["target"].is_string(), "{line}");
        assert!(v["fields"].is_object(), "{line}");
        assert!(v["timestamp"].is_string(), "{line}");
    }
    assert!(
        lines.iter().any(|l| l.contains("\"level\":\"INFO\"")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_service_reaches_every_node_and_a_kill_removes_it() {
    let pki = Pki::new();
    let net = subnet();
    let nodes = start_pool(&pki, net, vec![String::new(); 3]).await;
    // A fourth node registers a service after the pool formed.
    let ip = std::net::Ipv4Addr::new(127, net[0], net[1], 4);
    let (echo, _task) = echo_server(ip).await;
    let mut spec = NodeSpec::new(net, 4, "node-4");
    spec.seeds = vec![nodes[1].spec.quic];
    spec.extra = echo_service("echo", echo);
    let dir = pki.issue("east", "node-4");
    let mut n4 = NodeProc::start(spec, &dir);
    for n in &nodes {
        let took = wait_until(Duration::from_secs(10) + PROPAGATION_BOUND, || async {
            n.instances("echo").await == vec![("node-4".to_string(), "passing".to_string())]
        })
        .await;
        assert!(
            took.is_some(),
            "{} never saw node-4's echo instance",
            n.spec.name
        );
    }
    n4.kill9();
    for n in &nodes {
        let took = wait_until(DETECTION_BOUND, || async {
            n.instances("echo").await.is_empty()
        })
        .await;
        let took = took.unwrap_or_else(|| {
            panic!(
                "{} still lists node-4's instance {DETECTION_BOUND:?} after kill -9",
                n.spec.name
            )
        });
        eprintln!(
            "{} dropped node-4's instance {took:?} after kill -9",
            n.spec.name
        );
        let members = n.members().await;
        assert!(
            members.contains(&("node-4".to_string(), "dead".to_string())),
            "{members:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn leave_and_sigterm_withdraw_instances_at_once_and_exit_zero() {
    let pki = Pki::new();
    let net = subnet();
    let ip = std::net::Ipv4Addr::new(127, net[0], net[1], 1);
    let (echo, _task) = echo_server(ip).await;
    let mut nodes = start_pool(
        &pki,
        net,
        vec![
            String::new(),
            echo_service("echo", echo),
            echo_service("echo", echo),
        ],
    )
    .await;
    assert!(wait_until(Duration::from_secs(5), || async {
        nodes[0].instances("echo").await.len() == 2
    })
    .await
    .is_some());

    // `meshnode leave` on node-2.
    let out = crate::meshnode(&[
        "leave",
        "--admin",
        &nodes[1].spec.admin.to_string(),
        "--data-dir",
        &nodes[1].data_dir().display().to_string(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("leave --json prints JSON");
    assert_eq!(answer["status"], "leaving");
    // Well below failure detection: the leave is announced, not detected.
    let took = wait_until(Duration::from_secs(2), || async {
        nodes[0].instances("echo").await.len() == 1
    })
    .await;
    assert!(
        took.is_some(),
        "leave did not withdraw node-2's instance quickly"
    );
    assert_eq!(nodes[1].wait_exit(Duration::from_secs(15)), Some(0));
    let members = nodes[0].members().await;
    assert!(
        members.contains(&("node-2".to_string(), "left".to_string())),
        "{members:?}"
    );

    // SIGTERM on node-3 does the same.
    nodes[2].signal("TERM");
    let took = wait_until(Duration::from_secs(2), || async {
        nodes[0].instances("echo").await.is_empty()
    })
    .await;
    assert!(
        took.is_some(),
        "SIGTERM did not withdraw node-3's instance quickly"
    );
    assert_eq!(nodes[2].wait_exit(Duration::from_secs(15)), Some(0));
    assert!(nodes[2].log_text().contains("stopped"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_from_another_ca_never_joins() {
    let pki = Pki::new();
    let net = subnet();
    let nodes = start_pool(&pki, net, vec![String::new(); 2]).await;
    let rogue_pki = Pki::new(); // same mesh name and cluster, different CA
    let mut spec = NodeSpec::new(net, 9, "rogue");
    spec.seeds = vec![nodes[0].spec.quic, nodes[1].spec.quic];
    let dir = rogue_pki.issue("east", "rogue");
    let rogue = NodeProc::start(spec, &dir);
    tokio::time::sleep(Duration::from_secs(3)).await;
    for n in &nodes {
        let members = n.members().await;
        assert!(!members.iter().any(|(m, _)| m == "rogue"), "{members:?}");
        assert_eq!(members.len(), 2);
    }
    let rogue_members = rogue.members().await;
    assert_eq!(
        rogue_members.len(),
        1,
        "the rogue must see only itself: {rogue_members:?}"
    );
}

/// Expiry watch: `/v1/status`, the metric, and `meshnode status --check` for monitoring.
#[tokio::test(flavor = "multi_thread")]
async fn status_check_fails_when_the_certificate_or_ca_expires_within_a_day() {
    // The tests' default PKI lives one hour: both the node certificate and the CA warn.
    let pki = Pki::new();
    let nodes = start_pool(&pki, subnet(), vec![String::new()]).await;
    let admin = nodes[0].spec.admin.to_string();
    let out = crate::meshnode(&["status", "--check", "--admin", &admin]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("warning: node certificate expires in"),
        "{text}"
    );
    assert!(
        text.contains("warning: mesh CA certificate expires in"),
        "{text}"
    );
    let status = nodes[0].get("/v1/status").await.unwrap_or_default();
    let ca_left = status["ca_expires_in_seconds"].as_i64().unwrap_or(-1);
    assert!((3000..=3600).contains(&ca_left), "{status}");
    let metrics = nodes[0].get_text("/metrics").await.unwrap_or_default();
    assert!(metrics.contains("meshnode_ca_expiry_seconds"), "{metrics}");
    // Without --check the same status is informational and exits 0.
    assert_eq!(
        crate::meshnode(&["status", "--admin", &admin])
            .status
            .code(),
        Some(0)
    );

    // A month of validity: no warning, --check passes.
    let pki = Pki::with_validity(Duration::from_secs(30 * 24 * 3600));
    let nodes = start_pool(&pki, subnet(), vec![String::new()]).await;
    let admin = nodes[0].spec.admin.to_string();
    let out = crate::meshnode(&["status", "--check", "--admin", &admin]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The sum over `nodes` of a counter's samples whose labels contain all of `labels`.
async fn counter_sum(nodes: &[NodeProc], name: &str, labels: &[&str]) -> u64 {
    let mut total = 0;
    for n in nodes {
        let text = crate::http_get(n.spec.admin, "/metrics")
            .await
            .unwrap_or_default();
        total += text
            .lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64;
    }
    total
}

/// A node pair gossips over one connection: the side that did not dial adopts
/// the other's. Three nodes make three pairs, so three gossip handshakes (four
/// if two nodes happened to dial each other at the same moment), not six.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_pair_shares_one_gossip_connection() {
    let pki = Pki::new();
    let nodes = start_pool(&pki, subnet(), vec![String::new(); 3]).await;
    // Let every pair exchange gossip both ways for a while (250 ms rounds).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let hs = "meshnode_quic_handshakes_total{";
    let out = counter_sum(
        &nodes,
        hs,
        &["direction=\"out\"", "alpn=\"gossip\"", "result=\"ok\""],
    )
    .await;
    let inn = counter_sum(
        &nodes,
        hs,
        &["direction=\"in\"", "alpn=\"gossip\"", "result=\"ok\""],
    )
    .await;
    assert!((3..=4).contains(&out), "gossip handshakes out: {out}");
    assert_eq!(out, inn);
    // And gossip still flows both ways on them: every node sees every other alive.
    for n in &nodes {
        let alive = n
            .members()
            .await
            .iter()
            .filter(|(_, s)| s == "alive")
            .count();
        assert_eq!(alive, 3, "{}", n.spec.name);
    }
}

/// A SYN with an empty digest, as chitchat 0.11 serializes it (built from the
/// public serialization of BadCluster: same header, another message type).
fn empty_syn(cluster_id: &str) -> Vec<u8> {
    use meshnode_gossip::chitchat::{ChitchatMessage, Serializable};
    let mut b = ChitchatMessage::BadCluster.serialize_to_vec();
    let last = b.len() - 1;
    b[last] = 0; // Syn
    b.extend(0u16.to_le_bytes()); // no digest entries
    cluster_id.to_string().serialize(&mut b);
    b
}

/// A node speaks each gossip frame version its peer offers: a peer that knows
/// only `meshnode-gossip/1` gets uncompressed frames, a newer one zstd. The
/// node answers a SYN on the peer's own connection (adopted for sending).
#[tokio::test(flavor = "multi_thread")]
async fn gossip_frames_follow_the_version_each_peer_offers() {
    use meshnode_gossip::chitchat::ChitchatMessage;
    use meshnode_gossip::frame::Codec;
    use meshnode_transport::{alpn, negotiated_alpn, tls};

    let pki = Pki::new();
    let nodes = start_pool(&pki, subnet(), vec![String::new()]).await;
    let d = pki.issue("east", "old-peer");
    let me = std::sync::Arc::new(
        tls::TlsMaterial::load(&d.join("ca.pem"), &d.join("node.pem"), &d.join("node.key"))
            .unwrap(),
    );
    let transport = std::sync::Arc::new(tls::transport_config(tls::Link::Gossip));
    let dict = meshnode_gossip::frame::Dictionary::for_pool(
        "acme/east",
        "spiffe://acme/cluster/east/node/",
    );
    for (offers, codec) in [
        (&[alpn::GOSSIP][..], Codec::Raw),
        (&[alpn::GOSSIP_V2, alpn::GOSSIP][..], Codec::Zstd),
        (
            &[alpn::GOSSIP_V3, alpn::GOSSIP_V2, alpn::GOSSIP][..],
            Codec::Pool(dict.clone()),
        ),
    ] {
        let client = quinn::Endpoint::client((nodes[0].spec.ip, 0).into()).unwrap();
        let cfg = me.client_config(offers, transport.clone()).unwrap();
        let conn = client
            .connect_with(cfg, nodes[0].spec.quic, "meshnode")
            .unwrap()
            .await
            .unwrap();
        assert_eq!(
            Codec::for_alpn(negotiated_alpn(&conn).as_deref(), &dict),
            codec
        );
        let mut s = conn.open_uni().await.unwrap();
        s.write_all(&codec.encode(&empty_syn("acme/east")).unwrap())
            .await
            .unwrap();
        s.finish().unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), async {
            let mut r = conn.accept_uni().await.unwrap();
            r.read_to_end(65_507).await.unwrap()
        })
        .await
        .expect("the node answers on our connection");
        match codec.decode(&reply) {
            Ok(ChitchatMessage::SynAck { .. }) => {}
            other => panic!("{codec:?}: expected a SYN-ACK, got {other:?}"),
        }
        conn.close(0u32.into(), b"done");
        client.wait_idle().await;
    }
}
