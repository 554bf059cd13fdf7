//! Gossip values come from other members (and, relayed, from members we never
//! talked to). Any string: no panic, and what decodes re-encodes and decodes equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshnode_gossip::federation::{decode_remote, decode_summary, encode_remote, encode_summary};
use meshnode_gossip::keys::{
    decode_check, decode_node, decode_service, encode_check, encode_node, encode_service,
};

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    if let Ok(v) = decode_node(&s) {
        assert_eq!(decode_node(&encode_node(&v).expect("encode")).expect("decode"), v);
    }
    if let Ok(v) = decode_service(&s) {
        assert_eq!(decode_service(&encode_service(&v).expect("encode")).expect("decode"), v);
    }
    if let Ok(v) = decode_check(&s) {
        assert_eq!(decode_check(&encode_check(&v).expect("encode")).expect("decode"), v);
    }
    if let Ok(v) = decode_summary(&s) {
        assert_eq!(decode_summary(&encode_summary(&v).expect("encode")).expect("decode"), v);
    }
    if let Ok(v) = decode_remote(&s) {
        assert_eq!(decode_remote(&encode_remote(&v).expect("encode")).expect("decode"), v);
    }
});
