//! HTTP errors with a clean split: what the client sees (status, code, message, field) and what
//! only the log sees (the internal cause).

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    /// Seconds, for 503 answers.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message).with_field(field)
    }

    /// Logs `cause` with the request's context and answers a generic 500 or 503: internal
    /// detail (addresses, NATS errors) never reaches the client.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }

    pub fn unavailable(cause: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %cause, "dependency unavailable");
        let mut error = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the job system is temporarily unavailable; retry later",
        );
        error.retry_after = Some(1);
        error
    }
}

impl From<flotilla_nats::StoreError> for ApiError {
    fn from(error: flotilla_nats::StoreError) -> Self {
        match error {
            flotilla_nats::StoreError::Nats(_) => Self::unavailable(error),
            _ => Self::internal(error),
        }
    }
}

impl From<flotilla_catalog::ValidationError> for ApiError {
    fn from(error: flotilla_catalog::ValidationError) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: error.code,
            message: error.message,
            field: error.field,
            retry_after: None,
        }
    }
}

/// The error envelope: every 4xx and 5xx answer the gateway produces itself.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"error": {"code": "invalid_field", "field": "max_turns", "message": "max_turns must be between 1 and 100, got 0"}}))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

// Fields in alphabetical order: the JSON keys come out in the order they always had.
#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// What went wrong, for programs: `unauthorized`, `not_found`, `wait_timeout`, `conflict`,
    /// `idempotency_conflict`, `payload_too_large`, `invalid_body`, `invalid_header`,
    /// `invalid_field`, `missing_field`, `unknown_profile`, `unknown_engine`, `missing_prompt`,
    /// `template_error`, `invalid_config`, `internal`, `unavailable`, `queue_unavailable`.
    pub code: &'static str,
    /// The field, query parameter or header to blame (a JSON path such as `resources.cpus`),
    /// when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// What went wrong, for people. Never holds internal detail.
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                field: self.field,
                message: self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
