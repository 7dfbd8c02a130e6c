//! `/<provider>/<path>`: check the job token and what it asks for, swap in the real
//! credential, forward, stream the answer back unbuffered while metering it, and charge the
//! job.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use axum::{
    body::{Body, Bytes},
    extract::{Path, Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use chrono::Utc;
use flotilla_proto::{JobStatus, LlmGrant, Usage};
use futures::{Stream, StreamExt, future::BoxFuture, stream::BoxStream};
use serde_json::{Value, json};

use crate::{
    AppState,
    config::{Provider, ProviderKind},
    inflight::{self, Reservation},
    limits::{Busy, Permit},
    meter::{Meter, Price, Tokens},
    metrics::Spender,
    policy::{self, Endpoint, PolicyError},
};

/// Request headers a job may send upstream; everything else (its token above all) stays here.
const FORWARDED_REQUEST_HEADERS: &[&str] = &[
    "content-type",
    "accept",
    "user-agent",
    "anthropic-version",
    "anthropic-beta",
    "openai-beta",
    "idempotency-key",
    "x-app",
    // The Google SDKs' name and version (no credential).
    "x-goog-api-client",
];

/// Response headers passed back (plus the rate-limit families below).
const FORWARDED_RESPONSE_HEADERS: &[&str] = &[
    "content-type",
    "retry-after",
    "request-id",
    "x-request-id",
    "openai-processing-ms",
    "openai-version",
];

/// Anthropic requires this beta flag on requests authenticated with a subscription's OAuth token.
const OAUTH_BETA: &str = "oauth-2025-04-20";

/// Why a request was not forwarded, said the way the provider would say it. The job reads
/// `message`; `source`, the internal cause (a NATS or connection error), is only logged, once,
/// by [`forward`].
#[derive(Debug)]
pub(crate) struct Refusal {
    status: StatusCode,
    /// Metrics outcome label.
    outcome: &'static str,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
    /// Seconds to send as `Retry-After`, for a refusal that is only for now.
    retry_after: Option<u32>,
}

impl Refusal {
    fn new(status: StatusCode, outcome: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            outcome,
            message: message.into(),
            source: None,
            retry_after: None,
        }
    }

    fn with_source(mut self, cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        self.source = Some(cause.into());
        self
    }

    fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// The job store cannot be read: `error` is logged, not returned.
    fn unavailable(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the llm-gateway cannot check job tokens right now; retry shortly",
        )
        .with_source(error)
    }

    /// The one place a refusal is logged: with its cause, when it has one.
    fn log(&self, provider: &str) {
        let (status, outcome, reason) = (self.status.as_u16(), self.outcome, &self.message);
        match &self.source {
            Some(error) => {
                tracing::warn!(provider, status, outcome, %reason, %error, "request refused");
            }
            None => tracing::info!(provider, status, outcome, %reason, "request refused"),
        }
    }

    fn into_response(self, kind: ProviderKind) -> Response {
        let status = self.status;
        let body = match kind {
            ProviderKind::Anthropic => {
                let error_type = match status {
                    StatusCode::BAD_REQUEST => "invalid_request_error",
                    StatusCode::UNAUTHORIZED => "authentication_error",
                    StatusCode::FORBIDDEN => "permission_error",
                    StatusCode::NOT_FOUND => "not_found_error",
                    StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
                    StatusCode::PAYMENT_REQUIRED => "billing_error",
                    StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
                    StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
                    _ => "api_error",
                };
                json!({"type": "error", "error": {"type": error_type, "message": self.message}})
            }
            ProviderKind::Openai => {
                let code = match status {
                    StatusCode::BAD_REQUEST => "invalid_request",
                    StatusCode::UNAUTHORIZED => "invalid_api_key",
                    StatusCode::FORBIDDEN => "permission_denied",
                    StatusCode::NOT_FOUND => "not_found",
                    StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
                    StatusCode::PAYMENT_REQUIRED => "budget_exceeded",
                    StatusCode::TOO_MANY_REQUESTS => "rate_limit_exceeded",
                    _ => "upstream_error",
                };
                json!({"error": {"message": self.message, "type": "invalid_request_error", "code": code}})
            }
            ProviderKind::Google => {
                // google.rpc.Status, as the Gemini API answers errors.
                let rpc_status = match status {
                    StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => "INVALID_ARGUMENT",
                    StatusCode::UNAUTHORIZED => "UNAUTHENTICATED",
                    StatusCode::FORBIDDEN => "PERMISSION_DENIED",
                    StatusCode::NOT_FOUND => "NOT_FOUND",
                    StatusCode::PAYMENT_REQUIRED | StatusCode::TOO_MANY_REQUESTS => {
                        "RESOURCE_EXHAUSTED"
                    }
                    StatusCode::SERVICE_UNAVAILABLE | StatusCode::BAD_GATEWAY => "UNAVAILABLE",
                    StatusCode::GATEWAY_TIMEOUT => "DEADLINE_EXCEEDED",
                    _ => "INTERNAL",
                };
                json!({"error": {"code": status.as_u16(), "message": self.message, "status": rpc_status}})
            }
        };
        let mut response = (status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// What the job may not ask for is 403; a request the gateway cannot check is 400.
impl From<PolicyError> for Refusal {
    fn from(error: PolicyError) -> Self {
        match error.forbidden() {
            true => Self::forbidden(error.to_string()),
            false => Self::new(StatusCode::BAD_REQUEST, "bad_request", error.to_string()),
        }
    }
}

/// Over the job's cap is 429, over the gateway's 503; either is worth a retry in a second.
impl From<Busy> for Refusal {
    fn from(busy: Busy) -> Self {
        let (status, outcome) = match busy {
            Busy::Job { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Busy::Gateway { .. } => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
        };
        Self {
            retry_after: Some(1),
            ..Self::new(status, outcome, busy.to_string())
        }
    }
}

pub(crate) async fn forward(
    State(state): State<Arc<AppState>>,
    Path((name, path)): Path<(String, String)>,
    request: Request,
) -> Response {
    let Some(provider) = state.config.providers.get(&name) else {
        let known: Vec<&str> = state.config.providers.keys().map(String::as_str).collect();
        let message = format!(
            "no provider {name:?} at this gateway; configured: {}",
            known.join(", ")
        );
        return Refusal::new(StatusCode::NOT_FOUND, "not_found", message)
            .into_response(ProviderKind::Openai);
    };
    match relay(&state, &name, provider, &path, request).await {
        Ok(response) => {
            state.metrics.request(&name, "forwarded");
            response
        }
        Err(refusal) => {
            refusal.log(&name);
            state.metrics.request(&name, refusal.outcome);
            refusal.into_response(provider.kind)
        }
    }
}

/// One admitted request, checked, forwarded and streamed back metered. Refusals come in this
/// order: the job's token, the provider's credential, the API (method and path), the beta
/// flags, the caps on requests at once, the body (its size, then that it parses and names a
/// model), provider-side tools, the model (allowed, and priced when the job has a budget),
/// the budget, then the upstream call.
async fn relay(
    state: &Arc<AppState>,
    name: &str,
    provider: &Provider,
    path: &str,
    request: Request,
) -> Result<Response, Refusal> {
    let (parts, body) = request.into_parts();
    // Google clients may send the key as `?key=`: for that kind the token may come that way,
    // and the parameter never goes upstream (the real key goes as a header, out of URLs).
    let (query, query_token) = match provider.kind {
        ProviderKind::Google => without_key_param(parts.uri.query()),
        _ => (parts.uri.query().map(str::to_owned), None),
    };
    let (grant, spent) = admit(state, name, &parts.headers, query_token.as_deref()).await?;
    let span = call_span(name, &grant);
    check_credential(name, provider)?;
    let url = upstream_url(provider, path, query.as_deref());
    let endpoint = policy::endpoint(provider, &parts.method, path, &url)?;
    policy::check_betas(&parts.headers, &state.config.allowed_betas, &grant)?;
    let permit = state.limits.try_acquire(&grant.job_id)?;
    let body = read_body(state, body).await?;
    let mut json = policy::parse_body(&endpoint, &body)?;
    let model = policy::requested_model(&endpoint, json.as_ref())?;
    policy::check_tools(&endpoint, json.as_ref(), &grant)?;
    let price = check_model(state, &grant, model.as_deref())?;
    check_budget(state, &grant, spent.as_ref()).await?;
    let reservation = match (grant.max_budget_usd, price) {
        (Some(budget), Some(price)) => {
            let usd = inflight::worst_case(price, body.len(), json.as_ref());
            Some(reserve(state, &grant, budget, usd, spent).await?)
        }
        _ => None,
    };
    let body = ask_for_usage(&endpoint, json.as_mut(), body);
    // The parsed body can be several times the size of its bytes: not kept for the upstream's
    // answer, which may take minutes.
    drop(json);
    let upstream = upstream_request(&parts, path, &url, provider, body)?;
    let response = send(state, name, upstream).await?;
    span.record("status", response.status().as_u16());
    let charge = Charge {
        state: state.clone(),
        grant,
        provider: name.to_owned(),
        request_model: model,
        span,
        _reservation: reservation,
        _permit: permit,
    };
    Ok(metered_answer(provider.kind, response, charge))
}

/// One span per admitted call, in the job's trace; it lasts until the call is charged.
fn call_span(name: &str, grant: &LlmGrant) -> tracing::Span {
    let span = tracing::info_span!(
        "llm request",
        provider = %name,
        job_id = %grant.job_id,
        attempt = grant.attempt,
        status = tracing::field::Empty,
        model = tracing::field::Empty,
        input_tokens = tracing::field::Empty,
        output_tokens = tracing::field::Empty,
        cost_usd = tracing::field::Empty,
    );
    if let Some(traceparent) = &grant.traceparent {
        flotilla_telemetry::propagation::set_parent_from_traceparent(&span, traceparent);
    }
    span
}

/// Refuses when the provider's credential is configured but was not found at startup.
fn check_credential(name: &str, provider: &Provider) -> Result<(), Refusal> {
    match &provider.credential_source {
        Some(source) if !provider.has_credential() => Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_credential",
            format!(
                "the llm-gateway holds no credential for provider {name}: set {source} where it runs"
            ),
        )),
        _ => Ok(()),
    }
}

async fn read_body(state: &AppState, body: Body) -> Result<Bytes, Refusal> {
    axum::body::to_bytes(body, state.config.max_request_bytes)
        .await
        .map_err(|_| {
            Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("request body over {} bytes", state.config.max_request_bytes),
            )
        })
}

