//! meshnode's own decoder and encoder for chitchat 0.11.2's message format.
//!
//! chitchat deserializes a whole message publicly, but the fields of its
//! `Delta` and `Digest` are crate-private: nothing outside the crate can look
//! inside a message or rebuild one. The gatekeeper ([`crate::gate`]) needs
//! both, so this module reads and writes the same bytes itself (tested byte
//! for byte against real chitchat messages, and fuzzed).
//!
//! ```text
//! message  = magic u16 LE (45139) | version u8 (0) | type u8 | body
//! Syn      = digest | cluster_id
//! SynAck   = digest | delta
//! Ack      = delta
//! digest   = count u16 | (node_id digest_entry)*
//! node_id  = str | generation u64 | addr (4|6 u8, ip bytes, port u16)
//! entry    = heartbeat u64 | last_gc_version u64 | max_version u64
//! delta    = block* 0x00 ; block = 1 len u16 zstd-bytes | 2 len u16 raw-bytes
//! ops      = 0 node_id last_gc u64 from_version_excluded u64
//!          | 1 key str value str version u64 status u8
//!          | 2 max_version u64
//! str      = len u16 | utf-8
//! ```
//!
//! Decoding never trusts a length: every read is bounded by the buffer, each
//! compressed block expands into at most 64 KiB (chitchat's own bound), and
//! the total expansion of a message is capped by [`Limits::max_expanded`],
//! which chitchat itself does not do.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const MAGIC: u16 = 45_139;
const VERSION: u8 = 0;
const BLOCK_END: u8 = 0;
const BLOCK_ZSTD: u8 = 1;
const BLOCK_RAW: u8 = 2;
const OP_NODE: u8 = 0;
const OP_KV: u8 = 1;
const OP_MAX_VERSION: u8 = 2;
/// chitchat's block size when it writes a delta.
const BLOCK_THRESHOLD: usize = 16_384;
/// A block never expands past this (chitchat decompresses into a buffer of this size).
const MAX_BLOCK: usize = u16::MAX as usize;

/// Bounds on what one message may cost to decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Nodes named in the digest, and node deltas in the delta, each.
    pub max_nodes: usize,
    /// Total bytes all compressed blocks of the delta may expand to.
    pub max_expanded: usize,
    /// The largest digest of the whole pool a node may come to hold, in
    /// chitchat's serialized bytes (see [`DIGEST_BUDGET`]).
    pub max_digest: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_nodes: DEFAULT_MAX_NODES,
            max_expanded: 1 << 20,
            max_digest: DIGEST_BUDGET,
        }
    }
}

/// chitchat 0.11 answers a SYN with a delta of at most 65,507 - 1 - (its own
/// digest) bytes and asserts that this is at least 100, in its task: a node
/// whose digest of the pool (about 41 + id length bytes per member and
/// generation, IPv4) passes ~65.4 KB crashes its gossip on the next SYN.
/// The gate admits no new member past this budget, which leaves room for
/// old generations chitchat keeps until it forgets them (see BENCHMARKS.md,
/// "Where it stops").
pub const DIGEST_BUDGET: usize = 48_000;

/// What one member adds to chitchat's digest: its id (u16 length and the
/// bytes), generation, address, and heartbeat, GC and max versions.
pub fn digest_entry_len(node_id: &str, addr: &SocketAddr) -> usize {
    let ip = if addr.is_ipv4() { 1 + 4 } else { 1 + 16 };
    2 + node_id.len() + 8 + ip + 2 + 24
}

/// The default cap on nodes one message may name: above what one digest
/// frame can carry today (about 5,600 nodes, BENCHMARKS.md).
pub const DEFAULT_MAX_NODES: usize = 6_000;

/// chitchat's `ChitchatId`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId {
    pub node_id: String,
    pub generation: u64,
    pub addr: SocketAddr,
}

/// One digest entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeDigest {
    pub heartbeat: u64,
    pub last_gc_version: u64,
    pub max_version: u64,
}

/// Whether a key-value is set or scheduled for deletion (chitchat's
/// `DeletionStatusMutation`; meshnode only ever sets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Set,
    Delete,
    DeleteAfterTtl,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
    pub version: u64,
    pub status: Status,
}

