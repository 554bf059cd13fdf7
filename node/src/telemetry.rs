//! Golden metrics by caller and callee, the table `meshnode top` reads,
//! and the access log (ARCHITECTURE.md, "Telemetry").
//!
//! Every proxied connection (L4) and request (HTTP) is recorded once at
//! the caller's node (`out`) and once at the destination's (`in`), by who
//! called whom: the source's service and cluster, the destination's
//! service and cluster. One record feeds three things:
//!
//! - the Prometheus series (`meshnode_requests_total`,
//!   `meshnode_request_duration_seconds`, `meshnode_connections_total`,
//!   `meshnode_connection_duration_seconds`, `meshnode_connection_bytes_total`),
//!   whose handles a pair registers once, so a request costs atomics, not
//!   registry lookups;
//! - the same counts in [`Table`], which `GET /v1/top` serves and
//!   `meshnode top` turns into rates and latencies;
//! - the access log: one line per connection or request, decided by the
//!   sans-IO [`Sampler`] (errors and denials always, the rest at most
//!   `access_log_rate` lines a second), handed to a writer thread through
//!   a bounded queue that never blocks the data path (a full queue drops
//!   the line and counts it).
//!
//! Labels come partly from the network (the caller's service and
//! cluster): they pass the process's [`LabelGuard`](crate::metrics::LabelGuard),
//! and the table holds at most [`MAX_PAIRS`] pairs, the rest folded into
//! one `other` pair.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::metrics::{LABELS, OTHER};

pub const REQUESTS: &str = "meshnode_requests_total";
pub const REQUEST_SECONDS: &str = "meshnode_request_duration_seconds";
pub const CONNECTIONS: &str = "meshnode_connections_total";
pub const CONNECTION_SECONDS: &str = "meshnode_connection_duration_seconds";
pub const CONNECTION_BYTES: &str = "meshnode_connection_bytes_total";
pub const REQUEST_BYTES: &str = "meshnode_request_bytes_total";
pub const ACCESS_LINES: &str = "meshnode_access_log_lines_total";
pub const ACCESS_DROPPED: &str = "meshnode_access_log_dropped_total";

/// Pairs the table (and the golden series) keep; more fold into `other`.
pub const MAX_PAIRS: usize = 1024;
/// Access lines waiting for the writer; more are dropped and counted.
/// tokio's queue grows in blocks of 32 as lines wait (std's `sync_channel`
/// allocated and touched every slot up front: 1.2 MiB of each node's RSS
/// for a queue that is almost always empty).
const ACCESS_QUEUE: usize = 4096;

/// Upper bounds (seconds) of the latency buckets `top` reads: the same
/// as the Prometheus histograms' (`metrics::install`).
pub const LATENCY_BOUNDS: [f64; 12] = crate::metrics::LATENCY_BUCKETS;

pub fn describe() {
    use metrics::{describe_counter, describe_histogram, Unit};
    describe_counter!(
        REQUESTS,
        "HTTP requests by direction (out: at the caller's node, in: at the destination's), source service and cluster, destination service and cluster, and result (a status class 2xx..5xx, or the mesh's refusal)"
    );
    describe_histogram!(
        REQUEST_SECONDS,
        Unit::Seconds,
        "HTTP request latency to the response head, by direction, source and destination"
    );
    describe_counter!(
        CONNECTIONS,
        "Proxied TCP connections by direction, source service and cluster, destination service and cluster, and result (ok, local_abort, peer_abort, or the mesh's refusal)"
    );
    describe_histogram!(
        CONNECTION_SECONDS,
        Unit::Seconds,
        "Lifetime of proxied TCP connections, by direction, source and destination"
    );
    describe_counter!(
        CONNECTION_BYTES,
        Unit::Bytes,
        "Bytes of proxied TCP connections by direction, source, destination and flow (sent: from the source, received: to it)"
    );
    describe_counter!(
        REQUEST_BYTES,
        Unit::Bytes,
        "HTTP body bytes at the caller's node by direction, source, destination and flow (sent: request bodies, received: response bodies), counted when the response body ends"
    );
    describe_counter!(
        ACCESS_LINES,
        "Access log lines written, by reason (sampled, error, all)"
    );
    describe_counter!(
        ACCESS_DROPPED,
        "Access log lines dropped because the writer fell behind"
    );
}

/// Where a record was taken: at the caller's node or the destination's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Out,
    In,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Out => "out",
            Direction::In => "in",
        }
    }
}

/// What was proxied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Tcp,
    Http,
}

