//! A job's life, in one place. Every change to a record's `status`, `attempt` or `node_id` is
//! one of the named [`Transition`]s below: a pure function from the current record to the next
//! one, or a typed [`Refusal`]. The job store applies them by compare-and-set
//! (`flotilla_nats::JobStore::apply`), re-reading and re-deciding on a conflict, so the rules
//! (who may move a job from pending to running, the fence by attempt and node) are stated once.
//!
//! ```text
//!            claim                 finish (completed | failed)
//!  pending ---------> running ------------------------------> completed / failed
//!     ^  \              |  \
//!     |   \ time out,   |   \ cancel            finish (output kept, stays cancelled)
//!     |    \ dead-letter|    `----> cancelled ----------------> cancelled
//!     |     `--> failed |
//!     `-----------------'  release (the node hands it back), requeue (the node was lost)
//! ```

use chrono::{DateTime, Utc};

use crate::{Attempt, JobRecord, JobResult, JobStatus, Usage};

/// A named change of a job's state. Build one, then `apply` it to a record (or hand it to the
/// job store, which applies it by compare-and-set).
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// A node takes the job for its next attempt: `running`, attempt + 1, the node's id. This
    /// is also the attempt's start (`started_at`).
    Claim {
        node_id: String,
        /// The JetStream reply subject of the message behind this attempt.
        ack_subject: Option<String>,
        /// How often JetStream has delivered the message (1 the first time).
        delivered: i64,
    },
    /// The attempt a node holds ended: the outcome is recorded (fenced by attempt and node).
    Finish(Box<Finish>),
    /// The node holding the attempt gives the job back for another attempt (fenced).
    Release {
        node_id: String,
        attempt: u32,
        reason: String,
    },
    /// The dispatcher found the node running the job lost: back to `pending`.
    Requeue { node_id: String },
    /// A client cancels the job.
    Cancel,
    /// The job waited in the queue longer than the limit without starting.
    TimeOut { queued_limit_secs: u64 },
    /// JetStream gave up delivering the job's message.
    DeadLetter { deliveries: u64 },
    /// The dispatcher says why no live node can take the pending job yet (`None`: one can).
    Wait { reason: Option<String> },
}

/// How a node's attempt ended, as [`Transition::Finish`] records it.
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    pub node_id: String,
    pub attempt: u32,
    /// `completed`, `failed` or `cancelled`; a cancelled record stays cancelled whatever this is.
    pub status: JobStatus,
    pub exit_code: Option<i64>,
    pub error: Option<String>,
    /// How the attempt ended, for the attempts history.
    pub outcome: String,
    pub result: JobResult,
    /// What the engine reported; figures the llm-gateway metered win over these.
    pub usage: Option<Usage>,
    pub start_ms: Option<f64>,
    /// For the error of a job whose budget the gateway found spent.
    pub max_budget_usd: Option<f64>,
}

/// Why a transition does not apply to a record. Nothing was changed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("job already {0}")]
    Ended(JobStatus),
    /// A first delivery for a job that already started: every legitimate retry is a
    /// redelivery of the one message, so this is a duplicate publish.
    #[error("duplicate message for attempt {attempt}")]
    Duplicate { attempt: u32 },
    /// Another attempt, or another node, owns the job now.
    #[error(
        "lease lost: job is now attempt {attempt} on {node_id:?} ({status}); late result rejected"
    )]
    Fenced {
        attempt: u32,
        node_id: Option<String>,
        status: JobStatus,
    },
    /// The transition is for jobs in another state (a queue timeout for a started job, a
    /// requeue for a job the node no longer holds).
    #[error("not applicable to a {status} job")]
    NotApplicable { status: JobStatus },
}

/// The outcome line of an attempt whose holder vanished without a word.
const LEASE_EXPIRED: &str = "lease expired";

