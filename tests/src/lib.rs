//! Process-level test helpers: a mesh of real `meshnode` processes on loopback.
//!
//! Each test picks its own random `127.x.y.0/24`-style addresses, so tests can
//! run in parallel; every child process is killed when its guard drops.
// A measuring crate: it reads wall and virtual clocks itself (the
// disallowed-methods rule of clippy.toml is for the mesh's own code).
#![allow(clippy::disallowed_methods)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use meshnode_transport::pki::Ca;
use meshnode_transport::Role;
use rand::RngExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub mod netns;
#[cfg(test)]
mod tests;

pub const MESH: &str = "acme";
pub const CLUSTER: &str = "east";

/// The `meshnode` binary the integration tests start: `$MESHNODE_BIN` when
/// set (relative to the workspace root; `.ci/run` and the README build it
/// first), otherwise built on first use.
///
/// Building from inside a test is slow on a cold tree: cargo runs with the
/// `CARGO_MANIFEST_DIR`/`CARGO_PKG_*` values the test harness set, and ring's
/// build script declares those with `rerun-if-env-changed`, so ring and
/// everything above it rebuild (75 s inside the first test of a fresh CI).
/// The inner build drops those variables so it at least matches a shell build.
pub fn meshnode_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(given) = std::env::var_os("MESHNODE_BIN") {
            let given = PathBuf::from(given);
            let bin = if given.is_relative() {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(given)
            } else {
                given
            };
            assert!(
                bin.exists(),
                "MESHNODE_BIN={} does not exist",
                bin.display()
            );
            return bin;
        }
        // target/<profile>/deps/<test-binary> -> target/<profile>/meshnode
        let exe = std::env::current_exe().expect("test binary path");
        let dir = exe.parent().and_then(Path::parent).expect("target dir");
        let bin = dir.join("meshnode");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-q", "-p", "meshnode-cli", "--bin", "meshnode"]);
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_MANIFEST_")
                || matches!(
                    k.as_ref(),
                    "CARGO_CRATE_NAME" | "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR"
                )
            {
                build.env_remove(k.as_ref());
            }
        }
        let status = build.status().expect("running cargo build");
        assert!(status.success(), "cargo build of meshnode failed");
        assert!(bin.exists(), "{} missing after build", bin.display());
        bin
    })
    .clone()
}

/// Runs `meshnode ARGS` to completion.
pub fn meshnode(args: &[&str]) -> Output {
    Command::new(meshnode_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running meshnode")
}

/// A random loopback /24 for one test: 127.A.B.1 .. 127.A.B.254.
pub fn subnet() -> [u8; 2] {
    let mut r = rand::rng();
    [r.random_range(1..=254), r.random_range(1..=254)]
}

pub fn free_udp(ip: Ipv4Addr) -> SocketAddr {
    std::net::UdpSocket::bind((ip, 0))
        .and_then(|s| s.local_addr())
        .expect("free udp port")
}

pub fn free_tcp(ip: Ipv4Addr) -> SocketAddr {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|s| s.local_addr())
        .expect("free tcp port")
}

/// A CA and a scratch directory for one test.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
    /// Validity of the CA and of every certificate issued here.
    pub validity: Duration,
}

impl Pki {
    /// A CA and certificates valid for one hour.
    pub fn new() -> Self {
        Self::with_validity(Duration::from_secs(3600))
    }

