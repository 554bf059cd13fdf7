//! Gossip frames on the wire: one chitchat message per QUIC uni stream,
//! either as chitchat serialized it (`meshnode-gossip/1`) or compressed with
//! zstd (`meshnode-gossip/2`, and the `/2` of the WAN pool). The codec is
//! chosen per connection by the negotiated ALPN, so a node that only knows
//! `/1` keeps working with newer ones.
//!
//! Idle gossip is almost all digests (every node's id, generation, address,
//! heartbeat and versions in each SYN and SYN-ACK): zstd takes them to about
//! a third. Decoding never trusts a length: the wire frame is capped before
//! it is read and the decompressed message is capped while it is produced.

use std::io::Read;

use chitchat::{ChitchatMessage, Deserializable};

/// The largest frame read from a stream (chitchat's own UDP-sized limit).
pub const MAX_WIRE: usize = 65_507;
/// The largest message a compressed frame may expand to. A digest costs about
/// 50 B per node, so this bounds a pool near 20,000 nodes, well past what the
/// compressed frame itself fits (see BENCHMARKS.md).
pub const MAX_DECODED: usize = 1 << 20;
/// zstd's default level: small messages, so its cost is negligible.
const LEVEL: i32 = 3;

/// How the frames of one connection are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// chitchat's serialization, as is.
    Raw,
    /// chitchat's serialization, compressed as one zstd frame.
    Zstd,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the {MAX_WIRE}-byte limit")]
    Oversized(usize),
    #[error("compressed frame expands past {MAX_DECODED} bytes")]
    Bomb,
    #[error("compressed frame is damaged")]
    Compression,
    #[error("not a chitchat message")]
    Malformed,
}

// === impl Codec ===

impl Codec {
    /// The codec of a connection whose handshake settled on `negotiated`.
    pub fn for_alpn(negotiated: Option<&[u8]>) -> Codec {
        match negotiated {
            Some(p) if meshnode_transport::alpn::compressed_gossip(p) => Codec::Zstd,
            _ => Codec::Raw,
        }
    }

    pub fn of(conn: &quinn::Connection) -> Codec {
        Codec::for_alpn(meshnode_transport::negotiated_alpn(conn).as_deref())
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Codec::Raw => "raw",
            Codec::Zstd => "zstd",
        }
    }

    /// The frame for a serialized chitchat message.
    pub fn encode(self, message: &[u8]) -> Result<Vec<u8>, FrameError> {
        let frame = match self {
            Codec::Raw => message.to_vec(),
            Codec::Zstd => {
                // With a content checksum (4 bytes), so a damaged frame is an
                // error rather than a different message.
                let mut c =
                    zstd::bulk::Compressor::new(LEVEL).map_err(|_| FrameError::Compression)?;
                c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
                    .map_err(|_| FrameError::Compression)?;
                c.compress(message).map_err(|_| FrameError::Compression)?
            }
        };
        if frame.len() > MAX_WIRE {
            return Err(FrameError::Oversized(frame.len()));
        }
        Ok(frame)
    }

    /// The message in a frame. Trailing bytes after the message are an error.
    ///
    /// Only for tests and tools: the node never hands wire bytes to chitchat's
    /// decoder, it goes through [`Codec::unframe`] and the gate.
    pub fn decode(self, frame: &[u8]) -> Result<ChitchatMessage, FrameError> {
        let bytes = self.unframe(frame)?;
        let mut cursor = &bytes[..];
        match ChitchatMessage::deserialize(&mut cursor) {
            Ok(msg) if cursor.is_empty() => Ok(msg),
            _ => Err(FrameError::Malformed),
        }
    }
}

