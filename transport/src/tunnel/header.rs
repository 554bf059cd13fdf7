//! The tunnel header codec: pure functions on bytes.
//!
//! Layout: `u16` big-endian body length, then the body: bincode of
//! [`WireHeader`], whose enum tag is the protocol version.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};
use crate::pki::{check_name, Identity};

/// Hard cap on the header body. Anything longer is refused before it is read.
pub const MAX_HEADER_LEN: usize = 1024;
const MAX_SERVICE_LEN: usize = 253;
const MAX_SUBSET_LEN: usize = 257;

/// What a caller asks of the receiving node: connect me to this service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Service name as registered on the receiving node.
    pub service: String,
    /// Port of the instance, telling apart several instances of one service on a
    /// node; [`ANY_PORT`] lets the receiver (a gateway) choose the instance.
    pub port: u16,
    /// The cluster the stream is for, when it crosses clusters through gateways.
    /// `None` means the receiver's own cluster.
    pub cluster: Option<String>,
    /// The original caller, carried by a gateway. Receivers accept it only from
    /// a peer holding a gateway certificate; otherwise the caller is the peer.
    pub caller: Option<Identity>,
    /// The service the caller acts as. From a caller directly, the receiver
    /// checks it against the caller's certificate; a gateway carries it with
    /// `caller`, after it checked it on the first hop.
    pub source_service: Option<String>,
    /// After the status, the stream carries an end-to-end TLS session
    /// between the caller and the destination node (see `tunnel::e2e`):
    /// the destination authorizes the identity proven there, and ignores
    /// `caller` and `source_service` here.
    pub end_to_end: bool,
    /// The stream carries one HTTP/1.1 request and its response (see
    /// ARCHITECTURE.md, "HTTP between nodes"): the destination serves it
    /// with its HTTP server and speaks the service's own protocol to the
    /// application.
    pub http: bool,
    /// The instances the caller's route chose, as a subset of tags
    /// (`key=value`, a tag, or absent: any). A receiver that picks the
    /// instance (a gateway, [`ANY_PORT`]) picks among these.
    pub subset: Option<String>,
    /// W3C trace context of the call the stream belongs to: its trace id
    /// and the sender's span (each traced hop puts its own), so the spans
    /// of a connection at every node it crosses join one trace. Sent only
    /// by nodes that export traces.
    pub trace: Option<TraceContext>,
}

/// The ids of a W3C `traceparent`, as a tunnel header carries them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The span of the hop that sent the stream on.
    pub parent_id: [u8; 8],
    /// W3C trace flags (bit 0: sampled).
    pub flags: u8,
}

impl Header {
    /// A header for an instance in the receiver's own cluster, with no carried caller.
    pub fn new(service: impl Into<String>, port: u16) -> Self {
        Self {
            service: service.into(),
            port,
            cluster: None,
            caller: None,
            source_service: None,
            end_to_end: false,
            http: false,
            subset: None,
            trace: None,
        }
    }
}

/// Header port meaning "any instance of the service".
pub const ANY_PORT: u16 = 0;

/// Version 1: no cluster, no carried caller.
#[derive(Serialize, Deserialize)]
struct HeaderV1 {
    service: String,
    port: u16,
}

/// Version 2: cluster and carried caller, no source service.
#[derive(Serialize, Deserialize)]
struct HeaderV2 {
    service: String,
    port: u16,
    cluster: Option<String>,
    caller: Option<Identity>,
}

/// Version 3: source service and end-to-end sessions, no HTTP.
#[derive(Serialize, Deserialize)]
struct HeaderV3 {
    service: String,
    port: u16,
    cluster: Option<String>,
    caller: Option<Identity>,
    source_service: Option<String>,
    end_to_end: bool,
}

/// Version 4: HTTP and subsets, no trace context.
#[derive(Serialize, Deserialize)]
struct HeaderV4 {
    service: String,
    port: u16,
    cluster: Option<String>,
    caller: Option<Identity>,
    source_service: Option<String>,
    end_to_end: bool,
    http: bool,
    subset: Option<String>,
}

/// The versioned envelope. New versions are new variants; old ones stay
/// decodable. Each header goes out in the oldest version that can carry
/// it, so nodes of older releases understand every stream that does not
/// use what they lack: V2 without a source service or a session, V3
/// without HTTP, V4 for HTTP requests, V5 for traced streams.
#[derive(Serialize, Deserialize)]
enum WireHeader {
    V1(HeaderV1),
    V2(HeaderV2),
    V3(HeaderV3),
    V4(HeaderV4),
    V5(Header),
}

