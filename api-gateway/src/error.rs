//! HTTP errors with a clean split: what the client sees (status, code, message, field) and what
//! only the log sees (the internal cause, kept as the error's `source`).
//!
//! Nothing is logged where an error is made. [`ApiError::into_response`] puts what the log needs
//! beside the answer (an [`ErrorReport`] in the response's extensions), and
//! `middleware::headers`, which knows the request id, logs it there: once per request, with the
//! id the client gets back in `X-Request-Id`.

use std::{error::Error, fmt, sync::Arc};

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::ToSchema;

/// An internal cause: any error, or a message.
pub type Cause = Box<dyn Error + Send + Sync>;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    /// What the client reads. Never holds internal detail: that goes in `source`.
    pub message: String,
    pub field: Option<String>,
    /// Seconds, for 503 answers.
    pub retry_after: Option<u64>,
    /// Why, for the log only (NATS errors, addresses, undecodable records).
    pub source: Option<Cause>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
            source: None,
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// Keeps `cause` for the log; the client still sees only the code and message.
    pub fn with_source(mut self, cause: impl Into<Cause>) -> Self {
        self.source = Some(cause.into());
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

    /// A generic 500: `cause` is logged with the request id, never returned.
    pub fn internal(cause: impl Into<Cause>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
        .with_source(cause)
    }

    /// A generic 503 with `Retry-After: 1`: `cause` is logged with the request id, never
    /// returned.
    pub fn unavailable(cause: impl Into<Cause>) -> Self {
        let mut error = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the job system is temporarily unavailable; retry later",
        )
        .with_source(cause);
        error.retry_after = Some(1);
        error
    }

    /// For an error no answer carries (a best-effort read that falls back): logged here, as
    /// the middleware would have logged it.
    pub fn log_dropped(mut self) {
        if let Some(report) = self.report() {
            report.log(None);
        }
    }

    /// What the log needs, for a server error or an error with a cause.
    fn report(&mut self) -> Option<ErrorReport> {
        (self.source.is_some() || self.status.is_server_error()).then(|| ErrorReport {
            status: self.status,
            code: self.code,
            cause: self.source.take().map(Arc::from),
        })
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl Error for ApiError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source
            .as_deref()
            .map(|cause| cause as &(dyn Error + 'static))
    }
}

/// An answered error as the log sees it; `middleware::headers` takes it out of the response
/// and logs it with the request id.
#[derive(Clone, Debug)]
pub struct ErrorReport {
    status: StatusCode,
    code: &'static str,
    cause: Option<Arc<dyn Error + Send + Sync>>,
}

impl ErrorReport {
    /// The one place an answered error is logged.
    pub fn log(&self, request_id: Option<&str>) {
        let status = self.status.as_u16();
        let code = self.code;
        let error = CauseChain(self.cause.as_deref());
        match self.status {
            StatusCode::SERVICE_UNAVAILABLE => {
                tracing::warn!(request_id, status, code, %error, "dependency unavailable");
            }
            s if s.is_server_error() => {
                tracing::error!(request_id, status, code, %error, "internal error");
            }
            _ => tracing::info!(request_id, status, code, %error, "request refused"),
        }
    }
}

/// A cause and its sources, `: `-separated. A source whose text is already shown (an error
/// that prints its source in its own message) is not repeated.
struct CauseChain<'a>(Option<&'a (dyn Error + Send + Sync + 'static)>);

impl fmt::Display for CauseChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(cause) = self.0 else {
            return f.write_str("no cause recorded");
        };
        let mut shown = cause.to_string();
        let mut next = cause.source();
        while let Some(source) = next {
            let text = source.to_string();
            if !shown.contains(&text) {
                shown.push_str(": ");
                shown.push_str(&text);
            }
            next = source.source();
        }
        f.write_str(&shown)
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
            source: None,
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
    fn into_response(mut self) -> Response {
        let report = self.report();
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
        if let Some(report) = report {
            response.extensions_mut().insert(report);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that prints its source in its own message, as `thiserror`'s `{0}` does.
    #[derive(Debug)]
    struct Wrapping(std::io::Error);

    impl fmt::Display for Wrapping {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "kv get failed: {}", self.0)
        }
    }

    impl Error for Wrapping {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    /// An error that does not.
    #[derive(Debug)]
    struct Terse(std::io::Error);

    impl fmt::Display for Terse {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("kv get failed")
        }
    }

    impl Error for Terse {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    fn chain(cause: Cause) -> String {
        CauseChain(Some(&*cause)).to_string()
    }

    #[test]
    fn the_logged_cause_shows_every_source_once() {
        let io = || std::io::Error::other("connection reset");
        assert_eq!(
            chain(Box::new(Wrapping(io()))),
            "kv get failed: connection reset"
        );
        assert_eq!(
            chain(Box::new(Terse(io()))),
            "kv get failed: connection reset"
        );
        assert_eq!(chain("record vanished".into()), "record vanished");
        assert_eq!(CauseChain(None).to_string(), "no cause recorded");
    }

    #[test]
    fn the_cause_stays_out_of_the_answer_and_goes_beside_it() {
        let error = ApiError::internal(std::io::Error::other("10.0.0.7:4222 refused"));
        assert!(Error::source(&error).is_some());
        let response = error.into_response();
        let report = response.extensions().get::<ErrorReport>().unwrap();
        assert_eq!(report.code, "internal");
        assert!(report.cause.is_some());
        // Client errors without a cause have nothing to log.
        let response = ApiError::not_found("job").into_response();
        assert!(response.extensions().get::<ErrorReport>().is_none());
    }
}
