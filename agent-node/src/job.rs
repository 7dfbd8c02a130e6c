//! One job on this node: claim it in KV, run it in a container, record the outcome, ack.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use chrono::Utc;
use flotilla_catalog::Engine;
use flotilla_nats::{ApplyError, StoreError};
use flotilla_proto::{
    Encoding, JobRecord, JobRequest, JobResult, JobStatus, LlmGrant, LogStream, Usage, names,
};
use futures::StreamExt;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use tracing::Instrument as _;

use crate::{
    Shared,
    decide::{Decision, Ended, Parsed, Record, decide},
    exit_report::ExitReport,
    git::GitError,
    lease::{Claimed, claim, end_stream, record_with_retries, release},
    logs::{LogError, LogLimits, LogPublisher},
    metrics::{Finish, PoolUse},
    outbox::{Entry, PendingFinish},
    pool::Pool,
    runtime::{
        ContainerRuntime, ContainerSpec, Exit, JobRef, Network, OutputStream, Role, RuntimeError,
        Started,
    },
    script,
    workspace::{Collected, WorkspaceIo},
};

/// Why a container was stopped before it finished on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    Timeout,
    Cancelled,
    /// The node is shutting down and could not wait for the job.
    Shutdown,
    /// The llm-gateway found the job's budget spent.
    Budget,
}

pub(crate) enum Outcome {
    Exited {
        exit_code: i64,
        stop: Option<Stop>,
        /// Milliseconds from receipt to the process running.
        start_ms: f64,
        /// The kernel killed it for exceeding its memory limit.
        oom_killed: bool,
    },
    /// The container runtime failed us (create/start/attach/wait): the job never really ran.
    Infrastructure(String),
    /// The job's message breaks a bound (see [`recheck`]): it never ran, and never will.
    Refused(String),
}

impl Outcome {
    /// Docker does not always learn of an OOM kill (on cgroup v1 its event can lose the race
    /// with the exit); the job script reads the memory cgroup's own count and says so on stderr.
    fn noticing_oom(self, tail: &str) -> Self {
        match self {
            Self::Exited {
                exit_code: 137,
                stop: None,
                start_ms,
                oom_killed: false,
            } if tail.contains(script::OOM_MARKER) => Self::Exited {
                exit_code: 137,
                stop: None,
                start_ms,
                oom_killed: true,
            },
            other => other,
        }
    }

    /// The engine's exit code, once it ran.
    fn exit_code(&self) -> Option<i64> {
        match self {
            Self::Exited { exit_code, .. } => Some(*exit_code),
            Self::Infrastructure(_) | Self::Refused(_) => None,
        }
    }
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
    let Some(guard) = RunningGuard::register(&shared, &job_id) else {
        // JetStream redelivered the message of a job this node is running (a stream leader
        // moved and progress acks were lost): the run in progress keeps and acks it.
        let _entered = span.enter();
        tracing::info!("job redelivered while this node runs it; leaving it to that run");
        return;
    };
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
    let delivered = message.info().map(|info| info.delivered).unwrap_or(1);
    let Some(claimed) = claim_or_settle(&shared, &message, &request, delivered).await else {
        return;
    };
    let attempt = claimed.attempt;
    tracing::Span::current().record("attempt", attempt);
    shared.metrics.started();
    tracing::info!(attempt, engine = %request.engine, "job started");

    let message = Arc::new(message);
    let limits = LogLimits {
        max_bytes: shared.config.max_log_bytes,
        max_chunks: shared.config.max_log_chunks,
    };
    let mut logs = LogPublisher::new(
        shared.clone(),
        &request.job_id,
        attempt,
        limits,
        shared.config.max_result_bytes,
    );
    // Looked up once: the result is parsed with the engine file the job ran with, even if the
    // configuration changes meanwhile.
    let engine = shared.catalog.current().engine(&request.engine).cloned();
    let attempt_run = AttemptRun {
        request: &request,
        engine: engine.as_ref(),
        attempt,
        received,
    };
    let (outcome, collected) =
        match recheck(&shared.config.job_limits, &shared.config.node_id, &request) {
            Ok(()) => run_attempt(&shared, &message, attempt_run, &guard.token, &mut logs).await,
            Err(refusal) => {
                tracing::warn!(%refusal, "job message breaks a bound, failing it");
                let _ = logs.system(&refusal).await;
                (Outcome::Refused(refusal), Collected::default())
            }
        };
    for notice in &collected.notices {
        let _ = logs.system(notice).await;
    }
    let tail = logs.tail_text();
    let outcome = outcome.noticing_oom(&tail);
    let mut parsed = build_result(&request, engine.as_ref(), &logs, outcome.exit_code());
    parsed.add_workspace(collected);
    let decision = decide(Ended {
        outcome: &outcome,
        request: &request,
        attempt,
        delivered,
        max_deliver: shared.config.topology.max_deliver,
        tail: &tail,
        parsed,
    });
    carry_out(&shared, &message, &request, &claimed, &mut logs, decision).await;
}

/// Checks the job's bounds again before anything runs: the run queue takes messages from
/// whoever may publish on it, and validation is not the only writer. Out of bounds, timeouts
/// overflow (a panic), `NanoCpus` 0 lifts the CPU limit, a path leaves `/workspace`.
fn recheck(
    limits: &flotilla_catalog::Limits,
    node_id: &str,
    request: &JobRequest,
) -> Result<(), String> {
    flotilla_catalog::check_job_request(request, limits)
        .map_err(|e| format!("node {node_id} refused the job: {e}"))
}

