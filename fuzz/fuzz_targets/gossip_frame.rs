//! Gossip frames arrive from pool members, raw (`/1`) or zstd (`/2`). Any
//! bytes: no panic, bounded memory, and a frame that decodes re-encodes to one
//! that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshnode_gossip::chitchat::Serializable;
use meshnode_gossip::frame::Codec;

fuzz_target!(|data: &[u8]| {
    for codec in [Codec::Raw, Codec::Zstd] {
        if let Ok(msg) = codec.decode(data) {
            let again = codec.encode(&msg.serialize_to_vec()).expect("encode");
            assert_eq!(codec.decode(&again).expect("decode"), msg);
        }
    }
});
