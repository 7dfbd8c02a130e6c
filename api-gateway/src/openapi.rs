//! The OpenAPI document's frame: its info, tags, security scheme and the components no
//! operation reaches on its own. The operations come with the routes: `crate::api_routes`
//! registers each handler with its `#[utoipa::path]` documentation (utoipa-axum's `routes!`), so
//! this module imports no handler. Served at `GET /openapi.json`, rendered by the reference page
//! at `GET /docs` (three files in `api-gateway/ui/`, embedded like the dashboard's), and
//! committed as `docs/openapi.json`, which a test keeps in step with the code.

use axum::{
    Extension,
    body::Bytes,
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};
use utoipa::{
    Modify, OpenApi,
    openapi::{
        self,
        security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    },
};

use crate::{
    error::ErrorBody,
    responses::{
        AdminOnly, Internal, Keyless, NotFoundJob, NotFoundSchedule, NotJson, Unauthorized,
        Unavailable,
    },
    ui,
};

const DOCS_PAGE: &str = include_str!("../ui/docs.html");
const DOCS_SCRIPT: &str = include_str!("../ui/docs.js");
const DOCS_STYLE: &str = include_str!("../ui/docs.css");

const DESCRIPTION: &str = "\
Flotilla runs AI coding agents (Claude Code, OpenCode, Codex, Gemini CLI, Aider, or a plain \
shell) in isolated containers on a fleet of nodes. This is its HTTP API, served by the \
api-gateway.

- JSON in and out. Times are RFC 3339 UTC strings.
- Every error the gateway produces is an `ErrorBody`: \
`{\"error\": {\"code\", \"message\", \"field\"}}`, where `field` names the one field to blame, \
if any. Any operation may also answer 500 `internal`.
- Auth: when the gateway has an API key (`FLOTILLA_API_KEY`), operations marked `api_key` need \
`Authorization: Bearer <key>`, else 401. The others are public. Without a key, nothing is \
checked and the gateway listens on loopback only. When it also has an admin key \
(`FLOTILLA_ADMIN_API_KEY`), only that key may `PUT` or `DELETE` a configuration file (403 \
`forbidden` for the API key); it works everywhere else too.
- Every response carries `X-Request-Id` (echoed when the request sent one of 1-200 visible \
ASCII characters, else a new UUID), `X-Content-Type-Options: nosniff`, \
`X-Frame-Options: DENY` and `Cache-Control: no-store`.
- Request bodies are capped (`FLOTILLA_MAX_BODY_BYTES`, 8 MiB by default): 413 above.

The behaviour in full, and where it differs from Parpaing's API: `docs/api.md`.";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Flotilla",
        version = env!("CARGO_PKG_VERSION"),
        description = DESCRIPTION,
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    // Operations are added by `crate::api_routes`, each with its route. Schemas reached from
    // them are collected on their own; the error body behind the shared responses is only
    // named in descriptions, and the SSE event data schemas come from `logs` and `events`.
    components(
        schemas(ErrorBody),
        responses(Unauthorized, Keyless, AdminOnly, NotJson, NotFoundJob, NotFoundSchedule,
            Internal, Unavailable),
    ),
    modifiers(&BearerKey),
    tags(
        (name = "jobs", description = "Submit, list, read, wait for, cancel and follow jobs."),
        (name = "schedules", description = "Jobs run on a cron pattern or at an interval, \
            created by the dispatcher as they fall due. Not in Parpaing's API."),
        (name = "catalogue", description = "The engines and profiles a job can name."),
        (name = "configs", description = "The shared configuration: engine, profile and \
            template files, kept in NATS and picked up by every service without a restart."),
        (name = "operations", description = "Health, metrics and the live agent-nodes."),
        (name = "documentation", description = "This document, and the page that renders it."),
        (name = "dashboard", description = "The browser dashboard's files."),
    ),
)]
pub struct ApiDoc;

/// The `api_key` security scheme the protected operations name.
struct BearerKey;

impl Modify for BearerKey {
    fn modify(&self, openapi: &mut openapi::OpenApi) {
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some(
                "The gateway's API key (`FLOTILLA_API_KEY`), or its admin key \
                 (`FLOTILLA_ADMIN_API_KEY`), as `Authorization: Bearer <key>`. Only checked \
                 when the gateway has a key; with an admin key, only it changes the \
                 configuration.",
            ))
            .build();
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme("api_key", SecurityScheme::Http(scheme));
    }
}

/// The document as served and committed: pretty-printed with a trailing newline, keys in a
/// stable order (maps sorted, an object's properties in declaration order).
pub fn render(api: &openapi::OpenApi) -> String {
    let mut json = api
        .to_pretty_json()
        .expect("an OpenAPI document serializes");
    json.push('\n');
    json
}

/// The rendered document, handed to [`spec`] as a request extension by `crate::router`, which
/// builds it from the routes once.
#[derive(Clone)]
pub struct Document(Bytes);

