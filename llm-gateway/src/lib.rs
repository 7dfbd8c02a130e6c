//! The llm-gateway sits between job containers and LLM APIs so that real keys never enter a
//! container. Each job calls it with its own short-lived token (see `flotilla_proto::llm`);
//! the gateway checks the token against the job's grant and record, swaps in the provider's
//! real credential, streams the answer back, meters the tokens and enforces the job's budget.

mod config;
mod inflight;
mod meter;
mod metrics;
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

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(render_metrics))
        .route("/{provider}/{*path}", any(proxy::forward))
        .with_state(state)
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

/// Runs the gateway on `listener` until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
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
    let state = Arc::new(AppState {
        config,
        topology: service.topology.clone(),
        http,
        metrics: metrics::Metrics::default(),
        in_flight: Arc::default(),
    });
    tracing::info!(listen = ?listener.local_addr().ok(), "llm-gateway ready");
    flotilla_service::serve(listener, router(state), shutdown)
        .await
        .map_err(LlmGatewayError::Serve)?;
    service.stop().await;
    tracing::info!("llm-gateway stopped");
    Ok(())
}
