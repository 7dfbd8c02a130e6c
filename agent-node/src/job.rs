//! One job on this node: claim it in KV, run it in a container, record the outcome, ack.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{self, AckKind};
use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use chrono::Utc;
use flotilla_catalog::Engine;
use flotilla_nats::StoreError;
use flotilla_proto::{
    Attempt, Encoding, JobRecord, JobRequest, JobResult, JobStatus, LlmGrant, LogEnd, LogStream,
    Usage, names,
};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use tracing::Instrument as _;

use crate::{
    Shared,
    docker::{DockerError, OutputStream, PoolKey, Started},
    logs::{LogPublisher, publish_chunk, publish_end},
    metrics::{Finish, PoolUse},
    outbox::{Entry, PendingFinish},
    pool::ROLE_COLD,
    script,
};

/// Why a container was stopped before it finished on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Timeout,
    Cancelled,
    /// The node is shutting down and could not wait for the job.
    Shutdown,
    /// The llm-gateway found the job's budget spent.
    Budget,
}

enum Outcome {
    Exited {
        exit_code: i64,
        stop: Option<Stop>,
        /// Milliseconds from receipt to the process running.
        start_ms: f64,
        /// The kernel killed it for exceeding its memory limit.
        oom_killed: bool,
    },
    /// Docker failed us (create/start/attach): the job never really ran.
    Infrastructure(String),
}

/// Entry point for one delivered message. Never panics on bad input: a message that cannot be
/// decoded is terminated so it never comes back.
pub(crate) async fn handle(shared: Arc<Shared>, message: jetstream::Message) {
    let received = tokio::time::Instant::now();
    let request: JobRequest = match flotilla_proto::decode(&message.payload, Encoding::MessagePack)
    {
        Ok(request) => request,
        Err(e) => {
            tracing::error!(error = %e, "undecodable job message, terminating it");
            ack(&message, AckKind::Term).await;
            return;
        }
    };
    let job_id = request.job_id.clone();
    let delivered = message.info().map(|info| info.delivered).unwrap_or(1);
    shared.metrics.received(delivered);
    // The job's spans join the trace of the request that submitted it (W3C headers on the
    // message), so one trace runs from `POST /jobs` to the recorded outcome.
    let span = tracing::info_span!(
        "job",
        otel.kind = "consumer",
        job_id = %job_id,
        node_id = %shared.config.node_id,
        delivered,
        attempt = tracing::field::Empty,
        status = tracing::field::Empty,
    );
    flotilla_telemetry::propagation::set_parent_from_nats(&span, message.headers.as_ref());
    let guard = RunningGuard::register(&shared, &job_id);
    run(shared, message, request, &guard, received)
        .instrument(span)
        .await;
}