/// Claims the job for this node; without a claim, settles its message: acked when there is
/// nothing to run, handed back when the record could not be read or written.
async fn claim_or_settle(
    shared: &Shared,
    message: &jetstream::Message,
    request: &JobRequest,
    delivered: i64,
) -> Option<Claimed> {
    if delivered > 1
        && let Some(holder) = held_by_live_node(shared, &request.job_id).await
    {
        // Neither acked nor handed back: the holder's progress acks keep the message (by
        // its stream sequence) and its final ack removes it.
        tracing::info!(
            holder,
            "job redelivered while its node still runs it; leaving it there"
        );
        return None;
    }
    let ack_subject = message.reply.as_ref().map(|s| s.to_string());
    match claim(shared, &request.job_id, ack_subject, delivered)
        .instrument(tracing::info_span!("claim"))
        .await
    {
        Ok(Some(claimed)) => Some(claimed),
        Ok(None) => {
            ack(message, AckKind::Ack).await;
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot claim job, handing it back");
            ack(message, AckKind::Nak(Some(Duration::from_secs(1)))).await;
            None
        }
    }
}

/// The node running the job, if it is another one that is live and was already running when
/// the attempt started. JetStream redelivers a running job's message when a stream's leader
/// moves and progress acks were lost meanwhile; taking over would run the job twice. A node
/// that is gone (its heartbeat stale) or restarted since loses the job as before.
async fn held_by_live_node(shared: &Shared, job_id: &str) -> Option<String> {
    let record = shared.topology.jobs.get(job_id).await.ok()??.record;
    let holder = record.node_id.filter(|n| *n != shared.config.node_id)?;
    if record.status != flotilla_proto::JobStatus::Running {
        return None;
    }
    let value = shared
        .topology
        .nodes
        .get(names::node_key(&holder))
        .await
        .ok()??;
    let node: flotilla_proto::NodeInfo =
        flotilla_proto::decode(&value, Encoding::MessagePack).ok()?;
    let attempt_started = record.started_at?;
    (node.is_live(Utc::now()) && node.started_at <= attempt_started).then_some(holder)
}

/// The attempt being run.
#[derive(Clone, Copy)]
struct AttemptRun<'a> {
    request: &'a JobRequest,
    /// `None` when this node's catalogue lacks the job's engine.
    engine: Option<&'a Engine>,
    attempt: u32,
    received: tokio::time::Instant,
}

/// Runs the attempt to its end while keeping its message alive and watching its record for a
/// cancel or a spent budget.
async fn run_attempt(
    shared: &Arc<Shared>,
    message: &Arc<jetstream::Message>,
    run: AttemptRun<'_>,
    cancel: &CancellationToken,
    logs: &mut LogPublisher,
) -> (Outcome, Collected) {
    let request = run.request;
    let Some(engine) = run.engine else {
        let outcome = Outcome::Infrastructure(format!(
            "engine {} is not installed on node {}",
            request.engine, shared.config.node_id
        ));
        return (outcome, Collected::default());
    };
    let budget_spent = CancellationToken::new();
    let keepalive = tokio::spawn(keep_alive(
        shared.clone(),
        message.clone(),
        request.job_id.clone(),
        cancel.clone(),
        budget_spent.clone(),
    ));
    let stops = Stops {
        cancel,
        budget_spent: &budget_spent,
    };
    let mut io = match WorkspaceIo::prepare(shared, request)
        .instrument(tracing::info_span!("workspace"))
        .await
    {
        Ok(io) => io,
        Err(e) => {
            keepalive.abort();
            let _ = logs.system(&e.to_string()).await;
            let outcome = match e {
                GitError::Refused(e) => Outcome::Refused(format!("workspace.git: {e}")),
                GitError::Unavailable(e) => Outcome::Infrastructure(format!("workspace.git: {e}")),
            };
            return (outcome, Collected::default());
        }
    };
    let outcome = execute(shared, run, engine, stops, logs, &mut io).await;
    let ran_to_end = matches!(outcome, Outcome::Exited { stop: None, .. });
    let collected = io
        .collect(shared, request, engine, run.attempt, ran_to_end)
        .instrument(tracing::info_span!("collect"))
        .await;
    keepalive.abort();
    (outcome, collected)
}

/// Carries out what [`decide`] said.
async fn carry_out(
    shared: &Shared,
    message: &jetstream::Message,
    request: &JobRequest,
    claimed: &Claimed,
    logs: &mut LogPublisher,
    decision: Decision,
) {
    let attempt = claimed.attempt;
    match decision {
        Decision::HandBack { reason } => {
            // Hand the job back at once; the next node raises the attempt.
            if release(shared, &request.job_id, claimed, &reason).await {
                ack(message, AckKind::Nak(None)).await;
            }
            shared.metrics.finished(Finish::HandedBack);
            tracing::info!(attempt, "job handed back: node shutting down");
        }
        Decision::RunAgain { error, note } => {
            tracing::info!(attempt, %error, retries = request.retries, "attempt failed, job will be retried");
            run_again(
                shared,
                message,
                &request.job_id,
                claimed,
                logs,
                &error,
                &note,
            )
            .await;
        }
        Decision::Record(record) => {
            finish(shared, message, request, attempt, logs, *record).await;
        }
    }
}

