//! `/schedules`: jobs run on a cron pattern or at an interval. The gateway only checks and
//! stores schedules (in KV); the dispatcher leader creates their jobs as they fall due.

use std::sync::Arc;

use axum::{
    Json,
    body::Body,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use chrono::Utc;
use flotilla_catalog::schedule::{Timing, validate_schedule};
use flotilla_nats::StoreError;
use flotilla_proto::{Schedule, ScheduleRequest, ids, schedule::MAX_SCHEDULE_ID_LEN};
use serde::{Deserialize, Serialize};
use utoipa::{
    ToSchema,
    openapi::{AllOfBuilder, ObjectBuilder, OneOfBuilder, OpenApi, RefOr, Schema, schema::Type},
};

use crate::{
    AppState,
    error::{ApiError, ErrorBody},
    extract::Path,
    jobs::{parse_json, read_body},
    responses::{Internal, Keyless, NotFoundSchedule, NotJson, Unauthorized, Unavailable},
};

/// `GET /schedules`'s body.
#[derive(Serialize, ToSchema)]
pub struct ScheduleList {
    /// Every schedule, by id.
    schedules: Vec<Schedule>,
}

/// `PATCH /schedules/{schedule_id}`'s body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SchedulePatch {
    /// `false` stops future runs; `true` resumes them from now. Required (null counts as
    /// absent): `missing_field` without it.
    #[schema(value_type = bool, required)]
    #[serde(default)]
    enabled: Option<bool>,
}

/// `DELETE /schedules/{schedule_id}`'s body.
#[derive(Serialize, ToSchema)]
pub struct ScheduleDeleted {
    schedule_id: String,
    deleted: bool,
}

/// Writes into the document the rule of `validate_schedule` that the derived `ScheduleRequest`
/// schema cannot state: exactly one of `cron` and `interval_seconds`, null counting as absent.
/// utoipa's object schema has no `oneOf`, so the component becomes `allOf` [the derived object,
/// `oneOf` [a string `cron`, an integer `interval_seconds`]]: a value sets both, or neither,
/// only when it matches both branches, or none.
pub(crate) fn document_timing_choice(api: &mut OpenApi) {
    let schemas = &mut api
        .components
        .as_mut()
        .expect("the document has components")
        .schemas;
    let Some(RefOr::T(Schema::Object(mut request))) = schemas.remove("ScheduleRequest") else {
        panic!("ScheduleRequest is not an object schema in the document");
    };
    let set = |field: &str, kind: Type| {
        ObjectBuilder::new()
            .required(field)
            .property(field, ObjectBuilder::new().schema_type(kind))
            .build()
    };
    let timing = OneOfBuilder::new()
        .item(set("cron", Type::String))
        .item(set("interval_seconds", Type::Integer));
    // On the outer schema, where readers and the reference page look for it.
    let description = request.description.take();
    let examples = std::mem::take(&mut request.examples);
    let schema = AllOfBuilder::new()
        .description(description)
        .examples(examples)
        .item(request)
        .item(timing);
    schemas.insert(
        "ScheduleRequest".to_owned(),
        Schema::from(schema.build()).into(),
    );
}

fn check_id(schedule_id: &str) -> Result<(), ApiError> {
    if ids::is_safe_id(schedule_id, MAX_SCHEDULE_ID_LEN) {
        Ok(())
    } else {
        Err(ApiError::not_found("schedule"))
    }
}

