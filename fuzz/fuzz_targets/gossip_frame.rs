//! Gossip frames arrive from pool members, raw (`/1`), zstd (`/2`) or zstd
//! with the pool's dictionary (`/3`). Any
//! bytes: no panic, bounded memory, and a frame that decodes re-encodes to one
//! that decodes to the same message, for messages without a delta.
//!
//! chitchat's `Delta` keeps the length of the bytes it was decoded from and
//! asserts, when serialized, that its own encoding has that length. Another
//! valid encoding of the same operations (chitchat's inner compression) then
//! panics on re-serialization. Nodes never re-serialize a received message
//! (chitchat applies deltas and builds new ones), so only decoding is fuzzed
//! for SYN-ACK and ACK.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshnode_gossip::chitchat::{ChitchatMessage, Serializable};
use meshnode_gossip::frame::{Codec, Dictionary};

fuzz_target!(|data: &[u8]| {
    let dict = Dictionary::for_pool("acme/east", "spiffe://acme/cluster/east/node/");
    for codec in [Codec::Raw, Codec::Zstd, Codec::Pool(dict)] {
        if let Ok(msg) = codec.decode(data) {
            if matches!(msg, ChitchatMessage::SynAck { .. } | ChitchatMessage::Ack { .. }) {
                continue;
            }
            let again = codec.encode(&msg.serialize_to_vec()).expect("encode");
            assert_eq!(codec.decode(&again).expect("decode"), msg);
        }
    }
});