/// The provider's base URL with the request's path and query appended.
fn upstream_url(provider: &Provider, path: &str, query: Option<&str>) -> url::Url {
    let mut url = provider.base_url.clone();
    let base_path = url.path().trim_end_matches('/').to_owned();
    url.set_path(&format!("{base_path}/{path}"));
    url.set_query(query);
    url
}

/// Refuses a model the job's profile does not allow, or one without a price when the job has
/// a budget; answers the model's price.
fn check_model<'a>(
    state: &'a AppState,
    grant: &LlmGrant,
    model: Option<&str>,
) -> Result<Option<&'a Price>, Refusal> {
    let Some(model) = model else {
        return Ok(None);
    };
    if !grant.allows_model(model) {
        return Err(Refusal::forbidden(format!(
            "model {model:?} is not allowed for profile {}; allowed: {}",
            grant.profile,
            grant.models.join(", ")
        )));
    }
    // A model without a price costs 0 here, so a budget could not stop it.
    let price = state.config.prices.get(model);
    if let (Some(budget), None) = (grant.max_budget_usd, price) {
        return Err(Refusal::forbidden(format!(
            "model {model:?} has no price in this llm-gateway's [prices], so job {}'s \
             ${budget} max_budget_usd could not be enforced: add a price for it (or a \"*\" \
             fallback), or run the job without a budget",
            grant.job_id
        )));
    }
    Ok(price)
}