impl Transition {
    /// The record after this transition, or why it does not apply. A result equal to `record`
    /// means there is nothing to write.
    pub fn apply(&self, record: &JobRecord, now: DateTime<Utc>) -> Result<JobRecord, Refusal> {
        let mut next = record.clone();
        match self {
            Self::Claim {
                node_id,
                ack_subject,
                delivered,
            } => claim(&mut next, node_id, ack_subject, *delivered, now)?,
            Self::Finish(finish) => finish_attempt(&mut next, finish, now)?,
            Self::Release {
                node_id,
                attempt,
                reason,
            } => release(&mut next, node_id, *attempt, reason, now)?,
            Self::Requeue { node_id } => requeue(&mut next, node_id, now)?,
            Self::Cancel => cancel(&mut next, now)?,
            Self::TimeOut { queued_limit_secs } => time_out(&mut next, *queued_limit_secs, now)?,
            Self::DeadLetter { deliveries } => dead_letter(&mut next, *deliveries, now)?,
            Self::Wait { reason } => wait(&mut next, reason)?,
        }
        Ok(next)
    }

    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Claim { .. } => "claim",
            Self::Finish(_) => "finish",
            Self::Release { .. } => "release",
            Self::Requeue { .. } => "requeue",
            Self::Cancel => "cancel",
            Self::TimeOut { .. } => "time out",
            Self::DeadLetter { .. } => "dead-letter",
            Self::Wait { .. } => "wait",
        }
    }
}

fn wait(record: &mut JobRecord, reason: &Option<String>) -> Result<(), Refusal> {
    if record.status != JobStatus::Pending {
        return Err(Refusal::NotApplicable {
            status: record.status,
        });
    }
    record.waiting_for.clone_from(reason);
    Ok(())
}

fn not_ended(record: &JobRecord) -> Result<(), Refusal> {
    if record.status.is_terminal() {
        Err(Refusal::Ended(record.status))
    } else {
        Ok(())
    }
}

/// The attempt `attempt` on `node_id` still owns the record: it is running, or was cancelled
/// while running (the node still records the output produced so far).
fn holds_lease(record: &JobRecord, node_id: &str, attempt: u32) -> Result<(), Refusal> {
    let ours = record.attempt == attempt && record.node_id.as_deref() == Some(node_id);
    if ours && matches!(record.status, JobStatus::Running | JobStatus::Cancelled) {
        Ok(())
    } else {
        Err(Refusal::Fenced {
            attempt: record.attempt,
            node_id: record.node_id.clone(),
            status: record.status,
        })
    }
}

fn claim(
    record: &mut JobRecord,
    node_id: &str,
    ack_subject: &Option<String>,
    delivered: i64,
    now: DateTime<Utc>,
) -> Result<(), Refusal> {
    not_ended(record)?;
    // This very delivery's claim, tried again after its answer was lost (a KV leader moving):
    // it holds already.
    if record.status == JobStatus::Running
        && record.node_id.as_deref() == Some(node_id)
        && ack_subject.is_some()
        && record.ack_subject == *ack_subject
    {
        return Ok(());
    }
    if delivered <= 1 && record.attempt > 0 {
        return Err(Refusal::Duplicate {
            attempt: record.attempt,
        });
    }
    // A running record here means its previous holder vanished without a word.
    record.end_attempt(LEASE_EXPIRED, now);
    record.status = JobStatus::Running;
    record.attempt += 1;
    record.node_id = Some(node_id.to_owned());
    record.started_at = Some(now);
    record.error = None;
    record.ack_subject.clone_from(ack_subject);
    record.waiting_for = None;
    record.attempts.push(Attempt {
        attempt: record.attempt,
        node_id: node_id.to_owned(),
        started_at: now,
        finished_at: None,
        outcome: None,
        start_ms: None,
    });
    Ok(())
}

