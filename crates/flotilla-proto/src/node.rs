//! Agent-node heartbeats, kept in [`crate::names::BUCKET_NODES`].

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A node's heartbeat, as of its last beat; an item of `GET /nodes`.
// `schema(required)`: see `JobRecord`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeInfo {
    pub node_id: String,
    pub host: String,
    pub version: String,
    /// Engines this node can run.
    pub engines: Vec<String>,
    pub slots_total: u32,
    /// Jobs on the node now.
    pub slots_busy: u32,
    /// Warm containers per image.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub warm: BTreeMap<String, u32>,
    /// Jobs that found a warm container / had to start cold, since the node started.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub pool_hits: u64,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub pool_misses: u64,
    /// Mean time to prepare a warm container, in milliseconds.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub pool_refill_ms: f64,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    /// A node is live while `now - heartbeat_at < ttl`.
    pub ttl_ms: u64,
    /// The LLM providers this node's jobs can use: those its llm-gateway holds a credential
    /// for. Absent when the node gives jobs no LLM access.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm_providers: Option<Vec<String>>,
    /// What the operator says this node offers (`FLOTILLA_NODE_LABELS`); jobs `require` them.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub labels: BTreeMap<String, String>,
    /// Images this node holds and runs jobs in: its worker image, and the job images it was
    /// found to have.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub images: Vec<String>,
    /// Docker runtimes this node's engine has (`runc`, `runsc`, ...).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub runtimes: Vec<String>,
    /// The job classes whose queues this node pulls from (see `routing::JobClass::id`).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub classes: Vec<String>,
}

impl NodeInfo {
    /// A fresh heartbeat of a node with 4 slots that runs `shell` jobs, for tests.
    #[cfg(any(test, feature = "test-support"))]
    pub fn example(node_id: &str) -> Self {
        let now = Utc::now();
        Self {
            node_id: node_id.to_owned(),
            host: "host".to_owned(),
            version: "0".to_owned(),
            engines: vec!["shell".to_owned()],
            slots_total: 4,
            slots_busy: 0,
            warm: BTreeMap::new(),
            pool_hits: 0,
            pool_misses: 0,
            pool_refill_ms: 0.0,
            started_at: now,
            heartbeat_at: now,
            ttl_ms: 60_000,
            llm_providers: None,
            labels: BTreeMap::new(),
            images: Vec::new(),
            runtimes: Vec::new(),
            classes: Vec::new(),
        }
    }

    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        let age = now.signed_duration_since(self.heartbeat_at);
        age.num_milliseconds() < self.ttl_ms as i64
    }
}
