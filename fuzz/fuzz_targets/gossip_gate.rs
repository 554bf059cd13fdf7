//! What a pool member sends reaches the gate: meshnode's own chitchat codec
//! (`wire`) and the checks in `Gate::admit`. Any bytes: no panic, bounded
//! memory, a message that decodes re-encodes (as chitchat writes it) to one
//! that decodes to the same message, and nothing the fuzzer makes up (it holds
//! no key of the mesh) passes as a node's values.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use meshnode_gossip::gate::{Authority, Gate};
use meshnode_gossip::wire::{self, Blocks, Limits, Message};
use meshnode_gossip::PoolKind;
use meshnode_transport::pki::{Ca, Identity, Role};
use meshnode_transport::tls::TlsMaterial;

fn authority() -> Arc<dyn Authority> {
    static A: OnceLock<Arc<dyn Authority>> = OnceLock::new();
    A.get_or_init(|| {
        let day = Duration::from_secs(86_400);
        let ca = Ca::generate("acme", day).expect("CA");
        let any = ca.issue("east", "fuzz", Role::Node, day).expect("issue");
        Arc::new(TlsMaterial::from_pem(ca.cert_pem(), &any.cert_pem, &any.key_pem).expect("tls"))
    })
    .clone()
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let Ok(msg) = wire::decode(data, &limits) else {
        return;
    };
    let again = wire::encode(&msg, Blocks::Chitchat);
    assert_eq!(wire::decode(&again, &limits).expect("re-decode"), msg);
    let me = Identity::new("acme", "east", "me").expect("id");
    let mut gate = Gate::new(
        "acme/east".into(),
        PoolKind::Lan { cluster: "east".into() },
        &me,
        1,
        authority(),
        limits,
    );
    let verdict = gate.admit(msg, Duration::from_secs(5), 1_800_000_000);
    if let Some(Message::SynAck { delta, .. } | Message::Ack { delta }) = verdict.message {
        assert!(delta.is_empty(), "a made-up delta passed the gate: {delta:?}");
    }
});
