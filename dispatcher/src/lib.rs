//! The dispatcher: the fleet-wide lifecycle. It admits jobs published straight to NATS, and its
//! leader handles lost nodes, timeouts, retention, webhooks and schedules. Any number of
//! replicas may run: they share one durable consumer, so each submission is admitted once.

mod intake;
mod lifecycle;
mod metrics;
mod schedules;
mod webhooks;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use flotilla_catalog::Limits;
use flotilla_config::LiveCatalog;
use flotilla_nats::{Topology, TopologyConfig};
use serde_json::json;
use tokio_util::sync::CancellationToken;

pub use lifecycle::LifecycleConfig;
pub use webhooks::WebhookConfig;

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub lifecycle: LifecycleConfig,
    pub nats_url: String,
    /// Credentials and TLS for NATS.
    pub nats: flotilla_nats::NatsOptions,
    pub engines_dir: PathBuf,
    pub profiles_dir: PathBuf,
    pub limits: Limits,
    pub topology: TopologyConfig,
    pub webhooks: WebhookConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum DispatcherError {
    #[error("cannot load engines/profiles: {0}")]
    Config(#[from] flotilla_config::ConfigError),
    #[error(transparent)]
    Connect(#[from] flotilla_nats::ConnectError),
    #[error(transparent)]
    Topology(#[from] flotilla_nats::TopologyError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("health server failed: {0}")]
    Serve(std::io::Error),
    #[error("cannot set up the webhook HTTP client (TLS): {0}")]
    Http(std::io::Error),
}

/// What the HTTP endpoints read.
#[derive(Clone)]
struct HttpState {
    client: async_nats::Client,
    metrics: Arc<metrics::DispatcherMetrics>,
    leading: tokio::sync::watch::Receiver<bool>,
}

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), DispatcherError> {
    let client = tokio::select! {
        client = flotilla_nats::connect(&config.nats_url, "dispatcher", &config.nats) => client?,
        // NATS may never come up: a stop request must still stop us.
        () = shutdown.cancelled() => return Ok(()),
    };
    let topology = Topology::ensure(client.clone(), config.topology.clone()).await?;

    let workers = CancellationToken::new();
    let catalog = LiveCatalog::start(
        &topology.js,
        &config.engines_dir,
        &config.profiles_dir,
        workers.clone(),
    )
    .await?;
    let metrics = Arc::new(metrics::DispatcherMetrics::default());
    let (leading_tx, leading) = tokio::sync::watch::channel(false);
    let http_state = HttpState {
        client: client.clone(),
        metrics: metrics.clone(),
        leading: leading.clone(),
    };
    let election = tokio::spawn(lifecycle::elect(
        topology.clone(),
        workers.clone(),
        leading_tx,
    ));
    let lifecycle = Arc::new(lifecycle::Lifecycle {
        client: client.clone(),
        topology: topology.clone(),
        config: config.lifecycle.clone(),
        jobs: Default::default(),
        metrics: metrics.clone(),
        webhooks: webhooks::Webhooks::new(topology.clone(), config.webhooks.clone())
            .map_err(DispatcherError::Http)?,
    });
    tokio::spawn(lifecycle.run(leading.clone(), workers.clone()));
    let dead_letters = tokio::spawn(lifecycle::dead_letters(
        client.clone(),
        topology.clone(),
        metrics.clone(),
        workers.clone(),
    ));
    let intake = Arc::new(intake::Intake {
        topology,
        catalog,
        limits: config.limits.clone(),
        metrics,
    });
    tokio::spawn(schedules::Scheduler::new(intake.clone()).run(leading.clone(), workers.clone()));
    let intake_task = tokio::spawn(intake::run(intake, workers.clone()));

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| DispatcherError::Listen {
            addr: config.listen,
            source,
        })?;
    tracing::info!(listen = %config.listen, "dispatcher ready");
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(render_metrics))
        .with_state(http_state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(DispatcherError::Serve)?;

    workers.cancel();
    let _ = intake_task.await;
    let _ = election.await;
    if let Ok(Err(e)) = dead_letters.await {
        tracing::warn!(error = %e, "dead-letter handler had failed");
    }
    let _ = client.flush().await;
    tracing::info!("dispatcher stopped");
    Ok(())
}

async fn render_metrics(State(state): State<HttpState>) -> Response {
    let leading = *state.leading.borrow();
    let mut response = state.metrics.render(leading).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(prometheus_client::encoding::prometheus_text::CONTENT_TYPE),
    );
    response
}

async fn health(State(state): State<HttpState>) -> (StatusCode, Json<serde_json::Value>) {
    let connected = state.client.connection_state() == async_nats::connection::State::Connected;
    let status = if connected {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if connected { "ok" } else { "degraded" },
        "checks": { "nats": if connected { "ok" } else { "unavailable" } },
    });
    (status, Json(body))
}
