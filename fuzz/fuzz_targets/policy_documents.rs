//! Policy documents arrive in any member's `pol:` values and on the admin
//! API: the envelope decoder, the signature and signer checks and the TOML
//! schema must refuse any input without a panic. The input is tried as the
//! text form itself, as the base64 of raw bytes (to reach the envelope's
//! bincode decoder) and as a document's TOML source.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use meshnode_node::policy::schema;
use meshnode_transport::pki::policy::SignedDocument;
use meshnode_transport::pki::{unix_now, Ca, Role};
use meshnode_transport::tls::TlsMaterial;

fn trust() -> &'static TlsMaterial {
    static T: OnceLock<TlsMaterial> = OnceLock::new();
    T.get_or_init(|| {
        let ca = Ca::generate("acme", Duration::from_secs(86_400)).expect("CA");
        let node = ca
            .issue("east", "fuzz", Role::Node, Duration::from_secs(86_400))
            .expect("node");
        TlsMaterial::from_pem(ca.cert_pem(), &node.cert_pem, &node.key_pem).expect("material")
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let now = unix_now();
    let _ = SignedDocument::verify(&text, trust(), now);
    let b64 = base64::engine::general_purpose::STANDARD.encode(data);
    let _ = SignedDocument::verify(&b64, trust(), now);
    let _ = schema::parse(&text);
});
