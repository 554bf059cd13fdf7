//! Telemetry through real nodes: after known traffic (HTTP requests that
//! succeed and fail, TCP connections), the golden series on both nodes
//! count exactly that traffic by caller and callee, every series is
//! described and passes `promtool check metrics`, the access log has one
//! line per request and connection at `all` and at most the sampled rate
//! (and every error) at `sampled`, and `meshnode top` shows the busiest
//! pair first, rendered live under tmux.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use meshnode_transport::Role;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{
    echo_once, echo_server, echo_service, free_tcp, http_get, meshnode_bin, subnet, upstream,
    wait_until, NodeProc, NodeSpec, Pki, CLUSTER,
};

/// HTTP/1.1: 503 on `/fail`, 200 with `ok` otherwise; says the
/// `traceparent` it got in `x-seen-traceparent`.
async fn app(ip: Ipv4Addr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind((ip, 0)).await.expect("bind app");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
                if let Some(tp) = req.headers().get("traceparent") {
                    resp.headers_mut().insert("x-seen-traceparent", tp.clone());
                }
                if req.uri().path() == "/fail" {
                    *resp.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                }
                Ok::<_, Infallible>(resp)
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc),
            );
        }
    });
    (addr, task)
}

fn http_service(name: &str, app: SocketAddr) -> String {
    format!(
        "\n[[service]]\nname = \"{name}\"\naddress = \"{}\"\nport = {}\nprotocol = \"http\"\ncheck = {{ tcp = \"{app}\", interval = \"200ms\", timeout = \"150ms\" }}\n",
        app.ip(),
        app.port()
    )
}

fn http_upstream(service: &str, listen: SocketAddr) -> String {
    format!("\n[[upstream]]\nservice = \"{service}\"\nlisten = \"{listen}\"\nprotocol = \"http\"\n")
}

/// One sample of the exposition format: name, labels, value.
pub(crate) type Sample = (String, BTreeMap<String, String>, f64);

pub(crate) fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut map = BTreeMap::new();
            // Values here hold no `",`: names, clusters, results.
            for kv in labels.split("\",").filter(|s| !s.is_empty()) {
                let (k, v) = kv.split_once('=')?;
                map.insert(k.to_string(), v.trim_matches('"').to_string());
            }
            Some((name.to_string(), map, value))
        })
        .collect()
}

