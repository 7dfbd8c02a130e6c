//! `/jobs` routes.

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    Json,
    body::{Body, Bytes},
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Utc};
use flotilla_catalog::Origin;
use flotilla_proto::{JobRecord, JobRequest, JobStatus, SubmitRequest, ids, names};
use futures::future::join_all;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::{AppState, error::ApiError, index::Filter};

const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// `POST /jobs`: validate, record as pending, queue. Answers 202 only once the job is both in
/// KV and stored by JetStream; if queueing fails the record is removed again (503).
pub async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(body, state.config.max_body_bytes).await?;
    let submission = parse_submission(&body)?;
    let idempotency_key = idempotency_key(&headers)?;
    let request = flotilla_catalog::validate(
        &state.catalog.current(),
        &state.config.limits,
        submission,
        Origin::Http,
        Utc::now(),
    )
    .await?;

    if let Some(key) = &idempotency_key
        && let Some(existing) = claim_idempotency_key(&state, key, &body, &request.job_id).await?
    {
        let status = match state.topology.jobs.get(&existing).await? {
            Some(current) => current.record.status,
            None => JobStatus::Pending,
        };
        return Ok(accepted(&existing, status));
    }
    match submit(&state, &request).await {
        Ok(()) => Ok(accepted(&request.job_id, JobStatus::Pending)),
        Err(e) => {
            if let Some(key) = &idempotency_key {
                let _ = state
                    .topology
                    .idempotency
                    .purge(names::idempotency_key(key))
                    .await;
            }
            Err(e)
        }
    }
}

fn accepted(job_id: &str, status: JobStatus) -> Response {
    (
        StatusCode::ACCEPTED,
        Json(json!({ "job_id": job_id, "status": status })),
    )
        .into_response()
}

async fn submit(state: &AppState, request: &JobRequest) -> Result<(), ApiError> {
    let record = JobRecord::pending(request);
    let revision = state.topology.jobs.create(&record).await?;
    if let Err(e) = flotilla_nats::enqueue(&state.topology.js, request).await {
        // Not queued: take the record back so nothing is half-accepted.
        let _ = state.topology.jobs.remove(&request.job_id).await;
        state.index.forget(&request.job_id);
        let mut error = ApiError::unavailable(e);
        error.message = "the job queue is full or unavailable; retry later".to_owned();
        error.code = "queue_unavailable";
        return Err(error);
    }
    state
        .index
        .upsert(&flotilla_nats::Versioned { record, revision });
    Ok(())
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is larger than {limit} bytes"),
        )
    })
}

fn parse_submission(body: &[u8]) -> Result<SubmitRequest, ApiError> {
    let deserializer = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = match inner.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                format!("body is not valid JSON: {inner}")
            }
            _ => inner.to_string(),
        };
        let mut error = ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", message);
        if path != "." {
            error.field = Some(path);
        }
        error
    })
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_HEADER) else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key) if !key.is_empty() && key.len() <= 255 => Ok(Some(key.to_owned())),
        _ => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_header",
            "Idempotency-Key must be 1-255 visible ASCII characters",
        )
        .with_field("Idempotency-Key")),
    }
}

#[derive(Serialize, Deserialize)]
struct IdempotencyRecord {
    key: String,
    body_sha256: String,
    job_id: String,
}

