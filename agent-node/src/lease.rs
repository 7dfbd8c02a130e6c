//! The node's side of a job's record: claiming an attempt, recording its outcome and handing
//! the job back, each a transition (`flotilla_proto::transition`) applied by compare-and-set,
//! and the outbox relay that records outcomes kept while NATS was away.

use std::{collections::HashMap, sync::Arc, time::Duration};

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use flotilla_nats::{ApplyError, StoreError};
use flotilla_proto::{Finish, JobRecord, LogEnd, Transition};
use tokio_util::sync::CancellationToken;

use crate::{
    Shared,
    logs::{publish_chunk, publish_end},
    metrics::Finish as Finished,
    outbox::{Entry, PendingFinish},
};

/// The lease this node holds on a job: the attempt number it wrote.
pub(crate) struct Claimed {
    pub(crate) attempt: u32,
}

/// Moves the record to `running` under this node with the next attempt number. `None` means
/// there is nothing to run (cancelled while queued, already finished, a duplicate, or unknown).
pub(crate) async fn claim(
    shared: &Shared,
    job_id: &str,
    ack_subject: Option<String>,
    delivered: i64,
) -> Result<Option<Claimed>, StoreError> {
    let subject = ack_subject.clone();
    let claim = Transition::Claim {
        node_id: shared.config.node_id.clone(),
        ack_subject,
        delivered,
    };
    // While a cluster moves the bucket's leader, reads fail for a few seconds; a NAK for each
    // would spend the job's deliveries on NATS's trouble, not the job's.
    let apply = || shared.topology.jobs.apply(job_id, &claim);
    let applied = apply
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(2))
                .with_max_times(5),
        )
        .when(|e| matches!(e, ApplyError::Store(StoreError::Nats(_))))
        // Still working on it: the message must not go to another node meanwhile.
        .notify(|_, _| in_progress(shared, subject.as_deref()))
        .await;
    match applied {
        Ok(applied) => Ok(Some(Claimed {
            attempt: applied.after.record.attempt,
        })),
        Err(ApplyError::NotFound(_)) => {
            tracing::warn!("job has no record, dropping its message");
            Ok(None)
        }
        Err(ApplyError::Refused(reason)) => {
            tracing::info!(%reason, "not running job");
            Ok(None)
        }
        Err(ApplyError::Store(e)) => Err(e),
    }
}

/// Tells JetStream the message is still being worked on (its ack wait starts again), without
/// waiting: best effort, as the progress acks of a running job are.
fn in_progress(shared: &Shared, ack_subject: Option<&str>) {
    if let Some(subject) = ack_subject {
        let (client, subject) = (shared.client.clone(), subject.to_owned());
        tokio::spawn(async move { client.publish(subject, Bytes::from_static(b"+WPI")).await });
    }
}

impl PendingFinish {
    fn transition(&self, node_id: &str) -> Transition {
        Transition::Finish(Box::new(Finish {
            node_id: node_id.to_owned(),
            attempt: self.attempt,
            status: self.status,
            exit_code: self.exit_code,
            error: self.error.clone(),
            outcome: self.outcome.clone(),
            result: self.result.clone(),
            usage: self.usage.clone(),
            start_ms: self.start_ms,
            max_budget_usd: self.max_budget_usd,
        }))
    }
}

/// Records the outcome, but only while this node still holds the attempt it claimed. A
/// cancelled job stays cancelled and gets the output produced so far.
pub(crate) async fn record_outcome(
    shared: &Shared,
    pending: &PendingFinish,
) -> Result<JobRecord, ApplyError> {
    let finish = pending.transition(&shared.config.node_id);
    let applied = shared.topology.jobs.apply(&pending.job_id, &finish).await?;
    Ok(applied.after.record)
}

/// A few quick retries for a NATS hiccup before the outcome goes to the outbox.
pub(crate) async fn record_with_retries(
    shared: &Shared,
    pending: &PendingFinish,
) -> Result<JobRecord, ApplyError> {
    (|| record_outcome(shared, pending))
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(1))
                .with_max_times(3),
        )
        .when(|e| matches!(e, ApplyError::Store(StoreError::Nats(_))))
        .await
}

/// Puts a job this node could not finish back to `pending` (still fenced by the lease), so
/// the record says why while it waits for its next attempt. False if the lease is gone.
pub(crate) async fn release(
    shared: &Shared,
    job_id: &str,
    claimed: &Claimed,
    reason: &str,
) -> bool {
    let release = Transition::Release {
        node_id: shared.config.node_id.clone(),
        attempt: claimed.attempt,
        reason: reason.to_owned(),
    };
    match shared.topology.jobs.apply(job_id, &release).await {
        Ok(_) => true,
        Err(ApplyError::Refused(e)) => {
            tracing::warn!(error = %e, "not handing back");
            false
        }
        Err(ApplyError::NotFound(_)) => false,
        // NATS is down: the message will be redelivered after its ack wait anyway.
        Err(ApplyError::Store(e)) => {
            tracing::warn!(error = %e, "cannot record hand-back");
            true
        }
    }
}

