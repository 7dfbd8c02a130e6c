//! `/jobs` routes.

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    Json,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Utc};
use flotilla_catalog::Origin;
use flotilla_nats::{Applied, ApplyError, SubmitError, Submitted};
use flotilla_proto::{JobRecord, JobRequest, JobStatus, SubmitRequest, Transition, ids, names};
use futures::future::join_all;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use tracing::Instrument as _;
use utoipa::ToSchema;

use crate::{
    AppState,
    error::{ApiError, ErrorBody},
    extract::{Path, Query},
    index::Filter,
    responses::{Internal, Keyless, NotFoundJob, NotJson, Unauthorized, Unavailable},
};

const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// A job's id and status: the answer to `POST /jobs` and `DELETE /jobs/{job_id}`.
#[derive(Serialize, ToSchema)]
pub struct JobStatusReply {
    pub job_id: String,
    pub status: JobStatus,
}

/// `GET /jobs`'s body.
// Only describes the JSON that `list` builds with `json!`, which sorts the records' keys; a
// struct would change their order.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct JobList {
    /// The page, newest first.
    jobs: Vec<JobRecord>,
    limit: usize,
    offset: usize,
    /// How many jobs match the filters, over all pages.
    total: usize,
}

/// `POST /jobs`: validate, record as pending, queue. Answers 202 only once the job is both in
/// KV and stored by JetStream; if queueing fails the record is removed again (503).
#[utoipa::path(
    post,
    path = "/jobs",
    tag = "jobs",
    operation_id = "submit_job",
    summary = "Submit a job",
    description = "Validates the job, records it as `pending` and queues it. 202 is sent only \
        once the record is stored and the run queue holds the job: nothing accepted is lost, \
        nothing refused is kept. Over HTTP the job id is always assigned by the server \
        (`<agent_id>-<32 hex>`); a `job_id` field is refused.",
    params(
        ("Idempotency-Key" = Option<String>, Header, nullable = false, min_length = 1,
            max_length = 255, pattern = "^[\\x21-\\x7E]([\\x20-\\x7E]*[\\x21-\\x7E])?$",
            description = "1-255 visible ASCII characters (spaces inside). The same key with the same body (as \
                a JSON value) answers 202 with the same `job_id` and the job's current status \
                for 24 h; with a different body, 409 `idempotency_conflict`."),
    ),
    request_body(content = SubmitRequest, content_type = "application/json",
        description = "Parsed as JSON whatever the `Content-Type`."),
    responses(
        (status = 202, description = "Accepted: recorded and queued.", body = JobStatusReply),
        (status = 401, response = Unauthorized),
        (status = 403, response = Keyless),
        (status = 415, response = NotJson),
        (status = 409, description = "`idempotency_conflict`: the key came with another body.",
            body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over the cap.",
            body = ErrorBody),
        (status = 422, description = "The first broken rule: `invalid_body`, \
            `invalid_header`, `invalid_field`, `missing_field`, `unknown_profile`, \
            `unknown_engine`, `missing_prompt` or `template_error`, with `field` when one \
            field is to blame.", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, description = "`unavailable` (NATS or KV cannot be reached), or \
            `queue_unavailable` (the run queue refused the job; nothing was kept and an \
            `Idempotency-Key` was released).", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait: 1."))),
    ),
    security(("api_key" = [])),
)]
pub async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (body, idempotency_key, request) = async {
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
        Ok::<_, ApiError>((body, idempotency_key, request))
    }
    .instrument(tracing::info_span!("validate"))
    .await?;

    let claim = match &idempotency_key {
        Some(key) => Some(claim_idempotency_key(&state, key, &body, &request.job_id).await?),
        None => None,
    };
    if let Some(KeyClaim::Accepted(existing)) = claim {
        let status = match state.topology.jobs.get(&existing).await? {
            Some(current) => current.record.status,
            // Accepted long ago, and deleted by retention since.
            None => JobStatus::Pending,
        };
        return Ok(accepted(&existing, status));
    }
    match submit(&state, &request).await {
        Ok(()) => {
            if let (Some(key), Some(KeyClaim::Claimed { revision })) = (&idempotency_key, claim) {
                mark_accepted(&state, key, &body, &request.job_id, revision).await;
            }
            Ok(accepted(&request.job_id, JobStatus::Pending))
        }
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

pub(crate) fn accepted(job_id: &str, status: JobStatus) -> Response {
    let reply = JobStatusReply {
        job_id: job_id.to_owned(),
        status,
    };
    (StatusCode::ACCEPTED, Json(reply)).into_response()
}

pub(crate) async fn submit(state: &AppState, request: &JobRequest) -> Result<(), ApiError> {
    // The job message carries this request's trace context to the node that runs it.
    let trace = flotilla_telemetry::propagation::nats_headers(&tracing::Span::current());
    match flotilla_nats::submit(&state.topology, request, trace).await {
        Ok(Submitted::Queued(versioned)) => {
            state.index.upsert(&versioned);
            Ok(())
        }
        // Server-assigned ids are fresh: another job holding one is a bug.
        Ok(Submitted::Taken) => Err(ApiError::internal(format!(
            "fresh job id {} already taken",
            request.job_id
        ))),
        Err(SubmitError::Store(e)) => Err(e.into()),
        Err(SubmitError::Queue(e)) => {
            state.index.forget(&request.job_id);
            let mut error = ApiError::unavailable(e);
            error.message = "the job queue is full or unavailable; retry later".to_owned();
            error.code = "queue_unavailable";
            Err(error)
        }
    }
}

pub(crate) async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is larger than {limit} bytes"),
        )
    })
}