/// Records `key → job_id` unless the key is already taken. Returns the existing job id when the
/// same key came with the same body; 409 when it came with a different one.
async fn claim_idempotency_key(
    state: &AppState,
    key: &str,
    body: &[u8],
    job_id: &str,
) -> Result<Option<String>, ApiError> {
    let body_sha256 = canonical_body_digest(body);
    let record = IdempotencyRecord {
        key: key.to_owned(),
        body_sha256,
        job_id: job_id.to_owned(),
    };
    let value = flotilla_proto::encode(&record).map_err(ApiError::internal)?;
    let kv_key = names::idempotency_key(key);
    match state.topology.idempotency.create(&kv_key, value).await {
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {}
        Err(e) => return Err(ApiError::unavailable(e)),
    }
    let existing = state
        .topology
        .idempotency
        .get(&kv_key)
        .await
        .map_err(ApiError::unavailable)?
        .ok_or_else(|| ApiError::unavailable("idempotency record vanished"))?;
    let existing: IdempotencyRecord =
        flotilla_proto::decode(&existing, flotilla_proto::Encoding::MessagePack)
            .map_err(ApiError::internal)?;
    if existing.body_sha256 == record.body_sha256 && existing.key == key {
        Ok(Some(existing.job_id))
    } else {
        Err(ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_conflict",
            "this Idempotency-Key was already used with a different request body",
        )
        .with_field("Idempotency-Key"))
    }
}

/// Digest of the body's JSON value, so key order and whitespace do not count as differences.
fn canonical_body_digest(body: &[u8]) -> String {
    let canonical = serde_json::from_slice::<serde_json::Value>(body)
        .map(|value| value.to_string().into_bytes())
        .unwrap_or_else(|_| body.to_vec());
    hex_digest(&canonical)
}

fn hex_digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A record as clients see it: internal routing detail removed.
fn public(mut record: JobRecord) -> JobRecord {
    record.ack_subject = None;
    record
}

/// `GET /jobs/{id}`.
pub async fn get(
    State(state): State<Arc<AppState>>,
    Path(job_id): Path<String>,
) -> Result<Json<JobRecord>, ApiError> {
    Ok(Json(load(&state, &job_id).await?))
}

pub(crate) async fn load(state: &AppState, job_id: &str) -> Result<JobRecord, ApiError> {
    if !ids::is_valid_job_id(job_id) {
        return Err(ApiError::not_found("job"));
    }
    match state.topology.jobs.get(job_id).await? {
        Some(current) => Ok(public(current.record)),
        None => Err(ApiError::not_found("job")),
    }
}

#[derive(Deserialize)]
pub struct WaitQuery {
    timeout: Option<String>,
}

/// `GET /jobs/{id}/wait`: returns as soon as the KV watch reports the job terminal.
pub async fn wait(
    State(state): State<Arc<AppState>>,
    Path(job_id): Path<String>,
    Query(query): Query<WaitQuery>,
) -> Result<Json<JobRecord>, ApiError> {
    let seconds = match query.timeout.as_deref() {
        None => 3600.0,
        Some(raw) => raw
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite())
            .ok_or_else(|| ApiError::invalid("timeout", "timeout must be a number of seconds"))?
            .clamp(1.0, 7200.0),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(seconds);
    // Unknown ids answer 404 before anything is registered for them.
    load(&state, &job_id).await?;
    loop {
        let notify = state.index.waiter(&job_id);
        let notified = notify.notified();
        let record = load(&state, &job_id).await?;
        if record.status.is_terminal() {
            return Ok(Json(record));
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            state.index.release_waiter(&job_id, notify);
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "wait_timeout",
                format!("job {job_id} did not finish within {seconds}s"),
            ));
        }
    }
}

/// `DELETE /jobs/{id}`: marks the job cancelled (compare-and-set) and tells whichever node
/// holds it to stop its container.
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(job_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !ids::is_valid_job_id(&job_id) {
        return Err(ApiError::not_found("job"));
    }
    let changed = state
        .topology
        .jobs
        .modify(&job_id, |record| {
            if record.status.is_terminal() {
                return Err(record.status);
            }
            record.status = JobStatus::Cancelled;
            record.error = Some("cancelled by request".to_owned());
            record.finished_at = Some(Utc::now());
            Ok(true)
        })
        .await?;
    match changed {
        None => Err(ApiError::not_found("job")),
        Some(Err(status)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("job already {status}"),
        )),
        Some(Ok(versioned)) => {
            state.index.upsert(&versioned);
            // Best effort: a node that misses this notices the cancelled record itself.
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(names::HEADER_JOB_ID, job_id.as_str());
            let cancel = names::cancel_subject(&job_id);
            if let Err(e) = state
                .client
                .publish_with_headers(cancel, headers, Bytes::new())
                .await
            {
                tracing::warn!(error = %e, job_id, "cannot publish cancel");
            }
            Ok(Json(
                json!({ "job_id": job_id, "status": JobStatus::Cancelled }),
            ))
        }
    }
}

