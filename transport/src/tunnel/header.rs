//! The tunnel header codec: pure functions on bytes.
//!
//! Layout: `u16` big-endian body length, then the body: bincode of
//! [`WireHeader`], whose enum tag is the protocol version.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};

/// Hard cap on the header body. Anything longer is refused before it is read.
pub const MAX_HEADER_LEN: usize = 1024;
const MAX_SERVICE_LEN: usize = 253;

/// What a caller asks of the receiving node: connect me to this local instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Service name as registered on the receiving node.
    pub service: String,
    /// Port of the instance, telling apart several instances of one service on a node.
    pub port: u16,
}

/// The versioned envelope. New versions are new variants; old ones stay decodable.
#[derive(Serialize, Deserialize)]
enum WireHeader {
    V1(Header),
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

/// Encodes a header with its length prefix.
pub fn encode_header(h: &Header) -> Result<Vec<u8>, HeaderError> {
    check_service(&h.service)?;
    let body = codec::encode(&WireHeader::V1(h.clone()))
        .map_err(|e| HeaderError::Malformed(e.to_string()))?;
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
    let WireHeader::V1(h) = codec::decode(body).map_err(|e| match e {
        CodecError::TooLarge => HeaderError::TooLarge(body.len()),
        other => HeaderError::Malformed(other.to_string()),
    })?;
    check_service(&h.service)?;
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

    proptest! {
        #[test]
        fn round_trip(service in "[a-zA-Z0-9._-]{1,200}", port: u16) {
            let h = Header { service, port };
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
            let frame = encode_header(&Header { service, port }).unwrap();
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
        let h = Header {
            service: "x".repeat(300),
            port: 1,
        };
        assert!(matches!(encode_header(&h), Err(HeaderError::BadService(_))));
        let h = Header {
            service: "a b".into(),
            port: 1,
        };
        assert!(encode_header(&h).is_err());
        // A valid frame with one extra byte is not a valid frame.
        let mut frame = encode_header(&Header {
            service: "api".into(),
            port: 8080,
        })
        .unwrap();
        frame.push(0);
        assert!(decode_frame(&frame).is_err());
        // Unknown version tag.
        assert!(matches!(
            decode_header(&[7, 3, b'a', b'p', b'i', 0]),
            Err(HeaderError::Malformed(_))
        ));
    }

    #[test]
    fn status_bytes_round_trip() {
        for b in 0..=4u8 {
            assert_eq!(Status::from_u8(b).map(|s| s as u8), Some(b));
        }
        assert_eq!(Status::from_u8(5), None);
    }
}
