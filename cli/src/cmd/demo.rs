//! `meshnode demo`: a three-node mesh on loopback, real processes, real traffic,
//! a kill -9, and a summary. Everything lives in a temp dir that is removed at the end.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use meshnode_node::admin::client;
use meshnode_transport::pki::{Ca, DEFAULT_CA_VALIDITY};
use meshnode_transport::Role;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

use crate::output::table;
use crate::Failure;

const MESH: &str = "demo";
const CLUSTER: &str = "local";
const SERVICE: &str = "api";
const REQUESTS: usize = 20;

struct DemoNode {
    name: String,
    ip: Ipv4Addr,
    quic: SocketAddr,
    admin: SocketAddr,
    child: Option<Child>,
}

pub async fn demo(hold: bool) -> Result<(), Failure> {
    run(hold).await.map_err(Failure::runtime)
}

fn step(msg: &str) {
    println!("\n==> {msg}");
}

async fn run(hold: bool) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("meshnode-demo-")
        .tempdir()
        .context("creating a temp dir")?;
    let exe = std::env::current_exe().context("locating the meshnode binary")?;

    step("creating a mesh CA and certificates for 3 nodes");
    let ca = Ca::generate(MESH, DEFAULT_CA_VALIDITY)?;
    let mut nodes = Vec::new();
    for i in 1..=3u8 {
        let ip = Ipv4Addr::new(127, 0, 0, 10 + i);
        let name = format!("node-{i}");
        ca.issue(CLUSTER, &name, Role::Node, Duration::from_secs(24 * 3600))?
            .save(&dir.path().join(&name), ca.cert_pem())?;
        nodes.push(DemoNode {
            name,
            ip,
            quic: free_udp(ip)?,
            admin: free_tcp(ip).await?,
            child: None,
        });
    }
    println!(
        "    mesh {MESH:?}, cluster {CLUSTER:?}, files in {}",
        dir.path().display()
    );

    step("starting demo service \"api\" on node-1 and node-2, an upstream on node-3");
    let mut apps = Vec::new();
    for n in &nodes[..2] {
        apps.push(start_app(&n.name).await?);
    }
    let upstream = free_tcp(nodes[2].ip).await?;
    // node-1 starts the pool; the others join through it.
    let seed = nodes[0].quic;
    for (i, n) in nodes.iter_mut().enumerate() {
        let seeds = if i == 0 {
            String::new()
        } else {
            format!("\"{seed}\"")
        };
        let mut text = format!(
            "node = \"{name}\"\ncluster = \"{CLUSTER}\"\nmesh = \"{MESH}\"\ndata_dir = \"{dd}\"\nbind = \"{quic}\"\nadmin = \"{admin}\"\nseeds = [{seeds}]\n",
            name = n.name,
            dd = dir.path().join(&n.name).display(),
            quic = n.quic,
            admin = n.admin,
        );
        if let Some(app) = apps.get(i) {
            text.push_str(&format!(
                "\n[[service]]\nname = \"{SERVICE}\"\naddress = \"127.0.0.1\"\nport = {port}\nprotocol = \"http\"\ntags = [\"version=v{v}\"]\ncheck = {{ http = \"http://127.0.0.1:{port}/healthz\", interval = \"500ms\", timeout = \"400ms\" }}\n",
                port = app.port(),
                v = i + 1
            ));
        }
        if i == 2 {
            text.push_str(&format!(
                "\n[[upstream]]\nservice = \"{SERVICE}\"\nlisten = \"{upstream}\"\n"
            ));
        }
        let path = dir.path().join(&n.name).join("config.toml");
        std::fs::write(&path, text)?;
        let log = std::fs::File::create(dir.path().join(format!("{}.log", n.name)))?;
        let child = Command::new(&exe)
            .arg("run")
            .arg("--config")
            .arg(&path)
            .env("MESHNODE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting a node")?;
        n.child = Some(child);
        println!("    {} quic {} admin {}", n.name, n.quic, n.admin);
    }
    let result = scenario(&mut nodes, upstream, hold).await;
    if result.is_err() {
        for n in &nodes {
            let log = std::fs::read_to_string(dir.path().join(format!("{}.log", n.name)))
                .unwrap_or_default();
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
    step("stopping: the remaining nodes leave the pool gracefully");
    for n in nodes.iter_mut() {
        if let Some(mut child) = n.child.take() {
            let _ = client::post(n.admin, "/v1/leave").await;
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

async fn scenario(nodes: &mut [DemoNode], upstream: SocketAddr, hold: bool) -> anyhow::Result<()> {
    let watcher = nodes[2].admin;
    step("waiting for the pool to form and both api instances to pass their health checks");
    let t = Instant::now();
    wait_for(Duration::from_secs(30), || async {
        let insts = instances(watcher).await.unwrap_or_default();
        insts.iter().filter(|(_, h)| h == "passing").count() == 2
    })
    .await
    .context("the mesh did not come up within 30 s")?;
    println!("    ready after {:.1} s", t.elapsed().as_secs_f64());
    print_members(watcher).await?;

    step(&format!(
        "sending {REQUESTS} requests through node-3's upstream {upstream}"
    ));
    let before = traffic(upstream, REQUESTS).await;
    print_tally(&before);

    step("kill -9 node-1 while traffic keeps flowing");
    if let Some(mut child) = nodes[0].child.take() {
        child.kill().await.context("killing node-1")?;
    }
    let killed = Instant::now();
    let mut during = Tally::default();
    let detected = loop {
        during.add(request(upstream).await);
        let insts = instances(watcher).await.unwrap_or_default();
        if !insts.iter().any(|(n, _)| n == "node-1") {
            break killed.elapsed();
        }
        if killed.elapsed() > Duration::from_secs(30) {
            bail!("node-1's instance was still in node-3's catalog 30 s after the kill");
        }
    };
    println!(
        "    node-1's instance left node-3's catalog {:.2} s after the kill",
        detected.as_secs_f64()
    );
    print_tally(&during);
    print_members(watcher).await?;

    step(&format!(
        "sending {REQUESTS} more requests: all must land on node-2"
    ));
    let after = traffic(upstream, REQUESTS).await;
    print_tally(&after);

    step("summary");
    let rows = vec![
        vec![
            "before the kill".into(),
            before.ok.to_string(),
            before.failed.to_string(),
            before.spread(),
        ],
        vec![
            "while detecting".into(),
            during.ok.to_string(),
            during.failed.to_string(),
            during.spread(),
        ],
        vec![
            "after detection".into(),
            after.ok.to_string(),
            after.failed.to_string(),
            after.spread(),
        ],
    ];
    println!("{}", table(&["PHASE", "OK", "FAILED", "LANDED ON"], &rows));
    println!(
        "kill -9 detected and instance removed in {:.2} s",
        detected.as_secs_f64()
    );
    if before.ok != REQUESTS || after.ok != REQUESTS || after.by_node.keys().any(|n| n != "node-2")
    {
        bail!("traffic did not behave as expected (see the table above)");
    }
    if hold {
        step("holding the mesh up; press Ctrl-C to stop");
        for n in nodes.iter().filter(|n| n.child.is_some()) {
            println!("    {}: meshnode members --admin {}", n.name, n.admin);
        }
        println!("    upstream to api: curl http://{upstream}/");
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

async fn instances(admin: SocketAddr) -> anyhow::Result<Vec<(String, String)>> {
    let v: Value = serde_json::from_str(&client::get(admin, "/v1/services").await?)?;
    Ok(v.get(SERVICE)
        .and_then(Value::as_array)
        .map(|l| {
            l.iter()
                .map(|i| {
                    let s = |k: &str| {
                        i.get(k)
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string()
                    };
                    (s("node"), s("health"))
                })
                .collect()
        })
        .unwrap_or_default())
}

async fn print_members(admin: SocketAddr) -> anyhow::Result<()> {
    let v: Value = serde_json::from_str(&client::get(admin, "/v1/members").await?)?;
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            ["node", "addr", "state"]
                .iter()
                .map(|k| crate::output::cell(m.get(*k).unwrap_or(&Value::Null)))
                .collect()
        })
        .collect();
    println!("{}", table(&["NODE", "ADDRESS", "STATE"], &rows));
    Ok(())
}

async fn wait_for<F, Fut>(limit: Duration, mut cond: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
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
