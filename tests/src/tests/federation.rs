//! Multi-cluster federation in network namespaces: two clusters, each a LAN
//! of its own, joined only through their gateways' WAN interfaces.
//!
//! These tests need root (network namespaces, nftables). Without it they skip
//! with a message; under `CI=true` they must run.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshnode_transport::Role;

use crate::netns::{self, ClusterSpec, Topology};
use crate::{named_echo_in, named_echo_once, upstream, wait_until, NodeProc, NodeSpec, Pki};

const UPSTREAM_PORT: u16 = 15001;
/// a1's second upstream for `echo`, pinned to cluster b.
const PINNED_PORT: u16 = 15002;

pub(crate) struct Mesh {
    pub(crate) nodes: BTreeMap<String, NodeProc>,
    pub(crate) _apps: Vec<tokio::task::JoinHandle<()>>,
    // Dropped last: processes first, then namespaces.
    pub(crate) topo: Topology,
    pub(crate) pki: Pki,
}

pub(crate) fn topology(b_gateways: &[&str]) -> Topology {
    Topology::build(&[
        ClusterSpec {
            name: "a",
            nodes: &["a1", "a2"],
            gateways: &["agw"],
        },
        ClusterSpec {
            name: "b",
            nodes: &["b1", "b2"],
            gateways: b_gateways,
        },
    ])
}

impl Mesh {
    /// Starts a node on every host. `echo` lists the hosts that run a named
    /// echo app registered as service `echo`; `a1` gets an upstream for it.
    pub(crate) async fn start(topo: Topology, echo: &[&str]) -> Mesh {
        Self::start_with(topo, echo, |_| {}).await
    }

    /// [`Mesh::start`], with a last word on each node's spec.
    pub(crate) async fn start_with(
        topo: Topology,
        echo: &[&str],
        customize: impl Fn(&mut NodeSpec),
    ) -> Mesh {
        let pki = Pki::new();
        let mut apps = Vec::new();
        let mut nodes = BTreeMap::new();
        let gateways: Vec<netns::Host> = topo
            .hosts
            .values()
            .filter(|h| h.wan.is_some())
            .cloned()
            .collect();
        let hosts: Vec<netns::Host> = gateways
            .iter()
            .cloned()
            .chain(topo.hosts.values().filter(|h| h.wan.is_none()).cloned())
            .collect();
        for h in &hosts {
            let first_gw = gateways.iter().find(|g| g.cluster == h.cluster);
            let seeds = first_gw
                .filter(|g| g.name != h.name)
                .map(|g| vec![g.quic()])
                .unwrap_or_default();
            let mut spec = NodeSpec::in_topology(h, seeds);
            if let Some(wan) = h.wan_quic() {
                let wan_seeds = gateways
                    .iter()
                    .filter(|g| g.name != h.name)
                    .filter_map(netns::Host::wan_quic)
                    .collect();
                spec.wan = Some((wan, wan_seeds));
            }
            if echo.contains(&h.name.as_str()) {
                let (addr, task) = named_echo_in(&h.ns, &h.name);
                apps.push(task);
                spec.extra.push_str(&crate::echo_service("echo", addr));
            }
            if h.name == "a1" {
                spec.extra.push_str(&upstream(
                    "echo",
                    SocketAddr::from(([127, 0, 0, 1], UPSTREAM_PORT)),
                ));
                spec.extra.push_str(&upstream(
                    "echo",
                    SocketAddr::from(([127, 0, 0, 1], PINNED_PORT)),
                ));
                spec.extra.push_str("cluster = \"b\"\n");
            }
            let role = if h.wan.is_some() {
                Role::Gateway
            } else {
                Role::Node
            };
            let dir = pki.issue_as(&h.cluster, &h.name, role);
            customize(&mut spec);
            nodes.insert(h.name.clone(), NodeProc::start(spec, &dir));
        }
        let mesh = Mesh {
            nodes,
            _apps: apps,
            topo,
            pki,
        };
        let t = Instant::now();
        mesh.wait_formed().await;
        eprintln!("mesh formed in {:.2} s", t.elapsed().as_secs_f64());
        mesh
    }

    pub(crate) fn node(&self, name: &str) -> &NodeProc {
        &self.nodes[name]
    }

