//! `meshnode demo`: a two-cluster mesh on loopback, real processes, real
//! traffic. Traffic stays in its own cluster, fails over to the other cluster
//! through the gateways when the local instance is killed with -9, and comes
//! home when it is back. Everything lives in a temp dir removed at the end.
//!
//! `demo --http` runs the HTTP act instead: api v2 starts beside v1 in east,
//! and a canary moves 10 % -> 50 % -> 100 % of requests to it by signed
//! `routes` documents applied with `meshnode policy apply`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use meshnode_node::admin::client;
use meshnode_transport::clock;
use meshnode_transport::pki::{Ca, DEFAULT_CA_VALIDITY};
use meshnode_transport::Role;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

use crate::output::table;
use crate::Failure;

const MESH: &str = "demo";
const SERVICE: &str = "api";
const REQUESTS: usize = 20;

/// Requests per phase of the HTTP act.
const CANARY_REQUESTS: usize = 200;
/// The canary's node (api v2, only with `--http`).
const CANARY: &str = "east-2";

/// (name, cluster, loopback host byte, gateway, hosts api, has the upstream)
const LAYOUT: [(&str, &str, u8, bool, bool, bool); 5] = [
    ("east-gw", "east", 11, true, false, false),
    ("east-1", "east", 12, false, true, false),
    ("east-2", "east", 13, false, false, true),
    ("west-gw", "west", 21, true, false, false),
    ("west-1", "west", 22, false, true, false),
];

struct DemoNode {
    name: String,
    cluster: String,
    gateway: bool,
    quic: SocketAddr,
    admin: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl DemoNode {
    fn start(&mut self, exe: &Path) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(exe)
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("MESHNODE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }
}

pub async fn demo(hold: bool, http: bool) -> Result<(), Failure> {
    run(hold, http).await.map_err(Failure::runtime)
}

fn step(msg: &str) {
    println!("\n==> {msg}");
}

/// The version of api a node runs: v2 only on the canary's node.
fn version(node: &str) -> &'static str {
    if node == CANARY {
        "v2"
    } else {
        "v1"
    }
}

async fn run(hold: bool, http: bool) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("meshnode-demo-")
        .tempdir()
        .context("creating a temp dir")?;
    let exe = std::env::current_exe().context("locating the meshnode binary")?;

    step("creating a mesh CA and certificates for 5 nodes in 2 clusters (2 gateways)");
    let ca = Ca::generate(MESH, DEFAULT_CA_VALIDITY)?;
    let mut nodes = Vec::new();
    for (name, cluster, host, gateway, _, _) in LAYOUT {
        let ip = Ipv4Addr::new(127, 0, 0, host);
        let role = if gateway { Role::Gateway } else { Role::Node };
        // 30 days: under 24 h left, `status --check` would warn on every node.
        ca.issue(cluster, name, role, Duration::from_secs(30 * 24 * 3600))?
            .save(&dir.path().join(name), ca.cert_pem())?;
        nodes.push(DemoNode {
            name: name.to_string(),
            cluster: cluster.to_string(),
            gateway,
            quic: free_udp(ip)?,
            admin: free_tcp(ip).await?,
            config: dir.path().join(name).join("config.toml"),
            log: dir.path().join(format!("{name}.log")),
            child: None,
        });
    }
    println!("    mesh {MESH:?}, files in {}", dir.path().display());