impl Document {
    pub fn new(api: &openapi::OpenApi) -> Self {
        Self(Bytes::from(render(api)))
    }
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "documentation",
    operation_id = "openapi",
    summary = "This OpenAPI document",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API.",
        content_type = "application/json", body = serde_json::Value)),
)]
pub async fn spec(Extension(Document(document)): Extension<Document>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        document,
    )
        .into_response()
}

#[utoipa::path(
    get,
    path = "/docs",
    tag = "documentation",
    operation_id = "docs",
    summary = "The API reference page",
    description = "Renders `/openapi.json`: operations by tag, their parameters, bodies and \
        answers, and the schemas. Self-contained: nothing is fetched from elsewhere.",
    responses((status = 200, description = "The page.", content_type = "text/html; charset=utf-8",
        body = String)),
)]
pub async fn docs_page() -> Response {
    ui::asset(ui::HTML, DOCS_PAGE)
}

#[utoipa::path(
    get,
    path = "/docs/",
    tag = "documentation",
    operation_id = "docs_dir",
    summary = "The API reference page (same as `/docs`)",
    responses((status = 200, description = "The page.", content_type = "text/html; charset=utf-8",
        body = String)),
)]
pub async fn docs_page_dir() -> Response {
    docs_page().await
}

#[utoipa::path(
    get,
    path = "/docs/docs.js",
    tag = "documentation",
    operation_id = "docs_script",
    summary = "The reference page's script",
    responses((status = 200, description = "The script.",
        content_type = "text/javascript; charset=utf-8", body = String)),
)]
pub async fn docs_script() -> Response {
    ui::asset(ui::JAVASCRIPT, DOCS_SCRIPT)
}

