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
    pub cert_not_after: i64,
    pub cert_expires_in_seconds: i64,
    pub pools: Pools,
    pub local_services: usize,
    pub catalog_services: usize,
    pub catalog_instances: usize,
    pub upstreams: usize,
    pub active_streams: usize,
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pools {
    pub lan: PoolCounts,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PoolCounts {
    pub alive: usize,
    pub dead: usize,
    pub left: usize,
}
