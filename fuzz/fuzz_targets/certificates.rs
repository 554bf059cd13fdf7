//! Certificates and CSRs arrive from peers (TLS, gossip `cert` values, join
//! and renewal requests): every parser of them takes any bytes without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshnode_transport::pki::{self, PeerCert};

fuzz_target!(|data: &[u8]| {
    let _ = PeerCert::from_der(data);
    let _ = pki::not_after(data);
    let _ = pki::csr_key_id(data);
    let _ = pki::sign::public_key(data);
    let _ = pki::mesh_of_ca_der(data);
    let text = String::from_utf8_lossy(data);
    let _ = PeerCert::from_pem(&text);
    let _ = pki::first_cert_der(&text);
    let _ = pki::mesh_of_ca_pem(&text);
});