/// OpenAI streams report usage only when asked to: ask, so streamed answers are metered.
fn ask_for_usage(endpoint: &Endpoint, json: Option<&mut Value>, body: Bytes) -> Bytes {
    if *endpoint == Endpoint::ChatCompletions
        && let Some(v) = json
        && v["stream"] == Value::Bool(true)
    {
        v["stream_options"]["include_usage"] = Value::Bool(true);
        return Bytes::from(serde_json::to_vec(v).unwrap_or_else(|_| body.to_vec()));
    }
    body
}

/// The request as it goes upstream: the job's method, the allowed headers, the real
/// credential.
fn upstream_request(
    parts: &axum::http::request::Parts,
    path: &str,
    url: &url::Url,
    provider: &Provider,
    body: Bytes,
) -> Result<axum::http::Request<http_body_util::Full<Bytes>>, Refusal> {
    let mut upstream = axum::http::Request::new(http_body_util::Full::new(body));
    *upstream.method_mut() = parts.method.clone();
    *upstream.uri_mut() = url.as_str().parse().map_err(|_| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{path:?} does not make a valid upstream URL"),
        )
    })?;
    let mut headers = forwarded_request_headers(&parts.headers, provider);
    authorize(&mut headers, provider);
    *upstream.headers_mut() = headers;
    Ok(upstream)
}