/// Who called whom, as bounded label values. `-` is a source that acts as
/// no service (the node alone).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct PairKey {
    pub direction: Direction,
    pub kind: Kind,
    pub source_service: Arc<str>,
    pub source_cluster: Arc<str>,
    pub destination_service: Arc<str>,
    pub destination_cluster: Arc<str>,
}

impl PairKey {
    /// A pair from raw names, each through the label guard (`known`: the
    /// source's names are vouched for, e.g. by its certificate).
    pub fn new(
        direction: Direction,
        kind: Kind,
        source: (Option<&str>, &str),
        destination: (&str, &str),
    ) -> Self {
        let label = |l: &'static str, v: &str| -> Arc<str> { Arc::from(LABELS.value(l, v, true)) };
        PairKey {
            direction,
            kind,
            source_service: source
                .0
                .map_or_else(|| Arc::from("-"), |s| label("source_service", s)),
            source_cluster: label("cluster", source.1),
            destination_service: label("service", destination.0),
            destination_cluster: label("cluster", destination.1),
        }
    }

    fn other(direction: Direction, kind: Kind) -> Self {
        let o: Arc<str> = Arc::from(OTHER);
        PairKey {
            direction,
            kind,
            source_service: o.clone(),
            source_cluster: o.clone(),
            destination_service: o.clone(),
            destination_cluster: o,
        }
    }

    fn labels(&self) -> Vec<metrics::Label> {
        vec![
            metrics::Label::new("direction", self.direction.as_str()),
            metrics::Label::new("source_service", self.source_service.to_string()),
            metrics::Label::new("source_cluster", self.source_cluster.to_string()),
            metrics::Label::new("destination_service", self.destination_service.to_string()),
            metrics::Label::new("destination_cluster", self.destination_cluster.to_string()),
        ]
    }
}

/// Results a pair counts by; anything else is counted as `other`.
pub const RESULTS: [&str; 22] = [
    "1xx",
    "2xx",
    "3xx",
    "4xx",
    "5xx",
    "ok",
    "local_abort",
    "peer_abort",
    "denied",
    "no_instance",
    "failed",
    "timeout",
    "breaker_open",
    "rate_limited",
    "fault",
    "bad_path",
    "bad_request",
    "exchange_failed",
    "app_failed",
    "connect_failed",
    "policy_pending",
    "other",
];

/// One pair's counts (what `top` reads) and its registered series.
pub struct PairStats {
    key: PairKey,
    /// Requests (HTTP) or connections (TCP) ended.
    total: AtomicU64,
    /// Of those, errors: a 5xx, a mesh refusal, an aborted connection.
    errors: AtomicU64,
    /// Bytes from the source, and to it (TCP).
    sent: AtomicU64,
    received: AtomicU64,
    /// Latencies (HTTP) or lifetimes (TCP) in [`LATENCY_BOUNDS`] buckets,
    /// the last for anything above.
    buckets: [AtomicU64; 13],
    results: [OnceLock<metrics::Counter>; RESULTS.len()],
    seconds: metrics::Histogram,
    bytes: OnceLock<(metrics::Counter, metrics::Counter)>,
}

impl PairStats {
    fn new(key: PairKey) -> Self {
        let seconds = match key.kind {
            Kind::Http => metrics::histogram!(REQUEST_SECONDS, key.labels()),
            Kind::Tcp => metrics::histogram!(CONNECTION_SECONDS, key.labels()),
        };
        PairStats {
            key,
            total: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            buckets: Default::default(),
            results: Default::default(),
            seconds,
            bytes: OnceLock::new(),
        }
    }

    pub fn key(&self) -> &PairKey {
        &self.key
    }

    /// One ended request or connection: its result, whether that is an
    /// error, how long it took, and (TCP) its bytes from and to the source.
    pub fn record(&self, result: &str, error: bool, took: Duration, bytes: Option<(u64, u64)>) {
        self.total.fetch_add(1, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let secs = took.as_secs_f64();
        let b = LATENCY_BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[b].fetch_add(1, Ordering::Relaxed);
        self.seconds.record(secs);
        let i = RESULTS
            .iter()
            .position(|r| *r == result)
            .unwrap_or(RESULTS.len() - 1);
        self.results[i]
            .get_or_init(|| {
                let mut labels = self.key.labels();
                labels.push(metrics::Label::new("result", RESULTS[i]));
                match self.key.kind {
                    Kind::Http => metrics::counter!(REQUESTS, labels),
                    Kind::Tcp => metrics::counter!(CONNECTIONS, labels),
                }
            })
            .increment(1);
        if let Some((sent, received)) = bytes {
            self.add_bytes(sent, received);
        }
    }

    /// Bytes from the source and to it: a TCP connection's, or an HTTP
    /// exchange's bodies once the response body ended.
    pub fn add_bytes(&self, sent: u64, received: u64) {
        self.sent.fetch_add(sent, Ordering::Relaxed);
        self.received.fetch_add(received, Ordering::Relaxed);
        let (s, r) = self.bytes.get_or_init(|| {
            let with = |flow: &'static str| {
                let mut labels = self.key.labels();
                labels.push(metrics::Label::new("flow", flow));
                match self.key.kind {
                    Kind::Http => metrics::counter!(REQUEST_BYTES, labels),
                    Kind::Tcp => metrics::counter!(CONNECTION_BYTES, labels),
                }
            };
            (with("sent"), with("received"))
        });
        s.increment(sent);
        r.increment(received);
    }

