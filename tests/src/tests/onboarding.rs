//! VM onboarding through the real binary: `token create`, `join` (direct and
//! relayed), renewal with second-long certificates, revocation.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshnode_transport::join;
use meshnode_transport::pki::join::NodeKey;
use meshnode_transport::pki::token::Token;
use meshnode_transport::tls::{join_client_config, transport_config, Link, TlsMaterial};
use meshnode_transport::{Endpoint, EndpointConfig};

use crate::{
    meshnode, named_echo, named_echo_once, upstream, wait_until, NodeProc, NodeSpec, Pki, CLUSTER,
};

/// A CA node: holds the CA key (`[ca]`), hosts echo service `svc`.
pub(crate) async fn ca_node(pki: &Pki, net: [u8; 2], ttl: &str, svc: &str) -> (NodeProc, PathBuf) {
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

pub(crate) async fn alive_on(node: &NodeProc, name: &str) -> bool {
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
    // A node without the CA key has no CA endpoints (its secret opens none).
    let relay_admin = relay.spec.admin.to_string();
    let out = meshnode(&[
        "token",
        "create",
        "--admin",
        &relay_admin,
        "--data-dir",
        &relay.data_dir().display().to_string(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("CA node"), "{err}");
    let t = token(&ca, &ca_dir, &["--uses", "2", "--ttl", "10m"]);
    assert!(t.starts_with("mnj2."), "{t}");

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

/// A join server holding a certificate of `pki`'s CA that records every join
/// connection and request it gets, and refuses each (`no_ca`) so joiners end
/// quickly. With a foreign `pki` it stands for a server of another mesh; with
/// the mesh's own, for an insider relay that keeps what passes through it.
struct Recorder {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    streams: Arc<AtomicUsize>,
    requests: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    ca_fingerprint: [u8; 32],
    _endpoint: Endpoint,
}

async fn recorder(pki: &Pki, net: [u8; 2]) -> Recorder {
    let d = pki.issue(CLUSTER, "impostor");
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
    let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (c, s, r) = (conns.clone(), streams.clone(), requests.clone());
    tokio::spawn(async move {
        while let Some(jc) = incoming.join.recv().await {
            c.fetch_add(1, Ordering::SeqCst);
            let (s, r) = (s.clone(), r.clone());
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = jc.conn.accept_bi().await {
                    s.fetch_add(1, Ordering::SeqCst);
                    if let Ok(bytes) = recv.read_to_end(64 * 1024).await {
                        r.lock().expect("lock").push(bytes);
                    }
                    let no = join::Response::refused(join::Refusal::NoCa, "recorder");
                    let _ = join::respond(&mut send, &no).await;
                }
            });
        }
    });
    Recorder {
        addr: endpoint.local_addr().expect("addr"),
        conns,
        streams,
        requests,
        ca_fingerprint: pki.ca.fingerprint().expect("fp"),
        _endpoint: endpoint,
    }
}

/// One join request straight to `to`, as any machine with the CA's
/// fingerprint can send it.
async fn send_join(to: SocketAddr, fp: [u8; 32], req: &join::Request) -> join::Response {
    let cfg =
        join_client_config(fp, Arc::new(transport_config(Link::Tunnel))).expect("client config");
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let conn = ep
        .connect_with(cfg, to, "meshnode")
        .expect("dial")
        .await
        .expect("handshake");
    let resp = join::call(&conn, req, Duration::from_secs(10))
        .await
        .expect("answer");
    conn.close(quinn::VarInt::from_u32(0), b"done");
    resp
}

fn refusal_of(r: &join::Response) -> Option<&'static str> {
    match r {
        join::Response::Refused { reason, .. } => Some(reason.as_str()),
        join::Response::Issued { .. } => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_for_another_ca_never_reach_the_server_and_bad_tokens_are_clear() {
    let net = crate::subnet();
    let rec = recorder(&Pki::new(), net).await;
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
    let out = join_once("mnj2.abc", rec.addr, &work.path().join("d"), &spec);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("damaged"));
    // A token of an older meshnode, whose secret travelled in the request.
    let out = join_once("mnj1.abc", rec.addr, &work.path().join("d"), &spec);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("older meshnode"));
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
    // The token's service identity is in the joined certificate and in every renewal.
    let t = token(&ca, &ca_dir, &["--services", "web"]);
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
    assert_eq!(
        on_disk.services,
        ["web"],
        "renewal dropped the service identity"
    );
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
    // vm-1 hears from nobody now; its status says why instead of blaming its seeds.
    let told = wait_until(Duration::from_secs(15), || async {
        vm.get("/v1/status").await.is_some_and(|st| {
            st.get("refused_as_revoked_at").is_some()
                && st["warnings"]
                    .to_string()
                    .contains("certificate as revoked")
                && !st["warnings"].to_string().contains("check seeds")
        })
    })
    .await;
    assert!(
        told.is_some(),
        "vm-1's status does not say it was revoked: {:?}",
        vm.get("/v1/status").await
    );
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

/// Revoking a name nobody knows is refused (a typo would revoke nothing and
/// say it did), unless forced for a certificate issued offline.
#[tokio::test(flavor = "multi_thread")]
async fn revoking_an_unknown_name_is_refused_unless_forced() {
    let pki = Pki::new();
    let net = crate::subnet();
    let (ca, ca_dir) = ca_node(&pki, net, "72h", "api").await;
    let admin = ca.spec.admin.to_string();
    let data = ca_dir.display().to_string();
    let revoke = |extra: &[&str]| {
        let mut args = vec![
            "cert",
            "revoke",
            "--node",
            "nosuchnode",
            "--admin",
            &admin,
            "--data-dir",
            &data,
        ];
        args.extend_from_slice(extra);
        meshnode(&args)
    };
    let out = revoke(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("no certificate of spiffe://acme/cluster/east/node/nosuchnode is known here"),
        "{err}"
    );
    assert!(err.contains("--force"), "{err}");
    assert_eq!(
        ca.get("/v1/revocations")
            .await
            .and_then(|v| v.as_array().map(Vec::len)),
        Some(0)
    );
    let out = revoke(&["--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        ca.get("/v1/revocations")
            .await
            .and_then(|v| v.as_array().map(Vec::len)),
        Some(1)
    );
}

/// A relay (or anyone on the path) that captures a join request holds no
/// token: the request carries a proof bound to the joiner's key, name and
/// cluster. Replayed with another key, name or cluster it is refused and the
/// token stays unspent for the real joiner.
#[tokio::test(flavor = "multi_thread")]
async fn a_captured_join_request_is_useless_for_another_key_name_or_cluster() {
    let pki = Pki::new();
    let net = crate::subnet();
    let (ca, ca_dir) = ca_node(&pki, net, "72h", "api").await;
    let rec = recorder(&pki, net).await;
    let t = token(&ca, &ca_dir, &["--gateway"]);
    let parsed = Token::decode(&t).expect("token");
    let work = tempfile::tempdir().expect("tempdir");
    let spec = NodeSpec::new(net, 3, "vm-1");

    // The real joiner goes through the insider relay, which keeps the request.
    let out = join_once(&t, rec.addr, &work.path().join("first"), &spec);
    assert!(!out.status.success(), "the recorder refuses");
    let captured = rec.requests.lock().expect("lock").clone();
    assert_eq!(captured.len(), 1, "one request");
    let bytes = &captured[0];
    let body = t.trim_start_matches("mnj2.");
    for (what, secret) in [
        ("the token's secret", parsed.seed.to_vec()),
        ("the token text", body.as_bytes().to_vec()),
        (
            "the token text's tail",
            body.as_bytes()[body.len() - 43..].to_vec(),
        ),
    ] {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_slice()),
            "{what} travelled in the join request"
        );
    }
    let join::Request::Join {
        token_id,
        proof,
        csr,
        node,
        cluster,
    } = join::decode_request(bytes).expect("decodes")
    else {
        panic!("not a join request")
    };
    assert_eq!(token_id, parsed.id);
    assert_eq!(node, "vm-1");

    // The attacker swaps in its own key, or another name, or another cluster.
    let attacker = NodeKey::generate().expect("key");
    let forged = [
        (
            "own key",
            attacker.csr("vm-1").expect("csr"),
            "vm-1",
            cluster.clone(),
        ),
        ("other name", csr.clone(), "evil", cluster.clone()),
        (
            "other cluster",
            csr.clone(),
            "vm-1",
            Some("west".to_string()),
        ),
        (
            "own key and name",
            attacker.csr("evil").expect("csr"),
            "evil",
            None,
        ),
    ];
    for (what, csr, node, cluster) in forged {
        let req = join::Request::Join {
            token_id,
            proof: proof.clone(),
            csr,
            node: node.into(),
            cluster,
        };
        let resp = send_join(ca.spec.quic, parsed.ca_fingerprint, &req).await;
        assert_eq!(refusal_of(&resp), Some("bad_token"), "{what}: {resp:?}");
    }
    // A guessed proof for a known token id fails the same way.
    let req = join::Request::Join {
        token_id,
        proof: vec![0; 64],
        csr: attacker.csr("evil").expect("csr"),
        node: "evil".into(),
        cluster: None,
    };
    let resp = send_join(ca.spec.quic, parsed.ca_fingerprint, &req).await;
    assert_eq!(refusal_of(&resp), Some("bad_token"), "{resp:?}");

    // Nothing was spent: the real joiner, pointed at a real node, gets its
    // gateway certificate with the same token.
    let dir = work.path().join("second");
    let out = join_once(&t, ca.spec.quic, &dir, &spec);
    assert!(
        out.status.success(),
        "the token was spent by forgeries: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cert = meshnode_transport::PeerCert::from_pem(
        &std::fs::read_to_string(dir.join("node.pem")).expect("node.pem"),
    )
    .expect("cert");
    assert!(cert.is_gateway());
}

/// One identity, one key: a CA node refuses a second key for a name that
/// holds an unexpired certificate, whether it issued it (its log) or not
/// (a certificate issued offline, seen in gossip), until an operator revokes.
#[tokio::test(flavor = "multi_thread")]
async fn one_identity_one_key_until_an_operator_revokes() {
    let pki = Pki::new();
    let net = crate::subnet();
    let (ca, ca_dir) = ca_node(&pki, net, "72h", "api").await;
    let t = token(&ca, &ca_dir, &["--uses", "3"]);
    let work = tempfile::tempdir().expect("tempdir");

    // vm-1 joins but never runs: only the CA node's log knows it.
    let out = join_once(
        &t,
        ca.spec.quic,
        &work.path().join("a"),
        &NodeSpec::new(net, 3, "vm-1"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Another machine asks for the same name with a fresh key.
    let out = join_once(
        &t,
        ca.spec.quic,
        &work.path().join("b"),
        &NodeSpec::new(net, 4, "vm-1"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second key for vm-1 was issued");
    assert!(
        err.contains("name_taken") && err.contains("another key"),
        "{err}"
    );
    assert!(err.contains("meshnode cert revoke --node vm-1"), "{err}");
    assert!(!work.path().join("b/node.pem").exists());

    // vm-7 has a certificate issued offline, runs, then dies: the CA node
    // never issued it, but its certificate is in the pool's state.
    let mut spec7 = NodeSpec::new(net, 5, "vm-7");
    spec7.seeds = vec![ca.spec.quic];
    let mut vm7 = NodeProc::start(spec7, &pki.issue(CLUSTER, "vm-7"));
    assert!(
        wait_until(Duration::from_secs(15), || alive_on(&ca, "vm-7"))
            .await
            .is_some(),
        "vm-7 did not join: {}",
        vm7.log_text()
    );
    vm7.kill9();
    assert!(
        wait_until(Duration::from_secs(20), || async {
            !alive_on(&ca, "vm-7").await
        })
        .await
        .is_some(),
        "vm-7 still alive on ca-1"
    );
    let out = join_once(
        &t,
        ca.spec.quic,
        &work.path().join("c"),
        &NodeSpec::new(net, 6, "vm-7"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second key for vm-7 was issued");
    assert!(err.contains("another key"), "{err}");

    // The operator replaces vm-1 explicitly: revoke, then the join goes through.
    let admin = ca.spec.admin.to_string();
    let data = ca_dir.display().to_string();
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
    let out = join_once(
        &t,
        ca.spec.quic,
        &work.path().join("d"),
        &NodeSpec::new(net, 4, "vm-1"),
    );
    assert!(
        out.status.success(),
        "after revocation: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A member that claims the CA role with a proof the CA key did not make gets
/// no join requests: the gate drops its claim, so a relay picks only proven
/// CA nodes. The insider's name sorts first, so a relay that believed it
/// would try it before ca-1.
#[tokio::test(flavor = "multi_thread")]
async fn a_join_relay_never_picks_a_member_claiming_the_ca_role_without_proof() {
    use meshnode_gossip::keys::{CA_ROLE_KEY, ROLE_PREFIX};
    use meshnode_gossip::{signed, GossipConfig, GossipHandle, PoolKind, QuicTransport, Tuning};
    use meshnode_transport::pki::sign::NodeSigner;

    let pki = Pki::new();
    let net = crate::subnet();
    let (ca, ca_dir) = ca_node(&pki, net, "72h", "api").await;
    let mut relay_spec = NodeSpec::new(net, 2, "relay-1");
    relay_spec.seeds = vec![ca.spec.quic];
    let relay = NodeProc::start(relay_spec, &pki.issue(CLUSTER, "relay-1"));

    // The insider: a real certificate of the cluster, a real gossip pool member.
    let d = pki.issue(CLUSTER, "a-mallory");
    let tls = TlsMaterial::load(&d.join("ca.pem"), &d.join("node.pem"), &d.join("node.key"))
        .expect("tls");
    let me = tls.me();
    let cert_der = meshnode_transport::pki::first_cert_der(
        &std::fs::read_to_string(d.join("node.pem")).expect("pem"),
    )
    .expect("der");
    let signer = Arc::new(
        NodeSigner::from_pem(&std::fs::read_to_string(d.join("node.key")).expect("key"))
            .expect("signer"),
    );
    let tls = Arc::new(tls);
    let authority = tls.clone();
    let bind = crate::free_udp(std::net::Ipv4Addr::new(127, net[0], net[1], 8));
    let (endpoint, incoming) = Endpoint::bind(EndpointConfig { bind, tls }).expect("bind");
    let advertise = endpoint.local_addr().expect("addr");
    let cfg = GossipConfig {
        me: me.identity.clone(),
        kind: PoolKind::Lan {
            cluster: CLUSTER.into(),
        },
        generation: 1,
        advertise,
        gateway: false,
        seeds: vec![ca.spec.quic],
        services: Vec::new(),
        tuning: Tuning::default(),
        signer: signer.clone(),
        cert_der,
    };
    let guard = cfg.guard(authority, meshnode_gossip::wire::Limits::default());
    let transport = QuicTransport::new(
        endpoint.clone(),
        incoming.gossip,
        cfg.kind.clone(),
        guard,
        cfg.dictionary(),
    );
    let probing = transport.probing();
    let insider = GossipHandle::spawn(cfg, &transport, probing)
        .await
        .expect("gossip");
    let joins = Arc::new(AtomicUsize::new(0));
    let counted = joins.clone();
    let mut join_conns = incoming.join;
    tokio::spawn(async move {
        while let Some(jc) = join_conns.recv().await {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(jc);
        }
    });
    for n in [&ca, &relay] {
        assert!(
            wait_until(Duration::from_secs(15), || alive_on(n, "a-mallory"))
                .await
                .is_some(),
            "the insider did not become a member of {}",
            n.spec.name
        );
    }
    // Now it claims the CA role: its own signature, not the CA key's.
    let forged = signed::encode_ca_proof(
        &signer
            .sign(&signed::ca_role_input(&me.identity.uri()))
            .expect("sign"),
    );
    insider
        .publish_prefixed(ROLE_PREFIX, [(CA_ROLE_KEY.to_string(), forged)].into())
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let t = token(&ca, &ca_dir, &[]);
    let work = tempfile::tempdir().expect("tempdir");
    let out = join_once(
        &t,
        relay.spec.quic,
        &work.path().join("vm-1"),
        &NodeSpec::new(net, 3, "vm-1"),
    );
    assert!(
        out.status.success(),
        "relayed join: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        joins.load(Ordering::SeqCst),
        0,
        "the relay sent a join request to the insider"
    );
    // The forged value reaches the relay by a push, or at the latest by
    // the next full exchange (paced: 10 s in a pool this small).
    let counted = wait_until(Duration::from_secs(20), || async {
        relay
            .get_text("/metrics")
            .await
            .unwrap_or_default()
            .lines()
            .any(|l| {
                l.starts_with("meshnode_gossip_refused_total{") && l.contains("reason=\"bad_role\"")
            })
    })
    .await;
    assert!(counted.is_some(), "the relay did not count the forged role");
    insider.shutdown().await;
}

/// Anonymous join connections are bounded per source and in all, and a full
/// table makes room by evicting the oldest idle one: a real join goes
/// through at once while 500 anonymous connections are held open.
#[tokio::test(flavor = "multi_thread")]
async fn a_real_join_completes_while_500_anonymous_connections_are_held() {
    let pki = Pki::new();
    let net = crate::subnet();
    let (ca, ca_dir) = ca_node(&pki, net, "72h", "api").await;
    let fp = pki.ca.fingerprint().expect("fp");
    let cfg =
        join_client_config(fp, Arc::new(transport_config(Link::Tunnel))).expect("client config");

    // One source opens 100: only 8 stay. Then 62 sources open 8 each (496).
    let mut held = Vec::new();
    let mut endpoints = Vec::new();
    let mut dialled = 0;
    let sources: Vec<(u8, usize)> = std::iter::once((50u8, 100usize))
        .chain((100u8..162).map(|h| (h, 8)))
        .collect();
    for (host, n) in sources {
        let bind = SocketAddr::from(([127, net[0], net[1], host], 0));
        let ep = quinn::Endpoint::client(bind).expect("endpoint");
        for _ in 0..n {
            dialled += 1;
            if let Ok(connecting) = ep.connect_with(cfg.clone(), ca.spec.quic, "meshnode") {
                if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(5), connecting).await {
                    held.push(c);
                }
            }
        }
        endpoints.push(ep);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let open = held.iter().filter(|c| c.close_reason().is_none()).count();
    eprintln!(
        "measure: {dialled} anonymous join connections dialled, {} handshakes, {open} still open",
        held.len()
    );
    assert!(open <= 256, "{open} anonymous connections held");

    let t = token(&ca, &ca_dir, &[]);
    let work = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let out = join_once(
        &t,
        ca.spec.quic,
        &work.path().join("vm-1"),
        &NodeSpec::new(net, 3, "vm-1"),
    );
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "join under flood: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("measure: a real join under the flood took {took:.2?}");
    assert!(took <= Duration::from_secs(2), "join took {took:?}");
    let metrics = ca.get_text("/metrics").await.unwrap_or_default();
    for reason in ["per_source", "evicted"] {
        assert!(
            metrics.lines().any(
                |l| l.starts_with("meshnode_join_connections_refused_total{")
                    && l.contains(&format!("reason=\"{reason}\""))
            ),
            "{reason} not counted"
        );
    }
    drop(held);
}

/// `join` run as root for a daemon of its own user: the credentials go to
/// that user (it renews them), the config stays root's, so the daemon cannot
/// rewrite its own config.
#[tokio::test(flavor = "multi_thread")]
async fn join_gives_the_credentials_to_the_data_dirs_owner_but_not_the_config() {
    use std::os::unix::fs::MetadataExt;
    let me = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1);
    if me != 0 {
        assert!(std::env::var("CI").is_err(), "CI runs the tests as root");
        eprintln!("SKIPPED: needs root to give the data dir to another user");
        return;
    }
    let pki = Pki::new();
    let net = crate::subnet();
    let (ca, ca_dir) = ca_node(&pki, net, "72h", "api").await;
    let t = token(&ca, &ca_dir, &[]);
    let work = tempfile::tempdir().expect("tempdir");
    let data = work.path().join("data");
    std::fs::create_dir(&data).expect("data dir");
    std::os::unix::fs::chown(&data, Some(65534), Some(65534)).expect("chown");
    let etc = work.path().join("etc");
    std::fs::create_dir(&etc).expect("etc");
    let config = etc.join("meshnode.toml");
    let spec = NodeSpec::new(net, 3, "vm-1");
    let mut args = join_args(&t, ca.spec.quic, &data, &spec, true);
    args.push("--config".into());
    args.push(config.clone().into_os_string());
    let out = std::process::Command::new(crate::meshnode_bin())
        .args(&args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("join");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in ["node.key", "node.pem", "ca.pem"] {
        let m = std::fs::metadata(data.join(f)).expect(f);
        assert_eq!((m.uid(), m.gid()), (65534, 65534), "{f}");
    }
    let m = std::fs::metadata(&config).expect("config");
    assert_eq!(m.uid(), 0, "the config must stay root's");
    assert_eq!(m.mode() & 0o777, 0o644);
}

/// Every read command, and each admin action that answers, prints one JSON
/// value on stdout with `--json` (and nothing on stderr), for scripts.
#[tokio::test(flavor = "multi_thread")]
async fn every_read_command_and_admin_action_prints_json() {
    let pki = Pki::new();
    let net = crate::subnet();
    let (ca, ca_dir) = ca_node(&pki, net, "1h", "web").await;
    let up = wait_until(Duration::from_secs(10), || async {
        ca.instances("web").await.len() == 1
    })
    .await;
    assert!(up.is_some(), "web never registered: {}", ca.log_text());
    let admin = ca.spec.admin.to_string();
    let data = ca_dir.display().to_string();
    let with_admin = |cmd: &[&str]| -> serde_json::Value {
        let mut args: Vec<&str> = cmd.to_vec();
        args.extend_from_slice(&["--admin", &admin, "--json"]);
        let out = meshnode(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{cmd:?}: {stderr}");
        assert!(
            stderr.trim().is_empty(),
            "{cmd:?} wrote to stderr: {stderr}"
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{cmd:?} --json is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    };
    let members = with_admin(&["members"]);
    assert!(members.to_string().contains("ca-1"), "{members}");
    let services = with_admin(&["services"]);
    assert!(services.to_string().contains("web"), "{services}");
    let endpoints = with_admin(&["endpoints", "web"]);
    assert!(endpoints.to_string().contains("ca-1"), "{endpoints}");
    let status = with_admin(&["status"]);
    assert_eq!(status["node"], "ca-1", "{status}");
    let policies = with_admin(&["policy", "list"]);
    assert!(policies.is_array() || policies.is_object(), "{policies}");
    let token = with_admin(&["token", "create", "--data-dir", &data]);
    assert!(token["token"].is_string(), "{token}");
    let revoked = with_admin(&[
        "cert",
        "revoke",
        "--node",
        "never-was",
        "--force",
        "--data-dir",
        &data,
    ]);
    assert!(revoked["id"].is_string(), "{revoked}");
    let explained = with_admin(&["explain", "web"]);
    assert_eq!(explained["authorization"]["action"], "allow", "{explained}");

    // Errors, too, are one JSON value on stdout, with the exit code.
    for (cmd, code) in [
        (vec!["endpoints", "no-such-service"], 1),
        (vec!["explain", "bad name"], 64),
        (
            vec![
                "cert",
                "revoke",
                "--node",
                "nosuchnode",
                "--data-dir",
                &data,
            ],
            64,
        ),
    ] {
        let mut args = cmd.clone();
        args.extend_from_slice(&["--admin", &admin, "--json"]);
        let out = meshnode(&args);
        assert_eq!(out.status.code(), Some(code), "{cmd:?}: {out:?}");
        assert!(out.stderr.is_empty(), "{cmd:?} wrote to stderr: {out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{cmd:?}: the error is not JSON ({e}): {out:?}"));
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
        assert_eq!(v["exit_code"], code, "{v}");
    }
}

/// What the Kubernetes init container runs: the token from a file, the
/// identity given to the agent's uid, and at every later start nothing at
/// all (the token may have expired by then).
#[tokio::test(flavor = "multi_thread")]
async fn an_init_container_joins_once_from_a_token_file_for_another_uid() {
    use std::os::unix::fs::MetadataExt;
    let pki = Pki::new();
    let net = crate::subnet();
    let (ca, ca_dir) = ca_node(&pki, net, "72h", "api").await;
    let work = tempfile::tempdir().expect("tempdir");
    let token_file = work.path().join("token");
    std::fs::write(&token_file, format!("{}\n", token(&ca, &ca_dir, &[]))).expect("token");
    let dir = work.path().join("data");
    let spec = NodeSpec::new(net, 3, "k8s-node-1");
    let run = |extra: &[&str]| {
        let mut args: Vec<std::ffi::OsString> = vec![
            "join".into(),
            ca.spec.quic.to_string().into(),
            "--node".into(),
            spec.name.clone().into(),
            "--bind".into(),
            spec.quic.to_string().into(),
            "--data-dir".into(),
            dir.clone().into(),
            "--no-start".into(),
            "--skip-if-joined".into(),
            "--owner".into(),
            "65532:65532".into(),
        ];
        args.extend(extra.iter().map(std::ffi::OsString::from));
        std::process::Command::new(crate::meshnode_bin())
            .args(&args)
            .env_remove("MESHNODE_TOKEN")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run join")
    };
    let tf = token_file.to_str().expect("utf-8");
    let out = run(&["--token-file", tf]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in ["", "node.key", "node.pem", "ca.pem"] {
        let m = std::fs::metadata(dir.join(f)).expect("written");
        assert_eq!((m.uid(), m.gid()), (65532, 65532), "{f} is not the agent's");
    }
    let key = std::fs::read(dir.join("node.key")).expect("key");
    // A later start: the (now garbage) token is not even read.
    std::fs::write(&token_file, "expired long ago").expect("token");
    let out = run(&["--token-file", tf]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("nothing to do"), "{err}");
    assert_eq!(std::fs::read(dir.join("node.key")).expect("key"), key);
    // An owner that is not UID:GID is a usage error that says so.
    let out = std::process::Command::new(crate::meshnode_bin())
        .args(["join", "--token-file", tf, "127.0.0.1:1", "--owner", "root"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run join");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("is not UID:GID"), "{err}");
}
