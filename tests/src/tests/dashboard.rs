//! The dashboard in a real browser: Debian's headless Chromium driven by
//! chromedriver over the W3C WebDriver protocol. The page loads with no
//! console errors, shows every member and service of a running mesh and
//! the traffic between them, and follows a kill -9 within seconds; a
//! gateway's page shows the other cluster; on a remote admin address the
//! page asks for the secret.
//! Screenshots go to `target/dashboard*.png`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

use crate::{
    echo_once, echo_server, echo_service, free_tcp, subnet, upstream, wait_until, NodeProc,
    NodeSpec, Pki, CLUSTER,
};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Both are required under `CI=true` (apt-get install chromium chromium-driver).
fn have_browser() -> bool {
    let found =
        std::path::Path::new(CHROMIUM).exists() && std::path::Path::new(CHROMEDRIVER).exists();
    assert!(
        found || std::env::var("CI").as_deref() != Ok("true"),
        "chromium and chromium-driver are required under CI=true"
    );
    if !found {
        eprintln!(
            "SKIPPED: no {CHROMIUM} / {CHROMEDRIVER} (apt-get install chromium chromium-driver)"
        );
    }
    found
}

/// One blocking HTTP/1.1 exchange with chromedriver: JSON in, JSON out.
fn wd(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    // chromedriver may keep the connection open: read the head, then
    // exactly Content-Length bytes.
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    let (head, rest) = loop {
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before the head".into());
        }
        raw.extend_from_slice(&chunk[..n]);
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..at]).into_owned();
            break (head, raw[at + 4..].to_vec());
        }
    };
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .ok_or_else(|| format!("no Content-Length: {head}"))?;
    let mut body = rest;
    while body.len() < len {
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let rest = String::from_utf8_lossy(&body).into_owned();
    // chromedriver answers with Content-Length; take the body as JSON.
    let v: Value = serde_json::from_str(rest.trim()).map_err(|e| format!("{e}: {head} {rest}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{head}: {v}"));
    }
    Ok(v["value"].clone())
}

struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let addr = free_tcp(Ipv4Addr::LOCALHOST);
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={}", addr.port()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let started = Instant::now();
        while wd(addr, "GET", "/status", None).map(|v| v["ready"] == true) != Ok(true) {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "chromedriver did not come up"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::tempdir().expect("profile dir");
        // The flags keep Chromium off the network but for the page: this
        // machine refuses every other connection (see the env notes).
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1500,1300",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let v = wd(addr, "POST", "/session", Some(&caps)).expect("a browser session");
        let session = v["sessionId"].as_str().expect("session id").to_string();
        Browser {
            driver,
            addr,
            session,
            _profile: profile,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        wd(
            self.addr,
            method,
            &format!("/session/{}{path}", self.session),
            body,
        )
        .unwrap_or_else(|e| panic!("webdriver {method} {path}: {e}"))
    }

    fn open(&self, url: &str) {
        self.call("POST", "/url", Some(&json!({ "url": url })));
    }

    /// Runs `script` (a function body) in the page and returns its value.
    fn eval(&self, script: &str) -> Value {
        self.eval_with(script, json!([]))
    }

    /// [`Browser::eval`] with `arguments[..]` for the script.
    fn eval_with(&self, script: &str, args: Value) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(&json!({ "script": script, "args": args })),
        )
    }

    /// The browser's console and page errors since the last call.
    fn console(&self) -> Vec<Value> {
        self.call("POST", "/se/log", Some(&json!({ "type": "browser" })))
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn screenshot(&self, name: &str) -> PathBuf {
        let b64 = self.call("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().expect("base64"))
            .expect("a PNG");
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target");
        std::fs::create_dir_all(&dir).expect("target dir");
        let path = dir.join(name);
        std::fs::write(&path, png).expect("write screenshot");
        path
    }

    /// `[node, state]` of every member row.
    fn members(&self) -> Vec<(String, String)> {
        let v = self.eval(
            "return [...document.querySelectorAll('#members tr[data-member]')].map(r => [r.dataset.member, r.dataset.state]);",
        );
        pairs(&v)
    }

    /// `[service, health]` of every service row.
    fn services(&self) -> Vec<(String, String)> {
        let v = self.eval(
            "return [...document.querySelectorAll('#services tr[data-service]')].map(r => [r.dataset.service, r.dataset.health]);",
        );
        pairs(&v)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = wd(
            self.addr,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn pairs(v: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p[0].as_str()?.to_string(), p[1].as_str()?.to_string())))
        .collect();
    out.sort();
    out
}

/// Polls the page (blocking, every 200 ms) until `cond` holds.
fn wait_page(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_mesh_in_chromium_and_follows_a_kill_9() {
    if !have_browser() {
        return;
    }
    let pki = Pki::new();
    let net = subnet();
    let ip = |h: u8| Ipv4Addr::new(127, net[0], net[1], h);
    let (api_app, _api_task) = echo_server(ip(1)).await;
    let (db_app, _db_task) = echo_server(ip(3)).await;
    let mut s1 = NodeSpec::new(net, 1, "api-1");
    s1.extra = echo_service("api", api_app);
    let _api = NodeProc::start(s1.clone(), &pki.issue(CLUSTER, "api-1"));
    let mut s3 = NodeSpec::new(net, 3, "db-1");
    s3.seeds = vec![s1.quic];
    s3.extra = echo_service("db", db_app);
    let mut db = NodeProc::start(s3, &pki.issue(CLUSTER, "db-1"));
    let mut s2 = NodeSpec::new(net, 2, "web-1");
    s2.seeds = vec![s1.quic];
    let up = free_tcp(s2.ip);
    s2.extra = upstream("api", up);
    let web = NodeProc::start(
        s2.clone(),
        &pki.issue_acting(CLUSTER, "web-1", meshnode_transport::Role::Node, &["web"]),
    );
    wait_until(Duration::from_secs(20), || async {
        let (a, d) = (web.instances("api").await, web.instances("db").await);
        a.iter().any(|(_, h)| h == "passing") && d.iter().any(|(_, h)| h == "passing")
    })
    .await
    .expect("web-1 sees api and db passing");
    for _ in 0..5 {
        echo_once(up).await;
    }

    let url = format!("http://{}/ui/", s2.admin);
    let b = tokio::task::block_in_place(Browser::start);
    tokio::task::block_in_place(|| {
        b.open(&url);
        let all = vec![
            ("api-1".to_string(), "alive".to_string()),
            ("db-1".to_string(), "alive".to_string()),
            ("web-1".to_string(), "alive".to_string()),
        ];
        wait_page(Duration::from_secs(15), || b.members() == all)
            .unwrap_or_else(|| panic!("every member alive on the page: {:?}", b.members()));
        let services = vec![
            ("api".to_string(), "passing".to_string()),
            ("db".to_string(), "passing".to_string()),
        ];
        assert_eq!(b.services(), services);
        // The traffic table and the topology show web calling api.
        let edge = "web@east>api@east";
        wait_page(Duration::from_secs(10), || {
            b.eval(&format!(
                "return !!document.querySelector('#pairs tr[data-pair=\"{edge}\"]') && !!document.querySelector('#topology g[data-edge=\"{edge}\"]');"
            )) == Value::Bool(true)
        })
        .expect("the web -> api edge on the page");
        let title = b.eval("return document.title;");
        assert_eq!(title, "meshnode");
        let shot = b.screenshot("dashboard.png");
        eprintln!("screenshot: {}", shot.display());
        let errors: Vec<Value> = b
            .console()
            .into_iter()
            .filter(|e| e["level"] == "SEVERE" || e["level"] == "WARNING")
            .collect();
        assert!(errors.is_empty(), "console errors: {errors:?}");

        // kill -9 db-1: the page follows without a reload.
        let killed = Instant::now();
        db.kill9();
        let seen = wait_page(Duration::from_secs(30), || {
            b.members()
                .iter()
                .any(|(n, s)| n == "db-1" && (s == "dead" || s == "suspect"))
        })
        .unwrap_or_else(|| panic!("db-1 not marked on the page: {:?}", b.members()));
        eprintln!(
            "the page showed db-1 down {:?} after kill -9",
            killed.elapsed()
        );
        assert!(seen < Duration::from_secs(30));
        // Its service goes with it (no instance left, or one that fails).
        wait_page(Duration::from_secs(30), || {
            !b.services()
                .iter()
                .any(|(s, h)| s == "db" && h == "passing")
        })
        .unwrap_or_else(|| panic!("db still passing on the page: {:?}", b.services()));
        b.screenshot("dashboard-after-kill.png");
        let live = b.eval("return document.getElementById('live').textContent;");
        assert_eq!(live, "live", "the page keeps refreshing");
        let errors: Vec<Value> = b
            .console()
            .into_iter()
            .filter(|e| e["level"] == "SEVERE")
            .collect();
        assert!(
            errors.is_empty(),
            "console errors after the kill: {errors:?}"
        );
    });
    drop(b);
}

/// A gateway's page: its own cluster and the other one with its gateway,
/// the other cluster's service; after a kill -9 of that cluster's only
/// gateway, the cluster unreachable and its service critical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateways_dashboard_shows_the_other_cluster_and_loses_it_on_kill_9() {
    if !have_browser() {
        return;
    }
    let pki = Pki::new();
    let net = subnet();
    let ip = |h: u8| Ipv4Addr::new(127, net[0], net[1], h);
    let (db_app, _db_task) = echo_server(ip(4)).await;
    let mut egw = NodeSpec::new(net, 1, "egw");
    // One UDP port per node: the WAN pool rides on the gateway's QUIC address.
    let egw_wan = egw.quic;
    egw.wan = Some((egw_wan, vec![]));
    let _egw = NodeProc::start(
        egw.clone(),
        &pki.issue_as(CLUSTER, "egw", meshnode_transport::Role::Gateway),
    );
    let mut wgw = NodeSpec::new(net, 3, "wgw");
    wgw.cluster = "west".into();
    wgw.wan = Some((wgw.quic, vec![egw_wan]));
    let mut wgw_proc = NodeProc::start(
        wgw.clone(),
        &pki.issue_as("west", "wgw", meshnode_transport::Role::Gateway),
    );
    let mut w1 = NodeSpec::new(net, 4, "w1");
    w1.cluster = "west".into();
    w1.seeds = vec![wgw.quic];
    w1.extra = echo_service("db", db_app);
    let _w1 = NodeProc::start(w1, &pki.issue("west", "w1"));

    let url = format!("http://{}/ui/", egw.admin);
    let b = tokio::task::block_in_place(Browser::start);
    tokio::task::block_in_place(|| {
        b.open(&url);
        let clusters = || {
            pairs(&b.eval(
                "return [...document.querySelectorAll('#clusters tr[data-cluster]')].map(r => [r.dataset.cluster, r.dataset.state + ' ' + r.cells[2].textContent]);",
            ))
        };
        let db_west = || {
            b.eval(
                "const r = document.querySelector('#services tr[data-service=\"db\"][data-cluster=\"west\"]'); return r ? r.dataset.health : null;",
            )
        };
        wait_page(Duration::from_secs(30), || {
            let c = clusters();
            c.len() == 2
                && c[0] == ("east".to_string(), "local egw".to_string())
                && c[1].0 == "west"
                && c[1].1.starts_with("reachable wgw (alive)")
                && db_west() == "passing"
        })
        .unwrap_or_else(|| {
            panic!(
                "both clusters and db in west: {:?} {}",
                clusters(),
                db_west()
            )
        });
        b.screenshot("dashboard-gateway.png");

        let killed = Instant::now();
        wgw_proc.kill9();
        wait_page(Duration::from_secs(30), || {
            let c = clusters();
            c.len() == 2 && c[1].1.starts_with("unreachable") && db_west() == "critical"
        })
        .unwrap_or_else(|| panic!("west not lost on the page: {:?} {}", clusters(), db_west()));
        eprintln!(
            "the page showed west unreachable {:?} after kill -9 of its gateway",
            killed.elapsed()
        );
        let errors: Vec<Value> = b
            .console()
            .into_iter()
            .filter(|e| e["level"] == "SEVERE")
            .collect();
        assert!(errors.is_empty(), "console errors: {errors:?}");
    });
    drop(b);
}

/// On a remote admin address (`admin_allow_remote`) the API needs the
/// secret: the page loads, asks for it, and with it shows the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_remote_admin_address_the_page_asks_for_the_secret_then_shows_the_node() {
    if !have_browser() {
        return;
    }
    let pki = Pki::new();
    let mut spec = NodeSpec::new(subnet(), 1, "solo-1");
    spec.top = "admin_allow_remote = true\n".into();
    let node = NodeProc::start(spec.clone(), &pki.issue(CLUSTER, "solo-1"));
    let url = format!("http://{}/ui/", spec.admin);
    let b = tokio::task::block_in_place(Browser::start);
    tokio::task::block_in_place(|| {
        b.open(&url);
        wait_page(Duration::from_secs(20), || {
            b.eval("return !document.getElementById('secret').hidden;") == Value::Bool(true)
        })
        .expect("the page asks for the secret");
        assert!(b.members().is_empty(), "nothing shown without the secret");
        let secret = std::fs::read_to_string(node.data_dir().join("admin.secret")).expect("secret");
        b.eval_with(
            "document.getElementById('secret-input').value = arguments[0]; document.getElementById('secret-form').requestSubmit(); return true;",
            json!([secret.trim()]),
        );
        wait_page(Duration::from_secs(20), || {
            b.members() == vec![("solo-1".to_string(), "alive".to_string())]
        })
        .unwrap_or_else(|| panic!("the node shown with the secret: {:?}", b.members()));
        assert_eq!(
            b.eval("return document.getElementById('secret').hidden;"),
            Value::Bool(true)
        );
        // The only errors are the refused reads before the secret.
        let errors: Vec<Value> = b
            .console()
            .into_iter()
            .filter(|e| e["level"] == "SEVERE")
            .filter(|e| !e["message"].as_str().unwrap_or("").contains("401"))
            .collect();
        assert!(errors.is_empty(), "console errors: {errors:?}");
    });
    drop(b);
}
