//! A DNS query comes from anyone who reaches the DNS interface: any bytes
//! get an answer that parses and keeps the query's id, or none, never a
//! panic; a UDP answer fits the size the query allows.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use meshnode_gossip::catalog::Catalog;
use meshnode_node::config::UpstreamConfig;
use meshnode_node::dns::{respond, DnsMode, Transport, Zone, ZoneInput, MAX_UDP_PAYLOAD};

fn zone() -> &'static Zone {
    static ZONE: OnceLock<Zone> = OnceLock::new();
    ZONE.get_or_init(|| {
        let upstreams: Vec<UpstreamConfig> = (1..=40u8)
            .map(|i| UpstreamConfig {
                service: format!("svc{i}"),
                listen: format!("127.100.0.{i}:8080").parse().expect("addr"),
                failover: vec![],
                cluster: (i % 4 == 0).then(|| "west".to_string()),
                as_service: None,
                protocol: None,
            })
            .collect();
        Zone::build(&ZoneInput {
            catalog: &Catalog::default(),
            upstreams: &upstreams,
            cluster: "east",
            node: "e1",
            mode: DnsMode::Upstreams,
            ttl: 5,
            domain: "mesh",
            serial: 1,
        })
    })
}

fuzz_target!(|data: &[u8]| {
    for t in [Transport::Udp, Transport::Tcp] {
        if let (Some(answer), _) = respond(zone(), data, t) {
            assert!(data.len() >= 2);
            assert_eq!(answer[..2], data[..2], "the id comes back");
            assert!(answer.len() >= 12);
            assert!(answer[2] & 0x80 != 0, "an answer is a response");
            if t == Transport::Udp {
                assert!(answer.len() <= MAX_UDP_PAYLOAD as usize, "{} bytes", answer.len());
            }
        }
    }
});
