//! Config reload of a running agent: SIGHUP and `meshnode reload` apply
//! services, checks, upstreams and the log level without dropping
//! established streams or leaving the pool; keys that need a restart are
//! reported and kept; a bad config is refused and the running one stays.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{
    echo_service, free_tcp, meshnode, named_echo, named_echo_once, subnet, upstream, wait_until,
    NodeProc, NodeSpec, Pki,
};

/// Sends `msg` on an open echo connection and reads it back.
async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Result<(), String> {
    s.write_all(msg).await.map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .map_err(|_| "no echo within 5 s".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    if back == msg {
        Ok(())
    } else {
        Err(format!("echoed {back:?}"))
    }
}

fn rewrite(node: &NodeProc, spec: &NodeSpec) {
    let dir = node.data_dir();
    std::fs::write(dir.join("config.toml"), spec.config(&dir)).expect("rewrite config");
}

fn reload_cli(node: &NodeProc, json: bool) -> std::process::Output {
    let admin = node.spec.admin.to_string();
    let dir = node.data_dir();
    let mut args = vec![
        "reload",
        "--admin",
        admin.as_str(),
        "--data-dir",
        dir.to_str().expect("utf-8 dir"),
    ];
    if json {
        args.push("--json");
    }
    meshnode(&args)
}

async fn healthy(node: &NodeProc, service: &str) -> bool {
    node.instances(service)
        .await
        .iter()
        .any(|(_, h)| h == "passing")
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_and_meshnode_reload_apply_services_and_upstreams_without_dropping_streams() {
    let pki = Pki::new();
    let net = subnet();
    let ip = std::net::Ipv4Addr::new(127, net[0], net[1], 1);
    let (api, _a) = named_echo(ip, "api").await;
    let (web, _w) = named_echo(ip, "web").await;

    let mut host = NodeSpec::new(net, 1, "node-1");
    host.extra = echo_service("api", api);
    let host_dir = pki.issue(&host.cluster, "node-1");
    let host_proc = NodeProc::start(host.clone(), &host_dir);

    let api_up = free_tcp(std::net::Ipv4Addr::new(127, net[0], net[1], 2));
    let mut caller = NodeSpec::new(net, 2, "node-2");
    caller.seeds = vec![host.quic];
    caller.extra = upstream("api", api_up);
    // The config's log_level decides, not the suite's MESHNODE_LOG.
    caller.env = vec![("MESHNODE_LOG".into(), String::new())];
    caller.top = "log_level = \"warn\"\n".into();
    let caller_dir = pki.issue(&caller.cluster, "node-2");
    let caller_proc = NodeProc::start(caller.clone(), &caller_dir);

    let ready = wait_until(Duration::from_secs(20), || async {
        healthy(&caller_proc, "api").await
    })
    .await;
    assert!(ready.is_some(), "api never became healthy at the caller");
    let caller_alive = || async {
        host_proc
            .members()
            .await
            .iter()
            .any(|(n, st)| n == "node-2" && st == "alive")
    };
    let formed = wait_until(Duration::from_secs(20), caller_alive).await;
    assert!(formed.is_some(), "the host never saw the caller alive");
    let mut held = TcpStream::connect(api_up).await.expect("connect upstream");
    let mut greeting = [0u8; 4];
    held.read_exact(&mut greeting).await.expect("greeting");
    assert_eq!(&greeting, b"api:");
    round_trip(&mut held, b"before").await.expect("echo before");

    // 1. SIGHUP at the host adds a service; api keeps its health and the
    // time it entered it (no flap through critical).
    let api_since = || async {
        let v = host_proc.get("/v1/services").await.unwrap_or_default();
        v["api"][0]["check"]["since"].as_i64()
    };
    let since = api_since().await.expect("api's check record");
    // `since` has one-second resolution: a reset would show.
    while meshnode_transport::pki::unix_now() <= since + 1 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    host.extra = echo_service("api", api) + &echo_service("web", web);
    rewrite(&host_proc, &host);
    host_proc.signal("HUP");
    let mut flapped = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut web_up = false;
    while std::time::Instant::now() < deadline && !web_up {
        let api = caller_proc.instances("api").await;
        if api.is_empty() || !api.iter().all(|(_, h)| h == "passing") {
            flapped.push(api);
        }
        web_up = healthy(&caller_proc, "web").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        web_up,
        "web never appeared at the caller: {:?}",
        caller_proc.get("/v1/services").await
    );
    assert!(
        flapped.is_empty(),
        "api was not passing during the reload: {flapped:?}"
    );
    assert_eq!(
        api_since().await,
        Some(since),
        "api's health was reset by the reload"
    );
    assert!(
        host_proc.log_text().contains("config reloaded"),
        "no reload line in the host's log"
    );

    // 2. `meshnode reload` at the caller: api's upstream goes, web's comes,
    // the log level rises, and a changed bind is reported and kept.
    let web_listen = free_tcp(std::net::Ipv4Addr::new(127, net[0], net[1], 2));
    let mut changed = caller.clone();
    changed.extra = upstream("web", web_listen);
    changed.top = "log_level = \"debug\"\n".into();
    changed.quic = crate::free_udp(caller.ip);
    rewrite(&caller_proc, &changed);
    let out = reload_cli(&caller_proc, true);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "reload failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(text.trim()).expect("reload JSON");
    let applied: Vec<&str> = report["applied"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(applied, ["upstream", "log_level"], "{report}");
    let kept: Vec<&str> = report["kept"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k["key"].as_str())
        .collect();
    assert_eq!(kept, ["bind"], "{report}");

    // The stream accepted before the reload runs on; the removed listener is closed.
    round_trip(&mut held, b"after the reload")
        .await
        .expect("held stream after reload");
    assert!(
        TcpStream::connect(api_up).await.is_err(),
        "the removed upstream still accepts"
    );
    let (name, echoed) = named_echo_once(None, web_listen, b"hi web", Duration::from_secs(5))
        .await
        .expect("through the new upstream");
    assert_eq!((name.as_str(), echoed.as_slice()), ("web", &b"hi web"[..]));
    let debug_seen = wait_until(Duration::from_secs(5), || async {
        caller_proc.log_text().contains("DEBUG")
    })
    .await;
    assert!(debug_seen.is_some(), "log_level = debug was not applied");

    // The caller never left the pool: the host still sees it alive.
    assert!(caller_alive().await, "{:?}", host_proc.members().await);

    // 3. A config that does not validate is refused; the running one stays.
    let dir = caller_proc.data_dir();
    let good = std::fs::read_to_string(dir.join("config.toml")).expect("config");
    std::fs::write(
        dir.join("config.toml"),
        good.clone() + "\n[[upstream]]\nservice = \"db\"\nlisten = \"nowhere\"\n",
    )
    .expect("write bad config");
    let out = reload_cli(&caller_proc, false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("upstream[1].listen"), "{err}");
    caller_proc.signal("HUP");
    let logged = wait_until(Duration::from_secs(5), || async {
        caller_proc.log_text().contains("reload refused")
    })
    .await;
    assert!(
        logged.is_some(),
        "SIGHUP with a bad config logged no refusal"
    );
    let (name, _) = named_echo_once(None, web_listen, b"still", Duration::from_secs(5))
        .await
        .expect("the running config still serves");
    assert_eq!(name, "web");

    // 4. A listen address another process holds refuses the whole reload.
    let taken = std::net::TcpListener::bind((caller.ip, 0)).expect("bind");
    let taken_addr: SocketAddr = taken.local_addr().expect("addr");
    std::fs::write(
        dir.join("config.toml"),
        good.replace("log_level = \"debug\"", "log_level = \"info\"")
            + &upstream("cache", taken_addr),
    )
    .expect("write config");
    let out = reload_cli(&caller_proc, true);
    assert_eq!(out.status.code(), Some(64));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json error is JSON");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot bind")),
        "{v}"
    );
    let status = caller_proc.get("/v1/status").await.expect("status");
    assert_eq!(status["upstreams"], 1, "{status}");
}
