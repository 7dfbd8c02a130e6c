//! The api-gateway: Flotilla's HTTP front. It validates jobs, records them in KV, queues them on
//! JetStream, and answers reads from KV and an in-memory index fed by a KV watch.

mod config;
mod configs;
mod error;
mod events;
mod index;
mod jobs;
mod logs;
mod metrics;
mod middleware;
mod openapi;
mod ops;
mod schedules;
mod ui;

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
    http_metrics: metrics::HttpMetrics,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot load engines/profiles: {0}")]
    Config(#[from] flotilla_config::ConfigError),
    #[error(transparent)]
    Connect(#[from] flotilla_nats::ConnectError),
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

/// Every `(method, path)` that [`router`] serves. Keep the two in step: a test checks that the
/// OpenAPI document (`openapi::ApiDoc`) has exactly these operations, and an end-to-end test
/// that the gateway routes every operation of the document.
#[cfg(test)]
pub(crate) const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/engines"),
    ("GET", "/profiles"),
    ("GET", "/nodes"),
    ("GET", "/configs"),
    ("GET", "/configs/{type}/{name}"),
    ("PUT", "/configs/{type}/{name}"),
    ("DELETE", "/configs/{type}/{name}"),
    ("POST", "/jobs"),
    ("GET", "/jobs"),
    ("GET", "/jobs/events"),
    ("GET", "/jobs/{job_id}"),
    ("DELETE", "/jobs/{job_id}"),
    ("GET", "/jobs/{job_id}/wait"),
    ("GET", "/jobs/{job_id}/logs"),
    ("POST", "/schedules"),
    ("GET", "/schedules"),
    ("GET", "/schedules/{schedule_id}"),
    ("PATCH", "/schedules/{schedule_id}"),
    ("DELETE", "/schedules/{schedule_id}"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/"),
    ("GET", "/docs/docs.js"),
    ("GET", "/docs/docs.css"),
    ("GET", "/ui"),
    ("GET", "/ui/"),
    ("GET", "/ui/app.js"),
    ("GET", "/ui/app.css"),
];

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
            "/configs/{type}/{name}",
            get(configs::get).put(configs::put).delete(configs::delete),
        )
        .route("/jobs", post(jobs::create).get(jobs::list))
        .route("/jobs/events", get(events::stream))
        .route("/jobs/{job_id}", get(jobs::get).delete(jobs::cancel))
        .route("/jobs/{job_id}/wait", get(jobs::wait))
        .route("/jobs/{job_id}/logs", get(logs::stream))
        .route("/schedules", post(schedules::create).get(schedules::list))
        .route(
            "/schedules/{schedule_id}",
            get(schedules::get)
                .patch(schedules::update)
                .delete(schedules::delete),
        )
        .route("/openapi.json", get(openapi::spec))
        .route("/docs", get(openapi::docs_page))
        .route("/docs/", get(openapi::docs_page_dir))
        .route("/docs/docs.js", get(openapi::docs_script))
        .route("/docs/docs.css", get(openapi::docs_style))
        .route("/ui", get(ui::index))
        .route("/ui/", get(ui::index_dir))
        .route("/ui/app.js", get(ui::script))
        .route("/ui/app.css", get(ui::style))
        .fallback(ops::not_found)
        // The body cap is enforced by the handler, which answers 413 in the error envelope.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::auth,
        ))
        .layer(axum::middleware::from_fn(middleware::headers))
        // Outermost: the request's span and metrics cover auth failures and every header.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::observe,
        ))
        .with_state(state)
}

/// Serves the API until `shutdown`, then finishes in-flight requests and returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), GatewayError> {
    let client = tokio::select! {
        client = flotilla_nats::connect(&config.nats_url, "api-gateway", &config.nats) => client?,
        // NATS may never come up: a stop request must still stop us.
        () = shutdown.cancelled() => return Ok(()),
    };
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
        http_metrics: metrics::HttpMetrics::default(),
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| GatewayError::Listen {
            addr: listen,
            source,
        })?;
    tracing::info!(url = %format!("http://{listen}"), "api-gateway listening");
    // No Nagle: live log events are small writes that must not wait for a delayed ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(GatewayError::Serve)?;
    background.cancel();
    let _ = client.flush().await;
    tracing::info!("api-gateway stopped");
    Ok(())
}
