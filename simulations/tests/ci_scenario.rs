//! The CI-sized scenario: 100 nodes in virtual time. Bounds, not exact
//! traces: chitchat chooses gossip peers with OS entropy.

use std::time::Duration;

use meshnode_simulations::{runtime, scenarios};

#[test]
fn hundred_nodes_converge_near_the_bound_and_detect_without_false_failures() {
    let rt = runtime().unwrap();
    let seed = 7;
    let c = rt.block_on(scenarios::convergence(100, seed)).unwrap();
    eprintln!("{c:?}");
    // Lower bound 4 rounds; more than 5x that would mean the key schema or
    // timing broke dissemination.
    assert!(c.rounds >= f64::from(c.lower_bound_rounds), "{c:?}");
    assert!(c.rounds <= 20.0, "{c:?}");
    assert_eq!(c.oversize_messages, 0, "{c:?}");

    let d = rt
        .block_on(scenarios::detection(
            100,
            0.0,
            Duration::from_secs(20),
            seed,
        ))
        .unwrap();
    eprintln!("{d:?}");
    assert_eq!(d.false_failures, 0, "{d:?}");
    let t = d.detection_s.unwrap_or(f64::INFINITY);
    assert!((1.0..=6.0).contains(&t), "{d:?}");

    let p = rt
        .block_on(scenarios::partition(100, Duration::from_secs(20), seed))
        .unwrap();
    eprintln!("{p:?}");
    assert!(p.each_side_sees_half_s.is_some(), "{p:?}");
    assert!(p.reconverge_s.is_some_and(|s| s <= 10.0), "{p:?}");
}

/// `meshnode-sim corpus` writes these as the fuzz target's seeds: they must be
/// real messages of every kind, and survive both codecs.
#[test]
fn corpus_samples_are_real_messages_of_every_kind() {
    use meshnode_gossip::chitchat::ChitchatMessage;
    use meshnode_gossip::frame::Codec;

    let rt = runtime().unwrap();
    let samples = rt.block_on(scenarios::corpus(11)).unwrap();
    assert!(samples.len() >= 20, "only {} samples", samples.len());
    let (mut syn, mut syn_ack, mut ack) = (0, 0, 0);
    for raw in &samples {
        let msg = Codec::Raw.decode(raw).unwrap();
        match &msg {
            ChitchatMessage::Syn { .. } => syn += 1,
            ChitchatMessage::SynAck { .. } => syn_ack += 1,
            ChitchatMessage::Ack { .. } => ack += 1,
            ChitchatMessage::BadCluster => {}
        }
        let frame = Codec::Zstd.encode(raw).unwrap();
        assert_eq!(Codec::Zstd.decode(&frame).unwrap(), msg);
    }
    assert!(syn > 0 && syn_ack > 0 && ack > 0, "{syn} {syn_ack} {ack}");
}
