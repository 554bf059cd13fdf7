//! The one codec module: every bincode encode/decode in meshnode goes through here.
//!
//! bincode is pinned to `=2.0.1` (3.0.0 is an empty tombstone). The limit makes a
//! hostile length prefix fail with `LimitExceeded` before anything is allocated,
//! and trailing bytes, which bincode accepts, are rejected here.

use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use serde::{de::DeserializeOwned, Serialize};

/// The largest message this codec will produce or accept.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;

const WIRE: Configuration<LittleEndian, Varint, Limit<MAX_MESSAGE_LEN>> =
    bincode::config::standard().with_limit::<MAX_MESSAGE_LEN>();

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("message is larger than the {MAX_MESSAGE_LEN}-byte limit")]
    TooLarge,
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("{0} unexpected bytes after the end of the message")]
    Trailing(usize),
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    // The limit only binds decoding; enforce it on the way out too.
    let bytes = bincode::serde::encode_to_vec(value, WIRE)
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(CodecError::TooLarge);
    }
    Ok(bytes)
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(CodecError::TooLarge);
    }
    let (value, used) = bincode::serde::decode_from_slice(bytes, WIRE).map_err(|e| match e {
        bincode::error::DecodeError::LimitExceeded => CodecError::TooLarge,
        other => CodecError::Malformed(other.to_string()),
    })?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_trailing_bytes() {
        let v = (7u32, "svc".to_string(), vec![1u8, 2, 3]);
        let mut bytes = encode(&v).unwrap();
        assert_eq!(decode::<(u32, String, Vec<u8>)>(&bytes).unwrap(), v);
        bytes.push(0);
        assert_eq!(
            decode::<(u32, String, Vec<u8>)>(&bytes),
            Err(CodecError::Trailing(1))
        );
    }

    #[test]
    fn hostile_length_prefix_is_refused_without_allocating() {
        // varint marker 0xFD = u64 follows; claims a 2^62-byte string.
        let bytes = [0xFDu8, 0, 0, 0, 0, 0, 0, 0, 0x40];
        assert_eq!(decode::<String>(&bytes), Err(CodecError::TooLarge));
    }

    #[test]
    fn oversized_value_is_refused_on_encode() {
        let big = "x".repeat(MAX_MESSAGE_LEN + 1);
        assert_eq!(encode(&big), Err(CodecError::TooLarge));
    }
}
