//! In-process multi-node tests: whole nodes built with `app::build` on
//! port 0 inside the test's runtime (QUIC, gossip, admin, upstreams, the
//! HTTP data path, signed routes documents through the admin API), with
//! hyper as client and applications. They cover the many routing cases
//! cheaply; `tests/src/tests/http.rs` drives the same paths through real
//! processes with curl, wrk and h2load.
// Tests read the clock to bound their waits.
#![allow(clippy::disallowed_methods)]

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshnode_node::admin::{client, SECRET_FILE};
use meshnode_node::app::{self, Hooks};
use meshnode_node::config::Config;
use meshnode_transport::pki::policy::{DocHeader, SignedDocument, SigningKey};
use meshnode_transport::pki::{unix_now, Ca};
use meshnode_transport::Role;
use rand::RngExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const MESH: &str = "inproc";
const CLUSTER: &str = "east";

/// A CA, a temp dir and a loopback /24 of their own for one test's mesh.
struct Mesh {
    ca: Ca,
    dir: tempfile::TempDir,
    net: [u8; 2],
}

impl Mesh {
    fn new() -> Self {
        let mut r = rand::rng();
        Mesh {
            ca: Ca::generate(MESH, Duration::from_secs(24 * 3600)).expect("CA"),
            dir: tempfile::tempdir().expect("temp dir"),
            net: [r.random_range(1..=254), r.random_range(1..=254)],
        }
    }

    fn ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, self.net[0], self.net[1], host)
    }

    /// Builds and starts node `name` on `127.A.B.host` (QUIC, admin and
    /// upstreams on port 0; upstreams on `127.A.B.(host + 100)`, `@UP` in
    /// `extra`), seeded with `seeds`; `extra` is appended to its config.
    async fn node(&self, name: &str, host: u8, seeds: &[SocketAddr], extra: &str) -> Node {
        let data = self.dir.path().join(name);
        self.ca
            .issue(CLUSTER, name, Role::Node, Duration::from_secs(24 * 3600))
            .expect("issue")
            .save(&data, self.ca.cert_pem())
            .expect("save");
        let ip = self.ip(host);
        let seeds: Vec<String> = seeds.iter().map(|s| format!("\"{s}\"")).collect();
        let text = format!(
            "node = \"{name}\"\ncluster = \"{CLUSTER}\"\nmesh = \"{MESH}\"\ndata_dir = \"{}\"\nbind = \"{ip}:0\"\nadmin = \"{ip}:0\"\nseeds = [{}]\n{}",
            data.display(),
            seeds.join(", "),
            extra.replace("@UP", &self.ip(host + 100).to_string()),
        );
        let cfg = Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let bound = app::build(cfg, Hooks::default())
            .await
            .unwrap_or_else(|e| panic!("building {name}: {e}"));
        let (stop, stopped) = oneshot::channel::<()>();
        let node = Node {
            quic: bound.quic_addr,
            admin: bound.admin_addr,
            upstreams: bound.upstream_addrs.clone(),
            data,
            _stop: stop,
        };
        tokio::spawn(async move {
            let _ = bound
                .run(async {
                    let _ = stopped.await;
                })
                .await;
        });
        node
    }

    /// Signs `source` with the CA key as version `version` and hands it to
    /// `node`'s admin API; waits until the node holds it.
    async fn apply(&self, node: &Node, source: &str, version: u64) {
        let doc = meshnode_node::policy::schema::parse(source)
            .unwrap_or_else(|e| panic!("{e:?}\n{source}"));
        let header = DocHeader {
            mesh: MESH.into(),
            kind: doc.kind.clone(),
            name: doc.name.clone(),
            version,
            signed_at: unix_now(),
            deleted: false,
        };
        let signed =
            SignedDocument::sign(&SigningKey::Ca(&self.ca), header, source.into()).expect("sign");
        let body = serde_json::json!({ "document": signed.text() });
        let secret = std::fs::read_to_string(node.data.join(SECRET_FILE)).expect("secret");
        client::post_json_with(node.admin, "/v1/policy", &body, Some(secret.trim()))
            .await
            .expect("apply");
        let path = format!("/v1/policy/{}/{}", doc.kind, doc.name);
        wait(Duration::from_secs(5), || async {
            client::get(node.admin, &path)
                .await
                .ok()
                .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
                .and_then(|v| v.pointer("/summary/version").and_then(|v| v.as_u64()))
                == Some(version)
        })
        .await
        .unwrap_or_else(|| panic!("{} never held version {version}", node.admin));
        if doc.kind == "routes" {
            // The data path follows the store a moment later: explain
            // routes a request with the table the data path holds.
            let path = format!("/v1/explain?service={}&path=/", doc.name);
            wait(Duration::from_secs(5), || async {
                client::get(node.admin, &path)
                    .await
                    .is_ok_and(|b| !b.contains("no routes document"))
            })
            .await
            .unwrap_or_else(|| panic!("{} never applied routes", node.admin));
        }
        if doc.kind == "resilience" {
            // The data path follows the store a moment later: explain
            // shows the version it applies.
            let path = format!("/v1/explain?service={}", doc.name);
            wait(Duration::from_secs(5), || async {
                client::get(node.admin, &path)
                    .await
                    .ok()
                    .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
                    .and_then(|v| v.pointer("/resilience/version").and_then(|v| v.as_u64()))
                    == Some(version)
            })
            .await
            .unwrap_or_else(|| panic!("{} never applied version {version}", node.admin));
        }
    }
}

/// A running node; stops when dropped.
struct Node {
    quic: SocketAddr,
    admin: SocketAddr,
    upstreams: Vec<SocketAddr>,
    data: PathBuf,
    _stop: oneshot::Sender<()>,
}