/// `GET /jobs`: newest first, filtered and paginated from the in-memory index.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let limit = int_param(&params, "limit", 50, 1, 200)?;
    let offset = int_param(&params, "offset", 0, 0, usize::MAX)?;
    let filter = parse_filter(&params)?;
    let (page, total) = state.index.query(&filter, offset, limit);
    let records = join_all(page.iter().map(|id| state.topology.jobs.get(id))).await;
    let mut jobs = Vec::with_capacity(records.len());
    for record in records {
        match record {
            Ok(Some(current)) => jobs.push(public(current.record)),
            Ok(None) => {} // removed between the index read and now
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Json(
        json!({ "jobs": jobs, "total": total, "limit": limit, "offset": offset }),
    ))
}

fn int_param(
    params: &HashMap<String, String>,
    name: &str,
    default: usize,
    min: usize,
    max: usize,
) -> Result<usize, ApiError> {
    let Some(raw) = params.get(name) else {
        return Ok(default);
    };
    raw.parse::<usize>()
        .ok()
        .filter(|v| (min..=max).contains(v))
        .ok_or_else(|| {
            let range = if max == usize::MAX {
                format!(">= {min}")
            } else {
                format!("between {min} and {max}")
            };
            ApiError::invalid(name, format!("{name} must be an integer {range}"))
        })
}

fn parse_filter(params: &HashMap<String, String>) -> Result<Filter, ApiError> {
    let mut filter = Filter::default();
    for (name, value) in params {
        match name.as_str() {
            "status" => {
                filter.status = Some(JobStatus::parse(value).ok_or_else(|| {
                    ApiError::invalid(
                        "status",
                        "status must be one of: pending, running, completed, failed, cancelled",
                    )
                })?);
            }
            "agent_id" => filter.agent_id = Some(value.clone()),
            "engine" => filter.engine = Some(value.clone()),
            "profile" => filter.profile = Some(value.clone()),
            "created_after" => filter.created_after = Some(parse_time(name, value)?),
            "created_before" => filter.created_before = Some(parse_time(name, value)?),
            other => {
                if let Some(key) = other.strip_prefix("metadata.") {
                    filter.metadata.push((key.to_owned(), value.clone()));
                }
            }
        }
    }
    Ok(filter)
}

fn parse_time(name: &str, value: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| ApiError::invalid(name, format!("{name} must be an RFC 3339 time")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_digest_ignores_key_order_and_spacing() {
        let a = canonical_body_digest(br#"{"a":1,"b":[1,2]}"#);
        let b = canonical_body_digest(br#"{ "b": [1, 2], "a": 1 }"#);
        assert_eq!(a, b);
        assert_ne!(a, canonical_body_digest(br#"{"a":2,"b":[1,2]}"#));
    }

    #[test]
    fn submission_errors_name_the_field() {
        let error = parse_submission(br#"{"agent_id": "a", "max_turns": "many"}"#).unwrap_err();
        assert_eq!(error.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(error.field.as_deref(), Some("max_turns"));
        let error = parse_submission(br#"{"agent_id": "a", "color": 1}"#).unwrap_err();
        assert!(
            error.message.contains("unknown field `color`"),
            "{}",
            error.message
        );
        let error = parse_submission(b"{not json").unwrap_err();
        assert!(
            error.message.starts_with("body is not valid JSON"),
            "{}",
            error.message
        );
    }
}