fn parse_submission(body: &[u8]) -> Result<SubmitRequest, ApiError> {
    parse_json(body)
}

/// Decodes a JSON body; a field that does not fit is named by its path (`job.max_turns`).
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
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
    /// Set once the job was recorded and queued (a 202 was sent).
    #[serde(default)]
    accepted: bool,
}

/// Longer than a submission takes (each of its NATS requests times out well before): a key
/// younger than this whose job is not recorded may be a submission still under way.
const IDEMPOTENCY_IN_FLIGHT: std::time::Duration = std::time::Duration::from_secs(30);

/// What an `Idempotency-Key` says about this submission.
enum KeyClaim {
    /// The key is this request's (at this KV revision): submit, then mark it accepted.
    Claimed { revision: u64 },
    /// An earlier request with the key and the same body made this job.
    Accepted(String),
}

impl IdempotencyRecord {
    fn new(key: &str, body: &[u8], job_id: &str, accepted: bool) -> Self {
        Self {
            key: key.to_owned(),
            body_sha256: canonical_body_digest(body),
            job_id: job_id.to_owned(),
            accepted,
        }
    }
}

/// Claims `key` for `job_id`, or says which job an earlier request with it made; 409 when it
/// came with a different body. An earlier request that is over without having recorded its
/// job (its submission failed, and so did the release of the key) gives the key up: this one
/// takes it over. One that may still be under way gets a 503 to retry.
async fn claim_idempotency_key(
    state: &AppState,
    key: &str,
    body: &[u8],
    job_id: &str,
) -> Result<KeyClaim, ApiError> {
    let record = IdempotencyRecord::new(key, body, job_id, false);
    let value = flotilla_proto::encode(&record).map_err(ApiError::internal)?;
    let kv_key = names::idempotency_key(key);
    match state
        .topology
        .idempotency
        .create(&kv_key, value.clone())
        .await
    {
        Ok(revision) => return Ok(KeyClaim::Claimed { revision }),
        Err(e) if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {}
        Err(e) => return Err(ApiError::unavailable(e)),
    }
    let entry = state
        .topology
        .idempotency
        .entry(&kv_key)
        .await
        .map_err(ApiError::unavailable)?
        .filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put)
        .ok_or_else(|| ApiError::unavailable("idempotency record vanished"))?;
    let age: std::time::Duration = (time::OffsetDateTime::now_utc() - entry.created)
        .try_into()
        .unwrap_or_default();
    let existing: IdempotencyRecord =
        flotilla_proto::decode(&entry.value, flotilla_proto::Encoding::MessagePack)
            .map_err(ApiError::internal)?;
    if existing.body_sha256 != record.body_sha256 || existing.key != key {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_conflict",
            "this Idempotency-Key was already used with a different request body",
        )
        .with_field("Idempotency-Key"));
    }
    if existing.accepted || state.topology.jobs.get(&existing.job_id).await?.is_some() {
        return Ok(KeyClaim::Accepted(existing.job_id));
    }
    if age < IDEMPOTENCY_IN_FLIGHT {
        return Err(ApiError::unavailable(
            "the first request with this Idempotency-Key is still being submitted",
        ));
    }
    match state
        .topology
        .idempotency
        .update(&kv_key, value, entry.revision)
        .await
    {
        Ok(revision) => Ok(KeyClaim::Claimed { revision }),
        Err(e) => Err(ApiError::unavailable(e)),
    }
}