fn finish_attempt(
    record: &mut JobRecord,
    finish: &Finish,
    now: DateTime<Utc>,
) -> Result<(), Refusal> {
    holds_lease(record, &finish.node_id, finish.attempt)?;
    // Figures the llm-gateway metered are exact and span every attempt: they win over what
    // the engine reported.
    if !record.usage.as_ref().is_some_and(|u| u.metered) {
        record.usage.clone_from(&finish.usage);
    }
    if record.status == JobStatus::Running {
        record.status = finish.status;
        record.error.clone_from(&finish.error);
        if let Some(spent) = record.usage.as_ref().filter(|u| u.budget_exceeded) {
            let budget = finish
                .max_budget_usd
                .map(|b| format!(" of its ${b} max_budget_usd"))
                .unwrap_or_default();
            record.status = JobStatus::Failed;
            record.error = Some(format!(
                "budget exceeded: spent ${:.4}{budget}",
                spent.cost_usd
            ));
        }
    }
    record.end_attempt(&finish.outcome, now);
    if let Some(attempt) = record
        .attempts
        .iter_mut()
        .rev()
        .find(|a| a.attempt == finish.attempt)
    {
        attempt.start_ms = finish.start_ms;
    }
    record.ack_subject = None;
    record.exit_code = finish.exit_code;
    record.finished_at.get_or_insert(now);
    record.result = Some(finish.result.clone());
    Ok(())
}

/// Back to `pending`, still fenced, so the record says why while it waits for its next
/// attempt. A job cancelled meanwhile stays as it is.
fn release(
    record: &mut JobRecord,
    node_id: &str,
    attempt: u32,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<(), Refusal> {
    holds_lease(record, node_id, attempt)?;
    if record.status != JobStatus::Running {
        return Ok(());
    }
    record.end_attempt(reason, now);
    record.status = JobStatus::Pending;
    record.node_id = None;
    record.ack_subject = None;
    record.error = Some(format!(
        "attempt {} failed: {reason}; retrying",
        record.attempt
    ));
    Ok(())
}

fn requeue(record: &mut JobRecord, node_id: &str, now: DateTime<Utc>) -> Result<(), Refusal> {
    let held = record.status == JobStatus::Running && record.node_id.as_deref() == Some(node_id);
    if !held {
        return Err(Refusal::NotApplicable {
            status: record.status,
        });
    }
    record.end_attempt("node lost", now);
    record.status = JobStatus::Pending;
    record.node_id = None;
    // The dispatcher NAKs the lost attempt's message with the subject it read before.
    record.ack_subject = None;
    record.error = Some(format!(
        "node {node_id} lost during attempt {}; requeued",
        record.attempt
    ));
    Ok(())
}

/// A cancelled running job's attempt stays open: its node stops the container and records
/// the output produced so far.
fn cancel(record: &mut JobRecord, now: DateTime<Utc>) -> Result<(), Refusal> {
    not_ended(record)?;
    record.status = JobStatus::Cancelled;
    record.error = Some("cancelled by request".to_owned());
    record.finished_at = Some(now);
    Ok(())
}

fn time_out(record: &mut JobRecord, limit_secs: u64, now: DateTime<Utc>) -> Result<(), Refusal> {
    if record.status != JobStatus::Pending {
        return Err(Refusal::NotApplicable {
            status: record.status,
        });
    }
    record.status = JobStatus::Failed;
    record.error = Some(format!(
        "queued for more than {limit_secs}s without starting"
    ));
    record.finished_at = Some(now);
    Ok(())
}

fn dead_letter(record: &mut JobRecord, deliveries: u64, now: DateTime<Utc>) -> Result<(), Refusal> {
    not_ended(record)?;
    let mut reason = format!("gave up after {deliveries} deliveries");
    if let Some(last) = &record.error {
        reason = format!("{reason}; last error: {last}");
    }
    record.end_attempt(LEASE_EXPIRED, now);
    record.status = JobStatus::Failed;
    record.error = Some(reason);
    record.finished_at = Some(now);
    Ok(())
}

#[cfg(test)]
mod tests;
