//! Submitting a validated job: the one path the HTTP gateway, the direct-NATS intake and the
//! scheduler share.
//!
//! The rule: a job is accepted once its `pending` record exists and the run queue holds its
//! message, in that order, so a node never pulls a job without a record. Submitting is
//! idempotent on the job id: a record that is still `pending` is queued again (the queue's
//! `Nats-Msg-Id` dedupe drops the repeat), and a record that has moved on means the id is
//! [`Submitted::Taken`]. When queueing fails, the record this call created is removed again, so
//! a refused job leaves nothing behind; a record that was already there stays, since its
//! message may be queued already.

use flotilla_proto::{JobRecord, JobRequest, JobStatus};
use tracing::Instrument as _;

use crate::{QueueError, StoreError, Topology, Versioned, enqueue};

/// What [`submit`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Submitted {
    /// Recorded (or found still pending) and on the run queue.
    Queued(Box<Versioned>),
    /// The id belongs to a job that is no longer pending; nothing was queued.
    Taken,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The record could not be read or written: nothing was queued.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The run queue did not store the job. The record this call created was removed again.
    #[error("cannot queue the job: {0}")]
    Queue(#[source] QueueError),
}

/// Records `request` as `pending` and queues it, following the rule above. `trace` carries the
/// submitter's trace context to the node that runs the job.
pub async fn submit(
    topology: &Topology,
    request: &JobRequest,
    trace: async_nats::HeaderMap,
) -> Result<Submitted, SubmitError> {
    let record = JobRecord::pending(request);
    // Spans named for `flotilla-bench`'s breakdown of the dispatch path.
    let created = topology
        .jobs
        .create(&record)
        .instrument(tracing::info_span!("kv create"))
        .await;
    let (versioned, created) = match created {
        Ok(revision) => (Versioned { record, revision }, true),
        Err(StoreError::AlreadyExists(_)) => match topology.jobs.get(&request.job_id).await? {
            Some(current) if current.record.status == JobStatus::Pending => (current, false),
            _ => return Ok(Submitted::Taken),
        },
        Err(e) => return Err(e.into()),
    };
    let queued = enqueue(topology, request, trace)
        .instrument(tracing::info_span!("publish"))
        .await;
    if let Err(e) = queued {
        if created && let Err(undo) = topology.jobs.remove(&request.job_id).await {
            tracing::warn!(job_id = %request.job_id, error = %undo, "cannot remove the record of an unqueued job");
        }
        return Err(SubmitError::Queue(e));
    }
    Ok(Submitted::Queued(Box::new(versioned)))
}
