//! `/configs`: the shared configuration (engines, profiles, templates), as in Parpaing's config
//! store, but one copy for the whole system: a change here reaches every gateway, dispatcher
//! and node at once, and a change that does not load is refused.

use std::{collections::HashMap, sync::Arc};

use axum::{
    Json,
    body::Body,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use flotilla_config::ConfigError;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{
    AppState,
    error::{ApiError, ErrorBody},
    extract::{Path, Query},
    responses::{AdminOnly, Internal, Keyless, NotJson, Unauthorized, Unavailable},
};

/// What a configuration file is: `engine` (key `engines/<name>.toml`), `profile`
/// (`profiles/<name>.toml`) or `template` (`profiles/templates/<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ConfigType {
    Engine,
    Profile,
    Template,
}

// Response bodies. Fields are in alphabetical order (by JSON name) so that the keys come out in
// the order they had when these were built with `json!`.

/// `GET /configs`'s body.
#[derive(Serialize, ToSchema)]
pub struct ConfigList<'a> {
    /// Every engine, profile and template file, in key order.
    configs: Vec<ConfigRef<'a>>,
    /// The configuration version this gateway runs: the highest KV revision it has applied.
    version: u64,
}

#[derive(Serialize, ToSchema)]
pub struct ConfigRef<'a> {
    name: &'a str,
    #[serde(rename = "type")]
    kind: ConfigType,
}

/// `GET /configs/{type}/{name}`'s body.
#[derive(Serialize, ToSchema)]
pub struct ConfigFile<'a> {
    /// The file's text, as stored now.
    content: &'a str,
    name: &'a str,
    #[serde(rename = "type")]
    kind: ConfigType,
    /// This gateway's configuration version.
    version: u64,
}

/// `PUT /configs/{type}/{name}`'s body.
#[derive(Serialize, ToSchema)]
pub struct ConfigWritten<'a> {
    name: &'a str,
    #[serde(rename = "type")]
    kind: ConfigType,
    /// The KV revision of the write: a service runs the change once its version is at least
    /// this.
    version: u64,
}

/// `DELETE /configs/{type}/{name}`'s body.
#[derive(Serialize, ToSchema)]
pub struct ConfigDeleted {
    /// `<type>/<name>`.
    #[schema(example = "profile/greeter")]
    deleted: String,
    /// The KV revision of the deletion.
    version: u64,
}

/// The file a `(type, name)` pair stands for.
fn path_of(kind: &str, name: &str) -> Result<(ConfigType, String), ApiError> {
    let safe = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        // Files are stored under KV keys whose tokens the dots separate: none may be empty.
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..");
    if !safe {
        return Err(ApiError::invalid(
            "name",
            "names are 1-128 of A-Z a-z 0-9 _ - . and neither start nor end with a dot nor \
             hold two in a row",
        ));
    }
    let kind = parse_type(kind)?;
    let path = match kind {
        ConfigType::Engine => format!("engines/{name}.toml"),
        ConfigType::Profile => format!("profiles/{name}.toml"),
        ConfigType::Template => format!("profiles/templates/{name}"),
    };
    Ok((kind, path))
}

fn parse_type(kind: &str) -> Result<ConfigType, ApiError> {
    match kind {
        "engine" => Ok(ConfigType::Engine),
        "profile" => Ok(ConfigType::Profile),
        "template" => Ok(ConfigType::Template),
        _ => Err(ApiError::invalid(
            "type",
            "type must be engine, profile or template",
        )),
    }
}

