//! Authorization through the real binary: service identities in
//! certificates (`cert issue --service`), intentions and the mesh default
//! enforced at the destination, the caller's report of a denial, a forged
//! service identity, a restart under default deny, rules by cluster and by
//! identity pattern across gateways, and `meshnode explain`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshnode_transport::alpn::Alpn;
use meshnode_transport::tls::TlsMaterial;
use meshnode_transport::tunnel::{self, Header, Status, TunnelError, ANY_PORT};
use meshnode_transport::Role;

use super::federation::{self, Mesh};
use super::loopback_endpoint;
use super::policy::{held, ok, operator, policy, policy_in, write, INTENTIONS};
use crate::netns;
use crate::{
    free_tcp, free_udp, meshnode, named_echo, named_echo_once, subnet, upstream, wait_until,
    NodeProc, NodeSpec, Pki, CLUSTER,
};

const DENY_ALL: &str = "kind = \"defaults\"\nname = \"mesh\"\ndefault_intention = \"deny\"\n";

/// Writes `text` as `file` and applies it as operator `op` at `admin`.
fn apply(pki: &Pki, op: &Path, admin: SocketAddr, file: &str, text: &str) {
    let doc = write(pki.dir.path(), file, text);
    ok(&policy(op, admin, &["apply", doc.to_str().expect("path")]));
}

/// One connection through an upstream at `addr`: the answering instance, or why not.
async fn call(addr: SocketAddr) -> Result<String, String> {
    let (name, echoed) = named_echo_once(None, addr, b"ping", Duration::from_secs(5)).await?;
    if echoed != b"ping" {
        return Err(format!("{name} echoed {echoed:?}"));
    }
    Ok(name)
}

/// `meshnode cert issue` for a node acting as `services`, through the CLI.
fn issue_with_cli(pki: &Pki, cluster: &str, node: &str, services: &str) -> PathBuf {
    let ca_dir = pki.dir.path().join("ca");
    if !ca_dir.exists() {
        pki.ca.save(&ca_dir).expect("save CA");
    }
    let out = pki.dir.path().join(format!("{cluster}-{node}"));
    let o = meshnode(&[
        "cert",
        "issue",
        "--ca",
        ca_dir.to_str().expect("path"),
        "--cluster",
        cluster,
        "--node",
        node,
        "--service",
        services,
        "--out",
        out.to_str().expect("path"),
    ]);
    let stdout = ok(&o);
    assert!(stdout.contains(&format!("acts as {services}")), "{stdout}");
    out
}

fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A stream opened by the test itself with the certificate in `dir`,
/// claiming to act as `acting_as`: the destination's answer.
async fn open_as(dir: &Path, to: SocketAddr, acting_as: Option<&str>) -> Result<(), TunnelError> {
    let tls = TlsMaterial::load(
        &dir.join("ca.pem"),
        &dir.join("node.pem"),
        &dir.join("node.key"),
    )
    .expect("tls");
    let (ep, _incoming) = loopback_endpoint(tls);
    let (conn, _) = ep
        .connect(to, Alpn::Tunnel)
        .await
        .map_err(|e| TunnelError::Stream(e.to_string()))?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| TunnelError::Stream(e.to_string()))?;
    let mut header = Header::new("api", ANY_PORT);
    header.source_service = acting_as.map(str::to_string);
    tunnel::open(&mut send, &mut recv, &header, Duration::from_secs(5)).await
}

struct Trio {
    pki: Pki,
    api: NodeProc,
    web: NodeProc,
    batch: NodeProc,
    web_up: SocketAddr,
    batch_up: SocketAddr,
    api_dir: PathBuf,
    _app: tokio::task::JoinHandle<()>,
}