    if http {
        step("starting demo service \"api\": v1 on east-1 and west-1, v2 (the canary) on east-2; an upstream on east-2");
    } else {
        step("starting demo service \"api\" on east-1 and west-1, an upstream on east-2");
    }
    let mut apps = BTreeMap::new();
    for (name, _, _, _, api, _) in LAYOUT {
        if api || (http && name == CANARY) {
            apps.insert(name, start_app(name).await?);
        }
    }
    let upstream = free_tcp(Ipv4Addr::new(127, 0, 0, 13)).await?;
    let gateway_of = |cluster: &str| {
        nodes
            .iter()
            .find(|n| n.gateway && n.cluster == cluster)
            .map(|n| n.quic)
    };
    let texts: Vec<String> = nodes
        .iter()
        .zip(LAYOUT)
        .map(|(n, (_, _, _, _, api, up))| {
            let seeds = match gateway_of(&n.cluster) {
                Some(gw) if !n.gateway => format!("\"{gw}\""),
                _ => String::new(),
            };
            let mut text = format!(
                "node = \"{name}\"\ncluster = \"{cluster}\"\nmesh = \"{MESH}\"\ndata_dir = \"{dd}\"\nbind = \"{quic}\"\nadmin = \"{admin}\"\nseeds = [{seeds}]\n",
                name = n.name,
                cluster = n.cluster,
                dd = dir.path().join(&n.name).display(),
                quic = n.quic,
                admin = n.admin,
            );
            if n.gateway {
                let other = if n.cluster == "east" { "west" } else { "east" };
                let wan_seed = gateway_of(other).map(|a| format!("\"{a}\"")).unwrap_or_default();
                text.push_str(&format!(
                    "gateway = true\nwan_advertise = \"{}\"\nwan_seeds = [{wan_seed}]\n",
                    n.quic
                ));
            }
            if let Some(app) = apps.get(n.name.as_str()).filter(|_| api || http) {
                text.push_str(&format!(
                    "\n[[service]]\nname = \"{SERVICE}\"\naddress = \"127.0.0.1\"\nport = {port}\nprotocol = \"http\"\ntags = [\"region={cluster}\", \"version={version}\"]\ncheck = {{ http = \"http://127.0.0.1:{port}/healthz\", interval = \"500ms\", timeout = \"400ms\" }}\n",
                    port = app.port(),
                    cluster = n.cluster,
                    version = version(&n.name),
                ));
            }
            if up {
                text.push_str(&format!(
                    "\n[[upstream]]\nservice = \"{SERVICE}\"\nlisten = \"{upstream}\"\n"
                ));
            }
            text
        })
        .collect();
    for (n, text) in nodes.iter_mut().zip(texts) {
        std::fs::write(&n.config, text)?;
        n.start(&exe)?;
        println!(
            "    {:8} cluster {:5} {} quic {} admin {}",
            n.name,
            n.cluster,
            if n.gateway { "gateway" } else { "node   " },
            n.quic,
            n.admin
        );
    }
    let result = if http {
        canary(&nodes, &exe, &ca, dir.path(), upstream, hold).await
    } else {
        scenario(&mut nodes, &exe, upstream, hold).await
    };
    if result.is_err() {
        for n in &nodes {
            let log = std::fs::read_to_string(&n.log).unwrap_or_default();
            eprintln!("--- last lines of {}'s log ---", n.name);
            for line in log
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                eprintln!("{line}");
            }
        }
    }
    step("stopping: every node leaves its pools gracefully");
    for n in nodes.iter_mut() {
        if let Some(mut child) = n.child.take() {
            let secret =
                std::fs::read_to_string(n.config.with_file_name(meshnode_node::admin::SECRET_FILE))
                    .unwrap_or_default();
            let _ = client::post(n.admin, "/v1/leave", secret.trim()).await;
            match tokio::time::timeout(Duration::from_secs(15), child.wait()).await {
                Ok(Ok(st)) => println!("    {} exited ({st})", n.name),
                _ => {
                    let _ = child.kill().await;
                    println!("    {} killed after 15 s", n.name);
                }
            }
        }
    }
    drop(apps);
    result
}

