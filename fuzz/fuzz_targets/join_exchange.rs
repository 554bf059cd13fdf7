//! The CA side of a join or renewal, up to the CA's own state: a request from
//! anyone is decoded, its token proof checked against a token key, its CSR
//! and name parsed, a renewal's certificate read. Any bytes: no panic, and a
//! proof made for other bytes never verifies.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use meshnode_transport::join::{decode_request, Request};
use meshnode_transport::pki::token::{proof_input, verify_proof, Token};
use meshnode_transport::pki::{check_name, csr_key_id, PeerCert};

static TOKEN: LazyLock<(Token, String)> = LazyLock::new(|| {
    let t = Token::generate([7; 32], u64::MAX);
    let pk = t.public_key_hex().expect("public key");
    (t, pk)
});

fuzz_target!(|data: &[u8]| {
    let (token, pk) = &*TOKEN;
    match decode_request(data) {
        Ok(Request::Join {
            token_id,
            proof,
            csr,
            node,
            cluster,
        }) => {
            let input = proof_input(&token.ca_fingerprint, &token_id, &csr, &node, cluster.as_deref());
            // The fuzzer cannot sign with the token's key.
            assert!(!verify_proof(pk, &input, &proof));
            let _ = csr_key_id(&csr);
            let _ = check_name("node", &node);
            if let Some(c) = &cluster {
                let _ = check_name("cluster", c);
            }
        }
        Ok(Request::Renew { cert, csr }) => {
            let _ = PeerCert::from_der(&cert);
            let _ = csr_key_id(&csr);
        }
        Err(_) => {}
    }
});