#[utoipa::path(
    get,
    path = "/docs/docs.css",
    tag = "documentation",
    operation_id = "docs_style",
    summary = "The reference page's style sheet",
    responses((status = 200, description = "The style sheet.",
        content_type = "text/css; charset=utf-8", body = String)),
)]
pub async fn docs_style() -> Response {
    ui::asset(ui::CSS, DOCS_STYLE)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{collections::BTreeSet, path::PathBuf};

    use flotilla_proto::{Attempt, JobRecord, JobRequest, JobResult, JobStatus, NodeInfo, Usage};
    use serde_json::Value;

    use super::*;

    const UPDATE_ENV: &str = "FLOTILLA_UPDATE_OPENAPI";

    /// The document the gateway serves: this frame with every route's operation.
    pub(crate) fn document() -> String {
        render(&crate::api_routes().into_openapi())
    }

    fn committed_path() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json")
    }

    #[test]
    fn openapi_committed_document_matches_the_code() {
        let generated = document();
        let path = committed_path();
        if std::env::var_os(UPDATE_ENV).is_some() {
            std::fs::write(&path, &generated).unwrap();
            return;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/openapi.json is not the document the code generates. If the API change is \
             intended, regenerate it with:\n    {UPDATE_ENV}=1 cargo test -p api-gateway openapi\n\
             and commit the result."
        );
    }

    /// `(method, path)` of every operation in the document.
    fn documented_operations() -> BTreeSet<(String, String)> {
        let doc: Value = serde_json::from_str(&document()).unwrap();
        let mut operations = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                operations.insert((method.to_uppercase(), path.clone()));
            }
        }
        operations
    }

    #[test]
    fn openapi_documents_every_route_and_nothing_else() {
        let routed: BTreeSet<(String, String)> = crate::ROUTES
            .iter()
            .map(|(method, path)| ((*method).to_owned(), (*path).to_owned()))
            .collect();
        let documented = documented_operations();
        let undocumented: Vec<_> = routed.difference(&documented).collect();
        let unrouted: Vec<_> = documented.difference(&routed).collect();
        assert!(
            undocumented.is_empty() && unrouted.is_empty(),
            "routes without an OpenAPI operation (add #[utoipa::path] and register the handler \
             with routes! in api_routes): \
             {undocumented:?}; operations that are not in ROUTES: {unrouted:?}"
        );
    }

    #[test]
    fn openapi_operations_are_tagged_and_protected_as_routed() {
        let doc: Value = serde_json::from_str(&document()).unwrap();
        let tags: BTreeSet<&str> = doc["tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|tag| tag["name"].as_str().unwrap())
            .collect();
        for (method, path) in documented_operations() {
            let operation = &doc["paths"][&path][method.to_lowercase()];
            let tag = operation["tags"][0].as_str().unwrap_or_default();
            assert!(tags.contains(tag), "{method} {path}: tag {tag:?}");
            let secured = operation.get("security").is_some();
            assert_eq!(
                secured,
                !crate::middleware::is_public(&path),
                "{method} {path}: security must match the auth middleware's public paths"
            );
            assert!(
                operation["operationId"].is_string(),
                "{method} {path}: no operationId"
            );
            let admin_only =
                operation["responses"]["403"]["$ref"] == "#/components/responses/AdminOnly";
            let routed_method = axum::http::Method::from_bytes(method.as_bytes()).unwrap();
            assert_eq!(
                admin_only,
                crate::middleware::needs_admin(&routed_method, &path),
                "{method} {path}: the AdminOnly 403 must match the operations that need the admin key"
            );
        }
    }

    #[test]
    fn openapi_error_body_requires_what_is_always_sent() {
        assert_required_matches(
            "ErrorDetail",
            &crate::error::ErrorDetail {
                code: "not_found",
                field: None,
                message: "job not found".to_owned(),
            },
        );
    }

    /// `required` in a response schema must list exactly the keys every response carries, so a
    /// client can rely on them; checked against what serde produces for a sparse value.
    pub(crate) fn assert_required_matches(name: &str, value: &impl serde::Serialize) {
        let doc: Value = serde_json::from_str(&document()).unwrap();
        let schema = &doc["components"]["schemas"][name];
        let required: BTreeSet<&str> = schema["required"]
            .as_array()
            .unwrap_or_else(|| panic!("{name} has no required list: {schema}"))
            .iter()
            .map(|field| field.as_str().unwrap())
            .collect();
        let properties: BTreeSet<&str> = schema["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let json = serde_json::to_value(value).unwrap();
        let present: BTreeSet<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(required, present, "{name}: required vs always serialized");
        assert!(
            present.is_subset(&properties),
            "{name}: serialized keys missing from the schema: {:?}",
            present.difference(&properties).collect::<Vec<_>>()
        );
    }

    /// The request examples the document gives are bodies the gateway accepts, with the
    /// configuration this repository ships.
    #[tokio::test]
    async fn openapi_request_examples_pass_validation() {
        let doc: Value = serde_json::from_str(&document()).unwrap();
        let example = |name: &str| doc["components"]["schemas"][name]["examples"][0].clone();
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let catalog =
            flotilla_catalog::Catalog::load(&root.join("engines"), &root.join("profiles")).unwrap();
        let limits = flotilla_catalog::Limits::default();
        let now = chrono::Utc::now();
        let job = serde_json::from_value(example("SubmitRequest")).unwrap();
        let origin = flotilla_catalog::Origin::Http;
        flotilla_catalog::validate(&catalog, &limits, job, origin, now)
            .await
            .unwrap();
        let schedule = serde_json::from_value(example("ScheduleRequest")).unwrap();
        flotilla_catalog::schedule::validate_schedule(&catalog, &limits, schedule, now)
            .await
            .unwrap();
    }

    /// Bounds written as literals in schema attributes, checked against the validators' own.
    #[test]
    fn openapi_schedule_rules_match_the_validator() {
        let doc: Value = serde_json::from_str(&document()).unwrap();
        let request = &doc["components"]["schemas"]["ScheduleRequest"]["allOf"];
        let interval = &request[0]["properties"]["interval_seconds"];
        let max = flotilla_catalog::schedule::MAX_INTERVAL_SECONDS;
        assert_eq!(interval["maximum"], max, "{interval}");
        let choice: Vec<&Value> = request[1]["oneOf"]
            .as_array()
            .unwrap()
            .iter()
            .map(|branch| &branch["required"][0])
            .collect();
        assert_eq!(choice, ["cron", "interval_seconds"]);
    }

    #[test]
    fn openapi_required_fields_are_those_always_present() {
        let now = chrono::Utc::now();
        let request = JobRequest::example("a-1", "shell", "true");
        // As the API shows it: `jobs::public` has removed the internal `ack_subject`.
        let mut record = JobRecord::pending(&request);
        record.status = JobStatus::Running;
        assert!(record.ack_subject.is_none());
        assert_required_matches("JobRecord", &record);
        assert_required_matches("JobResult", &JobResult::default());
        assert_required_matches("Usage", &Usage::default());
        assert_required_matches(
            "Attempt",
            &Attempt {
                attempt: 1,
                node_id: "n".to_owned(),
                started_at: now,
                finished_at: None,
                outcome: None,
                start_ms: None,
            },
        );
        let node: NodeInfo = serde_json::from_value(serde_json::json!({
            "node_id": "n", "host": "h", "version": "v", "engines": [], "slots_total": 1,
            "slots_busy": 0, "started_at": now, "heartbeat_at": now, "ttl_ms": 3000,
        }))
        .unwrap();
        assert_required_matches("NodeInfo", &node);
        let schedule: flotilla_proto::Schedule = serde_json::from_value(serde_json::json!({
            "schedule_id": "s", "timezone": "UTC", "enabled": true, "job": {},
            "created_at": now, "updated_at": now,
        }))
        .unwrap();
        assert_required_matches("Schedule", &schedule);
    }
}