/// The sum of the samples named `name` whose labels include `want`.
pub(crate) fn sum(all: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    all.iter()
        .filter(|(n, labels, _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

/// The access lines of a node's JSON log: their fields.
fn access_lines(node: &NodeProc) -> Vec<serde_json::Value> {
    node.log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "meshnode::access")
        .map(|v| v["fields"].clone())
        .collect()
}

/// promtool: `MESHNODE_PROMTOOL`, else on PATH; required under `CI=true`.
fn promtool() -> Option<String> {
    let p = std::env::var("MESHNODE_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let found = Command::new(&p)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some(p);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "promtool is required under CI=true (bash deploy/prometheus/promtool.sh fetches it)"
    );
    eprintln!("SKIPPED promtool check metrics: no promtool (bash deploy/prometheus/promtool.sh)");
    None
}

struct Fleet {
    api: NodeProc,
    web: NodeProc,
    up_http: SocketAddr,
    up_tcp: SocketAddr,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// api-1 hosts `api` (HTTP) and `echo` (TCP); web-1 (acting as `web`)
/// has an upstream for each. Both log JSON, with `telemetry` as given.
async fn fleet(pki: &Pki, telemetry: &str) -> Fleet {
    let net = subnet();
    let ip = |h: u8| Ipv4Addr::new(127, net[0], net[1], h);
    let (app_addr, app_task) = app(ip(1)).await;
    let (echo, echo_task) = echo_server(ip(1)).await;
    let mut s1 = NodeSpec::new(net, 1, "api-1");
    s1.top = "log_format = \"json\"\n".into();
    s1.extra = format!(
        "\n[telemetry]\n{telemetry}\n{}{}",
        http_service("api", app_addr),
        echo_service("echo", echo)
    );
    let api = NodeProc::start(s1.clone(), &pki.issue(CLUSTER, "api-1"));
    let mut s2 = NodeSpec::new(net, 2, "web-1");
    s2.seeds = vec![s1.quic];
    s2.top = "log_format = \"json\"\n".into();
    let (up_http, up_tcp) = (free_tcp(s2.ip), free_tcp(s2.ip));
    s2.extra = format!(
        "\n[telemetry]\n{telemetry}\n{}{}",
        http_upstream("api", up_http),
        upstream("echo", up_tcp)
    );
    let web = NodeProc::start(
        s2,
        &pki.issue_acting(CLUSTER, "web-1", Role::Node, &["web"]),
    );
    wait_until(Duration::from_secs(20), || async {
        let (a, e) = (web.instances("api").await, web.instances("echo").await);
        a.iter().any(|(_, h)| h == "passing") && e.iter().any(|(_, h)| h == "passing")
    })
    .await
    .expect("web-1 sees api and echo passing");
    Fleet {
        api,
        web,
        up_http,
        up_tcp,
        _tasks: vec![app_task, echo_task],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_metrics_and_the_access_log_count_known_traffic_by_caller_and_callee() {
    let pki = Pki::new();
    let f = fleet(&pki, "access_log = \"all\"").await;
    for i in 0..50 {
        let path = if i % 5 == 4 { "/fail" } else { "/ok" };
        http_get(f.up_http, path).await.expect("an answer");
    }
    for _ in 0..3 {
        echo_once(f.up_tcp).await;
    }
    let pair = |direction: &'static str, service: &'static str| {
        [
            ("direction", direction),
            ("source_service", "web"),
            ("source_cluster", CLUSTER),
            ("destination_service", service),
            ("destination_cluster", CLUSTER),
        ]
    };
    // The destination records a TCP connection once its splice ends,
    // a moment after the caller's application saw the echo.
    let deadline = Instant::now() + Duration::from_secs(10);
    let texts = loop {
        let texts = (
            f.web.get_text("/metrics").await.unwrap_or_default(),
            f.api.get_text("/metrics").await.unwrap_or_default(),
        );
        let m = samples(&texts.1);
        if sum(&m, "meshnode_connections_total", &pair("in", "echo")) >= 3.0 {
            break texts;
        }
        assert!(
            Instant::now() < deadline,
            "api-1 counted the three connections: {}",
            texts.1
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for (node, text, direction) in [("web-1", &texts.0, "out"), ("api-1", &texts.1, "in")] {
        let m = samples(text);
        let with = |extra: (&'static str, &'static str), service| {
            let mut w = pair(direction, service).to_vec();
            w.push(extra);
            w
        };
        let requests = |result| {
            sum(
                &m,
                "meshnode_requests_total",
                &with(("result", result), "api"),
            )
        };
        assert_eq!(
            (requests("2xx"), requests("5xx")),
            (40.0, 10.0),
            "{node}: {text}"
        );
        assert_eq!(
            sum(
                &m,
                "meshnode_request_duration_seconds_count",
                &pair(direction, "api")
            ),
            50.0,
            "{node}"
        );
        assert_eq!(
            sum(
                &m,
                "meshnode_connections_total",
                &with(("result", "ok"), "echo")
            ),
            3.0,
            "{node}: {text}"
        );
        for flow in ["sent", "received"] {
            assert_eq!(
                sum(
                    &m,
                    "meshnode_connection_bytes_total",
                    &with(("flow", flow), "echo")
                ),
                15.0,
                "{node}: 3 x 5 bytes {flow}"
            );
        }
        // Every series of ours is described.
        for (name, _, _) in m.iter().filter(|(n, _, _)| n.starts_with("meshnode_")) {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            assert!(
                text.contains(&format!("# HELP {base} ")),
                "{node}: {base} has no HELP"
            );
        }
    }
    if let Some(promtool) = promtool() {
        for text in [&texts.0, &texts.1] {
            let mut child = Command::new(&promtool)
                .args(["check", "metrics"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("promtool");
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(text.as_bytes())
                .expect("feed promtool");
            let out = child.wait_with_output().expect("promtool");
            assert!(
                out.status.success(),
                "promtool check metrics: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    // HTTP bodies at the caller: 50 answers of 2 bytes, then a POST of 5.
    let bytes = |m: &[Sample], flow: &'static str| {
        let mut w = pair("out", "api").to_vec();
        w.push(("flow", flow));
        sum(m, "meshnode_request_bytes_total", &w)
    };
    assert_eq!(bytes(&samples(&texts.0), "received"), 100.0, "{}", texts.0);
    let mut s = TcpStream::connect(f.up_http).await.expect("connect");
    s.write_all(
        b"POST /ok HTTP/1.1\r\nhost: api\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
    )
    .await
    .expect("post");
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    wait_until(Duration::from_secs(5), || async {
        let m = samples(&f.web.get_text("/metrics").await.unwrap_or_default());
        (bytes(&m, "sent"), bytes(&m, "received")) == (5.0, 102.0)
    })
    .await
    .expect("the POST's 5 bytes sent and its 2-byte answer received");
    // One access line per request (the POST's too) and per connection on
    // each side.
    let deadline = Instant::now() + Duration::from_secs(5);
    let lines = loop {
        let lines = (access_lines(&f.web), access_lines(&f.api));
        if lines.0.len() >= 54 && lines.1.len() >= 54 {
            break lines;
        }
        assert!(
            Instant::now() < deadline,
            "54 access lines on each side: {lines:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for (node, lines, direction) in [("web-1", &lines.0, "out"), ("api-1", &lines.1, "in")] {
        let of = |kind: &str, result: &str| {
            lines
                .iter()
                .filter(|l| {
                    l["direction"] == direction && l["kind"] == kind && l["result"] == result
                })
                .count()
        };
        assert_eq!(
            (
                of("http", "2xx"),
                of("http", "5xx"),
                of("tcp", "ok"),
                lines.len()
            ),
            (41, 10, 3, 54),
            "{node}: {lines:?}"
        );
        for l in lines {
            assert_eq!(
                l["service"].as_str().map(|s| s != "api" && s != "echo"),
                Some(false),
                "{l}"
            );
            assert_eq!(l["source_service"], "web", "{l}");
            assert!(
                l["source"]
                    .as_str()
                    .is_some_and(|s| s.ends_with("/node/web-1")),
                "{l}"
            );
            assert_eq!(l["instance"], "api-1", "{l}");
            if l["kind"] == "http" {
                let id = l["trace_id"].as_str().unwrap_or_default();
                assert!(
                    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
                    "{l}"
                );
            } else {
                assert_eq!(
                    (l["bytes_sent"].as_u64(), l["bytes_received"].as_u64()),
                    (Some(5), Some(5)),
                    "{l}"
                );
            }
        }
    }
    // The two sides of one request share its trace id.
    let ids = |lines: &[serde_json::Value]| -> std::collections::BTreeSet<String> {
        lines
            .iter()
            .filter_map(|l| {
                l["trace_id"]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
            })
            .collect()
    };
    assert_eq!(ids(&lines.0), ids(&lines.1));
    assert_eq!(ids(&lines.0).len(), 51);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sampled_access_log_keeps_every_error_and_at_most_its_rate_of_the_rest() {
    let pki = Pki::new();
    let f = fleet(&pki, "access_log_rate = 5").await;
    let started = Instant::now();
    for i in 0..200 {
        let path = if i % 20 == 19 { "/fail" } else { "/ok" };
        http_get(f.up_http, path).await.expect("an answer");
    }
    let secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lines = access_lines(&f.web);
    let why = |w: &str| lines.iter().filter(|l| l["why"] == w).count();
    assert_eq!(why("error"), 10, "every failed request: {lines:?}");
    assert!(
        lines
            .iter()
            .filter(|l| l["why"] == "error")
            .all(|l| l["result"] == "5xx"),
        "{lines:?}"
    );
    // A burst of one second's worth, then 5 a second.
    let bound = 5.0 + 5.0 * secs.ceil() + 1.0;
    assert!(
        (why("sampled") as f64) <= bound,
        "{} sampled in {secs:.2} s (bound {bound})",
        why("sampled")
    );
    assert!(
        why("sampled") >= 5,
        "the burst is logged: {}",
        why("sampled")
    );
    let m = samples(&f.web.get_text("/metrics").await.unwrap_or_default());
    assert_eq!(
        sum(
            &m,
            "meshnode_requests_total",
            &[("direction", "out"), ("destination_service", "api")]
        ),
        200.0,
        "the metrics count every request, sampled or not"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_the_busiest_pair_first_live_under_tmux() {
    let pki = Pki::new();
    let f = fleet(&pki, "access_log = \"off\"").await;
    let tmux = Command::new("tmux").arg("-V").output();
    if !tmux.is_ok_and(|o| o.status.success()) {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "tmux is required under CI=true"
        );
        eprintln!("SKIPPED top under tmux: no tmux");
        return;
    }
    let socket = format!("meshnode-top-{}", std::process::id());
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .args(["-L", &socket])
            .args(args)
            .output()
            .expect("tmux")
    };
    let bin = std::fs::canonicalize(meshnode_bin()).expect("meshnode binary");
    let cmd = format!(
        "{} top --admin {} --interval 1s",
        bin.display(),
        f.web.spec.admin
    );
    let started = tmux(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "200",
        "-y",
        "40",
        &cmd,
    ]);
    assert!(started.status.success(), "{started:?}");
    // About 40 HTTP requests and 4 TCP connections a second, for 4 s.
    let load = async {
        let until = Instant::now() + Duration::from_secs(4);
        let mut i = 0u32;
        while Instant::now() < until {
            http_get(f.up_http, "/ok").await;
            if i.is_multiple_of(10) {
                echo_once(f.up_tcp).await;
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    };
    // `top --json` for one frame beside it.
    let json = tokio::task::spawn_blocking({
        let admin = f.web.spec.admin.to_string();
        let bin = bin.clone();
        move || {
            std::thread::sleep(Duration::from_millis(1500));
            Command::new(bin)
                .args([
                    "top",
                    "--admin",
                    &admin,
                    "--interval",
                    "1s",
                    "--count",
                    "1",
                    "--json",
                ])
                .output()
                .expect("top --json")
        }
    });
    load.await;
    let screen =
        String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned();
    tmux(&["kill-server"]);
    let rows: Vec<&str> = screen
        .lines()
        .skip_while(|l| !l.starts_with("SOURCE"))
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(screen.contains("meshnode top: node web-1"), "{screen}");
    assert!(rows.len() >= 2, "both pairs shown: {screen}");
    let cells: Vec<&str> = rows[0].split_whitespace().collect();
    assert_eq!(
        &cells[..4],
        [
            &*format!("web@{CLUSTER}"),
            &*format!("api@{CLUSTER}"),
            "out",
            "http"
        ],
        "the busiest pair first: {screen}"
    );
    assert!(
        rows.iter().any(|r| r.contains(&format!("echo@{CLUSTER}"))),
        "{screen}"
    );
    let out = json.await.expect("join");
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON frame");
    assert_eq!(v["rows"][0]["destination"], format!("api@{CLUSTER}"), "{v}");
    assert!(
        v["rows"][0]["per_second"].as_f64().is_some_and(|r| r > 5.0),
        "{v}"
    );
}

/// Every metric name the code declares is listed (and so described) in
/// the README's table.
#[test]
fn every_metric_is_listed_in_the_readme() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let mut names = Vec::new();
    for krate in ["node", "gossip", "transport"] {
        let mut dirs = vec![root.join(krate).join("src")];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).expect("src dir").flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    let text = std::fs::read_to_string(&p).expect("source");
                    for line in text.lines() {
                        let line = line.trim();
                        if line.starts_with("pub const ") && line.contains(": &str = \"meshnode_") {
                            if let Some(name) = line.split('"').nth(1) {
                                names.push(name.to_string());
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(names.len() > 40, "found {names:?}");
    let missing: Vec<_> = names
        .iter()
        .filter(|n| !readme.contains(&format!("| `{n}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "not in the README's metric table: {missing:?}"
    );
}

/// Spans an OTLP receiver got: the exporting node (its resource's
/// `meshnode.node`) and the span.
pub(crate) type Received =
    std::sync::Arc<std::sync::Mutex<Vec<(String, opentelemetry_proto::tonic::trace::v1::Span)>>>;

/// A small OTLP/HTTP receiver: decodes each `POST /v1/traces` body as an
/// `ExportTraceServiceRequest` and keeps its spans in `got`.
pub(crate) fn otlp_receiver(listener: TcpListener, got: Received) -> tokio::task::JoinHandle<()> {
    use http_body_util::BodyExt;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use prost::Message;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let got = got.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let got = got.clone();
                async move {
                    let ok = req.uri().path() == "/v1/traces"
                        && req
                            .headers()
                            .get("content-type")
                            .is_some_and(|v| v == "application/x-protobuf");
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let decoded = ExportTraceServiceRequest::decode(body);
                    let status = match (ok, decoded) {
                        (true, Ok(export)) => {
                            let mut got = got.lock().expect("spans");
                            for rs in export.resource_spans {
                                let node = rs
                                    .resource
                                    .iter()
                                    .flat_map(|r| &r.attributes)
                                    .find(|kv| kv.key == "meshnode.node")
                                    .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                                        Value::StringValue(s) => Some(s.clone()),
                                        _ => None,
                                    })
                                    .unwrap_or_default();
                                for ss in rs.scope_spans {
                                    for s in ss.spans {
                                        got.push((node.clone(), s));
                                    }
                                }
                            }
                            200
                        }
                        _ => 400,
                    };
                    let mut resp = Response::new(Full::new(Bytes::new()));
                    *resp.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
                    Ok::<_, Infallible>(resp)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc),
            );
        }
    })
}

/// The spans of `got` by trace id.
pub(crate) fn traces(
    got: &Received,
) -> BTreeMap<Vec<u8>, Vec<(String, opentelemetry_proto::tonic::trace::v1::Span)>> {
    let mut by: BTreeMap<Vec<u8>, Vec<_>> = BTreeMap::new();
    for (node, s) in got.lock().expect("spans").iter() {
        by.entry(s.trace_id.clone())
            .or_default()
            .push((node.clone(), s.clone()));
    }
    by
}

/// An HTTP request with the application's own `traceparent`: the caller
/// node's span is its child, the destination node's span the caller's,
/// and the application behind the destination gets the destination's span
/// as its parent. A TCP connection starts a trace at the caller; the
/// destination's span is its child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_both_ends_join_the_applications_trace() {
    let pki = Pki::new();
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind receiver");
    let collector = listener.local_addr().expect("addr");
    let got = Received::default();
    let _receiver = otlp_receiver(listener, got.clone());
    let f = fleet(&pki, &format!("otlp_endpoint = \"http://{collector}\"")).await;
    // The application's trace: 4bf9.., its span 00f0...
    let app_parent = "00f067aa0ba902b7";
    let tp = format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{app_parent}-01");
    let mut s = TcpStream::connect(f.up_http).await.expect("connect");
    s.write_all(
        format!("GET /ok HTTP/1.1\r\nhost: api\r\ntraceparent: {tp}\r\nconnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("write");
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    echo_once(f.up_tcp).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let by = loop {
        let by = traces(&got);
        if by.values().map(Vec::len).sum::<usize>() >= 4 {
            break by;
        }
        assert!(Instant::now() < deadline, "4 spans: {by:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let http = &by[&hex_bytes("4bf92f3577b34da6a3ce929d0e0e4736")];
    let span = |node: &str| {
        http.iter()
            .find(|(n, _)| n == node)
            .map(|(_, s)| s.clone())
            .unwrap_or_else(|| panic!("no span of {node}: {http:?}"))
    };
    let (caller, callee) = (span("web-1"), span("api-1"));
    assert_eq!(
        hex(&caller.parent_span_id),
        app_parent,
        "the caller's span is the application's child"
    );
    assert_eq!(
        callee.parent_span_id, caller.span_id,
        "the destination's span is the caller's child"
    );
    assert_eq!(caller.kind, 3, "client");
    assert_eq!(callee.kind, 2, "server");
    assert!(caller.start_time_unix_nano <= callee.start_time_unix_nano);
    let seen = answer
        .lines()
        .find_map(|l| l.strip_prefix("x-seen-traceparent: "))
        .unwrap_or_default();
    assert_eq!(
        seen,
        format!(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01",
            hex(&callee.span_id)
        ),
        "the application's parent is the destination node's span"
    );
    let tcp: Vec<_> = by
        .iter()
        .filter(|(id, _)| **id != hex_bytes("4bf92f3577b34da6a3ce929d0e0e4736"))
        .collect();
    assert_eq!(tcp.len(), 1, "one trace for the connection: {tcp:?}");
    let spans = tcp[0].1;
    let root = spans
        .iter()
        .find(|(n, _)| n == "web-1")
        .expect("caller span");
    let server = spans
        .iter()
        .find(|(n, _)| n == "api-1")
        .expect("destination span");
    assert!(
        root.1.parent_span_id.is_empty(),
        "the caller starts the connection's trace"
    );
    assert_eq!(server.1.parent_span_id, root.1.span_id);
    let m = samples(&f.web.get_text("/metrics").await.unwrap_or_default());
    assert!(sum(&m, "meshnode_trace_spans_exported_total", &[]) >= 2.0);
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}
