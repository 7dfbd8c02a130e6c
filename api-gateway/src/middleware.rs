//! Cross-cutting HTTP behaviour: request ids, security headers, API-key auth.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{HeaderName, HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{
    AppState, Config,
    error::{ApiError, ErrorReport},
};

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

/// `PUT` and `DELETE /configs/{type}/{name}`, the operations that change the shared
/// configuration, which every service runs, and `POST /images/prefetch`. When an admin key is set only it may call them (the
/// OpenAPI document gives them the `AdminOnly` 403; a test checks the two agree).
pub(crate) fn needs_admin(method: &Method, path: &str) -> bool {
    let config_change = matches!(*method, Method::PUT | Method::DELETE)
        && path
            .strip_prefix("/configs/")
            .is_some_and(|rest| rest.split('/').count() == 2);
    // Every node pulls what it is told: an operator's call, like a configuration change.
    config_change || (*method == Method::POST && path == "/images/prefetch")
}

/// SHA-256 digests of the configured keys, so that [`auth`] compares digests: equal lengths,
/// compared in constant time, whatever the presented key.
pub(crate) struct KeyDigests {
    api: Vec<u8>,
    admin: Option<Vec<u8>>,
}

/// What a presented key may do.
#[derive(Debug, PartialEq)]
enum Access {
    /// The API key: everything but [`needs_admin`] operations when an admin key is set.
    Api,
    /// The admin key: everything.
    Admin,
}

impl KeyDigests {
    /// `None` without an API key (the gateway then authenticates nothing).
    pub(crate) fn of(config: &Config) -> Option<Self> {
        let digest = |key: &String| Sha256::digest(key.as_bytes()).to_vec();
        Some(Self {
            api: digest(config.api_key.as_ref()?),
            admin: config.admin_api_key.as_ref().map(digest),
        })
    }

    /// Which key `presented` (a digest) is. Both comparisons always run.
    fn access(&self, presented: &[u8]) -> Option<Access> {
        let admin = self
            .admin
            .as_ref()
            .is_some_and(|admin| bool::from(presented.ct_eq(admin.as_slice())));
        let api = bool::from(presented.ct_eq(self.api.as_slice()));
        match (admin, api) {
            (true, _) => Some(Access::Admin),
            (false, true) => Some(Access::Api),
            (false, false) => None,
        }
    }
}

/// Echoes (or assigns) `X-Request-Id`, and sets the security headers on every response,
/// errors included. An error answer's internal cause (see `error::ErrorReport`) is logged here,
/// once, with the request id.
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
    if let Some(report) = response.extensions_mut().remove::<ErrorReport>() {
        report.log(request_id.to_str().ok());
    }
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

/// Checks `Authorization: Bearer <key>` when a key is configured: the API key or the admin key,
/// and only the admin key, if there is one, for [`needs_admin`] operations. Digests are compared
/// in constant time, so neither content nor length leaks through timing.
/// Without a key, see [`check_keyless`].
pub async fn auth(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let Some(keys) = &state.keys else {
        return match check_keyless(&request, state.config.allow_unauthenticated_public) {
            Ok(()) => next.run(request).await,
            Err(refused) => refused.into_response(),
        };
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
    let admin_only = keys.admin.is_some() && needs_admin(request.method(), request.uri().path());
    match presented.and_then(|digest| keys.access(&digest)) {
        None => unauthorized(),
        Some(Access::Api) if admin_only => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "changing the configuration needs the admin API key (FLOTILLA_ADMIN_API_KEY); \
             this key may only read it",
        )
        .into_response(),
        Some(_) => next.run(request).await,
    }
}

fn unauthorized() -> Response {
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

/// Without an API key nothing says who is calling, so the gateway at least makes sure the call
/// comes from this machine's own programs: any web page the user opens could otherwise POST a
/// job to 127.0.0.1 (a form or `fetch` with a text body needs no CORS preflight), and a DNS
/// name rebound to 127.0.0.1 would reach the whole API. So, unless
/// `FLOTILLA_ALLOW_UNAUTHENTICATED_PUBLIC` opened the gateway on purpose, only loopback Host
/// names are served; cross-site requests (by `Sec-Fetch-Site` or `Origin`) are refused; and a
/// body must say it is JSON.
pub(crate) fn check_keyless(request: &Request, public: bool) -> Result<(), ApiError> {
    let headers = request.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()));
    if !public && !host.is_some_and(is_loopback_host) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_host",
            "without an API key only loopback host names (localhost, 127.0.0.1, [::1]) are \
             served; set FLOTILLA_API_KEY to serve others",
        ));
    }
    if is_cross_site(headers, host) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "cross_site",
            "cross-site requests are refused without an API key",
        ));
    }
    let has_body = matches!(
        *request.method(),
        Method::POST | Method::PUT | Method::PATCH
    );
    if has_body && !is_json(headers.get(header::CONTENT_TYPE)) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be sent as Content-Type: application/json",
        ));
    }
    Ok(())
}

