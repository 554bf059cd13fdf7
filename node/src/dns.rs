//! The DNS interface (`[dns] listen`): mesh services by name, for
//! applications that know names rather than upstream ports.
//!
//! - `SERVICE.service.DOMAIN` and `SERVICE.service.CLUSTER.DOMAIN` (the
//!   domain is `mesh` unless `[dns] domain` says otherwise), and the RFC 2782
//!   form `_SERVICE._tcp.service[.CLUSTER].DOMAIN` for SRV clients.
//! - `mode = "upstreams"` (default): A/AAAA records are the addresses of this
//!   node's upstreams for the service, so an upstream on its own loopback
//!   address (`listen = "127.100.0.7:5432"`) on the service's own port is
//!   reachable by name alone. `SERVICE.service.mesh` names the upstreams not
//!   pinned to a cluster; `SERVICE.service.CLUSTER.mesh` the ones pinned to
//!   `CLUSTER`. Failover happens behind the address, so the answer does not
//!   change when instances fail.
//! - `mode = "instances"`: `SERVICE.service.mesh` and
//!   `SERVICE.service.OWN_CLUSTER.mesh` answer the healthy instances of the
//!   own cluster instead (what Consul's DNS does), but for instances on
//!   another node's loopback address, which nothing here can reach (the
//!   mesh reaches them through that node); other clusters' instances
//!   are reachable only through gateways, so their names answer as in
//!   `upstreams` mode.
//! - SRV records carry ports; their targets are `HEX.addr.DOMAIN` names
//!   (the address in hex, as Consul does) whose A/AAAA records come along in
//!   the additional section and resolve on their own.
//! - Unknown services and clusters are NXDOMAIN, known names without records
//!   of the asked type are NODATA; both carry the zone's SOA, whose minimum
//!   is the TTL, so negative answers are cached no longer than positive ones.
//!   Names outside the domain are REFUSED: this is not a recursive resolver.
//!
//! [`Zone`] is built from the catalog and the upstreams as a pure function,
//! and [`respond`] answers one message from it: both sans-IO, parsed and
//! encoded by `hickory-proto`. `server` is the socket shell.

pub mod server;

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use meshnode_gossip::catalog::Catalog;
use meshnode_gossip::keys::Health;
use serde::Serialize;

use crate::config::UpstreamConfig;

/// The largest UDP answer this server sends to an EDNS client (the DNS
/// flag day 2020 size: no fragmentation on any common path).
pub const MAX_UDP_PAYLOAD: u16 = 1232;
/// Without EDNS, a UDP answer is at most this (RFC 1035).
const CLASSIC_UDP_PAYLOAD: usize = 512;

/// What A records answer: see the module docs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsMode {
    #[default]
    Upstreams,
    Instances,
}

/// One answer a query can get, by the transport it came on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What happened to a query, for the metric and the tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Answer,
    NoData,
    NxDomain,
    Refused,
    FormErr,
    NotImp,
    /// Not answered at all (a response, or fewer bytes than a header).
    Dropped,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Answer => "answer",
            Outcome::NoData => "nodata",
            Outcome::NxDomain => "nxdomain",
            Outcome::Refused => "refused",
            Outcome::FormErr => "formerr",
            Outcome::NotImp => "notimp",
            Outcome::Dropped => "dropped",
        }
    }

    /// Every outcome, in declaration order (`o as usize` indexes it).
    pub const ALL: [Outcome; 7] = [
        Outcome::Answer,
        Outcome::NoData,
        Outcome::NxDomain,
        Outcome::Refused,
        Outcome::FormErr,
        Outcome::NotImp,
        Outcome::Dropped,
    ];
}

/// The records one name owns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Entry {
    /// Distinct addresses, in a stable order.
    addrs: Vec<IpAddr>,
    /// (port, address) per SRV record.
    srv: Vec<(u16, IpAddr)>,
}