    /// Every node sees its whole cluster alive; every gateway sees every gateway.
    async fn wait_formed(&self) {
        for (name, node) in &self.nodes {
            let cluster = &self.topo.host(name).cluster;
            let want = self.topo.cluster(cluster).len();
            let ok = wait_until(Duration::from_secs(30), || async {
                alive(&node.get("/v1/members").await) == want
            })
            .await;
            assert!(
                ok.is_some(),
                "{name} did not see {want} alive members: {:?}",
                node.members().await
            );
        }
        let gateways = self.topo.hosts.values().filter(|h| h.wan.is_some()).count();
        for h in self.topo.hosts.values().filter(|h| h.wan.is_some()) {
            let node = self.node(&h.name);
            let ok = wait_until(Duration::from_secs(30), || async {
                alive(&node.get("/v1/members?pool=wan").await) == gateways
            })
            .await;
            assert!(
                ok.is_some(),
                "{} did not see {gateways} gateways in the WAN pool: {:?}",
                h.name,
                node.get("/v1/members?pool=wan").await
            );
        }
    }

    /// One request through a1's upstream; returns the instance that answered.
    pub(crate) async fn request(&self, payload: &[u8], limit: Duration) -> Result<String, String> {
        self.request_via(UPSTREAM_PORT, payload, limit).await
    }

    async fn request_via(
        &self,
        port: u16,
        payload: &[u8],
        limit: Duration,
    ) -> Result<String, String> {
        let (name, echoed) = named_echo_once(
            Some(&self.topo.host("a1").ns),
            SocketAddr::from(([127, 0, 0, 1], port)),
            payload,
            limit,
        )
        .await?;
        if echoed != payload {
            return Err(format!(
                "{name} echoed {} bytes, not the {} sent",
                echoed.len(),
                payload.len()
            ));
        }
        Ok(name)
    }

    /// Waits until a request through a1's upstream is answered by `name`: health
    /// checks pass a round or two after the mesh forms.
    async fn wait_answered_by(&self, name: &str) {
        let ok = wait_until(Duration::from_secs(20), || async {
            self.request(b"warm", Duration::from_secs(10))
                .await
                .as_deref()
                == Ok(name)
        })
        .await;
        assert!(
            ok.is_some(),
            "requests were never answered by {name}: last {:?}",
            self.request(b"warm", Duration::from_secs(10)).await
        );
    }

    /// Waits until a1 sees `echo` in cluster b with `healthy` passing instances.
    pub(crate) async fn wait_remote_healthy(&self, healthy: u64) {
        wait_until(Duration::from_secs(20), || async {
            self.remote_echo("b")
                .await
                .is_some_and(|e| e["healthy"] == healthy)
        })
        .await
        .expect("remote echo visible");
    }

    /// `/v1/services` entries of `echo` seen by a1 for cluster `cluster` from gateways.
    async fn remote_echo(&self, cluster: &str) -> Option<serde_json::Value> {
        self.remote_echo_on("a1", cluster).await
    }

    /// `/v1/services` entries of `echo` seen by `node` for cluster `cluster` from gateways.
    pub(crate) async fn remote_echo_on(
        &self,
        node: &str,
        cluster: &str,
    ) -> Option<serde_json::Value> {
        let v = self.node(node).get("/v1/services").await?;
        v.get("echo")?
            .as_array()?
            .iter()
            .find(|e| e["remote"] == true && e["cluster"] == cluster)
            .cloned()
    }
}

fn alive(v: &Option<serde_json::Value>) -> usize {
    v.as_ref()
        .and_then(|v| v.as_array())
        .map(|l| l.iter().filter(|m| m["state"] == "alive").count())
        .unwrap_or(0)
}