async fn run(
    shared: Arc<Shared>,
    message: jetstream::Message,
    request: JobRequest,
    guard: &RunningGuard,
    received: tokio::time::Instant,
) {
    let cancel = guard.token.clone();
    let ack_subject = message.reply.as_ref().map(|s| s.to_string());
    let delivered = message.info().map(|info| info.delivered).unwrap_or(1);
    let claimed = match claim(&shared, &request, ack_subject, delivered)
        .instrument(tracing::info_span!("claim"))
        .await
    {
        Ok(Some(claimed)) => claimed,
        Ok(None) => {
            ack(&message, AckKind::Ack).await;
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot claim job, handing it back");
            ack(&message, AckKind::Nak(Some(Duration::from_secs(1)))).await;
            return;
        }
    };
    let attempt = claimed.attempt;
    tracing::Span::current().record("attempt", attempt);
    shared.metrics.started();
    tracing::info!(attempt, engine = %request.engine, "job started");

    let message = Arc::new(message);
    let budget_spent = CancellationToken::new();
    let keepalive = tokio::spawn(keep_alive(
        shared.clone(),
        message.clone(),
        request.job_id.clone(),
        cancel.clone(),
        budget_spent.clone(),
    ));
    let mut logs = LogPublisher::new(
        shared.clone(),
        &request.job_id,
        attempt,
        shared.config.max_log_bytes,
        shared.config.max_result_bytes,
    );
    // Looked up once: the result is parsed with the engine file the job ran with, even if the
    // configuration changes meanwhile.
    let engine = shared.catalog.current().engine(&request.engine).cloned();
    let outcome = match &engine {
        Some(engine) => {
            let stops = Stops {
                cancel: &cancel,
                budget_spent: &budget_spent,
            };
            execute(
                &shared, &request, engine, attempt, stops, &mut logs, received,
            )
            .await
        }
        None => Outcome::Infrastructure(format!(
            "engine {} is not installed on node {}",
            request.engine, shared.config.node_id
        )),
    };
    keepalive.abort();

    let start_ms = match &outcome {
        Outcome::Exited { start_ms, .. } => Some(*start_ms),
        Outcome::Infrastructure(_) => None,
    };
    // What `retries` may run again: the job itself failed, nobody stopped it and it did not
    // run out of memory (the same limit would kill it again).
    let retryable = matches!(
        &outcome,
        Outcome::Exited {
            stop: None,
            oom_killed: false,
            ..
        }
    );
    let final_state = match outcome {
        Outcome::Exited {
            stop: Some(Stop::Shutdown),
            ..
        } => {
            // Hand the job back at once; the next node raises the attempt.
            let reason = "node shut down before the job finished";
            if release(&shared, &request.job_id, &claimed, reason).await {
                ack(&message, AckKind::Nak(None)).await;
            }
            shared.metrics.finished(Finish::HandedBack);
            tracing::info!(attempt, "job handed back: node shutting down");
            return;
        }
        Outcome::Infrastructure(error) if delivered < shared.config.topology.max_deliver => {
            tracing::warn!(attempt, %error, "infrastructure failure, job will be retried");
            let note = format!("attempt {attempt} failed: {error}; retrying");
            run_again(
                &shared,
                &message,
                &request.job_id,
                &claimed,
                &mut logs,
                &error,
                &note,
            )
            .await;
            return;
        }
        Outcome::Infrastructure(error) => Final {
            status: JobStatus::Failed,
            exit_code: None,
            error: Some(format!("{error} (gave up after {attempt} attempts)")),
            outcome: error,
        },
        Outcome::Exited {
            exit_code,
            stop,
            oom_killed: true,
            ..
        } if stop.is_none() => {
            let error = format!(
                "out of memory: killed at its {} MiB limit (exit code {exit_code})",
                request.resources.memory_bytes >> 20
            );
            Final {
                status: JobStatus::Failed,
                exit_code: Some(exit_code),
                error: Some(error.clone()),
                outcome: error,
            }
        }
        Outcome::Exited {
            exit_code: script::PRE_HOOK_FAILED,
            stop: None,
            ..
        } if logs.tail_text().contains(script::PRE_HOOK_MARKER) => {
            let tail = logs.tail_text();
            let line = tail
                .lines()
                .rev()
                .find(|l| l.contains(script::PRE_HOOK_MARKER))
                .unwrap_or_default();
            let error = line.trim_start_matches("flotilla: ").to_owned();
            Final {
                status: JobStatus::Failed,
                exit_code: Some(script::PRE_HOOK_FAILED),
                error: Some(error.clone()),
                outcome: error,
            }
        }
        Outcome::Exited {
            exit_code, stop, ..
        } => final_state(exit_code, stop, request.timeout_seconds),
    };
    let (result, usage, engine_error) =
        build_result(&request, engine.as_ref(), &logs, final_state.exit_code);
    // A CLI that exits 0 but reports an error result (API failure, max turns) failed the job.
    let mut final_state = final_state;
    if engine_error && final_state.status == JobStatus::Completed {
        let summary: String = result.text.chars().take(300).collect();
        let error = format!("the engine reported an error: {summary}");
        final_state = Final {
            status: JobStatus::Failed,
            exit_code: final_state.exit_code,
            error: Some(error.clone()),
            outcome: error,
        };
    }
    if final_state.status == JobStatus::Failed
        && retryable
        && attempt <= request.retries
        && delivered < shared.config.topology.max_deliver
    {
        let error = &final_state.outcome;
        tracing::info!(attempt, %error, retries = request.retries, "job failed, will be retried");
        let note = format!(
            "attempt {attempt} failed: {error}; retrying ({attempt} of {} retries)",
            request.retries
        );
        run_again(
            &shared,
            &message,
            &request.job_id,
            &claimed,
            &mut logs,
            error,
            &note,
        )
        .await;
        return;
    }
    let pending = PendingFinish {
        job_id: request.job_id.clone(),
        attempt,
        status: final_state.status,
        exit_code: final_state.exit_code,
        error: final_state.error.clone(),
        outcome: final_state.outcome.clone(),
        result,
        ack_subject: message.reply.as_ref().map(|s| s.to_string()),
        end_seq: logs.reserve_end_seq(),
        start_ms,
        usage,
        max_budget_usd: request.max_budget_usd,
    };
    let recorded = if shared.outbox.is_empty() && shared.nats_connected() {
        record_with_retries(&shared, &pending)
            .instrument(tracing::info_span!("record outcome"))
            .await
    } else {
        Err(FinishError::Store(StoreError::Nats(
            "nats unreachable".to_owned(),
        )))
    };
    let stored = match recorded {
        Ok(stored) => stored,
        Err(FinishError::Store(StoreError::Nats(reason))) => {
            // NATS is away: the outcome waits on disk; the relay records it, ends the log
            // stream and acks the message when NATS is back.
            tracing::warn!(%reason, "outcome kept in the outbox until NATS is back");
            if let Err(e) = shared.outbox.push(&Entry::Finish(Box::new(pending))).await {
                tracing::error!(error = %e, "cannot keep the outcome in the outbox");
            }
            return;
        }
        Err(FinishError::Fenced {
            attempt: now,
            node,
            status,
        }) => {
            // Another attempt owns the job now: leave its message alone.
            tracing::warn!(attempt, current_attempt = now, ?node, %status, "lease lost: late result rejected");
            shared.metrics.finished(Finish::LeaseLost);
            return;
        }
        Err(FinishError::Gone) => {
            tracing::warn!("job record vanished; dropping its message");
            ack(&message, AckKind::Ack).await;
            shared.metrics.finished(Finish::Abandoned);
            return;
        }
        Err(e) => {
            // Not recorded: leave the message unacked so the job is tried again.
            tracing::warn!(error = %e, "outcome not recorded");
            shared.metrics.finished(Finish::Abandoned);
            return;
        }
    };
    end_stream(&shared, &pending, &stored).await;
    if stored.status == JobStatus::Failed && final_state.exit_code.is_none() {
        let reason = stored.error.as_deref().unwrap_or("failed");
        if let Err(e) = flotilla_nats::dead_letter(
            &shared.topology.js,
            &request.job_id,
            message.payload.clone(),
            reason,
        )
        .await
        {
            tracing::warn!(error = %e, "cannot dead-letter job");
        }
    }
    tracing::Span::current().record("status", tracing::field::display(stored.status));
    shared.metrics.finished(Finish::from_status(stored.status));
    tracing::info!(status = %stored.status, exit_code = ?stored.exit_code, "job finished");
    // The outcome is in KV (the truth); this delivery is done.
    if let Err(e) = message.double_ack().await {
        tracing::warn!(error = %e, "cannot ack job message");
    }
}

