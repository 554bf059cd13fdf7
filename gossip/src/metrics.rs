//! Metric names of the gossip layer, declared once.

pub const MEMBERS: &str = "meshnode_gossip_members";
pub const BYTES: &str = "meshnode_gossip_bytes_total";
pub const MESSAGES: &str = "meshnode_gossip_messages_total";
pub const DROPPED: &str = "meshnode_gossip_dropped_total";
pub const BAD_RECORDS: &str = "meshnode_gossip_bad_records";
pub const REFUSED: &str = "meshnode_gossip_refused_total";
pub const PUSHES: &str = "meshnode_gossip_pushes_total";
pub const SYNS_HELD: &str = "meshnode_gossip_syns_held_total";
pub const PROBES: &str = "meshnode_gossip_probes_total";
pub const PROBE_RTT: &str = "meshnode_gossip_probe_rtt_seconds";
pub const SUSPICIONS: &str = "meshnode_gossip_suspicions_total";
pub const LOCAL_HEALTH: &str = "meshnode_gossip_local_health";
pub const PAUSES: &str = "meshnode_gossip_pauses_total";

pub fn describe() {
    metrics::describe_histogram!(
        PROBE_RTT,
        metrics::Unit::Seconds,
        "Round-trip time of direct liveness probes answered, by pool"
    );
    metrics::describe_gauge!(
        MEMBERS,
        "Members of the gossip pool by state (alive, dead, left)"
    );
    metrics::describe_counter!(
        BYTES,
        metrics::Unit::Bytes,
        "Gossip bytes by pool (lan, wan) and direction (sent, received, probe_sent)"
    );
    metrics::describe_counter!(
        MESSAGES,
        "Gossip messages by pool (lan, wan) and direction (sent, received)"
    );
    metrics::describe_counter!(
        DROPPED,
        "Gossip frames dropped, by reason (queue_full, wrong_pool, oversized, malformed, dial)"
    );
    metrics::describe_counter!(
        REFUSED,
        "Gossip content the gatekeeper removed before chitchat saw it, by pool and reason (bad_signature, unverified, unverified_digest, bad_cert, bad_role, self, foreign_id, inconsistent, stale_generation, generation_churn, too_many_keys, too_many_nodes, pool_full, oversized, malformed, ...)"
    );
    metrics::describe_counter!(
        PUSHES,
        "Gossip messages pushed to peers, by why (change: a local change; forward: news passed on)"
    );
    metrics::describe_counter!(
        SYNS_HELD,
        "chitchat SYNs held back by anti-entropy pacing (one exchange per interval goes out)"
    );
    metrics::describe_counter!(
        PROBES,
        "Failure-detector probes by kind and result (direct/indirect; acked, failed)"
    );
    metrics::describe_counter!(SUSPICIONS, "Members this node's probes accused, by pool");
    metrics::describe_gauge!(
        LOCAL_HEALTH,
        "Lifeguard local health score by pool: 0 is healthy; probe timeouts scale with 1 + score"
    );
    metrics::describe_counter!(
        PAUSES,
        "Times this node noticed it had been paused (a gap between prober ticks), by pool"
    );
    metrics::describe_gauge!(
        BAD_RECORDS,
        "Gossiped records skipped in the current catalog because they failed to decode"
    );
}