/// The names the node answers, built from its catalog and upstreams.
#[derive(Clone, Debug)]
pub struct Zone {
    /// The apex, lower case, as a name (`mesh.`).
    apex: Name,
    /// The apex as text without the final dot, for suffix checks.
    apex_text: String,
    ttl: u32,
    soa: Record,
    /// Lower-case owner names without the final dot.
    names: HashMap<String, Entry>,
}

/// What [`Zone::build`] reads.
pub struct ZoneInput<'a> {
    pub catalog: &'a Catalog,
    pub upstreams: &'a [UpstreamConfig],
    pub cluster: &'a str,
    /// This node's name: its own instances may listen on loopback.
    pub node: &'a str,
    pub mode: DnsMode,
    pub ttl: u32,
    /// Lower-case, without the final dot (validated by the config).
    pub domain: &'a str,
    /// The SOA serial: anything that grows when the zone changes.
    pub serial: u32,
}

/// A service or cluster name that can be one DNS label. Service names may
/// hold dots (`a.b`), which would read as two labels: those have no name.
fn label_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('_')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

// === impl Zone ===

impl Zone {
    pub fn build(input: &ZoneInput<'_>) -> Zone {
        let d = input.domain;
        let mut names: HashMap<String, Entry> = HashMap::new();
        let mut services: BTreeSet<&str> = BTreeSet::new();
        services.extend(input.catalog.services.keys().map(String::as_str));
        services.extend(input.catalog.remote.keys().map(String::as_str));
        services.extend(input.upstreams.iter().map(|u| u.service.as_str()));
        for service in services {
            if !label_ok(service) {
                continue;
            }
            let svc = service.to_ascii_lowercase();
            let ups = |pin: Option<&str>| -> Entry {
                let mut e = Entry::default();
                for u in input
                    .upstreams
                    .iter()
                    .filter(|u| u.service == service && u.cluster.as_deref() == pin)
                {
                    push(&mut e, u.listen.ip(), u.listen.port());
                }
                e
            };
            let own_instances = || -> Entry {
                let mut e = Entry::default();
                for i in input.catalog.services.get(service).into_iter().flatten() {
                    if i.cluster != input.cluster || i.health == Health::Critical {
                        continue;
                    }
                    let Ok(ip) = i.addr.parse::<IpAddr>() else {
                        continue;
                    };
                    // Another node's loopback is not reachable from here;
                    // the unspecified address from nowhere.
                    if ip.is_unspecified() || (ip.is_loopback() && i.node != input.node) {
                        continue;
                    }
                    push(&mut e, ip, i.port);
                }
                e
            };
            // Clusters that have the service, or an upstream pinned to them.
            let mut clusters: BTreeSet<&str> = BTreeSet::new();
            for i in input.catalog.services.get(service).into_iter().flatten() {
                clusters.insert(&i.cluster);
            }
            for r in input.catalog.remote.get(service).into_iter().flatten() {
                clusters.insert(&r.cluster);
            }
            for u in input.upstreams.iter().filter(|u| u.service == service) {
                if let Some(c) = &u.cluster {
                    clusters.insert(c);
                }
            }
            let home = match input.mode {
                DnsMode::Instances => own_instances(),
                DnsMode::Upstreams => {
                    let free = ups(None);
                    if free.addrs.is_empty() {
                        ups(Some(input.cluster))
                    } else {
                        free
                    }
                }
            };
            names.insert(format!("{svc}.service.{d}"), home);
            for c in clusters {
                if !label_ok(c) {
                    continue;
                }
                let entry = if input.mode == DnsMode::Instances && c == input.cluster {
                    own_instances()
                } else {
                    ups(Some(c))
                };
                names.insert(
                    format!("{svc}.service.{}.{d}", c.to_ascii_lowercase()),
                    entry,
                );
            }
        }
        let apex = Name::from_ascii(format!("{d}.")).unwrap_or_else(|_| Name::root());
        let soa = Record::from_rdata(
            apex.clone(),
            input.ttl,
            RData::SOA(SOA::new(
                child(&apex, "ns"),
                child(&apex, "hostmaster"),
                input.serial,
                3600,
                600,
                86400,
                input.ttl,
            )),
        );
        Zone {
            apex,
            apex_text: d.to_string(),
            ttl: input.ttl,
            soa,
            names,
        }
    }

