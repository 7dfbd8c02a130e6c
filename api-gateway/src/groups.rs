//! Engines compared on one task: `POST /groups` submits one job per variant of a template,
//! `GET /groups/{id}` sets their outcomes side by side. A group is nothing but its jobs: their
//! ids are `<group_id>-v<i>` (the group id is a job id of the template's agent), so any
//! gateway finds them with no store of its own.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    Json,
    body::Body,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use chrono::Utc;
use flotilla_catalog::Origin;
use flotilla_proto::{Artifact, DiffStat, JobRecord, JobRequest, SubmitRequest, Transition, ids};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::{
    AppState,
    error::ApiError,
    jobs::{load, parse_json, read_body, submit},
};

/// Variants in one group.
const MAX_VARIANTS: usize = 10;
/// Characters of each result's text in the comparison.
const TEXT_HEAD_CHARS: usize = 500;
/// Metadata the gateway sets on each job of a group.
const GROUP_KEY: &str = "flotilla.group";
const VARIANT_KEY: &str = "flotilla.variant";

/// The body of `POST /groups`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupRequest {
    /// The job every variant starts from: a `POST /jobs` body.
    #[schema(value_type = Object)]
    pub job: Value,
    /// 1-10 variants, each overriding some of `engine`, `model`, `profile`, `vars` (the
    /// template's `prompt_vars`, merged) and `metadata` (merged), with an optional `name`.
    pub variants: Vec<Variant>,
}

/// What one variant changes.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    /// A label for the comparison; the engine (and model) when absent. At most 64 characters.
    pub name: Option<String>,
    pub engine: Option<String>,
    pub model: Option<String>,
    pub profile: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub vars: Option<Map<String, Value>>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// `202` of `POST /groups`.
#[derive(Debug, Serialize, ToSchema)]
pub struct GroupAccepted {
    pub group_id: String,
    pub job_ids: Vec<String>,
}

