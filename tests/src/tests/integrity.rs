//! An insider with one valid certificate of the cluster speaks the gossip
//! wire format directly (meshnode's own codec) and tries each attack that
//! broke a 3-node cluster before the gate existed. Nothing else may change:
//! every real node stays alive everywhere, catalogs unchanged, traffic
//! through an upstream keeps flowing, memory bounded, no phantom members, no
//! fake gateway or remote cluster, health 200.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use meshnode_gossip::frame::Codec;
use meshnode_gossip::signed::{self, CERT_KEY};
use meshnode_gossip::wire::{
    self, Blocks, KeyValue, Message, NodeDelta, NodeDigest, NodeId, Status,
};
use meshnode_transport::alpn::Alpn;
use meshnode_transport::pki::sign::NodeSigner;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::tests::{loopback_endpoint, material, start_pool};
use crate::{echo_server, echo_service, subnet, upstream, wait_until, Pki};

const POOL: &str = "acme/east";

/// The pool's frame dictionary: derived from public names, so an insider has it too.
fn pool_dict() -> std::sync::Arc<meshnode_gossip::frame::Dictionary> {
    meshnode_gossip::frame::Dictionary::for_pool(POOL, "spiffe://acme/cluster/east/node/")
}

/// The insider: a real endpoint with a real certificate of cluster east.
struct Insider {
    endpoint: meshnode_transport::Endpoint,
    signer: NodeSigner,
    cert_der: Vec<u8>,
    id: String,
}

impl Insider {
    async fn send(&self, to: SocketAddr, msg: &Message) {
        let (conn, _) = self.endpoint.connect(to, Alpn::Gossip).await.expect("dial");
        let frame = Codec::of(&conn, &pool_dict())
            .encode(&wire::encode(msg, Blocks::Chitchat))
            .expect("frame");
        self.send_frame(&conn, &frame).await;
    }

    async fn send_frame(&self, conn: &quinn::Connection, frame: &[u8]) {
        let mut s = conn.open_uni().await.expect("stream");
        s.write_all(frame).await.expect("write");
        s.finish().expect("finish");
    }

    /// Asks `to` for its whole state (a SYN with an empty digest) and decodes the answer.
    async fn learn(&self, to: SocketAddr) -> (Vec<(NodeId, NodeDigest)>, Vec<NodeDelta>) {
        let (conn, _) = self.endpoint.connect(to, Alpn::Gossip).await.expect("dial");
        let syn = Message::Syn {
            cluster_id: POOL.into(),
            digest: vec![],
        };
        let frame = Codec::of(&conn, &pool_dict())
            .encode(&wire::encode(&syn, Blocks::Chitchat))
            .unwrap();
        self.send_frame(&conn, &frame).await;
        let answer = tokio::time::timeout(Duration::from_secs(5), async {
            let mut r = conn.accept_uni().await.expect("an answer stream");
            r.read_to_end(1 << 20).await.expect("read the answer")
        })
        .await
        .expect("the victim answers a SYN");
        let bytes = Codec::of(&conn, &pool_dict())
            .unframe(&answer)
            .unwrap()
            .into_owned();
        match wire::decode(&bytes, &wire::Limits::default()).unwrap() {
            Message::SynAck { digest, delta } => (digest, delta),
            other => panic!("expected a SYN-ACK, got {other:?}"),
        }
    }

    /// A value of `node_id` signed with the insider's own key.
    fn kv(
        &self,
        node_id: &str,
        generation: u64,
        key: &str,
        version: u64,
        payload: &str,
    ) -> KeyValue {
        let input = signed::signing_input(POOL, node_id, generation, key, version, payload);
        KeyValue {
            key: key.into(),
            value: signed::seal(payload, &self.signer.sign(&input).unwrap()),
            version,
            status: Status::Set,
        }
    }
}