async fn wait<F, Fut>(limit: Duration, mut cond: F) -> Option<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond().await {
            return Some(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// An HTTP/1.1 application named `name` that counts its requests and
/// answers with its name and what it saw.
struct App {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
    _task: tokio::task::JoinHandle<()>,
}

type AppFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send>,
>;

async fn app(ip: Ipv4Addr, name: &'static str) -> App {
    let listener = TcpListener::bind((ip, 0)).await.expect("bind app");
    let addr = listener.local_addr().expect("addr");
    let hits = Arc::new(AtomicU64::new(0));
    let counter = hits.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let counter = counter.clone();
            let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                counter.fetch_add(1, Ordering::Relaxed);
                // `upgrade: echo`: switch protocols, then echo every byte.
                if req.headers().get("upgrade").is_some_and(|v| v == "echo") {
                    let on = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        if let Ok(up) = on.await {
                            let mut io = TokioIo::new(up);
                            let mut buf = [0u8; 1024];
                            while let Ok(n) = io.read(&mut buf).await {
                                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    });
                    let resp = Response::builder()
                        .status(101)
                        .header("connection", "upgrade")
                        .header("upgrade", "echo")
                        .header("x-instance", name)
                        .body(Full::new(Bytes::new()))
                        .expect("response");
                    return Box::pin(std::future::ready(Ok::<_, Infallible>(resp))) as AppFuture;
                }
                let seen = |h: &str| {
                    req.headers()
                        .get(h)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_string()
                };
                let resp = Response::builder()
                    .header("x-instance", name)
                    .header("x-seen-routed", seen("x-routed"))
                    .header("x-seen-internal", seen("x-internal"))
                    .header(
                        "x-seen-path",
                        req.uri().path_and_query().map_or("-", |p| p.as_str()),
                    )
                    .body(Full::new(Bytes::from(name)))
                    .expect("response");
                // `/slow...`: the answer takes 300 ms; `/hang`: 2 s.
                let slow = match req.uri().path() {
                    "/hang" => Some(Duration::from_secs(2)),
                    p if p.starts_with("/slow") => Some(Duration::from_millis(300)),
                    _ => None,
                };
                // `/fail`: 503 always; `/flaky`: 503 for 3 of every 10
                // requests at an instance whose name ends in `-flaky`.
                let hit = counter.load(Ordering::Relaxed);
                // `/sick`: 503 always at an instance named `*-bad`, and
                // 400 ms at one named `*-slow`.
                let sick = req.uri().path() == "/sick";
                let slow = slow.or_else(|| {
                    (sick && name.ends_with("-slow")).then(|| Duration::from_millis(400))
                });
                let fail = (sick && name.ends_with("-bad"))
                    || req.uri().path() == "/fail"
                    || (req.uri().path() == "/flaky" && name.ends_with("-flaky") && hit % 10 < 3);
                let mut resp = resp;
                if fail {
                    *resp.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                }
                let body = req.into_body();
                Box::pin(async move {
                    if let Some(d) = slow {
                        tokio::time::sleep(d).await;
                    }
                    // What arrived of the request's body.
                    let got = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes().len())
                        .unwrap_or(0);
                    resp.headers_mut()
                        .insert("x-body-len", hyper::header::HeaderValue::from(got));
                    Ok::<_, Infallible>(resp)
                }) as AppFuture
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    App {
        addr,
        hits,
        _task: task,
    }
}

fn service(app: &App, version: &str) -> String {
    format!(
        "\n[[service]]\nname = \"api\"\naddress = \"{}\"\nport = {}\nprotocol = \"http\"\ntags = [\"version={version}\"]\ncheck = {{ tcp = \"{}\", interval = \"200ms\", timeout = \"150ms\" }}\n",
        app.addr.ip(),
        app.addr.port(),
        app.addr
    )
}

const UPSTREAM: &str =
    "\n[[upstream]]\nservice = \"api\"\nlisten = \"@UP:0\"\nprotocol = \"http\"\n";

/// Waits until `node` holds the `kind` document for api (documents spread
/// by gossip; a destination enforces rate limits and intentions).
async fn holds(node: &Node, kind: &str) {
    let path = format!("/v1/policy/{kind}/api");
    wait(Duration::from_secs(5), || async {
        client::get(node.admin, &path).await.is_ok()
    })
    .await
    .unwrap_or_else(|| panic!("{} never held {kind}/api", node.admin));
}

/// One caller (upstream to api) and one node per version of api.
struct Fleet {
    mesh: Mesh,
    caller: Node,
    apps: Vec<App>,
    _nodes: Vec<Node>,
}

async fn fleet(versions: &[(&'static str, &'static str)]) -> Fleet {
    let mesh = Mesh::new();
    let caller = mesh.node("caller", 1, &[], UPSTREAM).await;
    let mut apps = Vec::new();
    let mut nodes = Vec::new();
    for (i, (name, version)) in versions.iter().enumerate() {
        let host = 10 + i as u8;
        let a = app(mesh.ip(host), name).await;
        nodes.push(
            mesh.node(name, host, &[caller.quic], &service(&a, version))
                .await,
        );
        apps.push(a);
    }
    // Every instance passing in the caller's catalog.
    let want = versions.len();
    wait(Duration::from_secs(20), || async {
        let Ok(body) = client::get(caller.admin, "/v1/services").await else {
            return false;
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["api"]
            .as_array()
            .is_some_and(|list| list.iter().filter(|i| i["health"] == "passing").count() == want)
    })
    .await
    .expect("every api instance passing at the caller");
    Fleet {
        mesh,
        caller,
        apps,
        _nodes: nodes,
    }
}

/// A keep-alive HTTP/1.1 (or h2c) client connection to an upstream.
struct Client {
    send: Sender,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Client {
    async fn connect(addr: SocketAddr, h2: bool) -> Self {
        let io = TokioIo::new(TcpStream::connect(addr).await.expect("connect upstream"));
        let send = if h2 {
            let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .expect("h2 handshake");
            tokio::spawn(conn);
            Sender::H2(s)
        } else {
            let (s, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("handshake");
            tokio::spawn(conn);
            Sender::H1(s)
        };
        Client { send }
    }

    /// Sends one request and reads the answer.
    async fn call(&mut self, method: &str, uri: &str, headers: &[(&str, &str)]) -> Answer {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("http://api{uri}"));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Empty::<Bytes>::new()).expect("request");
        let resp = match &mut self.send {
            Sender::H1(s) => {
                s.ready().await.expect("ready");
                s.send_request(req).await
            }
            Sender::H2(s) => {
                s.ready().await.expect("ready");
                s.send_request(req).await
            }
        }
        .expect("response");
        let (parts, body) = resp.into_parts();
        let _ = body.collect().await;
        let h = |k: &str| {
            parts
                .headers
                .get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        };
        Answer {
            status: parts.status.as_u16(),
            instance: h("x-instance"),
            routed: h("x-seen-routed"),
            internal: h("x-seen-internal"),
            error: h("x-meshnode-error"),
            fault: h("x-meshnode-fault"),
            retry_after: h("retry-after"),
            limit: h("x-meshnode-limit"),
            path: h("x-seen-path"),
        }
    }
}

#[derive(Debug)]
struct Answer {
    status: u16,
    instance: String,
    routed: String,
    internal: String,
    error: String,
    fault: String,
    retry_after: String,
    limit: String,
    /// The request target the application got.
    path: String,
}

/// (method, URI, headers, the instance that must answer)
type Case = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
);

const RULES: &str = r#"
kind = "routes"
name = "api"
[[route]]
match = { headers = { "x-canary" = "1" } }
split = [{ subset = "version=v2", weight = 100 }]
[[route]]
match = { path_regex = "/users/[0-9]+", method = "DELETE" }
split = [{ subset = "version=v2", weight = 100 }]
request_headers = { add = { "x-routed" = "delete" }, remove = ["x-internal"] }
[[route]]
match = { path_prefix = "/search", query = { "debug" = { present = true } } }
split = [{ subset = "version=v2", weight = 100 }]
[[route]]
match = { path_exact = "/nowhere" }
split = [{ subset = "version=v9", weight = 100 }]
[[route]]
match = { path_prefix = "/" }
split = [{ subset = "version=v1", weight = 100 }]
mirror = { subset = "version=v3", percent = 100 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_by_header_path_method_and_query_reach_their_subset_over_http1_and_h2c() {
    let f = fleet(&[("a-v1", "v1"), ("b-v2", "v2"), ("c-v3", "v3")]).await;
    f.mesh.apply(&f.caller, RULES, 1).await;
    let up = f.caller.upstreams[0];
    for h2 in [false, true] {
        let mut c = Client::connect(up, h2).await;
        let cases: &[Case] = &[
            ("GET", "/", &[], "a-v1"),
            ("GET", "/", &[("x-canary", "1")], "b-v2"),
            ("GET", "/", &[("x-canary", "2")], "a-v1"),
            ("DELETE", "/users/42", &[], "b-v2"),
            // Anchored: the whole path must match; and the method too.
            ("DELETE", "/users/42/x", &[], "a-v1"),
            ("GET", "/users/42", &[], "a-v1"),
            ("GET", "/search?debug", &[], "b-v2"),
            ("GET", "/search?q=1&debug=yes", &[], "b-v2"),
            ("GET", "/search?q=1", &[], "a-v1"),
        ];
        for (method, uri, headers, want) in cases {
            let a = c.call(method, uri, headers).await;
            assert_eq!(
                (a.status, a.instance.as_str()),
                (200, *want),
                "{method} {uri} {headers:?} (h2: {h2}): {a:?}"
            );
        }
        // The DELETE rule's header changes reach the application.
        let a = c
            .call("DELETE", "/users/7", &[("x-internal", "secret")])
            .await;
        assert_eq!((a.routed.as_str(), a.internal.as_str()), ("delete", "-"));
        let a = c.call("GET", "/", &[("x-internal", "kept")]).await;
        assert_eq!((a.routed.as_str(), a.internal.as_str()), ("-", "kept"));
        // A subset with no instance: the mesh answers, and says why.
        let a = c.call("GET", "/nowhere", &[]).await;
        assert_eq!((a.status, a.error.as_str()), (503, "no_instance"), "{a:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_requests_reach_the_mirror_and_their_answers_are_dropped() {
    let f = fleet(&[("a-v1", "v1"), ("c-v3", "v3")]).await;
    f.mesh.apply(&f.caller, RULES, 1).await;
    let mut c = Client::connect(f.caller.upstreams[0], false).await;
    for _ in 0..50 {
        let a = c.call("GET", "/page", &[]).await;
        assert_eq!((a.status, a.instance.as_str()), (200, "a-v1"));
    }
    // Mirrors go out beside the request; their count catches up.
    let mirrored = wait(Duration::from_secs(5), || async {
        f.apps[1].hits.load(Ordering::Relaxed) >= 50
    })
    .await;
    assert!(
        mirrored.is_some(),
        "v3 saw {} of 50 copies",
        f.apps[1].hits.load(Ordering::Relaxed)
    );
    assert_eq!(f.apps[0].hits.load(Ordering::Relaxed), 50);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(f.apps[1].hits.load(Ordering::Relaxed), 50, "one copy each");
}

fn split(v2: u32) -> String {
    format!(
        "kind = \"routes\"\nname = \"api\"\n[[route]]\nmatch = {{ path_prefix = \"/\" }}\nsplit = [{{ subset = \"version=v1\", weight = {} }}, {{ subset = \"version=v2\", weight = {v2} }}]\n",
        100 - v2
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_hold_within_3_points_over_4000_requests_and_follow_each_version() {
    let f = fleet(&[("a-v1", "v1"), ("b-v2", "v2")]).await;
    let up = f.caller.upstreams[0];
    for (version, v2) in [(1, 20u32), (2, 75), (3, 0), (4, 100)] {
        f.mesh.apply(&f.caller, &split(v2), version).await;
        let before = f.apps[1].hits.load(Ordering::Relaxed);
        let before_all = before + f.apps[0].hits.load(Ordering::Relaxed);
        // 8 keep-alive clients, 500 requests each.
        let mut tasks = Vec::new();
        for _ in 0..8 {
            tasks.push(tokio::spawn(async move {
                let mut c = Client::connect(up, false).await;
                let mut failed = 0;
                for _ in 0..500 {
                    if c.call("GET", "/", &[]).await.status != 200 {
                        failed += 1;
                    }
                }
                failed
            }));
        }
        let mut failed = 0;
        for t in tasks {
            failed += t.await.expect("client");
        }
        let v2_hits = f.apps[1].hits.load(Ordering::Relaxed) - before;
        let all = f.apps[1].hits.load(Ordering::Relaxed) + f.apps[0].hits.load(Ordering::Relaxed)
            - before_all;
        assert_eq!((failed, all), (0, 4000));
        let share = 100.0 * v2_hits as f64 / all as f64;
        assert!(
            (share - v2 as f64).abs() <= 3.0,
            "v2 weight {v2}: {share:.1} % of {all}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_is_routed_then_spliced_both_ways_like_a_websocket() {
    let f = fleet(&[("a-v1", "v1"), ("b-v2", "v2")]).await;
    f.mesh.apply(&f.caller, RULES, 1).await;
    // The canary header routes the handshake, as any request.
    let mut tcp = TcpStream::connect(f.caller.upstreams[0])
        .await
        .expect("connect");
    tcp.write_all(
        b"GET /chat HTTP/1.1\r\nhost: api\r\nconnection: Upgrade\r\nupgrade: echo\r\nx-canary: 1\r\n\r\n",
    )
    .await
    .expect("handshake");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            tcp.read(&mut byte).await.expect("read head"),
            1,
            "closed: {head:?}"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("upgrade: echo") && head.contains("x-instance: b-v2"),
        "{head}"
    );
    // Both ways, several times, with pauses: the connection stays spliced.
    for i in 0..5 {
        let msg = format!("frame {i} through the mesh");
        tcp.write_all(msg.as_bytes()).await.expect("write");
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut back))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(back, msg.as_bytes());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(tcp);
    // Plain requests still work beside it, on reused streams.
    let mut c = Client::connect(f.caller.upstreams[0], false).await;
    let a = c.call("GET", "/", &[]).await;
    assert_eq!((a.status, a.instance.as_str()), (200, "a-v1"));
}

const RESILIENCE: &str = r#"
kind = "resilience"
name = "api"
timeout = "100ms"
fault = { abort = { status = 503, percent = 25 }, delay = { duration = "50ms", percent = 100 }, header = "x-chaos" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resilience_document_times_out_slow_requests_and_injects_faults() {
    let f = fleet(&[("a-v1", "v1")]).await;
    let mut c = Client::connect(f.caller.upstreams[0], false).await;
    // Before the document: a slow answer arrives.
    let a = c.call("GET", "/slow", &[]).await;
    assert_eq!((a.status, a.instance.as_str()), (200, "a-v1"));
    f.mesh.apply(&f.caller, RESILIENCE, 1).await;
    // explain shows the document as the node applies it.
    let explained: serde_json::Value = serde_json::from_str(
        &client::get(f.caller.admin, "/v1/explain?service=api")
            .await
            .expect("explain"),
    )
    .expect("JSON");
    let r = &explained["resilience"];
    assert_eq!(
        (&r["version"], &r["timeout"], &r["fault"]["header"]),
        (
            &serde_json::json!(1),
            &serde_json::json!("100ms"),
            &serde_json::json!("x-chaos")
        ),
        "{explained}"
    );

    // The timeout: 504 from the mesh at 100 ms (the application takes 300),
    // never early, and the median within 50 ms of it.
    let mut took = Vec::new();
    for _ in 0..5 {
        let mut c = Client::connect(f.caller.upstreams[0], false).await;
        let t = Instant::now();
        let a = c.call("GET", "/slow", &[]).await;
        took.push(t.elapsed());
        assert_eq!((a.status, a.error.as_str()), (504, "timeout"), "{a:?}");
    }
    took.sort();
    assert!(
        took[0] >= Duration::from_millis(100) && took[2] <= Duration::from_millis(150),
        "timed out after {took:?}"
    );
    // Fast requests are untouched, and faults need the header.
    let before = f.apps[0].hits.load(Ordering::Relaxed);
    for _ in 0..50 {
        let a = c.call("GET", "/", &[]).await;
        assert_eq!((a.status, a.fault.as_str()), (200, "-"));
    }
    assert_eq!(f.apps[0].hits.load(Ordering::Relaxed) - before, 50);

    // With the header: every request waits 50 ms, 25 % are aborted with 503
    // by the mesh without reaching the application.
    let before = f.apps[0].hits.load(Ordering::Relaxed);
    let up = f.caller.upstreams[0];
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(up, false).await;
            let (mut aborted, mut ok) = (0u64, 0u64);
            for _ in 0..200 {
                let a = c.call("GET", "/", &[("x-chaos", "1")]).await;
                match (a.status, a.fault.as_str()) {
                    (503, "abort") => aborted += 1,
                    (200, "-") => ok += 1,
                    other => panic!("unexpected {other:?}: {a:?}"),
                }
            }
            (aborted, ok)
        }));
    }
    let (mut aborted, mut ok) = (0, 0);
    for task in tasks {
        let (a, o) = task.await.expect("client");
        aborted += a;
        ok += o;
    }
    let took = t.elapsed();
    assert_eq!(aborted + ok, 2000);
    let share = 100.0 * aborted as f64 / 2000.0;
    assert!((share - 25.0).abs() <= 3.0, "aborted {share:.1} %");
    assert_eq!(f.apps[0].hits.load(Ordering::Relaxed) - before, ok);
    // 200 requests in a row per client, each delayed 50 ms: at least 10 s.
    assert!(
        took >= Duration::from_secs(10),
        "2,000 delayed requests took {took:?}"
    );
}

const RETRIES: &str = r#"
kind = "resilience"
name = "api"
retries = { attempts = 3, on = ["5xx"], budget = 0.2 }
"#;

/// `n` GETs of `path` from 10 keep-alive clients: (2xx, other).
async fn load(up: SocketAddr, path: &'static str, n: usize) -> (usize, usize) {
    let mut tasks = Vec::new();
    for _ in 0..10 {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(up, false).await;
            let mut ok = 0;
            for _ in 0..n / 10 {
                if c.call("GET", path, &[]).await.status == 200 {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.expect("client");
    }
    (ok, n - ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_hide_a_flaky_instance_and_stay_within_the_budget_when_all_fail() {
    let f = fleet(&[("a-v1", "v1"), ("b-v1", "v1"), ("c-flaky", "v1")]).await;
    let up = f.caller.upstreams[0];
    let hits = |f: &Fleet| -> u64 { f.apps.iter().map(|a| a.hits.load(Ordering::Relaxed)).sum() };
    // Without retries, the flaky instance's failures reach the client.
    let (_, failed) = load(up, "/flaky", 1000).await;
    assert!(failed > 20, "{failed} of 1,000 failed without retries");

    f.mesh.apply(&f.caller, RETRIES, 1).await;
    let before = hits(&f);
    let t = Instant::now();
    let (ok, failed) = load(up, "/flaky", 2000).await;
    assert!(
        ok as f64 >= 0.999 * 2000.0,
        "{ok} of 2,000 succeeded, {failed} failed"
    );

    // Then every instance fails: the extra attempts of both phases (one
    // budget window) stay within 20 % of their 3,000 requests plus the
    // floor (10 a second over the 10 s window: 100).
    let middle = hits(&f);
    let (ok, _) = load(up, "/fail", 1000).await;
    let took = t.elapsed();
    assert_eq!(ok, 0);
    assert!(
        took < Duration::from_secs(10),
        "{took:?}: the bound assumes one window"
    );
    let extra = hits(&f) - before - 3000;
    assert!(extra <= 600 + 100, "{extra} retries for 3,000 requests");
    // The failing phase used what the budget had left, not 2 per request.
    let failing = hits(&f) - middle - 1000;
    assert!(
        failing < 1000,
        "{failing} retries for 1,000 failing requests"
    );
    eprintln!(
        "retries: {} while 30 % of one instance failed, {failing} while all failed, {extra} of 700 allowed in the window",
        extra - failing
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_rate_limit_holds_its_rate_and_says_when_to_retry() {
    let f = fleet(&[("a-v1", "v1")]).await;
    f.mesh
        .apply(
            &f.caller,
            "kind = \"resilience\"\nname = \"api\"\nrate_limit = { rps = 50, burst = 10 }\n",
            1,
        )
        .await;
    // The destination's node holds the document too (it enforces it).
    holds(&f._nodes[0], "resilience").await;
    let up = f.caller.upstreams[0];
    let run = Duration::from_secs(3);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(up, false).await;
            let (mut ok, mut limited, mut retry_after) = (0u64, 0u64, true);
            while t.elapsed() < run {
                let a = c.call("GET", "/", &[]).await;
                match (a.status, a.error.as_str()) {
                    (200, _) => ok += 1,
                    (429, "rate_limited") => {
                        limited += 1;
                        retry_after &= a.retry_after == "1";
                    }
                    other => panic!("unexpected {other:?}: {a:?}"),
                }
            }
            (ok, limited, retry_after)
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for task in tasks {
        let (o, l, r) = task.await.expect("client");
        assert!(r, "a 429 without Retry-After: 1");
        ok += o;
        limited += l;
    }
    let elapsed = t.elapsed().as_secs_f64();
    let rate = (ok as f64 - 10.0) / elapsed;
    assert!(
        (rate - 50.0).abs() <= 2.5,
        "{ok} answered, {limited} limited in {elapsed:.2} s: {rate:.1}/s above the burst"
    );
    assert!(
        limited > ok,
        "the clients asked for far more than the limit"
    );
    assert_eq!(
        f.apps[0].hits.load(Ordering::Relaxed),
        ok,
        "a limited request never reaches the application"
    );
}

/// `n` requests for `path` at once, each on its own client connection:
/// their answers and how long each took.
async fn burst(up: SocketAddr, path: &'static str, n: usize) -> Vec<(Answer, Duration)> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(up, false).await;
            let t = Instant::now();
            let a = c.call("GET", path, &[]).await;
            (a, t.elapsed())
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("client"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_circuit_breaker_answers_503_at_once_at_its_limit_and_recovers_when_load_drops() {
    let f = fleet(&[("a-v1", "v1")]).await;
    let up = f.caller.upstreams[0];
    f.mesh
        .apply(
            &f.caller,
            "kind = \"resilience\"\nname = \"api\"\ncircuit_breaker = { max_requests = 4 }\n",
            1,
        )
        .await;
    // 4 slow requests (2 s each) fill the limit; 4 more find it full.
    let hits = f.apps[0].hits.load(Ordering::Relaxed);
    let slow = tokio::spawn(burst(up, "/hang", 4));
    wait(Duration::from_secs(5), || async {
        f.apps[0].hits.load(Ordering::Relaxed) - hits == 4
    })
    .await
    .expect("the 4 slow requests reach the instance");
    let turned = burst(up, "/", 4).await;
    let slow = slow.await.expect("slow");
    for (a, took) in &turned {
        assert_eq!(
            (a.status, a.error.as_str(), a.limit.as_str()),
            (503, "circuit_open", "max_requests"),
            "{a:?}"
        );
        assert!(*took < Duration::from_millis(100), "503 after {took:?}");
    }
    for (a, _) in slow {
        assert_eq!((a.status, a.instance.as_str()), (200, "a-v1"), "{a:?}");
    }
    assert_eq!(
        f.apps[0].hits.load(Ordering::Relaxed) - hits,
        4,
        "a turned-away request never reaches the instance"
    );
    // The load is gone: the breaker admits again at once.
    for (a, _) in burst(up, "/", 4).await {
        assert_eq!(a.status, 200, "{a:?}");
    }
    // max_connections: streams to the service, idle ones included.
    f.mesh
        .apply(
            &f.caller,
            "kind = \"resilience\"\nname = \"api\"\ncircuit_breaker = { max_connections = 2, max_pending = 3 }\n",
            2,
        )
        .await;
    // Streams opened before the document are not counted: let them close.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let answers = burst(up, "/hang", 3).await;
    let mut statuses: Vec<_> = answers
        .iter()
        .map(|(a, _)| (a.status, a.limit.clone()))
        .collect();
    statuses.sort();
    assert_eq!(
        statuses,
        [
            (200, "-".to_string()),
            (200, "-".to_string()),
            (503, "max_connections".to_string())
        ],
        "{answers:?}"
    );
    // The two streams are kept and serve request after request.
    for _ in 0..20 {
        let mut c = Client::connect(up, false).await;
        assert_eq!(c.call("GET", "/", &[]).await.status, 200);
    }
}

/// The caller's count of ejected instances in its own cluster (explain).
async fn ejected(f: &Fleet) -> u64 {
    let explained: serde_json::Value = serde_json::from_str(
        &client::get(f.caller.admin, "/v1/explain?service=api")
            .await
            .expect("explain"),
    )
    .expect("JSON");
    explained["clusters"][0]["ejected"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_5xx_eject_an_instance_and_never_more_than_half_of_them() {
    let f = fleet(&[("a-v1", "v1"), ("b-slow", "v1"), ("c-bad", "v1")]).await;
    let up = f.caller.upstreams[0];
    let mut c = Client::connect(up, false).await;
    // c-bad answers 503 to every /sick request: after 5 in a row it is
    // ejected, and every further request goes to the others. b-slow takes
    // 400 ms: the balancer's peak-EWMA keeps it out of the choice after
    // its first slow answer (and it cannot be ejected beside c-bad: one of
    // three is the bound), so a-v1 takes the rest.
    let (mut failed, mut slow, mut by) = (0, 0, std::collections::BTreeMap::new());
    for _ in 0..60 {
        let t = Instant::now();
        let a = c.call("GET", "/sick", &[]).await;
        if a.status != 200 {
            failed += 1;
        }
        if t.elapsed() >= Duration::from_millis(400) {
            slow += 1;
        }
        *by.entry(a.instance).or_insert(0) += 1;
    }
    assert_eq!(failed, 5, "503s before c-bad was ejected: {by:?}");
    assert!(
        slow <= 6,
        "{slow} slow answers before b-slow was ejected: {by:?}"
    );
    assert_eq!(ejected(&f).await, 1, "the half of 3 instances: one");
    // The last 20 all came from a-v1.
    let mut last = std::collections::BTreeMap::new();
    for _ in 0..20 {
        *last
            .entry(c.call("GET", "/sick", &[]).await.instance)
            .or_insert(0) += 1;
    }
    assert_eq!(last.get("a-v1"), Some(&20), "{last:?}");

    // Every instance fails: at most one of three is ejected by it, so the
    // cluster is never emptied by a failure they all share.
    for _ in 0..60 {
        c.call("GET", "/fail", &[]).await;
    }
    assert!(ejected(&f).await <= 1);
}

const L7: &str = r#"
kind = "intentions"
name = "api"
[[rule]]
source = "*"
action = "deny"
path_prefix = "/admin"
[[rule]]
source = "*"
action = "allow"
methods = ["GET", "HEAD"]
[[rule]]
source = "*"
action = "deny"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_l7_intention_refuses_a_denied_path_or_method_and_serves_the_rest() {
    let f = fleet(&[("a-v1", "v1")]).await;
    f.mesh.apply(&f.caller, L7, 1).await;
    holds(&f._nodes[0], "intentions").await;
    let hits = f.apps[0].hits.load(Ordering::Relaxed);
    // One keep-alive client: the requests share pooled tunnel streams, and
    // each is decided on its own, the first of a stream too.
    let mut c = Client::connect(f.caller.upstreams[0], false).await;
    let mut served = 0;
    for round in 0..3 {
        for (method, path, want) in [
            ("GET", "/orders", 200),
            ("GET", "/admin/users", 403),
            ("POST", "/orders", 403),
            ("HEAD", "/orders", 200),
            ("DELETE", "/admin", 403),
            // The ways around a path rule that an application which
            // normalizes paths would serve as /admin.
            ("GET", "//admin/users", 403),
            ("GET", "/%61dmin", 403),
            ("GET", "/x/../admin", 403),
            ("GET", "/./admin/", 403),
            ("GET", "/admin%2Fusers", 400),
        ] {
            let a = c.call(method, path, &[]).await;
            assert_eq!(a.status, want, "round {round}: {method} {path}: {a:?}");
            if want == 403 {
                assert_eq!(a.error, "denied", "{a:?}");
            } else if want == 400 {
                assert_eq!(a.error, "bad_path", "{a:?}");
            } else {
                served += 1;
            }
        }
        // A fresh client opens fresh streams: its first request is a
        // denied one.
        let mut fresh = Client::connect(f.caller.upstreams[0], false).await;
        assert_eq!(fresh.call("POST", "/x", &[]).await.status, 403);
        // What is allowed arrives in the form it was decided in.
        let a = c.call("GET", "/v1//orders/../%6Frders?q=%2F", &[]).await;
        assert_eq!(
            (a.status, a.path.as_str()),
            (200, "/v1/orders?q=%2F"),
            "{a:?}"
        );
        served += 1;
    }
    assert_eq!(
        f.apps[0].hits.load(Ordering::Relaxed) - hits,
        served,
        "a denied request never reaches the application"
    );
    // explain says the same for a request.
    let explained: serde_json::Value = serde_json::from_str(
        &client::get(
            f.caller.admin,
            "/v1/explain?service=api&method=POST&path=/orders",
        )
        .await
        .expect("explain"),
    )
    .expect("JSON");
    assert_eq!(
        (
            &explained["authorization"]["action"],
            &explained["authorization"]["index"]
        ),
        (&serde_json::json!("deny"), &serde_json::json!(2)),
        "{explained}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_source_rate_limit_gives_each_caller_its_own_rate() {
    let f = fleet(&[("a-v1", "v1")]).await;
    let other = f
        .mesh
        .node("caller-2", 30, &[f.caller.quic], UPSTREAM)
        .await;
    wait(Duration::from_secs(20), || async {
        client::get(other.admin, "/v1/services")
            .await
            .is_ok_and(|b| b.contains("passing"))
    })
    .await
    .expect("the second caller sees api");
    f.mesh
        .apply(
            &f.caller,
            "kind = \"resilience\"\nname = \"api\"\nrate_limit = { rps = 20, burst = 5, per_source = true }\n",
            1,
        )
        .await;
    holds(&f._nodes[0], "resilience").await;
    let run = Duration::from_secs(3);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for up in [f.caller.upstreams[0], other.upstreams[0]] {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(up, false).await;
            let (mut ok, mut limited) = (0u64, 0u64);
            while t.elapsed() < run {
                match c.call("GET", "/", &[]).await.status {
                    200 => ok += 1,
                    429 => limited += 1,
                    s => panic!("unexpected {s}"),
                }
            }
            (ok, limited)
        }));
    }
    let elapsed = run.as_secs_f64();
    for task in tasks {
        let (ok, limited) = task.await.expect("client");
        // Each caller its own 20/s after its own burst of 5.
        let rate = (ok as f64 - 5.0) / elapsed;
        assert!(
            (rate - 20.0).abs() <= 2.0 && limited > ok,
            "{ok} answered, {limited} limited: {rate:.1}/s"
        );
    }
}

/// A POST with `body` on its own connection, written by hand: (status,
/// the body length the instance saw).
async fn post(up: SocketAddr, path: &str, body: &[u8]) -> (u16, String) {
    let mut tcp = TcpStream::connect(up).await.expect("connect upstream");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: api\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.expect("write");
    tcp.write_all(body).await.expect("write body");
    let mut buf = Vec::new();
    tcp.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let len = text
        .lines()
        .find_map(|l| l.strip_prefix("x-body-len: "))
        .unwrap_or("-")
        .trim()
        .to_string();
    (status, len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_body_is_retried_whole_and_only_for_methods_the_document_allows() {
    // Both instances answer 503 to 3 of every 10 requests (never 5 in a
    // row: not ejected), so at most 3 tries in a row fail anywhere.
    let f = fleet(&[("b-flaky", "v1"), ("c-flaky", "v1")]).await;
    let up = f.caller.upstreams[0];
    let hits = |f: &Fleet| -> u64 { f.apps.iter().map(|a| a.hits.load(Ordering::Relaxed)).sum() };
    let failures = |n: usize, body: Vec<u8>| async move {
        let mut failed = Vec::new();
        for _ in 0..n {
            let (status, len) = post(up, "/flaky", &body).await;
            if (status, len.as_str()) != (200, body.len().to_string().as_str()) {
                failed.push((status, len));
            }
        }
        failed
    };
    // POST is not idempotent: without `methods`, a 503 goes back.
    f.mesh
        .apply(
            &f.caller,
            "kind = \"resilience\"\nname = \"api\"\nretries = { attempts = 5, on = [\"5xx\"] }\n",
            1,
        )
        .await;
    let failed = failures(40, b"hello".to_vec()).await;
    assert!(!failed.is_empty(), "the 503s reach the client");
    f.mesh
        .apply(
            &f.caller,
            "kind = \"resilience\"\nname = \"api\"\nretries = { attempts = 5, on = [\"5xx\"], methods = [\"POST\"] }\n",
            2,
        )
        .await;
    let before = hits(&f);
    let failed = failures(40, vec![b'x'; 10_000]).await;
    assert_eq!(failed, [], "every retry carried the whole held body");
    let tries = hits(&f) - before;
    assert!(
        tries > 40,
        "{tries} tries for 40 requests: some were retries"
    );
    // Over the 64 KiB cap a body is streamed, not held, so never sent twice.
    let before = hits(&f);
    let failed = failures(40, vec![b'x'; 100_000]).await;
    assert!(!failed.is_empty(), "a streamed body is not retried");
    assert!(failed.iter().all(|(s, _)| *s == 503), "{failed:?}");
    assert_eq!(hits(&f) - before, 40, "one try per request");
}

/// A body that sends one chunk, then nothing, never ending.
struct Stalled(bool);

impl hyper::body::Body for Stalled {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        if self.0 {
            return std::task::Poll::Pending;
        }
        self.0 = true;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(
            b"first",
        )))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_timeout_cuts_a_response_body_that_stalls() {
    let mesh = Mesh::new();
    let caller = mesh.node("caller", 1, &[], UPSTREAM).await;
    // An application whose every answer stalls after its first chunk.
    let listener = TcpListener::bind((mesh.ip(10), 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                Ok::<_, Infallible>(Response::new(Stalled(false)))
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    let stall = App {
        addr,
        hits: Arc::new(AtomicU64::new(0)),
        _task: task,
    };
    let _node = mesh
        .node("s-1", 10, &[caller.quic], &service(&stall, "v1"))
        .await;
    wait(Duration::from_secs(20), || async {
        client::get(caller.admin, "/v1/services")
            .await
            .is_ok_and(|b| b.contains("passing"))
    })
    .await
    .expect("the instance passes");
    mesh.apply(
        &caller,
        "kind = \"resilience\"\nname = \"api\"\nidle_timeout = \"300ms\"\n",
        1,
    )
    .await;
    // The head and the first chunk arrive; then the body is cut 300 ms
    // after the last data, with an error (not a clean end).
    for _ in 0..3 {
        let io = TokioIo::new(
            TcpStream::connect(caller.upstreams[0])
                .await
                .expect("connect"),
        );
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let req = Request::builder()
            .uri("http://api/")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = send.send_request(req).await.expect("head");
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().ok().as_deref(), Some(&b"first"[..]));
        let t = Instant::now();
        let end = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("cut well before 5 s");
        let took = t.elapsed();
        assert!(
            !matches!(end, Some(Ok(_))),
            "no more data, and no clean end: {end:?}"
        );
        assert!(
            took >= Duration::from_millis(250) && took <= Duration::from_millis(800),
            "cut after {took:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_delay_hits_its_percentage_within_3_points_over_2000_requests() {
    let f = fleet(&[("a-v1", "v1")]).await;
    f.mesh
        .apply(
            &f.caller,
            "kind = \"resilience\"\nname = \"api\"\nfault = { delay = { duration = \"100ms\", percent = 30 } }\n",
            1,
        )
        .await;
    let up = f.caller.upstreams[0];
    let mut tasks = Vec::new();
    for _ in 0..20 {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(up, false).await;
            let mut delayed = 0u64;
            for _ in 0..100 {
                let t = Instant::now();
                let a = c.call("GET", "/", &[]).await;
                assert_eq!(a.status, 200, "{a:?}");
                // A delayed request waits at least the 100 ms; the others
                // take a millisecond or two.
                if t.elapsed() >= Duration::from_millis(100) {
                    delayed += 1;
                }
            }
            delayed
        }));
    }
    let mut delayed = 0;
    for t in tasks {
        delayed += t.await.expect("client");
    }
    let share = 100.0 * delayed as f64 / 2000.0;
    assert!((share - 30.0).abs() <= 3.0, "delayed {share:.1} %");
    eprintln!("measure: {share:.1} % of 2,000 requests delayed at percent = 30");
}

const PER_ROUTE: &str = r#"
kind = "routes"
name = "api"
[[route]]
match = { path_prefix = "/slow" }
split = [{ subset = "version=v1", weight = 100 }]
timeout = "100ms"
[[route]]
match = { path_prefix = "/f", method = "GET" }
split = [{ subset = "version=v1", weight = 100 }]
retries = { attempts = 3, on = ["5xx"] }
[[route]]
match = { path_prefix = "/" }
split = [{ subset = "version=v1", weight = 100 }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_sets_its_own_timeout_and_retries_over_the_service_document() {
    let f = fleet(&[("a-v1", "v1"), ("b-v1", "v1"), ("c-flaky", "v1")]).await;
    let up = f.caller.upstreams[0];
    // The service's document: a long timeout, no retries.
    f.mesh
        .apply(
            &f.caller,
            "kind = \"resilience\"\nname = \"api\"\ntimeout = \"5s\"\n",
            1,
        )
        .await;
    f.mesh.apply(&f.caller, PER_ROUTE, 1).await;
    // /slow takes 300 ms: its route's 100 ms timeout applies, not the 5 s.
    let mut c = Client::connect(up, false).await;
    let t = Instant::now();
    let a = c.call("GET", "/slow", &[]).await;
    let took = t.elapsed();
    assert_eq!((a.status, a.error.as_str()), (504, "timeout"), "{a:?}");
    // Far below the document's 5 s (the route's 100 ms applies).
    assert!(took < Duration::from_secs(1), "timed out after {took:?}");
    // /fail answers 503 everywhere. HEAD takes the catch-all route, which
    // has no retries (nor has the document): one try per request. GET
    // takes the retrying route: three tries per request.
    let hits = |f: &Fleet| -> u64 { f.apps.iter().map(|a| a.hits.load(Ordering::Relaxed)).sum() };
    let before = hits(&f);
    for _ in 0..20 {
        assert_eq!(c.call("HEAD", "/fail", &[]).await.status, 503);
    }
    assert_eq!(hits(&f) - before, 20, "HEAD: one try each");
    let before = hits(&f);
    for _ in 0..20 {
        assert_eq!(c.call("GET", "/fail", &[]).await.status, 503);
    }
    // Three attempts each, unless one found no instance to try (an
    // ejected one is tried last): more than one each in any case.
    let tries = hits(&f) - before;
    assert!(
        (41..=60).contains(&tries),
        "GET: {tries} tries for 20 requests"
    );
    // GET /flaky is retried by its own route.
    let (ok, failed) = load(up, "/flaky", 1000).await;
    assert!(ok >= 999, "{ok} of 1,000 GETs succeeded, {failed} failed");
}