impl Codec {
    /// The serialized chitchat message a frame holds (decompressed, capped
    /// at [`MAX_DECODED`]), not yet parsed.
    pub fn unframe(self, frame: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, FrameError> {
        if frame.len() > MAX_WIRE {
            return Err(FrameError::Oversized(frame.len()));
        }
        Ok(match self {
            Codec::Raw => std::borrow::Cow::Borrowed(frame),
            Codec::Zstd => std::borrow::Cow::Owned(inflate(frame)?),
        })
    }
}

/// Decompresses with the output capped as it grows, so a small frame that
/// claims (or really holds) gigabytes costs at most [`MAX_DECODED`].
fn inflate(frame: &[u8]) -> Result<Vec<u8>, FrameError> {
    let decoder =
        zstd::stream::read::Decoder::with_buffer(frame).map_err(|_| FrameError::Compression)?;
    let mut out = Vec::with_capacity(frame.len() * 4);
    decoder
        .take(MAX_DECODED as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|_| FrameError::Compression)?;
    if out.len() > MAX_DECODED {
        return Err(FrameError::Bomb);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use chitchat::{ChitchatId, Serializable};
    use proptest::prelude::*;

    use super::*;

    /// A real SYN-ACK-sized message: chitchat's BadCluster carries nothing, so
    /// build one through the public serialization of a digest-like payload.
    fn message(nodes: usize) -> Vec<u8> {
        // A Syn { cluster_id, digest } serialized by chitchat itself.
        let ids: Vec<ChitchatId> = (0..nodes)
            .map(|i| {
                ChitchatId::new(
                    format!("node-{i}"),
                    1_795_000_000_000_000_000 + i as u64,
                    SocketAddr::from((
                        Ipv4Addr::new(10, 0, (i / 250) as u8, (i % 250) as u8),
                        9470,
                    )),
                )
            })
            .collect();
        let msg = chitchat::ChitchatMessage::BadCluster;
        let mut out = msg.serialize_to_vec();
        // BadCluster is a single byte; the ids stand in for a digest's bulk.
        for id in &ids {
            id.serialize(&mut out);
        }
        out
    }

    #[test]
    fn both_codecs_round_trip_a_message() {
        let raw = chitchat::ChitchatMessage::BadCluster.serialize_to_vec();
        for codec in [Codec::Raw, Codec::Zstd] {
            let frame = codec.encode(&raw).unwrap();
            assert_eq!(
                codec.decode(&frame).unwrap(),
                chitchat::ChitchatMessage::BadCluster
            );
        }
    }

    #[test]
    fn digests_compress_to_about_a_third() {
        let bulk = message(60);
        let frame = Codec::Zstd.encode(&bulk).unwrap();
        assert!(
            frame.len() * 2 < bulk.len(),
            "{} -> {}",
            bulk.len(),
            frame.len()
        );
        assert_eq!(inflate(&frame).unwrap(), bulk);
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let bulk = message(3);
        for codec in [Codec::Raw, Codec::Zstd] {
            let frame = codec.encode(&bulk).unwrap();
            assert_eq!(codec.decode(&frame), Err(FrameError::Malformed));
        }
    }

    #[test]
    fn a_decompression_bomb_is_refused_at_the_cap() {
        let zeros = vec![0u8; MAX_DECODED * 8];
        let bomb = zstd::bulk::compress(&zeros, 19).unwrap();
        assert!(
            bomb.len() < MAX_WIRE,
            "the bomb fits in a frame: {}",
            bomb.len()
        );
        assert_eq!(Codec::Zstd.decode(&bomb), Err(FrameError::Bomb));
    }

    #[test]
    fn frames_over_the_wire_limit_are_refused_both_ways() {
        let big = vec![7u8; MAX_WIRE + 1];
        assert_eq!(
            Codec::Raw.encode(&big),
            Err(FrameError::Oversized(MAX_WIRE + 1))
        );
        assert_eq!(
            Codec::Raw.decode(&big),
            Err(FrameError::Oversized(MAX_WIRE + 1))
        );
        assert_eq!(
            Codec::Zstd.decode(&big),
            Err(FrameError::Oversized(MAX_WIRE + 1))
        );
    }

    #[test]
    fn the_codec_follows_the_negotiated_alpn() {
        use meshnode_transport::alpn;
        assert_eq!(Codec::for_alpn(Some(alpn::GOSSIP_V2)), Codec::Zstd);
        assert_eq!(Codec::for_alpn(Some(alpn::WAN_GOSSIP_V2)), Codec::Zstd);
        assert_eq!(Codec::for_alpn(Some(alpn::GOSSIP)), Codec::Raw);
        assert_eq!(Codec::for_alpn(Some(alpn::WAN_GOSSIP)), Codec::Raw);
        assert_eq!(Codec::for_alpn(None), Codec::Raw);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = Codec::Raw.decode(&bytes);
            let _ = Codec::Zstd.decode(&bytes);
        }

        #[test]
        fn damaged_compressed_frames_are_errors(flip in 0usize..200, bit in 0u8..8) {
            let frame = Codec::Zstd.encode(&message(20)).unwrap();
            let mut bad = frame.clone();
            let i = flip % bad.len();
            bad[i] ^= 1 << bit;
            // zstd frames carry a checksum of their content (see `encode`):
            // any flipped bit is an error, never a different message or a panic.
            prop_assert!(Codec::Zstd.decode(&bad).is_err());
        }
    }
}