/// `POST /schedules`.
#[utoipa::path(
    post,
    path = "/schedules",
    tag = "schedules",
    operation_id = "create_schedule",
    summary = "Create a schedule",
    description = "Stores a schedule; the dispatcher leader creates its jobs as they fall due, \
        each with the id `sched-<schedule_id>-<unix seconds of the due time>` and \
        `metadata.schedule_id`, so `GET /jobs?metadata.schedule_id=<id>` lists its runs. The \
        job template is validated now exactly as `POST /jobs` validates a body; its errors \
        name `job.<field>`. Not in Parpaing's API.",
    request_body(content = ScheduleRequest, content_type = "application/json",
        description = "Parsed as JSON whatever the `Content-Type`."),
    responses(
        (status = 201, description = "Created.", body = Schedule),
        (status = 401, response = Unauthorized),
        (status = 403, response = Keyless),
        (status = 415, response = NotJson),
        (status = 409, description = "`conflict`: a schedule with this `schedule_id` exists.",
            body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over the cap.",
            body = ErrorBody),
        (status = 422, description = "The first broken rule, with `field`: `cron` (a bad \
            pattern, or not exactly one of `cron` and `interval_seconds`), `timezone`, \
            `interval_seconds`, `max_runs`, `schedule_id`, `name`, or `job.<field>` with the \
            codes of `POST /jobs`.", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn create(State(state): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let body = read_body(body, state.config.max_body_bytes).await?;
    let request: ScheduleRequest = parse_json(&body)?;
    let schedule = validate_schedule(
        &state.catalog.current(),
        &state.config.limits,
        request,
        Utc::now(),
    )
    .await?;
    match state.topology.schedules.create(&schedule).await {
        Ok(_) => Ok((StatusCode::CREATED, Json(schedule)).into_response()),
        Err(StoreError::AlreadyExists(_)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("schedule {} already exists", schedule.schedule_id),
        )
        .with_field("schedule_id")),
        Err(e) => Err(e.into()),
    }
}

/// `GET /schedules`.
#[utoipa::path(
    get,
    path = "/schedules",
    tag = "schedules",
    operation_id = "list_schedules",
    summary = "List schedules",
    responses(
        (status = 200, description = "Every schedule, by id.", body = ScheduleList),
        (status = 401, response = Unauthorized),
        (status = 403, response = Keyless),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn list(State(state): State<Arc<AppState>>) -> Result<Json<ScheduleList>, ApiError> {
    let schedules = state.topology.schedules.list().await?;
    Ok(Json(ScheduleList { schedules }))
}

/// `GET /schedules/{id}`.
#[utoipa::path(
    get,
    path = "/schedules/{schedule_id}",
    tag = "schedules",
    operation_id = "get_schedule",
    summary = "Read a schedule",
    params(("schedule_id" = String, Path, pattern = "^[A-Za-z0-9_-]{1,64}$",
        description = "The schedule's id; any other id answers 404.")),
    responses(
        (status = 200, description = "The schedule, with its runs so far and the next.",
            body = Schedule),
        (status = 401, response = Unauthorized),
        (status = 403, response = Keyless),
        (status = 404, response = NotFoundSchedule),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn get(
    State(state): State<Arc<AppState>>,
    Path(schedule_id): Path<String>,
) -> Result<Json<Schedule>, ApiError> {
    check_id(&schedule_id)?;
    match state.topology.schedules.get(&schedule_id).await? {
        Some(current) => Ok(Json(current.schedule)),
        None => Err(ApiError::not_found("schedule")),
    }
}

/// `PATCH /schedules/{id}`: enable or disable.
#[utoipa::path(
    patch,
    path = "/schedules/{schedule_id}",
    tag = "schedules",
    operation_id = "update_schedule",
    summary = "Enable or disable a schedule",
    description = "Disabling clears `next_run_at`; jobs already created run on. Enabling a \
        disabled schedule computes `next_run_at` afresh from now (missed runs are not made \
        up), unless `max_runs` was reached.",
    params(("schedule_id" = String, Path, pattern = "^[A-Za-z0-9_-]{1,64}$",
        description = "The schedule's id; any other id answers 404.")),
    request_body(content = SchedulePatch, content_type = "application/json"),
    responses(
        (status = 200, description = "The schedule as changed.", body = Schedule),
        (status = 401, response = Unauthorized),
        (status = 403, response = Keyless),
        (status = 415, response = NotJson),
        (status = 404, response = NotFoundSchedule),
        (status = 413, description = "`payload_too_large`: the body is over the cap.",
            body = ErrorBody),
        (status = 422, description = "`invalid_body` or `missing_field` (`enabled`).",
            body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn update(
    State(state): State<Arc<AppState>>,
    Path(schedule_id): Path<String>,
    body: Body,
) -> Result<Json<Schedule>, ApiError> {
    check_id(&schedule_id)?;
    let body = read_body(body, state.config.max_body_bytes).await?;
    let patch: SchedulePatch = parse_json(&body)?;
    let Some(enabled) = patch.enabled else {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "missing_field",
            "enabled is required",
        )
        .with_field("enabled"));
    };
    let store = &state.topology.schedules;
    loop {
        let Some(current) = store.get(&schedule_id).await? else {
            return Err(ApiError::not_found("schedule"));
        };
        let mut schedule = current.schedule;
        if schedule.enabled == enabled {
            return Ok(Json(schedule));
        }
        let now = Utc::now();
        schedule.enabled = enabled;
        schedule.next_run_at = match Timing::of(&schedule) {
            Ok(timing) if enabled && !schedule.finished() => timing.first(now),
            Ok(_) => None,
            Err(e) => return Err(ApiError::internal(e)),
        };
        schedule.updated_at = now;
        match store.update(&schedule, current.revision).await {
            Ok(_) => return Ok(Json(schedule)),
            // The dispatcher recorded a run meanwhile: apply the change to that version.
            Err(StoreError::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// `DELETE /schedules/{id}`.
#[utoipa::path(
    delete,
    path = "/schedules/{schedule_id}",
    tag = "schedules",
    operation_id = "delete_schedule",
    summary = "Delete a schedule",
    description = "No further runs are created. Jobs it already created are untouched (cancel \
        them with `DELETE /jobs/{job_id}`).",
    params(("schedule_id" = String, Path, pattern = "^[A-Za-z0-9_-]{1,64}$",
        description = "The schedule's id; any other id answers 404.")),
    responses(
        (status = 200, description = "Deleted.", body = ScheduleDeleted),
        (status = 401, response = Unauthorized),
        (status = 403, response = Keyless),
        (status = 404, response = NotFoundSchedule),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path(schedule_id): Path<String>,
) -> Result<Json<ScheduleDeleted>, ApiError> {
    check_id(&schedule_id)?;
    if !state.topology.schedules.remove(&schedule_id).await? {
        return Err(ApiError::not_found("schedule"));
    }
    Ok(Json(ScheduleDeleted {
        schedule_id,
        deleted: true,
    }))
}
