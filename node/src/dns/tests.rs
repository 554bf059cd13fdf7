use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use meshnode_gossip::catalog::Catalog;
use meshnode_gossip::keys::Health;
use proptest::prelude::*;

use super::*;
use crate::balance::fixtures::{inst, route};
use crate::config::UpstreamConfig;

fn upstream(service: &str, listen: &str, cluster: Option<&str>) -> UpstreamConfig {
    UpstreamConfig {
        service: service.into(),
        listen: listen.parse().unwrap(),
        failover: vec![],
        cluster: cluster.map(str::to_string),
        as_service: None,
        protocol: None,
    }
}

/// api: two healthy and one failing instance in east (ours), a remote
/// route to west; web: known only by an upstream; "a.b" has a dot.
fn catalog() -> Catalog {
    let mut c = Catalog::default();
    let mut e1 = inst("e1", "east", Health::Passing);
    e1.addr = "10.0.0.1".into();
    let mut e2 = inst("e2", "east", Health::Warning);
    e2.addr = "10.0.0.2".into();
    e2.port = 8081;
    let mut e3 = inst("e3", "east", Health::Critical);
    e3.addr = "10.0.0.3".into();
    c.services.insert("api".into(), vec![e1, e2, e3]);
    c.services
        .insert("a.b".into(), vec![inst("e1", "east", Health::Passing)]);
    c.remote
        .insert("api".into(), vec![route("west", "gw1", 2, Some(20))]);
    c
}

fn zone(mode: DnsMode) -> Zone {
    let ups = [
        upstream("api", "127.100.0.7:8080", None),
        upstream("api", "127.100.0.8:8080", Some("west")),
        upstream("web", "127.100.0.9:80", None),
    ];
    Zone::build(&ZoneInput {
        catalog: &catalog(),
        upstreams: &ups,
        cluster: "east",
        node: "e1",
        mode,
        ttl: 5,
        domain: "mesh",
        serial: 7,
    })
}

/// The zone of `c` in instances mode, as node e1 of east sees it.
fn instances_of(c: &Catalog) -> Zone {
    Zone::build(&ZoneInput {
        catalog: c,
        upstreams: &[],
        cluster: "east",
        node: "e1",
        mode: DnsMode::Instances,
        ttl: 5,
        domain: "mesh",
        serial: 1,
    })
}

fn query(name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = 4242;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_str(name).unwrap(), qtype));
    m.to_vec().unwrap()
}

fn ask(z: &Zone, name: &str, qtype: RecordType) -> (Message, Outcome) {
    let (bytes, outcome) = respond(z, &query(name, qtype), Transport::Udp);
    let m = Message::from_vec(&bytes.expect("an answer")).unwrap();
    assert_eq!(m.metadata.id, 4242);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert!(m.metadata.recursion_desired);
    (m, outcome)
}

