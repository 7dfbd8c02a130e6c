//! What a job left behind: its patch (`GET /jobs/{id}/diff`) and its collected outputs, one by
//! one or as a zip. The node stored them in the `flotilla_artifacts` object store under the
//! job's last attempt; the record lists them.

use std::{io::Write as _, sync::Arc};

use axum::{
    body::Body,
    extract::{Path, State},
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};
use flotilla_proto::{JobRecord, names};
use serde::Serialize;
use tokio::io::AsyncReadExt as _;
use tokio_util::io::ReaderStream;
use utoipa::ToSchema;

use crate::{AppState, error::ApiError, jobs::load};

/// The body of `GET /jobs/{id}/artifacts`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ArtifactList {
    pub artifacts: Vec<flotilla_proto::Artifact>,
}

/// `GET /jobs/{id}/diff`.
#[utoipa::path(
    get,
    path = "/jobs/{job_id}/diff",
    tag = "jobs",
    operation_id = "job_diff",
    summary = "The change a job made to its repository",
    description = "The whole patch (`git diff --binary`, renames found) of the job's \
        workspace against `result.base_commit`, for a job with `workspace.git` that ran to its \
        end. `result.diff_stat` has its figures. 404 when the job has no patch.",
    params(("job_id" = String, Path, pattern = "^[A-Za-z0-9_-]{1,128}$",
            description = "The job's id; any other id answers 404.")),
    responses(
        (status = 200, description = "The patch; empty when nothing changed.",
            content_type = "text/x-diff", body = String),
        (status = 401, response = crate::responses::Unauthorized),
        (status = 403, response = crate::responses::Keyless),
        (status = 404, response = crate::responses::NotFoundJob),
        (status = 500, response = crate::responses::Internal),
        (status = 503, response = crate::responses::Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn diff(
    State(state): State<Arc<AppState>>,
    Path(job_id): Path<String>,
) -> Result<Response, ApiError> {
    let record = load(&state, &job_id).await?;
    if record.result.as_ref().and_then(|r| r.diff_stat).is_none() {
        return Err(ApiError::not_found("diff"));
    }
    let name = names::diff_object(&job_id, record.attempt);
    download(&state, &name, "text/x-diff; charset=utf-8", None).await
}

/// `GET /jobs/{id}/artifacts`.
#[utoipa::path(
    get,
    path = "/jobs/{job_id}/artifacts",
    tag = "jobs",
    operation_id = "list_artifacts",
    summary = "The files a job's `outputs` collected",
    params(("job_id" = String, Path, pattern = "^[A-Za-z0-9_-]{1,128}$",
            description = "The job's id; any other id answers 404.")),
    responses(
        (status = 200, description = "Path, size and SHA-256 of each collected file; empty \
            until the job ended, or when it had no `outputs`.", body = ArtifactList),
        (status = 401, response = crate::responses::Unauthorized),
        (status = 403, response = crate::responses::Keyless),
        (status = 404, response = crate::responses::NotFoundJob),
        (status = 500, response = crate::responses::Internal),
        (status = 503, response = crate::responses::Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn list(
    State(state): State<Arc<AppState>>,
    Path(job_id): Path<String>,
) -> Result<axum::Json<ArtifactList>, ApiError> {
    let record = load(&state, &job_id).await?;
    Ok(axum::Json(ArtifactList {
        artifacts: artifacts_of(&record).to_vec(),
    }))
}

/// `GET /jobs/{id}/artifacts/{path}`; routed as a wildcard so that `path` may hold slashes
/// (see [`document_wildcard`]).
#[utoipa::path(
    get,
    path = "/jobs/{job_id}/artifacts/{*path}",
    tag = "jobs",
    operation_id = "get_artifact",
    summary = "Download one collected file",
    params(
        ("job_id" = String, Path, pattern = "^[A-Za-z0-9_-]{1,128}$",
            description = "The job's id; any other id answers 404."),
        ("path" = String, Path, description = "The file's path as listed, slashes and all \
            (`dist/app.js`)."),
    ),
    responses(
        (status = 200, description = "The file's bytes.",
            content_type = "application/octet-stream", body = Vec<u8>),
        (status = 401, response = crate::responses::Unauthorized),
        (status = 403, response = crate::responses::Keyless),
        (status = 404, description = "`not_found`: no such job, or no such file among its \
            artifacts.", body = crate::error::ErrorBody),
        (status = 500, response = crate::responses::Internal),
        (status = 503, response = crate::responses::Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn get(
    State(state): State<Arc<AppState>>,
    Path((job_id, path)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let record = load(&state, &job_id).await?;
    let Some(artifact) = artifacts_of(&record).iter().find(|a| a.path == path) else {
        return Err(ApiError::not_found("artifact"));
    };
    let name = names::artifact_object(&job_id, record.attempt, &artifact.path);
    let file_name = artifact.path.rsplit('/').next().unwrap_or("artifact");
    download(&state, &name, "application/octet-stream", Some(file_name)).await
}

/// `GET /jobs/{id}/artifacts.zip`.
#[utoipa::path(
    get,
    path = "/jobs/{job_id}/artifacts.zip",
    tag = "jobs",
    operation_id = "zip_artifacts",
    summary = "Download every collected file as one zip",
    params(("job_id" = String, Path, pattern = "^[A-Za-z0-9_-]{1,128}$",
            description = "The job's id; any other id answers 404.")),
    responses(
        (status = 200, description = "A zip of the artifacts, by their paths (empty when \
            there are none).", content_type = "application/zip", body = Vec<u8>),
        (status = 401, response = crate::responses::Unauthorized),
        (status = 403, response = crate::responses::Keyless),
        (status = 404, response = crate::responses::NotFoundJob),
        (status = 500, response = crate::responses::Internal),
        (status = 503, response = crate::responses::Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn zip(
    State(state): State<Arc<AppState>>,
    Path(job_id): Path<String>,
) -> Result<Response, ApiError> {
    let record = load(&state, &job_id).await?;
    // Built in a temporary file one artifact at a time: memory stays flat whatever the size.
    let mut writer = zip::ZipWriter::new(tempfile::tempfile().map_err(ApiError::internal)?);
    let options = zip::write::SimpleFileOptions::default().large_file(true);
    for artifact in artifacts_of(&record) {
        let name = names::artifact_object(&job_id, record.attempt, &artifact.path);
        let mut object = state
            .topology
            .artifacts
            .get(&name)
            .await
            .map_err(ApiError::unavailable)?;
        writer
            .start_file(artifact.path.as_str(), options)
            .map_err(ApiError::internal)?;
        let mut buf = vec![0; 256 * 1024];
        loop {
            let n = object.read(&mut buf).await.map_err(ApiError::unavailable)?;
            if n == 0 {
                break;
            }
            writer.write_all(&buf[..n]).map_err(ApiError::internal)?;
        }
    }
    let mut file = writer.finish().map_err(ApiError::internal)?;
    std::io::Seek::rewind(&mut file).map_err(ApiError::internal)?;
    let body = Body::from_stream(ReaderStream::new(tokio::fs::File::from_std(file)));
    let disposition = format!("attachment; filename=\"{job_id}-artifacts.zip\"");
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/zip"),
            ),
            (
                header::CONTENT_DISPOSITION,
                HeaderValue::from_str(&disposition).map_err(ApiError::internal)?,
            ),
        ],
        body,
    )
        .into_response())
}

fn artifacts_of(record: &JobRecord) -> &[flotilla_proto::Artifact] {
    record
        .result
        .as_ref()
        .map_or(&[], |result| result.artifacts.as_slice())
}

/// Streams object `name`; `file_name` makes it an attachment.
async fn download(
    state: &AppState,
    name: &str,
    content_type: &'static str,
    file_name: Option<&str>,
) -> Result<Response, ApiError> {
    let object = match state.topology.artifacts.get(name).await {
        Ok(object) => object,
        Err(e) if e.kind() == async_nats::jetstream::object_store::GetErrorKind::NotFound => {
            return Err(ApiError::not_found("artifact"));
        }
        Err(e) => return Err(ApiError::unavailable(e)),
    };
    let size = object.info().size;
    let body = Body::from_stream(ReaderStream::new(object));
    let mut response = (
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    if let Some(file_name) = file_name {
        let safe: String = file_name
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() && c != '"' && c != '\\' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{safe}\"")) {
            headers.insert(header::CONTENT_DISPOSITION, value);
        }
    }
    Ok(response)
}

/// The document names the wildcard `{*path}` as OpenAPI does, `{path}` (a value with
/// slashes).
pub(crate) fn document_wildcard(api: &mut utoipa::openapi::OpenApi) {
    let paths = &mut api.paths.paths;
    if let Some(item) = paths.remove("/jobs/{job_id}/artifacts/{*path}") {
        paths.insert("/jobs/{job_id}/artifacts/{path}".to_owned(), item);
    }
}