fn payload(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_only_in_cluster_b_is_reached_from_cluster_a_with_the_callers_identity() {
    if !netns::available("a_service_only_in_cluster_b_is_reached_from_cluster_a") {
        return;
    }
    let mesh = Mesh::start(topology(&["bgw"]), &["b1", "b2"]).await;
    let seen = wait_until(Duration::from_secs(20), || async {
        mesh.remote_echo("b")
            .await
            .is_some_and(|e| e["healthy"] == 2 && e["reachable"] == true)
    })
    .await;
    assert!(
        seen.is_some(),
        "a1 never saw echo in cluster b: {:?}",
        mesh.node("a1").get("/v1/services").await
    );
    let entry = mesh.remote_echo("b").await.unwrap_or_default();
    assert_eq!(entry["gateways"], serde_json::json!(["bgw"]));
    assert_eq!(entry["via"], serde_json::json!(["agw"]));
    // The operator's view through the real CLI, inside the gateway's namespace.
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &mesh.topo.host("agw").ns])
        .arg(crate::meshnode_bin())
        .args(["members", "--wan"])
        .output()
        .expect("meshnode members --wan");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for gw in ["agw", "bgw"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(gw) && l.contains("alive") && l.contains("gateway")),
            "{text}"
        );
    }
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &mesh.topo.host("a1").ns])
        .arg(crate::meshnode_bin())
        .args(["services"])
        .output()
        .expect("meshnode services");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("b (2 healthy, via gateway)"), "{text}");

    eprintln!("remote service seen after {:?}", seen);
    let t = Instant::now();
    let big = payload(4 << 20, 7);
    let mut answered = BTreeMap::<String, usize>::new();
    for i in 0..10 {
        let data = if i == 0 {
            big.clone()
        } else {
            payload(1000 + i, i as u8)
        };
        let who = mesh
            .request(&data, Duration::from_secs(20))
            .await
            .expect("cross-cluster request");
        *answered.entry(who).or_default() += 1;
    }
    assert!(answered.keys().all(|n| n.starts_with('b')), "{answered:?}");
    eprintln!("10 requests in {:.2} s", t.elapsed().as_secs_f64());

    // The destination saw a1, not a gateway, as the caller.
    let a1 = "spiffe://acme/cluster/a/node/a1";
    let mut callers = String::new();
    for b in ["b1", "b2"] {
        let metrics = mesh.node(b).get_text("/metrics").await.unwrap_or_default();
        callers.push_str(&metrics);
    }
    assert!(
        callers.contains(&format!("caller=\"{a1}\"")) && callers.contains("direction=\"in\""),
        "destination metrics do not name a1 as the caller:\n{callers}"
    );
    assert!(
        !callers.contains("caller=\"spiffe://acme/cluster/b/node/bgw\""),
        "{callers}"
    );
    assert!(
        !callers.contains("caller=\"spiffe://acme/cluster/a/node/agw\""),
        "{callers}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_instances_in_both_clusters_traffic_stays_local() {
    if !netns::available("with_instances_in_both_clusters_traffic_stays_local") {
        return;
    }
    let mesh = Mesh::start(topology(&["bgw"]), &["a2", "b1"]).await;
    mesh.wait_remote_healthy(1).await;
    mesh.wait_answered_by("a2").await;
    for i in 0..20u8 {
        let who = mesh
            .request(&payload(100, i), Duration::from_secs(10))
            .await
            .expect("request");
        assert_eq!(who, "a2", "request {i} left the cluster");
    }
    // An upstream pinned to cluster b goes there although a local instance exists.
    for i in 0..5u8 {
        let who = mesh
            .request_via(PINNED_PORT, &payload(100, i), Duration::from_secs(10))
            .await
            .expect("pinned request");
        assert_eq!(who, "b1");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn when_local_instances_die_traffic_fails_over_to_cluster_b_and_comes_home() {
    if !netns::available("when_local_instances_die_traffic_fails_over") {
        return;
    }
    let mut mesh = Mesh::start(topology(&["bgw"]), &["a2", "b1"]).await;
    mesh.wait_remote_healthy(1).await;
    mesh.wait_answered_by("a2").await;

    // Kill the only local instance's node; keep sending, one connection at a time.
    let a2 = mesh.nodes.get_mut("a2").expect("a2");
    a2.kill9();
    let killed = Instant::now();
    let mut failures = 0;
    let mut first_remote = None;
    let mut after_detection = Vec::new();
    while killed.elapsed() < Duration::from_secs(12) {
        match mesh
            .request(&payload(500, 3), Duration::from_secs(20))
            .await
        {
            Ok(who) => {
                if who == "b1" && first_remote.is_none() {
                    first_remote = Some(killed.elapsed());
                }
                after_detection.push(who);
            }
            Err(e) => {
                failures += 1;
                eprintln!("failed at {:?}: {e}", killed.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first_remote = first_remote.expect("no request ever reached cluster b");
    eprintln!(
        "failover: first success through cluster b {:.2} s after kill -9; {failures} failed connections; {} succeeded",
        first_remote.as_secs_f64(),
        after_detection.len()
    );
    assert_eq!(failures, 0, "connections failed during failover");
    assert!(
        first_remote <= Duration::from_millis(2_500),
        "failover took {first_remote:?}"
    );
    assert!(
        after_detection.iter().all(|w| w == "b1"),
        "{after_detection:?}"
    );

    // Bring a2 back (a new incarnation) and traffic returns home.
    let host = mesh.topo.host("a2").clone();
    let (addr, task) = named_echo_in(&host.ns, "a2");
    mesh._apps.push(task);
    let mut spec = NodeSpec::in_topology(&host, vec![mesh.topo.host("agw").quic()]);
    spec.extra.push_str(&crate::echo_service("echo", addr));
    let dir = mesh.pki.dir.path().join("a-a2");
    mesh.nodes.insert("a2".into(), NodeProc::start(spec, &dir));
    let home = wait_until(Duration::from_secs(20), || async {
        mesh.request(b"home?", Duration::from_secs(10))
            .await
            .as_deref()
            == Ok("a2")
    })
    .await;
    assert!(home.is_some(), "traffic did not come back to a2");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wan_partition_leaves_local_traffic_alone_and_heals_without_losing_registrations() {
    if !netns::available("a_wan_partition_leaves_local_traffic_alone") {
        return;
    }
    let mesh = Mesh::start(topology(&["bgw"]), &["a2", "b1", "b2"]).await;
    mesh.wait_remote_healthy(2).await;

    mesh.wait_answered_by("a2").await;
    mesh.topo.partition_wan();
    let cut = Instant::now();
    let mut local_failures = 0;
    let mut requests = 0;
    let mut unreachable_at = None;
    while cut.elapsed() < Duration::from_secs(30) {
        requests += 1;
        match mesh.request(&payload(200, 1), Duration::from_secs(5)).await {
            Ok(who) => assert_eq!(who, "a2"),
            Err(e) => {
                local_failures += 1;
                eprintln!("local request failed during partition: {e}");
            }
        }
        if unreachable_at.is_none()
            && mesh
                .remote_echo("b")
                .await
                .is_some_and(|e| e["reachable"] == false && e["health"] == "critical")
        {
            unreachable_at = Some(cut.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        local_failures, 0,
        "local traffic failed during the WAN partition ({requests} requests)"
    );
    let unreachable_at = unreachable_at.expect("cluster b was never shown unreachable");
    // The other side of the cut sees the same.
    let bgw_members = mesh
        .node("bgw")
        .get("/v1/members?pool=wan")
        .await
        .unwrap_or_default();
    assert!(
        bgw_members.to_string().contains("\"dead\""),
        "{bgw_members}"
    );

    mesh.topo.heal_all();
    let healed = Instant::now();
    let a_seen_from_b = || async {
        let v = mesh
            .node("bgw")
            .get("/v1/services")
            .await
            .unwrap_or_default();
        v["echo"].as_array().into_iter().flatten().any(|e| {
            e["remote"] == true
                && e["cluster"] == "a"
                && e["healthy"] == 1
                && e["reachable"] == true
        })
    };
    let back = wait_until(Duration::from_secs(30), || async {
        alive(&mesh.node("agw").get("/v1/members?pool=wan").await) == 2
            && alive(&mesh.node("bgw").get("/v1/members?pool=wan").await) == 2
            && mesh
                .remote_echo("b")
                .await
                .is_some_and(|e| e["reachable"] == true && e["healthy"] == 2)
            && a_seen_from_b().await
    })
    .await;
    assert!(
        back.is_some(),
        "WAN pool or summaries did not reconverge after heal"
    );
    eprintln!(
        "partition: b shown unreachable {:.2} s after the cut; reconverged {:.2} s after heal; {requests} local requests, 0 failed",
        unreachable_at.as_secs_f64(),
        healed.elapsed().as_secs_f64()
    );
    // No registration was lost on either side.
    let b_view = mesh
        .node("bgw")
        .get("/v1/services")
        .await
        .unwrap_or_default();
    let b_local: Vec<_> = b_view["echo"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["cluster"] == "b" && e.get("remote").is_none())
        .map(|e| e["node"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(b_local, vec!["b1", "b2"]);
    assert_eq!(
        mesh.request(b"after", Duration::from_secs(10))
            .await
            .as_deref(),
        Ok("a2")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn when_one_of_two_gateways_dies_cross_cluster_traffic_goes_through_the_other() {
    if !netns::available("when_one_of_two_gateways_dies") {
        return;
    }
    let mut mesh = Mesh::start(topology(&["bgw1", "bgw2"]), &["b1"]).await;
    wait_until(Duration::from_secs(20), || async {
        mesh.remote_echo("b").await.is_some_and(|e| {
            e["healthy"] == 1 && e["gateways"].as_array().is_some_and(|g| g.len() == 2)
        })
    })
    .await
    .expect("both b gateways listed");
    mesh.wait_answered_by("b1").await;

    mesh.nodes.get_mut("bgw1").expect("bgw1").kill9();
    let killed = Instant::now();
    let mut failures = 0;
    let mut ok = 0;
    let mut slowest = Duration::ZERO;
    while killed.elapsed() < Duration::from_secs(10) {
        let t = Instant::now();
        match mesh
            .request(&payload(300, 9), Duration::from_secs(30))
            .await
        {
            Ok(who) => {
                assert_eq!(who, "b1");
                ok += 1;
            }
            Err(e) => {
                failures += 1;
                eprintln!("failed at {:?}: {e}", killed.elapsed());
            }
        }
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "gateway loss: {ok} requests succeeded, {failures} failed, slowest {:.2} s",
        slowest.as_secs_f64()
    );
    assert_eq!(failures, 0);
    let gone = wait_until(Duration::from_secs(10), || async {
        mesh.remote_echo("b")
            .await
            .is_some_and(|e| e["gateways"] == serde_json::json!(["bgw2"]))
    })
    .await;
    assert!(gone.is_some(), "{:?}", mesh.remote_echo("b").await);
}

/// Loss on every node of cluster a: no node may be declared dead.
async fn loss_without_false_failures(test: &str, percent: u8, duration: Duration) {
    if !netns::available(test) {
        return;
    }
    let mesh = Mesh::start(topology(&["bgw"]), &["a2", "b1"]).await;
    for h in mesh.topo.cluster("a") {
        mesh.topo.loss(&h.name, percent);
    }
    let start = Instant::now();
    let mut false_dead = std::collections::BTreeSet::new();
    let mut polls = 0;
    while start.elapsed() < duration {
        for (name, node) in &mesh.nodes {
            for path in ["/v1/members", "/v1/members?pool=wan"] {
                if path.ends_with("wan") && mesh.topo.host(name).wan.is_none() {
                    continue;
                }
                // A lossy admin answer is not a verdict: only members listed as not alive count.
                if let Some(v) = node.get(path).await {
                    polls += 1;
                    for m in v.as_array().into_iter().flatten() {
                        if m["state"] != "alive" {
                            false_dead.insert(format!("{name} saw {} {}", m["node"], m["state"]));
                        }
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let dropped: u64 = mesh
        .topo
        .cluster("a")
        .iter()
        .map(|h| mesh.topo.dropped(&h.name))
        .sum();
    eprintln!(
        "{percent}% loss on cluster a for {:?}: {dropped} packets dropped, {polls} member lists polled, {} false failures",
        duration,
        false_dead.len()
    );
    assert!(dropped > 0, "the loss rules dropped nothing");
    assert!(false_dead.is_empty(), "false failures: {false_dead:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn thirty_percent_loss_on_a_cluster_causes_no_false_failures_short() {
    loss_without_false_failures("thirty_percent_loss_short", 30, Duration::from_secs(15)).await;
}

/// The full 60 s run of the issue: `cargo nextest run -p meshnode-tests --run-ignored only thirty_percent`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "60 s; the CI variant runs 15 s"]
async fn thirty_percent_loss_on_a_cluster_causes_no_false_failures_60s() {
    loss_without_false_failures("thirty_percent_loss_60s", 30, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_node_is_routed_around_and_rejoins_after_sigcont() {
    if !netns::available("a_paused_node_is_routed_around") {
        return;
    }
    let mesh = Mesh::start(topology(&["bgw"]), &["a2", "b1"]).await;
    mesh.wait_remote_healthy(1).await;
    mesh.wait_answered_by("a2").await;

    // SIGSTOP for 5 s: a pause is not a clean outage (packets queue, then burst).
    mesh.node("a2").pause();
    let paused = Instant::now();
    let mut failures = 0;
    let mut answered = BTreeMap::<String, usize>::new();
    while paused.elapsed() < Duration::from_secs(5) {
        match mesh
            .request(&payload(100, 5), Duration::from_secs(20))
            .await
        {
            Ok(who) => *answered.entry(who).or_default() += 1,
            Err(e) => {
                failures += 1;
                eprintln!("failed at {:?}: {e}", paused.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    mesh.node("a2").signal("CONT");
    let resumed = Instant::now();
    assert_eq!(failures, 0, "connections failed while a2 was paused");
    assert!(answered.contains_key("b1"), "{answered:?}");

    // Everyone, a2 included, sees the whole cluster alive again, and traffic comes home.
    let back = wait_until(Duration::from_secs(20), || async {
        let mut all = true;
        for h in mesh.topo.cluster("a") {
            all &= alive(&mesh.node(&h.name).get("/v1/members").await) == 3;
        }
        all && mesh
            .request(b"home?", Duration::from_secs(10))
            .await
            .as_deref()
            == Ok("a2")
    })
    .await;
    assert!(back.is_some(), "a2 did not rejoin after SIGCONT");
    eprintln!(
        "pause: {answered:?} during a 5 s SIGSTOP, 0 failed; rejoined and serving {:.2} s after SIGCONT",
        resumed.elapsed().as_secs_f64()
    );
}

/// Sums the samples of `name` whose labels include all of `labels`.
fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_ejects_an_instance_that_refuses_and_balances_like_an_upstream() {
    if !netns::available("a_gateway_ejects_an_instance_that_refuses") {
        return;
    }
    // b2's echo instance passes its check (a TCP check of b2's own admin
    // port) but its application port is closed: every stream the gateway
    // sends there is refused with connect_failed, while gossip says healthy.
    let b2_admin = netns::ADMIN;
    let mesh = Mesh::start_with(topology(&["bgw"]), &["b1"], |spec| {
        if spec.name == "b2" {
            spec.extra.push_str(&format!(
                "\n[[service]]\nname = \"echo\"\naddress = \"127.0.0.1\"\nport = 1\ncheck = {{ tcp = \"{b2_admin}\", interval = \"200ms\", timeout = \"150ms\" }}\n"
            ));
        }
    })
    .await;
    mesh.wait_remote_healthy(2).await;
    let mut answered = BTreeMap::<String, usize>::new();
    for i in 0..40 {
        let who = mesh
            .request(&payload(200, i), Duration::from_secs(20))
            .await
            .expect("every request is answered (the gateway tries b1 after b2)");
        *answered.entry(who).or_default() += 1;
    }
    assert_eq!(answered.get("b1"), Some(&40), "{answered:?}");
    let refused = metric_sum(
        &mesh
            .node("b2")
            .get_text("/metrics")
            .await
            .unwrap_or_default(),
        "meshnode_tunnel_streams_total",
        &["direction=\"in\"", "result=\"connect_failed\""],
    );
    let gw = mesh
        .node("bgw")
        .get_text("/metrics")
        .await
        .unwrap_or_default();
    let ejections = metric_sum(
        &gw,
        "meshnode_outlier_ejections_total",
        &["service=\"echo\""],
    );
    // Without ejection about half of the 40 streams would try b2 first;
    // with it, 3 failures in a row eject b2 for 5 s, then one try per
    // period (5 s, doubling).
    assert!(ejections >= 1.0, "bgw ejected nothing:\n{gw}");
    assert!(
        (3.0..=8.0).contains(&refused),
        "b2 refused {refused} of 40 streams"
    );
    eprintln!("gateway: b2 refused {refused} of 40 streams, {ejections} ejection(s) at bgw");
}
