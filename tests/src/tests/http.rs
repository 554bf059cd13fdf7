//! HTTP services through the real binary, with real clients: per-request
//! weighted splits measured with h2load over 10,000 requests, a routes
//! document changed under load with no failed request, rules by path,
//! header and method checked with curl, trace context, and a streaming
//! HTTP/2 exchange with trailers (gRPC-style) to an h2c application.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::federation::{self, Mesh};
use super::policy::{held, ok, operator, policy, policy_in, write};
use crate::{free_tcp, netns, subnet, upstream, wait_until, NodeProc, NodeSpec, Pki, CLUSTER};

type TestBody = UnsyncBoxBody<Bytes, Infallible>;

/// A body fed frame by frame from a channel: streams, and ends with trailers.
struct ChannelBody {
    rx: mpsc::Receiver<Frame<Bytes>>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|f| f.map(Ok))
    }
}

/// A test application: HTTP/1.1, or h2c when `h2`.
pub(crate) struct App {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    _task: tokio::task::JoinHandle<()>,
}

/// Answers every request with its `name` and, in `x-seen-*` headers, what
/// it received; a POST is echoed frame by frame as it arrives, then ends
/// with trailers (`grpc-status: 0`, `x-echoed: <bytes>`).
pub(crate) async fn http_app(ip: Ipv4Addr, name: &'static str, h2: bool) -> App {
    let listener = TcpListener::bind((ip, 0)).await.expect("bind app");
    http_app_on(listener, name, h2, Duration::ZERO)
}

/// [`http_app`] on a listener made elsewhere (in a network namespace),
/// answering each request after `delay`.
pub(crate) fn http_app_on(
    listener: TcpListener,
    name: &'static str,
    h2: bool,
    delay: Duration,
) -> App {
    let addr = listener.local_addr().expect("addr");
    let hits = Arc::new(AtomicU64::new(0));
    let counter = hits.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let counter = counter.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                counter.fetch_add(1, Ordering::Relaxed);
                async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, Infallible>(answer(name, req))
                }
            });
            tokio::spawn(async move {
                let io = TokioIo::new(tcp);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    });
    App {
        addr,
        hits,
        _task: task,
    }
}

fn answer(name: &'static str, req: Request<Incoming>) -> Response<TestBody> {
    let seen = |h: &str| {
        req.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string()
    };
    let builder = Response::builder()
        .header("x-instance", name)
        .header("x-seen-traceparent", seen("traceparent"))
        .header("x-seen-routed", seen("x-routed"))
        .header("x-seen-internal", seen("x-internal"));
    if req.method() != hyper::Method::POST {
        return builder
            .body(Full::new(Bytes::from(name)).boxed_unsync())
            .expect("response");
    }
    let (tx, rx) = mpsc::channel(8);
    let mut body = req.into_body();
    tokio::spawn(async move {
        let mut n = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(d) = frame.into_data() {
                n += d.len();
                if tx.send(Frame::data(d)).await.is_err() {
                    return;
                }
            }
        }
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        t.insert("x-echoed", HeaderValue::from(n as u64));
        let _ = tx.send(Frame::trailers(t)).await;
    });
    builder
        .header("content-type", "application/grpc")
        // Declared as HTTP/1.1 requires; gRPC's own are declared by the mesh.
        .header("trailer", "x-echoed")
        .body(ChannelBody { rx }.boxed_unsync())
        .expect("response")
}

pub(crate) fn http_service(name: &str, app: SocketAddr, protocol: &str, tags: &[&str]) -> String {
    let tags: Vec<String> = tags.iter().map(|t| format!("\"{t}\"")).collect();
    format!(
        "\n[[service]]\nname = \"{name}\"\naddress = \"{}\"\nport = {}\nprotocol = \"{protocol}\"\ntags = [{}]\ncheck = {{ tcp = \"{app}\", interval = \"200ms\", timeout = \"150ms\" }}\n",
        app.ip(),
        app.port(),
        tags.join(", ")
    )
}

