//! VM onboarding through the real binary: `token create`, `join` (direct and
//! relayed), renewal with second-long certificates, revocation.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshnode_transport::pki::token::Token;
use meshnode_transport::tls::TlsMaterial;
use meshnode_transport::{Endpoint, EndpointConfig};

use crate::{
    meshnode, named_echo, named_echo_once, upstream, wait_until, NodeProc, NodeSpec, Pki, CLUSTER,
};

/// A CA node: holds the CA key (`[ca]`), hosts echo service `svc`.
async fn ca_node(pki: &Pki, net: [u8; 2], ttl: &str, svc: &str) -> (NodeProc, PathBuf) {
    let ca_dir = pki.dir.path().join("ca");
    if !ca_dir.exists() {
        pki.ca.save(&ca_dir).expect("save CA");
    }
    let (echo, _task) = named_echo(std::net::Ipv4Addr::new(127, net[0], net[1], 1), "ca-1").await;
    std::mem::forget(_task);
    let mut spec = NodeSpec::new(net, 1, "ca-1");
    spec.extra = format!(
        "{}\n[ca]\nkey = \"{}\"\ncert_ttl = \"{ttl}\"\n",
        crate::echo_service(svc, echo),
        ca_dir.join("ca.key").display()
    );
    let dir = pki.issue(CLUSTER, "ca-1");
    let node = NodeProc::start(spec, &dir);
    let up = wait_until(Duration::from_secs(15), || async {
        node.get("/v1/status").await.is_some()
    })
    .await;
    assert!(up.is_some(), "CA node did not start: {}", node.log_text());
    (node, dir)
}

