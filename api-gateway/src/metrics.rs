//! `GET /metrics`: Prometheus text format 0.0.4. Fleet figures are computed at scrape time
//! from the job index, the queue's stream and consumer, and the nodes' heartbeats; HTTP
//! request figures are counted as requests end. Labels are bounded: job status, HTTP method,
//! route template (never the raw path) and status class.

use std::{
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, Instant},
};

use axum::{
    extract::{MatchedPath, Request, State},
    http::{HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use flotilla_proto::names;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tracing::Instrument as _;

use crate::{AppState, ops::live_nodes};

/// Upper bounds (seconds) of request durations; `/wait` and log streams run for minutes.
const DURATION_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Route label of requests no route matched (404s), so unknown paths add no series.
const UNMATCHED: &str = "unmatched";

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    route: Arc<str>,
    status: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    method: &'static str,
    route: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

/// Counted as requests end; registered into every scrape's registry.
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    durations: Family<RouteLabels, Histogram, fn() -> Histogram>,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            durations: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS)),
        }
    }
}

impl HttpMetrics {
    fn observe(&self, method: &'static str, route: Arc<str>, status: StatusCode, took: Duration) {
        self.durations
            .get_or_create(&RouteLabels {
                method,
                route: route.clone(),
            })
            .observe(took.as_secs_f64());
        self.requests
            .get_or_create(&RequestLabels {
                method,
                route,
                status: status_class(status),
            })
            .inc();
    }
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Every request: a server span named after its route template (a child of the caller's
/// trace when the request carries `traceparent`), and its count and duration.
pub async fn observe(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let method = method_label(request.method());
    let route: Arc<str> = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| Arc::from(UNMATCHED), |path| Arc::from(path.as_str()));
    let span = tracing::info_span!(
        "request",
        otel.name = %format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = method,
        http.route = %route,
        url.path = %request.uri().path(),
        http.response.status_code = tracing::field::Empty,
        request_id = tracing::field::Empty,
    );
    flotilla_telemetry::propagation::set_parent_from_http(&span, request.headers());
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    state
        .http_metrics
        .observe(method, route, response.status(), started.elapsed());
    response
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    operation_id = "metrics",
    summary = "Prometheus metrics",
    description = "Computed at scrape time from the job index, the run queue and the nodes' \
        heartbeats: `flotilla_jobs{status}`, `flotilla_queue_depth`, \
        `flotilla_queue_oldest_age_seconds`, `flotilla_jobs_ack_pending`, \
        `flotilla_jobs_redelivered`, `flotilla_jobs_waiting_for_a_node`, \
        `flotilla_nodes_live`, `flotilla_slots_total`, `flotilla_slots_busy`, \
        `flotilla_pool_warm`, `flotilla_pool_hits_total`, `flotilla_pool_misses_total`, \
        `flotilla_config_version`; and, counted as requests end, \
        `flotilla_http_requests_total{method,route,status}` and \
        `flotilla_http_request_duration_seconds{method,route}` (route templates and status \
        classes only). A figure whose source cannot be read is left out. With several gateway \
        replicas, only one (the holder of the `fleet-metrics` lease) exports the fleet-wide \
        figures (all but `flotilla_config_version` and the HTTP ones), so that a sum over \
        replicas counts each once.",
    responses(
        (status = 200, description = "Prometheus text exposition format 0.0.4.",
            content_type = "text/plain; version=0.0.4; charset=utf-8", body = String,
            example = "# HELP flotilla_nodes_live Agent-nodes with a fresh heartbeat.\n# TYPE flotilla_nodes_live gauge\nflotilla_nodes_live 2\n"),
    ),
)]
pub async fn render(State(state): State<Arc<AppState>>) -> Response {
    // Registration order is the order of the text: jobs, queue, nodes, then the gateway's own.
    // The fleet-wide figures come from one gateway replica only (the holder of their lease),
    // so that a sum over replicas counts them once.
    let mut registry = Registry::default();
    if state.fleet_metrics.confirm().await {
        register_jobs(&mut registry, &state);
        register_queue(&mut registry, &state).await;
        register_nodes(&mut registry, &state).await;
    }
    register_gateway(&mut registry, &state);

    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    let mut response = out.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(prometheus_client::encoding::prometheus_text::CONTENT_TYPE),
    );
    response
}

/// `flotilla_jobs{status}`, from the index.
fn register_jobs(registry: &mut Registry, state: &AppState) {
    let jobs = Family::<StatusLabel, Gauge>::default();
    for (status, count) in state.index.counts() {
        jobs.get_or_create(&StatusLabel {
            status: status.as_str(),
        })
        .set(count as i64);
    }
    registry.register(
        "flotilla_jobs",
        "Jobs known to the gateway, by status",
        jobs,
    );
}

