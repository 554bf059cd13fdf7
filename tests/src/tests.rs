mod authz;
mod cli;
mod dashboard;
mod dns;
mod federation;
mod flow;
mod gateways;
mod handshakes;
mod http;
mod integrity;
mod listeners;
mod liveness;
mod onboarding;
mod policy;
mod pool;
mod reload;
mod scale;
mod second_cluster;
mod systemd;
mod telemetry;
mod tunnel;

use std::time::Duration;

use meshnode_transport::tls::TlsMaterial;
use meshnode_transport::{Endpoint, EndpointConfig, Incoming};

use crate::{NodeProc, NodeSpec, Pki};

/// Certificate material for an in-process endpoint `name` of cluster east.
pub(crate) fn material(pki: &Pki, name: &str) -> TlsMaterial {
    let d = pki.issue("east", name);
    TlsMaterial::load(&d.join("ca.pem"), &d.join("node.pem"), &d.join("node.key"))
        .expect("load material")
}

/// An in-process endpoint on a free loopback port.
pub(crate) fn loopback_endpoint(tls: TlsMaterial) -> (Endpoint, Incoming) {
    Endpoint::bind(EndpointConfig {
        bind: "127.0.0.1:0".parse().expect("addr"),
        tls: tls.into(),
    })
    .expect("bind a loopback endpoint")
}

/// Starts nodes with the given extra config; node 1 seeds the others.
/// Returns once every node sees `specs.len()` alive members.
pub(crate) async fn start_pool(pki: &Pki, net: [u8; 2], extras: Vec<String>) -> Vec<NodeProc> {
    let n = extras.len();
    let mut nodes = Vec::new();
    let mut seed = None;
    for (i, extra) in extras.into_iter().enumerate() {
        let name = format!("node-{}", i + 1);
        let mut spec = NodeSpec::new(net, (i + 1) as u8, &name);
        spec.extra = extra;
        if let Some(s) = seed {
            spec.seeds = vec![s];
        } else {
            seed = Some(spec.quic);
        }
        let dir = pki.issue(&spec.cluster, &name);
        nodes.push(NodeProc::start(spec, &dir));
    }
    for node in &nodes {
        let formed = crate::wait_until(Duration::from_secs(20), || async {
            node.members()
                .await
                .iter()
                .filter(|(_, st)| st == "alive")
                .count()
                == n
        })
        .await;
        assert!(
            formed.is_some(),
            "{} did not see {n} alive members: {:?}",
            node.spec.name,
            node.members().await
        );
    }
    nodes
}
