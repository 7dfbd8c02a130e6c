//! `GET /jobs/events`: job changes as server-sent events, pushed as the KV watch sees them, so
//! a client (the dashboard) follows the list without polling. Parpaing's roadmap calls this
//! "WebSocket push"; SSE does the same over plain HTTP, with the API key in a header.
//!
//! Events: `job` with the record (as `GET /jobs/{id}`) whenever a matching job changes,
//! `removed` with `{job_id}` when a job is deleted (retention), and `lagged` with `{missed}`
//! when the client read too slowly and missed changes: it should list again.

use std::{collections::HashMap, convert::Infallible, sync::Arc};

use axum::{
    extract::State,
    response::sse::{Event, KeepAlive, Sse},
};
use futures::{Stream, StreamExt};
use serde::Serialize;
use tokio::sync::broadcast::error::RecvError;
use utoipa::{OpenApi, ToSchema};

use crate::{
    AppState,
    error::{ApiError, ErrorBody},
    extract::Query,
    index::Change,
    responses::{Keyless, Unauthorized, Unavailable},
};

/// The data of a `removed` event.
#[derive(Serialize, ToSchema)]
pub struct RemovedEvent {
    job_id: String,
}

/// The data of a `lagged` event: changes the client missed; list again to catch up.
#[derive(Serialize, ToSchema)]
pub struct LaggedEvent {
    missed: u64,
}

/// The event data schemas, which the operation names only in its description.
#[derive(OpenApi)]
#[openapi(components(schemas(RemovedEvent, LaggedEvent)))]
pub struct EventSchemas;

/// `GET /jobs/events`
#[utoipa::path(
    get,
    path = "/jobs/events",
    tag = "jobs",
    operation_id = "job_events",
    summary = "Follow job changes live",
    description = "Server-sent events from now on, never ending (a comment every 15 s keeps \
        the connection open). `job`: a matching job changed; its data is the record, as \
        `GET /jobs/{job_id}` returns it. `removed`: `{job_id}` of a deleted job (sent whatever \
        the filters). `lagged`: `{missed}` changes were dropped because the client read too \
        slowly; list again. Filters are those of `GET /jobs` (except paging), plus `job_id`.",
    params(
        ("job_id" = Option<String>, Query, description = "Only this job."),
        ("status" = Option<flotilla_proto::JobStatus>, Query, description = "Only jobs now in this status."),
        ("agent_id" = Option<String>, Query, description = "Only this agent's jobs."),
        ("engine" = Option<String>, Query, description = "Only jobs on this engine."),
        ("profile" = Option<String>, Query, description = "Only jobs with this profile."),
        ("created_after" = Option<chrono::DateTime<chrono::Utc>>, Query,
            description = "RFC 3339; exclusive bound."),
        ("created_before" = Option<chrono::DateTime<chrono::Utc>>, Query,
            description = "RFC 3339; exclusive bound."),
    ),
    responses(
        (status = 200, description = "The event stream.", content_type = "text/event-stream",
            body = String),
        (status = 401, response = Unauthorized),
        (status = 403, response = Keyless),
        (status = 422, description = "`invalid_field`: a bad filter (named in `field`).",
            body = ErrorBody),
        (status = 503, response = Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn stream(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let filter = crate::jobs::parse_filter(&params)?;
    let job_id = params.get("job_id").cloned();
    let changes = state.index.subscribe();
    // The filters travel in the stream's state: nothing is cloned per change.
    let state = (changes, filter, job_id);
    let events = futures::stream::unfold(state, |(mut changes, filter, job_id)| async move {
        loop {
            let event = match changes.recv().await {
                Ok(Change::Put(record)) => {
                    if job_id.as_ref().is_some_and(|id| *id != record.job_id)
                        || !filter.matches_record(&record)
                    {
                        continue;
                    }
                    let public = crate::jobs::public((*record).clone());
                    Event::default().event("job").data(to_json(&public))
                }
                Ok(Change::Removed(job_id)) => Event::default()
                    .event("removed")
                    .data(to_json(&RemovedEvent { job_id })),
                Err(RecvError::Lagged(missed)) => Event::default()
                    .event("lagged")
                    .data(to_json(&LaggedEvent { missed })),
                // The index is gone: the gateway is stopping.
                Err(RecvError::Closed) => return None,
            };
            return Some((Ok(event), (changes, filter, job_id)));
        }
    });
    Ok(Sse::new(events.boxed()).keep_alive(KeepAlive::default()))
}

fn to_json(data: &impl Serialize) -> String {
    serde_json::to_string(data).unwrap_or_else(|_| "null".to_owned())
}