/// Marks the key's job accepted, so that a replay after retention deleted the job still names
/// it. Best effort: until then a replay finds the job's record.
async fn mark_accepted(state: &AppState, key: &str, body: &[u8], job_id: &str, revision: u64) {
    let record = IdempotencyRecord::new(key, body, job_id, true);
    let Ok(value) = flotilla_proto::encode(&record) else {
        return;
    };
    let kv_key = names::idempotency_key(key);
    if let Err(e) = state
        .topology
        .idempotency
        .update(&kv_key, value, revision)
        .await
    {
        tracing::warn!(error = %e, "cannot mark the Idempotency-Key's job accepted");
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
pub(crate) fn public(mut record: JobRecord) -> JobRecord {
    record.ack_subject = None;
    record
}

/// `GET /jobs/{id}`.
#[utoipa::path(
    get,
    path = "/jobs/{job_id}",
    tag = "jobs",
    operation_id = "get_job",
    summary = "Read a job",
    params(("job_id" = String, Path, pattern = "^[A-Za-z0-9_-]{1,128}$",
            description = "The job's id; any other id answers 404.")),
    responses(
        (status = 200, description = "The job's record.", body = JobRecord),
        (status = 401, response = Unauthorized),
        (status = 403, response = Keyless),
        (status = 404, response = NotFoundJob),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("api_key" = [])),
)]
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
#[utoipa::path(
    get,
    path = "/jobs/{job_id}/wait",
    tag = "jobs",
    operation_id = "wait_job",
    summary = "Wait for a job to end",
    description = "Blocks until the job is `completed`, `failed` or `cancelled`, then answers \
        its record, within milliseconds of the change; at once if it already ended.",
    params(
        ("job_id" = String, Path, pattern = "^[A-Za-z0-9_-]{1,128}$",
            description = "The job's id; any other id answers 404."),
        ("timeout" = Option<f64>, Query, description = "Seconds to wait, fractions allowed; \
            3600 when absent, clamped to 1-7200."),
    ),
    responses(
        (status = 200, description = "The job ended: its record.", body = JobRecord),
        (status = 401, response = Unauthorized),
        (status = 403, response = Keyless),
        (status = 404, response = NotFoundJob),
        (status = 408, description = "`wait_timeout`: the job did not end in time.",
            body = ErrorBody),
        (status = 422, description = "`invalid_field` (`timeout`): not a number.",
            body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("api_key" = [])),
)]
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
        let woken = {
            let notified = notify.notified();
            // Registered before the read: `notify_waiters` wakes only registered waiters, so
            // a change landing between the read and the first poll would otherwise be missed.
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let record = load(&state, &job_id).await?;
            if record.status.is_terminal() {
                return Ok(Json(record));
            }
            // The index's watch wakes us; the record is read again now and then anyway, so
            // that a watch that lags (a cluster moving the bucket's leader) cannot hold a
            // finished job.
            let recheck = (tokio::time::Instant::now() + WAIT_RECHECK).min(deadline);
            tokio::time::timeout_at(recheck, notified).await.is_ok()
        };
        if !woken {
            state.index.release_waiter(&job_id, notify);
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "wait_timeout",
                    format!("job {job_id} did not finish within {seconds}s"),
                ));
            }
        }
    }
}

