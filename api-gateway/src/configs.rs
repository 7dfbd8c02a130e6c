//! `/configs`: the shared configuration (engines, profiles, templates), as in Parpaing's config
//! store, but one copy for the whole system: a change here reaches every gateway, dispatcher
//! and node at once, and a change that does not load is refused.

use std::sync::Arc;

use axum::{
    Json,
    body::Body,
    extract::{Path, State},
    http::StatusCode,
};
use flotilla_config::ConfigError;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{AppState, error::ApiError};

/// The file a `(type, name)` pair stands for.
fn path_of(kind: &str, name: &str) -> Result<String, ApiError> {
    let safe = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && !name.starts_with('.');
    if !safe {
        return Err(ApiError::invalid(
            "name",
            "names are 1-128 of A-Z a-z 0-9 _ - . and do not start with a dot",
        ));
    }
    match kind {
        "engine" => Ok(format!("engines/{name}.toml")),
        "profile" => Ok(format!("profiles/{name}.toml")),
        "template" => Ok(format!("profiles/templates/{name}")),
        _ => Err(ApiError::invalid(
            "type",
            "type must be engine, profile or template",
        )),
    }
}

fn kind_of(path: &str) -> Option<(&'static str, &str)> {
    if let Some(rest) = path.strip_prefix("profiles/templates/") {
        return Some(("template", rest));
    }
    if let Some(rest) = path.strip_prefix("engines/") {
        return rest.strip_suffix(".toml").map(|name| ("engine", name));
    }
    path.strip_prefix("profiles/")
        .and_then(|rest| rest.strip_suffix(".toml"))
        .map(|name| ("profile", name))
}

fn config_error(error: ConfigError) -> ApiError {
    match error {
        ConfigError::Invalid(e) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_config",
            e.to_string(),
        ),
        other => ApiError::unavailable(other),
    }
}

/// `GET /configs`
pub async fn list(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let files = state.catalog.files().await.map_err(config_error)?;
    let configs: Vec<Value> = files
        .keys()
        .filter_map(|path| kind_of(path).map(|(kind, name)| json!({ "type": kind, "name": name })))
        .collect();
    Ok(Json(
        json!({ "configs": configs, "version": state.catalog.version() }),
    ))
}

/// `GET /configs/{type}/{name}`
pub async fn get(
    State(state): State<Arc<AppState>>,
    Path((kind, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let path = path_of(&kind, &name)?;
    let files = state.catalog.files().await.map_err(config_error)?;
    let content = files
        .get(&path)
        .ok_or_else(|| ApiError::not_found("config"))?;
    Ok(Json(
        json!({ "type": kind, "name": name, "content": content, "version": state.catalog.version() }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    content: String,
    /// Accepted for Parpaing compatibility; not stored.
    #[serde(default, rename = "description")]
    _description: Option<String>,
}

/// `PUT /configs/{type}/{name}`: creates or replaces the file, if the whole configuration still
/// loads with it.
pub async fn put(
    State(state): State<Arc<AppState>>,
    Path((kind, name)): Path<(String, String)>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let path = path_of(&kind, &name)?;
    let bytes = axum::body::to_bytes(body, state.config.max_body_bytes)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "request body too large",
            )
        })?;
    let body: PutBody = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            e.to_string(),
        )
    })?;
    if body.content.trim().is_empty() || body.content.len() > 100_000 {
        return Err(ApiError::invalid(
            "content",
            "content must be 1-100000 bytes",
        ));
    }
    let version = state
        .catalog
        .change(&path, Some(&body.content))
        .await
        .map_err(config_error)?;
    Ok(Json(
        json!({ "type": kind, "name": name, "version": version }),
    ))
}

/// `DELETE /configs/{type}/{name}`
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path((kind, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let path = path_of(&kind, &name)?;
    let files = state.catalog.files().await.map_err(config_error)?;
    if !files.contains_key(&path) {
        return Err(ApiError::not_found("config"));
    }
    let version = state
        .catalog
        .change(&path, None)
        .await
        .map_err(config_error)?;
    Ok(Json(
        json!({ "deleted": format!("{kind}/{name}"), "version": version }),
    ))
}