    pub fn with_validity(validity: Duration) -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
            ca: Ca::generate(MESH, validity).expect("CA"),
            validity,
        }
    }

    /// Writes node.pem, node.key and ca.pem into `<dir>/<name>` and returns that dir.
    pub fn issue(&self, cluster: &str, name: &str) -> PathBuf {
        self.issue_as(cluster, name, Role::Node)
    }

    pub fn issue_as(&self, cluster: &str, name: &str, role: Role) -> PathBuf {
        self.issue_acting(cluster, name, role, &[])
    }

    /// [`Pki::issue_as`] for a node that may act as `services`.
    pub fn issue_acting(
        &self,
        cluster: &str,
        name: &str,
        role: Role,
        services: &[&str],
    ) -> PathBuf {
        let d = self.dir.path().join(format!("{cluster}-{name}"));
        let services: Vec<String> = services.iter().map(|s| s.to_string()).collect();
        self.ca
            .issue_as(cluster, name, role, &services, self.validity)
            .expect("issue")
            .save(&d, self.ca.cert_pem())
            .expect("save cert");
        d
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

/// A node's addresses and extra config.
#[derive(Clone)]
pub struct NodeSpec {
    pub name: String,
    pub cluster: String,
    pub ip: Ipv4Addr,
    pub quic: SocketAddr,
    pub admin: SocketAddr,
    pub seeds: Vec<SocketAddr>,
    /// Extra TOML appended to the config (services, upstreams).
    pub extra: String,
    /// Extra top-level keys (`log_format = "json"`), before any table.
    pub top: String,
    /// Runs inside this network namespace (bound to 0.0.0.0, advertising `quic`).
    pub netns: Option<String>,
    /// A gateway: its WAN address and WAN seeds.
    pub wan: Option<(SocketAddr, Vec<SocketAddr>)>,
    /// Extra environment of the process.
    pub env: Vec<(String, String)>,
}

impl NodeSpec {
    pub fn new(net: [u8; 2], host: u8, name: &str) -> Self {
        let ip = Ipv4Addr::new(127, net[0], net[1], host);
        Self {
            name: name.to_string(),
            cluster: CLUSTER.to_string(),
            ip,
            quic: free_udp(ip),
            admin: free_tcp(ip),
            seeds: Vec::new(),
            extra: String::new(),
            top: String::new(),
            netns: None,
            wan: None,
            env: Vec::new(),
        }
    }

    /// A node on `host` of a namespace topology.
    pub fn in_topology(host: &netns::Host, seeds: Vec<SocketAddr>) -> Self {
        Self {
            name: host.name.clone(),
            cluster: host.cluster.clone(),
            ip: host.lan,
            quic: host.quic(),
            admin: netns::ADMIN,
            seeds,
            extra: String::new(),
            top: String::new(),
            netns: Some(host.ns.clone()),
            wan: None,
            env: Vec::new(),
        }
    }

    pub fn config(&self, data_dir: &Path) -> String {
        let list = |v: &[SocketAddr]| {
            v.iter()
                .map(|s| format!("\"{s}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut top = format!(
            "node = \"{}\"\ncluster = \"{}\"\nmesh = \"{MESH}\"\ndata_dir = \"{}\"\nadmin = \"{}\"\nseeds = [{}]\n",
            self.name,
            self.cluster,
            data_dir.display(),
            self.admin,
            list(&self.seeds),
        );
        if self.netns.is_some() {
            top.push_str(&format!(
                "bind = \"0.0.0.0:{}\"\nadvertise = \"{}\"\n",
                self.quic.port(),
                self.quic
            ));
        } else {
            top.push_str(&format!("bind = \"{}\"\n", self.quic));
        }
        if let Some((wan, seeds)) = &self.wan {
            top.push_str(&format!(
                "gateway = true\nwan_advertise = \"{wan}\"\nwan_seeds = [{}]\n",
                list(seeds)
            ));
        }
        top.push_str(&self.top);
        format!("{top}[gossip]\ninterval = \"250ms\"\n{}", self.extra)
    }
}

/// A running `meshnode run`; killed (SIGKILL) on drop.
pub struct NodeProc {
    pub spec: NodeSpec,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl NodeProc {
    /// The node's data dir (where `start` wrote its config and log).
    pub fn data_dir(&self) -> PathBuf {
        self.log.parent().map(Path::to_path_buf).unwrap_or_default()
    }

    /// `POST /v1/leave` as the operator does it: our Host and the admin secret.
    pub async fn leave(&self) -> Option<(String, String)> {
        let secret = std::fs::read_to_string(self.data_dir().join("admin.secret")).ok()?;
        let headers = format!(
            "Host: {}\r\nAuthorization: Bearer {}\r\n",
            self.spec.admin,
            secret.trim()
        );
        http_post(self.spec.admin, "/v1/leave", &headers).await
    }

    /// Writes the config into `data_dir` and starts the node.
    pub fn start(spec: NodeSpec, data_dir: &Path) -> Self {
        let cfg = data_dir.join("config.toml");
        std::fs::write(&cfg, spec.config(data_dir)).expect("write config");
        Self::spawn(
            spec,
            vec!["run".into(), "--config".into(), cfg.into_os_string()],
            &data_dir.join("node.log"),
        )
    }

    /// Runs `meshnode ARGS` (e.g. `run` with a config written elsewhere, or
    /// `join` that goes on as the agent), logging to `log`.
    pub fn spawn(spec: NodeSpec, args: Vec<std::ffi::OsString>, log: &Path) -> Self {
        let log = log.to_path_buf();
        let out = std::fs::File::create(&log).expect("log file");
        let mut cmd = match &spec.netns {
            // `ip netns exec` execs the command: the child's pid is meshnode's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(meshnode_bin());
                c
            }
            None => Command::new(meshnode_bin()),
        };
        // A spec may set MESHNODE_LOG itself; an empty value unsets it, so
        // the config's log_level decides.
        match spec.env.iter().find(|(k, _)| k == "MESHNODE_LOG") {
            Some((_, v)) if v.is_empty() => {
                cmd.env_remove("MESHNODE_LOG");
            }
            Some(_) => {}
            None => {
                cmd.env(
                    "MESHNODE_LOG",
                    std::env::var("TEST_NODE_LOG")
                        .unwrap_or_else(|_| "info,meshnode_transport=debug".into()),
                );
            }
        }
        let env = spec
            .env
            .iter()
            .filter(|(k, v)| !(k == "MESHNODE_LOG" && v.is_empty()));
        let child = cmd
            .args(&args)
            .envs(env.map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("spawn meshnode run");
        Self {
            spec,
            child: Some(child),
            log,
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{sig}"), &c.id().to_string()])
                .status();
        }
    }

    /// SIGSTOP, and waits until every thread has stopped. `kill` returns once
    /// the signal is queued; the other threads of a multi-threaded process run
    /// on until one of them takes the group stop, and on a busy machine they
    /// answered a request "after" the pause.
    pub fn pause(&self) {
        self.signal("STOP");
        let Some(c) = &self.child else { return };
        let tasks = PathBuf::from(format!("/proc/{}/task", c.id()));
        // In /proc/PID/task/TID/stat the state follows the parenthesised name.
        let thread_stopped = |stat: String| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['T', 't']))
        };
        let stopped = || {
            std::fs::read_dir(&tasks).is_ok_and(|dir| {
                dir.flatten().all(|t| {
                    std::fs::read_to_string(t.path().join("stat")).is_ok_and(thread_stopped)
                })
            })
        };
        let start = Instant::now();
        while !stopped() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{} did not stop within 5 s of SIGSTOP",
                self.spec.name
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the process to exit by itself; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.child = None;
                    return st.code();
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn get(&self, path: &str) -> Option<serde_json::Value> {
        let body = self.get_text(path).await?;
        serde_json::from_str(&body).ok()
    }

    /// The body of a GET on the admin API.
    pub async fn get_text(&self, path: &str) -> Option<String> {
        http_get_in(self.spec.netns.as_deref(), self.spec.admin, path).await
    }

    /// `(node, state)` pairs from `/v1/members`.
    pub async fn members(&self) -> Vec<(String, String)> {
        let v = self.get("/v1/members").await.unwrap_or_default();
        v.as_array()
            .into_iter()
            .flatten()
            .map(|m| (s(m, "node"), s(m, "state")))
            .collect()
    }

    /// `(node, health)` of one service's instances from `/v1/services`.
    pub async fn instances(&self, service: &str) -> Vec<(String, String)> {
        let v = self.get("/v1/services").await.unwrap_or_default();
        v.get(service)
            .and_then(|l| l.as_array())
            .into_iter()
            .flatten()
            .map(|i| (s(i, "node"), s(i, "health")))
            .collect()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- log of {} ---\n{}", self.spec.name, self.log_text());
        }
    }
}

fn s(v: &serde_json::Value, k: &str) -> String {
    v.get(k)
        .and_then(|x| x.as_str())
        .unwrap_or_default()
        .to_string()
}

/// A plain HTTP/1.1 GET; returns the body of any answer.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    http_get_in(None, addr, path).await
}

