//! The CI-sized scenario: 50 nodes on the plane (probes, pushes, paced
//! anti-entropy) in virtual time, debug build. Bounds, not exact traces:
//! chitchat chooses gossip peers with OS entropy.

use std::time::Duration;

use meshnode_simulations::scenarios::Shape;
use meshnode_simulations::{runtime, scenarios};

#[test]
fn a_pool_converges_near_the_bound_and_detects_without_false_failures() {
    let rt = runtime().unwrap();
    let seed = 7;
    let n = 50;
    let c = rt
        .block_on(scenarios::convergence(n, seed, Shape::Plane, false))
        .unwrap();
    eprintln!("{c:?}");
    // Push hops of 100 ms: at least the bound for ln N + 4 peers (2), and
    // far from what anti-entropy alone would take (its pace is seconds).
    assert!(c.rounds >= f64::from(c.lower_bound_rounds), "{c:?}");
    assert!(c.rounds <= 10.0, "{c:?}");
    assert_eq!(c.oversize_messages, 0, "{c:?}");
    // Idle: probes (about 2 a second, each with its ACK) and paced
    // exchanges; chitchat alone spent about 12,000 B/s per node at N = 30.
    assert!(c.idle_model < 1_000.0, "{c:?}");

    let d = rt
        .block_on(scenarios::detection(
            n,
            0.0,
            Duration::from_secs(20),
            seed,
            Shape::Plane,
        ))
        .unwrap();
    eprintln!("{d:?}");
    assert_eq!(d.false_failures, 0, "{d:?}");
    let t = d.detection_s.unwrap_or(f64::INFINITY);
    assert!((0.5..=8.0).contains(&t), "{d:?}");

    // Each side must find 25 dead members by probing (two probes a second
    // per node) and let their suspicions run out: about 40 s (release run,
    // seed 7: 43 s).
    let p = rt
        .block_on(scenarios::partition(
            n,
            Duration::from_secs(60),
            seed,
            Shape::Plane,
        ))
        .unwrap();
    eprintln!("{p:?}");
    assert!(p.each_side_sees_half_s.is_some(), "{p:?}");
    assert!(p.reconverge_s.is_some_and(|s| s <= 20.0), "{p:?}");
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

/// Policy documents and revocations at N = 1,000: every node runs the
/// replica plan on its own lagging view through applies, a tenth of the
/// pool dying, all k holders of one object dying, joins, a split and its
/// heal. Once settled, every object has between 1 and k live copies (the
/// scheme before: one per node) and every node holds every newest version.
#[test]
fn at_a_thousand_nodes_each_object_settles_on_k_copies_after_every_phase() {
    use meshnode_simulations::replicas::{run, ReplicaConfig};
    let r = run(ReplicaConfig {
        n: 1_000,
        documents: 8,
        revocations: 4,
        seed: 7,
        ..ReplicaConfig::default()
    });
    for p in &r.phases {
        eprintln!("{p:?}");
    }
    for p in r.phases.iter().filter(|p| !p.name.starts_with("split")) {
        let t = p.settled_after_s.unwrap_or(f64::INFINITY);
        assert!(t <= 10.0, "{p:?}");
        // An applied version: its origin and the k holders, briefly; a
        // heal: both halves' holders until they see each other.
        let bound = if p.name.contains("heals") {
            2 * r.config.k
        } else {
            r.config.k + 1
        };
        assert!(p.peak_copies <= bound, "{p:?}");
    }
    assert_eq!(
        (r.settled_min, r.settled_max),
        (r.config.k, r.config.k),
        "{r:?}"
    );
}