/// Everything a delta says about one node, in wire order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeDelta {
    pub id: NodeId,
    pub last_gc_version: u64,
    pub from_version_excluded: u64,
    /// Strictly increasing versions (the decoder refuses anything else, as chitchat does).
    pub key_values: Vec<KeyValue>,
    /// `SetMaxVersion` operations, in the order they came, with how many
    /// key-values preceded each (chitchat sends one only for a node with no
    /// key-values; a crafted one can set a max version below a key's).
    pub set_max_version: Vec<(usize, u64)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Syn {
        cluster_id: String,
        digest: Vec<(NodeId, NodeDigest)>,
    },
    SynAck {
        digest: Vec<(NodeId, NodeDigest)>,
        delta: Vec<NodeDelta>,
    },
    Ack {
        delta: Vec<NodeDelta>,
    },
    BadCluster,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("truncated")]
    Truncated,
    #[error("not a chitchat 0.11 message (magic or version)")]
    NotChitchat,
    #[error("unknown {what} tag {tag}")]
    Tag { what: &'static str, tag: u8 },
    #[error("string is not UTF-8")]
    Utf8,
    #[error("names {0} nodes, over the cap")]
    TooManyNodes(usize),
    #[error("delta expands past {0} bytes")]
    Bomb(usize),
    #[error("compressed block is damaged")]
    Compression,
    #[error("delta is inconsistent: {0}")]
    Inconsistent(&'static str),
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

// === decoding ===

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    fn str(&mut self) -> Result<String, WireError> {
        let len = self.u16()? as usize;
        let b = self.take(len)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| WireError::Utf8)
    }

    fn addr(&mut self) -> Result<SocketAddr, WireError> {
        let ip = match self.u8()? {
            4 => {
                let b = self.take(4)?;
                IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
            }
            6 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(self.take(16)?);
                IpAddr::V6(Ipv6Addr::from(a))
            }
            tag => return Err(WireError::Tag { what: "ip", tag }),
        };
        Ok(SocketAddr::new(ip, self.u16()?))
    }

    fn node_id(&mut self) -> Result<NodeId, WireError> {
        Ok(NodeId {
            node_id: self.str()?,
            generation: self.u64()?,
            addr: self.addr()?,
        })
    }

    fn digest(&mut self, limits: &Limits) -> Result<Vec<(NodeId, NodeDigest)>, WireError> {
        let n = self.u16()? as usize;
        if n > limits.max_nodes {
            return Err(WireError::TooManyNodes(n));
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let id = self.node_id()?;
            let d = NodeDigest {
                heartbeat: self.u64()?,
                last_gc_version: self.u64()?,
                max_version: self.u64()?,
            };
            out.push((id, d));
        }
        Ok(out)
    }

    fn delta(&mut self, limits: &Limits) -> Result<Vec<NodeDelta>, WireError> {
        let ops = self.blocks(limits)?;
        parse_ops(&ops, limits)
    }

    /// The delta's blocks, expanded and concatenated.
    fn blocks(&mut self, limits: &Limits) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::new();
        let mut scratch: Vec<u8> = Vec::new();
        loop {
            match self.u8()? {
                BLOCK_END => return Ok(out),
                BLOCK_ZSTD => {
                    let len = self.u16()? as usize;
                    let src = self.take(len)?;
                    if scratch.is_empty() {
                        scratch = vec![0; MAX_BLOCK];
                    }
                    let n = zstd::bulk::decompress_to_buffer(src, &mut scratch[..])
                        .map_err(|_| WireError::Compression)?;
                    if out.len() + n > limits.max_expanded {
                        return Err(WireError::Bomb(limits.max_expanded));
                    }
                    out.extend_from_slice(&scratch[..n]);
                }
                BLOCK_RAW => {
                    let len = self.u16()? as usize;
                    let src = self.take(len)?;
                    if out.len() + len > limits.max_expanded {
                        return Err(WireError::Bomb(limits.max_expanded));
                    }
                    out.extend_from_slice(src);
                }
                tag => return Err(WireError::Tag { what: "block", tag }),
            }
        }
    }
}

