//! Traces: a span per proxied connection or request at every node it
//! crosses, exported over OTLP/HTTP (protobuf) to `[telemetry]
//! otlp_endpoint` (ARCHITECTURE.md, "Traces").
//!
//! The spans of one call join one trace through W3C trace context: HTTP
//! requests carry `traceparent` (each traced hop puts its own span as the
//! parent), and every tunnel stream of a traced call carries the same ids
//! in its header (`TraceContext`), so L4 connections and end-to-end
//! streams through gateways, whose bytes the gateways cannot read, are
//! traced too.
//!
//! The data path hands a finished [`SpanRecord`] to [`Tracer::export`],
//! which never waits: a bounded queue feeds one task that sends batches
//! (at most 512 spans, or what came within 500 ms) as an OTLP
//! `ExportTraceServiceRequest` (the protocol's own generated messages,
//! `opentelemetry-proto`) over a fresh HTTP/1.1 connection. A full queue
//! or a failed export drops spans and counts them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use meshnode_transport::tunnel::TraceContext;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span, status, ResourceSpans, ScopeSpans, Span, Status,
};
use prost::Message;
use rand::RngExt;
use tokio::sync::mpsc;

use crate::metrics::LogLimit;

pub const SPANS_EXPORTED: &str = "meshnode_trace_spans_exported_total";
pub const SPANS_DROPPED: &str = "meshnode_trace_spans_dropped_total";

/// Spans waiting for the exporter; more are dropped.
const QUEUE: usize = 4096;
/// Spans per export request.
const BATCH: usize = 512;
/// How long a span may wait for its batch to fill.
const LINGER: Duration = Duration::from_millis(500);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

static EXPORT_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));

pub fn describe() {
    metrics::describe_counter!(SPANS_EXPORTED, "Trace spans the OTLP collector accepted");
    metrics::describe_counter!(
        SPANS_DROPPED,
        "Trace spans dropped, by reason (queue_full, export_failed)"
    );
}

/// What a span stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The caller's node: a request or connection sent for an application.
    Client,
    /// The destination's node: served to an application.
    Server,
    /// A gateway relaying a stream.
    Internal,
}

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
}

/// One finished span.
#[derive(Clone, Debug)]
pub struct SpanRecord {
    pub context: TraceContext,
    /// This span's id (the context's `parent_id` is the span's parent).
    pub span_id: [u8; 8],
    /// No parent: the span starts the trace.
    pub root: bool,
    pub name: String,
    pub kind: Kind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub error: bool,
    pub attributes: Vec<(&'static str, Value)>,
}

/// The attributes of every span at a caller's node: what it sent where,
/// acting as which service, and how it ended.
pub fn caller_attributes(
    service: &str,
    as_service: Option<&str>,
    cluster: &str,
    result: &str,
) -> Vec<(&'static str, Value)> {
    vec![
        ("meshnode.direction", Value::Str("out".into())),
        ("meshnode.service", Value::Str(service.into())),
        (
            "meshnode.source_service",
            Value::Str(as_service.unwrap_or("-").into()),
        ),
        ("meshnode.cluster", Value::Str(cluster.into())),
        ("meshnode.result", Value::Str(result.into())),
    ]
}

/// A random span id (never all zero).
pub fn span_id() -> [u8; 8] {
    rand::rng().random::<u64>().max(1).to_be_bytes()
}

/// A random trace id (never all zero).
pub fn trace_id() -> [u8; 16] {
    rand::rng().random::<u128>().max(1).to_be_bytes()
}

/// A new trace, sampled, with `parent` as the first hop's span.
pub fn new_trace(parent: [u8; 8]) -> TraceContext {
    TraceContext {
        trace_id: trace_id(),
        parent_id: parent,
        flags: 1,
    }
}

/// The ids of a valid W3C `traceparent` (`00-<trace>-<parent>-<flags>`).
pub fn parse_traceparent(v: &str) -> Option<TraceContext> {
    if !crate::http::valid_traceparent(v) {
        return None;
    }
    let hex = |s: &str| -> Option<Vec<u8>> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
            .collect()
    };
    Some(TraceContext {
        trace_id: hex(v.get(3..35)?)?.try_into().ok()?,
        parent_id: hex(v.get(36..52)?)?.try_into().ok()?,
        flags: *hex(v.get(53..55)?)?.first()?,
    })
}