/// node `api` hosts service api; `web` (certificate: web, from the CLI) and
/// `batch` (certificate: batch, upstream `as = "batch"`) call it.
async fn trio(net: [u8; 2]) -> Trio {
    let pki = Pki::new();
    let mut api_spec = NodeSpec::new(net, 1, "api-1");
    let (app, task) = named_echo(api_spec.ip, "api-1").await;
    api_spec.extra = crate::echo_service("api", app);
    let api_dir = pki.issue(CLUSTER, "api-1");
    let api = NodeProc::start(api_spec.clone(), &api_dir);
    let mut web_spec = NodeSpec::new(net, 2, "web-1");
    let web_up = free_tcp(web_spec.ip);
    web_spec.seeds = vec![api_spec.quic];
    web_spec.extra = upstream("api", web_up);
    let web = NodeProc::start(web_spec, &issue_with_cli(&pki, CLUSTER, "web-1", "web"));
    let mut batch_spec = NodeSpec::new(net, 3, "batch-1");
    let batch_up = free_tcp(batch_spec.ip);
    batch_spec.seeds = vec![api_spec.quic];
    batch_spec.extra = format!("{}as = \"batch\"\n", upstream("api", batch_up));
    let batch_dir = pki.issue_acting(CLUSTER, "batch-1", Role::Node, &["batch"]);
    let batch = NodeProc::start(batch_spec, &batch_dir);
    let formed = Instant::now();
    for n in [&api, &web, &batch] {
        let t = wait_until(Duration::from_secs(30), || async {
            n.members()
                .await
                .iter()
                .filter(|(_, s)| s == "alive")
                .count()
                == 3
        })
        .await;
        assert!(t.is_some(), "{}: {:?}", n.spec.name, n.members().await);
    }
    eprintln!(
        "measure: three nodes saw each other alive {:.0} ms after the last start",
        formed.elapsed().as_secs_f64() * 1e3
    );
    for (n, up) in [(&web, web_up), (&batch, batch_up)] {
        let t = wait_until(Duration::from_secs(30), || async { call(up).await.is_ok() }).await;
        assert!(
            t.is_some(),
            "{} never reached api before any policy: {:?}",
            n.spec.name,
            call(up).await
        );
    }
    Trio {
        pki,
        api,
        web,
        batch,
        web_up,
        batch_up,
        api_dir,
        _app: task,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn default_deny_blocks_then_an_intention_lets_only_web_through_and_explain_says_why() {
    let t = trio(subnet()).await;
    let op = operator(&t.pki, "alice");

    // Default deny, applied at the caller batch-1: in force at api-1 once it spread.
    let applied = Instant::now();
    apply(&t.pki, &op, t.batch.spec.admin, "defaults.toml", DENY_ALL);
    wait_until(Duration::from_secs(10), || async {
        call(t.web_up).await.is_err()
    })
    .await
    .expect("default deny never blocked web");
    eprintln!(
        "measure: default deny applied at a caller blocked streams at the destination within {:.0} ms",
        applied.elapsed().as_secs_f64() * 1e3
    );
    for up in [t.web_up, t.batch_up] {
        let r = call(up).await;
        assert!(r.is_err(), "a caller got through under default deny: {r:?}");
    }
    // The caller reports the denial: a reset to the application, a metric, a log line.
    let m = crate::http_get(t.batch.spec.admin, "/metrics")
        .await
        .unwrap_or_default();
    assert!(
        metric(
            &m,
            "meshnode_tunnel_streams_total",
            &["direction=\"out\"", "result=\"denied\"", "service=\"api\""]
        ) >= 1.0,
        "{m}"
    );
    assert!(
        t.batch
            .log_text()
            .contains("denied by the service's authorization policy"),
        "{}",
        t.batch.log_text()
    );
    let m = crate::http_get(t.api.spec.admin, "/metrics")
        .await
        .unwrap_or_default();
    assert!(
        metric(
            &m,
            "meshnode_authz_decisions_total",
            &["decision=\"deny\"", "reason=\"default\"", "service=\"api\""]
        ) >= 2.0,
        "{m}"
    );
    assert!(t
        .api
        .log_text()
        .contains("stream denied by the mesh default"));

    // An intention for api: web allowed, everyone else denied.
    let applied = Instant::now();
    apply(&t.pki, &op, t.batch.spec.admin, "api.toml", INTENTIONS);
    wait_until(Duration::from_secs(10), || async {
        call(t.web_up).await.is_ok()
    })
    .await
    .expect("the intention never let web through");
    eprintln!(
        "measure: an allow intention applied at a caller let web through within {:.0} ms",
        applied.elapsed().as_secs_f64() * 1e3
    );
    for _ in 0..5 {
        assert_eq!(call(t.web_up).await.as_deref(), Ok("api-1"));
        assert!(call(t.batch_up).await.is_err(), "batch got through");
    }
    let m = crate::http_get(t.api.spec.admin, "/metrics")
        .await
        .unwrap_or_default();
    assert!(
        metric(
            &m,
            "meshnode_authz_decisions_total",
            &["decision=\"allow\"", "reason=\"rule\"", "service=\"api\""]
        ) >= 5.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "meshnode_authz_decisions_total",
            &["decision=\"deny\"", "reason=\"rule\"", "service=\"api\""]
        ) >= 5.0,
        "{m}"
    );

    // explain, from each caller and for a named source: each explains with
    // its own copy of the policy, so wait until both hold it.
    for n in [&t.web, &t.batch] {
        wait_until(Duration::from_secs(10), || async {
            held(n, "intentions", "api").await.is_some()
        })
        .await
        .expect("the intention never reached every caller");
    }
    let explain = |admin: SocketAddr, extra: &[&str]| {
        let admin = admin.to_string();
        let mut args = vec!["explain", "api", "--admin", &admin];
        args.extend_from_slice(extra);
        ok(&meshnode(&args))
    };
    let text = explain(t.web.spec.admin, &[]);
    assert!(
        text.starts_with("api: allow (intention api, rule 1 (source service:web))"),
        "{text}"
    );
    assert!(
        text.contains("own cluster: local instances come first"),
        "{text}"
    );
    assert!(
        text.contains("a new connection now: api-1 of cluster east"),
        "{text}"
    );
    let text = explain(t.batch.spec.admin, &[]);
    assert!(
        text.starts_with("api: deny (intention api, rule 2 (source *))"),
        "{text}"
    );
    let text = explain(t.batch.spec.admin, &["--from", "web-1"]);

    assert!(text.starts_with("api: allow"), "{text}");
    assert!(text.contains("node web-1 of this cluster's pool"), "{text}");
    let text = explain(t.batch.spec.admin, &["--from", "service:web"]);
    assert!(text.contains("does not name that service"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&explain(t.web.spec.admin, &["--json"])).expect("json");
    assert_eq!(json["authorization"]["action"], "allow");
    assert_eq!(json["authorization"]["by"], "rule");
    assert_eq!(json["authorization"]["index"], 0);
    assert_eq!(json["from"]["service"], "web");
    assert_eq!(json["clusters"][0]["cluster"], CLUSTER);
    assert_eq!(json["clusters"][0]["order"], 1);
    assert_eq!(json["attempts"][0]["node"], "api-1");
    let bad = meshnode(&[
        "explain",
        "no such",
        "--admin",
        &t.web.spec.admin.to_string(),
    ]);
    assert_eq!(bad.status.code(), Some(64), "{bad:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_cannot_act_as_a_service_its_certificate_does_not_name() {
    let t = trio(subnet()).await;
    let op = operator(&t.pki, "alice");
    apply(&t.pki, &op, t.api.spec.admin, "api.toml", INTENTIONS);
    wait_until(Duration::from_secs(10), || async {
        call(t.batch_up).await.is_err()
    })
    .await
    .expect("the intention never took effect");
    // A stream that claims web with a certificate that names batch only.
    let batch_dir = t.pki.dir.path().join(format!("{CLUSTER}-batch-1"));
    let r = open_as(&batch_dir, t.api.spec.quic, Some("web")).await;
    assert!(
        matches!(r, Err(TunnelError::Refused(Status::Denied))),
        "{r:?}"
    );
    // Its real service is denied by the rules; web's certificate passes.
    let r = open_as(&batch_dir, t.api.spec.quic, Some("batch")).await;
    assert!(
        matches!(r, Err(TunnelError::Refused(Status::Denied))),
        "{r:?}"
    );
    let web_dir = t.pki.dir.path().join(format!("{CLUSTER}-web-1"));
    open_as(&web_dir, t.api.spec.quic, Some("web"))
        .await
        .expect("web's certificate acts as web");
    let m = crate::http_get(t.api.spec.admin, "/metrics")
        .await
        .unwrap_or_default();
    assert!(
        metric(
            &m,
            "meshnode_authz_decisions_total",
            &["decision=\"deny\"", "reason=\"identity\""]
        ) >= 1.0,
        "{m}"
    );

    // An upstream that acts as a service its certificate lacks: validate
    // says so, and the agent refuses to start, naming the key.
    let net = subnet();
    let mut spec = NodeSpec::new(net, 9, "liar");
    spec.seeds = vec![t.api.spec.quic];
    spec.extra = format!("{}as = \"web\"\n", upstream("api", free_tcp(spec.ip)));
    let dir = t.pki.issue_acting(CLUSTER, "liar", Role::Node, &["batch"]);
    let cfg = dir.join("config.toml");
    std::fs::write(&cfg, spec.config(&dir)).expect("config");
    let v = meshnode(&["validate", "--config", cfg.to_str().expect("path")]);
    let err = String::from_utf8_lossy(&v.stderr);
    assert_eq!(v.status.code(), Some(64), "{err}");
    assert!(
        err.contains("upstream[0].as")
            && err.contains("may not act as service \"web\"")
            && err.contains("names batch"),
        "{err}"
    );
    let mut liar = NodeProc::start(spec, &dir);
    assert_eq!(liar.wait_exit(Duration::from_secs(20)), Some(64));
    assert!(
        liar.log_text().contains("upstream[0].as"),
        "{}",
        liar.log_text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_under_default_deny_refuses_until_policy_is_loaded_then_allows() {
    let mut t = trio(subnet()).await;
    let op = operator(&t.pki, "alice");
    for (file, text) in [("defaults.toml", DENY_ALL), ("api.toml", INTENTIONS)] {
        apply(&t.pki, &op, t.api.spec.admin, file, text);
    }
    wait_until(Duration::from_secs(10), || async {
        call(t.web_up).await.is_ok() && call(t.batch_up).await.is_err()
    })
    .await
    .expect("policy never took effect");

    // api-1 restarts on a new port whose only seed, batch-1, is frozen: it
    // holds the persisted documents but cannot load the mesh's policy.
    t.api.kill9();
    t.batch.pause();
    let mut spec = t.api.spec.clone();
    spec.quic = free_udp(spec.ip);
    spec.seeds = vec![t.batch.spec.quic];
    t.api = NodeProc::start(spec, &t.api_dir);
    let up = wait_until(Duration::from_secs(20), || async {
        t.api.get("/v1/policy").await.is_some()
    })
    .await;
    assert!(up.is_some(), "api-1 did not come back");
    let policy_state = t.api.get("/v1/policy").await.unwrap_or_default();
    assert_eq!(policy_state["loaded"], false, "{policy_state}");
    assert_eq!(
        policy_state["documents"].as_array().map(Vec::len),
        Some(2),
        "{policy_state}"
    );
    let web_dir = t.pki.dir.path().join(format!("{CLUSTER}-web-1"));
    let r = open_as(&web_dir, t.api.spec.quic, Some("web")).await;
    assert!(
        matches!(r, Err(TunnelError::Refused(Status::PolicyPending))),
        "before policy is loaded: {r:?}"
    );
    assert!(t
        .api
        .log_text()
        .contains("has not loaded the mesh's policy"));

    // The seed thaws: api-1 syncs, and the same stream is allowed.
    t.batch.signal("CONT");
    let loaded = wait_until(Duration::from_secs(20), || async {
        t.api
            .get("/v1/policy")
            .await
            .is_some_and(|v| v["loaded"] == true)
    })
    .await
    .expect("api-1 never loaded policy after its seed came back");
    eprintln!(
        "measure: policy loaded {:.0} ms after the seed thawed",
        loaded.as_secs_f64() * 1e3
    );
    open_as(&web_dir, t.api.spec.quic, Some("web"))
        .await
        .expect("allowed once loaded");
    let r = open_as(&web_dir, t.api.spec.quic, None).await;
    assert!(
        matches!(r, Err(TunnelError::Refused(Status::Denied))),
        "a caller acting as no service: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rules_by_cluster_and_by_identity_pattern_hold_across_gateways() {
    if !netns::available("rules_by_cluster_and_by_identity_pattern_hold_across_gateways") {
        return;
    }
    let mesh = Mesh::start(federation::topology(&["bgw"]), &["b1"]).await;
    mesh.wait_remote_healthy(1).await;
    let a1 = &mesh.topo.host("a1").ns;
    let up = SocketAddr::from(([127, 0, 0, 1], 15001));
    let call_a1 = || async move {
        named_echo_once(Some(a1), up, b"ping", Duration::from_secs(10))
            .await
            .map(|(name, _)| name)
    };
    wait_until(Duration::from_secs(20), || async {
        call_a1().await.is_ok()
    })
    .await
    .expect("a1 never reached echo in cluster b");
    let op = operator(&mesh.pki, "alice");
    let apply = |host: &str, file: &str, text: &str| {
        let doc = write(mesh.pki.dir.path(), file, text);
        ok(&policy_in(
            &mesh,
            host,
            &op,
            &["apply", doc.to_str().expect("path")],
        ));
    };
    // Default deny, applied in cluster a: b1 refuses a1's stream, which
    // reached it through both gateways.
    apply("a2", "defaults.toml", DENY_ALL);
    wait_until(Duration::from_secs(15), || async {
        call_a1().await.is_err()
    })
    .await
    .expect("default deny never blocked the cross-cluster stream");
    // By cluster: everything from cluster a.
    apply(
        "a2",
        "echo-1.toml",
        "kind = \"intentions\"\nname = \"echo\"\n[[rule]]\nsource = \"cluster:a\"\naction = \"allow\"\n",
    );
    wait_until(Duration::from_secs(15), || async {
        call_a1().await.as_deref() == Ok("b1")
    })
    .await
    .expect("a rule for cluster a never let a1 through");
    // By identity pattern, before the cluster rule: a1 matches `a*`.
    apply(
        "b1",
        "echo-2.toml",
        "kind = \"intentions\"\nname = \"echo\"\n[[rule]]\nsource = \"spiffe://acme/cluster/a/node/a*\"\naction = \"deny\"\n[[rule]]\nsource = \"cluster:a\"\naction = \"allow\"\n",
    );
    wait_until(Duration::from_secs(15), || async {
        call_a1().await.is_err()
    })
    .await
    .expect("a deny for spiffe://acme/cluster/a/node/a* never stopped a1");
    let m = mesh
        .node("b1")
        .get_text("/metrics")
        .await
        .unwrap_or_default();
    assert!(
        metric(
            &m,
            "meshnode_authz_decisions_total",
            &["decision=\"deny\"", "reason=\"rule\"", "service=\"echo\""]
        ) >= 1.0,
        "{m}"
    );
    // The denial travels back through both gateways to a1's application.
    let m = mesh
        .node("a1")
        .get_text("/metrics")
        .await
        .unwrap_or_default();
    assert!(
        metric(
            &m,
            "meshnode_tunnel_streams_total",
            &["direction=\"out\"", "result=\"denied\""]
        ) >= 1.0,
        "{m}"
    );
}