/// The receiver's one-byte answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    /// The receiver hosts no such service instance.
    NoSuchService = 1,
    /// The receiver could not connect to the local application.
    ConnectFailed = 2,
    /// Authorization policy refused the caller.
    Forbidden = 3,
    /// The receiver is shutting down.
    Draining = 4,
    /// The destination's authorization policy (an intention, or the mesh's
    /// default) denies this caller the service. Not a fault of the instance:
    /// callers do not eject it, and do not try another (policy is mesh-wide).
    Denied = 5,
    /// The destination cannot decide yet: under default deny it has not
    /// loaded the mesh's policy since it started. Callers try another instance.
    PolicyPending = 6,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("tunnel header truncated")]
    Truncated,
    #[error("tunnel header of {0} bytes exceeds the {MAX_HEADER_LEN}-byte cap")]
    TooLarge(usize),
    #[error("malformed tunnel header: {0}")]
    Malformed(String),
    #[error("tunnel header names an invalid service {0:?}")]
    BadService(String),
    #[error("tunnel header names an invalid cluster {0:?}")]
    BadCluster(String),
    #[error("tunnel header names an invalid source service {0:?}")]
    BadSourceService(String),
    #[error("tunnel header names an invalid subset {0:?}")]
    BadSubset(String),
    #[error("tunnel header carries an invalid trace context (an all-zero id)")]
    BadTrace,
}

// === impl HeaderError ===

impl HeaderError {
    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            HeaderError::Truncated => "truncated",
            HeaderError::TooLarge(_) => "oversized",
            HeaderError::Malformed(_) => "malformed",
            HeaderError::BadService(_) => "bad_service",
            HeaderError::BadCluster(_) => "bad_cluster",
            HeaderError::BadSourceService(_) => "bad_source_service",
            HeaderError::BadSubset(_) => "bad_subset",
            HeaderError::BadTrace => "bad_trace",
        }
    }
}

// === impl Status ===

