//! `GET /jobs/{id}/logs`: a job's output as server-sent events, replayed from the log stream
//! and then followed live until the job ends.
//!
//! Each `log` event carries `{seq, attempt, stream, data}`; its SSE id is the chunk's sequence
//! in the log stream, so `?from=<id>` (or `Last-Event-ID`) resumes after a disconnect. The last
//! event is `end` with `{status, exit_code, error}`.

use std::{convert::Infallible, sync::Arc, time::Duration};

use async_nats::jetstream::consumer::{self, DeliverPolicy};
use axum::{
    extract::{Path, Query, State},
    http::HeaderMap,
    response::sse::{Event, KeepAlive, Sse},
};
use flotilla_proto::{Encoding, JobRecord, JobStatus, LogChunk, LogEnd, names};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use crate::{AppState, error::ApiError};

/// After the job is terminal, how long to wait for the node's end marker before ending the
/// stream from the KV record (the node may have died).
const END_MARKER_GRACE: Duration = Duration::from_secs(5);

#[derive(Deserialize)]
pub struct LogsQuery {
    from: Option<String>,
    follow: Option<String>,
}

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
                    let current = crate::jobs::load(&state, &job_id).await.unwrap_or(record);
                    let _ = events.send(end_event(&end_from_record(&current))).await;
                    return;
                }
            }
            () = became_terminal, if terminal_since.is_none() => {
                terminal_since = Some(tokio::time::Instant::now());
            }
            () = sleep_until(deadline) => {
                // Terminal in KV and no end marker came: end from the record.
                let current = crate::jobs::load(&state, &job_id).await.unwrap_or_else(|_| record.clone());
                let _ = events.send(end_event(&end_from_record(&current))).await;
                return;
            }
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
    let data = json!({
        "seq": chunk.seq,
        "attempt": chunk.attempt,
        "stream": chunk.stream,
        "data": String::from_utf8_lossy(&chunk.data),
    });
    Event::default()
        .event("log")
        .id(sequence.to_string())
        .data(data.to_string())
}

fn end_event(end: &LogEnd) -> Event {
    let data = json!({ "status": end.status, "exit_code": end.exit_code, "error": end.error });
    Event::default().event("end").data(data.to_string())
}