/// Records the job's outcome, ends its log stream and acks its message; while NATS does not
/// answer, the outcome waits in the outbox instead.
async fn finish(
    shared: &Shared,
    message: &jetstream::Message,
    request: &JobRequest,
    attempt: u32,
    logs: &mut LogPublisher,
    record: Record,
) {
    let dead_letter = record.dead_letter();
    let pending = PendingFinish {
        job_id: request.job_id.clone(),
        attempt,
        status: record.end.status,
        exit_code: record.end.exit_code,
        error: record.end.error,
        outcome: record.end.outcome,
        result: record.result,
        ack_subject: message.reply.as_ref().map(|s| s.to_string()),
        end_seq: logs.reserve_end_seq(),
        start_ms: record.start_ms,
        usage: record.usage,
        max_budget_usd: request.max_budget_usd,
    };
    let Some(stored) = store_outcome(shared, &pending).await else {
        return;
    };
    end_stream(shared, &pending, &stored).await;
    if stored.status == JobStatus::Failed && dead_letter {
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

/// Writes the outcome under the lease, or keeps it in the outbox while NATS is away. `None`
/// when there is nothing more to do for this delivery here.
async fn store_outcome(shared: &Shared, pending: &PendingFinish) -> Option<JobRecord> {
    let recorded = if shared.outbox.is_empty() && shared.nats_connected() {
        Some(
            record_with_retries(shared, pending)
                .instrument(tracing::info_span!("record outcome"))
                .await,
        )
    } else {
        None
    };
    let error = match recorded {
        Some(Ok(stored)) => return Some(stored),
        Some(Err(error)) => error,
        None => ApplyError::Store(StoreError::nats("nats unreachable")),
    };
    match error {
        ApplyError::Store(StoreError::Nats(reason)) => {
            // NATS is away: the outcome waits on disk; the relay records it, ends the log
            // stream and acks the message when NATS is back.
            tracing::warn!(%reason, "outcome kept in the outbox until NATS is back");
            let entry = Entry::Finish(Box::new(pending.clone()));
            if let Err(e) = shared.outbox.push(&entry).await {
                tracing::error!(error = %e, "cannot keep the outcome in the outbox");
            }
        }
        ApplyError::Refused(refusal) => {
            // Another attempt owns the job now: leave its message alone.
            tracing::warn!(attempt = pending.attempt, %refusal, "lease lost: late result rejected");
            shared.metrics.finished(Finish::LeaseLost);
        }
        ApplyError::NotFound(_) => {
            // A record is only deleted once finished; not finding one may be a replica that
            // has not caught up. The message is left unacked: its next delivery settles it.
            tracing::warn!("job record not found; its message is left for redelivery");
            shared.metrics.finished(Finish::Abandoned);
        }
        ApplyError::Store(e) => {
            // Not recorded: leave the message unacked so the job is tried again.
            tracing::warn!(error = %e, "outcome not recorded");
            shared.metrics.finished(Finish::Abandoned);
        }
    }
    None
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
    run: AttemptRun<'_>,
    engine: &Engine,
    stops: Stops<'_>,
    logs: &mut LogPublisher,
    io: &mut WorkspaceIo,
) -> Outcome {
    let (request, attempt) = (run.request, run.attempt);
    let container = Container {
        engine,
        stops,
        io,
        received: run.received,
    };
    let (access, url) = match (&engine.llm, &shared.llm_url) {
        (Some(access), Some(url)) if !request.dry_run => (access, url),
        _ => return run_container(shared, request, attempt, container, logs, &[]).await,
    };
    // No token and no job network unless the network is still fenced.
    if let Some(fence) = &shared.fence
        && let Err(e) = fence.ensure(shared.runtime.as_ref()).await
    {
        return Outcome::Infrastructure(e);
    }
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
        allowed_provider_tools: request.allowed_provider_tools.clone(),
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
    let outcome = run_container(shared, request, attempt, container, logs, &env).await;
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

/// What a container run takes beside the job: its engine, what may stop it, its workspace's
/// way in and out, and when the node received the job.
struct Container<'a> {
    engine: &'a Engine,
    stops: Stops<'a>,
    io: &'a mut WorkspaceIo,
    received: tokio::time::Instant,
}

/// Runs the job's container to the end, streaming its output.
async fn run_container(
    shared: &Shared,
    request: &JobRequest,
    attempt: u32,
    container: Container<'_>,
    logs: &mut LogPublisher,
    env: &[(String, String)],
) -> Outcome {
    let Container {
        engine,
        stops,
        io,
        received,
    } = container;
    let spec = container_spec(shared, request, env);
    let exit = ExitReport::new(io.marker().is_none());
    let markers = script::Markers {
        workspace: io.marker(),
        exit: exit.marker(),
        exit_on_stdout: exit.on_stdout(),
    };
    let script = script_for(engine, request, attempt, env, &markers);
    let job = JobRef {
        job_id: request.job_id.clone(),
        attempt,
    };
    let host = Host::of(shared);
    let notice = format!(
        "attempt {attempt} started on node {}",
        shared.config.node_id
    );
    // The notice's publish and ack overlap the hand-off, instead of holding up the first read
    // of the job's output; it still comes first in the log (its sequence number is taken now).
    let start = async {
        let started = start_container(&host, &spec, &job, &script, io.archive())
            .instrument(tracing::info_span!(
                "start container",
                pool = tracing::field::Empty
            ))
            .await;
        // The process runs now, whenever the notice's ack comes.
        (started, tokio::time::Instant::now())
    };
    let (_, (started, running_at)) = tokio::join!(logs.system(&notice), start);
    let (started, pool_use) = match started {
        Ok(started) => started,
        Err(e) => return start_failed(&e),
    };
    let start_ms = note_running(shared, request, attempt, received, running_at, pool_use);
    let id = started.id.clone();
    let limits = Limits {
        timeout: Duration::from_secs(request.timeout_seconds),
        grace: shared.config.stop_grace,
    };
    let supervised = async {
        let mut sink = Splitting { logs, io, exit };
        let supervised = supervise(&host, started, &mut sink, limits, stops).await;
        sink.flush().await;
        supervised
    }
    .instrument(tracing::info_span!(
        "run container",
        container = %id,
        first_output_unix_ns = tracing::field::Empty,
        exit_reported_unix_ns = tracing::field::Empty,
    ))
    .await;
    host.clean_up(&id);
    supervised.into_outcome(start_ms)
}

/// The container a job needs. With an llm-gateway, only jobs holding a token need the
/// (fenced) job network; the rest keep no network at all.
fn container_spec(
    shared: &Shared,
    request: &JobRequest,
    env: &[(String, String)],
) -> ContainerSpec {
    let config = &shared.config;
    let network = if shared.llm_url.is_some() && env.is_empty() {
        Network::None
    } else {
        Network::from_name(&config.network)
    };
    // The job's own image and runtime when it names them (only nodes that have them pull
    // its queue), else the node's.
    ContainerSpec {
        image: request
            .image
            .clone()
            .unwrap_or_else(|| config.image.clone()),
        memory_bytes: request.resources.memory_bytes,
        nano_cpus: request.resources.nano_cpus,
        pids_limit: config.pids_limit,
        workspace_bytes: config.workspace_bytes,
        network,
        runtime_class: request.runtime.clone().or_else(|| config.runtime.clone()),
    }
}

/// The job script, given the job's own coordinates and the trace context (OpenTelemetry's env
/// carrier) so that what the engine runs can continue the job's trace.
fn script_for(
    engine: &Engine,
    request: &JobRequest,
    attempt: u32,
    env: &[(String, String)],
    markers: &script::Markers<'_>,
) -> Bytes {
    let mut env = env.to_vec();
    env.push(("FLOTILLA_JOB_ID".to_owned(), request.job_id.clone()));
    env.push(("FLOTILLA_ATTEMPT".to_owned(), attempt.to_string()));
    if let Some(traceparent) =
        flotilla_telemetry::propagation::traceparent(&tracing::Span::current())
    {
        env.push(("TRACEPARENT".to_owned(), traceparent));
    }
    script::job_script(engine, request, &env, markers)
}

/// Counts the process as running since `running_at`; returns milliseconds from receipt.
fn note_running(
    shared: &Shared,
    request: &JobRequest,
    attempt: u32,
    received: tokio::time::Instant,
    running_at: tokio::time::Instant,
    pool_use: PoolUse,
) -> f64 {
    let since_receipt = running_at - received;
    // Dispatch latency counts from creation, so only first attempts say something about it.
    let since_created = (attempt == 1)
        .then(|| (Utc::now() - request.created_at).to_std().ok())
        .flatten()
        .map(|age| age.saturating_sub(running_at.elapsed()));
    shared
        .metrics
        .process_running(pool_use, since_receipt, since_created);
    since_receipt.as_secs_f64() * 1000.0
}

/// A container that did not start: the job never really ran.
fn start_failed(error: &RuntimeError) -> Outcome {
    Outcome::Infrastructure(format!("container failed to start: {error}"))
}

/// What running a container takes from the node, NATS aside (tests build one on the fake
/// runtime).
struct Host<'a> {
    runtime: &'a Arc<dyn ContainerRuntime>,
    pool: &'a Pool,
    removals: &'a TaskTracker,
    /// The drain grace period is over: stop and hand back.
    hard_stop: &'a CancellationToken,
}

impl<'a> Host<'a> {
    fn of(shared: &'a Shared) -> Self {
        Self {
            runtime: &shared.runtime,
            pool: &shared.pool,
            removals: &shared.removals,
            hard_stop: &shared.hard_stop,
        }
    }

    /// Removal (tens of ms) does not hold up recording the outcome; the reaper catches any
    /// container whose removal fails.
    fn clean_up(&self, id: &str) {
        let runtime = self.runtime.clone();
        let owned = id.to_owned();
        self.removals
            .spawn(async move { runtime.remove(&owned).await });
        self.pool.untrack(id);
    }
}

/// A warm container if one matches, else a cold start. Either way the container is fresh:
/// no other job has used it.
async fn start_container(
    host: &Host<'_>,
    spec: &ContainerSpec,
    job: &JobRef,
    script: &[u8],
    archive: Option<&std::path::Path>,
) -> Result<(Started, PoolUse), RuntimeError> {
    let name = format!("flotilla-{}-{}", job.job_id, job.attempt);
    if let Some(warm) = host.pool.acquire(spec) {
        let id = warm.id.clone();
        match warm.launch_with(script, archive).await {
            Ok(started) => {
                // Name it after its job for operators; off the critical path.
                let (runtime, id) = (host.runtime.clone(), started.id.clone());
                tokio::spawn(async move { runtime.rename(&id, &name).await });
                tracing::Span::current().record("pool", "hit");
                return Ok((started, PoolUse::Hit));
            }
            Err(e) => {
                tracing::warn!(error = %e, "warm container unusable, starting cold");
                host.pool.untrack(&id);
                host.runtime.remove(&id).await;
            }
        }
    }
    let owner = host.pool.owner(Role::Cold, Some(job.clone()));
    let prepared = host.runtime.prepare(spec, &name, &owner).await?;
    let id = prepared.id.clone();
    host.pool.track(&id);
    tracing::Span::current().record("pool", "miss");
    match prepared.launch_with(script, archive).await {
        Ok(started) => Ok((started, PoolUse::Miss)),
        Err(e) => {
            host.pool.untrack(&id);
            host.runtime.remove(&id).await;
            Err(e)
        }
    }
}

/// The limits of one run.
#[derive(Debug, Clone, Copy)]
struct Limits {
    timeout: Duration,
    /// Between SIGTERM and SIGKILL when the container is stopped.
    grace: Duration,
}

/// How a supervised container ended.
struct Supervised {
    stop: Option<Stop>,
    exit: Result<Exit, RuntimeError>,
}

impl Supervised {
    fn into_outcome(self, start_ms: f64) -> Outcome {
        match self.exit {
            Ok(exit) => Outcome::Exited {
                exit_code: exit.code,
                stop: self.stop,
                start_ms,
                oom_killed: exit.oom_killed,
            },
            Err(e) => Outcome::Infrastructure(format!("lost track of the container: {e}")),
        }
    }
}

/// Where a supervised container's output goes: the job's log stream, or a recorder in tests.
trait LogSink {
    /// A notice from the node; one that cannot be published does not stop the job.
    async fn system(&mut self, text: &str);
    async fn output(&mut self, stream: LogStream, data: &[u8]) -> Result<(), LogError>;
    /// The exit status the job script reported in band, if it did (see `exit_report`).
    fn reported_exit(&self) -> Option<i64> {
        None
    }
    /// The job script's output is all in (see `exit_report`): no need to read on to the end of
    /// the stream.
    fn output_complete(&self) -> bool {
        false
    }
}

impl LogSink for LogPublisher {
    async fn system(&mut self, text: &str) {
        let _ = LogPublisher::system(self, text).await;
    }

    async fn output(&mut self, stream: LogStream, data: &[u8]) -> Result<(), LogError> {
        LogPublisher::output(self, stream, data).await
    }
}

/// The job's log, with the workspace tar (after the marker on stdout) and the exit report (on
/// stderr) taken out.
struct Splitting<'a, S> {
    logs: &'a mut S,
    io: &'a mut WorkspaceIo,
    exit: ExitReport,
}