/// How often `/wait` reads the record again without being woken.
const WAIT_RECHECK: Duration = Duration::from_secs(2);

/// `DELETE /jobs/{id}`: marks the job cancelled (compare-and-set) and tells whichever node
/// holds it to stop its container.
#[utoipa::path(
    delete,
    path = "/jobs/{job_id}",
    tag = "jobs",
    operation_id = "cancel_job",
    summary = "Cancel a job",
    description = "Marks a pending or running job `cancelled` and answers at once. The node \
        holding it stops its container (SIGTERM, then SIGKILL after a grace period) and \
        attaches the output so far to the record a moment later.",
    params(("job_id" = String, Path, pattern = "^[A-Za-z0-9_-]{1,128}$",
            description = "The job's id; any other id answers 404.")),
    responses(
        (status = 200, description = "Cancelled.", body = JobStatusReply,
            example = json!({"job_id": "me-0198c0de4b7a7c3e9a7d2f4e5b6c7d8e", "status": "cancelled"})),
        (status = 401, response = Unauthorized),
        (status = 403, response = Keyless),
        (status = 404, response = NotFoundJob),
        (status = 409, description = "`conflict`: the job already ended.", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(job_id): Path<String>,
) -> Result<Json<JobStatusReply>, ApiError> {
    if !ids::is_valid_job_id(&job_id) {
        return Err(ApiError::not_found("job"));
    }
    match state
        .topology
        .jobs
        .apply(&job_id, &Transition::Cancel)
        .await
    {
        Err(ApplyError::NotFound(_)) => Err(ApiError::not_found("job")),
        Err(ApplyError::Refused(refusal)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            refusal.to_string(),
        )),
        Err(ApplyError::Store(e)) => Err(e.into()),
        Ok(Applied {
            after: versioned, ..
        }) => {
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
            Ok(Json(JobStatusReply {
                job_id,
                status: JobStatus::Cancelled,
            }))
        }
    }
}

/// `GET /jobs`: newest first, filtered and paginated from the in-memory index.
#[utoipa::path(
    get,
    path = "/jobs",
    tag = "jobs",
    operation_id = "list_jobs",
    summary = "List jobs",
    description = "Newest first (by `created_at`), filtered and paginated. Filters are exact \
        matches; `metadata.<key>=<value>` filters on a metadata entry and may be repeated for \
        several keys (e.g. `?metadata.team=infra`). Other parameters are ignored. A job \
        removed between the index read and the record read is left out, so a page may hold \
        fewer than `limit` jobs.",
    params(
        ("status" = Option<JobStatus>, Query, description = "Only jobs with this status."),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 200,
            description = "Page size: 1-200, 50 when absent."),
        ("offset" = Option<u64>, Query, maximum = 18_446_744_073_709_551_615_u64,
            description = "Jobs to skip: 0 when absent."),
        ("agent_id" = Option<String>, Query, description = "Only this agent's jobs."),
        ("engine" = Option<String>, Query, description = "Only jobs on this engine."),
        ("profile" = Option<String>, Query, description = "Only jobs with this profile."),
        ("created_after" = Option<chrono::DateTime<Utc>>, Query,
            description = "RFC 3339; exclusive bound."),
        ("created_before" = Option<chrono::DateTime<Utc>>, Query,
            description = "RFC 3339; exclusive bound."),
    ),
    responses(
        (status = 200, description = "A page of jobs.", body = JobList),
        (status = 401, response = Unauthorized),
        (status = 403, response = Keyless),
        (status = 422, description = "`invalid_field`: a bad `limit`, `offset`, `status`, \
            `created_after` or `created_before` (named in `field`).", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("api_key" = [])),
)]
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

pub(crate) fn parse_filter(params: &HashMap<String, String>) -> Result<Filter, ApiError> {
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
