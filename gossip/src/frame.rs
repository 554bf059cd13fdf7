//! Gossip frames on the wire: one chitchat message per QUIC uni stream,
//! either as chitchat serialized it (`meshnode-gossip/1`), compressed with
//! zstd (`/2`), or compressed with zstd and the pool's dictionary (`/3`; the
//! WAN pool's `meshnode-wan/N` likewise). The codec is chosen per connection
//! by the negotiated ALPN, so a node that only knows `/1` or `/2` keeps
//! working with newer ones.
//!
//! Idle gossip is almost all digests (every node's id, generation, address,
//! heartbeat and versions in each SYN and SYN-ACK): zstd takes them to about
//! a third. Every message of a pool repeats the pool id and the SPIFFE prefix
//! of every node id (`spiffe://<mesh>/cluster/<cluster>/node/`), which zstd
//! alone must spell out once per message; `/3` primes zstd with those bytes
//! (a raw-content dictionary both sides derive from the pool), so a small
//! digest no longer pays for them. Decoding never trusts a length: the wire
//! frame is capped before it is read and the decompressed message is capped
//! while it is produced.

use std::io::Read;
use std::sync::Arc;

use chitchat::{ChitchatMessage, Deserializable};
use zstd::dict::{DecoderDictionary, EncoderDictionary};

/// The largest frame read from a stream (chitchat's own UDP-sized limit).
pub const MAX_WIRE: usize = 65_507;
/// The largest message a compressed frame may expand to. A digest costs about
/// 50 B per node, so this bounds a pool near 20,000 nodes, well past what the
/// compressed frame itself fits (see BENCHMARKS.md).
pub const MAX_DECODED: usize = 1 << 20;
/// zstd's default level: small messages, so its cost is negligible.
const LEVEL: i32 = 3;
/// The largest back-reference window a frame may ask the decoder for
/// (2^20 = [`MAX_DECODED`]). A frame's header names its window, and zstd
/// sizes its buffer from that claim (up to 128 MiB by default) before a
/// byte is produced; a real frame of at most [`MAX_DECODED`] needs no more.
const WINDOW_LOG_MAX: u32 = 20;

/// How the frames of one connection are encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Codec {
    /// chitchat's serialization, as is.
    Raw,
    /// chitchat's serialization, compressed as one zstd frame.
    Zstd,
    /// Compressed as one zstd frame primed with the pool's dictionary.
    Pool(Arc<Dictionary>),
}

/// What every gossip message of one pool repeats, as a zstd raw-content
/// dictionary: both sides derive it from the pool, nothing is sent for it.
pub struct Dictionary {
    content: Vec<u8>,
    encoder: EncoderDictionary<'static>,
    decoder: DecoderDictionary<'static>,
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

// === impl Dictionary ===

impl Dictionary {
    /// The dictionary of the pool whose chitchat `cluster_id` is `pool_id`
    /// and whose node ids all start with `id_prefix`.
    pub fn for_pool(pool_id: &str, id_prefix: &str) -> Arc<Self> {
        // zstd finds matches anywhere in it; the most frequent bytes (the id
        // prefix, once per digest entry) go last, where offsets are shortest.
        let content =
            format!("{pool_id}\0cert\0node\0leaving\0role:ca\0svc:\0{id_prefix}").into_bytes();
        Arc::new(Self {
            encoder: EncoderDictionary::copy(&content, LEVEL),
            decoder: DecoderDictionary::copy(&content),
            content,
        })
    }
}

impl PartialEq for Dictionary {
    fn eq(&self, other: &Self) -> bool {
        self.content == other.content
    }
}

impl Eq for Dictionary {}

impl std::fmt::Debug for Dictionary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dictionary")
            .field("content", &String::from_utf8_lossy(&self.content))
            .finish()
    }
}

// === impl Codec ===

impl Codec {
    /// The codec of a connection whose handshake settled on `negotiated`,
    /// in the pool whose dictionary is `dict`.
    pub fn for_alpn(negotiated: Option<&[u8]>, dict: &Arc<Dictionary>) -> Codec {
        use meshnode_transport::alpn::{framing, Framing};
        match negotiated.map(framing) {
            Some(Framing::PoolDictionary) => Codec::Pool(dict.clone()),
            Some(Framing::Zstd) => Codec::Zstd,
            Some(Framing::Raw) | None => Codec::Raw,
        }
    }