/// [`http_get`] from inside a network namespace.
pub async fn http_get_in(ns: Option<&str>, addr: SocketAddr, path: &str) -> Option<String> {
    let work = async {
        let mut s = netns::connect(ns, addr, Duration::from_secs(5))
            .await
            .ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .ok()
        .flatten()
}

/// Polls `cond` every 50 ms; returns the time it took, or None after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, mut cond: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// A TCP echo server that also carries half-close: on EOF it shuts down its write side.
pub async fn echo_server(ip: Ipv4Addr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind((ip, 0))
        .await
        .expect("bind echo");
    spawn_echo(l, Vec::new())
}

/// Serves echo on `l`: sends `greeting`, then echoes, carrying half-close.
fn spawn_echo(
    l: tokio::net::TcpListener,
    greeting: Vec<u8>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let addr = l.local_addr().expect("echo addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let greeting = greeting.clone();
            tokio::spawn(async move {
                if s.write_all(&greeting).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// An echo server on `ip` that first sends `"<name>:"` (see [`named_echo_once`]).
pub async fn named_echo(ip: Ipv4Addr, name: &str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind((ip, 0))
        .await
        .expect("bind echo");
    spawn_echo(l, format!("{name}:").into_bytes())
}

/// An echo server inside namespace `ns` on 127.0.0.1 that first sends `"<name>:"`,
/// so callers can tell which instance answered.
pub fn named_echo_in(ns: &str, name: &str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = netns::listen(ns, "127.0.0.1:0".parse().expect("addr")).expect("bind echo in netns");
    spawn_echo(l, format!("{name}:").into_bytes())
}

/// One connection through an upstream: sends `payload`, half-closes, and
/// returns `(answering instance name, echoed bytes)`.
pub async fn named_echo_once(
    ns: Option<&str>,
    upstream: SocketAddr,
    payload: &[u8],
    limit: Duration,
) -> Result<(String, Vec<u8>), String> {
    let work = async {
        let mut s = netns::connect(ns, upstream, limit)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        s.write_all(payload)
            .await
            .map_err(|e| format!("write: {e}"))?;
        s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let colon = buf
            .iter()
            .position(|b| *b == b':')
            .ok_or_else(|| format!("no greeting in {} bytes", buf.len()))?;
        let name = String::from_utf8_lossy(&buf[..colon]).into_owned();
        Ok((name, buf[colon + 1..].to_vec()))
    };
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// A TCP connection through an upstream to an echo service: `hello` there
/// and back, or a panic.
pub async fn echo_once(addr: SocketAddr) {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect upstream");
    s.write_all(b"hello").await.expect("write");
    s.shutdown().await.expect("half-close");
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.expect("read");
    assert_eq!(back, b"hello");
}

/// TOML for an echo service entry.
pub fn echo_service(name: &str, addr: SocketAddr) -> String {
    format!(
        "\n[[service]]\nname = \"{name}\"\naddress = \"{}\"\nport = {}\ncheck = {{ tcp = \"{addr}\", interval = \"200ms\", timeout = \"150ms\" }}\n",
        addr.ip(),
        addr.port()
    )
}

pub fn upstream(service: &str, listen: SocketAddr) -> String {
    format!("\n[[upstream]]\nservice = \"{service}\"\nlisten = \"{listen}\"\n")
}

/// A raw `POST` of a JSON body with our `Host`; returns the status line and the body.
pub async fn http_post_json(addr: SocketAddr, path: &str, body: &str) -> Option<(String, String)> {
    http_post_body(
        addr,
        path,
        &format!("Host: {addr}\r\nContent-Type: application/json\r\n"),
        body,
    )
    .await
}

/// A raw `POST` with extra header lines (each ending in `\r\n`); returns the
/// status line and the body.
pub async fn http_post(addr: SocketAddr, path: &str, headers: &str) -> Option<(String, String)> {
    http_post_body(addr, path, headers, "").await
}

async fn http_post_body(
    addr: SocketAddr,
    path: &str,
    headers: &str,
    body: &str,
) -> Option<(String, String)> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(
        format!(
            "POST {path} HTTP/1.1\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_string(), body.to_string()))
}