impl Status {
    pub fn from_u8(b: u8) -> Option<Status> {
        Some(match b {
            0 => Status::Ok,
            1 => Status::NoSuchService,
            2 => Status::ConnectFailed,
            3 => Status::Forbidden,
            4 => Status::Draining,
            5 => Status::Denied,
            6 => Status::PolicyPending,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::NoSuchService => "no_such_service",
            Status::ConnectFailed => "connect_failed",
            Status::Forbidden => "forbidden",
            Status::Draining => "draining",
            Status::Denied => "denied",
            Status::PolicyPending => "policy_pending",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn check_service(name: &str) -> Result<(), HeaderError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SERVICE_LEN
        && name.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(HeaderError::BadService(name.chars().take(64).collect()))
    }
}

fn check(h: &Header) -> Result<(), HeaderError> {
    check_service(&h.service)?;
    if let Some(c) = &h.cluster {
        check_name("cluster", c)
            .map_err(|_| HeaderError::BadCluster(c.chars().take(64).collect()))?;
    }
    if let Some(s) = &h.source_service {
        // Certificates name services by the node-name rule; so must callers.
        check_name("service", s)
            .map_err(|_| HeaderError::BadSourceService(s.chars().take(64).collect()))?;
    }
    if let Some(s) = &h.subset {
        let ok =
            !s.is_empty() && s.len() <= MAX_SUBSET_LEN && s.bytes().all(|b| b.is_ascii_graphic());
        if !ok {
            return Err(HeaderError::BadSubset(s.chars().take(64).collect()));
        }
    }
    if let Some(t) = &h.trace {
        // All-zero ids are invalid in W3C trace context.
        if t.trace_id == [0; 16] || t.parent_id == [0; 8] {
            return Err(HeaderError::BadTrace);
        }
    }
    Ok(())
}

/// Encodes a header with its length prefix.
pub fn encode_header(h: &Header) -> Result<Vec<u8>, HeaderError> {
    check(h)?;
    let wire = if h.trace.is_some() {
        WireHeader::V5(h.clone())
    } else if h.http || h.subset.is_some() {
        WireHeader::V4(HeaderV4 {
            service: h.service.clone(),
            port: h.port,
            cluster: h.cluster.clone(),
            caller: h.caller.clone(),
            source_service: h.source_service.clone(),
            end_to_end: h.end_to_end,
            http: h.http,
            subset: h.subset.clone(),
        })
    } else if h.source_service.is_some() || h.end_to_end {
        WireHeader::V3(HeaderV3 {
            service: h.service.clone(),
            port: h.port,
            cluster: h.cluster.clone(),
            caller: h.caller.clone(),
            source_service: h.source_service.clone(),
            end_to_end: h.end_to_end,
        })
    } else {
        WireHeader::V2(HeaderV2 {
            service: h.service.clone(),
            port: h.port,
            cluster: h.cluster.clone(),
            caller: h.caller.clone(),
        })
    };
    let body = codec::encode(&wire).map_err(|e| HeaderError::Malformed(e.to_string()))?;
    if body.len() > MAX_HEADER_LEN {
        return Err(HeaderError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(2 + body.len());
    // Cannot truncate: MAX_HEADER_LEN fits in u16.
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a header body (without its length prefix).
pub fn decode_header(body: &[u8]) -> Result<Header, HeaderError> {
    if body.len() > MAX_HEADER_LEN {
        return Err(HeaderError::TooLarge(body.len()));
    }
    let wire = codec::decode(body).map_err(|e| match e {
        CodecError::TooLarge => HeaderError::TooLarge(body.len()),
        other => HeaderError::Malformed(other.to_string()),
    })?;
    let h = match wire {
        WireHeader::V1(HeaderV1 { service, port }) => Header::new(service, port),
        WireHeader::V2(HeaderV2 {
            service,
            port,
            cluster,
            caller,
        }) => Header {
            cluster,
            caller,
            ..Header::new(service, port)
        },
        WireHeader::V3(HeaderV3 {
            service,
            port,
            cluster,
            caller,
            source_service,
            end_to_end,
        }) => Header {
            cluster,
            caller,
            source_service,
            end_to_end,
            ..Header::new(service, port)
        },
        WireHeader::V4(HeaderV4 {
            service,
            port,
            cluster,
            caller,
            source_service,
            end_to_end,
            http,
            subset,
        }) => Header {
            cluster,
            caller,
            source_service,
            end_to_end,
            http,
            subset,
            ..Header::new(service, port)
        },
        WireHeader::V5(h) => h,
    };
    check(&h)?;
    Ok(h)
}

/// Decodes a full frame (length prefix + body), as a fuzz target and in tests.
pub fn decode_frame(frame: &[u8]) -> Result<Header, HeaderError> {
    let [a, b, body @ ..] = frame else {
        return Err(HeaderError::Truncated);
    };
    let len = usize::from(u16::from_be_bytes([*a, *b]));
    if len > MAX_HEADER_LEN {
        return Err(HeaderError::TooLarge(len));
    }
    match body.len() {
        n if n < len => Err(HeaderError::Truncated),
        n if n > len => Err(HeaderError::Malformed(format!(
            "{} bytes after the header",
            n - len
        ))),
        _ => decode_header(body),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn header(service: &str, port: u16) -> Header {
        Header::new(service, port)
    }

    proptest! {
        #[test]
        fn round_trip(
            service in "[a-zA-Z0-9._-]{1,200}",
            port: u16,
            cluster in proptest::option::of("[a-z][a-z0-9-]{0,30}"),
            caller in proptest::option::of("[a-z]{1,20}"),
            source_service in proptest::option::of("[a-z][a-z0-9_-]{0,40}"),
            end_to_end: bool,
            http: bool,
            subset in proptest::option::of("[a-z]{1,10}(=[a-z0-9.]{1,10})?"),
            trace in proptest::option::of((1u128.., 1u64.., any::<u8>())),
        ) {
            let caller = caller.map(|n| Identity::new("acme", "west", &n).unwrap());
            let trace = trace.map(|(t, p, flags)| TraceContext {
                trace_id: t.to_be_bytes(),
                parent_id: p.to_be_bytes(),
                flags,
            });
            let h = Header { service, port, cluster, caller, source_service, end_to_end, http, subset, trace };
            let frame = encode_header(&h).unwrap();
            prop_assert_eq!(decode_frame(&frame).unwrap(), h);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode_frame(&bytes);
            let _ = decode_header(&bytes);
        }

        #[test]
        fn every_truncation_is_an_error(service in "[a-z]{1,40}", port: u16, cut in 0usize..64) {
            let frame = encode_header(&header(&service, port)).unwrap();
            let cut = cut.min(frame.len() - 1);
            prop_assert!(decode_frame(&frame[..cut]).is_err());
        }
    }

    #[test]
    fn oversized_and_bad_service_are_refused() {
        assert_eq!(
            decode_frame(&[0xff, 0xff]),
            Err(HeaderError::TooLarge(0xffff))
        );
        let h = header(&"x".repeat(300), 1);
        assert!(matches!(encode_header(&h), Err(HeaderError::BadService(_))));
        assert!(encode_header(&header("a b", 1)).is_err());
        let mut h = header("api", 1);
        h.cluster = Some("no such/cluster".into());
        assert!(matches!(encode_header(&h), Err(HeaderError::BadCluster(_))));
        // A valid frame with one extra byte is not a valid frame.
        let mut frame = encode_header(&header("api", 8080)).unwrap();
        frame.push(0);
        assert!(decode_frame(&frame).is_err());
        // Unknown version tag.
        assert!(matches!(
            decode_header(&[7, 3, b'a', b'p', b'i', 0]),
            Err(HeaderError::Malformed(_))
        ));
    }

    #[test]
    fn version_1_headers_still_decode() {
        let body = codec::encode(&WireHeader::V1(HeaderV1 {
            service: "api".into(),
            port: 8080,
        }))
        .unwrap();
        assert_eq!(decode_header(&body).unwrap(), header("api", 8080));
    }

    #[test]
    fn headers_without_a_source_service_stay_version_2() {
        let h = header("api", 8080);
        let frame = encode_header(&h).unwrap();
        let wire: WireHeader = codec::decode(&frame[2..]).unwrap();
        assert!(matches!(wire, WireHeader::V2(_)));
        let mut h = h;
        h.source_service = Some("web".into());
        let frame = encode_header(&h).unwrap();
        let wire: WireHeader = codec::decode(&frame[2..]).unwrap();
        assert!(matches!(wire, WireHeader::V3(_)));
        assert_eq!(decode_frame(&frame).unwrap(), h);
        h.source_service = Some("not a name".into());
        assert!(matches!(
            encode_header(&h),
            Err(HeaderError::BadSourceService(_))
        ));
    }

    #[test]
    fn only_http_requests_and_subsets_need_version_4() {
        let mut h = header("api", 8080);
        h.source_service = Some("web".into());
        h.end_to_end = true;
        let wire: WireHeader = codec::decode(&encode_header(&h).unwrap()[2..]).unwrap();
        assert!(matches!(wire, WireHeader::V3(_)));
        h.http = true;
        let frame = encode_header(&h).unwrap();
        let wire: WireHeader = codec::decode(&frame[2..]).unwrap();
        assert!(matches!(wire, WireHeader::V4(_)));
        assert_eq!(decode_frame(&frame).unwrap(), h);
        h.http = false;
        h.subset = Some("version=v2".into());
        let wire: WireHeader = codec::decode(&encode_header(&h).unwrap()[2..]).unwrap();
        assert!(matches!(wire, WireHeader::V4(_)));
        for bad in ["", "a b", &"x".repeat(300)] {
            h.subset = Some(bad.to_string());
            assert!(matches!(encode_header(&h), Err(HeaderError::BadSubset(_))));
        }
    }

    #[test]
    fn only_traced_streams_need_version_5_and_zero_ids_are_refused() {
        let mut h = header("api", 8080);
        h.http = true;
        h.trace = Some(TraceContext {
            trace_id: [7; 16],
            parent_id: [9; 8],
            flags: 1,
        });
        let frame = encode_header(&h).unwrap();
        let wire: WireHeader = codec::decode(&frame[2..]).unwrap();
        assert!(matches!(wire, WireHeader::V5(_)));
        assert_eq!(decode_frame(&frame).unwrap(), h);
        // A version-4 header (an older node's) still decodes, untraced.
        let v4 = codec::encode(&WireHeader::V4(HeaderV4 {
            service: "api".into(),
            port: 8080,
            cluster: None,
            caller: None,
            source_service: None,
            end_to_end: false,
            http: true,
            subset: None,
        }))
        .unwrap();
        assert_eq!(decode_header(&v4).unwrap().trace, None);
        for t in [[0u8; 16], [1; 16]] {
            h.trace = Some(TraceContext {
                trace_id: t,
                parent_id: if t == [0; 16] { [1; 8] } else { [0; 8] },
                flags: 0,
            });
            assert_eq!(encode_header(&h), Err(HeaderError::BadTrace));
            let wire = codec::encode(&WireHeader::V5(h.clone())).unwrap();
            assert_eq!(decode_header(&wire), Err(HeaderError::BadTrace));
        }
    }

    #[test]
    fn a_carried_caller_must_be_a_valid_identity() {
        // Hand-build a V2 body whose caller is not a SPIFFE ID.
        #[derive(Serialize)]
        struct Forged {
            service: String,
            port: u16,
            cluster: Option<String>,
            caller: Option<String>,
        }
        #[derive(Serialize)]
        enum Wire {
            _V1(()),
            V2(Forged),
        }
        let body = codec::encode(&Wire::V2(Forged {
            service: "api".into(),
            port: 1,
            cluster: None,
            caller: Some("spiffe://acme/evil".into()),
        }))
        .unwrap();
        assert!(matches!(
            decode_header(&body),
            Err(HeaderError::Malformed(_))
        ));
    }

    #[test]
    fn status_bytes_round_trip() {
        for b in 0..=6u8 {
            assert_eq!(Status::from_u8(b).map(|s| s as u8), Some(b));
        }
        assert_eq!(Status::from_u8(7), None);
    }
}
