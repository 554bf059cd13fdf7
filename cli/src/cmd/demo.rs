//! `meshnode demo`: a two-cluster mesh on loopback, real processes, real
//! traffic. Traffic stays in its own cluster, fails over to the other cluster
//! through the gateways when the local instance is killed with -9, and comes
//! home when it is back. Everything lives in a temp dir removed at the end.
//!
//! `demo --http` runs the HTTP act instead: api v2 starts beside v1 in east,
//! and a canary moves 10 % -> 50 % -> 100 % of requests to it by signed
//! `routes` documents applied with `meshnode policy apply`; then
//! `resilience` documents open a circuit breaker on the slow canary, hide
//! an instance failing 30 % of requests behind retries, rate-limit each
//! instance and inject a fault, each with its counts.

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
        println!("    dashboard: http://{east_gw}/ui/ (the east gateway's view)");
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
    let signer = Signer {
        exe,
        op_dir: &op_dir,
        dir,
        admin: watcher.admin,
        secret: secret.trim(),
        followers: nodes
            .iter()
            .filter(|n| n.name == "east-1")
            .map(|n| n.admin)
            .collect(),
    };
    for (version, v2) in [(1u64, 0u32), (2, 10), (3, 50), (4, 100)] {
        step(&format!(
            "{}: meshnode policy apply, then {CANARY_REQUESTS} requests",
            if v2 == 0 {
                "before the release, every request to v1".to_string()
            } else {
                format!("canary at {v2} %")
            }
        ));
        let text = format!(
            "kind = \"routes\"\nname = \"{SERVICE}\"\n\n[[route]]\nmatch = {{ path_prefix = \"/\" }}\nsplit = [{{ subset = \"version=v1\", weight = {v1} }}, {{ subset = \"version=v2\", weight = {v2} }}]\n",
            v1 = 100 - v2
        );
        signer
            .apply(&format!("canary-{v2}.toml"), &text, "routes", version)
            .await?;
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

    resilience(&signer, upstream).await?;
    if hold {
        step("holding the mesh up; press Ctrl-C to stop");
        println!("    upstream to api: curl http://{upstream}/");
        println!("    dashboard: http://{}/ui/", watcher.admin);
        println!(
            "    meshnode explain {SERVICE} --path / --admin {}",
            watcher.admin
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    Ok(())
}

/// Signs documents with the demo's operator certificate and applies them
/// with `meshnode policy apply` at one node.
struct Signer<'a> {
    exe: &'a Path,
    op_dir: &'a Path,
    dir: &'a Path,
    admin: SocketAddr,
    secret: &'a str,
    /// Other nodes that must hold a document before it counts as applied
    /// (instance nodes: a rate limit is enforced there).
    followers: Vec<SocketAddr>,
}

impl Signer<'_> {
    /// Applies `text` (saved as `file`, printed) as `version` of its
    /// `kind`, and waits until the node holds it (for `resilience`: until
    /// its data path applies it).
    async fn apply(&self, file: &str, text: &str, kind: &str, version: u64) -> anyhow::Result<()> {
        let file = self.dir.join(file);
        std::fs::write(&file, text)?;
        for line in text.lines() {
            println!("    | {line}");
        }
        let out = Command::new(self.exe)
            .arg("policy")
            .arg("apply")
            .arg(&file)
            .arg("--operator-cert")
            .arg(self.op_dir.join("operator.pem"))
            .arg("--operator-key")
            .arg(self.op_dir.join("operator.key"))
            .arg("--admin")
            .arg(self.admin.to_string())
            .env("MESHNODE_ADMIN_SECRET", self.secret)
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
        let (path, pointer) = if kind == "resilience" {
            (
                format!("/v1/explain?service={SERVICE}"),
                "/resilience/version",
            )
        } else {
            (format!("/v1/policy/{kind}/{SERVICE}"), "/summary/version")
        };
        wait_for(Duration::from_secs(10), || async {
            client::get(self.admin, &path)
                .await
                .ok()
                .and_then(|b| serde_json::from_str::<Value>(&b).ok())
                .and_then(|v| v.pointer(pointer).and_then(Value::as_u64))
                == Some(version)
        })
        .await
        .with_context(|| format!("{CANARY} did not apply {kind} version {version} within 10 s"))?;
        let path = format!("/v1/policy/{kind}/{SERVICE}");
        for &node in &self.followers {
            wait_for(Duration::from_secs(10), || async {
                client::get(node, &path)
                    .await
                    .ok()
                    .and_then(|b| serde_json::from_str::<Value>(&b).ok())
                    .and_then(|v| v.pointer("/summary/version").and_then(Value::as_u64))
                    == Some(version)
            })
            .await
            .with_context(|| format!("{node} did not hold {kind} version {version} within 10 s"))?;
        }
        Ok(())
    }
}

/// What the mesh answered to a batch of requests.
#[derive(Default)]
struct Answers {
    ok: usize,
    /// Answers with 200, by the node that gave them.
    by_node: BTreeMap<String, usize>,
    /// Other statuses, by `status why` (`x-meshnode-error`, the limit or
    /// the fault).
    other: BTreeMap<String, usize>,
    failed: usize,
}