/// Sends the request within the upstream timeout; the answer's head, its body still to come.
async fn send(
    state: &AppState,
    name: &str,
    upstream: axum::http::Request<http_body_util::Full<Bytes>>,
) -> Result<axum::http::Response<Body>, Refusal> {
    let response =
        tokio::time::timeout(state.config.upstream_timeout, state.http.request(upstream))
            .await
            .map_err(|_| {
                Refusal::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_error",
                    format!("provider {name} did not answer in time"),
                )
            })?
            .map_err(|e| {
                // Client errors describe the connection, never the headers: no credential here.
                Refusal::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream_error",
                    format!("provider {name} is unreachable"),
                )
                .with_source(e)
            })?;
    Ok(response.map(Body::new))
}

/// The upstream's answer as the job gets it: its status, the headers it may see, and the body
/// passed on chunk by chunk through the meter, then charged.
fn metered_answer(
    kind: ProviderKind,
    response: axum::http::Response<Body>,
    charge: Charge,
) -> Response {
    let (upstream_parts, upstream_body) = response.into_parts();
    let (headers, sse) = forwarded_response_headers(&upstream_parts.headers);
    let body = MeteredBody {
        inner: http_body_util::BodyDataStream::new(upstream_body)
            .map(|chunk| chunk.map_err(std::io::Error::other))
            .boxed(),
        done: false,
        meter: Some(Meter::new(kind, sse)),
        charge: Some(charge),
        settling: None,
        held: None,
        hold_last: !sse,
    };
    let mut out = Response::new(Body::from_stream(body));
    *out.status_mut() = upstream_parts.status;
    *out.headers_mut() = headers;
    out
}