/// Lower-case hex, as W3C ids are written.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// `context` as a `traceparent` value.
pub fn traceparent(context: &TraceContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        hex(&context.trace_id),
        hex(&context.parent_id),
        context.flags
    )
}

/// The OTLP endpoint's traces URL: `otlp_endpoint` plus `/v1/traces`.
pub fn traces_url(endpoint: &str) -> Result<Uri, String> {
    let uri: Uri = endpoint
        .parse()
        .map_err(|e| format!("{endpoint:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "{endpoint:?}: use an http:// URL of an OTLP/HTTP collector (https is not supported yet; run a local collector)"
        ));
    }
    let Some(authority) = uri.authority() else {
        return Err(format!("{endpoint:?} names no host"));
    };
    if authority.port_u16().is_none() {
        return Err(format!(
            "{endpoint:?} names no port (OTLP/HTTP listens on 4318)"
        ));
    }
    if uri.query().is_some() {
        return Err(format!("{endpoint:?}: no query, please"));
    }
    let base = uri.path().trim_end_matches('/');
    format!("http://{authority}{base}/v1/traces")
        .parse()
        .map_err(|e| format!("{endpoint:?}: {e}"))
}

/// The spans of one node.
#[derive(Clone)]
pub struct Tracer {
    tx: Option<mpsc::Sender<SpanRecord>>,
}

impl Tracer {
    /// Exports nothing; [`Tracer::enabled`] is false.
    pub fn disabled() -> Self {
        Tracer { tx: None }
    }

    /// Starts the exporter task (call inside the runtime).
    pub fn start(url: Uri, node: &str, cluster: &str) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let resource = Resource {
            attributes: vec![
                attr("service.name", Value::Str("meshnode".into())),
                attr(
                    "service.instance.id",
                    Value::Str(format!("{node}.{cluster}")),
                ),
                attr("meshnode.node", Value::Str(node.into())),
                attr("meshnode.cluster", Value::Str(cluster.into())),
            ],
            ..Default::default()
        };
        tokio::spawn(run(rx, url, resource));
        Tracer { tx: Some(tx) }
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Hands a finished span to the exporter; never waits. Unsampled
    /// traces (flags bit 0 clear) are not exported.
    pub fn export(&self, span: SpanRecord) {
        let Some(tx) = &self.tx else {
            return;
        };
        if span.context.flags & 1 == 0 {
            return;
        }
        if tx.try_send(span).is_err() {
            metrics::counter!(SPANS_DROPPED, "reason" => "queue_full").increment(1);
        }
    }
}

fn attr(key: &str, v: Value) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(match v {
                Value::Str(s) => any_value::Value::StringValue(s),
                Value::Int(i) => any_value::Value::IntValue(i),
            }),
        }),
        ..Default::default()
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A span record as OTLP's message.
pub fn to_proto(s: SpanRecord) -> Span {
    Span {
        trace_id: s.context.trace_id.to_vec(),
        span_id: s.span_id.to_vec(),
        parent_span_id: if s.root {
            Vec::new()
        } else {
            s.context.parent_id.to_vec()
        },
        flags: u32::from(s.context.flags),
        name: s.name,
        kind: match s.kind {
            Kind::Client => span::SpanKind::Client,
            Kind::Server => span::SpanKind::Server,
            Kind::Internal => span::SpanKind::Internal,
        } as i32,
        start_time_unix_nano: nanos(s.start),
        end_time_unix_nano: nanos(s.end).max(nanos(s.start)),
        attributes: s.attributes.into_iter().map(|(k, v)| attr(k, v)).collect(),
        status: Some(Status {
            message: String::new(),
            code: if s.error {
                status::StatusCode::Error
            } else {
                status::StatusCode::Unset
            } as i32,
        }),
        ..Default::default()
    }
}

