//! What a join server reads from anyone (no certificate needed) and what a
//! joiner reads back, plus tokens and revocation entries: any bytes, no panic;
//! what decodes re-encodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshnode_transport::join::{decode_request, decode_response, encode_request, encode_response};
use meshnode_transport::pki::revocation::SignedRevocation;
use meshnode_transport::pki::token::Token;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = decode_request(data) {
        let again = encode_request(&r).expect("a decoded request encodes");
        assert_eq!(decode_request(&again).expect("round trip"), r);
    }
    if let Ok(r) = decode_response(data) {
        let again = encode_response(&r).expect("a decoded response encodes");
        assert_eq!(decode_response(&again).expect("round trip"), r);
    }
    let text = String::from_utf8_lossy(data);
    if let Ok(t) = Token::decode(&text) {
        assert_eq!(Token::decode(&t.encode()).expect("round trip"), t);
    }
    // No CA certificate can verify fuzz input; this exercises the decoder.
    let _ = SignedRevocation::verify(&text, b"", "acme");
});
