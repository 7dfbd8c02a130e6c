//! The llm-gateway sits between job containers and LLM APIs so that real keys never enter a
//! container. Each job calls it with its own short-lived token (see `flotilla_proto::llm`);
//! the gateway checks the token against the job's grant and record, swaps in the provider's
//! real credential, streams the answer back, meters the tokens and enforces the job's budget.

mod config;
mod inflight;
mod meter;
mod metrics;
mod proxy;

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderValue, header},
    response::IntoResponse,
    routing::{any, get},
};
use flotilla_nats::Topology;
use serde_json::json;
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
    Connect(#[from] flotilla_nats::ConnectError),
    #[error(transparent)]
    Topology(#[from] flotilla_nats::TopologyError),
    #[error("cannot set up the upstream HTTP client (TLS): {0}")]
    Http(std::io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
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

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), LlmGatewayError> {
    let client = tokio::select! {
        client = flotilla_nats::connect(&config.nats_url, "llm-gateway", &config.nats) => client?,
        // NATS may never come up: a stop request must still stop us.
        () = shutdown.cancelled() => return Ok(()),
    };
    let topology = Topology::ensure(client.clone(), config.topology.clone()).await?;
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
    let listen = config.listen;
    let state = Arc::new(AppState {
        config,
        topology,
        http,
        metrics: metrics::Metrics::default(),
        in_flight: Arc::default(),
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| LlmGatewayError::Listen {
            addr: listen,
            source,
        })?;
    tracing::info!(listen = %listen, "llm-gateway ready");
    // No Nagle: a streamed answer's small chunks (and its final one) must not wait for the
    // client's delayed ACK (measured: +40 ms per request without this).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(LlmGatewayError::Serve)?;
    let _ = client.flush().await;
    tracing::info!("llm-gateway stopped");
    Ok(())
}