    /// How many service names the zone holds (for the log and the tests).
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The records of `name` (lower case, no final dot) if it exists.
    fn lookup(&self, name: &str) -> Lookup<'_> {
        let Some(rest) = name
            .strip_suffix(self.apex_text.as_str())
            .filter(|r| r.is_empty() || r.ends_with('.'))
        else {
            return Lookup::Outside;
        };
        if rest.is_empty() {
            return Lookup::Apex;
        }
        let rest = &rest[..rest.len() - 1];
        if let Some(hex) = rest.strip_suffix(".addr") {
            return match addr_from_hex(hex) {
                Some(ip) => Lookup::Addr(ip),
                None => Lookup::Missing,
            };
        }
        // RFC 2782: `_api._tcp.service...` is `api.service...`.
        if let Some(srv) = rest.strip_prefix('_') {
            if let Some((service, tail)) = srv.split_once("._tcp.") {
                let plain = format!("{service}.{tail}.{}", self.apex_text);
                return match self.names.get(&plain) {
                    Some(e) => Lookup::Entry(e),
                    None => Lookup::Missing,
                };
            }
        }
        match self.names.get(name) {
            Some(e) => Lookup::Entry(e),
            None => Lookup::Missing,
        }
    }
}

enum Lookup<'a> {
    Outside,
    Apex,
    Entry(&'a Entry),
    Addr(IpAddr),
    Missing,
}

fn push(e: &mut Entry, ip: IpAddr, port: u16) {
    if !e.addrs.contains(&ip) {
        e.addrs.push(ip);
    }
    if !e.srv.contains(&(port, ip)) {
        e.srv.push((port, ip));
    }
}

fn child(apex: &Name, label: &str) -> Name {
    Name::from_ascii(label)
        .and_then(|n| n.append_domain(apex))
        .unwrap_or_else(|_| apex.clone())
}

/// `7f640007` is 127.100.0.7; 32 hex digits are an IPv6 address.
fn addr_from_hex(hex: &str) -> Option<IpAddr> {
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    match hex.len() {
        8 => u32::from_str_radix(hex, 16)
            .ok()
            .map(|v| IpAddr::V4(v.into())),
        32 => u128::from_str_radix(hex, 16)
            .ok()
            .map(|v| IpAddr::V6(v.into())),
        _ => None,
    }
}

fn addr_to_hex(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{:08x}", u32::from(v4)),
        IpAddr::V6(v6) => format!("{:032x}", u128::from(v6)),
    }
}

fn addr_record(name: Name, ttl: u32, ip: IpAddr) -> Record {
    match ip {
        IpAddr::V4(v4) => Record::from_rdata(name, ttl, RData::A(A(v4))),
        IpAddr::V6(v6) => Record::from_rdata(name, ttl, RData::AAAA(AAAA(v6))),
    }
}

fn wants_addr(qtype: RecordType, ip: IpAddr) -> bool {
    matches!(
        (qtype, ip),
        (RecordType::A | RecordType::ANY, IpAddr::V4(_))
            | (RecordType::AAAA | RecordType::ANY, IpAddr::V6(_))
    )
}

