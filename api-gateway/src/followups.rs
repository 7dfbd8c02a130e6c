//! `POST /jobs/{id}/continue`: a follow-up job that starts from a finished job's saved
//! workspace, resumes its agent session where the engine can, and records the chain.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    body::Body,
    extract::{Path, State},
    http::StatusCode,
    response::Response,
};
use chrono::Utc;
use flotilla_catalog::Origin;
use flotilla_proto::{
    Continuation, GitRequest, JobRecord, PushRequest, SubmitRequest, WorkspaceRequest,
};
use serde::Deserialize;
use utoipa::ToSchema;

use crate::{
    AppState,
    error::ApiError,
    jobs::{accepted, load, parse_json, read_body, submit},
};

/// The body of `POST /jobs/{id}/continue`: a new prompt, and what to change. Everything else
/// comes from the finished job (its agent, engine, profile, metadata, repository).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContinueRequest {
    /// Required, as `POST /jobs`' `prompt`.
    #[schema(value_type = String, required, max_length = 1_000_000)]
    pub prompt: Option<String>,
    /// Another engine than the finished job's (the session is resumed only by the same one).
    pub engine: Option<String>,
    pub profile: Option<String>,
    pub model: Option<String>,
    pub max_turns: Option<i64>,
    pub max_budget_usd: Option<f64>,
    pub timeout_seconds: Option<i64>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<BTreeMap<String, String>>,
    pub outputs: Option<Vec<String>>,
    /// As in `POST /jobs`; its branch defaults to `flotilla/<new job id>`.
    pub push: Option<PushRequest>,
}

#[utoipa::path(
    post,
    path = "/jobs/{job_id}/continue",
    tag = "jobs",
    operation_id = "continue_job",
    summary = "Continue a finished job with a new prompt",
    description = "Submits a follow-up job that starts from the finished job's final \
        workspace (saved for jobs with `workspace.git`, and for follow-ups themselves), with \
        its repository's base commit: its diff is the whole change of the \
        chain. Engines that can resume (Claude Code) continue the same agent session. The new \
        record has `parent` and `chain`.",
    params(("job_id" = String, Path, pattern = "^[A-Za-z0-9_-]{1,128}$",
            description = "The finished job's id; any other id answers 404.")),
    request_body = ContinueRequest,
    responses(
        (status = 202, description = "The follow-up was accepted: recorded and queued.",
            body = crate::jobs::JobStatusReply),
        (status = 401, response = crate::responses::Unauthorized),
        (status = 403, response = crate::responses::Keyless),
        (status = 404, response = crate::responses::NotFoundJob),
        (status = 409, description = "`conflict`: the job has not ended, or its workspace \
            was not saved.", body = crate::error::ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over the cap.",
            body = crate::error::ErrorBody),
        (status = 415, response = crate::responses::NotJson),
        (status = 422, description = "The first broken rule, as for `POST /jobs`;             `missing_field` (`prompt`) without a prompt.", body = crate::error::ErrorBody),
        (status = 500, response = crate::responses::Internal),
        (status = 503, response = crate::responses::Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn continue_job(
    State(state): State<Arc<AppState>>,
    Path(job_id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(body, state.config.max_body_bytes).await?;
    let follow_up: ContinueRequest = parse_json(&body)?;
    if follow_up
        .prompt
        .as_deref()
        .is_none_or(|p| p.trim().is_empty())
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "missing_field",
            "prompt is required: what the follow-up should do",
        )
        .with_field("prompt"));
    }
    let parent = load(&state, &job_id).await?;
    let continues = continuation(&parent)?;
    let submission = submission(&parent, follow_up);
    let mut request = flotilla_catalog::validate(
        &state.catalog.current(),
        &state.config.limits,
        submission,
        Origin::Http,
        Utc::now(),
    )
    .await?;
    if let Some(git) = &mut request.git {
        git.commit = parent.result.as_ref().and_then(|r| r.base_commit.clone());
    }
    // The session belongs to the engine that reported it.
    let same_engine = request.engine == parent.engine;
    request.continues = Some(Continuation {
        session_id: continues.session_id.filter(|_| same_engine),
        ..continues
    });
    submit(&state, &request).await?;
    Ok(accepted(
        &request.job_id,
        flotilla_proto::JobStatus::Pending,
    ))
}

/// What the follow-up continues, if the job can be continued.
fn continuation(parent: &JobRecord) -> Result<Continuation, ApiError> {
    let conflict = |message: String| ApiError::new(StatusCode::CONFLICT, "conflict", message);
    if !parent.status.is_terminal() {
        return Err(conflict(format!(
            "job {} has not ended ({}): continue it once it has",
            parent.job_id, parent.status
        )));
    }
    let result = parent.result.as_ref().filter(|r| r.workspace_saved);
    let Some(result) = result else {
        return Err(conflict(format!(
            "job {} has no saved workspace: only jobs with workspace.git (or follow-ups) that \
             ran to their end can be continued",
            parent.job_id
        )));
    };
    let mut chain = parent.chain.clone();
    chain.push(parent.job_id.clone());
    Ok(Continuation {
        job_id: parent.job_id.clone(),
        attempt: parent.attempt,
        session_id: result.session_id.clone(),
        chain,
    })
}

/// The follow-up as a submission: the finished job's settings, with the request's changes.
fn submission(parent: &JobRecord, follow_up: ContinueRequest) -> SubmitRequest {
    let workspace = parent.git.as_ref().map(|git| WorkspaceRequest {
        git: Some(GitRequest {
            url: Some(git.url.clone()),
            git_ref: git.git_ref.clone(),
            depth: git.depth.map(i64::from),
            credential: git.credential.clone(),
        }),
    });
    SubmitRequest {
        agent_id: Some(parent.agent_id.clone()),
        engine: follow_up.engine.or_else(|| Some(parent.engine.clone())),
        profile: follow_up.profile.or_else(|| Some(parent.profile.clone())),
        prompt: follow_up.prompt,
        model: follow_up.model,
        max_turns: follow_up.max_turns,
        max_budget_usd: follow_up.max_budget_usd,
        timeout_seconds: follow_up
            .timeout_seconds
            .or(i64::try_from(parent.timeout_seconds)
                .ok()
                .filter(|&t| t > 0)),
        // Not the keys the gateway sets (a group's): the follow-up is no variant of it.
        metadata: follow_up.metadata.or_else(|| {
            let mut metadata = parent.metadata.clone();
            metadata.retain(|key, _| !key.starts_with("flotilla."));
            Some(metadata)
        }),
        outputs: follow_up.outputs,
        push: follow_up.push,
        workspace,
        ..SubmitRequest::default()
    }
}
