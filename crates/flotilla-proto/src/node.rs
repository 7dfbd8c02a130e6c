//! Agent-node heartbeats, kept in [`crate::names::BUCKET_NODES`].

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node_id: String,
    pub host: String,
    pub version: String,
    /// Engines this node can run.
    pub engines: Vec<String>,
    pub slots_total: u32,
    pub slots_busy: u32,
    /// Warm containers per image.
    #[serde(default)]
    pub warm: BTreeMap<String, u32>,
    /// Jobs that found a warm container / had to start cold, since the node started.
    #[serde(default)]
    pub pool_hits: u64,
    #[serde(default)]
    pub pool_misses: u64,
    /// Mean time to prepare a warm container, in milliseconds.
    #[serde(default)]
    pub pool_refill_ms: f64,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    /// A node is live while `now - heartbeat_at < ttl`.
    pub ttl_ms: u64,
}

impl NodeInfo {
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        let age = now.signed_duration_since(self.heartbeat_at);
        age.num_milliseconds() < self.ttl_ms as i64
    }
}