    fn snapshot(&self) -> PairSnapshot {
        PairSnapshot {
            pair: self.key.clone(),
            total: self.total.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            bytes_sent: self.sent.load(Ordering::Relaxed),
            bytes_received: self.received.load(Ordering::Relaxed),
            latency_buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

/// One pair's cumulative counts, as `GET /v1/top` serves them.
#[derive(Clone, Debug, Serialize)]
pub struct PairSnapshot {
    #[serde(flatten)]
    pub pair: PairKey,
    pub total: u64,
    pub errors: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Counts per bucket of [`LATENCY_BOUNDS`], then one for above.
    pub latency_buckets: Vec<u64>,
}

/// What `GET /v1/top` answers.
#[derive(Clone, Debug, Serialize)]
pub struct TopSnapshot {
    pub node: String,
    /// Milliseconds since this node started counting, so a client can
    /// turn two snapshots into rates.
    pub uptime_ms: u64,
    pub latency_bounds: Vec<f64>,
    pub pairs: Vec<PairSnapshot>,
}

/// The pairs of this node.
pub struct Table {
    pairs: Mutex<HashMap<PairKey, Arc<PairStats>>>,
    max: usize,
}

impl Table {
    pub fn new(max: usize) -> Self {
        Table {
            pairs: Mutex::new(HashMap::new()),
            max,
        }
    }

    /// The pair's stats, registered on first use; past the limit, the
    /// shared `other` pair of its direction and kind.
    pub fn pair(&self, key: PairKey) -> Arc<PairStats> {
        let mut pairs = self.pairs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = pairs.get(&key) {
            return p.clone();
        }
        let key = if pairs.len() >= self.max {
            PairKey::other(key.direction, key.kind)
        } else {
            key
        };
        pairs
            .entry(key.clone())
            .or_insert_with(|| Arc::new(PairStats::new(key)))
            .clone()
    }

    pub fn snapshot(&self) -> Vec<PairSnapshot> {
        let pairs = self.pairs.lock().unwrap_or_else(|e| e.into_inner());
        pairs.values().map(|p| p.snapshot()).collect()
    }
}

/// How much of the access log is written (`[telemetry] access_log`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessMode {
    Off,
    /// Errors and denials always, the rest at most the rate.
    Sampled,
    All,
}

/// Whether one connection or request gets an access line: sans-IO, time
/// as an argument. A token bucket of `rate` lines a second (burst: one
/// second's worth) for lines that are not errors.
#[derive(Clone, Debug)]
pub struct Sampler {
    mode: AccessMode,
    rate: f64,
    tokens: f64,
    last: Option<Instant>,
}

/// Why a line is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    All = 0,
    Error = 1,
    Sampled = 2,
}

impl Why {
    fn as_str(self) -> &'static str {
        match self {
            Why::All => "all",
            Why::Error => "error",
            Why::Sampled => "sampled",
        }
    }
}

impl Sampler {
    pub fn new(mode: AccessMode, rate: u32) -> Self {
        Sampler {
            mode,
            rate: f64::from(rate),
            tokens: f64::from(rate),
            last: None,
        }
    }

    pub fn admit(&mut self, now: Instant, error: bool) -> Option<Why> {
        match self.mode {
            AccessMode::Off => None,
            AccessMode::All => Some(Why::All),
            AccessMode::Sampled if error => Some(Why::Error),
            AccessMode::Sampled => {
                if let Some(last) = self.last {
                    let dt = now.saturating_duration_since(last).as_secs_f64();
                    self.tokens = (self.tokens + dt * self.rate).min(self.rate.max(1.0));
                }
                self.last = Some(now);
                if self.tokens >= 1.0 {
                    self.tokens -= 1.0;
                    Some(Why::Sampled)
                } else {
                    None
                }
            }
        }
    }
}