fn token(ca: &NodeProc, data_dir: &Path, extra: &[&str]) -> String {
    let admin = ca.spec.admin.to_string();
    let dir = data_dir.display().to_string();
    let mut args = vec!["token", "create", "--admin", &admin, "--data-dir", &dir];
    args.extend_from_slice(extra);
    let out = meshnode(&args);
    assert!(
        out.status.success(),
        "token create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Arguments of `meshnode join` for a node at 127.A.B.host.
fn join_args(
    token: &str,
    via: SocketAddr,
    dir: &Path,
    spec: &NodeSpec,
    no_start: bool,
) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = vec![
        "join".into(),
        "--token".into(),
        token.into(),
        via.to_string().into(),
        "--data-dir".into(),
        dir.into(),
        "--node".into(),
        spec.name.clone().into(),
        "--bind".into(),
        spec.quic.to_string().into(),
        "--admin".into(),
        spec.admin.to_string().into(),
    ];
    if no_start {
        a.push("--no-start".into());
    }
    a
}

fn join_once(token: &str, via: SocketAddr, dir: &Path, spec: &NodeSpec) -> std::process::Output {
    let args = join_args(token, via, dir, spec, true);
    std::process::Command::new(crate::meshnode_bin())
        .args(&args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running meshnode join")
}

/// Joins `spec` through `ca` with `--no-start`, adds 250 ms gossip and an
/// upstream to `api` to the written config, and runs it. Returns the upstream.
fn joined_node(token: &str, ca: &NodeProc, dir: &Path, spec: NodeSpec) -> (NodeProc, SocketAddr) {
    let out = join_once(token, ca.spec.quic, dir, &spec);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg_path = dir.join("meshnode.toml");
    let up = crate::free_tcp(spec.ip);
    let cfg = std::fs::read_to_string(&cfg_path).expect("config");
    let extra = format!("[gossip]\ninterval = \"250ms\"\n{}", upstream("api", up));
    std::fs::write(&cfg_path, format!("{cfg}{extra}")).expect("config");
    let vm = NodeProc::spawn(
        spec,
        vec!["run".into(), "--config".into(), cfg_path.into_os_string()],
        &dir.join("node.log"),
    );
    (vm, up)
}

async fn alive_on(node: &NodeProc, name: &str) -> bool {
    node.members()
        .await
        .iter()
        .any(|(n, st)| n == name && st == "alive")
}

#[tokio::test(flavor = "multi_thread")]
async fn join_directly_and_through_a_relay_then_carry_traffic() {
    let pki = Pki::new();
    let net = crate::subnet();
    let (ca, ca_dir) = ca_node(&pki, net, "72h", "api").await;
    // A node without the CA key: joins through it are relayed to ca-1.
    let mut relay_spec = NodeSpec::new(net, 2, "relay-1");
    relay_spec.seeds = vec![ca.spec.quic];
    let relay = NodeProc::start(relay_spec, &pki.issue(CLUSTER, "relay-1"));
    assert!(
        wait_until(Duration::from_secs(15), || alive_on(&ca, "relay-1"))
            .await
            .is_some(),
        "relay did not join"
    );
    // A node without the CA key has no secret and no CA endpoints.
    let relay_admin = relay.spec.admin.to_string();
    let out = meshnode(&[
        "token",
        "create",
        "--admin",
        &relay_admin,
        "--data-dir",
        "/nonexistent",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("CA node"), "{err}");
    let t = token(&ca, &ca_dir, &["--uses", "2", "--ttl", "10m"]);
    assert!(t.starts_with("mnj1."), "{t}");

    // 1. Directly at the CA node, from an empty data dir.
    let work = tempfile::tempdir().expect("tempdir");
    let vm1_dir = work.path().join("vm-1");
    let mut vm1 = NodeSpec::new(net, 3, "vm-1");
    let started = Instant::now();
    let out = join_once(&t, ca.spec.quic, &vm1_dir, &vm1);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "join failed: {stderr}");
    assert!(stderr.contains("[4/5]"), "progress is shown: {stderr}");
    let key_mode = std::fs::metadata(vm1_dir.join("node.key"))
        .expect("node.key")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(key_mode, 0o600, "node.key must be 0600");
    let cfg_path = vm1_dir.join("meshnode.toml");
    let cfg = std::fs::read_to_string(&cfg_path).expect("config written");
    assert!(
        cfg.contains("cluster = \"east\"") && cfg.contains("seeds = ["),
        "{cfg}"
    );
    // Give it an upstream, then run it from the written config.
    let up = crate::free_tcp(vm1.ip);
    std::fs::write(&cfg_path, format!("{cfg}{}", upstream("api", up))).expect("config");
    vm1.seeds = vec![];
    let log = vm1_dir.join("node.log");
    let vm1 = NodeProc::spawn(
        vm1,
        vec!["run".into(), "--config".into(), cfg_path.into_os_string()],
        &log,
    );
    let member = wait_until(Duration::from_secs(15), || alive_on(&ca, "vm-1")).await;
    assert!(member.is_some(), "vm-1 not a member: {}", vm1.log_text());
    let join_to_member = started.elapsed();
    let answered = wait_until(Duration::from_secs(10), || async {
        named_echo_once(None, up, b"hello", Duration::from_secs(3))
            .await
            .is_ok_and(|(name, echo)| name == "ca-1" && echo == b"hello")
    })
    .await;
    assert!(
        answered.is_some(),
        "no traffic through vm-1: {}",
        vm1.log_text()
    );
    eprintln!(
        "measure: join (keygen, handshake, signing, files) to pool member in {join_to_member:.2?}"
    );

    // 2. Through the relay, and the joiner goes on as the agent (no --no-start).
    let vm2_dir = work.path().join("vm-2");
    let vm2 = NodeSpec::new(net, 4, "vm-2");
    let args = join_args(&t, relay.spec.quic, &vm2_dir, &vm2, false);
    let started = Instant::now();
    let vm2 = NodeProc::spawn(vm2, args, &work.path().join("vm-2.log"));
    let member = wait_until(Duration::from_secs(20), || alive_on(&ca, "vm-2")).await;
    assert!(
        member.is_some(),
        "vm-2 (relayed join) not a member: {}",
        vm2.log_text()
    );
    eprintln!(
        "measure: relayed join to pool member in {:.2?}",
        started.elapsed()
    );
    assert!(vm2
        .log_text()
        .contains("joined as spiffe://acme/cluster/east/node/vm-2"));

    // 3. The token had two uses.
    let spec = NodeSpec::new(net, 5, "vm-3");
    let out = join_once(&t, ca.spec.quic, &work.path().join("vm-3"), &spec);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "third use must fail");
    assert!(err.contains("used_up"), "{err}");
    assert!(!work.path().join("vm-3").join("node.pem").exists());

    // 4. A name taken by a live member, asked through the relay.
    let t2 = token(&ca, &ca_dir, &[]);
    let spec = NodeSpec::new(net, 6, "vm-1");
    let out = join_once(&t2, relay.spec.quic, &work.path().join("dup"), &spec);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("name_taken"), "{err}");

    // 5. Joining again over an existing identity is refused locally.
    let out = join_once(&t2, ca.spec.quic, &vm1_dir, &NodeSpec::new(net, 7, "vm-9"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("joined already"), "{err}");
    drop(relay);
}

/// A server of another CA that records every join connection and stream it gets.
struct Recorder {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    streams: Arc<AtomicUsize>,
    ca_fingerprint: [u8; 32],
    _endpoint: Endpoint,
}

async fn recorder(net: [u8; 2]) -> Recorder {
    let other = Pki::new();
    let d = other.issue(CLUSTER, "impostor");
    let tls = TlsMaterial::load(&d.join("ca.pem"), &d.join("node.pem"), &d.join("node.key"))
        .expect("tls");
    let bind = crate::free_udp(std::net::Ipv4Addr::new(127, net[0], net[1], 9));
    let (endpoint, mut incoming) = Endpoint::bind(EndpointConfig {
        bind,
        tls: tls.into(),
    })
    .expect("bind");
    let conns = Arc::new(AtomicUsize::new(0));
    let streams = Arc::new(AtomicUsize::new(0));
    let (c, s) = (conns.clone(), streams.clone());
    tokio::spawn(async move {
        while let Some(jc) = incoming.join.recv().await {
            c.fetch_add(1, Ordering::SeqCst);
            let s = s.clone();
            tokio::spawn(async move {
                while let Ok((_send, mut recv)) = jc.conn.accept_bi().await {
                    s.fetch_add(1, Ordering::SeqCst);
                    let _ = recv.read_to_end(64 * 1024).await;
                }
            });
        }
    });
    Recorder {
        addr: endpoint.local_addr().expect("addr"),
        conns,
        streams,
        ca_fingerprint: other.ca.fingerprint().expect("fp"),
        _endpoint: endpoint,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_for_another_ca_never_reach_the_server_and_bad_tokens_are_clear() {
    let net = crate::subnet();
    let rec = recorder(net).await;
    let pki = Pki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let spec = NodeSpec::new(net, 3, "vm-1");
    // A token of our CA, presented to a server of another CA: refused at the
    // handshake, before anything is sent.
    let ours = Token::generate(pki.ca.fingerprint().expect("fp"), u64::MAX / 2).encode();
    let out = join_once(&ours, rec.addr, &work.path().join("a"), &spec);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("token was not sent"), "{err}");
    assert_eq!(
        rec.conns.load(Ordering::SeqCst),
        0,
        "no join connection may reach it"
    );
    assert_eq!(
        rec.streams.load(Ordering::SeqCst),
        0,
        "no request may reach it"
    );
    // Control: a token naming the recorder's CA does reach it (so the recorder records).
    let theirs = Token::generate(rec.ca_fingerprint, u64::MAX / 2).encode();
    let _ = join_once(&theirs, rec.addr, &work.path().join("b"), &spec);
    assert!(
        rec.streams.load(Ordering::SeqCst) >= 1,
        "the control request was not recorded"
    );

    // An expired token, a damaged one, an address where nobody answers.
    let expired = Token::generate([1; 32], 1).encode();
    let out = join_once(&expired, rec.addr, &work.path().join("c"), &spec);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("expired"), "{err}");
    let out = join_once("mnj1.abc", rec.addr, &work.path().join("d"), &spec);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("damaged"));
    let silent = crate::free_udp(spec.ip);
    let started = Instant::now();
    let out = join_once(&ours, silent, &work.path().join("e"), &spec);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no answer"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15), "join hung");
}