/// `localhost`, `127.x.x.x` or `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A browser says where a request comes from: `Sec-Fetch-Site` (current browsers), else
/// `Origin`, which must then name the host the request went to.
fn is_cross_site(headers: &axum::http::HeaderMap, host: Option<&str>) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        return !matches!(site.as_bytes(), b"same-origin" | b"none");
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return false;
    };
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_scheme, rest)| rest);
    origin_host.is_none() || origin_host != host
}

fn is_json(content_type: Option<&HeaderValue>) -> bool {
    content_type
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        sync::{Arc, Mutex},
    };

    use axum::{Router, routing::get};
    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    /// Log output, captured.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Self;

        fn make_writer(&'a self) -> Self {
            self.clone()
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<String> {
            let bytes = self.0.lock().unwrap();
            String::from_utf8_lossy(&bytes)
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    const DECODE_CAUSE: &str = "record job.a-1 does not decode: missing field `status`";
    const NATS_CAUSE: &str = "nats 10.0.0.7:4222: connection refused";

    async fn broken() -> Result<(), ApiError> {
        Err(ApiError::internal(io::Error::other(DECODE_CAUSE)))
    }

    async fn down() -> Result<(), ApiError> {
        let cause = io::Error::new(io::ErrorKind::ConnectionRefused, NATS_CAUSE);
        Err(ApiError::unavailable(cause))
    }

    #[tokio::test]
    async fn error_answers_carry_the_request_id_and_log_the_cause_once() {
        let logs = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let app = Router::new()
            .route("/broken", get(broken))
            .route("/down", get(down))
            .layer(axum::middleware::from_fn(headers));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = reqwest::Client::new();

        // 500, with the client's own request id.
        let response = client
            .get(format!("http://{addr}/broken"))
            .header("x-request-id", "req-7f3a")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 500);
        assert_eq!(response.headers()["x-request-id"], "req-7f3a");
        let body = response.text().await.unwrap();
        assert_eq!(
            body,
            r#"{"error":{"code":"internal","message":"internal error"}}"#
        );

        // 503, with an id the gateway assigns.
        let response = client
            .get(format!("http://{addr}/down"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["retry-after"], "1");
        let assigned = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(uuid::Uuid::parse_str(&assigned).is_ok(), "{assigned}");
        let body = response.text().await.unwrap();
        assert_eq!(
            body,
            r#"{"error":{"code":"unavailable","message":"the job system is temporarily unavailable; retry later"}}"#
        );

        let lines = logs.lines();
        for (request_id, cause, level, code) in [
            ("req-7f3a", DECODE_CAUSE, "ERROR", "internal"),
            (assigned.as_str(), NATS_CAUSE, "WARN", "unavailable"),
        ] {
            let logged: Vec<&String> = lines.iter().filter(|l| l.contains(cause)).collect();
            assert_eq!(logged.len(), 1, "cause logged once: {lines:#?}");
            let line = logged[0];
            assert!(line.contains(level), "{line}");
            assert!(
                line.contains(&format!("request_id=\"{request_id}\"")),
                "{line}"
            );
            assert!(line.contains(&format!("code=\"{code}\"")), "{line}");
        }
    }

    #[test]
    fn only_configuration_changes_need_the_admin_key() {
        for path in ["/configs/engine/shell", "/configs/template/a.md.j2"] {
            assert!(needs_admin(&Method::PUT, path), "{path}");
            assert!(needs_admin(&Method::DELETE, path), "{path}");
            assert!(!needs_admin(&Method::GET, path), "{path}");
        }
        for (method, path) in [
            (Method::GET, "/configs"),
            (Method::DELETE, "/jobs/a-1"),
            (Method::PATCH, "/schedules/s"),
            (Method::PUT, "/configs/engine"),
            (Method::PUT, "/configs/engine/a/b"),
        ] {
            assert!(!needs_admin(&method, path), "{method} {path}");
        }
    }

    #[test]
    fn a_presented_key_is_the_api_key_the_admin_key_or_neither() {
        let digest = |key: &str| Sha256::digest(key.as_bytes()).to_vec();
        let keys = KeyDigests {
            api: digest("submit-key-0123456789"),
            admin: Some(digest("admin-key-0123456789")),
        };
        assert_eq!(
            keys.access(&digest("submit-key-0123456789")),
            Some(Access::Api)
        );
        assert_eq!(
            keys.access(&digest("admin-key-0123456789")),
            Some(Access::Admin)
        );
        assert_eq!(keys.access(&digest("admin-key-012345678")), None);
        let without_admin = KeyDigests {
            admin: None,
            ..keys
        };
        assert_eq!(without_admin.access(&digest("admin-key-0123456789")), None);
    }

    fn request(method: Method, headers: &[(&str, &str)]) -> Request {
        let mut builder = Request::builder().method(method).uri("/jobs");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(axum::body::Body::empty()).unwrap()
    }

    fn refusal(request: &Request, public: bool) -> Option<&'static str> {
        check_keyless(request, public).err().map(|e| e.code)
    }

    #[test]
    fn without_a_key_only_loopback_hosts_are_served() {
        for host in [
            "127.0.0.1:8420",
            "localhost:8420",
            "[::1]:8420",
            "127.3.4.5",
            "LOCALHOST",
        ] {
            let get = request(Method::GET, &[("host", host)]);
            assert_eq!(refusal(&get, false), None, "{host}");
        }
        for host in [
            "attacker.example:8420",
            "10.0.0.5:8420",
            "127.0.0.1.nip.io",
            "[::2]:1",
        ] {
            let get = request(Method::GET, &[("host", host)]);
            assert_eq!(refusal(&get, false), Some("forbidden_host"), "{host}");
            // Served on purpose beyond loopback without a key.
            assert_eq!(refusal(&get, true), None, "{host}");
        }
        assert_eq!(
            refusal(&request(Method::GET, &[]), false),
            Some("forbidden_host")
        );
    }

    #[test]
    fn without_a_key_cross_site_requests_are_refused() {
        let host = ("host", "127.0.0.1:8420");
        let json = ("content-type", "application/json");
        let same = [
            vec![host, json, ("sec-fetch-site", "same-origin")],
            vec![host, json, ("sec-fetch-site", "none")],
            vec![host, json, ("origin", "http://127.0.0.1:8420")],
            vec![host, json],
        ];
        for headers in same {
            assert_eq!(
                refusal(&request(Method::POST, &headers), false),
                None,
                "{headers:?}"
            );
        }
        let cross = [
            vec![host, json, ("sec-fetch-site", "cross-site")],
            vec![host, json, ("sec-fetch-site", "same-site")],
            vec![host, json, ("origin", "https://evil.example")],
            vec![host, json, ("origin", "http://127.0.0.1:9999")],
            vec![host, json, ("origin", "null")],
        ];
        for headers in cross {
            let post = request(Method::POST, &headers);
            assert_eq!(refusal(&post, false), Some("cross_site"), "{headers:?}");
            assert_eq!(refusal(&post, true), Some("cross_site"), "{headers:?}");
        }
    }

    #[test]
    fn without_a_key_bodies_must_say_they_are_json() {
        let host = ("host", "localhost:8420");
        for content_type in ["application/json", "application/json; charset=utf-8"] {
            let post = request(Method::POST, &[host, ("content-type", content_type)]);
            assert_eq!(refusal(&post, false), None, "{content_type}");
        }
        for method in [Method::POST, Method::PUT, Method::PATCH] {
            for content_type in ["text/plain", "application/x-www-form-urlencoded", ""] {
                let mut headers = vec![host];
                if !content_type.is_empty() {
                    headers.push(("content-type", content_type));
                }
                let with_body = request(method.clone(), &headers);
                assert_eq!(
                    refusal(&with_body, false),
                    Some("unsupported_media_type"),
                    "{method} {content_type}"
                );
            }
        }
        assert_eq!(refusal(&request(Method::DELETE, &[host]), false), None);
    }
}
