//! Response bodies of the admin API that have no home type elsewhere.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub identity: String,
    pub node: String,
    pub cluster: String,
    pub mesh: String,
    pub gateway: bool,
    /// Unix seconds.
    /// This node holds the CA key.
    pub ca: bool,
    /// Revocation entries in force here.
    pub revocations: usize,
    /// Unix seconds of the last time a peer refused this node's own
    /// certificate as revoked; absent if none did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_as_revoked_at: Option<i64>,
    /// Policy documents held, and whether they are known to be complete.
    pub policy: PolicyState,
    pub cert_not_after: i64,
    pub cert_expires_in_seconds: i64,
    /// Unix seconds; absent if the CA file could not be parsed for it.
    pub ca_not_after: Option<i64>,
    pub ca_expires_in_seconds: Option<i64>,
    pub pools: Pools,
    pub local_services: usize,
    pub catalog_services: usize,
    pub catalog_instances: usize,
    pub upstreams: usize,
    pub active_streams: usize,
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyState {
    /// False until a full state exchange with a peer has completed (or the
    /// node has no seeds): until then the documents held may be out of date.
    pub loaded: bool,
    /// Documents held, tombstones included.
    pub documents: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pools {
    pub lan: PoolCounts,
    /// Gateways only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wan: Option<PoolCounts>,
}

/// Another cluster's service in `/v1/services`, merged over the local gateways.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RemoteEntry {
    pub cluster: String,
    /// Always true: tells these entries apart from local instances.
    pub remote: bool,
    /// `passing` when reachable with healthy instances, else `critical`.
    pub health: String,
    pub healthy: u32,
    pub reachable: bool,
    pub tags: Vec<String>,
    /// The remote cluster's gateways.
    pub gateways: Vec<String>,
    /// The local gateways that forward there.
    pub via: Vec<String>,
    pub rtt_ms: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PoolCounts {
    pub alive: usize,
    pub dead: usize,
    pub left: usize,
}