fn node_delta(id: NodeId, from: u64, key_values: Vec<KeyValue>) -> NodeDelta {
    NodeDelta {
        id,
        last_gc_version: 0,
        from_version_excluded: from,
        key_values,
        set_max_version: vec![],
    }
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn echo_through(addr: SocketAddr) -> bool {
    let work = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"ping-integrity").await.ok()?;
        let mut buf = [0u8; 14];
        s.read_exact(&mut buf).await.ok()?;
        Some(&buf == b"ping-integrity")
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_insider_cannot_rewrite_crash_or_flood_the_pool() {
    let pki = Pki::new();
    let net = subnet();
    let ip = |h| Ipv4Addr::new(127, net[0], net[1], h);
    let (echo, _task) = echo_server(ip(2)).await;
    let up = crate::free_tcp(ip(3));
    let nodes = start_pool(
        &pki,
        net,
        vec![
            String::new(),
            echo_service("api", echo),
            upstream("api", up),
        ],
    )
    .await;
    for n in &nodes {
        let ok = wait_until(Duration::from_secs(10), || async {
            n.instances("api").await == vec![("node-2".to_string(), "passing".to_string())]
        })
        .await;
        assert!(ok.is_some(), "{} never saw api on node-2", n.spec.name);
    }
    assert!(echo_through(up).await, "traffic before the attacks");

    let tls = material(&pki, "mallory");
    let me = tls.me();
    let cert_der = tls.cert_der().to_vec();
    let key_pem = std::fs::read_to_string(pki.dir.path().join("east-mallory/node.key")).unwrap();
    let (endpoint, _incoming) = loopback_endpoint(tls);
    let insider = Insider {
        endpoint,
        signer: NodeSigner::from_pem(&key_pem).unwrap(),
        cert_der,
        id: me.identity.uri(),
    };
    let victim = nodes[0].spec.quic;
    let pid = nodes[0].child.as_ref().unwrap().id();
    let rss_before = peak_rss_kib(pid);
    let (digest, state) = insider.learn(victim).await;
    assert_eq!(
        state.len(),
        3,
        "the insider learns the real state: {digest:?}"
    );
    let node2 = state
        .iter()
        .find(|d| d.id.node_id.ends_with("/node/node-2"))
        .expect("node-2 in the state")
        .clone();
    let node2_max = node2.key_values.last().unwrap().version;

    // 1. `leaving` under node-2's id (signed by the insider's key).
    let leave = node_delta(
        node2.id.clone(),
        node2_max,
        vec![insider.kv(
            &node2.id.node_id,
            node2.id.generation,
            "leaving",
            node2_max + 1,
            "1",
        )],
    );
    // 2. Thousands of invented node ids, in the digest and in the delta.
    let phantoms: Vec<NodeId> = (0..3_000)
        .map(|i| NodeId {
            node_id: format!("spiffe://acme/cluster/east/node/ghost-{i}"),
            generation: 1,
            addr: SocketAddr::from(([127, 0, 0, 1], 10_000 + (i % 50_000) as u16)),
        })
        .collect();
    let phantom_digest: Vec<(NodeId, NodeDigest)> = phantoms
        .iter()
        .map(|id| {
            (
                id.clone(),
                NodeDigest {
                    heartbeat: 1_000,
                    last_gc_version: 0,
                    max_version: 1,
                },
            )
        })
        .collect();
    let phantom_delta: Vec<NodeDelta> = phantoms
        .iter()
        .take(500)
        .map(|id| {
            node_delta(
                id.clone(),
                0,
                vec![insider.kv(&id.node_id, 1, "leaving", 1, "1")],
            )
        })
        .collect();
    // 3. Higher generations of every real node, bit-flipped copies of their real values.
    let shadows: Vec<NodeDelta> = state
        .iter()
        .map(|d| {
            let mut d = d.clone();
            d.id.generation += 1_000_000_000;
            for kv in &mut d.key_values {
                kv.value = kv.value.replacen('A', "B", 1);
            }
            d
        })
        .collect();
    // 4. A max version below a key's version (chitchat's assert), for node-2 and for itself.
    let mut low_max = node_delta(
        node2.id.clone(),
        node2_max,
        vec![insider.kv(
            &node2.id.node_id,
            node2.id.generation,
            "svc:x:1",
            node2_max + 5,
            "eA",
        )],
    );
    low_max.set_max_version = vec![(1, 1)];
    // 5. The insider's own state claiming a gateway, a remote cluster and the CA role.
    let mine = NodeId {
        node_id: insider.id.clone(),
        generation: 7,
        addr: SocketAddr::from(([127, 0, 0, 1], 9)),
    };
    let info = meshnode_gossip::keys::encode_node(&meshnode_gossip::NodeInfo {
        cluster: "east".into(),
        advertise: "127.0.0.1:9".parse().unwrap(),
        gateway: true,
        version: "x".into(),
    })
    .unwrap();
    let remote =
        meshnode_gossip::federation::encode_remote(&meshnode_gossip::federation::RemoteService {
            service: "api".into(),
            cluster: "west".into(),
            healthy: 9,
            tags: vec![],
            gateways: vec!["gw-x".into()],
            reachable: true,
            rtt_ms: Some(1),
        })
        .unwrap();
    let fake_roles = node_delta(
        mine.clone(),
        0,
        vec![
            insider.kv(
                &insider.id,
                7,
                CERT_KEY,
                1,
                &signed::encode_cert(&insider.cert_der),
            ),
            insider.kv(&insider.id, 7, "node", 2, &info),
            insider.kv(&insider.id, 7, "role:ca", 3, "AAAA"),
            insider.kv(&insider.id, 7, "wan:west:api", 4, &remote),
        ],
    );
    for n in &nodes {
        let to = n.spec.quic;
        insider
            .send(
                to,
                &Message::Ack {
                    delta: vec![leave.clone()],
                },
            )
            .await;
        insider
            .send(
                to,
                &Message::SynAck {
                    digest: phantom_digest.clone(),
                    delta: phantom_delta.clone(),
                },
            )
            .await;
        insider
            .send(
                to,
                &Message::Ack {
                    delta: shadows.clone(),
                },
            )
            .await;
        insider
            .send(
                to,
                &Message::Ack {
                    delta: vec![low_max.clone()],
                },
            )
            .await;
        insider
            .send(
                to,
                &Message::SynAck {
                    digest: vec![(mine.clone(), NodeDigest::default())],
                    delta: vec![fake_roles.clone()],
                },
            )
            .await;
    }
    // 6. A small frame whose inner chitchat blocks expand without bound.
    let block = zstd::bulk::compress(&vec![0u8; 65_535], 0).unwrap();
    let mut bomb = vec![0x53, 0xb0, 0, 2]; // magic 45139 LE, version 0, Ack
    for _ in 0..40_000 {
        bomb.push(1);
        bomb.extend_from_slice(&(block.len() as u16).to_le_bytes());
        bomb.extend_from_slice(&block);
    }
    bomb.push(0);
    let (conn, _) = insider
        .endpoint
        .connect(victim, Alpn::Gossip)
        .await
        .unwrap();
    let frame = zstd::bulk::compress(&bomb, 19).unwrap();
    assert!(
        frame.len() < 65_507,
        "the bomb fits one frame: {}",
        frame.len()
    );
    for _ in 0..5 {
        insider.send_frame(&conn, &frame).await;
    }

    // Let several rounds pass, then nothing may have changed.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for n in &nodes {
        let mut members = n.members().await;
        members.sort();
        assert_eq!(
            members,
            vec![
                ("node-1".to_string(), "alive".to_string()),
                ("node-2".to_string(), "alive".to_string()),
                ("node-3".to_string(), "alive".to_string()),
            ],
            "{}: no phantom, no insider, nobody dead or left",
            n.spec.name
        );
        assert_eq!(
            n.instances("api").await,
            vec![("node-2".to_string(), "passing".to_string())],
            "{}",
            n.spec.name
        );
        let services = n.get("/v1/services").await.unwrap();
        let listed: Vec<&String> = services.as_object().unwrap().keys().collect();
        assert_eq!(
            listed,
            vec!["api"],
            "{}: no fake remote cluster: {services}",
            n.spec.name
        );
        let wan_members = n.get("/v1/members").await.unwrap();
        assert!(
            wan_members
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["gateway"] == false),
            "{}: nobody is a gateway: {wan_members}",
            n.spec.name
        );
        assert_eq!(n.get("/v1/health").await.unwrap()["status"], "ok");
    }
    assert!(echo_through(up).await, "traffic after the attacks");
    let grew = peak_rss_kib(pid).saturating_sub(rss_before);
    assert!(grew < 64 * 1024, "the victim's peak memory grew {grew} KiB");
    let metrics = crate::http_get(nodes[0].spec.admin, "/metrics")
        .await
        .unwrap();
    for reason in [
        "bad_signature",
        "unverified_digest",
        "bad_role",
        "inconsistent",
        "unverified",
        "oversized",
    ] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("meshnode_gossip_refused_total{")
                    && l.contains(&format!("reason=\"{reason}\""))),
            "no refusal counted for {reason}"
        );
    }
    // chitchat's task is alive on node-1: had it died, the others would
    // have judged node-1 dead within the 4 s above (detection takes ~2 s).
}