/// `GET /groups/{id}`: the variants side by side, in order.
#[derive(Debug, Serialize, ToSchema)]
pub struct GroupView {
    pub group_id: String,
    /// Whether every variant that checked out a repository got the same commit; null when
    /// none has yet.
    pub same_commit: Option<bool>,
    pub variants: Vec<VariantView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VariantView {
    pub name: String,
    pub job_id: String,
    pub engine: String,
    pub profile: String,
    #[schema(value_type = String)]
    pub status: flotilla_proto::JobStatus,
    /// From the start of the last attempt to the end.
    pub duration_ms: Option<i64>,
    pub cost_usd: Option<f64>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub turns: Option<u32>,
    pub diff_stat: Option<DiffStat>,
    pub base_commit: Option<String>,
    /// The first 500 characters of the result's text.
    pub text_head: Option<String>,
    pub error: Option<String>,
    pub artifacts: Vec<Artifact>,
}

#[utoipa::path(
    post,
    path = "/groups",
    tag = "jobs",
    operation_id = "create_group",
    summary = "Run one task with several engines, models or profiles",
    description = "Validates every variant (the template with the variant's changes) before \
        submitting any, then submits one job per variant; they run in parallel. A variant \
        that breaks a rule is named in the error's `field` (`variants[1].engine`).",
    request_body = GroupRequest,
    responses(
        (status = 202, description = "Every variant's job is recorded and queued.",
            body = GroupAccepted),
        (status = 401, response = crate::responses::Unauthorized),
        (status = 403, response = crate::responses::Keyless),
        (status = 413, description = "`payload_too_large`: the body is over the cap.",
            body = crate::error::ErrorBody),
        (status = 415, response = crate::responses::NotJson),
        (status = 422, description = "`invalid_body`, or the first broken rule of a variant, \
            as for `POST /jobs`.", body = crate::error::ErrorBody),
        (status = 500, response = crate::responses::Internal),
        (status = 503, response = crate::responses::Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn create(State(state): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let body = read_body(body, state.config.max_body_bytes).await?;
    let group: GroupRequest = parse_json(&body)?;
    if group.variants.is_empty() || group.variants.len() > MAX_VARIANTS {
        return Err(ApiError::invalid(
            "variants",
            format!("variants must have 1-{MAX_VARIANTS} items"),
        ));
    }
    let mut template: SubmitRequest = serde_json::from_value(group.job)
        .map_err(|e| ApiError::invalid("job", format!("job is not a job: {e}")))?;
    let agent_id = template.agent_id.clone().unwrap_or_default();
    if !ids::is_safe_id(&agent_id, 64) {
        return Err(ApiError::invalid(
            "job.agent_id",
            "job.agent_id is required: ^[A-Za-z0-9_-]{1,64}$",
        ));
    }
    let group_id = ids::new_job_id(&agent_id);
    template.job_id = None;
    let mut requests = Vec::with_capacity(group.variants.len());
    for (i, variant) in group.variants.into_iter().enumerate() {
        requests.push(variant_request(&state, &template, variant, &group_id, i).await?);
    }
    let mut job_ids = Vec::with_capacity(requests.len());
    for request in &requests {
        if let Err(e) = submit(&state, request).await {
            cancel_all(&state, &job_ids).await;
            return Err(e);
        }
        job_ids.push(request.job_id.clone());
    }
    let reply = GroupAccepted { group_id, job_ids };
    Ok((StatusCode::ACCEPTED, Json(reply)).into_response())
}

/// The template with the variant's changes, validated, under its group's job id.
async fn variant_request(
    state: &AppState,
    template: &SubmitRequest,
    variant: Variant,
    group_id: &str,
    i: usize,
) -> Result<JobRequest, ApiError> {
    let mut submission = template.clone();
    let name = variant
        .name
        .clone()
        .unwrap_or_else(|| default_name(template, &variant));
    if name.chars().count() > 64 {
        return Err(ApiError::invalid(
            format!("variants[{i}].name"),
            "a variant's name is at most 64 characters",
        ));
    }
    submission.engine = variant.engine.or(submission.engine);
    submission.model = variant.model.or(submission.model);
    submission.profile = variant.profile.or(submission.profile);
    if let Some(vars) = variant.vars {
        submission
            .prompt_vars
            .get_or_insert_with(Map::new)
            .extend(vars);
    }
    let metadata = submission.metadata.get_or_insert_with(BTreeMap::new);
    metadata.extend(variant.metadata.unwrap_or_default());
    metadata.insert(GROUP_KEY.to_owned(), group_id.to_owned());
    metadata.insert(VARIANT_KEY.to_owned(), name);
    let mut request = flotilla_catalog::validate(
        &state.catalog.current(),
        &state.config.limits,
        submission,
        Origin::Http,
        Utc::now(),
    )
    .await
    .map_err(|e| {
        let mut error = ApiError::from(e);
        error.field = Some(format!(
            "variants[{i}].{}",
            error.field.as_deref().unwrap_or("job")
        ));
        error
    })?;
    request.job_id = variant_job_id(group_id, i);
    Ok(request)
}

fn default_name(template: &SubmitRequest, variant: &Variant) -> String {
    let engine = variant
        .engine
        .as_deref()
        .or(template.engine.as_deref())
        .unwrap_or("default");
    match variant.model.as_deref() {
        Some(model) => format!("{engine} {model}"),
        None => engine.to_owned(),
    }
}

fn variant_job_id(group_id: &str, i: usize) -> String {
    format!("{group_id}-v{i}")
}

/// A group that could not be submitted whole leaves nothing running.
async fn cancel_all(state: &AppState, job_ids: &[String]) {
    for job_id in job_ids {
        if let Err(e) = state.topology.jobs.apply(job_id, &Transition::Cancel).await {
            tracing::warn!(job_id, error = %e, "cannot cancel a job of a group that failed");
        }
    }
}

#[utoipa::path(
    get,
    path = "/groups/{group_id}",
    tag = "jobs",
    operation_id = "get_group",
    summary = "A group's variants side by side",
    params(("group_id" = String, Path, pattern = "^[A-Za-z0-9_-]{1,128}$",
            description = "The group's id; any other id answers 404.")),
    responses(
        (status = 200, description = "Status, duration, cost, tokens, turns, diff figures, \
            the head of the result and the artifacts of each variant.", body = GroupView),
        (status = 401, response = crate::responses::Unauthorized),
        (status = 403, response = crate::responses::Keyless),
        (status = 404, description = "`not_found`: no such group.",
            body = crate::error::ErrorBody),
        (status = 500, response = crate::responses::Internal),
        (status = 503, response = crate::responses::Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn get(
    State(state): State<Arc<AppState>>,
    Path(group_id): Path<String>,
) -> Result<Json<GroupView>, ApiError> {
    let mut variants = Vec::new();
    for i in 0..MAX_VARIANTS {
        let job_id = variant_job_id(&group_id, i);
        if !ids::is_valid_job_id(&job_id) {
            break;
        }
        let record = match load(&state, &job_id).await {
            Ok(record) => record,
            Err(e) if e.status == StatusCode::NOT_FOUND => break,
            Err(e) => return Err(e),
        };
        if record.metadata.get(GROUP_KEY) != Some(&group_id) {
            break;
        }
        variants.push(view(record));
    }
    if variants.is_empty() {
        return Err(ApiError::not_found("group"));
    }
    let commits: Vec<&String> = variants
        .iter()
        .filter_map(|v| v.base_commit.as_ref())
        .collect();
    let same_commit = (!commits.is_empty()).then(|| commits.windows(2).all(|w| w[0] == w[1]));
    Ok(Json(GroupView {
        group_id,
        same_commit,
        variants,
    }))
}

fn view(record: JobRecord) -> VariantView {
    let duration_ms = match (record.started_at, record.finished_at) {
        (Some(start), Some(end)) => Some((end - start).num_milliseconds()),
        _ => None,
    };
    let usage = record.usage.as_ref();
    let result = record.result.as_ref();
    VariantView {
        name: record
            .metadata
            .get(VARIANT_KEY)
            .cloned()
            .unwrap_or_else(|| record.engine.clone()),
        engine: record.engine.clone(),
        profile: record.profile.clone(),
        status: record.status,
        duration_ms,
        cost_usd: usage
            .map(|u| u.cost_usd)
            .or(result.and_then(|r| r.cost_usd)),
        input_tokens: usage.map(|u| u.input_tokens),
        output_tokens: usage.map(|u| u.output_tokens),
        turns: result.and_then(|r| r.num_turns),
        diff_stat: result.and_then(|r| r.diff_stat),
        base_commit: result.and_then(|r| r.base_commit.clone()),
        text_head: result.map(|r| r.text.chars().take(TEXT_HEAD_CHARS).collect()),
        error: record.error.clone(),
        artifacts: result.map(|r| r.artifacts.clone()).unwrap_or_default(),
        job_id: record.job_id,
    }
}
