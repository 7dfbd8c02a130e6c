//! Subjects, streams, consumers, buckets, headers and labels. Nobody else spells these.

use std::time::Duration;

use crate::Priority;

/// Direct publishers send a [`crate::SubmitRequest`] here (no HTTP involved). The dispatcher's
/// intake validates it, records the job as `pending` and queues it for the fleet.
pub const SUBJECT_SUBMIT: &str = "flotilla.submit";
/// Stream capturing [`SUBJECT_SUBMIT`] (work-queue retention).
pub const STREAM_SUBMIT: &str = "FLOTILLA_SUBMIT";
/// Durable pull consumer on [`STREAM_SUBMIT`], shared by every dispatcher replica.
pub const CONSUMER_INTAKE: &str = "intake";

/// Prefix of the subjects of validated jobs waiting for an agent-node, as
/// [`crate::JobRequest`]: one per priority and job class, see [`run_subject`].
pub const SUBJECT_RUN: &str = "flotilla.jobs.run";
/// Stream capturing every [`run_subject`] (work-queue retention).
pub const STREAM_JOBS: &str = "FLOTILLA_JOBS";

/// Where a job of `class` (a [`crate::JobClass::id`]) waits at `priority`.
pub fn run_subject(priority: Priority, class: &str) -> String {
    format!("{SUBJECT_RUN}.{priority}.{class}")
}
/// The durable pull consumer on [`STREAM_JOBS`] for one [`run_subject`], shared by every
/// agent-node that can run the class.
pub fn run_consumer(priority: Priority, class: &str) -> String {
    format!("run-{priority}-{class}")
}
/// Core NATS subject on which every node hears a [`crate::routing::Prefetch`]: pull this
/// image now (`POST /images/prefetch`).
pub const SUBJECT_PREFETCH: &str = "flotilla.images.prefetch";

/// KV bucket with one [`crate::JobClass`] per class that ever had a job, under [`class_key`]:
/// nodes read it to know which queues they can serve.
pub const BUCKET_CLASSES: &str = "flotilla_classes";
pub fn class_key(class: &str) -> String {
    format!("class.{class}")
}

/// Prefix of the per-job log subjects; see [`log_subject`].
pub const SUBJECT_LOGS_PREFIX: &str = "flotilla.logs";
/// Limits-retention stream capturing every log subject, so output can be replayed.
pub const STREAM_LOGS: &str = "FLOTILLA_LOGS";

/// Prefix of the per-job cancel subjects (core NATS); see [`cancel_subject`].
pub const SUBJECT_CANCEL_PREFIX: &str = "flotilla.cancel";

/// Prefix of the subjects where rejected direct submissions are kept, with their reason.
pub const SUBJECT_REJECTED_PREFIX: &str = "flotilla.rejected";
/// Stream keeping rejected submissions for inspection.
pub const STREAM_REJECTED: &str = "FLOTILLA_REJECTED";

/// Dead letters: copies of job messages the fleet gave up on, with the reason in
/// [`HEADER_REJECT_REASON`]. Kept for inspection, never redelivered.
pub const SUBJECT_DEAD_PREFIX: &str = "flotilla.dead";
pub const STREAM_DEAD: &str = "FLOTILLA_DEAD";

/// Published by JetStream when a job message reached its maximum deliveries.
pub fn max_deliveries_advisory() -> String {
    format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{STREAM_JOBS}.*")
}
/// Stream keeping the [`max_deliveries_advisory`] messages (work-queue retention), so that an
/// advisory published while no dispatcher runs waits for one instead of being lost.
pub const STREAM_ADVISORIES: &str = "FLOTILLA_ADVISORIES";
/// Durable pull consumer on [`STREAM_ADVISORIES`], shared by every dispatcher replica.
pub const CONSUMER_DEAD_LETTERS: &str = "dead-letters";

pub fn dead_subject(job_id: &str) -> String {
    format!("{SUBJECT_DEAD_PREFIX}.{job_id}")
}

/// KV bucket holding the configuration every service runs with: one key per file, named by
/// its path (`engines/claude-code.toml`, `profiles/researcher.toml`,
/// `profiles/templates/agent-base.md.j2`), the value the file's text.
pub const BUCKET_CONFIG: &str = "flotilla_config";