fn addrs(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn upstream_mode_answers_the_upstream_address() {
    let z = zone(DnsMode::Upstreams);
    for name in ["api.service.mesh.", "api.service.mesh"] {
        let (m, o) = ask(&z, name, RecordType::A);
        assert_eq!(o, Outcome::Answer, "{name}");
        assert_eq!(addrs(&m), vec![ip("127.100.0.7")]);
        assert!(m.metadata.authoritative);
        assert_eq!(m.answers[0].ttl, 5);
    }
    // Pinned to a cluster: its own name.
    let (m, _) = ask(&z, "api.service.west.mesh.", RecordType::A);
    assert_eq!(addrs(&m), vec![ip("127.100.0.8")]);
    // Known only by an upstream.
    let (m, _) = ask(&z, "web.service.mesh.", RecordType::A);
    assert_eq!(addrs(&m), vec![ip("127.100.0.9")]);
}

#[test]
fn srv_records_carry_ports_and_their_targets_resolve() {
    let z = zone(DnsMode::Upstreams);
    for name in ["api.service.mesh.", "_api._tcp.service.mesh."] {
        let (m, o) = ask(&z, name, RecordType::SRV);
        assert_eq!(o, Outcome::Answer);
        let RData::SRV(srv) = &m.answers[0].data else {
            panic!("not SRV: {m:?}")
        };
        assert_eq!(srv.port, 8080);
        assert_eq!(srv.target.to_ascii(), "7f640007.addr.mesh.");
        let RData::A(a) = &m.additionals[0].data else {
            panic!("no A beside the SRV: {m:?}")
        };
        assert_eq!(a.0, Ipv4Addr::new(127, 100, 0, 7));
    }
    let (m, o) = ask(&z, "7f640007.addr.mesh.", RecordType::A);
    assert_eq!(o, Outcome::Answer);
    assert_eq!(addrs(&m), vec![ip("127.100.0.7")]);
    let (m, o) = ask(&z, "_api._tcp.service.west.mesh.", RecordType::SRV);
    assert_eq!(o, Outcome::Answer);
    assert_eq!(m.answers.len(), 1);
}

#[test]
fn instances_mode_answers_healthy_own_instances_only() {
    let z = zone(DnsMode::Instances);
    let (m, _) = ask(&z, "api.service.mesh.", RecordType::A);
    assert_eq!(addrs(&m), vec![ip("10.0.0.1"), ip("10.0.0.2")]);
    let (m, _) = ask(&z, "api.service.east.mesh.", RecordType::A);
    assert_eq!(addrs(&m), vec![ip("10.0.0.1"), ip("10.0.0.2")]);
    let (m, _) = ask(&z, "api.service.mesh.", RecordType::SRV);
    let ports: Vec<u16> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some(s.port),
            _ => None,
        })
        .collect();
    assert_eq!(ports, vec![8080, 8081]);
    assert_eq!(m.additionals.len(), 2);
    // Another cluster's instances are behind its gateways: its upstream.
    let (m, _) = ask(&z, "api.service.west.mesh.", RecordType::A);
    assert_eq!(addrs(&m), vec![ip("127.100.0.8")]);
}

#[test]
fn instances_on_another_nodes_loopback_are_not_answered_but_our_own_are() {
    let mut c = Catalog::default();
    let mut mine = inst("e1", "east", Health::Passing);
    mine.addr = "127.0.0.1".into();
    let mut theirs = inst("e2", "east", Health::Passing);
    theirs.addr = "127.0.0.1".into();
    theirs.port = 9090;
    let mut anywhere = inst("e3", "east", Health::Passing);
    anywhere.addr = "0.0.0.0".into();
    let mut routable = inst("e4", "east", Health::Passing);
    routable.addr = "10.0.0.4".into();
    c.services
        .insert("api".into(), vec![mine, theirs, anywhere, routable]);
    let z = instances_of(&c);
    let (m, _) = ask(&z, "api.service.mesh.", RecordType::SRV);
    let got: Vec<(u16, String)> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some((s.port, s.target.to_ascii())),
            _ => None,
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (8080, "7f000001.addr.mesh.".to_string()),
            (8080, "0a000004.addr.mesh.".to_string())
        ]
    );
}

#[test]
fn unknown_names_are_nxdomain_and_known_names_without_data_nodata_both_with_the_soa() {
    let z = zone(DnsMode::Upstreams);
    for name in [
        "nope.service.mesh.",
        "api.service.north.mesh.",
        "api.node.mesh.",
        "x.api.service.mesh.",
        "zz.addr.mesh.",
        "a.b.service.mesh.",
    ] {
        let (m, o) = ask(&z, name, RecordType::A);
        assert_eq!(o, Outcome::NxDomain, "{name}");
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(m.answers.is_empty());
        let RData::SOA(soa) = &m.authorities[0].data else {
            panic!("no SOA: {m:?}")
        };
        assert_eq!(
            soa.minimum, 5,
            "negative answers live as long as positive ones"
        );
        assert_eq!(soa.serial, 7);
    }
    // A known service with no upstream here and no records of the type.
    let (m, o) = ask(&z, "api.service.mesh.", RecordType::AAAA);
    assert_eq!(o, Outcome::NoData);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert_eq!(m.authorities.len(), 1);
    let (m, o) = ask(&z, "api.service.east.mesh.", RecordType::A);
    assert_eq!(
        (o, m.answers.len()),
        (Outcome::NoData, 0),
        "no upstream pinned to east"
    );
    let (m, o) = ask(&z, "mesh.", RecordType::SOA);
    assert_eq!((o, m.answers.len()), (Outcome::Answer, 1));
}

