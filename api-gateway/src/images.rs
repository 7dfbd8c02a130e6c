//! `POST /images/prefetch`: every node, or every node with some labels, pulls an image now,
//! so the first job in it does not wait for the pull.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    Json,
    body::Body,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use flotilla_proto::{names, routing::Prefetch};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{
    AppState,
    error::ApiError,
    jobs::{parse_json, read_body},
    ops::live_nodes,
};

/// The body of `POST /images/prefetch`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PrefetchRequest {
    /// An image `FLOTILLA_ALLOWED_IMAGES` allows, at most 256 characters.
    #[schema(max_length = 256)]
    image: String,
    /// Only nodes with all of these labels (a pool); every node when absent.
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// `POST /images/prefetch`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct PrefetchAccepted {
    image: String,
    /// The live nodes asked to pull it. Each pulls on its own; `GET /nodes` lists the image
    /// under the node's `images` once it is there.
    nodes: Vec<String>,
}

#[utoipa::path(
    post,
    path = "/images/prefetch",
    tag = "operations",
    operation_id = "prefetch_image",
    summary = "Have nodes pull an image ahead of the jobs that need it",
    description = "Asks every live node, or those with all of `labels`, to pull `image` from \
        its registry, and answers at once; each node pulls on its own and lists the image in \
        its `images` (`GET /nodes`) when done. Nodes check the image against \
        `FLOTILLA_ALLOWED_IMAGES` too.",
    request_body = PrefetchRequest,
    responses(
        (status = 202, description = "The nodes were asked.", body = PrefetchAccepted),
        (status = 401, response = crate::responses::Unauthorized),
        (status = 403, response = crate::responses::AdminOnly),
        (status = 413, description = "`payload_too_large`: the body is over the cap.",
            body = crate::error::ErrorBody),
        (status = 415, response = crate::responses::NotJson),
        (status = 422, description = "`invalid_body`, or `invalid_field` on `image` (not an \
            image reference, or not allowed) or `labels`.", body = crate::error::ErrorBody),
        (status = 500, response = crate::responses::Internal),
        (status = 503, response = crate::responses::Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn prefetch(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(body, state.config.max_body_bytes).await?;
    let request: PrefetchRequest = parse_json(&body)?;
    flotilla_catalog::check_prefetch_image(&request.image, &state.config.limits)?;
    let valid = flotilla_proto::routing::is_valid_label;
    if let Some((key, _)) = request.labels.iter().find(|(k, v)| !valid(k) || !valid(v)) {
        let message =
            format!("labels: {key:?} or its value does not match ^[A-Za-z0-9_.-]{{1,64}}$");
        return Err(ApiError::invalid("labels", message));
    }
    let prefetch = Prefetch {
        image: request.image,
        labels: request.labels,
    };
    let nodes = live_nodes(&state).await?;
    let asked: Vec<String> = nodes
        .into_iter()
        .filter(|n| prefetch.is_for(&n.labels))
        .map(|n| n.node_id)
        .collect();
    let payload = flotilla_proto::encode(&prefetch).map_err(ApiError::internal)?;
    state
        .client
        .publish(names::SUBJECT_PREFETCH, payload)
        .await
        .map_err(ApiError::unavailable)?;
    tracing::info!(image = %prefetch.image, nodes = asked.len(), "prefetch asked");
    let reply = PrefetchAccepted {
        image: prefetch.image,
        nodes: asked,
    };
    Ok((StatusCode::ACCEPTED, Json(reply)).into_response())
}