/// Publishes the end-of-stream marker for a recorded outcome.
async fn end_stream(shared: &Shared, pending: &PendingFinish, stored: &JobRecord) {
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

/// The lease this node holds on a job: the attempt number it wrote.
struct Claimed {
    attempt: u32,
}

/// Moves the record to `running` under this node with the next attempt number. `None` means
/// there is nothing to run (cancelled while queued, already finished, or unknown).
async fn claim(
    shared: &Shared,
    request: &JobRequest,
    ack_subject: Option<String>,
    delivered: i64,
) -> Result<Option<Claimed>, StoreError> {
    let node_id = shared.config.node_id.clone();
    let changed = shared
        .topology
        .jobs
        .modify(&request.job_id, |record| {
            if record.status.is_terminal() {
                return Err(format!("job already {}", record.status));
            }
            // Every legitimate retry is a redelivery of the one message (NAK or ack wait), so a
            // first delivery for a job that already started is a duplicate publish.
            if delivered <= 1 && record.attempt > 0 {
                return Err(format!("duplicate message for attempt {}", record.attempt));
            }
            let now = Utc::now();
            record.status = JobStatus::Running;
            // A running record here means its previous holder vanished without a word.
            record.end_attempt("lease expired", now);
            record.attempt += 1;
            record.node_id = Some(node_id.clone());
            record.started_at = Some(now);
            record.error = None;
            record.ack_subject.clone_from(&ack_subject);
            record.attempts.push(Attempt {
                attempt: record.attempt,
                node_id: node_id.clone(),
                started_at: now,
                finished_at: None,
                outcome: None,
                start_ms: None,
            });
            Ok(true)
        })
        .await?;
    Ok(match changed {
        None => {
            tracing::warn!("job has no record, dropping its message");
            None
        }
        Some(Err(reason)) => {
            tracing::info!(%reason, "not running job");
            None
        }
        Some(Ok(versioned)) => Some(Claimed {
            attempt: versioned.record.attempt,
        }),
    })
}

struct Final {
    status: JobStatus,
    exit_code: Option<i64>,
    error: Option<String>,
    /// How the attempt ended, for the attempts history.
    outcome: String,
}

fn final_state(exit_code: i64, stop: Option<Stop>, timeout_seconds: u64) -> Final {
    let (status, error) = match stop {
        Some(Stop::Timeout) => (
            JobStatus::Failed,
            Some(format!("timed out after {timeout_seconds}s")),
        ),
        Some(Stop::Cancelled) => (JobStatus::Cancelled, Some("cancelled".to_owned())),
        Some(Stop::Shutdown) => (JobStatus::Failed, Some("node shut down".to_owned())),
        Some(Stop::Budget) => (JobStatus::Failed, Some("budget exceeded".to_owned())),
        None if exit_code == 0 => (JobStatus::Completed, None),
        None => (
            JobStatus::Failed,
            Some(format!("exited with code {exit_code}")),
        ),
    };
    let outcome = error.clone().unwrap_or_else(|| "completed".to_owned());
    Final {
        status,
        exit_code: Some(exit_code),
        error,
        outcome,
    }
}

#[derive(Debug, thiserror::Error)]
enum FinishError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "lease lost: job is now attempt {attempt} on {node:?} ({status}); late result rejected"
    )]
    Fenced {
        attempt: u32,
        node: Option<String>,
        status: JobStatus,
    },
    #[error("job record vanished")]
    Gone,
}

