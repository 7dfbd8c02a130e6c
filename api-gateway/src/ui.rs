//! `GET /ui`: the dashboard. Three static files compiled into the binary, so the gateway needs
//! no asset directory, CDN or build step. The page calls the API like any client, with the key
//! the user types (paths under `/ui` are public; see `middleware::is_public`).

use axum::{
    http::{HeaderName, HeaderValue, header},
    response::{IntoResponse, Response},
};

const INDEX: &str = include_str!("../ui/index.html");
const SCRIPT: &str = include_str!("../ui/app.js");
const STYLE: &str = include_str!("../ui/app.css");

/// Only the gateway's own files and API: no inline script or style, no plugins, no framing,
/// no form posted elsewhere. Script and style attributes are blocked too, which is why the page
/// builds its DOM with `textContent` and classes only.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

pub const HTML: &str = "text/html; charset=utf-8";
pub const JAVASCRIPT: &str = "text/javascript; charset=utf-8";
pub const CSS: &str = "text/css; charset=utf-8";

#[utoipa::path(
    get,
    path = "/ui",
    tag = "dashboard",
    operation_id = "dashboard",
    summary = "The dashboard page",
    description = "Jobs with live statuses, a job's record and live output, a submit form, \
        nodes. The page calls the API with the key the user types in its top bar.",
    responses((status = 200, description = "The page.", content_type = "text/html; charset=utf-8",
        body = String)),
)]
pub async fn index() -> Response {
    asset(HTML, INDEX)
}

#[utoipa::path(
    get,
    path = "/ui/",
    tag = "dashboard",
    operation_id = "dashboard_dir",
    summary = "The dashboard page (same as `/ui`)",
    responses((status = 200, description = "The page.", content_type = "text/html; charset=utf-8",
        body = String)),
)]
pub async fn index_dir() -> Response {
    index().await
}

#[utoipa::path(
    get,
    path = "/ui/app.js",
    tag = "dashboard",
    operation_id = "dashboard_script",
    summary = "The dashboard's script",
    responses((status = 200, description = "The script.",
        content_type = "text/javascript; charset=utf-8", body = String)),
)]
pub async fn script() -> Response {
    asset(JAVASCRIPT, SCRIPT)
}

#[utoipa::path(
    get,
    path = "/ui/app.css",
    tag = "dashboard",
    operation_id = "dashboard_style",
    summary = "The dashboard's style sheet",
    responses((status = 200, description = "The style sheet.",
        content_type = "text/css; charset=utf-8", body = String)),
)]
pub async fn style() -> Response {
    asset(CSS, STYLE)
}

/// `middleware::headers` adds nosniff, `X-Frame-Options` and `Cache-Control: no-store` to these
/// like to every response; only what is specific to a page is set here. Also serves `/docs`.
pub fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            ),
            // The page's address (which job is open) is nobody else's business.
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            (
                HeaderName::from_static("cross-origin-opener-policy"),
                HeaderValue::from_static("same-origin"),
            ),
        ],
        body,
    )
        .into_response()
}