impl<S: LogSink> Splitting<'_, S> {
    /// Logs what was held back in case it began a marker.
    async fn flush(&mut self) {
        let held = self.io.end_of_output();
        if !held.is_empty() {
            let _ = self.logs.output(LogStream::Stdout, &held).await;
        }
        let (stdout, stderr) = self.exit.end();
        for (stream, held) in [(LogStream::Stdout, stdout), (LogStream::Stderr, stderr)] {
            if !held.is_empty() {
                let _ = self.logs.output(stream, &held).await;
            }
        }
    }
}

impl<S: LogSink> LogSink for Splitting<'_, S> {
    async fn system(&mut self, text: &str) {
        self.logs.system(text).await;
    }

    async fn output(&mut self, stream: LogStream, data: &[u8]) -> Result<(), LogError> {
        let kept = match stream {
            LogStream::Stdout => self.exit.feed(stream, &self.io.split(data)),
            LogStream::Stderr => self.exit.feed(stream, data),
            LogStream::System => data.to_vec(),
        };
        if kept.is_empty() {
            return Ok(());
        }
        self.logs.output(stream, &kept).await
    }

    fn reported_exit(&self) -> Option<i64> {
        self.exit.status()
    }

    fn output_complete(&self) -> bool {
        self.exit.complete()
    }
}