/// True while `record` is still the attempt this node claimed.
fn holds_lease(record: &JobRecord, claimed: &Claimed, node_id: &str) -> Result<(), FinishError> {
    let ours = record.attempt == claimed.attempt && record.node_id.as_deref() == Some(node_id);
    if ours && matches!(record.status, JobStatus::Running | JobStatus::Cancelled) {
        Ok(())
    } else {
        Err(FinishError::Fenced {
            attempt: record.attempt,
            node: record.node_id.clone(),
            status: record.status,
        })
    }
}

/// Records the outcome, but only while this node still holds the attempt it claimed. A
/// cancelled job stays cancelled and gets the output produced so far.
async fn record_outcome(
    shared: &Shared,
    pending: &PendingFinish,
) -> Result<JobRecord, FinishError> {
    let node_id = shared.config.node_id.as_str();
    let claimed = Claimed {
        attempt: pending.attempt,
    };
    let changed = shared
        .topology
        .jobs
        .modify(&pending.job_id, |record| {
            holds_lease(record, &claimed, node_id)?;
            let now = Utc::now();
            // Figures the llm-gateway metered are exact and span every attempt: they win over
            // what the engine reported.
            if !record.usage.as_ref().is_some_and(|u| u.metered) {
                record.usage.clone_from(&pending.usage);
            }
            let spent = record
                .usage
                .as_ref()
                .filter(|u| u.budget_exceeded)
                .map(|u| u.cost_usd);
            if record.status == JobStatus::Running {
                record.status = pending.status;
                record.error.clone_from(&pending.error);
                if let Some(spent) = spent {
                    let budget = pending
                        .max_budget_usd
                        .map(|b| format!(" of its ${b} max_budget_usd"))
                        .unwrap_or_default();
                    record.status = JobStatus::Failed;
                    record.error = Some(format!("budget exceeded: spent ${spent:.4}{budget}"));
                }
            }
            record.end_attempt(&pending.outcome, now);
            if let Some(attempt) = record
                .attempts
                .iter_mut()
                .rev()
                .find(|a| a.attempt == pending.attempt)
            {
                attempt.start_ms = pending.start_ms;
            }
            record.ack_subject = None;
            record.exit_code = pending.exit_code;
            record.finished_at.get_or_insert(now);
            record.result = Some(pending.result.clone());
            Ok(true)
        })
        .await?;
    match changed {
        None => Err(FinishError::Gone),
        Some(Err(e)) => Err(e),
        Some(Ok(versioned)) => Ok(versioned.record),
    }
}

/// A few quick retries for a NATS hiccup before the outcome goes to the outbox.
async fn record_with_retries(
    shared: &Shared,
    pending: &PendingFinish,
) -> Result<JobRecord, FinishError> {
    (|| record_outcome(shared, pending))
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(1))
                .with_max_times(3),
        )
        .when(|e| matches!(e, FinishError::Store(StoreError::Nats(_))))
        .await
}