/// KV bucket holding the dispatcher leader lease under [`KEY_LEADER`].
pub const BUCKET_DISPATCH: &str = "flotilla_dispatch";
pub const KEY_LEADER: &str = "leader";
/// The api-gateway that exports the fleet-wide metrics holds this lease in
/// [`BUCKET_DISPATCH`], so that a sum over gateway replicas counts each figure once.
pub const KEY_FLEET_METRICS: &str = "fleet-metrics";

/// KV bucket with one [`crate::JobRecord`] per job under [`job_key`].
pub const BUCKET_JOBS: &str = "flotilla_jobs";
/// KV bucket with one [`crate::NodeInfo`] heartbeat per live agent-node under [`node_key`].
pub const BUCKET_NODES: &str = "flotilla_nodes";
/// KV bucket mapping `Idempotency-Key`s to the job they created; see [`idempotency_key`].
pub const BUCKET_IDEMPOTENCY: &str = "flotilla_idempotency";
/// KV bucket with one [`crate::LlmGrant`] per job attempt, under [`crate::llm::grant_key`]
/// (the hash of the job's llm-gateway token).
pub const BUCKET_LLM_GRANTS: &str = "flotilla_llm_grants";

/// KV bucket with one [`crate::Schedule`] per schedule under [`schedule_key`]. The dispatcher
/// leader watches it and creates the jobs as they fall due.
pub const BUCKET_SCHEDULES: &str = "flotilla_schedules";
/// JetStream object store of what jobs leave behind: their collected outputs
/// ([`artifact_object`]) and the patch of their change ([`diff_object`]). Kept as long as
/// the job records.
pub const BUCKET_ARTIFACTS: &str = "flotilla_artifacts";

/// The object holding the output file `path` of attempt `attempt` of job `job_id`. Objects
/// are per attempt: a node may not purge (overwrite) what an earlier attempt stored.
pub fn artifact_object(job_id: &str, attempt: u32, path: &str) -> String {
    format!("{job_id}/{attempt}/files/{path}")
}

/// The object holding an attempt's final `/workspace` (a tar), which a follow-up starts from.
pub fn workspace_object(job_id: &str, attempt: u32) -> String {
    format!("{job_id}/{attempt}/workspace.tar")
}

/// The object holding the patch of an attempt's change (`GET /jobs/{id}/diff`).
pub fn diff_object(job_id: &str, attempt: u32) -> String {
    format!("{job_id}/{attempt}/diff")
}

/// Standard NATS header naming the payload encoding. `application/json` selects JSON;
/// anything else (or no header) means MessagePack with named fields.
/// Where a client of service `service` (`api-gateway`, `agent-node`, `submitter`, ...) gets its
/// replies: pulled job messages, KV answers and consumer deliveries all go to inboxes under it.
/// Each NATS user may subscribe to its own prefix only (`nats.conf`), so no user reads another
/// one's replies, which the shared default `_INBOX.` would allow.
pub fn inbox_prefix(service: &str) -> String {
    format!("_INBOX_{service}")
}

pub const HEADER_CONTENT_TYPE: &str = "Content-Type";
pub const CONTENT_TYPE_JSON: &str = "application/json";
pub const CONTENT_TYPE_MSGPACK: &str = "application/msgpack";
/// Set on messages in [`STREAM_REJECTED`]: why the submission was refused.
pub const HEADER_REJECT_REASON: &str = "Flotilla-Reject-Reason";
/// Set on every message that concerns one job, so tools can route without decoding.
pub const HEADER_JOB_ID: &str = "Flotilla-Job-Id";

/// W3C Trace Context headers (<https://www.w3.org/TR/trace-context/>), carried on job
/// messages so that a job's spans on the node join the trace of the request that submitted it.
/// Lower case, as the W3C spells them; optional on every message.
pub const HEADER_TRACEPARENT: &str = "traceparent";
pub const HEADER_TRACESTATE: &str = "tracestate";
/// Every trace-context header, for propagator adapters.
pub const TRACE_HEADERS: [&str; 2] = [HEADER_TRACEPARENT, HEADER_TRACESTATE];

