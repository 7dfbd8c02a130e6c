//! `GET /jobs/{id}/logs`: a job's output as server-sent events, replayed from the log stream
//! and then followed live until the job ends.
//!
//! Each `log` event carries `{seq, attempt, stream, data}`; its SSE id is the chunk's sequence
//! in the log stream, so `?from=<id>` (or `Last-Event-ID`) resumes after a disconnect. The last
//! event is `end` with `{status, exit_code, error}`.

use std::{convert::Infallible, sync::Arc, time::Duration};

use async_nats::jetstream::consumer::{self, DeliverPolicy};
use axum::{
    extract::State,
    http::HeaderMap,
    response::sse::{Event, KeepAlive, Sse},
};
use flotilla_proto::{Encoding, JobRecord, JobStatus, LogChunk, LogEnd, LogStream, names};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use utoipa::{OpenApi, ToSchema};

use crate::{
    AppState,
    error::{ApiError, ErrorBody},
    extract::{Path, Query},
    responses::{Internal, Keyless, NotFoundJob, Unauthorized, Unavailable},
};

/// After the job is terminal, how long to wait for the node's end marker before ending the
/// stream from the KV record (the node may have died).
const END_MARKER_GRACE: Duration = Duration::from_secs(5);

#[derive(Deserialize)]
pub struct LogsQuery {
    from: Option<String>,
    follow: Option<String>,
}

// The data of the two event types. Fields in alphabetical order: the keys come out in the order
// they had when these were built with `json!`.

/// The data of a `log` event: one chunk of the job's output. The event's `id` is the chunk's
/// sequence in the log stream, for `from` and `Last-Event-ID`.
#[derive(Serialize, ToSchema)]
pub struct LogEvent<'a> {
    /// The attempt that produced the chunk (a job retried on another node shows each attempt's
    /// output in turn).
    attempt: u32,
    /// The chunk's bytes, decoded as lossy UTF-8.
    #[schema(value_type = String)]
    data: std::borrow::Cow<'a, str>,
    /// Per attempt: 0, 1, 2, ...
    seq: u64,
    stream: LogStream,
}

/// The data of the `end` event, the last one: the job's status when the stream ended.
#[derive(Serialize, ToSchema)]
pub struct EndEvent<'a> {
    #[schema(required)]
    error: Option<&'a str>,
    #[schema(required)]
    exit_code: Option<i64>,
    status: JobStatus,
}

/// The event data schemas, which the operation names only in its description.
#[derive(OpenApi)]
#[openapi(components(schemas(LogEvent<'_>, EndEvent<'_>)))]
pub struct EventSchemas;