impl Answers {
    fn add(&mut self, r: anyhow::Result<Answer>) {
        match r {
            Ok(a) if a.status == 200 => {
                self.ok += 1;
                *self.by_node.entry(a.node.unwrap_or_default()).or_default() += 1;
            }
            Ok(a) => *self.other.entry(a.why()).or_default() += 1,
            Err(_) => self.failed += 1,
        }
    }

    fn count(&self, key: &str) -> usize {
        self.other.get(key).copied().unwrap_or(0)
    }

    fn not_ok(&self) -> usize {
        self.other.values().sum::<usize>() + self.failed
    }

    fn describe(&self) -> String {
        let mut parts = vec![format!("{} ok", self.ok)];
        parts.extend(self.other.iter().map(|(k, n)| format!("{n} {k}")));
        if self.failed > 0 {
            parts.push(format!("{} without an answer", self.failed));
        }
        parts.join(", ")
    }
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    /// The node that answered (`hello from <node>`), when one did.
    node: Option<String>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `503 circuit_open max_requests`, `429 rate_limited`, `503 fault abort`, `503`.
    fn why(&self) -> String {
        let mut why = self.status.to_string();
        if let Some(f) = self.header("x-meshnode-fault") {
            why.push_str(&format!(" fault {f}"));
        } else if let Some(e) = self.header("x-meshnode-error") {
            why.push_str(&format!(" {e}"));
            if let Some(l) = self.header("x-meshnode-limit") {
                why.push_str(&format!(" {l}"));
            }
        }
        why
    }
}

/// One request for `path` through the upstream, on its own connection.
async fn call(upstream: SocketAddr, path: &str, header: Option<&str>) -> anyhow::Result<Answer> {
    let work = async {
        let mut s = TcpStream::connect(upstream).await?;
        let extra = header.map(|h| format!("{h}\r\n")).unwrap_or_default();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: api\r\n{extra}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("no HTTP response"))?;
        let node = body.trim().strip_prefix("hello from ").map(str::to_string);
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("no status line in {head:?}"))?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        anyhow::Ok(Answer {
            status,
            headers,
            node,
        })
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| anyhow!("timed out"))?
}

