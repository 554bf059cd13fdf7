//! Policy documents through the real binary: `meshnode cert issue
//! --operator`, `meshnode policy apply | get | list | delete`, adoption by
//! every node, survival of the applying node's death, a late joiner, the
//! data dir, and every kind of bad document refused and counted.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshnode_transport::pki::operator::OperatorCert;
use meshnode_transport::pki::policy::{DocHeader, SignedDocument, SigningKey};
use meshnode_transport::pki::sign::NodeSigner;
use meshnode_transport::pki::{first_cert_der, unix_now, Ca};

use super::federation::{self, Mesh};
use super::start_pool;
use crate::netns;
use crate::{http_post_json, meshnode, subnet, wait_until, NodeProc, NodeSpec, Pki, MESH};

pub(crate) const INTENTIONS: &str = r#"kind = "intentions"
name = "api"
[[rule]]
source = "service:web"
action = "allow"
[[rule]]
source = "*"
action = "deny"
"#;

/// Writes the CA to disk (once) and issues operator `name` with the CLI.
pub(crate) fn operator(pki: &Pki, name: &str) -> PathBuf {
    let ca_dir = pki.dir.path().join("ca");
    if !ca_dir.exists() {
        pki.ca.save(&ca_dir).expect("save CA");
    }
    let out = pki.dir.path().join(format!("operator-{name}"));
    let o = meshnode(&[
        "cert",
        "issue",
        "--ca",
        ca_dir.to_str().expect("path"),
        "--operator",
        name,
        "--out",
        out.to_str().expect("path"),
    ]);
    assert!(
        o.status.success(),
        "cert issue --operator: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// `meshnode policy ARGS --operator-cert .. --operator-key .. --admin ADDR`.
pub(crate) fn policy(
    op: &Path,
    admin: std::net::SocketAddr,
    args: &[&str],
) -> std::process::Output {
    let cert = op.join("operator.pem");
    let key = op.join("operator.key");
    let admin = admin.to_string();
    let mut all: Vec<&str> = vec!["policy"];
    all.extend_from_slice(args);
    if matches!(args.first(), Some(&"apply" | &"delete")) {
        all.extend([
            "--operator-cert",
            cert.to_str().expect("path"),
            "--operator-key",
            key.to_str().expect("path"),
        ]);
    }
    all.extend(["--admin", &admin]);
    meshnode(&all)
}

/// The version of `kind/name` a node holds, and whether it is a tombstone.
pub(crate) async fn held(node: &NodeProc, kind: &str, name: &str) -> Option<(u64, bool, String)> {
    let v = node.get(&format!("/v1/policy/{kind}/{name}")).await?;
    let s = v.get("summary")?;
    Some((
        s.get("version")?.as_u64()?,
        s.get("deleted")?.as_bool()?,
        s.get("digest")?.as_str()?.to_string(),
    ))
}

pub(crate) fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write document");
    p
}

pub(crate) fn ok(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

async fn wait_all(nodes: &[&NodeProc], kind: &str, name: &str, version: u64) -> Duration {
    let mut last = Duration::ZERO;
    for n in nodes {
        let t = wait_until(Duration::from_secs(20), || async {
            held(n, kind, name)
                .await
                .is_some_and(|(v, _, _)| v == version)
        })
        .await;
        match t {
            Some(t) => last = t,
            None => panic!(
                "{} never held {kind}/{name} version {version}: {:?}",
                n.spec.name,
                held(n, kind, name).await
            ),
        }
    }
    last
}

#[tokio::test(flavor = "multi_thread")]
async fn a_document_reaches_every_node_outlives_its_applier_and_reaches_a_late_joiner() {
    let pki = Pki::new();
    let net = subnet();
    let mut nodes = start_pool(&pki, net, vec![String::new(); 3]).await;
    let op = operator(&pki, "alice");
    let doc = write(pki.dir.path(), "api.toml", INTENTIONS);

    // Every node reports policy as loaded once it has exchanged state.
    for n in &nodes {
        let loaded = wait_until(Duration::from_secs(10), || async {
            n.get("/v1/status")
                .await
                .is_some_and(|s| s["policy"]["loaded"] == true)
        })
        .await;
        assert!(loaded.is_some(), "{} never loaded policy", n.spec.name);
    }

    let out = ok(&policy(
        &op,
        nodes[0].spec.admin,
        &["apply", doc.to_str().expect("path")],
    ));
    assert!(out.contains("applied intentions/api version 1"), "{out}");
    assert!(out.contains("spiffe://acme/operator/alice"), "{out}");
    let refs: Vec<&NodeProc> = nodes.iter().collect();
    let spread = wait_all(&refs, "intentions", "api", 1).await;
    eprintln!(
        "measure: intentions/api on 3 nodes {:.2?} after apply",
        spread
    );

    // get and list show it.
    let got = ok(&policy(
        &op,
        nodes[2].spec.admin,
        &["get", "intentions", "api"],
    ));
    assert!(
        got.contains("version 1 signed by spiffe://acme/operator/alice"),
        "{got}"
    );
    assert!(got.contains("source = \"service:web\""), "{got}");
    let list = ok(&policy(&op, nodes[1].spec.admin, &["list"]));
    assert!(
        list.contains("intentions") && list.contains("in force"),
        "{list}"
    );

    // The applying node dies; a node that joins later still receives it.
    nodes[0].kill9();
    let mut spec = NodeSpec::new(net, 4, "node-4");
    spec.seeds = vec![nodes[1].spec.quic];
    let dir = pki.issue(&spec.cluster, "node-4");
    let late = NodeProc::start(spec, &dir);
    wait_all(&[&late], "intentions", "api", 1).await;
    // The document may come by a push before the first full exchange,
    // which is what marks the policy loaded.
    let loaded = wait_until(Duration::from_secs(10), || async {
        late.get("/v1/status")
            .await
            .is_some_and(|s| s["policy"]["loaded"] == true)
    })
    .await;
    assert!(loaded.is_some(), "{:?}", late.get("/v1/status").await);

    // A new version from another node, then a delete (a tombstone).
    let v2 = INTENTIONS.replace("service:web", "service:frontend");
    let doc2 = write(pki.dir.path(), "api2.toml", &v2);
    let out = ok(&policy(
        &op,
        nodes[1].spec.admin,
        &["apply", doc2.to_str().expect("path")],
    ));
    assert!(out.contains("version 2"), "{out}");
    wait_all(&[&nodes[1], &nodes[2], &late], "intentions", "api", 2).await;
    let out = ok(&policy(
        &op,
        late.spec.admin,
        &["delete", "intentions", "api"],
    ));
    assert!(out.contains("tombstone version 3"), "{out}");
    wait_all(&[&nodes[1], &nodes[2], &late], "intentions", "api", 3).await;
    assert!(held(&nodes[2], "intentions", "api").await.expect("held").1);
    let list = ok(&policy(&op, nodes[2].spec.admin, &["list"]));
    assert!(list.contains("deleted"), "{list}");

    // The data dir keeps them: a restarted node has them before any gossip.
    let spec = nodes[2].spec.clone();
    let dir = nodes[2].data_dir();
    nodes[2].kill9();
    let restarted = NodeProc::start(spec, &dir);
    wait_all(&[&restarted], "intentions", "api", 3).await;
    let log = restarted.log_text();
    assert!(log.contains("policy documents loaded"), "{log}");
}

/// Signs `source` in-process (what the CLI does) with chosen header fields.
fn sign(key: &SigningKey<'_>, version: u64, signed_at: i64, source: &str) -> String {
    SignedDocument::sign(
        key,
        DocHeader {
            mesh: MESH.into(),
            kind: "intentions".into(),
            name: "api".into(),
            version,
            signed_at,
            deleted: false,
        },
        source.into(),
    )
    .expect("sign")
    .text()
    .to_string()
}

fn operator_key(ca: &Ca, name: &str, validity: Duration) -> (SigningKey<'static>, OperatorCert) {
    let op = ca.issue_operator(name, validity).expect("operator");
    let cert_der = first_cert_der(&op.cert_pem).expect("der");
    let cert = OperatorCert::from_der(&cert_der).expect("operator cert");
    (
        SigningKey::Operator {
            cert_der,
            key: NodeSigner::from_pem(&op.key_pem).expect("key"),
        },
        cert,
    )
}

async fn post(node: &NodeProc, text: &str) -> (String, String) {
    let body = serde_json::json!({ "document": text }).to_string();
    http_post_json(node.spec.admin, "/v1/policy", &body)
        .await
        .expect("admin API answers")
}

fn counted(metrics: &str, reason: &str) -> u64 {
    metrics
        .lines()
        .find(|l| {
            l.starts_with("meshnode_policy_refused_total")
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_unsigned_tampered_replayed_expired_and_non_operator_documents_are_refused_and_counted(
) {
    let pki = Pki::new();
    let nodes = start_pool(&pki, subnet(), vec![String::new(); 2]).await;
    let node = &nodes[0];
    let now = unix_now();
    let (alice, _) = operator_key(&pki.ca, "alice", Duration::from_secs(3600));

    // Good: versions 1 and 2.
    let v1 = sign(&alice, 1, now, INTENTIONS);
    let v2 = sign(&alice, 2, now, INTENTIONS);
    assert!(post(node, &v1).await.0.contains("200"));
    assert!(post(node, &v2).await.0.contains("200"));
    // Replayed old: refused, the newer one stays.
    let (status, body) = post(node, &v1).await;
    assert!(status.contains("409"), "{status} {body}");
    assert_eq!(held(node, "intentions", "api").await.expect("held").0, 2);

    let mut cases: Vec<(&str, String)> = Vec::new();
    // Forged: an operator of another CA with the same mesh name.
    let rogue = Ca::generate(MESH, Duration::from_secs(3600)).expect("rogue CA");
    let (mallory, _) = operator_key(&rogue, "alice", Duration::from_secs(3600));
    cases.push(("unknown_ca", sign(&mallory, 9, now, INTENTIONS)));
    // Signed by the rogue CA key itself.
    cases.push((
        "bad_signature",
        sign(&SigningKey::Ca(&rogue), 9, now, INTENTIONS),
    ));
    // Tampered: the text of a good document with one character changed.
    let good = sign(&alice, 9, now, INTENTIONS);
    let mut bytes = base64_decode(&good);
    let at = bytes
        .windows(3)
        .position(|w| w == b"web")
        .expect("source in the encoding");
    bytes[at] = b'W';
    cases.push(("bad_signature", base64_encode(&bytes)));
    // Unsigned: not even the envelope.
    cases.push(("malformed", base64_encode(INTENTIONS.as_bytes())));
    // Signed after the signer's certificate expired.
    let (short, short_cert) = operator_key(&pki.ca, "temp", Duration::from_secs(60));
    cases.push((
        "expired_signer",
        sign(&short, 9, short_cert.not_after + 30, INTENTIONS),
    ));
    // Signed by a node certificate, not an operator's.
    let node_dir = pki.issue("east", "intruder");
    let node_cert =
        first_cert_der(&std::fs::read_to_string(node_dir.join("node.pem")).expect("node cert"))
            .expect("der");
    let node_key = NodeSigner::from_pem(
        &std::fs::read_to_string(node_dir.join("node.key")).expect("node key"),
    )
    .expect("key");
    cases.push((
        "not_operator",
        SignedDocument::sign_unchecked(
            &node_cert,
            &node_key,
            DocHeader {
                mesh: MESH.into(),
                kind: "intentions".into(),
                name: "api".into(),
                version: 9,
                signed_at: now,
                deleted: false,
            },
            INTENTIONS.into(),
        )
        .expect("sign"),
    ));
    // A valid signature over a document that breaks the schema.
    cases.push((
        "invalid",
        sign(
            &alice,
            9,
            now,
            &INTENTIONS.replace("action = \"deny\"", "action = \"maybe\""),
        ),
    ));

    for (reason, text) in &cases {
        let (status, body) = post(node, text).await;
        assert!(status.contains("400"), "{reason}: {status} {body}");
        assert!(body.contains(reason), "{reason}: {body}");
    }
    assert_eq!(
        held(node, "intentions", "api").await.expect("held").0,
        2,
        "no refused document replaced version 2"
    );
    let metrics = node.get_text("/metrics").await.expect("metrics");
    for (reason, _) in &cases {
        assert!(
            counted(&metrics, reason) >= 1,
            "{reason} not counted:\n{metrics}"
        );
    }
    assert!(counted(&metrics, "stale") >= 1, "stale not counted");
    // The other node adopted version 2 only.
    wait_all(&[&nodes[1]], "intentions", "api", 2).await;

    // A document signed within its signer's validity outlives the certificate.
    let (brief, brief_cert) = operator_key(&pki.ca, "brief", Duration::from_secs(4));
    let doc = sign(&brief, 3, unix_now(), INTENTIONS);
    let wait = (brief_cert.not_after - unix_now() + 1).max(0) as u64;
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let (status, body) = post(node, &doc).await;
    assert!(status.contains("200"), "{status} {body}");
    wait_all(&[&nodes[1]], "intentions", "api", 3).await;
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64")
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// `meshnode policy ...` run inside `host`'s namespace (its admin API is
/// on that namespace's loopback).
pub(crate) fn policy_in(mesh: &Mesh, host: &str, op: &Path, args: &[&str]) -> std::process::Output {
    let cert = op.join("operator.pem");
    let key = op.join("operator.key");
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &mesh.topo.host(host).ns])
        .arg(crate::meshnode_bin())
        .arg("policy")
        .args(args);
    if matches!(args.first(), Some(&"apply" | &"delete")) {
        cmd.arg("--operator-cert")
            .arg(&cert)
            .arg("--operator-key")
            .arg(&key);
    }
    cmd.args(["--admin", &netns::ADMIN.to_string()])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run meshnode policy in a namespace")
}

async fn digest_of(mesh: &Mesh, name: &str) -> String {
    held(mesh.node(name), "intentions", "api")
        .await
        .map(|(_, _, d)| d)
        .unwrap_or_default()
}

/// Waits until every named node holds `kind/name` at `version` (and, if
/// given, that digest); returns when the last one did.
async fn wait_mesh(
    mesh: &Mesh,
    names: &[&str],
    version: u64,
    digest: Option<&str>,
    limit: Duration,
) -> Duration {
    let start = Instant::now();
    for name in names {
        let node = mesh.node(name);
        let ok = wait_until(limit.saturating_sub(start.elapsed()), || async {
            held(node, "intentions", "api")
                .await
                .is_some_and(|(v, _, d)| v == version && digest.is_none_or(|want| d == want))
        })
        .await;
        assert!(
            ok.is_some(),
            "{name} never held intentions/api version {version} {digest:?}: {:?}",
            held(node, "intentions", "api").await
        );
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_document_applied_in_one_cluster_reaches_both_within_twice_a_service_change() {
    if !netns::available("a_document_applied_in_one_cluster_reaches_both") {
        return;
    }
    let mut mesh = Mesh::start(federation::topology(&["bgw"]), &["b1", "b2"]).await;
    mesh.wait_remote_healthy(2).await;
    let op = operator(&mesh.pki, "alice");
    let doc = write(mesh.pki.dir.path(), "api.toml", INTENTIONS);
    let rest = ["a1", "a2", "agw", "b1", "bgw"];

    // The baseline: a service change (b2 leaves: its instance is withdrawn)
    // until every other node of both clusters sees it.
    let t = Instant::now();
    let b2_dir = mesh.node("b2").data_dir();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &mesh.topo.host("b2").ns])
        .arg(crate::meshnode_bin())
        .args(["leave", "--admin", &netns::ADMIN.to_string(), "--data-dir"])
        .arg(&b2_dir)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("meshnode leave");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in rest {
        let ok = wait_until(Duration::from_secs(20), || async {
            if name.starts_with('a') {
                mesh.remote_echo_on(name, "b")
                    .await
                    .is_some_and(|e| e["healthy"] == 1)
            } else {
                !mesh
                    .node(name)
                    .instances("echo")
                    .await
                    .iter()
                    .any(|(n, h)| n == "b2" && h == "passing")
            }
        })
        .await;
        assert!(ok.is_some(), "{name} never saw b2's instance go");
    }
    let service = t.elapsed();
    mesh.nodes.get_mut("b2").expect("b2").kill9();

    // The document, applied in cluster b, until every node of both holds it.
    let t = Instant::now();
    let out = policy_in(&mesh, "b1", &op, &["apply", doc.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_mesh(&mesh, &rest, 1, None, Duration::from_secs(20)).await;
    let document = t.elapsed();
    eprintln!(
        "measure: service change on 5 nodes of 2 clusters {:.0} ms; policy document {:.0} ms ({:.2}x)",
        service.as_secs_f64() * 1e3,
        document.as_secs_f64() * 1e3,
        document.as_secs_f64() / service.as_secs_f64()
    );
    // Both figures include a CLI process started in a namespace; on a
    // loaded 2-core CI machine that alone can take a few hundred ms, so
    // below 1 s the ratio says more about the machine than about gossip
    // (the `measure:` line above keeps the figures).
    assert!(
        document <= (service * 2).max(Duration::from_secs(1)),
        "the document took {document:?}, over twice a service change ({service:?}) and over 1 s"
    );

    // The applying node dies; a node that joins later still receives it.
    mesh.nodes.get_mut("b1").expect("b1").kill9();
    let host = mesh.topo.host("b2").clone();
    let spec = NodeSpec::in_topology(&host, vec![mesh.topo.host("bgw").quic()]);
    let dir = mesh.pki.dir.path().join("late-b2");
    std::fs::create_dir_all(&dir).expect("dir");
    for f in ["node.pem", "node.key", "ca.pem"] {
        std::fs::copy(mesh.pki.dir.path().join("b-b2").join(f), dir.join(f)).expect("copy");
    }
    mesh.nodes.insert("b2".into(), NodeProc::start(spec, &dir));
    // It restarts on its address within a second or two of its last start:
    // bgw's pooled connection to the old process must not swallow the answers.
    let t = Instant::now();
    wait_mesh(&mesh, &["b2"], 1, None, Duration::from_secs(20)).await;
    eprintln!(
        "measure: a late joiner on a restarted address held it after {:.2?}",
        t.elapsed()
    );
    let got = policy_in(&mesh, "b2", &op, &["get", "intentions", "api"]);
    assert!(
        String::from_utf8_lossy(&got.stdout).contains("service:web"),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn conflicting_applies_on_both_sides_of_a_partition_converge_after_the_heal() {
    if !netns::available("conflicting_applies_on_both_sides_of_a_partition") {
        return;
    }
    let mesh = Mesh::start(federation::topology(&["bgw"]), &[]).await;
    let op = operator(&mesh.pki, "alice");
    let all = ["a1", "a2", "agw", "b1", "b2", "bgw"];
    let v1 = write(mesh.pki.dir.path(), "v1.toml", INTENTIONS);
    let out = policy_in(&mesh, "a1", &op, &["apply", v1.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_mesh(&mesh, &all, 1, None, Duration::from_secs(20)).await;

    // Each side applies its own version 2 while the WAN is cut.
    mesh.topo.partition_wan();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left = write(
        mesh.pki.dir.path(),
        "left.toml",
        &INTENTIONS.replace("service:web", "service:left"),
    );
    let right = write(
        mesh.pki.dir.path(),
        "right.toml",
        &INTENTIONS.replace("service:web", "service:right"),
    );
    for (host, file) in [("a1", &left), ("b1", &right)] {
        let out = policy_in(&mesh, host, &op, &["apply", file.to_str().expect("path")]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("version 2"),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let da = {
        wait_mesh(&mesh, &["a1"], 2, None, Duration::from_secs(10)).await;
        digest_of(&mesh, "a1").await
    };
    let db = {
        wait_mesh(&mesh, &["b1"], 2, None, Duration::from_secs(10)).await;
        digest_of(&mesh, "b1").await
    };
    assert_ne!(da, db, "the two sides applied different documents");
    wait_mesh(&mesh, &["a2", "agw"], 2, Some(&da), Duration::from_secs(10)).await;
    wait_mesh(&mesh, &["b2", "bgw"], 2, Some(&db), Duration::from_secs(10)).await;

    // After the heal every node of both clusters holds the same one.
    mesh.topo.heal_all();
    let healed = Instant::now();
    let ok = wait_until(Duration::from_secs(60), || async {
        let mut ds = Vec::new();
        for n in all {
            ds.push(digest_of(&mesh, n).await);
        }
        ds.iter().all(|d| *d == ds[0])
    })
    .await;
    let mut ds = Vec::new();
    for n in all {
        ds.push((n, digest_of(&mesh, n).await));
    }
    assert!(ok.is_some(), "no convergence 60 s after the heal: {ds:?}");
    assert!(ds[0].1 == da || ds[0].1 == db, "{ds:?}");
    eprintln!(
        "measure: converged on {} {:.2} s after the heal",
        if ds[0].1 == da {
            "cluster a's"
        } else {
            "cluster b's"
        },
        healed.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_operators_later_documents_are_refused_and_its_earlier_ones_stand() {
    let pki = Pki::new();
    let net = subnet();
    let (ca, ca_dir) = super::onboarding::ca_node(&pki, net, "72h", "api").await;
    let op = operator(&pki, "alice");
    let doc = write(pki.dir.path(), "api.toml", INTENTIONS);
    ok(&policy(
        &op,
        ca.spec.admin,
        &["apply", doc.to_str().expect("path")],
    ));
    // Signed now, handed in after the revocation: must still count.
    let cert_der =
        first_cert_der(&std::fs::read_to_string(op.join("operator.pem")).expect("operator cert"))
            .expect("der");
    let key = SigningKey::Operator {
        cert_der,
        key: NodeSigner::from_pem(
            &std::fs::read_to_string(op.join("operator.key")).expect("operator key"),
        )
        .expect("key"),
    };
    let before = sign(&key, 2, unix_now() - 5, INTENTIONS);
    // Make sure the revocation time is a later second than `before`'s.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let out = meshnode(&[
        "cert",
        "revoke",
        "--cert",
        op.join("operator.pem").to_str().expect("path"),
        "--admin",
        &ca.spec.admin.to_string(),
        "--data-dir",
        ca_dir.to_str().expect("path"),
    ]);
    let text = ok(&out);
    assert!(text.contains("the certificate's key"), "{text}");

    // After the revocation, what the key signs is refused...
    let doc2 = write(
        pki.dir.path(),
        "api2.toml",
        &INTENTIONS.replace("service:web", "service:late"),
    );
    let out = policy(&op, ca.spec.admin, &["apply", doc2.to_str().expect("path")]);
    assert!(
        !out.status.success(),
        "a revoked operator applied a document"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("revoked"), "{err}");
    assert_eq!(held(&ca, "intentions", "api").await.expect("held").0, 1);
    // ...and what it signed before stands, even handed in now.
    let (status, body) = post(&ca, &before).await;
    assert!(status.contains("200"), "{status} {body}");
    assert_eq!(held(&ca, "intentions", "api").await.expect("held").0, 2);
    let metrics = ca.get_text("/metrics").await.expect("metrics");
    assert!(counted(&metrics, "revoked_signer") >= 1, "{metrics}");
}