/// Publishes the end-of-stream marker for a recorded outcome.
pub(crate) async fn end_stream(shared: &Shared, pending: &PendingFinish, stored: &JobRecord) {
    let end = LogEnd {
        status: stored.status,
        exit_code: stored.exit_code,
        error: stored.error.clone(),
    };
    if let Err(e) = publish_end(
        &shared.topology.js,
        &pending.job_id,
        pending.attempt,
        pending.end_seq,
        end,
    )
    .await
    {
        tracing::warn!(error = %e, "cannot publish end marker");
    }
}

/// Drains the outbox in order whenever it has entries and NATS answers: log chunks are
/// published (deduplicated by message id), outcomes recorded under the lease check, their
/// log streams ended and their messages acked.
pub(crate) async fn relay(shared: Arc<Shared>, stop: CancellationToken) {
    let mut failures = 0u32;
    loop {
        if shared.outbox.is_empty() || failures > 0 {
            // At most a third of the ack wait: the progress acks below go out each round.
            let pause = Duration::from_millis(200 * u64::from(failures.min(25)))
                .min(shared.config.topology.ack_wait / 3);
            tokio::select! {
                () = stop.cancelled() => return,
                () = shared.outbox.pushed.notified(), if failures == 0 => {}
                () = tokio::time::sleep(pause), if failures > 0 => {}
            }
        }
        let entries = match shared.outbox.peek(64).await {
            Ok(entries) => entries,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the outbox");
                failures += 1;
                continue;
            }
        };
        failures = 0;
        // Outcomes waiting here are still this node's: their messages must not be redelivered
        // (and their jobs run again) while NATS is away for longer than an ack wait.
        for (_, entry) in &entries {
            if let Entry::Finish(pending) = entry {
                in_progress(&shared, pending.ack_subject.as_deref());
            }
        }
        let mut held = HashMap::new();
        for (key, entry) in entries {
            if let Err(e) = relay_one(&shared, &entry, &mut held).await {
                tracing::debug!(error = %e, "outbox relay waiting for NATS");
                failures = 1;
                break;
            }
            if let Err(e) = shared.outbox.remove(key).await {
                tracing::error!(error = %e, "cannot remove relayed outbox entry");
                failures = 1;
                break;
            }
        }
    }
}

/// Relays one entry. `held` remembers, for this batch, whether each job's attempt is still
/// this node's: the output of an attempt that moved elsewhere is dropped, not published late.
async fn relay_one(
    shared: &Shared,
    entry: &Entry,
    held: &mut HashMap<(String, u32), bool>,
) -> Result<(), String> {
    match entry {
        Entry::Publish {
            job_id, attempt, ..
        } if *attempt > 0 && !still_ours(shared, job_id, *attempt, held).await? => {
            tracing::warn!(
                job_id,
                attempt,
                "outbox log chunk dropped: the job moved to another attempt"
            );
            Ok(())
        }
        Entry::Publish {
            subject,
            msg_id,
            job_id,
            payload,
            ..
        } => publish_chunk(
            &shared.topology.js,
            subject,
            msg_id,
            job_id,
            Bytes::from(payload.clone()),
        )
        .await
        .map_err(|e| e.to_string()),
        Entry::Finish(pending) => relay_finish(shared, pending).await,
    }
}

/// Whether the job's record still names this node's `attempt`.
async fn still_ours(
    shared: &Shared,
    job_id: &str,
    attempt: u32,
    held: &mut HashMap<(String, u32), bool>,
) -> Result<bool, String> {
    let key = (job_id.to_owned(), attempt);
    if let Some(ours) = held.get(&key) {
        return Ok(*ours);
    }
    let record = shared
        .topology
        .jobs
        .get(job_id)
        .await
        .map_err(|e| e.to_string())?;
    let ours = record.is_some_and(|v| {
        v.record.attempt == attempt
            && v.record.node_id.as_deref() == Some(shared.config.node_id.as_str())
    });
    held.insert(key, ours);
    Ok(ours)
}

async fn relay_finish(shared: &Shared, pending: &PendingFinish) -> Result<(), String> {
    match record_outcome(shared, pending).await {
        Ok(stored) => {
            shared
                .metrics
                .finished(Finished::from_status(stored.status));
            end_stream(shared, pending, &stored).await;
            if let Some(subject) = &pending.ack_subject {
                let _ = shared
                    .client
                    .publish(subject.clone(), Bytes::from_static(b"+ACK"))
                    .await;
            }
            tracing::info!(job_id = %pending.job_id, status = %stored.status, "outcome relayed from the outbox");
            Ok(())
        }
        Err(ApplyError::Store(StoreError::Nats(e))) => Err(e.to_string()),
        Err(e) => {
            // Fenced or gone: nothing left to do for this entry.
            tracing::warn!(job_id = %pending.job_id, error = %e, "outbox outcome rejected: late result");
            shared.metrics.finished(Finished::LeaseLost);
            Ok(())
        }
    }
}