/// `h2load` (HTTP/2, prior knowledge) against `url`: (succeeded, failed, 2xx).
fn h2load(url: &str, requests: u32, clients: u32) -> (u64, u64, u64) {
    let out = Command::new("h2load")
        .args([
            "-n",
            &requests.to_string(),
            "-c",
            &clients.to_string(),
            "-m",
            "1",
            url,
        ])
        .output()
        .expect("h2load runs (Debian package nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |line: &str, after: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(line))
            .and_then(|l| {
                l.split(',')
                    .find(|p| p.trim().ends_with(after))
                    .and_then(|p| p.trim().split(' ').next()?.parse().ok())
            })
            .unwrap_or_else(|| panic!("no {after:?} in h2load output:\n{text}"))
    };
    (
        field("requests:", "succeeded"),
        field("requests:", "failed"),
        field("status codes:", "2xx"),
    )
}

/// curl: the response headers, lower-cased names, and the body.
fn curl(args: &[&str]) -> (Vec<(String, String)>, String) {
    curl_in(None, args)
}

/// [`curl`], inside a network namespace when `ns` is set.
fn curl_in(ns: Option<&str>, args: &[&str]) -> (Vec<(String, String)>, String) {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "curl"]);
            c
        }
        None => Command::new("curl"),
    };
    let out = cmd
        .args(["-sS", "--max-time", "10", "-D", "-"])
        .args(args)
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (headers, body.to_string())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

/// The share of requests the v2 app got between two readings of the hit counters.
fn share(v1: &App, v2: &App, before: (u64, u64)) -> f64 {
    let a = v1.hits.load(Ordering::Relaxed) - before.0;
    let b = v2.hits.load(Ordering::Relaxed) - before.1;
    b as f64 / (a + b) as f64 * 100.0
}

fn hits(v1: &App, v2: &App) -> (u64, u64) {
    (
        v1.hits.load(Ordering::Relaxed),
        v2.hits.load(Ordering::Relaxed),
    )
}