async fn run(mut rx: mpsc::Receiver<SpanRecord>, url: Uri, resource: Resource) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let until = tokio::time::sleep(LINGER);
        tokio::pin!(until);
        while batch.len() < BATCH {
            tokio::select! {
                next = rx.recv() => match next {
                    Some(s) => batch.push(s),
                    None => break,
                },
                () = &mut until => break,
            }
        }
        let n = batch.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "meshnode".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans: batch.into_iter().map(to_proto).collect(),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        let body = Bytes::from(request.encode_to_vec());
        match tokio::time::timeout(EXPORT_TIMEOUT, post(&url, body)).await {
            Ok(Ok(())) => metrics::counter!(SPANS_EXPORTED).increment(n),
            Ok(Err(e)) => failed(n, &url, &e),
            Err(_) => failed(n, &url, "timed out"),
        }
    }
}

fn failed(n: u64, url: &Uri, why: &str) {
    metrics::counter!(SPANS_DROPPED, "reason" => "export_failed").increment(n);
    if EXPORT_LOG.allow() {
        tracing::warn!(%url, error = why, spans = n, "OTLP trace export failed; spans dropped (logged at most once per 10 s)");
    }
}

async fn post(url: &Uri, body: Bytes) -> Result<(), String> {
    let authority = url.authority().ok_or("no host")?.clone();
    let port = authority.port_u16().unwrap_or(80);
    let tcp = tokio::net::TcpStream::connect((authority.host(), port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::post(url.path())
        .header(hyper::header::HOST, authority.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    // Read the answer so the connection ends cleanly.
    let _ = resp.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the collector answered {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_bad_ones_are_none() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = parse_traceparent(v).expect("valid");
        assert_eq!(c.flags, 1);
        assert_eq!(c.parent_id, 0x00f067aa0ba902b7u64.to_be_bytes());
        assert_eq!(traceparent(&c), v);
        // What `valid_traceparent` refuses (tested beside it) is none.
        assert_eq!(parse_traceparent(&v.replace("-01", "-0g")), None);
        // A later version may carry more fields: the ids are read alone.
        let later = format!("01{}-more", &v[2..]);
        assert_eq!(
            parse_traceparent(&later).map(|c| c.parent_id),
            Some(c.parent_id)
        );
    }

    #[test]
    fn endpoints_are_checked_and_get_the_traces_path() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318").unwrap().to_string(),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/otlp/")
                .unwrap()
                .to_string(),
            "http://collector:4318/otlp/v1/traces"
        );
        for bad in [
            "https://x:4318",
            "127.0.0.1:4318",
            "http://x",
            "not a url",
            "http://x:1/?a=b",
        ] {
            assert!(traces_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_root_span_has_no_parent_and_an_error_status() {
        let c = new_trace(span_id());
        let s = to_proto(SpanRecord {
            context: c,
            span_id: c.parent_id,
            root: true,
            name: "tcp api".into(),
            kind: Kind::Client,
            start: UNIX_EPOCH + Duration::from_secs(10),
            end: UNIX_EPOCH + Duration::from_secs(9),
            error: true,
            attributes: vec![("meshnode.result", Value::Str("peer_abort".into()))],
        });
        assert!(s.parent_span_id.is_empty());
        assert_eq!(s.span_id, c.parent_id.to_vec());
        assert_eq!(
            s.end_time_unix_nano, s.start_time_unix_nano,
            "never ends before it starts"
        );
        assert_eq!(
            s.status.map(|x| x.code),
            Some(status::StatusCode::Error as i32)
        );
        assert_eq!(s.kind, span::SpanKind::Client as i32);
    }
}
