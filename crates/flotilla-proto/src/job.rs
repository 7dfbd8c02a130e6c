//! Jobs: what a client submits, what travels to an agent-node, and the record kept in KV.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A job as a client submits it: the body of `POST /jobs`, or a message published on
/// [`crate::names::SUBJECT_SUBMIT`]. Nothing here is trusted yet; validation turns it into a
/// [`JobRequest`]. Every field is optional at this level so that a missing required field gets
/// a validation error naming it rather than a decoding error.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// Only for direct NATS submissions: the id the publisher wants (see `ids::is_valid_job_id`).
    /// Over HTTP the server assigns it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    #[serde(default)]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub engine: Option<String>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub profile: Option<String>,
    #[serde(default)]
    pub prompt_vars: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    pub claude_md_vars: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub system_prompt: Option<String>,
    #[serde(default)]
    pub allowed_tools: Option<Vec<String>>,
    #[serde(default)]
    pub max_turns: Option<i64>,
    #[serde(default)]
    pub max_budget_usd: Option<f64>,
    #[serde(default)]
    pub output_format: Option<String>,
    #[serde(default)]
    pub mcp_config: Option<Value>,
    #[serde(default)]
    pub plugins: Option<Vec<String>>,
    #[serde(default)]
    pub dry_run: Option<bool>,
    #[serde(default)]
    pub webhook_url: Option<String>,
    #[serde(default)]
    pub timeout_seconds: Option<i64>,
    #[serde(default)]
    pub resources: Option<ResourcesRequest>,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// `resources` as submitted: `{"memory": "512m", "cpus": 0.5}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesRequest {
    #[serde(default)]
    pub memory: Option<String>,
    #[serde(default)]
    pub cpus: Option<f64>,
}

/// Resolved container resources.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    pub memory_bytes: i64,
    /// CPU quota in billionths of a CPU (Docker's `NanoCpus`).
    pub nano_cpus: i64,
}

/// A validated job with every default resolved: what an agent-node needs to run it. Travels on
/// [`crate::names::SUBJECT_RUN`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    pub job_id: String,
    pub agent_id: String,
    pub engine: String,
    pub profile: String,
    /// The prompt, or the rendered profile template. For the `shell` engine, the script.
    pub prompt: String,
    #[serde(default)]
    pub system_prompt: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub allowed_tools: Vec<String>,
    #[serde(default)]
    pub max_turns: Option<u32>,
    #[serde(default)]
    pub max_budget_usd: Option<f64>,
    #[serde(default)]
    pub output_format: Option<String>,
    #[serde(default)]
    pub mcp_config: Option<Value>,
    #[serde(default)]
    pub plugins: Vec<String>,
    /// Rendered agent-instructions file (CLAUDE.md or the engine's equivalent), if any.
    #[serde(default)]
    pub instructions: Option<String>,
    /// The profile's pre-hook: a shell script run in the container before the engine; its
    /// failure fails the job.
    #[serde(default)]
    pub pre_hook: Option<String>,
    /// The profile's post-hook, run after the engine whatever the outcome, with `JOB_STATUS`
    /// (`completed`/`failed`) and `JOB_EXIT_CODE` in its environment.
    #[serde(default)]
    pub post_hook: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub webhook_url: Option<String>,
    pub timeout_seconds: u64,
    pub resources: Resources,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
}

/// The job record stored in KV under `job.<job_id>`. Its shape is the `GET /jobs/{id}` body.
/// Every change to it is a compare-and-set on the KV revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_id: String,
    pub status: JobStatus,
    pub agent_id: String,
    pub engine: String,
    pub profile: String,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub exit_code: Option<i64>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub result: Option<JobResult>,
    /// 0 while pending; raised each time a node starts the job.
    #[serde(default)]
    pub attempt: u32,
    #[serde(default)]
    pub node_id: Option<String>,
    #[serde(default)]
    pub usage: Option<Usage>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub timeout_seconds: u64,
    /// Every attempt so far, oldest first, with why each ended.
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    /// Internal: the JetStream reply subject of the message behind the running attempt, so the
    /// dispatcher can hand the job back at once if its node dies. Not shown over HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_subject: Option<String>,
}

/// One try at running a job on a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub attempt: u32,
    pub node_id: String,
    pub started_at: DateTime<Utc>,
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    /// Why the attempt ended: `completed`, `exited with code 3`, `node lost`, ...
    #[serde(default)]
    pub outcome: Option<String>,
    /// Milliseconds from the node receiving the job to its process running (warm pool hit or
    /// cold start).
    #[serde(default)]
    pub start_ms: Option<f64>,
}

impl JobRecord {
    /// The record a freshly accepted job starts with.
    pub fn pending(request: &JobRequest) -> Self {
        Self {
            job_id: request.job_id.clone(),
            status: JobStatus::Pending,
            agent_id: request.agent_id.clone(),
            engine: request.engine.clone(),
            profile: request.profile.clone(),
            created_at: request.created_at,
            started_at: None,
            finished_at: None,
            exit_code: None,
            error: None,
            result: None,
            attempt: 0,
            node_id: None,
            usage: None,
            metadata: request.metadata.clone(),
            dry_run: request.dry_run,
            timeout_seconds: request.timeout_seconds,
            attempts: Vec::new(),
            ack_subject: None,
        }
    }

    /// Closes the current attempt (if it is still open) with `outcome`.
    pub fn end_attempt(&mut self, outcome: &str, at: DateTime<Utc>) {
        let current = self.attempt;
        if let Some(attempt) = self
            .attempts
            .iter_mut()
            .rev()
            .find(|a| a.attempt == current)
            && attempt.finished_at.is_none()
        {
            attempt.finished_at = Some(at);
            attempt.outcome = Some(outcome.to_owned());
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Pending,
        JobStatus::Running,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == s)
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The structured outcome of a job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    /// The agent's final answer; for the shell engine, its standard output.
    pub text: String,
    #[serde(default)]
    pub exit_code: Option<i64>,
    #[serde(default)]
    pub session_id: Option<String>,
    #[serde(default)]
    pub num_turns: Option<u32>,
    #[serde(default)]
    pub cost_usd: Option<f64>,
    /// The engine's own JSON output, if it produced any. For a dry run:
    /// `{"dry_run": true, "engine", "binary", "args"}`.
    #[serde(default)]
    pub raw: Option<Value>,
    /// The last 4 KiB of combined output.
    #[serde(default)]
    pub logs_tail: String,
    /// True when `text` was cut to the result size cap.
    #[serde(default)]
    pub truncated: bool,
    /// Dry run: the exact argv that would have run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip() {
        for status in JobStatus::ALL {
            assert_eq!(JobStatus::parse(status.as_str()), Some(status));
            let json = serde_json::to_string(&status).unwrap();
            assert_eq!(json, format!("\"{status}\""));
        }
        assert_eq!(JobStatus::parse("done"), None);
    }

    #[test]
    fn submit_rejects_unknown_fields() {
        let err = serde_json::from_str::<SubmitRequest>(r#"{"agent_id":"a","colour":"red"}"#)
            .unwrap_err();
        assert!(err.to_string().contains("unknown field `colour`"), "{err}");
    }
}