/// Streams the container's output to `logs` until it ends, stopping the container (SIGTERM,
/// SIGKILL after the grace period) on a timeout, a cancel, a spent budget or the node's hard
/// stop; then waits for its exit.
async fn supervise(
    host: &Host<'_>,
    started: Started,
    logs: &mut impl LogSink,
    limits: Limits,
    stops: Stops<'_>,
) -> Supervised {
    // Coalesce whatever output is ready right now into one chunk per stream switch.
    let mut output = started.output.ready_chunks(64);
    let deadline = tokio::time::sleep(limits.timeout);
    tokio::pin!(deadline);
    let mut stop = None;
    let mut moments = Moments::default();
    loop {
        let requested = tokio::select! {
            batch = output.next() => {
                let Some(batch) = batch else { break };
                moments.output();
                if let Err(e) = publish_batch(logs, batch).await {
                    tracing::warn!(error = %e, "log streaming failed");
                }
                if logs.reported_exit().is_some() {
                    moments.exit_reported();
                }
                if logs.output_complete() && stop.is_none() {
                    // The script said all it will: its container is removed in the background.
                    break;
                }
                None
            }
            () = &mut deadline, if stop.is_none() => Some(Stop::Timeout),
            () = stops.cancel.cancelled(), if stop.is_none() => Some(Stop::Cancelled),
            () = stops.budget_spent.cancelled(), if stop.is_none() => Some(Stop::Budget),
            () = host.hard_stop.cancelled(), if stop.is_none() => Some(Stop::Shutdown),
        };
        if let Some(reason) = requested {
            stop = Some(reason);
            stop_container(host, &started.id, reason, limits, logs).await;
        }
    }
    let exit = match (stop, logs.reported_exit()) {
        // Ended on its own and said how: no need to wait for the runtime to notice (it is
        // removed in the background). A SIGKILL may be an OOM kill, which the runtime knows.
        (None, Some(code)) if code != 137 => Ok(Exit {
            code,
            oom_killed: false,
        }),
        _ => host.runtime.wait(&started.id).await,
    };
    Supervised { stop, exit }
}

/// When the first output and the exit report arrived, recorded on the `run container` span
/// (Unix nanoseconds, comparable with other spans' times) for `flotilla-bench`'s breakdown.
#[derive(Default)]
struct Moments {
    output_seen: bool,
    exit_seen: bool,
}

impl Moments {
    fn output(&mut self) {
        if !std::mem::replace(&mut self.output_seen, true) {
            Self::record("first_output_unix_ns");
        }
    }

    fn exit_reported(&mut self) {
        if !std::mem::replace(&mut self.exit_seen, true) {
            Self::record("exit_reported_unix_ns");
        }
    }

    fn record(field: &'static str) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        tracing::Span::current().record(field, now);
    }
}