async fn scenario(
    nodes: &mut [DemoNode],
    exe: &Path,
    upstream: SocketAddr,
    hold: bool,
) -> anyhow::Result<()> {
    let watcher = nodes[2].admin;
    let east_gw = nodes[0].admin;
    step("waiting for both clusters and the WAN pool to form, and api to pass its checks");
    let t = clock::now();
    wait_for(Duration::from_secs(30), || async {
        let (local, remote) = api_view(watcher).await.unwrap_or_default();
        local.iter().any(|(n, h)| n == "east-1" && h == "passing") && remote == Some(1)
    })
    .await
    .context("the mesh did not come up within 30 s")?;
    println!("    ready after {:.1} s", clock::since(t).as_secs_f64());
    println!("    east-2's LAN pool:");
    print_members(watcher, "/v1/members").await?;
    println!("    east-gw's WAN pool (meshnode members --wan):");
    print_members(east_gw, "/v1/members?pool=wan").await?;

    step(&format!(
        "sending {REQUESTS} requests through east-2's upstream {upstream}: they stay in east"
    ));
    let home = traffic(upstream, REQUESTS).await;
    print_tally(&home);

    step("kill -9 east-1, the only api instance in east, while traffic keeps flowing");
    if let Some(mut child) = nodes[1].child.take() {
        child.kill().await.context("killing east-1")?;
    }
    let killed = clock::now();
    let mut during = Tally::default();
    let mut first_remote = None;
    let detected = loop {
        let r = request(upstream).await;
        if first_remote.is_none() && r.as_deref().is_ok_and(|n| n == "west-1") {
            first_remote = Some(clock::since(killed));
        }
        during.add(r);
        let (local, _) = api_view(watcher).await.unwrap_or_default();
        if local.is_empty() {
            break clock::since(killed);
        }
        if clock::since(killed) > Duration::from_secs(30) {
            bail!("east-1's instance was still in east-2's catalog 30 s after the kill");
        }
    };
    println!(
        "    east-1's instance left east-2's catalog {:.2} s after the kill",
        detected.as_secs_f64()
    );
    print_tally(&during);

    step(&format!(
        "sending {REQUESTS} requests: they fail over to west through the gateways"
    ));
    let away = traffic(upstream, REQUESTS).await;
    print_tally(&away);

    step("restarting east-1: traffic comes home once its check passes");
    nodes[1].start(exe)?;
    let restarted = clock::now();
    wait_for(Duration::from_secs(30), || async {
        let (local, _) = api_view(watcher).await.unwrap_or_default();
        local.iter().any(|(n, h)| n == "east-1" && h == "passing")
    })
    .await
    .context("east-1 did not pass its check within 30 s of its restart")?;
    println!(
        "    east-1 passing in east-2's catalog {:.2} s after the restart",
        clock::since(restarted).as_secs_f64()
    );
    wait_for(Duration::from_secs(30), || async {
        request(upstream).await.is_ok_and(|n| n == "east-1")
    })
    .await
    .context("traffic did not come back to east-1 within 30 s")?;
    let back_after = clock::since(restarted);
    let back = traffic(upstream, REQUESTS).await;
    print_tally(&back);

    step("summary");
    let row = |phase: &str, t: &Tally| {
        vec![
            phase.to_string(),
            t.ok.to_string(),
            t.failed.to_string(),
            t.spread(),
        ]
    };
    let rows = vec![
        row("local (east)", &home),
        row("east-1 killed, detecting", &during),
        row("failed over (west)", &away),
        row("east-1 back", &back),
    ];
    println!("{}", table(&["PHASE", "OK", "FAILED", "LANDED ON"], &rows));
    println!(
        "kill -9 detected in {:.2} s; first answer from west {}; home again {:.2} s after restart",
        detected.as_secs_f64(),
        first_remote
            .map(|d| format!("{:.2} s after the kill", d.as_secs_f64()))
            .unwrap_or_else(|| "after detection".into()),
        back_after.as_secs_f64()
    );
    let only = |t: &Tally, node: &str| t.ok == REQUESTS && t.by_node.keys().all(|n| n == node);
    if !only(&home, "east-1") || !only(&away, "west-1") || !only(&back, "east-1") {
        bail!("traffic did not behave as expected (see the table above)");
    }
    if hold {
        step("holding the mesh up; press Ctrl-C to stop");
        for n in nodes.iter().filter(|n| n.child.is_some()) {
            println!("    {}: meshnode members --admin {}", n.name, n.admin);
        }
        println!("    east-gw: meshnode members --wan --admin {east_gw}");
        println!("    upstream to api: curl http://{upstream}/");
        let _ = tokio::signal::ctrl_c().await;
    }
    Ok(())
}