    pub fn of(conn: &quinn::Connection, dict: &Arc<Dictionary>) -> Codec {
        Codec::for_alpn(meshnode_transport::negotiated_alpn(conn).as_deref(), dict)
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Codec::Raw => "raw",
            Codec::Zstd => "zstd",
            Codec::Pool(_) => "zstd_dict",
        }
    }

    /// The frame for a serialized chitchat message.
    pub fn encode(&self, message: &[u8]) -> Result<Vec<u8>, FrameError> {
        let frame = match self {
            Codec::Raw => message.to_vec(),
            Codec::Zstd => {
                let c = zstd::bulk::Compressor::new(LEVEL).map_err(|_| FrameError::Compression)?;
                compress(c, message)?
            }
            Codec::Pool(dict) => {
                let c = zstd::bulk::Compressor::with_prepared_dictionary(&dict.encoder)
                    .map_err(|_| FrameError::Compression)?;
                compress(c, message)?
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
    pub fn decode(&self, frame: &[u8]) -> Result<ChitchatMessage, FrameError> {
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
    pub fn unframe<'f>(&self, frame: &'f [u8]) -> Result<std::borrow::Cow<'f, [u8]>, FrameError> {
        if frame.len() > MAX_WIRE {
            return Err(FrameError::Oversized(frame.len()));
        }
        Ok(match self {
            Codec::Raw => std::borrow::Cow::Borrowed(frame),
            Codec::Zstd => std::borrow::Cow::Owned(inflate(
                zstd::stream::read::Decoder::with_buffer(frame)
                    .map_err(|_| FrameError::Compression)?,
                frame.len(),
            )?),
            Codec::Pool(dict) => std::borrow::Cow::Owned(inflate(
                zstd::stream::read::Decoder::with_prepared_dictionary(frame, &dict.decoder)
                    .map_err(|_| FrameError::Compression)?,
                frame.len(),
            )?),
        })
    }
}

/// One zstd frame with a content checksum (4 bytes), so a damaged frame is
/// an error rather than a different message.
fn compress(mut c: zstd::bulk::Compressor<'_>, message: &[u8]) -> Result<Vec<u8>, FrameError> {
    c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
        .map_err(|_| FrameError::Compression)?;
    c.compress(message).map_err(|_| FrameError::Compression)
}

/// Decompresses with the output capped as it grows, so a small frame that
/// claims (or really holds) gigabytes costs at most [`MAX_DECODED`].
fn inflate<R: std::io::BufRead>(
    mut decoder: zstd::stream::read::Decoder<'_, R>,
    frame_len: usize,
) -> Result<Vec<u8>, FrameError> {
    decoder
        .window_log_max(WINDOW_LOG_MAX)
        .map_err(|_| FrameError::Compression)?;
    let mut out = Vec::with_capacity(frame_len * 4);
    decoder
        .take(MAX_DECODED as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| {
            // A window over the cap is a claim to expand past it: a bomb.
            let too_large =
                zstd::zstd_safe::zstd_sys::ZSTD_ErrorCode::ZSTD_error_frameParameter_windowTooLarge;
            let name = zstd::zstd_safe::get_error_name(0usize.wrapping_sub(too_large as usize));
            if e.to_string() == name {
                FrameError::Bomb
            } else {
                FrameError::Compression
            }
        })?;
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

    fn dict() -> Arc<Dictionary> {
        Dictionary::for_pool("acme/east", "spiffe://acme/cluster/east/node/")
    }

    fn codecs() -> [Codec; 3] {
        [Codec::Raw, Codec::Zstd, Codec::Pool(dict())]
    }

    /// A SYN of `nodes` digest entries with SPIFFE node ids, as a pool sends it.
    fn syn(nodes: usize) -> Vec<u8> {
        use crate::wire::{self, Blocks, Message, NodeDigest, NodeId};
        let digest = (0..nodes)
            .map(|i| {
                (
                    NodeId {
                        node_id: format!("spiffe://acme/cluster/east/node/vm-{i}"),
                        generation: 1_795_000_000_000_000_000 + i as u64 * 7_919_113,
                        addr: SocketAddr::from((Ipv4Addr::new(10, 0, 1, i as u8), 9470)),
                    },
                    NodeDigest {
                        heartbeat: 1_000 + i as u64 * 37,
                        last_gc_version: 0,
                        max_version: 3 + i as u64 % 4,
                    },
                )
            })
            .collect();
        wire::encode(
            &Message::Syn {
                cluster_id: "acme/east".into(),
                digest,
            },
            Blocks::Chitchat,
        )
    }

    #[test]
    fn every_codec_round_trips_a_message() {
        let raw = chitchat::ChitchatMessage::BadCluster.serialize_to_vec();
        for codec in codecs() {
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
        assert_eq!(Codec::Zstd.unframe(&frame).unwrap().as_ref(), &bulk[..]);
    }

    #[test]
    fn the_pool_dictionary_takes_the_id_prefixes_off_a_small_digest() {
        // The bytes a SYN of 10 nodes costs: the dictionary must win back
        // what SPIFFE node ids added to it (BENCHMARKS.md, "Signed gossip").
        let msg = syn(10);
        let plain = Codec::Zstd.encode(&msg).unwrap();
        let primed = Codec::Pool(dict()).encode(&msg).unwrap();
        eprintln!(
            "SYN of 10: {} B, zstd {} B, primed {} B",
            msg.len(),
            plain.len(),
            primed.len()
        );
        assert!(
            primed.len() * 100 <= plain.len() * 92,
            "zstd {} B, with the pool dictionary {} B",
            plain.len(),
            primed.len()
        );
        assert_eq!(
            Codec::Pool(dict()).unframe(&primed).unwrap().as_ref(),
            &msg[..]
        );
        let msg = chitchat::ChitchatMessage::deserialize(&mut &msg[..]).unwrap();
        assert_eq!(Codec::Pool(dict()).decode(&primed).unwrap(), msg);
    }

    #[test]
    fn a_frame_needs_the_same_dictionary_to_decode() {
        let msg = syn(5);
        let primed = Codec::Pool(dict()).encode(&msg).unwrap();
        let other = Dictionary::for_pool("acme/west", "spiffe://acme/cluster/west/node/");
        assert!(Codec::Pool(other).unframe(&primed).is_err());
        assert!(Codec::Zstd.unframe(&primed).is_err());
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let bulk = message(3);
        for codec in codecs() {
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
        let d = dict();
        let c = zstd::bulk::Compressor::with_prepared_dictionary(&d.encoder).unwrap();
        let bomb = compress(c, &zeros).unwrap();
        assert!(bomb.len() < MAX_WIRE);
        assert_eq!(Codec::Pool(d).decode(&bomb), Err(FrameError::Bomb));
    }

    #[test]
    fn a_frame_that_asks_for_a_window_over_the_cap_is_refused_before_it_expands() {
        // A streaming encoder that states no content size writes its whole
        // window (here 2^27 = 128 MiB) into the frame header.
        let mut enc = zstd::stream::Encoder::new(Vec::new(), LEVEL).unwrap();
        enc.window_log(27).unwrap();
        enc.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut enc, &syn(3)).unwrap();
        let frame = enc.finish().unwrap();
        assert!(frame.len() < 1_000);
        assert_eq!(Codec::Zstd.unframe(&frame), Err(FrameError::Bomb));
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
        for codec in codecs() {
            assert_eq!(codec.decode(&big), Err(FrameError::Oversized(MAX_WIRE + 1)));
        }
    }

    #[test]
    fn the_codec_follows_the_negotiated_alpn() {
        use meshnode_transport::alpn;
        let d = dict();
        assert_eq!(
            Codec::for_alpn(Some(alpn::GOSSIP_V3), &d),
            Codec::Pool(d.clone())
        );
        assert_eq!(
            Codec::for_alpn(Some(alpn::WAN_GOSSIP_V3), &d),
            Codec::Pool(d.clone())
        );
        assert_eq!(Codec::for_alpn(Some(alpn::GOSSIP_V2), &d), Codec::Zstd);
        assert_eq!(Codec::for_alpn(Some(alpn::WAN_GOSSIP_V2), &d), Codec::Zstd);
        assert_eq!(Codec::for_alpn(Some(alpn::GOSSIP), &d), Codec::Raw);
        assert_eq!(Codec::for_alpn(Some(alpn::WAN_GOSSIP), &d), Codec::Raw);
        assert_eq!(Codec::for_alpn(Some(alpn::TUNNEL), &d), Codec::Raw);
        assert_eq!(Codec::for_alpn(None, &d), Codec::Raw);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            for codec in codecs() {
                let _ = codec.decode(&bytes);
            }
        }

        #[test]
        fn damaged_compressed_frames_are_errors(flip in 0usize..200, bit in 0u8..8, primed: bool) {
            let codec = if primed { Codec::Pool(dict()) } else { Codec::Zstd };
            let frame = codec.encode(&syn(20)).unwrap();
            let mut bad = frame.clone();
            let i = flip % bad.len();
            bad[i] ^= 1 << bit;
            // zstd frames carry a checksum of their content (see `encode`):
            // a flipped bit is an error, never a different message or a
            // panic. (A few header bits are unused, and decode the same.)
            match codec.decode(&bad) {
                Err(_) => {}
                Ok(m) => {
                    use chitchat::Serializable;
                    let original = codec.decode(&frame).unwrap();
                    prop_assert_eq!(m.serialize_to_vec(), original.serialize_to_vec());
                }
            }
        }
    }
}