#[tokio::test(flavor = "multi_thread")]
async fn renewal_with_second_long_certificates_keeps_traffic_flowing() {
    let pki = Pki::new();
    let net = crate::subnet();
    let (ca, ca_dir) = ca_node(&pki, net, "6s", "api").await;
    let t = token(&ca, &ca_dir, &[]);
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path().join("vm-1");
    let (vm, up) = joined_node(&t, &ca, &dir, NodeSpec::new(net, 3, "vm-1"));
    let first = wait_until(Duration::from_secs(10), || async {
        named_echo_once(None, up, b"x", Duration::from_secs(3))
            .await
            .is_ok()
    })
    .await;
    assert!(first.is_some(), "no traffic: {}", vm.log_text());
    let not_after = |v: serde_json::Value| v.get("cert_not_after").and_then(|n| n.as_i64());
    let start_not_after = not_after(vm.get("/v1/status").await.unwrap_or_default());
    // 20 s of connections across several 6-second certificates.
    let (mut ok, mut failed) = (0, Vec::new());
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        match named_echo_once(None, up, b"ping", Duration::from_secs(5)).await {
            Ok((name, echo)) if name == "ca-1" && echo == b"ping" => ok += 1,
            other => failed.push(format!("{other:?}")),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = vm.get_text("/metrics").await.unwrap_or_default();
    let renewals = metrics
        .lines()
        .find(|l| l.starts_with("meshnode_cert_renewals_total{") && l.contains("result=\"ok\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    let end_not_after = not_after(vm.get("/v1/status").await.unwrap_or_default());
    eprintln!("measure: {ok} connections, {} failed, {renewals} renewals; not_after {start_not_after:?} -> {end_not_after:?}", failed.len());
    assert!(
        failed.is_empty(),
        "failed connections during renewals: {failed:?}"
    );
    assert!(
        renewals >= 3.0,
        "expected several renewals, saw {renewals}: {}",
        vm.log_text()
    );
    assert!(end_not_after > start_not_after);
    // The renewed certificate is on disk too.
    let on_disk = meshnode_transport::PeerCert::from_pem(
        &std::fs::read_to_string(dir.join("node.pem")).expect("node.pem"),
    )
    .expect("parse");
    assert!(Some(on_disk.not_after) >= start_not_after);
    assert!(alive_on(&ca, "vm-1").await, "vm-1 dropped out of the pool");
}

#[tokio::test(flavor = "multi_thread")]
async fn revocation_cuts_live_tunnels_spreads_and_survives_restarts() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    let net = crate::subnet();
    let (ca, ca_dir) = ca_node(&pki, net, "72h", "api").await;
    let mut n2_spec = NodeSpec::new(net, 2, "node-2");
    n2_spec.seeds = vec![ca.spec.quic];
    let n2_dir = pki.issue(CLUSTER, "node-2");
    let mut n2 = NodeProc::start(n2_spec, &n2_dir);
    let t = token(&ca, &ca_dir, &[]);
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path().join("vm-1");
    let (vm, up) = joined_node(&t, &ca, &dir, NodeSpec::new(net, 3, "vm-1"));
    for n in [&ca, &n2] {
        assert!(
            wait_until(Duration::from_secs(15), || alive_on(n, "vm-1"))
                .await
                .is_some(),
            "vm-1 not alive on {}",
            n.spec.name
        );
    }
    // vm-1 must know ca-1's passing `api` before its upstream can route:
    // being alive on the others says nothing about what vm-1 has learnt.
    assert!(
        wait_until(Duration::from_secs(15), || async {
            vm.instances("api")
                .await
                .iter()
                .any(|(node, health)| node.ends_with("ca-1") && health == "passing")
        })
        .await
        .is_some(),
        "vm-1 never saw a passing api: {}",
        vm.log_text()
    );
    // A live tunnel from vm-1 to ca-1's echo.
    let mut live = tokio::net::TcpStream::connect(up)
        .await
        .expect("connect upstream");
    live.write_all(b"before").await.expect("write");
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while !got.ends_with(b"before") {
        let n = tokio::time::timeout(Duration::from_secs(5), live.read(&mut buf))
            .await
            .expect("echo in time")
            .expect("read");
        assert!(n > 0, "closed early");
        got.extend_from_slice(&buf[..n]);
    }

    let admin = ca.spec.admin.to_string();
    let data = ca_dir.display().to_string();
    let started = Instant::now();
    let out = meshnode(&[
        "cert",
        "revoke",
        "--node",
        "vm-1",
        "--admin",
        &admin,
        "--data-dir",
        &data,
    ]);
    assert!(
        out.status.success(),
        "revoke: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The live tunnel is cut.
    let cut = async {
        loop {
            match live.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(10), cut)
            .await
            .is_ok(),
        "the live tunnel was not cut"
    );
    let cut_after = started.elapsed();
    // Every node has the entry and sees vm-1 dead.
    let mut spread = Duration::ZERO;
    for n in [&ca, &n2] {
        let has = wait_until(Duration::from_secs(10), || async {
            n.get("/v1/revocations")
                .await
                .and_then(|v| v.as_array().map(|a| !a.is_empty()))
                .unwrap_or(false)
        })
        .await;
        assert!(has.is_some(), "{} has no revocation", n.spec.name);
        spread = spread.max(started.elapsed());
        let dead = wait_until(Duration::from_secs(15), || async {
            !alive_on(n, "vm-1").await
        })
        .await;
        assert!(dead.is_some(), "{} still sees vm-1 alive", n.spec.name);
    }
    let dead_after = started.elapsed();
    // Reconnects are refused.
    let refused = named_echo_once(None, up, b"after", Duration::from_secs(8)).await;
    assert!(
        refused.is_err(),
        "a revoked node still gets through: {refused:?}"
    );
    eprintln!("measure: live tunnel cut {cut_after:.2?} after revoke; entry on every node by {spread:.2?}; vm-1 dead everywhere by {dead_after:.2?}");

    // Survives restarts: node-2 comes back with the entry before it talks to anyone.
    n2.kill9();
    let mut n2_spec = NodeSpec::new(net, 2, "node-2");
    n2_spec.quic = n2.spec.quic;
    n2_spec.admin = n2.spec.admin;
    n2_spec.seeds = vec![ca.spec.quic];
    let n2 = NodeProc::start(n2_spec, &n2_dir);
    let back = wait_until(Duration::from_secs(10), || async {
        n2.get("/v1/status")
            .await
            .and_then(|v| v.get("revocations").and_then(|r| r.as_u64()))
            == Some(1)
    })
    .await;
    assert!(
        back.is_some(),
        "node-2 lost the revocation: {}",
        n2.log_text()
    );
    assert!(
        n2.log_text().contains("revocations loaded"),
        "{}",
        n2.log_text()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !alive_on(&n2, "vm-1").await,
        "vm-1 rejoined node-2 after its restart"
    );
    drop(vm);
}
