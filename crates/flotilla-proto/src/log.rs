//! Log chunks: a job's output, in order, on `flotilla.logs.<job_id>`.

use serde::{Deserialize, Serialize};

use crate::JobStatus;

/// One piece of a job's output. Within an attempt, `seq` starts at 0 and rises by one per
/// chunk; the last chunk of an attempt carries `end`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogChunk {
    pub job_id: String,
    pub attempt: u32,
    pub seq: u64,
    pub stream: LogStream,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// Set on the final chunk of an attempt, after the outcome is recorded in KV.
    #[serde(default)]
    pub end: Option<LogEnd>,
}

/// Which output a log chunk comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    Stdout,
    Stderr,
    /// Messages from Flotilla itself (container start, timeout, cancel, truncation).
    System,
}

/// The end-of-stream marker: the attempt's final status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEnd {
    pub status: JobStatus,
    #[serde(default)]
    pub exit_code: Option<i64>,
    #[serde(default)]
    pub error: Option<String>,
}
