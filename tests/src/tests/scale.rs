//! Measurements, not assertions of speed: 30 real nodes on loopback.
//!
//! Run: `cargo nextest run -p meshnode-tests --run-ignored only --no-capture measure_`
//! Prints the time for a graceful leave (a state change) to reach every node,
//! and for a kill -9 to be detected (instance withdrawn) by every node.

use std::time::{Duration, Instant};

use crate::tests::start_pool;
use crate::{echo_server, echo_service, subnet, Pki};

const NODES: usize = 30;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "measurement: starts 30 processes"]
async fn measure_propagation_and_detection_at_30_nodes() {
    let pki = Pki::new();
    let net = subnet();
    let ip = std::net::Ipv4Addr::new(127, net[0], net[1], 250);
    let (echo, _t) = echo_server(ip).await;
    let mut extras = vec![String::new(); NODES];
    extras[NODES - 1] = echo_service("leaver", echo);
    extras[NODES - 2] = echo_service("victim", echo);
    let mut nodes = start_pool(&pki, net, extras).await;
    let observers = NODES - 2;
    for n in &nodes[..observers] {
        let ok = crate::wait_until(Duration::from_secs(20), || async {
            n.instances("leaver").await.len() == 1 && n.instances("victim").await.len() == 1
        })
        .await;
        assert!(ok.is_some());
    }

    // A state change: node-30 leaves; time until no observer lists its instance.
    let t0 = Instant::now();
    let left = nodes[NODES - 1].leave().await;
    assert!(
        left.as_ref().is_some_and(|(st, _)| st.contains("202")),
        "{left:?}"
    );
    let spread = all_gone(&nodes[..observers], "leaver", t0).await;
    eprintln!(
        "MEASURE leave propagation to {observers} nodes: max {:.3} s, median {:.3} s",
        spread.0, spread.1
    );

    // A crash: node-29 is killed; time until no observer lists its instance.
    let t0 = Instant::now();
    nodes[NODES - 2].kill9();
    let detect = all_gone(&nodes[..observers], "victim", t0).await;
    eprintln!(
        "MEASURE kill -9 detection by {observers} nodes: max {:.3} s, median {:.3} s",
        detect.0, detect.1
    );

    // No false failures among the survivors.
    for n in &nodes[..observers] {
        let dead: Vec<_> = n
            .members()
            .await
            .into_iter()
            .filter(|(m, st)| st == "dead" && m != "node-29")
            .collect();
        assert!(
            dead.is_empty(),
            "{} falsely sees {dead:?} dead",
            n.spec.name
        );
    }
}

/// Max and median seconds until every node stops listing `service`.
async fn all_gone(nodes: &[crate::NodeProc], service: &str, t0: Instant) -> (f64, f64) {
    let mut done: Vec<Option<f64>> = vec![None; nodes.len()];
    while done.iter().any(Option::is_none) && t0.elapsed() < Duration::from_secs(60) {
        for (i, n) in nodes.iter().enumerate() {
            if done[i].is_none() && n.instances(service).await.is_empty() {
                done[i] = Some(t0.elapsed().as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut times: Vec<f64> = done
        .into_iter()
        .map(|d| d.expect("a node never saw the change"))
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    (times[times.len() - 1], times[times.len() / 2])
}