#[test]
fn names_outside_the_zone_are_refused() {
    let z = zone(DnsMode::Upstreams);
    for name in ["example.com.", "service.mesh.example.", "notmesh."] {
        let (m, o) = ask(&z, name, RecordType::A);
        assert_eq!(o, Outcome::Refused, "{name}");
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    }
}

#[test]
fn a_custom_domain_is_the_apex() {
    let ups = [upstream("api", "127.100.0.7:8080", None)];
    let z = Zone::build(&ZoneInput {
        catalog: &catalog(),
        upstreams: &ups,
        cluster: "east",
        node: "e1",
        mode: DnsMode::Upstreams,
        ttl: 30,
        domain: "mesh.internal",
        serial: 1,
    });
    let (m, o) = ask(&z, "api.service.mesh.internal.", RecordType::A);
    assert_eq!(o, Outcome::Answer);
    assert_eq!(m.answers[0].ttl, 30);
    assert_eq!(
        ask(&z, "api.service.mesh.", RecordType::A).1,
        Outcome::Refused
    );
}

#[test]
fn a_big_answer_is_truncated_over_udp_and_whole_over_tcp() {
    let mut c = Catalog::default();
    let list = (0..120u8)
        .map(|n| {
            let mut i = inst(&format!("n{n}"), "east", Health::Passing);
            i.addr = format!("10.1.0.{n}");
            i
        })
        .collect();
    c.services.insert("api".into(), list);
    let z = instances_of(&c);
    let q = query("api.service.mesh.", RecordType::SRV);
    let (udp, _) = respond(&z, &q, Transport::Udp);
    let udp = udp.unwrap();
    assert!(udp.len() <= 512);
    let m = Message::from_vec(&udp).unwrap();
    assert!(m.metadata.truncation);
    assert_eq!(m.metadata.id, 4242);
    // EDNS raises the limit to 1232, still short of 120 SRV records.
    let mut with_edns = Message::from_vec(&q).unwrap();
    let mut e = Edns::new();
    e.set_max_payload(4096);
    with_edns.set_edns(e);
    let (big, _) = respond(&z, &with_edns.to_vec().unwrap(), Transport::Udp);
    let big = big.unwrap();
    assert!(big.len() <= MAX_UDP_PAYLOAD as usize);
    assert!(Message::from_vec(&big).unwrap().metadata.truncation);
    let (tcp, _) = respond(&z, &q, Transport::Tcp);
    let m = Message::from_vec(&tcp.unwrap()).unwrap();
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 120);
    assert_eq!(m.additionals.len(), 120);
    // A records fit.
    let (m, _) = ask(&z, "api.service.mesh.", RecordType::A);
    assert!(!m.metadata.truncation || m.answers.is_empty());
}

#[test]
fn other_opcodes_several_questions_and_other_classes_get_errors() {
    let z = zone(DnsMode::Upstreams);
    let mut m = Message::from_vec(&query("api.service.mesh.", RecordType::A)).unwrap();
    m.metadata.op_code = OpCode::Update;
    let (b, o) = respond(&z, &m.to_vec().unwrap(), Transport::Udp);
    assert_eq!(o, Outcome::NotImp);
    assert_eq!(
        Message::from_vec(&b.unwrap())
            .unwrap()
            .metadata
            .response_code,
        ResponseCode::NotImp
    );
    let mut two = Message::from_vec(&query("api.service.mesh.", RecordType::A)).unwrap();
    two.add_query(Query::query(
        Name::from_str("web.service.mesh.").unwrap(),
        RecordType::A,
    ));
    assert_eq!(
        respond(&z, &two.to_vec().unwrap(), Transport::Udp).1,
        Outcome::FormErr
    );
    let mut ch = Message::query();
    let mut q = Query::query(Name::from_str("version.bind.").unwrap(), RecordType::TXT);
    q.set_query_class(hickory_proto::rr::DNSClass::CH);
    ch.add_query(q);
    assert_eq!(
        respond(&z, &ch.to_vec().unwrap(), Transport::Udp).1,
        Outcome::Refused
    );
}