/// One access line.
#[derive(Clone, Debug, Default)]
pub struct Access {
    pub direction: &'static str,
    pub kind: &'static str,
    /// The caller's identity (SPIFFE), and the service it acts as.
    pub source: String,
    pub source_service: String,
    pub service: String,
    pub cluster: String,
    /// The node (or gateway and cluster) that served it.
    pub instance: String,
    pub method: String,
    pub path: String,
    /// A status class or code (HTTP), or how the connection ended.
    pub result: String,
    pub status: u16,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration: Duration,
    pub trace_id: String,
}

/// The access log of a node: the sampler, and the queue to its writer.
pub struct AccessLog {
    sampler: Mutex<Sampler>,
    queue: Option<tokio::sync::mpsc::Sender<(Why, Access)>>,
}

impl AccessLog {
    /// Starts the writer thread unless `mode` is off.
    pub fn start(mode: AccessMode, rate: u32) -> Self {
        let queue = (mode != AccessMode::Off).then(|| {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<(Why, Access)>(ACCESS_QUEUE);
            let spawned = std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || {
                    // Registered once, not looked up per line.
                    let lines = [Why::All, Why::Error, Why::Sampled]
                        .map(|w| metrics::counter!(ACCESS_LINES, "reason" => w.as_str()));
                    while let Some((why, a)) = rx.blocking_recv() {
                        lines[why as usize].increment(1);
                        write(why, &a);
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the access log writer; no access lines");
            }
            tx
        });
        AccessLog {
            sampler: Mutex::new(Sampler::new(mode, rate)),
            queue,
        }
    }

    /// Whether a line would be written now; `build` makes it only then.
    pub fn log(&self, error: bool, build: impl FnOnce() -> Access) {
        let Some(queue) = &self.queue else {
            return;
        };
        let now = meshnode_transport::clock::now();
        let why = self
            .sampler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(now, error);
        let Some(why) = why else {
            return;
        };
        match queue.try_send((why, build())) {
            Ok(()) => {}
            Err(_) => {
                metrics::counter!(ACCESS_DROPPED).increment(1);
            }
        }
    }
}

fn write(why: Why, a: &Access) {
    let ms = a.duration.as_secs_f64() * 1000.0;
    tracing::info!(
        target: "meshnode::access",
        direction = a.direction,
        kind = a.kind,
        source = %a.source,
        source_service = %a.source_service,
        service = %a.service,
        cluster = %a.cluster,
        instance = %a.instance,
        method = %a.method,
        path = %a.path,
        result = %a.result,
        status = a.status,
        bytes_sent = a.bytes_sent,
        bytes_received = a.bytes_received,
        duration_ms = format_args!("{ms:.3}"),
        trace_id = %a.trace_id,
        why = why.as_str(),
        "access"
    );
}

/// A node's telemetry: the pairs and the access log.
pub struct Telemetry {
    pub node: String,
    pub cluster: String,
    /// This node's identity, the source of what it sends.
    pub identity: String,
    pub table: Table,
    pub access: AccessLog,
    /// Trace spans (disabled unless `otlp_endpoint` is set).
    pub tracer: crate::trace::Tracer,
    /// The caller side's pairs by destination service, then by kind,
    /// service acted as and destination cluster: found per request
    /// without building a key (upstreams and clusters are few).
    out: Mutex<HashMap<String, Vec<OutPair>>>,
    born: Instant,
}

struct OutPair {
    kind: Kind,
    as_service: Option<String>,
    cluster: String,
    stats: Arc<PairStats>,
}

impl Telemetry {
    pub fn new(node: &str, cluster: &str, mode: AccessMode, rate: u32) -> Self {
        Telemetry {
            node: node.to_string(),
            cluster: cluster.to_string(),
            identity: format!("{node}.{cluster}"),
            table: Table::new(MAX_PAIRS),
            access: AccessLog::start(mode, rate),
            tracer: crate::trace::Tracer::disabled(),
            out: Mutex::new(HashMap::new()),
            born: meshnode_transport::clock::now(),
        }
    }

    /// Exports spans through `tracer`.
    pub fn with_tracer(mut self, tracer: crate::trace::Tracer) -> Self {
        self.tracer = tracer;
        self
    }

    /// Names this node's identity in its access lines.
    pub fn with_identity(mut self, identity: String) -> Self {
        self.identity = identity;
        self
    }