/// The HTTP act: a canary of api v2 moved 10 % -> 50 % -> 100 % by
/// `meshnode policy apply`, with the requests each version answered.
async fn canary(
    nodes: &[DemoNode],
    exe: &Path,
    ca: &Ca,
    dir: &Path,
    upstream: SocketAddr,
    hold: bool,
) -> anyhow::Result<()> {
    let watcher = nodes
        .iter()
        .find(|n| n.name == CANARY)
        .ok_or_else(|| anyhow!("no node {CANARY}"))?;
    step("waiting for the clusters to form and both versions of api to pass their checks");
    let t = clock::now();
    wait_for(Duration::from_secs(30), || async {
        let (local, _) = api_view(watcher.admin).await.unwrap_or_default();
        ["east-1", CANARY]
            .iter()
            .all(|want| local.iter().any(|(n, h)| n == want && h == "passing"))
    })
    .await
    .context("api v1 and v2 did not both pass in east within 30 s")?;
    println!("    ready after {:.1} s", clock::since(t).as_secs_f64());

    step("an operator certificate, to sign routes documents");
    let op_dir = dir.join("operator");
    ca.issue_operator("demo-operator", Duration::from_secs(24 * 3600))?
        .save(&op_dir, ca.cert_pem())?;
    println!(
        "    meshnode cert issue --operator demo-operator  ->  {}",
        op_dir.display()
    );

    let mut phases = Vec::new();
    let secret = std::fs::read_to_string(
        watcher
            .config
            .with_file_name(meshnode_node::admin::SECRET_FILE),
    )
    .context("reading east-2's admin secret")?;
    for (version, v2) in [(1u64, 0u32), (2, 10), (3, 50), (4, 100)] {
        step(&format!(
            "{}: meshnode policy apply, then {CANARY_REQUESTS} requests",
            if v2 == 0 {
                "before the release, every request to v1".to_string()
            } else {
                format!("canary at {v2} %")
            }
        ));
        let file = dir.join(format!("canary-{v2}.toml"));
        std::fs::write(
            &file,
            format!(
                "kind = \"routes\"\nname = \"{SERVICE}\"\n\n[[route]]\nmatch = {{ path_prefix = \"/\" }}\nsplit = [{{ subset = \"version=v1\", weight = {v1} }}, {{ subset = \"version=v2\", weight = {v2} }}]\n",
                v1 = 100 - v2
            ),
        )?;
        for line in std::fs::read_to_string(&file)?.lines() {
            println!("    | {line}");
        }
        let out = Command::new(exe)
            .arg("policy")
            .arg("apply")
            .arg(&file)
            .arg("--operator-cert")
            .arg(op_dir.join("operator.pem"))
            .arg("--operator-key")
            .arg(op_dir.join("operator.key"))
            .arg("--admin")
            .arg(watcher.admin.to_string())
            .env("MESHNODE_ADMIN_SECRET", secret.trim())
            .stdin(Stdio::null())
            .output()
            .await
            .context("running meshnode policy apply")?;
        if !out.status.success() {
            bail!(
                "policy apply failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        println!("    {}", String::from_utf8_lossy(&out.stdout).trim());
        let path = format!("/v1/policy/routes/{SERVICE}");
        wait_for(Duration::from_secs(10), || async {
            client::get(watcher.admin, &path)
                .await
                .ok()
                .and_then(|b| serde_json::from_str::<Value>(&b).ok())
                .and_then(|v| v.pointer("/summary/version").and_then(Value::as_u64))
                == Some(version)
        })
        .await
        .with_context(|| format!("east-2 did not hold routes version {version} within 10 s"))?;
        let t = traffic(upstream, CANARY_REQUESTS).await;
        print_tally(&t);
        phases.push((format!("canary {v2} %"), t));
    }

    step("summary");
    let count = |t: &Tally, v: &str| -> usize {
        t.by_node
            .iter()
            .filter(|(n, _)| version(n) == v)
            .map(|(_, c)| c)
            .sum()
    };
    let rows: Vec<Vec<String>> = phases
        .iter()
        .map(|(phase, t)| {
            vec![
                phase.clone(),
                t.ok.to_string(),
                t.failed.to_string(),
                count(t, "v1").to_string(),
                count(t, "v2").to_string(),
                format!(
                    "{:.1} %",
                    100.0 * count(t, "v2") as f64 / t.ok.max(1) as f64
                ),
            ]
        })
        .collect();
    println!(
        "{}",
        table(&["PHASE", "OK", "FAILED", "V1", "V2", "V2 SHARE"], &rows)
    );
    // Loose bounds: the split is random per request (200 requests: a
    // 10 % share has a standard deviation of 2.1 points).
    let share = |t: &Tally| 100.0 * count(t, "v2") as f64 / t.ok.max(1) as f64;
    let expected = [(0.0, 0.0), (2.0, 25.0), (30.0, 70.0), (100.0, 100.0)];
    let failed: usize = phases.iter().map(|(_, t)| t.failed).sum();
    let off = phases
        .iter()
        .zip(expected)
        .any(|((_, t), (lo, hi))| share(t) < lo || share(t) > hi);
    if failed > 0 || off {
        bail!("the canary did not move as expected (see the table above)");
    }
    println!("every request answered; the v2 share followed each document as it was applied");
    if hold {
        step("holding the mesh up; press Ctrl-C to stop");
        println!("    upstream to api: curl http://{upstream}/");
        println!(
            "    meshnode explain {SERVICE} --path / --admin {}",
            watcher.admin
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    Ok(())
}

#[derive(Default)]
struct Tally {
    ok: usize,
    failed: usize,
    by_node: BTreeMap<String, usize>,
}

impl Tally {
    fn add(&mut self, r: anyhow::Result<String>) {
        match r {
            Ok(node) => {
                self.ok += 1;
                *self.by_node.entry(node).or_default() += 1;
            }
            Err(_) => self.failed += 1,
        }
    }

    fn spread(&self) -> String {
        self.by_node
            .iter()
            .map(|(n, c)| format!("{n}:{c}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn print_tally(t: &Tally) {
    println!(
        "    {} ok, {} failed; landed on {}",
        t.ok,
        t.failed,
        t.spread()
    );
}

async fn traffic(upstream: SocketAddr, n: usize) -> Tally {
    let mut t = Tally::default();
    for _ in 0..n {
        t.add(request(upstream).await);
    }
    t
}

/// One HTTP request through the upstream; returns the node that answered.
async fn request(upstream: SocketAddr) -> anyhow::Result<String> {
    let work = async {
        let mut s = TcpStream::connect(upstream).await?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf);
        let body = text
            .split("\r\n\r\n")
            .nth(1)
            .ok_or_else(|| anyhow!("no HTTP response"))?;
        let node = body
            .trim()
            .strip_prefix("hello from ")
            .ok_or_else(|| anyhow!("unexpected body {body:?}"))?;
        anyhow::Ok(node.to_string())
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| anyhow!("timed out"))?
}

/// The api entries one node sees: local `(node, health)` pairs, and the
/// healthy count of the remote cluster if one is reachable.
async fn api_view(admin: SocketAddr) -> anyhow::Result<(Vec<(String, String)>, Option<u64>)> {
    let v: Value = serde_json::from_str(&client::get(admin, "/v1/services").await?)?;
    let mut local = Vec::new();
    let mut remote = None;
    for i in v
        .get(SERVICE)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let s = |k: &str| {
            i.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        if i.get("remote").and_then(Value::as_bool) == Some(true) {
            if i.get("reachable").and_then(Value::as_bool) == Some(true) {
                remote = i.get("healthy").and_then(Value::as_u64);
            }
        } else {
            local.push((s("node"), s("health")));
        }
    }
    Ok((local, remote))
}

async fn print_members(admin: SocketAddr, path: &str) -> anyhow::Result<()> {
    let v: Value = serde_json::from_str(&client::get(admin, path).await?)?;
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            ["node", "cluster", "addr", "state"]
                .iter()
                .map(|k| crate::output::cell(m.get(*k).unwrap_or(&Value::Null)))
                .collect()
        })
        .collect();
    println!("{}", table(&["NODE", "CLUSTER", "ADDRESS", "STATE"], &rows));
    Ok(())
}

async fn wait_for<F, Fut>(limit: Duration, mut cond: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = clock::now();
    while clock::since(start) < limit {
        if cond().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("condition not met within {limit:?}")
}

fn free_udp(ip: Ipv4Addr) -> anyhow::Result<SocketAddr> {
    let s = std::net::UdpSocket::bind((ip, 0))
        .with_context(|| format!("binding a UDP port on {ip}"))?;
    Ok(s.local_addr()?)
}

async fn free_tcp(ip: Ipv4Addr) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind((ip, 0))
        .await
        .with_context(|| format!("binding a TCP port on {ip}"))?;
    Ok(l.local_addr()?)
}

/// A demo application: answers `hello from <node>` and `/healthz`.
struct App {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_app(node: &str) -> anyhow::Result<App> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let body = format!("hello from {node}\n");
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let text = if req.uri().path() == "/healthz" {
                            "ok\n".to_string()
                        } else {
                            body.clone()
                        };
                        async move {
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(text))))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(App { addr, task })
}