#[test]
fn responses_and_runts_get_nothing_and_garbage_with_a_header_gets_formerr() {
    let z = zone(DnsMode::Upstreams);
    let mut resp = Message::from_vec(&query("api.service.mesh.", RecordType::A)).unwrap();
    resp.metadata.message_type = MessageType::Response;
    assert_eq!(
        respond(&z, &resp.to_vec().unwrap(), Transport::Udp),
        (None, Outcome::Dropped),
        "answering a response could loop between two servers"
    );
    assert_eq!(
        respond(&z, &[1, 2, 3], Transport::Udp),
        (None, Outcome::Dropped)
    );
    let mut junk = query("api.service.mesh.", RecordType::A);
    junk.truncate(15);
    let (b, o) = respond(&z, &junk, Transport::Udp);
    assert_eq!(o, Outcome::FormErr);
    let m = Message::from_vec(&b.unwrap()).unwrap();
    assert_eq!(
        (m.metadata.id, m.metadata.response_code),
        (4242, ResponseCode::FormErr)
    );
}

#[test]
fn the_zone_follows_the_catalog() {
    let mut c = catalog();
    let build = instances_of;
    let (m, _) = ask(&build(&c), "api.service.mesh.", RecordType::A);
    assert_eq!(m.answers.len(), 2);
    for i in c.services.get_mut("api").unwrap() {
        i.health = Health::Critical;
    }
    let (m, o) = ask(&build(&c), "api.service.mesh.", RecordType::A);
    assert_eq!(
        (o, m.answers.len()),
        (Outcome::NoData, 0),
        "no healthy instance left"
    );
    c.services.remove("api");
    c.remote.remove("api");
    assert_eq!(
        ask(&build(&c), "api.service.mesh.", RecordType::A).1,
        Outcome::NxDomain
    );
}

proptest! {
    /// Any bytes: no panic; an answer, when there is one, parses and keeps
    /// the query's id.
    #[test]
    fn any_input_gets_a_parseable_answer_or_none(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let z = zone(DnsMode::Instances);
        for t in [Transport::Udp, Transport::Tcp] {
            if let (Some(b), _) = respond(&z, &bytes, t) {
                let m = Message::from_vec(&b).unwrap();
                prop_assert_eq!(m.metadata.id, u16::from_be_bytes([bytes[0], bytes[1]]));
                prop_assert_eq!(m.metadata.message_type, MessageType::Response);
            }
        }
    }

    /// Mutations of a valid query (the interesting inputs) likewise.
    #[test]
    fn mutated_queries_never_panic(flips in proptest::collection::vec((0usize..64, any::<u8>()), 1..6)) {
        let z = zone(DnsMode::Upstreams);
        let mut q = query("_api._tcp.service.west.mesh.", RecordType::SRV);
        for (at, v) in flips {
            let n = q.len();
            q[at % n] = v;
        }
        let _ = respond(&z, &q, Transport::Udp);
    }
}

/// Resolvers that randomize the case of their questions (DNS 0x20) check
/// that the answer keeps it.
#[test]
fn a_mixed_case_question_is_answered_and_keeps_its_case() {
    let mut q = query("api.service.mesh.", RecordType::A);
    let at = q.windows(7).position(|w| w == b"service").unwrap();
    q[at..at + 7].copy_from_slice(b"SeRvIcE");
    let (b, o) = respond(&zone(DnsMode::Upstreams), &q, Transport::Udp);
    assert_eq!(o, Outcome::Answer);
    let m = Message::from_vec(&b.unwrap()).unwrap();
    assert_eq!(m.queries[0].name().to_ascii(), "api.SeRvIcE.mesh.");
    assert_eq!(addrs(&m), vec![ip("127.100.0.7")]);
}

/// The UDP and TCP counters are indexed by `outcome as usize`.
#[test]
fn the_outcome_list_is_in_declaration_order() {
    for (i, o) in Outcome::ALL.iter().enumerate() {
        assert_eq!(*o as usize, i, "{o:?}");
    }
}