fn parse_ops(ops: &[u8], limits: &Limits) -> Result<Vec<NodeDelta>, WireError> {
    let mut r = Reader { buf: ops };
    let mut out: Vec<NodeDelta> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    while !r.buf.is_empty() {
        match r.u8()? {
            OP_NODE => {
                let id = r.node_id()?;
                let last_gc_version = r.u64()?;
                let from_version_excluded = r.u64()?;
                if !seen.insert(id.clone()) {
                    return Err(WireError::Inconsistent("a node appears twice"));
                }
                if out.len() >= limits.max_nodes {
                    return Err(WireError::TooManyNodes(out.len() + 1));
                }
                out.push(NodeDelta {
                    id,
                    last_gc_version,
                    from_version_excluded,
                    key_values: Vec::new(),
                    set_max_version: Vec::new(),
                });
            }
            OP_KV => {
                let key = r.str()?;
                let value = r.str()?;
                let version = r.u64()?;
                let status = match r.u8()? {
                    0 => Status::Set,
                    1 => Status::Delete,
                    2 => Status::DeleteAfterTtl,
                    tag => {
                        return Err(WireError::Tag {
                            what: "status",
                            tag,
                        })
                    }
                };
                let node = out
                    .last_mut()
                    .ok_or(WireError::Inconsistent("a key-value before any node"))?;
                if node.max_version() >= version {
                    return Err(WireError::Inconsistent("versions not increasing"));
                }
                node.key_values.push(KeyValue {
                    key,
                    value,
                    version,
                    status,
                });
            }
            OP_MAX_VERSION => {
                let v = r.u64()?;
                let node = out
                    .last_mut()
                    .ok_or(WireError::Inconsistent("a max version before any node"))?;
                let at = node.key_values.len();
                node.set_max_version.push((at, v));
            }
            tag => return Err(WireError::Tag { what: "op", tag }),
        }
    }
    Ok(out)
}

impl NodeDelta {
    /// The max version chitchat's decoder ends up with for this node: the
    /// last of the key-values' versions and `SetMaxVersion`s, in wire order.
    pub fn max_version(&self) -> u64 {
        let kv_max = self.key_values.last().map_or(0, |kv| kv.version);
        match self.set_max_version.last() {
            Some(&(at, v)) if at == self.key_values.len() => v,
            _ => kv_max,
        }
    }
}

/// Decodes one serialized chitchat message. Trailing bytes are an error.
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Message, WireError> {
    let mut r = Reader { buf: bytes };
    if r.u16()? != MAGIC || r.u8()? != VERSION {
        return Err(WireError::NotChitchat);
    }
    let msg = match r.u8()? {
        0 => {
            let digest = r.digest(limits)?;
            let cluster_id = r.str()?;
            Message::Syn { cluster_id, digest }
        }
        1 => {
            let digest = r.digest(limits)?;
            let delta = r.delta(limits)?;
            Message::SynAck { digest, delta }
        }
        2 => Message::Ack {
            delta: r.delta(limits)?,
        },
        3 => Message::BadCluster,
        tag => {
            return Err(WireError::Tag {
                what: "message",
                tag,
            })
        }
    };
    if !r.buf.is_empty() {
        return Err(WireError::Trailing(r.buf.len()));
    }
    Ok(msg)
}

// === encoding ===

/// How the delta's blocks are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blocks {
    /// As chitchat writes them: 16 KiB blocks, zstd where it is shorter.
    /// Real chitchat messages re-encode to the same bytes.
    Chitchat,
    /// Uncompressed blocks only: for handing a checked message to chitchat
    /// in-process, where compressing would only cost CPU.
    Raw,
}

fn put_u16(buf: &mut Vec<u8>, v: u16) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    // Strings longer than u16 cannot come from the decoder; truncating the
    // length would corrupt the stream, so the encoder caps them the same way.
    let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    put_u16(buf, b.len() as u16);
    buf.extend_from_slice(b);
}

fn put_node_id(buf: &mut Vec<u8>, id: &NodeId) {
    put_str(buf, &id.node_id);
    put_u64(buf, id.generation);
    match id.addr.ip() {
        IpAddr::V4(ip) => {
            buf.push(4);
            buf.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            buf.push(6);
            buf.extend_from_slice(&ip.octets());
        }
    }
    put_u16(buf, id.addr.port());
}

fn put_digest(buf: &mut Vec<u8>, digest: &[(NodeId, NodeDigest)]) {
    put_u16(buf, digest.len().min(u16::MAX as usize) as u16);
    for (id, d) in digest.iter().take(u16::MAX as usize) {
        put_node_id(buf, id);
        put_u64(buf, d.heartbeat);
        put_u64(buf, d.last_gc_version);
        put_u64(buf, d.max_version);
    }
}

fn put_ops(ops: &mut Vec<u8>, delta: &[NodeDelta]) {
    for nd in delta {
        ops.push(OP_NODE);
        put_node_id(ops, &nd.id);
        put_u64(ops, nd.last_gc_version);
        put_u64(ops, nd.from_version_excluded);
        let mut maxes = nd.set_max_version.iter().peekable();
        for (i, kv) in nd.key_values.iter().enumerate() {
            while let Some((_, v)) = maxes.next_if(|(at, _)| *at == i) {
                ops.push(OP_MAX_VERSION);
                put_u64(ops, *v);
            }
            ops.push(OP_KV);
            put_str(ops, &kv.key);
            put_str(ops, &kv.value);
            put_u64(ops, kv.version);
            ops.push(match kv.status {
                Status::Set => 0,
                Status::Delete => 1,
                Status::DeleteAfterTtl => 2,
            });
        }
        for (_, v) in maxes {
            ops.push(OP_MAX_VERSION);
            put_u64(ops, *v);
        }
    }
}