/// The run queue's stream and the nodes' consumer; each part is left out when unreadable.
async fn register_queue(registry: &mut Registry, state: &AppState) {
    if let Ok(mut stream) = state.topology.js.get_stream(names::STREAM_JOBS).await
        && let Ok(info) = stream.info().await
    {
        let depth = info.state.messages;
        let oldest = if depth == 0 {
            0.0
        } else {
            let now = time::OffsetDateTime::now_utc();
            (now - info.state.first_timestamp).as_seconds_f64().max(0.0)
        };
        registry.register(
            "flotilla_queue_depth",
            "Job messages in the work queue (waiting or held by a node)",
            gauge(depth),
        );
        let age = Gauge::<f64, AtomicU64>::default();
        age.set(oldest);
        registry.register(
            "flotilla_queue_oldest_age_seconds",
            "Age of the oldest message in the work queue",
            age,
        );
    }
    let Some(queues) = run_queues(state).await else {
        return;
    };
    registry.register(
        "flotilla_jobs_ack_pending",
        "Job messages handed to nodes and not yet acked",
        gauge(queues.ack_pending),
    );
    registry.register(
        "flotilla_jobs_redelivered",
        "Job messages currently redelivered at least once",
        gauge(queues.redelivered),
    );
    registry.register(
        "flotilla_jobs_waiting_for_a_node",
        "Job messages no node has taken yet",
        gauge(queues.pending),
    );
}

/// Sums over the run queues (one consumer per priority and job class).
#[derive(Default)]
struct QueueSums {
    ack_pending: u64,
    redelivered: u64,
    pending: u64,
}

async fn run_queues(state: &AppState) -> Option<QueueSums> {
    let stream = state
        .topology
        .js
        .get_stream(names::STREAM_JOBS)
        .await
        .ok()?;
    use futures::StreamExt as _;
    let mut consumers = stream.consumers();
    let mut sums = QueueSums::default();
    while let Some(info) = consumers.next().await {
        let info = info.ok()?;
        sums.ack_pending += info.num_ack_pending as u64;
        sums.redelivered += info.num_redelivered as u64;
        sums.pending += info.num_pending;
    }
    Some(sums)
}

/// Sums over the live nodes' heartbeats; left out when they cannot be read.
async fn register_nodes(registry: &mut Registry, state: &AppState) {
    let nodes = match live_nodes(state).await {
        Ok(nodes) => nodes,
        Err(e) => {
            e.log_dropped();
            return;
        }
    };
    let sum = |f: fn(&flotilla_proto::NodeInfo) -> u64| nodes.iter().map(f).sum::<u64>();
    registry.register(
        "flotilla_nodes_live",
        "Agent-nodes with a fresh heartbeat",
        gauge(nodes.len() as u64),
    );
    registry.register(
        "flotilla_slots_total",
        "Job slots across live nodes",
        gauge(sum(|n| u64::from(n.slots_total))),
    );
    registry.register(
        "flotilla_slots_busy",
        "Busy job slots across live nodes",
        gauge(sum(|n| u64::from(n.slots_busy))),
    );
    registry.register(
        "flotilla_pool_warm",
        "Warm containers ready across live nodes",
        gauge(sum(|n| n.warm.values().map(|v| u64::from(*v)).sum())),
    );
    registry.register(
        "flotilla_pool_hits",
        "Jobs that found a warm container (live nodes, since they started)",
        counter(sum(|n| n.pool_hits)),
    );
    registry.register(
        "flotilla_pool_misses",
        "Jobs that needed a cold start (live nodes, since they started)",
        counter(sum(|n| n.pool_misses)),
    );
}

/// The configuration version this gateway runs, and its HTTP request figures.
fn register_gateway(registry: &mut Registry, state: &AppState) {
    registry.register(
        "flotilla_config_version",
        "Revision of the shared configuration this gateway runs",
        gauge(state.catalog.version()),
    );
    registry.register(
        "flotilla_http_requests",
        "HTTP requests answered, by method, route template and status class",
        state.http_metrics.requests.clone(),
    );
    registry.register(
        "flotilla_http_request_duration_seconds",
        "Time to answer an HTTP request (to the response head), by method and route template",
        state.http_metrics.durations.clone(),
    );
}

fn gauge(value: u64) -> Gauge {
    let gauge = Gauge::default();
    gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
    gauge
}

fn counter(value: u64) -> Counter {
    let counter = Counter::default();
    counter.inc_by(value);
    counter
}
