//! The tunnel header is the first thing a receiver reads from a peer's stream.
//! Any bytes: no panic, and whatever decodes re-encodes to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshnode_transport::tunnel::{decode_frame, decode_header, encode_header};

fuzz_target!(|data: &[u8]| {
    let _ = decode_header(data);
    if let Ok(h) = decode_frame(data) {
        let again = encode_header(&h).expect("a decoded header encodes");
        assert_eq!(decode_frame(&again).expect("round trip"), h);
    }
});