fn kind_of(path: &str) -> Option<(ConfigType, &str)> {
    if let Some(rest) = path.strip_prefix("profiles/templates/") {
        return Some((ConfigType::Template, rest));
    }
    if let Some(rest) = path.strip_prefix("engines/") {
        return rest
            .strip_suffix(".toml")
            .map(|name| (ConfigType::Engine, name));
    }
    path.strip_prefix("profiles/")
        .and_then(|rest| rest.strip_suffix(".toml"))
        .map(|name| (ConfigType::Profile, name))
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
#[utoipa::path(
    get,
    path = "/configs",
    tag = "configs",
    operation_id = "list_configs",
    summary = "List configuration files",
    description = "Every engine, profile and template file of the shared configuration, in \
        key order; `type` keeps one kind. Other query parameters are ignored.",
    params(
        ("type" = Option<ConfigType>, Query, description = "Only files of this kind."),
    ),
    responses(
        (status = 200, description = "The files.", body = ConfigList<'_>),
        (status = 401, response = Unauthorized),
        (status = 403, response = Keyless),
        (status = 422, description = "`invalid_field`: `type` is not engine, profile or \
            template.", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn list(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let only = match params.get("type") {
        Some(kind) => Some(parse_type(kind)?),
        None => None,
    };
    let files = state.catalog.files().await.map_err(config_error)?;
    let configs = files
        .keys()
        .filter_map(|path| kind_of(path).map(|(kind, name)| ConfigRef { name, kind }))
        .filter(|file| only.is_none_or(|kind| file.kind == kind))
        .collect();
    let version = state.catalog.version();
    Ok(Json(ConfigList { configs, version }).into_response())
}

/// `GET /configs/{type}/{name}`
#[utoipa::path(
    get,
    path = "/configs/{type}/{name}",
    tag = "configs",
    operation_id = "get_config",
    summary = "Read a configuration file",
    params(ConfigPath),
    responses(
        (status = 200, description = "The file, read from the store now.", body = ConfigFile<'_>),
        (status = 401, response = Unauthorized),
        (status = 403, response = Keyless),
        (status = 404, description = "`not_found`: no such file.", body = ErrorBody),
        (status = 422, description = "`invalid_field` (`name` or `type`).", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn get(
    State(state): State<Arc<AppState>>,
    Path((kind, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (kind, path) = path_of(&kind, &name)?;
    let files = state.catalog.files().await.map_err(config_error)?;
    let content = files
        .get(&path)
        .ok_or_else(|| ApiError::not_found("config"))?;
    let version = state.catalog.version();
    Ok(Json(ConfigFile {
        content,
        name: &name,
        kind,
        version,
    })
    .into_response())
}

/// The `{type}/{name}` of the `/configs/...` routes.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // describes the `Path<(String, String)>` the handlers take
struct ConfigPath {
    /// The kind of file; anything else is 422 (`field` `type`).
    #[param(rename = "type", example = "template")]
    kind: ConfigType,
    /// 1-128 of `A-Z a-z 0-9 _ - .`, neither starting nor ending with a dot nor holding two in
    /// a row; otherwise 422 (`field` `name`), checked before `type`.
    #[param(
        max_length = 128,
        pattern = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$",
        example = "greeting.md.j2"
    )]
    name: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PutBody {
    /// The file's text: not blank (some character is not white space), and at most 100,000
    /// bytes of UTF-8. `maxLength` counts characters, so text with multi-byte characters is
    /// refused before it has 100,000 of them. An engine or profile file must also load with the
    /// rest of the configuration (`invalid_config`).
    // The pattern: optional white space (Rust's `char::is_whitespace`, spelled out because `\s`
    // differs between regex engines), then a character that is not.
    #[schema(
        min_length = 1,
        max_length = 100_000,
        pattern = r"^[\t-\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*[^\t-\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]",
        example = "Hello {{ name }}"
    )]
    content: String,
    /// Accepted for Parpaing compatibility; not stored.
    #[serde(default, rename = "description")]
    _description: Option<String>,
}

/// `PUT /configs/{type}/{name}`: creates or replaces the file, if the whole configuration still
/// loads with it.
#[utoipa::path(
    put,
    path = "/configs/{type}/{name}",
    tag = "configs",
    operation_id = "put_config",
    summary = "Create or replace a configuration file",
    description = "The gateway applies the change to the whole configuration and loads it as \
        every service would; if it does not load, nothing is written (422 `invalid_config`). \
        This gateway uses the change at once, the other services within moments.",
    params(ConfigPath),
    request_body(content = PutBody, content_type = "application/json"),
    responses(
        (status = 200, description = "Written.", body = ConfigWritten<'_>),
        (status = 401, response = Unauthorized),
        (status = 403, response = AdminOnly),
        (status = 415, response = NotJson),
        (status = 413, description = "`payload_too_large`: the body is over the cap.",
            body = ErrorBody),
        (status = 422, description = "`invalid_body`, `invalid_field` (`name`, `type` or \
            `content`), or `invalid_config`: the configuration would not load with the change \
            (the message says why).", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn put(
    State(state): State<Arc<AppState>>,
    Path((kind, name)): Path<(String, String)>,
    body: Body,
) -> Result<Response, ApiError> {
    let (kind, path) = path_of(&kind, &name)?;
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
    Ok(Json(ConfigWritten {
        name: &name,
        kind,
        version,
    })
    .into_response())
}

/// `DELETE /configs/{type}/{name}`
#[utoipa::path(
    delete,
    path = "/configs/{type}/{name}",
    tag = "configs",
    operation_id = "delete_config",
    summary = "Delete a configuration file",
    params(ConfigPath),
    responses(
        (status = 200, description = "Deleted.", body = ConfigDeleted),
        (status = 401, response = Unauthorized),
        (status = 403, response = AdminOnly),
        (status = 404, description = "`not_found`: no such file.", body = ErrorBody),
        (status = 422, description = "`invalid_field` (`name` or `type`), or \
            `invalid_config`: the rest would not load without the file (a profile still names \
            the engine, or reads the template).", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path((kind, name)): Path<(String, String)>,
) -> Result<Json<ConfigDeleted>, ApiError> {
    let (_, path) = path_of(&kind, &name)?;
    let files = state.catalog.files().await.map_err(config_error)?;
    if !files.contains_key(&path) {
        return Err(ApiError::not_found("config"));
    }
    let version = state
        .catalog
        .change(&path, None)
        .await
        .map_err(config_error)?;
    Ok(Json(ConfigDeleted {
        deleted: format!("{kind}/{name}"),
        version,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_would_make_an_empty_key_token_are_refused() {
        for name in ["bE.", "a..b", ".hidden", "", "a/b"] {
            assert!(path_of("template", name).is_err(), "{name}");
        }
        for name in ["summary.j2", "coder", "a.b.c"] {
            assert!(path_of("template", name).is_ok(), "{name}");
        }
    }
}