/// Drains the outbox in order whenever it has entries and NATS answers: log chunks are
/// published (deduplicated by message id), outcomes recorded under the lease check, their
/// log streams ended and their messages acked.
pub(crate) async fn relay(shared: Arc<Shared>, stop: CancellationToken) {
    let mut failures = 0u32;
    loop {
        if shared.outbox.is_empty() || failures > 0 {
            let pause = Duration::from_millis(200 * u64::from(failures.min(25)));
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
        for (key, entry) in entries {
            if let Err(e) = relay_one(&shared, &entry).await {
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

async fn relay_one(shared: &Shared, entry: &Entry) -> Result<(), String> {
    match entry {
        Entry::Publish {
            subject,
            msg_id,
            job_id,
            payload,
        } => publish_chunk(
            &shared.topology.js,
            subject,
            msg_id,
            job_id,
            Bytes::from(payload.clone()),
        )
        .await
        .map_err(|e| e.to_string()),
        Entry::Finish(pending) => match record_outcome(shared, pending).await {
            Ok(stored) => {
                shared.metrics.finished(Finish::from_status(stored.status));
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
            Err(FinishError::Store(StoreError::Nats(e))) => Err(e),
            Err(e) => {
                // Fenced or gone: nothing left to do for this entry.
                tracing::warn!(job_id = %pending.job_id, error = %e, "outbox outcome rejected: late result");
                shared.metrics.finished(Finish::LeaseLost);
                Ok(())
            }
        },
    }
}

/// Puts a job this node could not finish back to `pending` (still fenced by the lease), so
/// the record says why while it waits for its next attempt. False if the lease is gone.
async fn release(shared: &Shared, job_id: &str, claimed: &Claimed, reason: &str) -> bool {
    let node_id = shared.config.node_id.as_str();
    let changed = shared
        .topology
        .jobs
        .modify(job_id, |record| {
            holds_lease(record, claimed, node_id)?;
            if record.status != JobStatus::Running {
                return Ok::<bool, FinishError>(false);
            }
            record.end_attempt(reason, Utc::now());
            record.status = JobStatus::Pending;
            record.node_id = None;
            record.ack_subject = None;
            record.error = Some(format!(
                "attempt {} failed: {reason}; retrying",
                record.attempt
            ));
            Ok(true)
        })
        .await;
    match changed {
        Ok(Some(Ok(_))) => true,
        Ok(Some(Err(e))) => {
            tracing::warn!(error = %e, "not handing back");
            false
        }
        Ok(None) => false,
        // NATS is down: the message will be redelivered after its ack wait anyway.
        Err(e) => {
            tracing::warn!(error = %e, "cannot record hand-back");
            true
        }
    }
}

/// What can stop a running job besides its own end and the node's shutdown.
#[derive(Clone, Copy)]
struct Stops<'a> {
    cancel: &'a CancellationToken,
    budget_spent: &'a CancellationToken,
}

/// Runs the job: with its own llm-gateway token when its engine calls LLMs and this node has
/// a gateway, revoked as soon as the container is done.
async fn execute(
    shared: &Shared,
    request: &JobRequest,
    engine: &Engine,
    attempt: u32,
    stops: Stops<'_>,
    logs: &mut LogPublisher,
    received: tokio::time::Instant,
) -> Outcome {
    let (access, url) = match (&engine.llm, &shared.llm_url) {
        (Some(access), Some(url)) if !request.dry_run => (access, url),
        _ => {
            return run_container(shared, request, engine, attempt, stops, logs, received, &[])
                .await;
        }
    };
    let now = Utc::now();
    let lifetime = Duration::from_secs(request.timeout_seconds) + TOKEN_SLACK;
    let grant = LlmGrant {
        job_id: request.job_id.clone(),
        attempt,
        node_id: shared.config.node_id.clone(),
        engine: engine.id.clone(),
        profile: request.profile.clone(),
        agent_id: request.agent_id.clone(),
        providers: access.providers.clone(),
        models: request.allowed_models.clone(),
        max_budget_usd: request.max_budget_usd,
        issued_at: now,
        expires_at: now + lifetime,
        revoked_at: None,
        traceparent: flotilla_telemetry::propagation::traceparent(&tracing::Span::current()),
    };
    let token = match shared.topology.grants.issue(&grant).await {
        Ok(token) => token,
        Err(e) => {
            return Outcome::Infrastructure(format!(
                "cannot issue the job's llm-gateway token: {e}"
            ));
        }
    };
    let env = access.render_env(url, &token);
    let outcome = run_container(
        shared, request, engine, attempt, stops, logs, received, &env,
    )
    .await;
    // The job record fences the token too (the gateway checks the attempt is still running),
    // so a revoke lost to a NATS outage opens nothing.
    if let Err(e) = shared.topology.grants.revoke(&token).await {
        tracing::warn!(error = %e, "cannot revoke the job's llm-gateway token");
    }
    outcome
}

/// A token outlives its job's timeout by this much (stop grace, slow starts); it is revoked as
/// soon as the job ends anyway.
const TOKEN_SLACK: Duration = Duration::from_secs(300);

/// Runs the job's container to the end, streaming its output.
#[allow(clippy::too_many_arguments)]
async fn run_container(
    shared: &Shared,
    request: &JobRequest,
    engine: &Engine,
    attempt: u32,
    stops: Stops<'_>,
    logs: &mut LogPublisher,
    received: tokio::time::Instant,
    env: &[(String, String)],
) -> Outcome {
    let config = &shared.config;
    // With an llm-gateway, only jobs holding a token need the (fenced) job network; the rest
    // keep no network at all.
    let network = if shared.llm_url.is_some() && env.is_empty() {
        "none".to_owned()
    } else {
        config.network.clone()
    };
    let key = PoolKey {
        image: config.image.clone(),
        memory_bytes: request.resources.memory_bytes,
        nano_cpus: request.resources.nano_cpus,
        pids_limit: config.pids_limit,
        workspace_bytes: config.workspace_bytes,
        network,
        runtime: config.runtime.clone(),
    };
    // The job's own coordinates, and the trace context (OpenTelemetry's env carrier) so that
    // what the engine runs can continue the job's trace.
    let mut env = env.to_vec();
    env.push(("FLOTILLA_JOB_ID".to_owned(), request.job_id.clone()));
    env.push(("FLOTILLA_ATTEMPT".to_owned(), attempt.to_string()));
    if let Some(traceparent) =
        flotilla_telemetry::propagation::traceparent(&tracing::Span::current())
    {
        env.push(("TRACEPARENT".to_owned(), traceparent));
    }
    let script = script::job_script(engine, request, &env);
    let name = format!("flotilla-{}-{attempt}", request.job_id);
    let started = start_container(shared, &key, &name, request, attempt, &script)
        .instrument(tracing::info_span!(
            "start container",
            pool = tracing::field::Empty
        ))
        .await;
    let (started, pool_use) = match started {
        Ok(started) => started,
        Err(e) => return Outcome::Infrastructure(format!("container failed to start: {e}")),
    };
    let since_receipt = received.elapsed();
    let start_ms = since_receipt.as_secs_f64() * 1000.0;
    // Dispatch latency counts from creation, so only first attempts say something about it.
    let since_created = (attempt == 1)
        .then(|| (Utc::now() - request.created_at).to_std().ok())
        .flatten();
    shared
        .metrics
        .process_running(pool_use, since_receipt, since_created);
    let run_span = tracing::info_span!("run container", container = %started.id);
    // Coalesce whatever output is ready right now into one chunk per stream switch.
    let output = started.output.ready_chunks(64);
    let (stop, exit_code, oom_killed) = async {
        let _ = logs
            .system(&format!(
                "attempt {attempt} started on node {}",
                config.node_id
            ))
            .await;
        let deadline = tokio::time::sleep(Duration::from_secs(request.timeout_seconds));
        tokio::pin!(deadline);
        let mut output = output;
        let mut stop = None;
        let mut stop_sent = false;
        loop {
            tokio::select! {
                batch = output.next() => {
                    let Some(batch) = batch else { break };
                    if let Err(e) = publish_batch(logs, batch).await {
                        tracing::warn!(error = %e, "log streaming failed");
                    }
                }
                () = &mut deadline, if stop.is_none() => stop = Some(Stop::Timeout),
                () = stops.cancel.cancelled(), if stop.is_none() => stop = Some(Stop::Cancelled),
                () = stops.budget_spent.cancelled(), if stop.is_none() => stop = Some(Stop::Budget),
                () = shared.hard_stop.cancelled(), if stop.is_none() => stop = Some(Stop::Shutdown),
            }
            if let Some(reason) = stop
                && !stop_sent
            {
                stop_sent = true;
                let notice = match reason {
                    Stop::Timeout => {
                        format!("timed out after {}s, stopping", request.timeout_seconds)
                    }
                    Stop::Cancelled => "cancelled, stopping".to_owned(),
                    Stop::Shutdown => "node shutting down, stopping".to_owned(),
                    Stop::Budget => "budget exceeded, stopping".to_owned(),
                };
                let _ = logs.system(&notice).await;
                if let Err(e) = shared.docker.stop(&started.id, config.stop_grace).await {
                    tracing::warn!(error = %e, "cannot stop container");
                }
            }
        }
        let exit_code = shared.docker.wait(&started.id).await;
        // 137 is SIGKILL: ask Docker whether the memory limit did it.
        let oom_killed =
            matches!(exit_code, Ok(137)) && shared.docker.oom_killed(&started.id).await;
        (stop, exit_code, oom_killed)
    }
    .instrument(run_span)
    .await;
    // Removal (tens of ms) does not hold up recording the outcome; the reaper catches any
    // container whose removal fails.
    let docker = shared.docker.clone();
    let id = started.id.clone();
    shared
        .removals
        .spawn(async move { docker.remove(&id).await });
    shared.pool.untrack(&started.id);
    match exit_code {
        Ok(exit_code) => Outcome::Exited {
            exit_code,
            stop,
            start_ms,
            oom_killed,
        },
        Err(e) => Outcome::Infrastructure(format!("lost track of the container: {e}")),
    }
}

/// A warm container if one matches, else a cold start. Either way the container is fresh:
/// no other job has used it.
async fn start_container(
    shared: &Shared,
    key: &PoolKey,
    name: &str,
    request: &JobRequest,
    attempt: u32,
    script: &[u8],
) -> Result<(Started, PoolUse), DockerError> {
    if let Some(warm) = shared.pool.acquire(key) {
        let id = warm.id.clone();
        match warm.launch(script).await {
            Ok(started) => {
                // Name it after its job for operators; off the critical path.
                let docker = shared.docker.clone();
                let (id, name) = (started.id.clone(), name.to_owned());
                tokio::spawn(async move { docker.rename(&id, &name).await });
                tracing::Span::current().record("pool", "hit");
                return Ok((started, PoolUse::Hit));
            }
            Err(e) => {
                tracing::warn!(error = %e, "warm container unusable, starting cold");
                shared.pool.untrack(&id);
                shared.docker.remove(&id).await;
            }
        }
    }
    let mut labels = shared.pool.labels(ROLE_COLD);
    labels.insert(names::LABEL_JOB.to_owned(), request.job_id.clone());
    labels.insert(names::LABEL_ATTEMPT.to_owned(), attempt.to_string());
    let prepared = shared.docker.prepare(key, name, labels).await?;
    let id = prepared.id.clone();
    shared.pool.track(&id);
    tracing::Span::current().record("pool", "miss");
    match prepared.launch(script).await {
        Ok(started) => Ok((started, PoolUse::Miss)),
        Err(e) => {
            shared.pool.untrack(&id);
            shared.docker.remove(&id).await;
            Err(e)
        }
    }
}

async fn publish_batch(
    logs: &mut LogPublisher,
    batch: Vec<Result<(OutputStream, Bytes), crate::docker::DockerError>>,
) -> Result<(), crate::logs::LogError> {
    let mut current: Option<(OutputStream, Vec<u8>)> = None;
    for item in batch {
        let (stream, bytes) = match item {
            Ok(item) => item,
            Err(e) => {
                tracing::warn!(error = %e, "container output error");
                continue;
            }
        };
        match &mut current {
            Some((s, buf)) if *s == stream => buf.extend_from_slice(&bytes),
            _ => {
                if let Some((s, buf)) = current.take() {
                    logs.output(log_stream(s), &buf).await?;
                }
                current = Some((stream, bytes.to_vec()));
            }
        }
    }
    if let Some((s, buf)) = current {
        logs.output(log_stream(s), &buf).await?;
    }
    Ok(())
}

fn log_stream(stream: OutputStream) -> LogStream {
    match stream {
        OutputStream::Stdout => LogStream::Stdout,
        OutputStream::Stderr => LogStream::Stderr,
    }
}

/// The structured result: the engine's output parsed by its engine file's parser (final
/// text, session, cost, tokens, turns), or for a dry run the command line. Output that does
/// not parse still gives a result, with `text` the raw output.
fn build_result(
    request: &JobRequest,
    engine: Option<&Engine>,
    logs: &LogPublisher,
    exit_code: Option<i64>,
) -> (JobResult, Option<Usage>, bool) {
    let (stdout, truncated) = logs.stdout_text();
    let mut result = JobResult {
        exit_code,
        logs_tail: logs.tail_text(),
        truncated,
        ..JobResult::default()
    };
    let Some(engine) = engine else {
        result.text = stdout;
        return (result, None, false);
    };
    if request.dry_run {
        let argv = engine.command_line(request);
        result.text = argv
            .iter()
            .map(|arg| script::quote(arg))
            .collect::<Vec<_>>()
            .join(" ");
        result.raw = Some(script::dry_run_plan(engine, request));
        result.command = Some(argv);
        return (result, None, false);
    }
    if engine.kind == flotilla_catalog::EngineKind::Shell {
        // The shell engine's result is its standard output, byte for byte.
        result.text = stdout;
        return (result, None, false);
    }
    let format = request.output_format.as_deref().unwrap_or("text");
    let parsed = flotilla_catalog::parse(engine.output.parser, format, &stdout);
    result.text = parsed.text;
    result.session_id = parsed.session_id;
    result.num_turns = parsed.num_turns;
    result.cost_usd = parsed.cost_usd;
    result.raw = parsed.raw;
    let usage = (parsed.input_tokens.is_some()
        || parsed.output_tokens.is_some()
        || parsed.cost_usd.is_some())
    .then(|| Usage {
        input_tokens: parsed.input_tokens.unwrap_or(0),
        output_tokens: parsed.output_tokens.unwrap_or(0),
        cost_usd: parsed.cost_usd.unwrap_or(0.0),
        ..Usage::default()
    });
    (result, usage, parsed.is_error)
}

/// While the job runs: tell JetStream we are still working (so the message is not redelivered)
/// and notice a cancel that this node missed on the cancel subject.
async fn keep_alive(
    shared: Arc<Shared>,
    message: Arc<jetstream::Message>,
    job_id: String,
    cancel: CancellationToken,
    budget_spent: CancellationToken,
) {
    let period = shared.config.topology.ack_wait / 3;
    let mut ticker = tokio::time::interval(period);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        if let Err(e) = message.ack_with(AckKind::Progress).await {
            tracing::warn!(error = %e, "progress ack failed");
        }
        if let Ok(Some(current)) = shared.topology.jobs.get(&job_id).await {
            if current.record.status == JobStatus::Cancelled {
                cancel.cancel();
            }
            // The gateway already refuses the job's requests; stop one that carries on anyway.
            if current.record.usage.is_some_and(|u| u.budget_exceeded) {
                budget_spent.cancel();
            }
        }
    }
}

/// Gives the job back for another attempt on any node: the record returns to `pending` (this
/// attempt's outcome kept in its history, `note` in its log) and the message is redelivered
/// after a backoff.
async fn run_again(
    shared: &Shared,
    message: &jetstream::Message,
    job_id: &str,
    claimed: &Claimed,
    logs: &mut LogPublisher,
    error: &str,
    note: &str,
) {
    let _ = logs.system(note).await;
    if release(shared, job_id, claimed, error).await {
        let delivered = message.info().map_or(1, |info| info.delivered);
        let delay = flotilla_nats::redelivery_delay(delivered);
        ack(message, AckKind::Nak(Some(delay))).await;
    }
    shared.metrics.finished(Finish::Retried);
}

async fn ack(message: &jetstream::Message, kind: AckKind) {
    if let Err(e) = message.ack_with(kind).await {
        tracing::warn!(error = %e, "cannot ack job message");
    }
}

/// Registers the job's cancel token for the cancel subscriber while the job is on this node.
struct RunningGuard {
    shared: Arc<Shared>,
    job_id: String,
    token: CancellationToken,
}

impl RunningGuard {
    fn register(shared: &Arc<Shared>, job_id: &str) -> Self {
        let token = CancellationToken::new();
        shared
            .running
            .lock()
            .expect("running map")
            .insert(job_id.to_owned(), token.clone());
        Self {
            shared: shared.clone(),
            job_id: job_id.to_owned(),
            token,
        }
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.shared
            .running
            .lock()
            .expect("running map")
            .remove(&self.job_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_mapping() {
        assert_eq!(final_state(0, None, 5).status, JobStatus::Completed);
        let failed = final_state(3, None, 5);
        assert_eq!(failed.status, JobStatus::Failed);
        assert_eq!(failed.error.as_deref(), Some("exited with code 3"));
        let timeout = final_state(143, Some(Stop::Timeout), 5);
        assert_eq!(timeout.error.as_deref(), Some("timed out after 5s"));
        assert_eq!(
            final_state(137, Some(Stop::Cancelled), 5).status,
            JobStatus::Cancelled
        );
    }
}
