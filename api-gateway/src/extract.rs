//! axum's `Query` and `Path`, answering their refusals in the JSON error envelope with a
//! documented status instead of axum's plain-text 400s.

use axum::{
    extract::{FromRequestParts, rejection::QueryRejection},
    http::{StatusCode, request::Parts},
};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A query string that does not decode (a duplicate parameter, say): 422 `invalid_field`.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(invalid_query(&rejection)),
        }
    }
}

fn invalid_query(rejection: &QueryRejection) -> ApiError {
    let detail = rejection.body_text();
    let detail = detail
        .strip_prefix("Failed to deserialize query string: ")
        .unwrap_or(&detail);
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
        format!("invalid query string: {detail}"),
    )
}

/// Path parameters that do not decode (bad percent-encoding): no such resource, 404.
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Self(value)),
            Err(_) => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such resource",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::{Router, routing::get};

    use super::*;

    #[derive(serde::Deserialize)]
    struct Wait {
        #[allow(dead_code)]
        timeout: Option<String>,
    }

    async fn handler(Query(_): Query<Wait>) -> &'static str {
        "ok"
    }

    #[tokio::test]
    async fn a_duplicate_parameter_is_a_json_422() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = Router::new().route("/wait", get(handler));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let response = reqwest::get(format!("{url}/wait?timeout=1&timeout=2"))
            .await
            .unwrap();
        assert_eq!(response.status(), 422);
        assert_eq!(response.headers()["content-type"], "application/json");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_field");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("duplicate field `timeout`"), "{body}");
        let fine = reqwest::get(format!("{url}/wait?timeout=1")).await.unwrap();
        assert_eq!(fine.status(), 200);
    }
}