/// The upstream headers passed back, and whether the answer is an event stream.
fn forwarded_response_headers(upstream: &HeaderMap) -> (HeaderMap, bool) {
    let mut headers = HeaderMap::new();
    for (key, value) in upstream {
        let key_name = key.as_str();
        if FORWARDED_RESPONSE_HEADERS.contains(&key_name)
            || key_name.starts_with("anthropic-ratelimit-")
            || key_name.starts_with("x-ratelimit-")
        {
            headers.append(key.clone(), value.clone());
        }
    }
    let sse = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if sse {
        // Tell any proxy in between not to buffer the stream.
        headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    (headers, sse)
}

/// The grant behind the request's token, if the token is good for this provider right now,
/// and what the job has spent so far.
async fn admit(
    state: &AppState,
    name: &str,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<(LlmGrant, Option<Usage>), Refusal> {
    let token = job_token(headers, query_token).ok_or_else(|| {
        Refusal::unauthorized(
            "missing job token: send it as x-api-key, x-goog-api-key or Authorization: Bearer \
             (Gemini: or ?key=)",
        )
    })?;
    let grant = state
        .topology
        .grants
        .lookup(token)
        .await
        .map_err(Refusal::unavailable)?
        .ok_or_else(|| Refusal::unauthorized("unknown token: only job tokens are accepted"))?;
    let job = format!("job {} attempt {}", grant.job_id, grant.attempt);
    if let Some(at) = grant.revoked_at {
        return Err(Refusal::unauthorized(format!(
            "token revoked at {at}: {job} has ended"
        )));
    }
    if Utc::now() >= grant.expires_at {
        return Err(Refusal::unauthorized(format!(
            "token expired at {}: {job}",
            grant.expires_at
        )));
    }
    // The record is the truth: a token outlives neither its attempt nor its job, even when
    // its node could not revoke it (crash, lost node).
    let record = state
        .topology
        .jobs
        .get(&grant.job_id)
        .await
        .map_err(Refusal::unavailable)?
        .map(|v| v.record);
    let usage = match record {
        Some(record) if record.attempt == grant.attempt && record.status == JobStatus::Running => {
            record.usage
        }
        Some(record) => {
            return Err(Refusal::unauthorized(format!(
                "token of {job}, which is no longer running (the job is {}, attempt {})",
                record.status, record.attempt
            )));
        }
        None => return Err(Refusal::unauthorized(format!("{job} does not exist"))),
    };
    if !grant.providers.iter().any(|p| p == name) {
        return Err(Refusal::forbidden(format!(
            "engine {} may use provider(s) {}, not {name}",
            grant.engine,
            grant.providers.join(", ")
        )));
    }
    Ok((grant, usage))
}

/// Refuses once the job has spent its budget, and flags the job so it fails with
/// "budget exceeded".
async fn check_budget(
    state: &AppState,
    grant: &LlmGrant,
    usage: Option<&Usage>,
) -> Result<(), Refusal> {
    let Some(budget) = grant.max_budget_usd else {
        return Ok(());
    };
    let spent = usage.filter(|u| u.metered).map_or(0.0, |u| u.cost_usd);
    let flagged = usage.is_some_and(|u| u.budget_exceeded);
    if spent < budget && !flagged {
        return Ok(());
    }
    if !flagged {
        let _ = state
            .topology
            .jobs
            .modify(&grant.job_id, |record| {
                let usage = metered_usage(record);
                let changed = !usage.budget_exceeded;
                usage.budget_exceeded = true;
                Ok::<bool, ()>(changed)
            })
            .await;
    }
    Err(Refusal::new(
        StatusCode::PAYMENT_REQUIRED,
        "budget_exceeded",
        format!(
            "budget exceeded: job {} has spent ${spent:.4} of its ${budget} max_budget_usd",
            grant.job_id
        ),
    ))
}

/// Waits until the request's worst case `usd` fits beside the job's requests in flight
/// (see [`inflight`]), re-reading the spend each time one settles.
async fn reserve(
    state: &Arc<AppState>,
    grant: &LlmGrant,
    budget: f64,
    usd: f64,
    mut usage: Option<Usage>,
) -> Result<Reservation, Refusal> {
    loop {
        let spent = usage
            .as_ref()
            .filter(|u| u.metered)
            .map_or(0.0, |u| u.cost_usd);
        let settled = match state
            .in_flight
            .try_reserve(&grant.job_id, usd, spent, budget)
        {
            Ok(reservation) => return Ok(reservation),
            Err(settled) => settled,
        };
        let _waiting = state.metrics.start_waiting();
        settled.await;
        usage = state
            .topology
            .jobs
            .get(&grant.job_id)
            .await
            .map_err(Refusal::unavailable)?
            .and_then(|current| current.record.usage);
        check_budget(state, grant, usage.as_ref()).await?;
    }
}

/// The job's token, wherever its CLI puts an API key: `x-api-key` (Anthropic),
/// `x-goog-api-key` (Google), `Authorization: Bearer` (OpenAI), else the query's `key`
/// (Google, passed in by the caller only for that kind). Empty ones are skipped: a CLI may
/// send an empty key header beside the real one.
fn job_token<'a>(headers: &'a HeaderMap, query_token: Option<&'a str>) -> Option<&'a str> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let bearer = header(header::AUTHORIZATION.as_str()).and_then(|v| {
        v.strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
    });
    [
        header("x-api-key"),
        header("x-goog-api-key"),
        bearer,
        query_token,
    ]
    .into_iter()
    .flatten()
    .map(str::trim)
    .find(|t| !t.is_empty())
}

/// The query without its `key` parameters, and the first `key` value. Names are compared
/// decoded, as the upstream would read them (`%6Bey` is `key` too); the other parameters pass
/// byte for byte.
fn without_key_param(query: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(query) = query else {
        return (None, None);
    };
    let mut key = None;
    let mut kept = Vec::new();
    for pair in query.split('&') {
        match url::form_urlencoded::parse(pair.as_bytes()).next() {
            Some((name, value)) if name == "key" => {
                key.get_or_insert_with(|| value.into_owned());
            }
            _ => kept.push(pair),
        }
    }
    let kept = (!kept.is_empty()).then(|| kept.join("&"));
    (kept, key)
}

fn forwarded_request_headers(headers: &HeaderMap, provider: &Provider) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in FORWARDED_REQUEST_HEADERS {
        for value in headers.get_all(*name) {
            out.append(HeaderName::from_static(name), value.clone());
        }
    }
    if provider.kind == ProviderKind::Anthropic
        && provider.api_key.is_none()
        && provider.oauth_token.is_some()
    {
        let beta = out
            .get("anthropic-beta")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        if !beta.split(',').any(|b| b.trim() == OAUTH_BETA) {
            let merged = if beta.is_empty() {
                OAUTH_BETA.to_owned()
            } else {
                format!("{beta},{OAUTH_BETA}")
            };
            if let Ok(value) = HeaderValue::from_str(&merged) {
                out.insert("anthropic-beta", value);
            }
        }
    }
    out
}