/// The counter `name{..labels..}` in a node's metrics, summed over lines
/// whose labels contain every one of `labels`.
async fn metric(admin: SocketAddr, name: &str, labels: &[&str]) -> f64 {
    let text = client::get(admin, "/metrics").await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The resilience act, on the canary's node: a circuit breaker opening on
/// the slow canary, retries hiding an instance that fails 30 % of its
/// requests, an instance rate limit, and an injected fault, each with the
/// mesh's counts.
async fn resilience(signer: &Signer<'_>, upstream: SocketAddr) -> anyhow::Result<()> {
    let admin = signer.admin;
    let head = format!("kind = \"resilience\"\nname = \"{SERVICE}\"\n");
    let mut rows = Vec::new();

    step("a circuit breaker: every request goes to v2 on east-2, which now takes 1 s for /slow; 20 at once");
    signer
        .apply(
            "breaker.toml",
            &format!("{head}circuit_breaker = {{ max_requests = 5 }}\n"),
            "resilience",
            1,
        )
        .await?;
    let t = clock::now();
    let tasks: Vec<_> = (0..20)
        .map(|_| tokio::spawn(async move { call(upstream, "/slow", None).await }))
        .collect();
    let mut burst = Answers::default();
    for task in tasks {
        burst.add(task.await.map_err(anyhow::Error::from).and_then(|r| r));
    }
    println!(
        "    {} in {:.1} s",
        burst.describe(),
        clock::since(t).as_secs_f64()
    );
    let mut after = Answers::default();
    for _ in 0..20 {
        after.add(call(upstream, "/", None).await);
    }
    println!("    then, the load gone, 20 in a row: {}", after.describe());
    let opened = burst.count("503 circuit_open max_requests");
    rows.push(vec![
        "breaker".to_string(),
        "20 at once + 20".to_string(),
        (burst.ok + after.ok).to_string(),
        format!("{opened} turned away at once (max_requests = 5)"),
    ]);
    if burst.ok < 5 || opened < 10 || after.ok != 20 || burst.failed > 0 {
        bail!(
            "the breaker did not hold 5 requests and recover: {}",
            burst.describe()
        );
    }

    step("retries: the routes split api 50/50 again; east-1 answers 503 to 30 % of /flaky");
    signer
        .apply(
            "split-50.toml",
            &format!("kind = \"routes\"\nname = \"{SERVICE}\"\n\n[[route]]\nmatch = {{ path_prefix = \"/\" }}\nsplit = [{{ subset = \"version=v1\", weight = 50 }}, {{ subset = \"version=v2\", weight = 50 }}]\n"),
            "routes",
            5,
        )
        .await?;
    let mut bare = Answers::default();
    for _ in 0..200 {
        bare.add(call(upstream, "/flaky", None).await);
    }
    println!("    without retries: {}", bare.describe());
    signer
        .apply(
            "retries.toml",
            &format!("{head}retries = {{ attempts = 3, on = [\"5xx\"], budget = 0.2 }}\ncircuit_breaker = {{ max_requests = 5 }}\n"),
            "resilience",
            2,
        )
        .await?;
    let before = metric(admin, "meshnode_http_retries_total", &[]).await;
    let mut retried = Answers::default();
    for _ in 0..200 {
        retried.add(call(upstream, "/flaky", None).await);
    }
    let retries = metric(admin, "meshnode_http_retries_total", &[]).await - before;
    println!(
        "    with retries: {} ({retries} retries, meshnode_http_retries_total)",
        retried.describe()
    );
    rows.push(vec![
        "retries".to_string(),
        "200 + 200".to_string(),
        format!("{} -> {}", bare.ok, retried.ok),
        format!(
            "{} failed without, {} with ({retries} retries)",
            bare.not_ok(),
            retried.not_ok()
        ),
    ]);
    if bare.not_ok() == 0 || retried.not_ok() > 2 {
        bail!(
            "retries did not hide the flaky instance: {}",
            retried.describe()
        );
    }

    step("a rate limit: 20 requests a second per instance (burst 5), checked at each instance's node; 3 s as fast as one client goes");
    signer
        .apply(
            "rate-limit.toml",
            &format!("{head}retries = {{ attempts = 3, on = [\"5xx\"], budget = 0.2 }}\nrate_limit = {{ rps = 20, burst = 5 }}\n"),
            "resilience",
            3,
        )
        .await?;
    let t = clock::now();
    let mut limited = Answers::default();
    while clock::since(t) < Duration::from_secs(3) {
        limited.add(call(upstream, "/", None).await);
    }
    let took = clock::since(t).as_secs_f64();
    let per_instance = 5.0 + 20.0 * took;
    println!(
        "    {} in {took:.1} s; answered by {:?} (each at most {per_instance:.0})",
        limited.describe(),
        limited.by_node
    );
    let too_many = limited.count("429 rate_limited");
    rows.push(vec![
        "rate limit".to_string(),
        (limited.ok + limited.not_ok()).to_string(),
        limited.ok.to_string(),
        format!("{too_many} got 429 (20/s per instance)"),
    ]);
    // Per instance: the burst, then 20 a second.
    let over = limited
        .by_node
        .values()
        .any(|&n| n as f64 > per_instance * 1.05 + 1.0);
    if too_many == 0 || over {
        bail!("the rate limit did not hold: {}", limited.describe());
    }

    step("an injected fault: 10 % of requests carrying x-chaos are aborted with 503 by the caller's node");
    signer
        .apply(
            "fault.toml",
            &format!("{head}fault = {{ abort = {{ status = 503, percent = 10 }}, header = \"x-chaos\" }}\n"),
            "resilience",
            4,
        )
        .await?;
    let mut chaos = Answers::default();
    for _ in 0..200 {
        chaos.add(call(upstream, "/", Some("x-chaos: 1")).await);
    }
    let mut calm = Answers::default();
    for _ in 0..50 {
        calm.add(call(upstream, "/", None).await);
    }
    println!(
        "    with the header: {}; without: {}",
        chaos.describe(),
        calm.describe()
    );
    let aborted = chaos.count("503 fault abort");
    rows.push(vec![
        "fault".to_string(),
        "200 + 50".to_string(),
        (chaos.ok + calm.ok).to_string(),
        format!("{aborted} aborted (10 % of those with x-chaos)"),
    ]);
    if !(5..=40).contains(&aborted) || calm.ok != 50 {
        bail!("the fault did not hit about 10 %: {}", chaos.describe());
    }

    step("resilience summary (meshnode_http_* counters on east-2)");
    println!("{}", table(&["ACT", "REQUESTS", "OK", "THE MESH"], &rows));
    for (name, labels) in [
        ("meshnode_http_breaker_open_total", &[][..]),
        ("meshnode_http_retries_total", &[]),
        ("meshnode_http_faults_injected_total", &[]),
    ] {
        println!("    {name} {}", metric(admin, name, labels).await);
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

/// `/slow` takes 1 s; `/flaky` gets 503 for 3 of every 10 requests at
/// east-1 (the instance retries hide).
async fn start_app(node: &str) -> anyhow::Result<App> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let body = format!("hello from {node}\n");
    let flaky = node == "east-1";
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let body = body.clone();
            let hits = hits.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let path = req.uri().path().to_string();
                        let text = if path == "/healthz" {
                            "ok\n".to_string()
                        } else {
                            body.clone()
                        };
                        let fail = flaky
                            && path == "/flaky"
                            && hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 10 < 3;
                        async move {
                            if path == "/slow" {
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                            let mut resp = hyper::Response::new(Full::new(Bytes::from(text)));
                            if fail {
                                *resp.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                            }
                            Ok::<_, Infallible>(resp)
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
