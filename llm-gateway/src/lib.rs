//! The llm-gateway sits between job containers and LLM APIs so that real keys never enter a
//! container. Each job calls it with its own short-lived token (see `flotilla_proto::llm`);
//! the gateway checks the token against the job's grant and record, and what it asks for
//! against the APIs and tools it may use, swaps in the provider's real credential, streams the
//! answer back, meters the tokens and enforces the job's budget.

mod config;
mod inflight;
mod limits;
mod meter;
mod metrics;
mod policy;
mod proxy;

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderValue, header},
    response::IntoResponse,
    routing::{any, get},
};
use flotilla_nats::Topology;
use flotilla_service::{NatsConfig, Service};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{
    Config, ConfigError, DEFAULT_CONFIG, ProcessSecrets, Provider, ProviderKind, Secret,
    SecretSource, Upstreams,
};
pub use meter::{Meter, Price, Prices, Tokens};

struct AppState {
    config: Config,
    topology: Topology,
    http: flotilla_http::Client,
    metrics: metrics::Metrics,
    in_flight: Arc<inflight::InFlight>,
    limits: Arc<limits::Limits>,
}

#[derive(Debug, thiserror::Error)]
pub enum LlmGatewayError {
    #[error(transparent)]
    Start(#[from] flotilla_service::StartError),
    #[error("cannot set up the upstream HTTP client (TLS): {0}")]
    Http(std::io::Error),
    #[error("http server failed: {0}")]
    Serve(std::io::Error),
}

/// Where the gateway listens, bound by the caller.
pub struct Listeners {
    /// What job containers reach.
    pub jobs: TcpListener,
    /// Where `/metrics` is served instead of on `jobs`: its series name other jobs' agents,
    /// profiles and spend. `None` keeps it on `jobs`.
    pub metrics: Option<TcpListener>,
}

/// What jobs reach; `/metrics` only when it has no listener of its own.
fn router(state: Arc<AppState>, metrics_apart: bool) -> Router {
    let router = Router::new()
        .route("/health", get(health))
        .route("/{provider}/{*path}", any(proxy::forward));
    let router = match metrics_apart {
        false => router.route("/metrics", get(render_metrics)),
        true => router.route("/metrics", get(metrics_elsewhere)),
    };
    router.with_state(state)
}

fn metrics_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .with_state(state)
}

async fn metrics_elsewhere() -> impl IntoResponse {
    let message = "not served here: the llm-gateway serves /metrics on FLOTILLA_LLM_METRICS_LISTEN";
    (
        axum::http::StatusCode::NOT_FOUND,
        Json(json!({"error": {"message": message}})),
    )
}

async fn health(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let providers: serde_json::Map<String, serde_json::Value> = state
        .config
        .providers
        .iter()
        .map(|(name, p)| (name.clone(), json!({"credential": p.has_credential()})))
        .collect();
    Json(json!({"status": "ok", "providers": providers}))
}

async fn render_metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(prometheus_client::encoding::prometheus_text::CONTENT_TYPE),
        )],
        state.metrics.render(),
    )
}

/// Runs the gateway on `listeners` until `shutdown`.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), LlmGatewayError> {
    let nats = NatsConfig {
        name: "llm-gateway",
        url: &config.nats_url,
        options: &config.nats,
        topology: &config.topology,
    };
    let Some(service) = Service::start(nats, &shutdown).await? else {
        return Ok(());
    };
    let http =
        flotilla_http::client(std::time::Duration::from_secs(10)).map_err(LlmGatewayError::Http)?;
    for (name, provider) in &config.providers {
        tracing::info!(
            provider = %name,
            kind = ?provider.kind,
            base_url = %provider.base_url,
            credential = provider.has_credential(),
            "provider configured"
        );
    }
    let limits = limits::Limits::new(config.max_concurrent_per_job, config.max_concurrent);
    let state = Arc::new(AppState {
        limits: Arc::new(limits),
        config,
        topology: service.topology.clone(),
        http,
        metrics: metrics::Metrics::default(),
        in_flight: Arc::default(),
    });
    let Listeners { jobs, metrics } = listeners;
    tracing::info!(
        listen = ?jobs.local_addr().ok(),
        metrics = ?metrics.as_ref().and_then(|l| l.local_addr().ok()),
        "llm-gateway ready"
    );
    let jobs_router = router(state.clone(), metrics.is_some());
    let serve_jobs = flotilla_service::serve(jobs, jobs_router, shutdown.clone());
    let serve_metrics = async {
        match metrics {
            Some(listener) => {
                let router = metrics_router(state.clone());
                flotilla_service::serve(listener, router, shutdown.clone()).await
            }
            None => Ok(()),
        }
    };
    tokio::try_join!(serve_jobs, serve_metrics).map_err(LlmGatewayError::Serve)?;
    service.stop().await;
    tracing::info!("llm-gateway stopped");
    Ok(())
}
