//! Failure detection under faults, in network namespaces: a node paused
//! with SIGSTOP (Lifeguard's case) and one-way partitions. They need root
//! (namespaces, nftables); without it they skip with a message, and under
//! `CI=true` they must run.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::netns::{self, ClusterSpec, Topology};
use crate::{wait_until, NodeProc, NodeSpec, Pki};

const NAMES: [&str; 5] = ["n1", "n2", "n3", "n4", "n5"];

struct Lan {
    nodes: BTreeMap<String, NodeProc>,
    // Dropped after the processes: namespaces last.
    topo: Topology,
    _pki: Pki,
}

impl Lan {
    async fn start() -> Lan {
        let topo = Topology::build(&[ClusterSpec {
            name: "a",
            nodes: &NAMES,
            gateways: &[],
        }]);
        let pki = Pki::new();
        let seed = topo.host("n1").quic();
        let mut nodes = BTreeMap::new();
        for name in NAMES {
            let h = topo.host(name);
            let seeds = if name == "n1" { vec![] } else { vec![seed] };
            let spec = NodeSpec::in_topology(h, seeds);
            let dir = pki.issue("a", name);
            nodes.insert(name.to_string(), NodeProc::start(spec, &dir));
        }
        let lan = Lan {
            nodes,
            topo,
            _pki: pki,
        };
        for name in NAMES {
            let ok = wait_until(Duration::from_secs(30), || async {
                lan.alive_seen_by(name).await.map(|a| a.len()) == Some(NAMES.len())
            })
            .await;
            assert!(
                ok.is_some(),
                "{name} did not see the LAN form: {:?}",
                lan.nodes[name].members().await
            );
        }
        lan
    }

    /// The members `observer` lists as alive; None if its admin API did not answer.
    async fn alive_seen_by(&self, observer: &str) -> Option<BTreeSet<String>> {
        let v = self.nodes[observer].get("/v1/members").await?;
        Some(
            v.as_array()?
                .iter()
                .filter(|m| m["state"] == "alive")
                .filter_map(|m| m["node"].as_str().map(str::to_string))
                .collect(),
        )
    }

    /// Polls every observer for `dur` (every 250 ms); returns what each saw
    /// not alive among `watched`, as "observer saw member not alive".
    async fn not_alive_during(
        &self,
        dur: Duration,
        observers: &[&str],
        watched: &[&str],
    ) -> BTreeSet<String> {
        let start = Instant::now();
        let mut seen = BTreeSet::new();
        while start.elapsed() < dur {
            for o in observers {
                if let Some(alive) = self.alive_seen_by(o).await {
                    for w in watched.iter().filter(|w| *w != o) {
                        if !alive.contains(*w) {
                            seen.insert(format!(
                                "{o} saw {w} not alive at {:.1} s",
                                start.elapsed().as_secs_f64()
                            ));
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        seen
    }
}

/// Pauses n5 for `pause`, resumes it, and checks Lifeguard's promises: n5
/// marks no healthy peer dead after SIGCONT, and every node sees n5 alive
/// within 3 s of it. Returns how long that took.
async fn pause_and_resume(lan: &Lan, pause: Duration) -> f64 {
    let n5 = &lan.nodes["n5"];
    n5.pause();
    let paused = Instant::now();
    let mut seen_dead = false;
    while paused.elapsed() < pause {
        if pause >= Duration::from_secs(10) && !seen_dead {
            if let Some(a) = lan.alive_seen_by("n1").await {
                seen_dead = !a.contains("n5");
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    n5.signal("CONT");
    let resumed = Instant::now();
    if pause >= Duration::from_secs(10) {
        assert!(seen_dead, "a node paused for {pause:?} was never seen dead");
    }
    let back = wait_until(Duration::from_secs(10), || async {
        let mut all = true;
        for o in NAMES {
            all &= lan.alive_seen_by(o).await.is_some_and(|a| a.contains("n5"));
        }
        all
    })
    .await;
    let took = resumed.elapsed().as_secs_f64();
    assert!(
        back.is_some(),
        "n5 was not alive everywhere 10 s after SIGCONT"
    );
    // The resumed node judges its healthy peers alive all along.
    let accused = lan
        .not_alive_during(Duration::from_secs(8), &["n5"], &NAMES)
        .await;
    assert!(accused.is_empty(), "after a {pause:?} pause: {accused:?}");
    assert!(
        took <= 3.0,
        "alive everywhere {took:.2} s after SIGCONT (> 3 s)"
    );
    took
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_node_accuses_no_healthy_peer_and_is_alive_everywhere_within_3s() {
    if !netns::available("a_paused_node_accuses_no_healthy_peer") {
        return;
    }
    let lan = Lan::start().await;
    let short = pause_and_resume(&lan, Duration::from_secs(5)).await;
    let long = pause_and_resume(&lan, Duration::from_secs(30)).await;
    let pauses = lan.nodes["n5"]
        .get_text("/metrics")
        .await
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("meshnode_gossip_pauses_total") && l.contains("lan"))
        .map(str::to_string);
    eprintln!(
        "SIGSTOP 5 s: alive everywhere {short:.2} s after SIGCONT; 30 s: {long:.2} s; no healthy peer accused; {pauses:?}"
    );
    assert!(
        pauses.is_some_and(|l| l.ends_with(" 2")),
        "the node noticed both pauses"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_way_partitions_cause_no_false_deaths_on_the_reachable_side() {
    if !netns::available("one_way_partitions_cause_no_false_deaths") {
        return;
    }
    let lan = Lan::start().await;

    // n1 hears nothing from n2 (n2 hears n1): indirect probes carry both.
    let n2 = lan.topo.host("n2").lan.to_string();
    lan.topo.drop_from("n1", &n2);
    let false_deaths = lan
        .not_alive_during(Duration::from_secs(15), &NAMES, &NAMES)
        .await;
    let dropped = lan.topo.dropped("n1");
    assert!(dropped > 0, "the one-way rule dropped nothing");
    assert!(false_deaths.is_empty(), "n1 deaf to n2: {false_deaths:?}");
    lan.topo.heal("n1");

    // n5 hears nobody but is heard by all: it may be judged dead (it cannot
    // answer probes), but its accusations must not kill anyone else.
    lan.topo.drop_from("n5", "10.0.1.0/24");
    let reachable = ["n1", "n2", "n3", "n4"];
    let false_deaths = lan
        .not_alive_during(Duration::from_secs(20), &reachable, &reachable)
        .await;
    assert!(lan.topo.dropped("n5") > 0, "the rule on n5 dropped nothing");
    assert!(
        false_deaths.is_empty(),
        "n5 deaf to everyone: {false_deaths:?}"
    );
    lan.topo.heal("n5");
    let back = wait_until(Duration::from_secs(15), || async {
        let mut all = true;
        for o in NAMES {
            all &= lan.alive_seen_by(o).await.map(|a| a.len()) == Some(NAMES.len());
        }
        all
    })
    .await;
    assert!(back.is_some(), "the LAN did not heal");
    eprintln!("one-way partitions: no false deaths on the reachable side; healed in {back:?}");
}