fn put_delta(buf: &mut Vec<u8>, delta: &[NodeDelta], blocks: Blocks) {
    let mut ops = Vec::new();
    put_ops(&mut ops, delta);
    let block = match blocks {
        Blocks::Chitchat => BLOCK_THRESHOLD,
        Blocks::Raw => MAX_BLOCK,
    };
    let mut scratch = vec![0u8; block];
    for chunk in ops.chunks(block) {
        let compressed = match blocks {
            // chitchat compresses into a buffer the size of the input and
            // keeps the block raw when that does not fit.
            Blocks::Chitchat => {
                zstd::bulk::compress_to_buffer(chunk, &mut scratch[..chunk.len()], 0).ok()
            }
            Blocks::Raw => None,
        };
        match compressed {
            Some(n) => {
                buf.push(BLOCK_ZSTD);
                put_u16(buf, n as u16);
                buf.extend_from_slice(&scratch[..n]);
            }
            None => {
                buf.push(BLOCK_RAW);
                put_u16(buf, chunk.len() as u16);
                buf.extend_from_slice(chunk);
            }
        }
    }
    buf.push(BLOCK_END);
}

/// Encodes a message the way chitchat 0.11.2 does.
pub fn encode(msg: &Message, blocks: Blocks) -> Vec<u8> {
    let mut buf = Vec::new();
    put_u16(&mut buf, MAGIC);
    buf.push(VERSION);
    match msg {
        Message::Syn { cluster_id, digest } => {
            buf.push(0);
            put_digest(&mut buf, digest);
            put_str(&mut buf, cluster_id);
        }
        Message::SynAck { digest, delta } => {
            buf.push(1);
            put_digest(&mut buf, digest);
            put_delta(&mut buf, delta, blocks);
        }
        Message::Ack { delta } => {
            buf.push(2);
            put_delta(&mut buf, delta, blocks);
        }
        Message::BadCluster => buf.push(3),
    }
    buf
}

#[cfg(test)]
mod tests {
    use chitchat::{ChitchatMessage, Deserializable};
    use proptest::prelude::*;

    use super::*;