/// Says why in the job's log, then stops the container; its output stream then ends.
async fn stop_container(
    host: &Host<'_>,
    id: &str,
    reason: Stop,
    limits: Limits,
    logs: &mut impl LogSink,
) {
    let notice = match reason {
        Stop::Timeout => format!("timed out after {}s, stopping", limits.timeout.as_secs()),
        Stop::Cancelled => "cancelled, stopping".to_owned(),
        Stop::Shutdown => "node shutting down, stopping".to_owned(),
        Stop::Budget => "budget exceeded, stopping".to_owned(),
    };
    logs.system(&notice).await;
    if let Err(e) = host.runtime.stop(id, limits.grace).await {
        tracing::warn!(error = %e, "cannot stop container");
    }
}

async fn publish_batch(
    logs: &mut impl LogSink,
    batch: Vec<Result<(OutputStream, Bytes), RuntimeError>>,
) -> Result<(), LogError> {
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
) -> Parsed {
    let (stdout, truncated) = logs.stdout_text();
    let mut result = JobResult {
        exit_code,
        logs_tail: logs.tail_text(),
        truncated,
        ..JobResult::default()
    };
    let Some(engine) = engine else {
        result.text = stdout;
        return Parsed::plain(result);
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
        return Parsed::plain(result);
    }
    if engine.kind == flotilla_catalog::EngineKind::Shell {
        // The shell engine's result is its standard output, byte for byte.
        result.text = stdout;
        return Parsed::plain(result);
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
    Parsed {
        result,
        usage,
        engine_error: parsed.is_error,
        workspace_error: None,
    }
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
    /// `None` when the job already runs on this node.
    fn register(shared: &Arc<Shared>, job_id: &str) -> Option<Self> {
        let token = CancellationToken::new();
        let mut running = shared.running.lock().expect("running map");
        if running.contains_key(job_id) {
            return None;
        }
        running.insert(job_id.to_owned(), token.clone());
        Some(Self {
            shared: shared.clone(),
            job_id: job_id.to_owned(),
            token,
        })
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
mod recheck_tests {
    use flotilla_catalog::Limits;
    use flotilla_proto::Resources;

    use super::*;

    fn example() -> JobRequest {
        JobRequest::example("a-1", "shell", "true")
    }

    #[test]
    fn a_job_within_its_bounds_runs() {
        assert!(recheck(&Limits::default(), "n1", &example()).is_ok());
    }

    #[test]
    fn a_hostile_queue_message_is_refused_naming_the_field() {
        let limits = Limits::default();
        // u64::MAX overflowed the token lifetime (timeout + slack) and panicked the job task.
        let forever = JobRequest {
            timeout_seconds: u64::MAX,
            ..example()
        };
        let refusal = recheck(&limits, "n1", &forever).unwrap_err();
        assert_eq!(
            refusal,
            "node n1 refused the job: timeout_seconds must be between 1 and 86400, got \
             18446744073709551615"
        );
        // NanoCpus 0 is no CPU limit at all to Docker; more than the node allows, no memory.
        for resources in [
            Resources {
                memory_bytes: 1 << 30,
                nano_cpus: 0,
            },
            Resources {
                memory_bytes: 1 << 30,
                nano_cpus: 64_000_000_000,
            },
            Resources {
                memory_bytes: 0,
                nano_cpus: 1_000_000_000,
            },
        ] {
            let hostile = JobRequest {
                resources,
                ..example()
            };
            let refusal = recheck(&limits, "n1", &hostile).unwrap_err();
            assert!(refusal.contains("resources."), "{refusal}");
        }
    }
}

/// The container side of a job (start, supervise, clean up) on the fake runtime.
#[cfg(test)]
mod container_tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        metrics::PoolMetrics,
        runtime::fake::{Behaviour, Event, FakeRuntime, Op, SIGKILL_EXIT, SIGTERM_EXIT},
    };

    /// What a job's log stream would have received.
    #[derive(Default)]
    struct Recorder {
        system: Vec<String>,
        output: Vec<(LogStream, Vec<u8>)>,
    }

    impl LogSink for Recorder {
        async fn system(&mut self, text: &str) {
            self.system.push(text.to_owned());
        }

        async fn output(&mut self, stream: LogStream, data: &[u8]) -> Result<(), LogError> {
            self.output.push((stream, data.to_vec()));
            Ok(())
        }
    }

    impl Recorder {
        fn bytes(&self, stream: Option<LogStream>) -> Vec<u8> {
            let wanted = |s: &LogStream| stream.is_none_or(|w| w == *s);
            let chunks = self.output.iter().filter(|(s, _)| wanted(s));
            chunks.flat_map(|(_, d)| d.iter().copied()).collect()
        }
    }

    /// A node's container side on the fake runtime.
    struct Node {
        fake: FakeRuntime,
        runtime: Arc<dyn ContainerRuntime>,
        pool: Arc<Pool>,
        removals: TaskTracker,
        hard_stop: CancellationToken,
        cancel: CancellationToken,
        budget_spent: CancellationToken,
    }

    const GRACE: Duration = Duration::from_secs(10);

    fn spec() -> ContainerSpec {
        ContainerSpec {
            image: "flotilla-worker:test".to_owned(),
            memory_bytes: 512 << 20,
            nano_cpus: 1_000_000_000,
            pids_limit: 256,
            workspace_bytes: 1 << 30,
            network: Network::None,
            runtime_class: None,
        }
    }

    fn job() -> JobRef {
        JobRef {
            job_id: "job-1".to_owned(),
            attempt: 1,
        }
    }

    impl Node {
        fn new(behaviour: Behaviour) -> Self {
            Self::with_pool(behaviour, Vec::new())
        }

        fn with_pool(behaviour: Behaviour, targets: Vec<(ContainerSpec, usize)>) -> Self {
            let fake = FakeRuntime::new(behaviour);
            let runtime: Arc<dyn ContainerRuntime> = Arc::new(fake.clone());
            let pool = Pool::new(
                runtime.clone(),
                "node-1".to_owned(),
                "test".to_owned(),
                targets,
                4,
                Duration::from_secs(3600),
                PoolMetrics::default(),
            );
            Self {
                fake,
                runtime,
                pool: Arc::new(pool),
                removals: TaskTracker::new(),
                hard_stop: CancellationToken::new(),
                cancel: CancellationToken::new(),
                budget_spent: CancellationToken::new(),
            }
        }

        fn host(&self) -> Host<'_> {
            Host {
                runtime: &self.runtime,
                pool: &self.pool,
                removals: &self.removals,
                hard_stop: &self.hard_stop,
            }
        }

        /// Starts, supervises and cleans up one job container, as `run_container` does.
        async fn run(&self, timeout: Duration, logs: &mut Recorder) -> (Outcome, String) {
            let host = self.host();
            let (started, _) = start_container(&host, &spec(), &job(), b"the job script", None)
                .await
                .expect("container started");
            let id = started.id.clone();
            let stops = Stops {
                cancel: &self.cancel,
                budget_spent: &self.budget_spent,
            };
            let limits = Limits {
                timeout,
                grace: GRACE,
            };
            let supervised = supervise(&host, started, logs, limits, stops).await;
            host.clean_up(&id);
            self.removals.close();
            self.removals.wait().await;
            (supervised.into_outcome(1.0), id)
        }
    }

    /// (exit code, stop, OOM) of an outcome that ran.
    fn exited(outcome: &Outcome) -> (i64, Option<Stop>, bool) {
        match outcome {
            Outcome::Exited {
                exit_code,
                stop,
                oom_killed,
                ..
            } => (*exit_code, *stop, *oom_killed),
            Outcome::Infrastructure(error) => panic!("infrastructure failure: {error}"),
            Outcome::Refused(error) => panic!("refused: {error}"),
        }
    }

    fn infrastructure(outcome: &Outcome) -> &str {
        match outcome {
            Outcome::Infrastructure(error) => error,
            Outcome::Exited { exit_code, .. } => panic!("ran and exited {exit_code}"),
            Outcome::Refused(error) => panic!("refused: {error}"),
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// Interleaved stdout and stderr lines; each stream's bytes and all bytes in order.
    fn interleaved(duration: Duration) -> (Behaviour, Vec<u8>, Vec<u8>) {
        let mut behaviour = Behaviour::exit(0).lasting(duration);
        let (mut all, mut stdout) = (Vec::new(), Vec::new());
        for i in 0..200 {
            let line = format!("line {i}\n");
            all.extend_from_slice(line.as_bytes());
            if i % 7 == 3 {
                behaviour = behaviour.stderr(line);
            } else {
                stdout.extend_from_slice(line.as_bytes());
                behaviour = behaviour.stdout(line);
            }
        }
        (behaviour, all, stdout)
    }

    #[tokio::test(start_paused = true)]
    async fn normal_exit_delivers_every_byte_in_order() {
        // Spread out (one chunk at a time) and all at once (batched by stream switches).
        for duration in [Duration::from_secs(2), Duration::ZERO] {
            let (behaviour, all, stdout) = interleaved(duration);
            let node = Node::new(behaviour);
            let mut logs = Recorder::default();
            let (outcome, id) = node.run(HOUR, &mut logs).await;
            assert_eq!(exited(&outcome), (0, None, false));
            assert_eq!(logs.bytes(None), all);
            assert_eq!(logs.bytes(Some(LogStream::Stdout)), stdout);
            assert!(logs.system.is_empty(), "{:?}", logs.system);
            // The script went in on stdin; the container is gone and no longer the pool's.
            let events = node.fake.events();
            assert!(events.contains(&Event::Launched { id: id.clone() }));
            assert!(events.contains(&Event::Removed { id: id.clone() }));
            assert!(!node.pool.owns(&id));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cold_start_is_labelled_with_its_job_and_gets_the_script() {
        let node = Node::new(Behaviour::exit(0));
        let host = node.host();
        let (started, pool_use) = start_container(&host, &spec(), &job(), b"echo hi", None)
            .await
            .unwrap();
        assert_eq!(pool_use, PoolUse::Miss);
        assert!(node.pool.owns(&started.id));
        node.runtime.wait(&started.id).await.unwrap();
        let container = node.fake.container(&started.id).unwrap();
        assert_eq!(container.name, "flotilla-job-1-1");
        assert_eq!(container.owner, node.pool.owner(Role::Cold, Some(job())));
        assert_eq!(container.spec, spec());
        assert_eq!(container.script.as_deref(), Some(&b"echo hi"[..]));
    }

    #[tokio::test(start_paused = true)]
    async fn non_zero_exit_code_is_reported() {
        let node = Node::new(Behaviour::exit(3).stderr("boom\n"));
        let mut logs = Recorder::default();
        let (outcome, _) = node.run(HOUR, &mut logs).await;
        assert_eq!(exited(&outcome), (3, None, false));
        assert_eq!(logs.bytes(Some(LogStream::Stderr)), b"boom\n");
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_stops_a_hanging_container_with_the_grace_period() {
        let node = Node::new(Behaviour::hang().stdout("working\n").ignoring_term());
        let mut logs = Recorder::default();
        let begun = tokio::time::Instant::now();
        let (outcome, id) = node.run(Duration::from_secs(5), &mut logs).await;
        // SIGTERM at the timeout is ignored: SIGKILL once the grace period is over.
        assert_eq!(exited(&outcome), (SIGKILL_EXIT, Some(Stop::Timeout), false));
        assert_eq!(begun.elapsed(), Duration::from_secs(5) + GRACE);
        assert_eq!(logs.system, ["timed out after 5s, stopping"]);
        assert_eq!(logs.bytes(None), b"working\n");
        let stopped = Event::Stopped { id, grace: GRACE };
        assert!(node.fake.events().contains(&stopped));
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_of_a_container_that_honours_sigterm() {
        let node = Node::new(Behaviour::hang());
        let begun = tokio::time::Instant::now();
        let (outcome, _) = node
            .run(Duration::from_secs(5), &mut Recorder::default())
            .await;
        assert_eq!(exited(&outcome), (SIGTERM_EXIT, Some(Stop::Timeout), false));
        assert_eq!(begun.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_stops_the_container() {
        let node = Node::new(Behaviour::hang());
        let cancel = node.cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            cancel.cancel();
        });
        let mut logs = Recorder::default();
        let (outcome, _) = node.run(HOUR, &mut logs).await;
        assert_eq!(
            exited(&outcome),
            (SIGTERM_EXIT, Some(Stop::Cancelled), false)
        );
        assert_eq!(logs.system, ["cancelled, stopping"]);
    }

    #[tokio::test(start_paused = true)]
    async fn spent_budget_and_node_shutdown_stop_the_container() {
        let node = Node::new(Behaviour::hang());
        node.budget_spent.cancel();
        let mut logs = Recorder::default();
        let (outcome, _) = node.run(HOUR, &mut logs).await;
        assert_eq!(exited(&outcome), (SIGTERM_EXIT, Some(Stop::Budget), false));
        assert_eq!(logs.system, ["budget exceeded, stopping"]);

        let node = Node::new(Behaviour::hang());
        node.hard_stop.cancel();
        let mut logs = Recorder::default();
        let (outcome, _) = node.run(HOUR, &mut logs).await;
        assert_eq!(
            exited(&outcome),
            (SIGTERM_EXIT, Some(Stop::Shutdown), false)
        );
        assert_eq!(logs.system, ["node shutting down, stopping"]);
    }

    #[tokio::test(start_paused = true)]
    async fn oom_kill_is_reported() {
        let behaviour = Behaviour::oom()
            .stdout("allocating\n")
            .lasting(Duration::from_secs(1));
        let node = Node::new(behaviour);
        let mut logs = Recorder::default();
        let (outcome, _) = node.run(HOUR, &mut logs).await;
        assert_eq!(exited(&outcome), (SIGKILL_EXIT, None, true));
        assert_eq!(logs.bytes(None), b"allocating\n");
    }

    #[tokio::test(start_paused = true)]
    async fn start_failure_is_an_infrastructure_failure() {
        let node = Node::new(Behaviour::exit(0));
        node.fake.fail(Op::Prepare, 1);
        let host = node.host();
        let error = start_container(&host, &spec(), &job(), b"x", None)
            .await
            .err()
            .expect("start fails");
        let outcome = start_failed(&error);
        let message = infrastructure(&outcome);
        assert!(
            message.starts_with("container failed to start: fake: injected failure"),
            "{message}"
        );
        assert!(node.fake.containers().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn failed_stdin_removes_the_container() {
        let node = Node::new(Behaviour::exit(0));
        node.fake.fail(Op::Launch, 1);
        let host = node.host();
        let error = start_container(&host, &spec(), &job(), b"x", None)
            .await
            .err()
            .expect("launch fails");
        assert!(matches!(error, RuntimeError::Stdin { .. }), "{error}");
        assert!(node.fake.containers().is_empty());
        assert!(!node.pool.owns("fake-1"));
    }

    #[tokio::test(start_paused = true)]
    async fn losing_the_container_is_an_infrastructure_failure() {
        let node = Node::new(Behaviour::exit(0));
        node.fake.fail(Op::Wait, 1);
        let (outcome, _) = node.run(HOUR, &mut Recorder::default()).await;
        let message = infrastructure(&outcome);
        assert!(
            message.starts_with("lost track of the container: "),
            "{message}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn warm_container_serves_the_job_and_a_dead_one_is_replaced_by_a_cold_start() {
        let node = Node::with_pool(Behaviour::exit(0), vec![(spec(), 1)]);
        let stop = CancellationToken::new();
        let pool = node.pool.clone();
        let maintain = tokio::spawn({
            let stop = stop.clone();
            async move { pool.maintain(stop).await }
        });
        while node.pool.stats().warm.values().sum::<u32>() < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let host = node.host();
        let (started, pool_use) = start_container(&host, &spec(), &job(), b"x", None)
            .await
            .unwrap();
        assert_eq!(pool_use, PoolUse::Hit);
        let warm_id = started.id.clone();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let renamed = Event::Renamed {
            id: warm_id,
            name: "flotilla-job-1-1".to_owned(),
        };
        assert!(node.fake.events().contains(&renamed));

        // The refill is warm again; it dies before its job arrives.
        while node.pool.stats().warm.values().sum::<u32>() < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let dead = node.fake.containers().last().unwrap().id.clone();
        node.fake.kill(&dead).await;
        let (started, pool_use) = start_container(&host, &spec(), &job(), b"x", None)
            .await
            .unwrap();
        assert_eq!(pool_use, PoolUse::Miss);
        assert_ne!(started.id, dead);
        assert!(node.fake.events().contains(&Event::Removed { id: dead }));
        stop.cancel();
        maintain.await.unwrap();
    }
}