fn authorize(headers: &mut HeaderMap, provider: &Provider) {
    let (name, value) = match (provider.kind, &provider.api_key, &provider.oauth_token) {
        (ProviderKind::Anthropic, Some(key), _) => ("x-api-key", key.expose().to_owned()),
        (ProviderKind::Anthropic, None, Some(token)) => {
            ("authorization", format!("Bearer {}", token.expose()))
        }
        (ProviderKind::Openai, Some(key), _) => {
            ("authorization", format!("Bearer {}", key.expose()))
        }
        // A header, not `?key=`: URLs end up in logs.
        (ProviderKind::Google, Some(key), _) => ("x-goog-api-key", key.expose().to_owned()),
        // An upstream that needs no credential (a local model server).
        _ => return,
    };
    match HeaderValue::from_str(&value) {
        Ok(mut value) => {
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        Err(_) => tracing::error!(
            header = name,
            "the configured credential is not a valid header value"
        ),
    }
}

/// The job's usage as counted here; engine-reported figures give way to metered ones.
fn metered_usage(record: &mut flotilla_proto::JobRecord) -> &mut Usage {
    let usage = record.usage.get_or_insert_with(Usage::default);
    if !usage.metered {
        *usage = Usage {
            metered: true,
            ..Usage::default()
        };
    }
    usage
}

/// What to charge once an answer has gone by.
struct Charge {
    state: Arc<AppState>,
    grant: LlmGrant,
    provider: String,
    request_model: Option<String>,
    /// The call's span: it ends when the charge is settled.
    span: tracing::Span,
    /// Held until the charge is settled (or dropped with the answer).
    _reservation: Option<Reservation>,
    /// The request's place under the caps on requests at once, held as long as the
    /// reservation.
    _permit: Permit,
}

impl Charge {
    async fn settle(self, tokens: Tokens, model: Option<String>) {
        let grant = &self.grant;
        let model = model.or(self.request_model);
        let price = model
            .as_deref()
            .and_then(|m| self.state.config.prices.get(m));
        let cost = price.map_or(0.0, |p| p.cost(&tokens));
        if let Some(model) = &model {
            self.span.record("model", model.as_str());
        }
        self.span.record("input_tokens", tokens.input);
        self.span.record("output_tokens", tokens.output);
        self.span.record("cost_usd", cost);
        if price.is_none() && tokens != Tokens::default() {
            tracing::warn!(model = ?model, job_id = %grant.job_id, "no price for model: cost counted as 0");
        }
        self.state.metrics.usage(
            &Spender {
                provider: &self.provider,
                engine: &grant.engine,
                profile: &grant.profile,
                agent_id: &grant.agent_id,
            },
            &tokens,
            cost,
        );
        let budget = grant.max_budget_usd;
        let result = self
            .state
            .topology
            .jobs
            .modify(&grant.job_id, |record| {
                let usage = metered_usage(record);
                usage.input_tokens += tokens.input;
                usage.output_tokens += tokens.output;
                usage.cache_read_tokens += tokens.cache_read;
                usage.cache_write_tokens += tokens.cache_write;
                usage.cost_usd += cost;
                usage.requests += 1;
                if budget.is_some_and(|b| usage.cost_usd >= b) {
                    usage.budget_exceeded = true;
                }
                Ok::<bool, ()>(true)
            })
            .await;
        match result {
            Ok(_) => tracing::debug!(job_id = %grant.job_id, ?tokens, cost, "request metered"),
            Err(e) => {
                tracing::warn!(job_id = %grant.job_id, error = %e, ?tokens, cost, "usage not recorded on the job")
            }
        }
    }
}

type Chunks = BoxStream<'static, Result<Bytes, std::io::Error>>;

/// The upstream's answer on its way to the job: passed on chunk by chunk as it arrives, seen
/// by the meter, and charged to the job before the answer ends (so the job's next request
/// sees its spend).
struct MeteredBody {
    inner: Chunks,
    /// The upstream's answer has ended (or failed): nothing more to read from `inner`.
    done: bool,
    meter: Option<Meter>,
    charge: Option<Charge>,
    settling: Option<BoxFuture<'static, ()>>,
    /// A whole (not streamed) answer's latest chunk, held back until the next one comes or
    /// the charge is settled: a client that stops reading at the end of the JSON, before the
    /// body's end, must not send its next request before its spend is recorded.
    held: Option<Bytes>,
    hold_last: bool,
}

impl Stream for MeteredBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(settling) = this.settling.as_mut() {
                ready!(settling.as_mut().poll(cx));
                this.settling = None;
                return Poll::Ready(this.held.take().map(Ok));
            }
            if this.done {
                return Poll::Ready(this.held.take().map(Ok));
            }
            match ready!(this.inner.poll_next_unpin(cx)) {
                Some(Ok(bytes)) => {
                    if let Some(meter) = this.meter.as_mut() {
                        meter.feed(&bytes);
                    }
                    if !this.hold_last {
                        return Poll::Ready(Some(Ok(bytes)));
                    }
                    if let Some(previous) = this.held.replace(bytes) {
                        return Poll::Ready(Some(Ok(previous)));
                    }
                }
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    this.done = true;
                    if let (Some(meter), Some(charge)) = (this.meter.take(), this.charge.take()) {
                        let (tokens, model) = meter.finish();
                        this.settling = Some(Box::pin(charge.settle(tokens, model)));
                    }
                }
            }
        }
    }
}