fn routes(v2_weight: u32) -> String {
    format!(
        r#"kind = "routes"
name = "api"
[[route]]
match = {{ headers = {{ "x-canary" = "1" }} }}
split = [{{ subset = "version=v2", weight = 100 }}]
[[route]]
match = {{ path_prefix = "/v2only", method = "GET" }}
split = [{{ subset = "version=v2", weight = 100 }}]
request_headers = {{ add = {{ "x-routed" = "canary" }}, remove = ["x-internal"] }}
[[route]]
match = {{ path_prefix = "/" }}
split = [{{ subset = "version=v1", weight = {} }}, {{ subset = "version=v2", weight = {v2_weight} }}]
"#,
        100 - v2_weight
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_are_split_and_routed_per_request_and_a_new_document_drops_none() {
    let net = subnet();
    let pki = Pki::new();
    let op = operator(&pki, "alice");
    let ip = |h: u8| Ipv4Addr::new(127, net[0], net[1], h);
    let v1 = http_app(ip(1), "v1", false).await;
    let v2 = http_app(ip(2), "v2", true).await;

    let mut s1 = NodeSpec::new(net, 1, "api-v1");
    s1.extra = http_service("api", v1.addr, "http", &["version=v1"]);
    let n1 = NodeProc::start(s1.clone(), &pki.issue(CLUSTER, "api-v1"));
    let mut s2 = NodeSpec::new(net, 2, "api-v2");
    s2.seeds = vec![s1.quic];
    s2.extra = http_service("api", v2.addr, "http2", &["version=v2"]);
    let _n2 = NodeProc::start(s2, &pki.issue(CLUSTER, "api-v2"));
    let mut s3 = NodeSpec::new(net, 3, "web-1");
    s3.seeds = vec![s1.quic];
    let up = free_tcp(s3.ip);
    s3.extra = upstream("api", up);
    let web = NodeProc::start(s3, &pki.issue(CLUSTER, "web-1"));
    wait_until(Duration::from_secs(20), || async {
        let i = web.instances("api").await;
        i.len() == 2 && i.iter().all(|(_, h)| h == "passing")
    })
    .await
    .expect("web sees both instances of api passing");
    let url = format!("http://{up}/");

    // Without a routes document every request may go to either instance,
    // over HTTP/1.1 (curl) and HTTP/2 (curl, h2load) alike.
    let (h, body) = curl(&[&url]);
    assert!(body == "v1" || body == "v2", "{h:?} {body}");
    let (_, body) = curl(&["--http2-prior-knowledge", &url]);
    assert!(body == "v1" || body == "v2", "{body}");

    // 90/10.
    let doc = write(pki.dir.path(), "routes-10.toml", &routes(10));
    ok(&policy(
        &op,
        s1.admin,
        &["apply", doc.to_str().expect("path")],
    ));
    wait_until(Duration::from_secs(10), || async {
        held(&web, "routes", "api").await.is_some()
    })
    .await
    .expect("web holds the routes document");
    let before = hits(&v1, &v2);
    let (succeeded, failed, ok2xx) = h2load(&url, 10_000, 16);
    assert_eq!((succeeded, failed, ok2xx), (10_000, 0, 10_000));
    let pct = share(&v1, &v2, before);
    assert!((7.0..=13.0).contains(&pct), "v2 got {pct:.2} % at 90/10");
    println!("90/10: v2 got {pct:.2} % of 10,000 requests");

    // explain shows the rule, the subsets and weights, and the instance.
    let admin = web.spec.admin.to_string();
    let text = ok(&crate::meshnode(&[
        "explain",
        "api",
        "--path",
        "/v2only/a?b=c",
        "--admin",
        &admin,
    ]));
    assert!(
        text.contains("HTTP request GET /v2only/a?b=c: rule 2 of routes/api matches"),
        "{text}"
    );
    assert!(
        text.contains(
            "subset version=v2 weight 100%: a request now goes to api-v2 of cluster east"
        ),
        "{text}"
    );
    let text = ok(&crate::meshnode(&[
        "explain",
        "api",
        "--path",
        "/x",
        "--method",
        "post",
        "--header",
        "x-canary=0",
        "--admin",
        &admin,
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let r = &v["request"];
    assert_eq!(
        (r["method"].as_str(), r["rule"].as_u64()),
        (Some("POST"), Some(2)),
        "{r}"
    );
    assert_eq!(r["subsets"][0]["subset"], "version=v1");
    assert_eq!(r["subsets"][0]["weight"], 90);
    assert_eq!(r["subsets"][0]["attempts"][0]["node"], "api-v1");
    assert_eq!(r["subsets"][1]["attempts"][0]["node"], "api-v2");
    let text = ok(&crate::meshnode(&[
        "explain",
        "api",
        "--header",
        "x-canary=1",
        "--admin",
        &admin,
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["request"]["rule"], 0);

    // Rules by header, path and method; header changes; trace context.
    let (h, body) = curl(&["-H", "x-canary: 1", &format!("http://{up}/anything")]);
    assert_eq!(body, "v2", "{h:?}");
    let tp = header(&h, "x-seen-traceparent").to_string();
    assert!(
        tp.len() == 55 && tp.starts_with("00-"),
        "a trace was started: {tp:?}"
    );
    for _ in 0..20 {
        let (h, body) = curl(&[
            "--http2-prior-knowledge",
            "-H",
            "x-internal: secret",
            &format!("http://{up}/v2only/a?b=c"),
        ]);
        assert_eq!(body, "v2");
        assert_eq!(header(&h, "x-seen-routed"), "canary");
        assert_eq!(header(&h, "x-seen-internal"), "-", "removed by the route");
    }
    // A DELETE to /v2only does not match the GET rule: it falls to the 90/10 rule,
    // where it is not routed as canary.
    let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (h, _) = curl(&[
        "-H",
        &format!("traceparent: {given}"),
        &format!("http://{up}/v2only/a"),
        "-X",
        "DELETE",
    ]);
    assert_eq!(header(&h, "x-seen-routed"), "-");
    assert_eq!(header(&h, "x-seen-traceparent"), given, "kept as it came");

    // A new document under load: 50/50, applied while h2load runs.
    let doc = write(pki.dir.path(), "routes-50.toml", &routes(50));
    let load_url = url.clone();
    let load = tokio::task::spawn_blocking(move || h2load(&load_url, 20_000, 16));
    tokio::time::sleep(Duration::from_millis(500)).await;
    ok(&policy(
        &op,
        s1.admin,
        &["apply", doc.to_str().expect("path")],
    ));
    let (succeeded, failed, ok2xx) = load.await.expect("h2load");
    assert_eq!(
        (succeeded, failed, ok2xx),
        (20_000, 0, 20_000),
        "no request failed while the document changed"
    );
    wait_until(Duration::from_secs(10), || async {
        held(&web, "routes", "api").await.map(|h| h.0) == Some(2)
    })
    .await
    .expect("web holds version 2");
    let before = hits(&v1, &v2);
    let (succeeded, _, _) = h2load(&url, 10_000, 16);
    assert_eq!(succeeded, 10_000);
    let pct = share(&v1, &v2, before);
    assert!((47.0..=53.0).contains(&pct), "v2 got {pct:.2} % at 50/50");
    println!("50/50: v2 got {pct:.2} % of 10,000 requests");

    // Streaming both ways with trailers (gRPC-style), HTTP/2 from the
    // client, HTTP/1.1 chunked between the nodes, h2c to the v2 app.
    let tcp = tokio::net::TcpStream::connect(up).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, ChannelBody>(TokioIo::new(tcp))
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    let (tx, rx) = mpsc::channel(8);
    let req = Request::post(format!("http://{up}/echo.Echo/Stream"))
        .header("x-canary", "1")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(ChannelBody { rx })
        .expect("request");
    tx.send(Frame::data(Bytes::from_static(b"one")))
        .await
        .expect("send");
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("response in time")
        .expect("response");
    assert_eq!(resp.headers()["x-instance"], "v2");
    let mut body = resp.into_body();
    async fn next(b: &mut Incoming) -> Frame<Bytes> {
        tokio::time::timeout(Duration::from_secs(10), b.frame())
            .await
            .expect("frame in time")
            .expect("a frame")
            .expect("frame ok")
    }
    // The echo of "one" arrives while the request is still open: nothing
    // on the way buffers a whole body.
    let f = next(&mut body).await;
    assert_eq!(f.into_data().expect("data"), Bytes::from_static(b"one"));
    tx.send(Frame::data(Bytes::from_static(b"two!")))
        .await
        .expect("send");
    let f = next(&mut body).await;
    assert_eq!(f.into_data().expect("data"), Bytes::from_static(b"two!"));
    drop(tx);
    let f = next(&mut body).await;
    let trailers = f.into_trailers().expect("trailers after the data");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-echoed"], "7");

    // Requests reuse tunnel streams (HTTP/1.1 keep-alive on them).
    let m = web.get_text("/metrics").await.unwrap_or_default();
    let streams = |kind: &str| -> f64 {
        m.lines()
            .filter(|l| {
                l.starts_with("meshnode_http_streams_total")
                    && l.contains(&format!("stream=\"{kind}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let (opened, reused) = (streams("opened"), streams("reused"));
    println!("tunnel streams: {opened} opened, {reused} reused");
    assert!(
        reused > 30_000.0 && opened < 2_000.0,
        "{opened} opened, {reused} reused"
    );

    // A reused stream is authorized again on every request: default deny,
    // applied while requests keep the pooled streams busy, turns them into
    // 403 from the destination.
    let deny = write(
        pki.dir.path(),
        "deny.toml",
        "kind = \"defaults\"\nname = \"mesh\"\ndefault_intention = \"deny\"\n",
    );
    ok(&policy(
        &op,
        s1.admin,
        &["apply", deny.to_str().expect("path")],
    ));
    let denied = wait_until(Duration::from_secs(10), || async {
        let (h, _) = curl(&[&format!("http://{up}/")]);
        header(&h, "x-meshnode-error") == "denied"
    })
    .await;
    assert!(
        denied.is_some(),
        "default deny never reached a reused stream"
    );

    // Metrics: requests by subset and status class.
    let m = n1.get_text("/metrics").await.unwrap_or_default();
    assert!(m.contains("meshnode_http_requests_total"), "{m}");
    let m = web.get_text("/metrics").await.unwrap_or_default();
    assert!(
        m.lines()
            .any(|l| l.starts_with("meshnode_http_requests_total")
                && l.contains("direction=\"out\"")
                && l.contains("subset=\"version=v2\"")
                && l.contains("result=\"2xx\"")),
        "{m}"
    );
}

/// Across two clusters in namespaces: a1 calls `api`, whose v1 instance is
/// on b1 (HTTP/1.1) and v2 on b2 (h2c), through both gateways with
/// end-to-end sessions. The caller's route picks the subset; the
/// destination gateway picks an instance of it from the outer header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_cluster_request_is_routed_by_the_same_rules() {
    if !netns::available("a_cross_cluster_request_is_routed_by_the_same_rules") {
        return;
    }
    let topo = federation::topology(&["bgw"]);
    let l1 = netns::listen(&topo.host("b1").ns, "127.0.0.1:0".parse().expect("addr"))
        .expect("listen in b1");
    let l2 = netns::listen(&topo.host("b2").ns, "127.0.0.1:0".parse().expect("addr"))
        .expect("listen in b2");
    let v1 = http_app_on(l1, "v1", false, Duration::ZERO);
    let v2 = http_app_on(l2, "v2", true, Duration::ZERO);
    let (addr1, addr2) = (v1.addr, v2.addr);
    let mesh = Mesh::start_with(topo, &[], move |spec| match spec.name.as_str() {
        "b1" => spec.extra.push_str(&http_service("api", addr1, "http", &["version=v1"])),
        "b2" => spec.extra.push_str(&http_service("api", addr2, "http2", &["version=v2"])),
        "a1" => spec
            .extra
            .push_str("\n[[upstream]]\nservice = \"api\"\nlisten = \"127.0.0.1:15080\"\nprotocol = \"http\"\n"),
        _ => {}
    })
    .await;
    let ns = mesh.topo.host("a1").ns.clone();
    let a1_node = mesh.node("a1");
    wait_until(Duration::from_secs(30), || async {
        a1_node
            .get("/v1/services")
            .await
            .and_then(|v| {
                v.get("api")?
                    .as_array()?
                    .iter()
                    .find(|e| e["remote"] == true && e["cluster"] == "b")
                    .map(|e| e["healthy"] == 2)
            })
            .unwrap_or(false)
    })
    .await
    .expect("a1 sees api in cluster b with 2 healthy instances");
    let url = "http://127.0.0.1:15080/orders";
    let op = operator(&mesh.pki, "alice");
    let doc = write(
        mesh.pki.dir.path(),
        "routes.toml",
        r#"kind = "routes"
name = "api"
[[route]]
match = { headers = { "x-canary" = { present = true } } }
split = [{ subset = "version=v2", weight = 100 }]
[[route]]
split = [{ subset = "version=v1", weight = 100 }]
"#,
    );
    ok(&policy_in(
        &mesh,
        "a2",
        &op,
        &["apply", doc.to_str().expect("path")],
    ));
    wait_until(Duration::from_secs(15), || async {
        held(a1_node, "routes", "api").await.is_some()
    })
    .await
    .expect("a1 holds the routes document");
    for _ in 0..10 {
        let (h, body) = curl_in(Some(&ns), &[url]);
        assert_eq!(body, "v1", "{h:?}");
        let (h, body) = curl_in(
            Some(&ns),
            &["--http2-prior-knowledge", "-H", "x-canary: yes", url],
        );
        assert_eq!(body, "v2", "{h:?}");
        let tp = header(&h, "x-seen-traceparent");
        assert_eq!(tp.len(), 55, "trace context crossed both gateways: {tp:?}");
    }
    assert_eq!(
        (
            v1.hits.load(Ordering::Relaxed),
            v2.hits.load(Ordering::Relaxed)
        ),
        (10, 10)
    );
}

/// Per-request balancing by latency: of two instances, one answering in
/// 20 ms, the fast one takes most requests (power of two choices over
/// peak-EWMA latency times requests in flight; by open streams alone the
/// two would share them nearly evenly at this concurrency).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_mostly_to_the_faster_instance() {
    let net = subnet();
    let pki = Pki::new();
    let ip = |h: u8| Ipv4Addr::new(127, net[0], net[1], h);
    let fast = http_app_on(
        TcpListener::bind((ip(1), 0)).await.expect("bind"),
        "fast",
        false,
        Duration::ZERO,
    );
    let slow = http_app_on(
        TcpListener::bind((ip(2), 0)).await.expect("bind"),
        "slow",
        false,
        Duration::from_millis(20),
    );
    let mut s1 = NodeSpec::new(net, 1, "api-fast");
    s1.extra = http_service("api", fast.addr, "http", &[]);
    let _n1 = NodeProc::start(s1.clone(), &pki.issue(CLUSTER, "api-fast"));
    let mut s2 = NodeSpec::new(net, 2, "api-slow");
    s2.seeds = vec![s1.quic];
    s2.extra = http_service("api", slow.addr, "http", &[]);
    let _n2 = NodeProc::start(s2, &pki.issue(CLUSTER, "api-slow"));
    let mut s3 = NodeSpec::new(net, 3, "web-1");
    s3.seeds = vec![s1.quic];
    let up = free_tcp(s3.ip);
    s3.extra = upstream("api", up);
    let web = NodeProc::start(s3, &pki.issue(CLUSTER, "web-1"));
    wait_until(Duration::from_secs(20), || async {
        let i = web.instances("api").await;
        i.len() == 2 && i.iter().all(|(_, h)| h == "passing")
    })
    .await
    .expect("both instances passing");
    let (succeeded, failed, _) = h2load(&format!("http://{up}/"), 1_000, 4);
    assert_eq!((succeeded, failed), (1_000, 0));
    let (f, s) = (
        fast.hits.load(Ordering::Relaxed),
        slow.hits.load(Ordering::Relaxed),
    );
    println!("fast {f}, slow {s}");
    assert!(f >= 9 * s, "the fast instance took {f}, the slow one {s}");
}

/// A GET goes out with the stream's header, not waiting for the status;
/// when the instance refuses it (its application is down: `connect_failed`)
/// the same request goes to the next instance. No request fails, and the
/// broken instance is ejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_is_sent_again_to_the_next_instance() {
    let net = subnet();
    let pki = Pki::new();
    let good = http_app(Ipv4Addr::new(127, net[0], net[1], 1), "good", false).await;
    let mut s1 = NodeSpec::new(net, 1, "api-good");
    s1.extra = http_service("api", good.addr, "http", &[]);
    let _n1 = NodeProc::start(s1.clone(), &pki.issue(CLUSTER, "api-good"));
    // No check: the catalog says passing, but nothing listens there.
    let dead = free_tcp(Ipv4Addr::new(127, net[0], net[1], 2));
    let mut s2 = NodeSpec::new(net, 2, "api-dead");
    s2.seeds = vec![s1.quic];
    s2.extra = format!(
        "\n[[service]]\nname = \"api\"\naddress = \"{}\"\nport = {}\nprotocol = \"http\"\n",
        dead.ip(),
        dead.port()
    );
    let _n2 = NodeProc::start(s2, &pki.issue(CLUSTER, "api-dead"));
    let mut s3 = NodeSpec::new(net, 3, "web-1");
    s3.seeds = vec![s1.quic];
    let up = free_tcp(s3.ip);
    s3.extra = upstream("api", up);
    let web = NodeProc::start(s3, &pki.issue(CLUSTER, "web-1"));
    wait_until(Duration::from_secs(20), || async {
        let i = web.instances("api").await;
        i.len() == 2 && i.iter().all(|(_, h)| h == "passing")
    })
    .await
    .expect("both instances passing");
    let (succeeded, failed, ok2xx) = h2load(&format!("http://{up}/"), 300, 2);
    assert_eq!((succeeded, failed, ok2xx), (300, 0, 300));
    assert_eq!(good.hits.load(Ordering::Relaxed), 300);
    let m = web.get_text("/metrics").await.unwrap_or_default();
    let count = |name: &str| -> f64 {
        m.lines()
            .filter(|l| l.starts_with(name) && l.contains("service=\"api\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(count("meshnode_upstream_retries_total") >= 1.0, "{m}");
    assert!(count("meshnode_outlier_ejections_total") >= 1.0, "{m}");
}