    /// The pair of what this node sends to `service` in `cluster` (`-`:
    /// it did not get there) acting as `as_service`.
    pub fn out_pair(
        &self,
        kind: Kind,
        as_service: Option<&str>,
        service: &str,
        cluster: &str,
    ) -> Arc<PairStats> {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = out.get(service).and_then(|v| {
            v.iter().find(|p| {
                p.kind == kind && p.as_service.as_deref() == as_service && p.cluster == cluster
            })
        }) {
            return p.stats.clone();
        }
        let stats = self.table.pair(PairKey::new(
            Direction::Out,
            kind,
            (as_service, &self.cluster),
            (service, cluster),
        ));
        if out.values().map(Vec::len).sum::<usize>() < MAX_PAIRS {
            out.entry(service.to_string()).or_default().push(OutPair {
                kind,
                as_service: as_service.map(str::to_string),
                cluster: cluster.to_string(),
                stats: stats.clone(),
            });
        }
        stats
    }

    /// The pair of what this node serves to a caller.
    pub fn in_pair(
        &self,
        kind: Kind,
        source: (Option<&str>, &str),
        service: &str,
    ) -> Arc<PairStats> {
        self.table.pair(PairKey::new(
            Direction::In,
            kind,
            source,
            (service, &self.cluster),
        ))
    }

    /// A node that writes no access log (tests, tools).
    pub fn quiet(node: &str, cluster: &str) -> Self {
        Self::new(node, cluster, AccessMode::Off, 0)
    }

    pub fn top(&self) -> TopSnapshot {
        let mut pairs = self.table.snapshot();
        pairs.sort_by_key(|p| std::cmp::Reverse(p.total));
        TopSnapshot {
            node: self.node.clone(),
            uptime_ms: meshnode_transport::clock::since(self.born).as_millis() as u64,
            latency_bounds: LATENCY_BOUNDS.to_vec(),
            pairs,
        }
    }
}

/// The trace id of a W3C `traceparent` (already checked valid), or empty.
pub fn trace_id(traceparent: Option<&hyper::header::HeaderValue>) -> String {
    traceparent
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.get(3..35))
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampled_mode_passes_every_error_and_at_most_the_rate_of_the_rest() {
        let t0 = meshnode_transport::clock::now();
        let mut s = Sampler::new(AccessMode::Sampled, 100);
        // 10,000 requests over 10 s, one in ten an error.
        let mut sampled = 0;
        let mut errors = 0;
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_millis(i);
            match s.admit(now, i % 10 == 0) {
                Some(Why::Error) => errors += 1,
                Some(Why::Sampled) => sampled += 1,
                _ => {}
            }
        }
        assert_eq!(errors, 1_000, "every error");
        // One second's burst, then 100 a second for the remaining ~10 s.
        assert!((1_000..=1_101).contains(&sampled), "{sampled}");
        let mut all = Sampler::new(AccessMode::All, 1);
        assert!((0..1000).all(|_| all.admit(t0, false) == Some(Why::All)));
        let mut off = Sampler::new(AccessMode::Off, 1000);
        assert_eq!(off.admit(t0, true), None);
    }

    #[test]
    fn a_quiet_sampler_refills_only_up_to_one_second() {
        let t0 = meshnode_transport::clock::now();
        let mut s = Sampler::new(AccessMode::Sampled, 10);
        let later = t0 + Duration::from_secs(3600);
        s.admit(t0, false);
        let n = (0..100).filter(|_| s.admit(later, false).is_some()).count();
        assert_eq!(n, 10);
    }

    #[test]
    fn pairs_are_bounded_and_count_into_buckets() {
        let t = Table::new(2);
        let key = |s: &str| {
            PairKey::new(
                Direction::In,
                Kind::Http,
                (Some(s), "east"),
                ("api", "east"),
            )
        };
        let a = t.pair(key("web"));
        a.record("2xx", false, Duration::from_micros(300), None);
        a.record("5xx", true, Duration::from_secs(9), None);
        assert!(Arc::ptr_eq(&a, &t.pair(key("web"))));
        let _b = t.pair(key("batch"));
        let c = t.pair(key("third"));
        assert_eq!(&*c.key().source_service, OTHER, "past the limit");
        let d = t.pair(key("fourth"));
        assert!(Arc::ptr_eq(&c, &d), "one shared other pair");
        let snap = a.snapshot();
        assert_eq!((snap.total, snap.errors), (2, 1));
        assert_eq!(snap.latency_buckets.iter().sum::<u64>(), 2);
        assert_eq!(snap.latency_buckets[2], 1, "300 us is in the 500 us bucket");
        assert_eq!(snap.latency_buckets[12], 1, "9 s is above every bound");
    }
}
