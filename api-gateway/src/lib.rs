//! The api-gateway: Flotilla's HTTP front. It validates jobs, records them in KV, queues them on
//! JetStream, and answers reads from KV and an in-memory index fed by a KV watch.

mod config;
mod configs;
mod error;
mod index;
mod jobs;
mod logs;
mod metrics;
mod middleware;
mod ops;

use std::sync::Arc;

use axum::{
    Router,
    extract::DefaultBodyLimit,
    routing::{get, post},
};
use flotilla_config::LiveCatalog;
use flotilla_nats::Topology;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

pub use config::{Config, ConfigError};
pub use error::ApiError;

pub struct AppState {
    pub config: Config,
    pub client: async_nats::Client,
    pub topology: Topology,
    /// Engines and profiles, kept current from the shared configuration.
    pub catalog: Arc<LiveCatalog>,
    pub index: Arc<index::JobIndex>,
    api_key_digest: Option<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot load engines/profiles: {0}")]
    Config(#[from] flotilla_config::ConfigError),
    #[error("cannot connect to nats: {0}")]
    Connect(#[from] async_nats::ConnectError),
    #[error(transparent)]
    Topology(#[from] flotilla_nats::TopologyError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("http server failed: {0}")]
    Serve(std::io::Error),
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(ops::root))
        .route("/health", get(ops::health))
        .route("/metrics", get(metrics::render))
        .route("/engines", get(ops::engines))
        .route("/profiles", get(ops::profiles))
        .route("/nodes", get(ops::nodes))
        .route("/configs", get(configs::list))
        .route(
            "/configs/{kind}/{name}",
            get(configs::get).put(configs::put).delete(configs::delete),
        )
        .route("/jobs", post(jobs::create).get(jobs::list))
        .route("/jobs/{job_id}", get(jobs::get).delete(jobs::cancel))
        .route("/jobs/{job_id}/wait", get(jobs::wait))
        .route("/jobs/{job_id}/logs", get(logs::stream))
        .fallback(ops::not_found)
        // The body cap is enforced by the handler, which answers 413 in the error envelope.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::auth,
        ))
        .layer(axum::middleware::from_fn(middleware::headers))
        .with_state(state)
}

/// Serves the API until `shutdown`, then finishes in-flight requests and returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), GatewayError> {
    let client = flotilla_nats::connect(&config.nats_url, "api-gateway").await?;
    let topology = Topology::ensure(client.clone(), config.topology.clone()).await?;
    let index = Arc::new(index::JobIndex::default());
    let background = CancellationToken::new();
    let catalog = LiveCatalog::start(
        &topology.js,
        &config.engines_dir,
        &config.profiles_dir,
        background.clone(),
    )
    .await?;
    tokio::spawn(index::follow(
        index.clone(),
        topology.jobs.clone(),
        background.clone(),
    ));

    match &config.api_key {
        Some(_) => tracing::info!("API key required on every non-public path"),
        None => tracing::warn!(
            listen = %config.listen,
            "no API key configured: requests are not authenticated (loopback only)"
        ),
    }
    let api_key_digest = config
        .api_key
        .as_ref()
        .map(|key| Sha256::digest(key.as_bytes()).to_vec());
    let listen = config.listen;
    let state = Arc::new(AppState {
        config,
        client: client.clone(),
        topology,
        catalog,
        index,
        api_key_digest,
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| GatewayError::Listen {
            addr: listen,
            source,
        })?;
    tracing::info!(url = %format!("http://{listen}"), "api-gateway listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(GatewayError::Serve)?;
    background.cancel();
    let _ = client.flush().await;
    tracing::info!("api-gateway stopped");
    Ok(())
}
