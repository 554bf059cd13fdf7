//! The README's walkthrough for a second cluster, in namespaces: the CA
//! node lives in east; west's first gateway joins through east's gateway
//! across the WAN, and west's nodes join through their own gateway, which
//! relays to east's gateway, which relays to the CA node. Renewals take the
//! same way. Every written config names only its own cluster's seeds.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use meshnode_transport::pki::Role;

use crate::netns::{self, ClusterSpec, Topology};
use crate::tests::onboarding::alive_on;
use crate::{named_echo_in, named_echo_once, upstream, wait_until, NodeProc, NodeSpec, Pki};

const UPSTREAM: u16 = 15_000;

/// `meshnode ARGS` inside namespace `ns`.
fn meshnode_in(ns: &str, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(crate::meshnode_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run meshnode in a namespace")
}

fn ok(out: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs a node from the config `join` wrote, with fast gossip for the test.
fn run_joined(spec: NodeSpec, dir: &Path, extra: &str) -> NodeProc {
    let cfg = dir.join("meshnode.toml");
    let text = std::fs::read_to_string(&cfg).expect("written config");
    std::fs::write(
        &cfg,
        format!("{text}{extra}\n[gossip]\ninterval = \"250ms\"\n"),
    )
    .expect("config");
    NodeProc::spawn(
        spec,
        vec!["run".into(), "--config".into(), cfg.into_os_string()],
        &dir.join("node.log"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_cluster_joins_through_gateways_and_renews_through_them() {
    let test = "a_second_cluster_joins_through_gateways_and_renews_through_them";
    if !netns::available(test) {
        return;
    }
    let topo = Topology::build(&[
        ClusterSpec {
            name: "east",
            nodes: &["e1"],
            gateways: &["egw"],
        },
        ClusterSpec {
            name: "west",
            nodes: &["w1"],
            gateways: &["wgw"],
        },
    ]);
    let (e1, egw, wgw, w1) = (
        topo.host("e1").clone(),
        topo.host("egw").clone(),
        topo.host("wgw").clone(),
        topo.host("w1").clone(),
    );
    let pki = Pki::new();
    let ca_dir = pki.dir.path().join("ca");
    pki.ca.save(&ca_dir).expect("save CA");

    // East, as the first wave set it up: a CA node and a gateway.
    let mut e1_spec = NodeSpec::in_topology(&e1, vec![egw.quic()]);
    e1_spec.extra = format!(
        "{}\n[ca]\nkey = \"{}\"\ncert_ttl = \"15s\"\n",
        upstream("echo", SocketAddr::from(([127, 0, 0, 1], UPSTREAM))),
        ca_dir.join("ca.key").display()
    );
    let e1_dir = pki.issue("east", "e1");
    let e1_node = NodeProc::start(e1_spec, &e1_dir);
    let mut egw_spec = NodeSpec::in_topology(&egw, vec![e1.quic()]);
    let egw_wan = egw.wan_quic().expect("egw WAN");
    egw_spec.wan = Some((egw_wan, vec![]));
    let egw_node = NodeProc::start(egw_spec, &pki.issue_as("east", "egw", Role::Gateway));
    let formed = wait_until(Duration::from_secs(20), || alive_on(&e1_node, "egw")).await;
    assert!(formed.is_some(), "east did not form");

    let e1_dir_s = e1_dir.display().to_string();
    let admin = netns::ADMIN.to_string();
    let token = |extra: &[&str]| {
        let mut args = vec![
            "token",
            "create",
            "--admin",
            &admin,
            "--data-dir",
            &e1_dir_s,
            "--ttl",
            "10m",
        ];
        args.extend_from_slice(extra);
        ok(&meshnode_in(&e1.ns, &args), "token create")
            .trim()
            .to_string()
    };
    let gw_token = token(&["--cluster", "west", "--gateway"]);
    let node_token = token(&["--cluster", "west"]);

    // 1. West's first gateway joins through east's gateway, across the WAN.
    let work = tempfile::tempdir().expect("tempdir");
    let wgw_dir = work.path().join("wgw");
    let wgw_dir_s = wgw_dir.display().to_string();
    let lan_adv = wgw.quic().to_string();
    let out = meshnode_in(
        &wgw.ns,
        &[
            "join",
            "--token",
            &gw_token,
            &egw_wan.to_string(),
            "--node",
            "wgw",
            "--data-dir",
            &wgw_dir_s,
            "--advertise",
            &lan_adv,
            "--no-start",
        ],
    );
    let said = ok(&out, "join of west's gateway");
    assert!(
        said.contains("next: no other node of cluster west"),
        "{said}"
    );
    let cfg = std::fs::read_to_string(wgw_dir.join("meshnode.toml")).expect("config");
    let wgw_wan = wgw.wan_quic().expect("wgw WAN");
    for line in [
        "cluster = \"west\"".to_string(),
        "seeds = []".to_string(),
        "gateway = true".to_string(),
        format!("advertise = \"{lan_adv}\""),
        format!("wan_advertise = \"{wgw_wan}\""),
        format!("wan_seeds = [\"{egw_wan}\"]"),
    ] {
        assert!(cfg.contains(&line), "missing {line:?} in\n{cfg}");
    }
    let mut wgw_spec = NodeSpec::in_topology(&wgw, vec![]);
    wgw_spec.wan = Some((wgw_wan, vec![egw_wan]));
    let wgw_node = run_joined(wgw_spec, &wgw_dir, "");
    let fronted = wait_until(Duration::from_secs(20), || async {
        let v = wgw_node.get("/v1/members?pool=wan").await;
        v.and_then(|v| v.as_array().cloned()).is_some_and(|m| {
            m.iter()
                .any(|x| x["node"] == "egw" && x["state"] == "alive")
        })
    })
    .await;
    assert!(
        fronted.is_some(),
        "west's gateway never reached the WAN pool"
    );

    // 2. A west node joins through its own gateway: wgw -> egw -> e1.
    let (echo, _app) = named_echo_in(&w1.ns, "w1");
    let w1_dir = work.path().join("w1");
    let w1_dir_s = w1_dir.display().to_string();
    let out = meshnode_in(
        &w1.ns,
        &[
            "join",
            "--token",
            &node_token,
            &wgw.quic().to_string(),
            "--node",
            "w1",
            "--data-dir",
            &w1_dir_s,
            "--no-start",
        ],
    );
    ok(&out, "join of a west node through west's gateway");
    let cfg = std::fs::read_to_string(w1_dir.join("meshnode.toml")).expect("config");
    assert!(
        cfg.contains(&format!("seeds = [\"{}\"]", wgw.quic())) && !cfg.contains("wan_seeds"),
        "{cfg}"
    );
    assert!(
        wgw_node.log_text().contains("join request relayed"),
        "{}",
        wgw_node.log_text()
    );
    let w1_node = run_joined(
        NodeSpec::in_topology(&w1, vec![wgw.quic()]),
        &w1_dir,
        &crate::echo_service("echo", echo),
    );
    let member = wait_until(Duration::from_secs(20), || alive_on(&wgw_node, "w1")).await;
    assert!(
        member.is_some(),
        "w1 never joined west: {}",
        w1_node.log_text()
    );

    // 3. Traffic from east reaches the joined west node, end to end.
    let answered = wait_until(Duration::from_secs(20), || async {
        named_echo_once(
            Some(&e1.ns),
            SocketAddr::from(([127, 0, 0, 1], UPSTREAM)),
            b"west?",
            Duration::from_secs(3),
        )
        .await
        .is_ok_and(|(name, echo)| name == "w1" && echo == b"west?")
    })
    .await;
    assert!(answered.is_some(), "east never reached w1");

    // 4. Renewal of the 15 s certificates takes the same relays.
    let first = std::fs::read_to_string(w1_dir.join("node.pem")).expect("cert");
    let renewed = wait_until(Duration::from_secs(20), || async {
        std::fs::read_to_string(w1_dir.join("node.pem")).is_ok_and(|c| c != first)
    })
    .await;
    assert!(
        renewed.is_some(),
        "w1 never renewed: {}",
        w1_node.log_text()
    );
    let still = wait_until(Duration::from_secs(10), || alive_on(&wgw_node, "w1")).await;
    assert!(still.is_some());
    drop((w1_node, wgw_node, egw_node, e1_node));
}
