//! The DNS interface through real nodes and Debian's `dig`: A, SRV (both
//! forms), AAAA (no data), NXDOMAIN, TCP, names outside the zone; an
//! application that knows only a name and the service's port reaches the
//! service through its upstream; a reload's new upstream gets its name;
//! `mode = "instances"` answers the healthy instances and drops one within
//! seconds of its check failing.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use crate::{
    echo_once, echo_server, echo_service, free_udp, subnet, upstream, wait_until, NodeProc,
    NodeSpec, Pki, CLUSTER,
};

/// `dig` (Debian's bind9-dnsutils): required under `CI=true`.
fn have_dig() -> bool {
    let found = Command::new("dig")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found || std::env::var("CI").as_deref() != Ok("true"),
        "dig is required under CI=true (apt-get install bind9-dnsutils)"
    );
    if !found {
        eprintln!("SKIPPED: no dig (apt-get install bind9-dnsutils)");
    }
    found
}

/// Runs `dig @server -p port ARGS` and returns its output.
fn dig(server: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+time=2", "+tries=1"])
        .args(args)
        .output()
        .expect("run dig");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn short(server: SocketAddr, name: &str, qtype: &str) -> Vec<String> {
    let mut v: Vec<String> = dig(server, &["+short", name, qtype])
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// The `status:` dig prints in its header comments.
fn status(server: SocketAddr, name: &str, qtype: &str) -> String {
    let out = dig(server, &["+noall", "+comments", "+authority", name, qtype]);
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("none")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_gets_every_record_kind_and_an_app_connects_by_name() {
    if !have_dig() {
        return;
    }
    let pki = Pki::new();
    let net = subnet();
    let ip = |h: u8| Ipv4Addr::new(127, net[0], net[1], h);
    let (echo, echo_task) = echo_server(ip(1)).await;
    // api-1 hosts api and answers DNS for its own instances.
    let mut s1 = NodeSpec::new(net, 1, "api-1");
    let dns1 = free_udp(ip(1));
    s1.extra = format!(
        "{}\n[dns]\nlisten = \"{dns1}\"\nmode = \"instances\"\nttl = \"2s\"\n",
        echo_service("api", echo)
    );
    let api = NodeProc::start(s1.clone(), &pki.issue(CLUSTER, "api-1"));
    // web-1: an upstream for api on its own loopback address and the
    // service's own port, and DNS in the default mode.
    let mut s2 = NodeSpec::new(net, 2, "web-1");
    s2.seeds = vec![s1.quic];
    let up = SocketAddr::new(ip(77).into(), echo.port());
    let dns2 = free_udp(ip(2));
    s2.extra = format!("{}\n[dns]\nlisten = \"{dns2}\"\n", upstream("api", up));
    let web = NodeProc::start(s2.clone(), &pki.issue(CLUSTER, "web-1"));
    wait_until(Duration::from_secs(20), || async {
        web.instances("api")
            .await
            .iter()
            .any(|(_, h)| h == "passing")
    })
    .await
    .expect("web-1 sees api passing");

    // A: the upstream's address. SRV, both forms: its port and a target
    // that resolves to the same address.
    assert_eq!(
        short(dns2, "api.service.mesh", "A"),
        vec![up.ip().to_string()]
    );
    assert_eq!(
        short(dns2, &format!("API.service.{CLUSTER}.mesh"), "A"),
        Vec::<String>::new(),
        "no upstream pinned to {CLUSTER}: no data"
    );
    let hex = format!("{:08x}", u32::from(ip(77)));
    let srv = vec![format!("1 1 {} {hex}.addr.mesh.", up.port())];
    assert_eq!(short(dns2, "api.service.mesh", "SRV"), srv);
    assert_eq!(short(dns2, "_api._tcp.service.mesh", "SRV"), srv);
    assert_eq!(
        short(dns2, &format!("{hex}.addr.mesh"), "A"),
        vec![up.ip().to_string()]
    );
    let full = dig(
        dns2,
        &[
            "+noall",
            "+answer",
            "+additional",
            "api.service.mesh",
            "SRV",
        ],
    );
    assert!(
        full.contains(&format!("{hex}.addr.mesh.\t5\tIN\tA\t{}", up.ip())),
        "the target's A record rides along, TTL 5 s: {full}"
    );
    // Over TCP too.
    assert_eq!(
        dig(dns2, &["+tcp", "+short", "api.service.mesh", "A"]).trim(),
        up.ip().to_string()
    );
    // No data, no such name, not ours.
    assert_eq!(status(dns2, "api.service.mesh", "AAAA"), "NOERROR");
    assert!(short(dns2, "api.service.mesh", "AAAA").is_empty());
    assert_eq!(status(dns2, "nope.service.mesh", "A"), "NXDOMAIN");
    assert_eq!(status(dns2, "api.service.north.mesh", "A"), "NXDOMAIN");
    let nx = dig(dns2, &["+noall", "+authority", "nope.service.mesh", "A"]);
    assert!(nx.contains("SOA"), "NXDOMAIN carries the SOA: {nx}");
    assert_eq!(status(dns2, "example.com", "A"), "REFUSED");

    // An application that knows a name and the service's port: it
    // resolves, connects, and reaches api through web-1's upstream.
    let resolved = short(dns2, "api.service.mesh", "A");
    let addr: Ipv4Addr = resolved[0].parse().expect("an IPv4 address");
    echo_once(SocketAddr::new(addr.into(), echo.port())).await;

    // A reload that adds an upstream adds its name (the zone looks at the
    // running upstreams every second).
    assert_eq!(status(dns2, "db.service.mesh", "A"), "NXDOMAIN");
    let db_up = SocketAddr::new(ip(78).into(), 5432);
    s2.extra = format!(
        "{}{}\n[dns]\nlisten = \"{dns2}\"\n",
        upstream("api", up),
        upstream("db", db_up)
    );
    let dir = web.data_dir();
    std::fs::write(dir.join("config.toml"), s2.config(&dir)).expect("rewrite config");
    web.signal("HUP");
    wait_until(Duration::from_secs(10), || async {
        short(dns2, "db.service.mesh", "A") == vec![db_up.ip().to_string()]
    })
    .await
    .expect("the reloaded upstream's name answers");

    // instances mode on api-1: the healthy instance, with its own port.
    assert_eq!(
        short(dns1, "api.service.mesh", "A"),
        vec![ip(1).to_string()]
    );
    assert_eq!(
        short(dns1, "api.service.mesh", "SRV"),
        vec![format!(
            "1 1 {} {:08x}.addr.mesh.",
            echo.port(),
            u32::from(ip(1))
        )]
    );
    // The instance fails its check: it leaves the answer within seconds.
    echo_task.abort();
    let gone = wait_until(Duration::from_secs(10), || async {
        short(dns1, "api.service.mesh", "A").is_empty()
    })
    .await
    .expect("a failed instance leaves the DNS answer");
    assert_eq!(status(dns1, "api.service.mesh", "A"), "NOERROR");
    eprintln!("failed instance gone from DNS after {gone:?}");
    let metrics = api.get_text("/metrics").await.expect("metrics");
    let all = super::telemetry::samples(&metrics);
    let answered = |o: &str| {
        super::telemetry::sum(
            &all,
            "meshnode_dns_queries_total",
            &[("transport", "udp"), ("outcome", o)],
        )
    };
    assert!(answered("answer") >= 4.0, "{metrics}");
    assert!(answered("nodata") >= 1.0, "{metrics}");
    drop(web);
}

/// `/etc/netns/<ns>/resolv.conf`, which `ip netns exec` mounts over
/// `/etc/resolv.conf` for what it starts there; removed on drop.
struct NetnsResolvConf(std::path::PathBuf);

impl NetnsResolvConf {
    fn write(ns: &str, text: &str) -> NetnsResolvConf {
        let dir = std::path::PathBuf::from("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).expect("/etc/netns/<ns>");
        std::fs::write(dir.join("resolv.conf"), text).expect("resolv.conf");
        NetnsResolvConf(dir)
    }
}

impl Drop for NetnsResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A real application and the system resolver: in a namespace whose
/// resolv.conf names the node's DNS interface (on 127.0.0.1:53 there),
/// `getent hosts` (glibc's NSS) resolves `api.service.mesh` to the
/// upstream's own loopback address, and curl fetches
/// `http://api.service.mesh:<the service's port>/` through it, reaching the
/// instance on the other host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reaches_a_mesh_service_by_name_through_the_system_resolver() {
    if !have_dig()
        || !crate::netns::available(
            "curl_reaches_a_mesh_service_by_name_through_the_system_resolver",
        )
    {
        return;
    }
    let topo = crate::netns::Topology::build(&[crate::netns::ClusterSpec {
        name: CLUSTER,
        nodes: &["a1", "a2"],
        gateways: &[],
    }]);
    let (a1, a2) = (topo.host("a1").clone(), topo.host("a2").clone());
    let listener =
        crate::netns::listen(&a1.ns, "127.0.0.1:0".parse().expect("addr")).expect("listen in a1");
    let app = super::http::http_app_on(listener, "v1", false, Duration::ZERO);
    let port = app.addr.port();
    let pki = Pki::new();
    let mut s1 = NodeSpec::in_topology(&a1, vec![]);
    s1.extra = super::http::http_service("api", app.addr, "http", &[]);
    let _n1 = NodeProc::start(s1, &pki.issue(CLUSTER, "a1"));
    let mut s2 = NodeSpec::in_topology(&a2, vec![a1.quic()]);
    s2.extra = format!(
        "\n[[upstream]]\nservice = \"api\"\nlisten = \"127.100.0.7:{port}\"\n\n[dns]\nlisten = \"127.0.0.1:53\"\n"
    );
    let n2 = NodeProc::start(s2, &pki.issue(CLUSTER, "a2"));
    let _resolv = NetnsResolvConf::write(
        &a2.ns,
        "nameserver 127.0.0.1\noptions timeout:1 attempts:2\n",
    );
    wait_until(Duration::from_secs(30), || async {
        n2.instances("api")
            .await
            .iter()
            .any(|(_, h)| h == "passing")
    })
    .await
    .expect("a2 sees api passing");

    let getent = Command::new("ip")
        .args([
            "netns",
            "exec",
            &a2.ns,
            "getent",
            "ahostsv4",
            "api.service.mesh",
        ])
        .output()
        .expect("getent runs");
    let said = String::from_utf8_lossy(&getent.stdout);
    eprintln!(
        "getent ahostsv4 api.service.mesh: {}",
        said.lines().next().unwrap_or("")
    );
    assert!(
        said.lines().any(|l| l.starts_with("127.100.0.7 ")),
        "getent: {said} {}",
        String::from_utf8_lossy(&getent.stderr)
    );
    let out = Command::new("ip")
        .args(["netns", "exec", &a2.ns, "curl", "-sS", "--max-time", "10"])
        .arg(format!("http://api.service.mesh:{port}/hello"))
        .output()
        .expect("curl runs");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && body.contains("v1"),
        "curl: {body} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A name the mesh does not know fails fast, as NXDOMAIN.
    let missing = Command::new("ip")
        .args([
            "netns",
            "exec",
            &a2.ns,
            "getent",
            "hosts",
            "nope.service.mesh",
        ])
        .output()
        .expect("getent runs");
    assert_eq!(missing.status.code(), Some(2), "getent's 'not found'");
}