/// Headers of the webhook POST the dispatcher sends when a job ends (`docs/api.md`).
/// `job.completed`, `job.failed` or `job.cancelled`.
pub const HEADER_WEBHOOK_EVENT: &str = "Flotilla-Event";
/// `<job_id>.<attempt>`: one value per delivery attempt.
pub const HEADER_WEBHOOK_DELIVERY: &str = "Flotilla-Delivery";
/// The job id, the same on every retry, so a receiver can drop duplicates.
pub const HEADER_WEBHOOK_IDEMPOTENCY: &str = "Idempotency-Key";
/// `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" with the webhook secret>`, when the
/// dispatcher has a secret.
pub const HEADER_WEBHOOK_SIGNATURE: &str = "Flotilla-Signature";

/// Container labels. Every container Flotilla creates carries all of them.
pub const LABEL_MANAGED: &str = "flotilla.managed";
pub const LABEL_NODE: &str = "flotilla.node";
pub const LABEL_JOB: &str = "flotilla.job";
pub const LABEL_ATTEMPT: &str = "flotilla.attempt";
/// Which Flotilla system the container belongs to, so that systems sharing a Docker host
/// never reap each other's containers.
pub const LABEL_CLUSTER: &str = "flotilla.cluster";

/// How long JetStream remembers a `Nats-Msg-Id` to drop duplicate publishes.
pub const DEDUPE_WINDOW: Duration = Duration::from_secs(120);

pub fn log_subject(job_id: &str) -> String {
    format!("{SUBJECT_LOGS_PREFIX}.{job_id}")
}

pub fn cancel_subject(job_id: &str) -> String {
    format!("{SUBJECT_CANCEL_PREFIX}.{job_id}")
}

/// Wildcard an agent-node subscribes to for cancels.
pub fn cancel_wildcard() -> String {
    format!("{SUBJECT_CANCEL_PREFIX}.*")
}

pub fn rejected_subject(job_id: Option<&str>) -> String {
    format!("{SUBJECT_REJECTED_PREFIX}.{}", job_id.unwrap_or("_unknown"))
}

pub fn job_key(job_id: &str) -> String {
    format!("job.{job_id}")
}

/// Inverse of [`job_key`].
pub fn job_id_from_key(key: &str) -> Option<&str> {
    key.strip_prefix("job.")
}

pub fn schedule_key(schedule_id: &str) -> String {
    format!("sched.{schedule_id}")
}

/// Inverse of [`schedule_key`].
pub fn schedule_id_from_key(key: &str) -> Option<&str> {
    key.strip_prefix("sched.")
}

/// The host firewall chain (iptables, INPUT) fencing a job network, from the network's id:
/// nodes create it, and whoever removes the network removes it too.
pub fn job_network_chain(network_id: &str) -> String {
    format!("FLOTILLA-{}", &network_id[..network_id.len().min(12)])
}

pub fn node_key(node_id: &str) -> String {
    format!("node.{node_id}")
}

/// Idempotency keys are client strings: hash them so any value maps to a valid KV key.
pub fn idempotency_key(client_key: &str) -> String {
    use sha2::Digest as _;
    format!(
        "idem.{}",
        hex::encode(sha2::Sha256::digest(client_key.as_bytes()))
    )
}

/// Message id used for publisher dedupe of a job's log chunk.
pub fn log_msg_id(job_id: &str, attempt: u32, seq: u64) -> String {
    format!("{job_id}.{attempt}.{seq}")
}

/// Message id used when queueing a job attempt for the fleet.
pub fn run_msg_id(job_id: &str) -> String {
    format!("run.{job_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_subjects_round_trip() {
        assert_eq!(job_id_from_key(&job_key("a-1")), Some("a-1"));
        assert_eq!(schedule_id_from_key(&schedule_key("s-1")), Some("s-1"));
        assert_eq!(log_subject("a-1"), "flotilla.logs.a-1");
        assert_eq!(cancel_subject("a-1"), "flotilla.cancel.a-1");
        assert_eq!(rejected_subject(None), "flotilla.rejected._unknown");
    }

    #[test]
    fn idempotency_keys_are_stable_and_key_safe() {
        let a = idempotency_key("order 42 / retry");
        assert_eq!(a, idempotency_key("order 42 / retry"));
        assert_ne!(a, idempotency_key("order 43 / retry"));
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '.'));
    }
}
