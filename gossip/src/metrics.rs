//! Metric names of the gossip layer, declared once.

pub const MEMBERS: &str = "meshnode_gossip_members";
pub const BYTES: &str = "meshnode_gossip_bytes_total";
pub const MESSAGES: &str = "meshnode_gossip_messages_total";
pub const DROPPED: &str = "meshnode_gossip_dropped_total";
pub const BAD_RECORDS: &str = "meshnode_gossip_bad_records";
pub const REFUSED: &str = "meshnode_gossip_refused_total";

pub fn describe() {
    metrics::describe_gauge!(
        MEMBERS,
        "Members of the gossip pool by state (alive, dead, left)"
    );
    metrics::describe_counter!(
        BYTES,
        metrics::Unit::Bytes,
        "Gossip bytes by direction (sent, received)"
    );
    metrics::describe_counter!(MESSAGES, "Gossip messages by direction (sent, received)");
    metrics::describe_counter!(
        DROPPED,
        "Gossip frames dropped, by reason (queue_full, wrong_pool, oversized, malformed, dial)"
    );
    metrics::describe_counter!(
        REFUSED,
        "Gossip content the gatekeeper removed before chitchat saw it, by pool and reason (bad_signature, unverified, unverified_digest, bad_cert, bad_role, self, foreign_id, inconsistent, stale_generation, generation_churn, too_many_keys, too_many_nodes, pool_full, oversized, malformed, ...)"
    );
    metrics::describe_gauge!(
        BAD_RECORDS,
        "Gossiped records skipped in the current catalog because they failed to decode"
    );
}