impl Drop for MeteredBody {
    /// The job went away mid-answer (or the upstream failed). The provider bills the whole
    /// answer, whose usage often comes last: read the rest of it to charge it all.
    fn drop(&mut self) {
        if let Some(settling) = self.settling.take() {
            tokio::spawn(settling);
        } else if let (Some(meter), Some(charge)) = (self.meter.take(), self.charge.take()) {
            let rest = (!self.done)
                .then(|| std::mem::replace(&mut self.inner, futures::stream::empty().boxed()));
            tokio::spawn(read_to_end_and_settle(rest, meter, charge));
        }
    }
}

/// Reads what is left of an answer its job no longer reads, through the meter, then charges
/// the job. A stalled upstream is given up on after the upstream timeout without a chunk
/// (then what was seen is charged). The charge holds the request's permit meanwhile, so the
/// caps on requests at once bound these reads too.
async fn read_to_end_and_settle(rest: Option<Chunks>, mut meter: Meter, charge: Charge) {
    if let Some(mut rest) = rest {
        let idle = charge.state.config.upstream_timeout;
        while let Ok(Some(Ok(bytes))) = tokio::time::timeout(idle, rest.next()).await {
            meter.feed(&bytes);
        }
    }
    let (tokens, model) = meter.finish();
    charge.settle(tokens, model).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refusal_keeps_its_cause_out_of_the_answer() {
        let cause = std::io::Error::other("nats 10.0.0.7:4222: connection refused");
        let refusal = Refusal::unavailable(cause);
        assert!(refusal.source.is_some());
        let response = refusal.into_response(ProviderKind::Anthropic);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            json!({"type": "error", "error": {"type": "overloaded_error",
                "message": "the llm-gateway cannot check job tokens right now; retry shortly"}})
        );
    }

    #[test]
    fn the_key_parameter_is_taken_out_of_the_query() {
        let cases = [
            (None, None, None),
            (Some("alt=sse"), Some("alt=sse"), None),
            (Some("key=flj_a&alt=sse"), Some("alt=sse"), Some("flj_a")),
            (Some("alt=sse&key=flj_a"), Some("alt=sse"), Some("flj_a")),
            (Some("key=flj_a"), None, Some("flj_a")),
            // Encoded names are still `key`; every copy goes, the first value counts.
            (
                Some("%6Bey=flj_a&key=x&pageSize=5"),
                Some("pageSize=5"),
                Some("flj_a"),
            ),
            // Other parameters pass byte for byte.
            (Some("a=%2F%20b&keys=1"), Some("a=%2F%20b&keys=1"), None),
        ];
        for (query, kept, key) in cases {
            let (q, k) = without_key_param(query);
            assert_eq!((q.as_deref(), k.as_deref()), (kept, key), "{query:?}");
        }
    }

    #[test]
    fn the_token_is_taken_from_whichever_place_holds_one() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.insert(*name, HeaderValue::from_static(value));
            }
            map
        };
        let cases = [
            (headers(&[("x-goog-api-key", "flj_g")]), None, Some("flj_g")),
            (
                headers(&[("authorization", "Bearer flj_b")]),
                None,
                Some("flj_b"),
            ),
            (headers(&[]), Some("flj_q"), Some("flj_q")),
            // An empty key header (as some Gemini CLI modes send) does not hide the real one.
            (
                headers(&[("x-goog-api-key", "")]),
                Some("flj_q"),
                Some("flj_q"),
            ),
            (headers(&[("x-goog-api-key", " ")]), None, None),
        ];
        for (map, query, expected) in cases {
            assert_eq!(job_token(&map, query), expected, "{map:?} {query:?}");
        }
    }
}
