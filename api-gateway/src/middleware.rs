//! Cross-cutting HTTP behaviour: request ids, security headers, API-key auth.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{HeaderName, HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{AppState, error::ApiError};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Paths anyone may call, even when an API key is configured. The OpenAPI document marks every
/// other operation with the `api_key` security scheme (a test checks the two agree).
pub(crate) fn is_public(path: &str) -> bool {
    matches!(
        path,
        "/" | "/health" | "/metrics" | "/docs" | "/openapi.json" | "/ui"
    ) || path.starts_with("/ui/")
        || path.starts_with("/docs/")
}

/// Echoes (or assigns) `X-Request-Id`, and sets the security headers on every response,
/// errors included.
pub async fn headers(request: Request, next: Next) -> Response {
    let request_id = request
        .headers()
        .get(&REQUEST_ID)
        .filter(|value| {
            let bytes = value.as_bytes();
            !bytes.is_empty() && bytes.len() <= 200 && bytes.iter().all(|b| b.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()).expect("uuid is ascii")
        });
    // The request's span (see `metrics::observe`) carries the id into every log line.
    if let Ok(id) = request_id.to_str() {
        tracing::Span::current().record("request_id", id);
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(REQUEST_ID, request_id);
    response
}

/// Checks `Authorization: Bearer <key>` when a key is configured. Digests are compared in
/// constant time, so neither content nor length leaks through timing.
pub async fn auth(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let Some(expected) = &state.api_key_digest else {
        return next.run(request).await;
    };
    if is_public(request.uri().path()) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(|key| Sha256::digest(key.trim().as_bytes()));
    match presented {
        Some(digest) if bool::from(digest.as_slice().ct_eq(expected.as_slice())) => {
            next.run(request).await
        }
        _ => {
            let mut response = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or invalid API key",
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}