#[utoipa::path(
    get,
    path = "/jobs/{job_id}/logs",
    tag = "jobs",
    operation_id = "job_logs",
    summary = "Follow a job's output (server-sent events)",
    description = "Replays the job's output from the beginning (or from `from`, or after \
        `Last-Event-ID`), then follows it live until the job ends. Events: `log`, whose `id` \
        is the chunk's log-stream sequence and whose data is a `LogEvent`; and `end`, the \
        last one, whose data is an `EndEvent`. Truncation of a long output shows as a \
        `system` `log` event. Keep-alive comments are sent while the stream is idle.",
    params(
        ("job_id" = String, Path, pattern = "^[A-Za-z0-9_-]{1,128}$",
            description = "The job's id; any other id answers 404."),
        ("from" = Option<u64>, Query, maximum = 18_446_744_073_709_551_615_u64,
            description = "Replay from this event id (a log-stream \
            sequence, not the per-attempt `seq`); 0 counts as 1."),
        ("follow" = Option<bool>, Query, description = "`true` (when absent) follows until \
            the job ends; `false` sends what is stored, then `end` with the current status."),
        ("Last-Event-ID" = Option<String>, Header, nullable = false, description = "When `from` is absent, \
            replay resumes after this event id; a value that is not a number is ignored."),
    ),
    responses(
        (status = 200, description = "The event stream.", content_type = "text/event-stream",
            body = String,
            example = "event: log\nid: 17\ndata: {\"attempt\":1,\"data\":\"hi\\n\",\"seq\":0,\"stream\":\"stdout\"}\n\nevent: end\ndata: {\"error\":null,\"exit_code\":0,\"status\":\"completed\"}\n\n"),
        (status = 401, response = Unauthorized),
        (status = 403, response = Keyless),
        (status = 404, response = NotFoundJob),
        (status = 422, description = "`invalid_field` (`from` or `follow`): not a \
            non-negative integer, or not exactly `true` or `false`.", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn stream(
    State(state): State<Arc<AppState>>,
    Path(job_id): Path<String>,
    Query(query): Query<LogsQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let record = crate::jobs::load(&state, &job_id).await?;
    let resume_after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let from = match query.from.as_deref() {
        None => None,
        Some(raw) => Some(raw.parse::<u64>().map_err(|_| {
            ApiError::invalid("from", "from must be a non-negative integer event id")
        })?),
    };
    let follow = match query.follow.as_deref() {
        None | Some("true") => true,
        Some("false") => false,
        Some(_) => return Err(ApiError::invalid("follow", "follow must be true or false")),
    };
    let deliver_policy = match (from, resume_after) {
        (Some(from), _) => DeliverPolicy::ByStartSequence {
            start_sequence: from.max(1),
        },
        (None, Some(last)) => DeliverPolicy::ByStartSequence {
            start_sequence: last + 1,
        },
        (None, None) => DeliverPolicy::All,
    };
    let logs = state
        .topology
        .js
        .get_stream(names::STREAM_LOGS)
        .await
        .map_err(ApiError::unavailable)?;
    let mut consumer = logs
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: names::log_subject(&job_id),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(ApiError::unavailable)?;
    let backlog = consumer
        .info()
        .await
        .map_err(ApiError::unavailable)?
        .num_pending;
    let messages = consumer.messages().await.map_err(ApiError::unavailable)?;

    let (events, receiver) = mpsc::channel(64);
    tokio::spawn(pump(state, record, messages, backlog, follow, events));
    let mut receiver = receiver;
    let stream = futures::stream::poll_fn(move |cx| receiver.poll_recv(cx)).map(Ok);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Moves chunks from the ordered consumer to the client until the end (or the client leaves:
/// a failed send ends the task and drops the consumer).
async fn pump(
    state: Arc<AppState>,
    record: JobRecord,
    mut messages: consumer::pull::Ordered,
    mut backlog: u64,
    follow: bool,
    events: mpsc::Sender<Event>,
) {
    let job_id = record.job_id.clone();
    // Nothing more will come: no output stored yet and either the caller does not follow, or
    // the job ended without ever running (cancelled while queued, rejected).
    let never_ran = record.status.is_terminal() && record.attempt == 0;
    if backlog == 0 && (!follow || never_ran) {
        let _ = events.send(end_event(&end_from_record(&record))).await;
        return;
    }
    let mut terminal_since: Option<tokio::time::Instant> =
        record.status.is_terminal().then(tokio::time::Instant::now);
    loop {
        let notify = state.index.waiter(&job_id);
        let became_terminal = notify.notified();
        // The job may have ended between two passes, before this waiter existed.
        if terminal_since.is_none()
            && state
                .index
                .status(&job_id)
                .is_some_and(JobStatus::is_terminal)
        {
            terminal_since = Some(tokio::time::Instant::now());
        }
        let deadline = terminal_since.map(|since| since + END_MARKER_GRACE);
        tokio::select! {
            message = messages.next() => {
                let Some(Ok(message)) = message else { return };
                let pending = message.info().map(|info| info.pending).unwrap_or(0);
                let sequence = message.info().map(|info| info.stream_sequence).unwrap_or(0);
                let chunk: LogChunk = match flotilla_proto::decode(&message.payload, Encoding::MessagePack) {
                    Ok(chunk) => chunk,
                    Err(e) => {
                        tracing::warn!(job_id, error = %e, "undecodable log chunk");
                        continue;
                    }
                };
                let sent = match &chunk.end {
                    Some(end) => {
                        let _ = events.send(end_event(end).id(sequence.to_string())).await;
                        return;
                    }
                    None => events.send(log_event(&chunk, sequence)).await,
                };
                if sent.is_err() {
                    return;
                }
                backlog = backlog.saturating_sub(1).min(pending);
                if !follow && backlog == 0 {
                    let current = current_or(&state, record).await;
                    let _ = events.send(end_event(&end_from_record(&current))).await;
                    return;
                }
            }
            () = became_terminal, if terminal_since.is_none() => {
                terminal_since = Some(tokio::time::Instant::now());
            }
            () = sleep_until(deadline) => {
                // Terminal in KV and no end marker came: end from the record.
                let current = current_or(&state, record).await;
                let _ = events.send(end_event(&end_from_record(&current))).await;
                return;
            }
        }
    }
}

/// The job's record as it is now, or `fallback` when it cannot be read (the cause is logged).
async fn current_or(state: &AppState, fallback: JobRecord) -> JobRecord {
    match crate::jobs::load(state, &fallback.job_id).await {
        Ok(current) => current,
        Err(e) => {
            e.log_dropped();
            fallback
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn end_from_record(record: &JobRecord) -> LogEnd {
    LogEnd {
        status: record.status,
        exit_code: record.exit_code,
        error: record.error.clone(),
    }
}

fn log_event(chunk: &LogChunk, sequence: u64) -> Event {
    let data = LogEvent {
        attempt: chunk.attempt,
        data: String::from_utf8_lossy(&chunk.data),
        seq: chunk.seq,
        stream: chunk.stream,
    };
    Event::default()
        .event("log")
        .id(sequence.to_string())
        .data(to_json(&data))
}

fn end_event(end: &LogEnd) -> Event {
    let data = EndEvent {
        error: end.error.as_deref(),
        exit_code: end.exit_code,
        status: end.status,
    };
    Event::default().event("end").data(to_json(&data))
}

fn to_json(data: &impl Serialize) -> String {
    // Strings, numbers and enums with string names: serde_json cannot fail on these.
    serde_json::to_string(data).expect("event data serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openapi::tests::assert_required_matches;

    #[test]
    fn openapi_event_schemas_require_what_is_always_sent() {
        let end = EndEvent {
            error: None,
            exit_code: None,
            status: JobStatus::Running,
        };
        assert_required_matches("EndEvent", &end);
        let log = LogEvent {
            attempt: 1,
            data: "hi".into(),
            seq: 0,
            stream: LogStream::Stdout,
        };
        assert_required_matches("LogEvent", &log);
    }
}