/// Answers one DNS message from `zone`. `None`: send nothing (the input
/// was a response, or too short to hold a header).
pub fn respond(zone: &Zone, request: &[u8], transport: Transport) -> (Option<Vec<u8>>, Outcome) {
    let req = match Message::from_vec(request) {
        Ok(m) => m,
        Err(_) => {
            // A header we can read gets FORMERR; anything less, nothing.
            if request.len() < 12 || request[2] & 0x80 != 0 {
                return (None, Outcome::Dropped);
            }
            let id = u16::from_be_bytes([request[0], request[1]]);
            let msg = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
            return (msg.to_vec().ok(), Outcome::FormErr);
        }
    };
    if req.metadata.message_type != MessageType::Query {
        return (None, Outcome::Dropped);
    }
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.checking_disabled = req.metadata.checking_disabled;
    let limit = match (&req.edns, transport) {
        (_, Transport::Tcp) => u16::MAX as usize,
        (Some(e), Transport::Udp) => {
            (e.max_payload().min(MAX_UDP_PAYLOAD) as usize).max(CLASSIC_UDP_PAYLOAD)
        }
        (None, Transport::Udp) => CLASSIC_UDP_PAYLOAD,
    };
    if req.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(MAX_UDP_PAYLOAD);
        resp.set_edns(e);
    }
    let outcome = fill(zone, &req, &mut resp);
    let Ok(mut bytes) = resp.to_vec() else {
        let msg = Message::error_msg(
            req.metadata.id,
            req.metadata.op_code,
            ResponseCode::ServFail,
        );
        return (msg.to_vec().ok(), outcome);
    };
    if bytes.len() > limit {
        // The client asks again over TCP.
        let mut short = resp.truncate();
        short.metadata.id = req.metadata.id;
        if let Ok(b) = short.to_vec() {
            bytes = b;
        }
    }
    (Some(bytes), outcome)
}

/// Puts the answer to `req` into `resp` and says what it was.
fn fill(zone: &Zone, req: &Message, resp: &mut Message) -> Outcome {
    if req.metadata.op_code != OpCode::Query {
        resp.metadata.response_code = ResponseCode::NotImp;
        return Outcome::NotImp;
    }
    let [q] = req.queries.as_slice() else {
        resp.metadata.response_code = ResponseCode::FormErr;
        return Outcome::FormErr;
    };
    resp.add_query(q.clone());
    if q.query_class() != DNSClass::IN {
        resp.metadata.response_code = ResponseCode::Refused;
        return Outcome::Refused;
    }
    let qname = q.name();
    let mut text = qname.to_lowercase().to_ascii();
    if text.ends_with('.') {
        text.pop();
    }
    let qtype = q.query_type();
    let ttl = zone.ttl;
    let entry = match zone.lookup(&text) {
        Lookup::Outside => {
            resp.metadata.response_code = ResponseCode::Refused;
            return Outcome::Refused;
        }
        Lookup::Missing => {
            resp.metadata.authoritative = true;
            resp.metadata.response_code = ResponseCode::NXDomain;
            resp.add_authority(zone.soa.clone());
            return Outcome::NxDomain;
        }
        Lookup::Apex => {
            resp.metadata.authoritative = true;
            if matches!(qtype, RecordType::SOA | RecordType::ANY) {
                resp.add_answer(zone.soa.clone());
                return Outcome::Answer;
            }
            resp.add_authority(zone.soa.clone());
            return Outcome::NoData;
        }
        Lookup::Addr(ip) => {
            resp.metadata.authoritative = true;
            if wants_addr(qtype, ip) {
                resp.add_answer(addr_record(qname.clone(), ttl, ip));
                return Outcome::Answer;
            }
            resp.add_authority(zone.soa.clone());
            return Outcome::NoData;
        }
        Lookup::Entry(e) => e,
    };
    resp.metadata.authoritative = true;
    match qtype {
        RecordType::SRV => {
            for &(port, ip) in &entry.srv {
                let target = child(&zone.apex, &format!("{}.addr", addr_to_hex(ip)));
                resp.add_answer(Record::from_rdata(
                    qname.clone(),
                    ttl,
                    RData::SRV(SRV::new(1, 1, port, target.clone())),
                ));
                resp.add_additional(addr_record(target, ttl, ip));
            }
        }
        _ => {
            for &ip in &entry.addrs {
                if wants_addr(qtype, ip) {
                    resp.add_answer(addr_record(qname.clone(), ttl, ip));
                }
            }
        }
    }
    if resp.answers.is_empty() {
        resp.add_authority(zone.soa.clone());
        Outcome::NoData
    } else {
        Outcome::Answer
    }
}

#[cfg(test)]
mod tests;