    fn seeds() -> Vec<Vec<u8>> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/seeds/gossip_frame");
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if let Some(raw) = name
                .strip_prefix("raw-")
                .map(|_| std::fs::read(&path).unwrap())
            {
                out.push(raw);
            }
        }
        assert!(out.len() >= 32, "the real gossip messages are missing");
        out
    }

    fn id(name: &str, generation: u64) -> NodeId {
        NodeId {
            node_id: name.into(),
            generation,
            addr: "127.0.0.1:9470".parse().unwrap(),
        }
    }

    #[test]
    fn real_chitchat_messages_re_encode_byte_for_byte() {
        let mut with_delta = 0;
        for bytes in seeds() {
            let msg = decode(&bytes, &Limits::default()).unwrap();
            if matches!(msg, Message::SynAck { .. } | Message::Ack { .. }) {
                with_delta += 1;
            }
            assert_eq!(encode(&msg, Blocks::Chitchat), bytes);
        }
        assert!(with_delta > 0);
    }

    #[test]
    fn chitchat_reads_the_raw_encoding_as_the_same_message() {
        for bytes in seeds() {
            let ours = decode(&bytes, &Limits::default()).unwrap();
            let raw = encode(&ours, Blocks::Raw);
            // chitchat decodes both; ours decodes both to the same message.
            let a = ChitchatMessage::deserialize(&mut &bytes[..]).unwrap();
            let b = ChitchatMessage::deserialize(&mut &raw[..]).unwrap();
            assert_eq!(decode(&raw, &Limits::default()).unwrap(), ours);
            // Equal up to the recorded serialized length of the delta.
            let strip = |m: &ChitchatMessage| {
                let s = format!("{m:?}");
                s.split("serialized_len")
                    .next()
                    .unwrap_or_default()
                    .to_string()
            };
            assert_eq!(strip(&a), strip(&b));
        }
    }

    #[test]
    fn an_inner_block_bomb_stops_at_the_cap() {
        // One 16 KiB block of zeros compresses to a few bytes; repeat it.
        let block = zstd::bulk::compress(&vec![0u8; MAX_BLOCK], 0).unwrap();
        let mut bytes = Vec::new();
        put_u16(&mut bytes, MAGIC);
        bytes.push(VERSION);
        bytes.push(2);
        for _ in 0..64 {
            bytes.push(BLOCK_ZSTD);
            put_u16(&mut bytes, block.len() as u16);
            bytes.extend_from_slice(&block);
        }
        bytes.push(BLOCK_END);
        let limits = Limits {
            max_expanded: 1 << 20,
            ..Limits::default()
        };
        assert_eq!(decode(&bytes, &limits), Err(WireError::Bomb(1 << 20)));
    }

    #[test]
    fn inconsistent_deltas_are_refused() {
        let kv = |v| KeyValue {
            key: "k".into(),
            value: "v".into(),
            version: v,
            status: Status::Set,
        };
        let nd = NodeDelta {
            id: id("a", 1),
            last_gc_version: 0,
            from_version_excluded: 0,
            key_values: vec![kv(2), kv(1)],
            set_max_version: vec![],
        };
        let bytes = encode(
            &Message::Ack {
                delta: vec![nd.clone()],
            },
            Blocks::Raw,
        );
        assert_eq!(
            decode(&bytes, &Limits::default()),
            Err(WireError::Inconsistent("versions not increasing"))
        );
        let twice = encode(
            &Message::Ack {
                delta: vec![
                    NodeDelta {
                        key_values: vec![],
                        ..nd.clone()
                    },
                    NodeDelta {
                        key_values: vec![],
                        ..nd
                    },
                ],
            },
            Blocks::Raw,
        );
        assert_eq!(
            decode(&twice, &Limits::default()),
            Err(WireError::Inconsistent("a node appears twice"))
        );
    }

    #[test]
    fn the_node_cap_applies_to_digests_and_deltas() {
        let digest: Vec<_> = (0..10)
            .map(|i| (id(&format!("n{i}"), 1), NodeDigest::default()))
            .collect();
        let bytes = encode(
            &Message::Syn {
                cluster_id: "c".into(),
                digest,
            },
            Blocks::Raw,
        );
        let limits = Limits {
            max_nodes: 9,
            ..Limits::default()
        };
        assert_eq!(decode(&bytes, &limits), Err(WireError::TooManyNodes(10)));
    }

    fn arb_delta() -> impl Strategy<Value = Vec<NodeDelta>> {
        let kvs = proptest::collection::vec(("[a-z:]{1,12}", ".{0,40}", 1u64..4, 0u8..3), 0..6);
        let node = (
            "[a-z0-9/:.]{1,30}",
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            kvs,
            proptest::option::of(any::<u64>()),
        );
        proptest::collection::vec(node, 0..5).prop_map(|nodes| {
            nodes
                .into_iter()
                .enumerate()
                .map(|(i, (name, generation, gc, from, kvs, max))| {
                    let mut version = 0;
                    let key_values: Vec<KeyValue> = kvs
                        .into_iter()
                        .map(|(key, value, step, st)| {
                            version += step;
                            KeyValue {
                                key,
                                value,
                                version,
                                status: [Status::Set, Status::Delete, Status::DeleteAfterTtl]
                                    [st as usize],
                            }
                        })
                        .collect();
                    let set_max_version =
                        max.map(|m| vec![(key_values.len(), m)]).unwrap_or_default();
                    NodeDelta {
                        id: id(&format!("{i}{name}"), generation),
                        last_gc_version: gc,
                        from_version_excluded: from,
                        key_values,
                        set_max_version,
                    }
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn round_trips_in_both_block_modes(delta in arb_delta(), hb in any::<u64>()) {
            let digest: Vec<_> = delta.iter().map(|d| (d.id.clone(), NodeDigest { heartbeat: hb, ..Default::default() })).collect();
            let msg = Message::SynAck { digest, delta };
            for blocks in [Blocks::Chitchat, Blocks::Raw] {
                let bytes = encode(&msg, blocks);
                prop_assert_eq!(decode(&bytes, &Limits::default()).unwrap(), msg.clone());
                // chitchat reads whatever we write.
                prop_assert!(ChitchatMessage::deserialize(&mut &bytes[..]).is_ok());
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode(&bytes, &Limits::default());
        }

        #[test]
        fn truncations_are_errors(delta in arb_delta(), cut in 0usize..4096) {
            let bytes = encode(&Message::Ack { delta }, Blocks::Raw);
            if cut < bytes.len() {
                prop_assert!(decode(&bytes[..cut], &Limits::default()).is_err());
            }
        }
    }
}
