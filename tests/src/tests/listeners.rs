//! What each listener accepts from whom, tried through the real binary: the
//! admin API (secret, Host, Origin, stalled and surplus connections, a
//! remote address), the data dir lock, and metric labels from the network.

use std::time::{Duration, Instant};

use meshnode_transport::alpn::Alpn;
use meshnode_transport::tunnel::{self, Header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::tests::loopback_endpoint;
use crate::{http_get, http_post, meshnode, subnet, wait_until, NodeProc, NodeSpec, Pki, CLUSTER};

fn one_node(pki: &Pki, net: [u8; 2]) -> NodeProc {
    NodeProc::start(
        NodeSpec::new(net, 1, "node-1"),
        &pki.issue(CLUSTER, "node-1"),
    )
}

async fn up(node: &NodeProc) {
    let ok = wait_until(Duration::from_secs(15), || async {
        http_get(node.spec.admin, "/v1/health").await.is_some()
    })
    .await;
    assert!(ok.is_some(), "node did not start: {}", node.log_text());
}

/// CPU seconds (user + system) the process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn refused_count(metrics: &str, reason: &str) -> f64 {
    metrics
        .lines()
        .find(|l| {
            l.starts_with("meshnode_admin_refused_total{")
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_writes_need_the_secret_our_host_and_no_foreign_origin() {
    let pki = Pki::new();
    let node = one_node(&pki, subnet());
    up(&node).await;
    let admin = node.spec.admin;
    let secret = std::fs::read_to_string(node.data_dir().join("admin.secret")).expect("secret");
    let secret = secret.trim();
    assert_eq!(secret.len(), 64, "a 256-bit secret");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(node.data_dir().join("admin.secret"))
            .expect("meta")
            .permissions(),
    ) & 0o777;
    assert_eq!(mode, 0o600);

    // What a web page in a local browser can send: a simple POST.
    let page =
        "Host: evil.example:9471\r\nOrigin: http://evil.example\r\nContent-Type: text/plain\r\n";
    let rebound = format!(
        "Host: {admin}\r\nOrigin: http://evil.example\r\nAuthorization: Bearer {secret}\r\n"
    );
    let no_secret = format!("Host: {admin}\r\n");
    let wrong = format!(
        "Host: {admin}\r\nAuthorization: Bearer {}\r\n",
        "0".repeat(64)
    );
    for (what, headers, status) in [
        ("page", page.to_string(), "403"),
        ("foreign origin, even with the secret", rebound, "403"),
        ("no secret", no_secret, "401"),
        ("wrong secret", wrong, "401"),
    ] {
        let (line, body) = http_post(admin, "/v1/leave", &headers)
            .await
            .expect("answer");
        assert!(line.contains(status), "{what}: {line} {body}");
    }
    assert!(
        http_get(admin, "/v1/health")
            .await
            .is_some_and(|b| b.contains("ok")),
        "the node must still be up"
    );
    let metrics = http_get(admin, "/metrics").await.unwrap_or_default();
    for reason in ["host", "origin", "secret"] {
        assert!(
            refused_count(&metrics, reason) >= 1.0,
            "{reason}: {metrics}"
        );
    }
    assert!(node.log_text().contains("admin request refused"));

    // The CLI without the secret: a clear usage error.
    let out = meshnode(&[
        "leave",
        "--admin",
        &admin.to_string(),
        "--data-dir",
        "/nonexistent",
    ]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin.secret"));
    // The operator's leave works.
    let dd = node.data_dir().display().to_string();
    let out = meshnode(&["leave", "--admin", &admin.to_string(), "--data-dir", &dd]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gone = wait_until(Duration::from_secs(15), || async {
        http_get(admin, "/v1/health").await.is_none()
    })
    .await;
    assert!(gone.is_some(), "the node did not leave");
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_and_surplus_admin_connections_are_closed_without_spinning() {
    let pki = Pki::new();
    let mut node = one_node(&pki, subnet());
    up(&node).await;
    let admin = node.spec.admin;
    let pid = node.child.as_ref().expect("child").id();
    let limit = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), "--nofile=512:512"])
        .status()
        .expect("prlimit");
    assert!(limit.success());

    // 600 connections that never finish their headers.
    let started = Instant::now();
    let cpu_before = cpu_seconds(pid);
    let mut stalled = Vec::new();
    for _ in 0..600 {
        if let Ok(mut s) = TcpStream::connect(admin).await {
            let _ = s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n").await;
            stalled.push(s);
        }
    }
    // Each is closed by the node: surplus ones at once, the rest after the
    // header timeout (10 s), well within 30 s.
    let closed = async {
        let mut n = 0;
        for s in stalled.iter_mut() {
            let mut b = [0u8; 64];
            // EOF or a reset: closed either way; only a timeout means open.
            if tokio::time::timeout(Duration::from_secs(30), s.read(&mut b))
                .await
                .is_ok()
            {
                n += 1;
            }
        }
        n
    };
    let n_closed = tokio::time::timeout(Duration::from_secs(35), closed)
        .await
        .unwrap_or(0);
    let closed_after = started.elapsed();
    assert_eq!(n_closed, stalled.len(), "stalled connections still open");
    assert!(closed_after < Duration::from_secs(30), "{closed_after:?}");
    // Health answers again at once, the process did not spin meanwhile.
    let t = Instant::now();
    let health = http_get(admin, "/v1/health").await;
    assert!(health.is_some_and(|b| b.contains("ok")));
    let cpu = cpu_seconds(pid) - cpu_before;
    eprintln!(
        "measure: 600 stalled admin connections all closed after {closed_after:.1?}; node CPU {cpu:.2} s meanwhile; health answered in {:?}",
        t.elapsed()
    );
    assert!(cpu < 5.0, "the node used {cpu:.1} s of CPU: spinning?");
    let metrics = http_get(admin, "/metrics").await.unwrap_or_default();
    assert!(refused_count(&metrics, "too_many_connections") >= 1.0);
    drop(stalled);

    // Accept errors (EMFILE) back off: leave the node 16 free descriptors.
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let low = format!("--nofile={}:{}", fds + 16, fds + 16);
    assert!(std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &low])
        .status()
        .expect("prlimit")
        .success());
    let cpu_before = cpu_seconds(pid);
    let mut flood = Vec::new();
    for _ in 0..60 {
        if let Ok(s) = TcpStream::connect(admin).await {
            flood.push(s);
        }
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let cpu = cpu_seconds(pid) - cpu_before;
    eprintln!("measure: 5 s at EMFILE with 60 pending connections: node CPU {cpu:.2} s");
    assert!(
        cpu < 2.5,
        "the accept loop spun at EMFILE: {cpu:.1} s of CPU in 5 s"
    );
    drop(flood);
    let t = Instant::now();
    let back = wait_until(Duration::from_secs(30), || async {
        http_get(admin, "/v1/health")
            .await
            .is_some_and(|b| b.contains("ok"))
    })
    .await;
    assert!(
        back.is_some(),
        "health did not come back: {}",
        node.log_text()
    );
    eprintln!(
        "measure: health back {:?} after the flood ended",
        t.elapsed()
    );
    assert!(node
        .log_text()
        .contains("admin API cannot accept a connection"));
    node.kill9();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_remote_admin_address_needs_an_explicit_opt_in_and_then_the_secret() {
    let pki = Pki::new();
    let dir = pki.issue(CLUSTER, "node-1");
    let spec = NodeSpec::new(subnet(), 1, "node-1");
    let base = spec.config(&dir);
    let remote = base
        .lines()
        .map(|l| {
            if l.starts_with("admin =") {
                "admin = \"0.0.0.0:9471\"".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let path = dir.join("remote.toml");
    std::fs::write(&path, &remote).expect("write");
    let out = meshnode(&["validate", "--config", &path.display().to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("admin") && err.contains("admin_allow_remote"),
        "{err}"
    );
    std::fs::write(&path, format!("admin_allow_remote = true\n{remote}")).expect("write");
    let out = meshnode(&["validate", "--config", &path.display().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_mode_closes_reads_but_health_and_metrics() {
    let pki = Pki::new();
    let dir = pki.issue(CLUSTER, "node-1");
    let mut spec = NodeSpec::new(subnet(), 1, "node-1");
    spec.extra = String::new();
    let cfg = format!("admin_allow_remote = true\n{}", spec.config(&dir));
    std::fs::write(dir.join("config.toml"), cfg).expect("write");
    let node = NodeProc::spawn(
        spec,
        vec![
            "run".into(),
            "--config".into(),
            dir.join("config.toml").into_os_string(),
        ],
        &dir.join("node.log"),
    );
    up(&node).await;
    let admin = node.spec.admin;
    assert!(http_get(admin, "/metrics").await.is_some());
    assert!(http_get(admin, "/v1/members")
        .await
        .is_some_and(|b| b.contains("secret")));
    let out = meshnode(&["members", "--admin", &admin.to_string()]);
    assert!(!out.status.success());
    let secret = std::fs::read_to_string(dir.join("admin.secret")).expect("secret");
    let out = std::process::Command::new(crate::meshnode_bin())
        .args(["members", "--admin", &admin.to_string()])
        .env("MESHNODE_ADMIN_SECRET", secret.trim())
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("node-1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_agent_on_the_same_data_dir_exits_64_naming_the_first() {
    let pki = Pki::new();
    let node = one_node(&pki, subnet());
    up(&node).await;
    let pid = node.child.as_ref().expect("child").id();
    let cfg = node.data_dir().join("config.toml");
    let out = std::process::Command::new(crate::meshnode_bin())
        .args(["run", "--config", &cfg.display().to_string()])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("second agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains(&format!("another agent (pid {pid}) uses")),
        "{err}"
    );
    // The first one is untouched.
    assert!(http_get(node.spec.admin, "/v1/health")
        .await
        .is_some_and(|b| b.contains("ok")));
    let members = node.members().await;
    assert_eq!(members, vec![("node-1".to_string(), "alive".to_string())]);
}

/// Streams naming thousands of random services, all refused, add only a
/// bounded number of metric series and log lines.
#[tokio::test(flavor = "multi_thread")]
async fn refused_streams_with_random_names_add_few_series_and_log_lines() {
    let pki = Pki::new();
    let node = one_node(&pki, subnet());
    up(&node).await;
    let series = |m: &str| {
        m.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .count()
    };
    let before = series(
        &http_get(node.spec.admin, "/metrics")
            .await
            .unwrap_or_default(),
    );
    // A valid certificate of another cluster: every stream is refused with a warning.
    let d = pki.issue("west", "prober");
    let tls = meshnode_transport::tls::TlsMaterial::load(
        &d.join("ca.pem"),
        &d.join("node.pem"),
        &d.join("node.key"),
    )
    .expect("tls");
    let (ep, _incoming) = loopback_endpoint(tls);
    let (conn, _) = ep
        .connect(node.spec.quic, Alpn::Tunnel)
        .await
        .expect("dial");
    let mut refused = 0;
    for i in 0..10_000u32 {
        let Ok((mut send, mut recv)) = conn.open_bi().await else {
            break;
        };
        let header = Header::new(format!("svc-{i}-{}", i.wrapping_mul(2_654_435_761)), 80);
        if tunnel::open(&mut send, &mut recv, &header, Duration::from_secs(5))
            .await
            .is_err()
        {
            refused += 1;
        }
    }
    assert_eq!(refused, 10_000);
    let metrics = http_get(node.spec.admin, "/metrics")
        .await
        .unwrap_or_default();
    let added = series(&metrics).saturating_sub(before);
    eprintln!("measure: 10,000 refused streams with random names added {added} series");
    assert!(added <= 10, "{added} new series:\n{metrics}");
    assert!(
        !metrics.contains("svc-1-"),
        "a random name became a label value"
    );
    let warnings = node.log_text().matches("tunnel stream refused").count();
    assert!(
        (1..=3).contains(&warnings),
        "{warnings} warnings for 10,000 refusals"
    );
}

/// Many handshakes at once: beyond 32 in flight, unproven addresses get a
/// stateless Retry (quinn clients answer it and get through); one source
/// over its rate is shed; the node stays healthy.
#[tokio::test(flavor = "multi_thread")]
async fn a_handshake_burst_is_answered_with_retries_and_one_source_is_rate_limited() {
    use std::sync::Arc;

    use meshnode_transport::tls::{join_client_config, transport_config, Link};

    let pki = Pki::new();
    let net = subnet();
    let node = one_node(&pki, net);
    up(&node).await;
    let fp = pki.ca.fingerprint().expect("fp");
    let cfg =
        join_client_config(fp, Arc::new(transport_config(Link::Tunnel))).expect("client config");
    let burst = |host: u8, n: usize, wait: Duration| {
        let cfg = cfg.clone();
        let to = node.spec.quic;
        async move {
            let bind = std::net::SocketAddr::from(([127, net[0], net[1], host], 0));
            let ep = quinn::Endpoint::client(bind).expect("endpoint");
            let mut attempts = tokio::task::JoinSet::new();
            for _ in 0..n {
                let connecting = ep.connect_with(cfg.clone(), to, "meshnode");
                attempts.spawn(async move {
                    let Ok(c) = connecting else { return false };
                    matches!(tokio::time::timeout(wait, c).await, Ok(Ok(_)))
                });
            }
            let ok = attempts.join_all().await;
            ep.close(quinn::VarInt::from_u32(0), b"");
            ok.iter().filter(|b| **b).count()
        }
    };
    // Four sources, 60 handshakes each, all at once: within each source's
    // burst, above the Retry threshold in all.
    let mut sources = tokio::task::JoinSet::new();
    for i in 0..4 {
        sources.spawn(burst(100 + i, 60, Duration::from_secs(10)));
    }
    let established: usize = sources.join_all().await.iter().sum();
    let metrics = http_get(node.spec.admin, "/metrics")
        .await
        .unwrap_or_default();
    let count = |decision: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("meshnode_quic_admission_total{")
                    && l.contains(&format!("decision=\"{decision}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    eprintln!(
        "measure: 240 concurrent handshakes from 4 sources: {established} established, {} retries",
        count("retry")
    );
    assert_eq!(
        established, 240,
        "every client that answers Retry gets through"
    );
    assert!(count("retry") >= 1.0, "no Retry was sent: {metrics}");

    // One source, 300 at once: over its burst of 100, the rest is shed.
    // Within 1 s at most 100 + 50 tokens exist for it.
    let one = burst(120, 300, Duration::from_secs(1)).await;
    let metrics = http_get(node.spec.admin, "/metrics")
        .await
        .unwrap_or_default();
    let shed: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("meshnode_quic_admission_total{") && l.contains("decision=\"rate\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    eprintln!("measure: 300 concurrent handshakes from one source: {one} established, {shed} Initials shed");
    assert!(one < 300, "{one} established");
    assert!(shed >= 1.0);
    assert!(http_get(node.spec.admin, "/v1/health")
        .await
        .is_some_and(|b| b.contains("ok")));
}
