//! The api-gateway: Flotilla's HTTP front. It validates jobs, records them in KV, queues them on
//! JetStream, and answers reads from KV and an in-memory index fed by a KV watch.

mod artifacts;
mod config;
mod configs;
mod error;
mod events;
mod extract;
mod followups;
mod groups;
mod images;
mod index;
mod jobs;
mod logs;
mod metrics;
mod middleware;
mod openapi;
mod ops;
mod responses;
mod schedules;
mod ui;

use std::sync::Arc;

use axum::{Extension, Router, extract::DefaultBodyLimit};
use flotilla_config::LiveCatalog;
use flotilla_nats::Topology;
use flotilla_service::{NatsConfig, Service};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi as _;
use utoipa_axum::{router::OpenApiRouter, routes};

pub use config::{Config, ConfigError};
pub use error::ApiError;

pub struct AppState {
    pub config: Config,
    pub client: async_nats::Client,
    pub topology: Topology,
    /// Engines and profiles, kept current from the shared configuration.
    pub catalog: Arc<LiveCatalog>,
    pub index: Arc<index::JobIndex>,
    /// Every node's last heartbeat, from one watch.
    pub nodes: Arc<flotilla_nats::NodeDirectory>,
    /// The configured keys' digests; `None` without an API key.
    keys: Option<middleware::KeyDigests>,
    http_metrics: metrics::HttpMetrics,
    /// Held by the one gateway replica that exports the fleet-wide metrics.
    fleet_metrics: Arc<flotilla_nats::Lease>,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Start(#[from] flotilla_service::StartError),
    #[error("http server failed: {0}")]
    Serve(std::io::Error),
}

/// Every `(method, path)` that [`router`] serves. Keep the two in step: a test checks that the
/// OpenAPI document (built by [`api_routes`]) has exactly these operations, and an end-to-end
/// test that the gateway routes every operation of the document.
#[cfg(test)]
pub(crate) const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/engines"),
    ("GET", "/profiles"),
    ("GET", "/nodes"),
    ("POST", "/images/prefetch"),
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
    ("POST", "/jobs/{job_id}/continue"),
    ("GET", "/jobs/{job_id}/diff"),
    ("GET", "/jobs/{job_id}/artifacts"),
    ("GET", "/jobs/{job_id}/artifacts/{path}"),
    ("GET", "/jobs/{job_id}/artifacts.zip"),
    ("POST", "/groups"),
    ("GET", "/groups/{group_id}"),
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

/// Every route with its OpenAPI operation: `routes!` registers a handler's route and its
/// `#[utoipa::path]` documentation together, so neither exists without the other. Handlers of
/// one path share a `routes!`. The document's frame (info, tags, shared components) is
/// `openapi::ApiDoc`; the SSE event schemas come from the modules that send them. Rules the
/// derived schemas cannot state are written in last.
pub(crate) fn api_routes() -> OpenApiRouter<Arc<AppState>> {
    let mut frame = openapi::ApiDoc::openapi();
    frame.merge(logs::EventSchemas::openapi());
    frame.merge(events::EventSchemas::openapi());
    let mut router = OpenApiRouter::with_openapi(frame)
        .routes(routes!(ops::root))
        .routes(routes!(ops::health))
        .routes(routes!(metrics::render))
        .routes(routes!(ops::engines))
        .routes(routes!(ops::profiles))
        .routes(routes!(ops::nodes))
        .routes(routes!(images::prefetch))
        .routes(routes!(configs::list))
        .routes(routes!(configs::get, configs::put, configs::delete))
        .routes(routes!(jobs::create, jobs::list))
        .routes(routes!(events::stream))
        .routes(routes!(jobs::get, jobs::cancel))
        .routes(routes!(jobs::wait))
        .routes(routes!(logs::stream))
        .routes(routes!(followups::continue_job))
        .routes(routes!(groups::create))
        .routes(routes!(groups::get))
        .routes(routes!(artifacts::diff))
        .routes(routes!(artifacts::list))
        .routes(routes!(artifacts::get))
        .routes(routes!(artifacts::zip))
        .routes(routes!(schedules::create, schedules::list))
        .routes(routes!(
            schedules::get,
            schedules::update,
            schedules::delete
        ))
        .routes(routes!(openapi::spec))
        .routes(routes!(openapi::docs_page))
        .routes(routes!(openapi::docs_page_dir))
        .routes(routes!(openapi::docs_script))
        .routes(routes!(openapi::docs_style))
        .routes(routes!(ui::index))
        .routes(routes!(ui::index_dir))
        .routes(routes!(ui::script))
        .routes(routes!(ui::style));
    schedules::document_timing_choice(router.get_openapi_mut());
    artifacts::document_wildcard(router.get_openapi_mut());
    router
}

pub fn router(state: Arc<AppState>) -> Router {
    let (routes, api) = api_routes().split_for_parts();
    routes
        .fallback(ops::not_found)
        // `GET /openapi.json` answers the document built from the routes above.
        .layer(Extension(openapi::Document::new(&api)))
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

fn log_auth(config: &Config) {
    match (&config.api_key, &config.admin_api_key) {
        (Some(_), Some(_)) => tracing::info!(
            "API key required on every non-public path; the admin key to change the configuration"
        ),
        (Some(_), None) => tracing::info!("API key required on every non-public path"),
        (None, _) => tracing::warn!(
            listen = %config.listen,
            "no API key configured: requests are not authenticated (loopback only)"
        ),
    }
}

/// Serves the API on `listener` until `shutdown`, then finishes in-flight requests and
/// returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let nats = NatsConfig {
        name: "api-gateway",
        url: &config.nats_url,
        options: &config.nats,
        topology: &config.topology,
    };
    let Some(service) = Service::start(nats, &shutdown).await? else {
        return Ok(());
    };
    let catalog = service
        .catalog(&config.engines_dir, &config.profiles_dir)
        .await?;
    service.check_limits(&catalog, &config.limits).await?;
    let index = Arc::new(index::JobIndex::default());
    tokio::spawn(index::follow(
        index.clone(),
        service.topology.jobs.clone(),
        service.background.clone(),
    ));
    log_auth(&config);
    let keys = middleware::KeyDigests::of(&config);
    let fleet_metrics = Arc::new(flotilla_nats::Lease::new(
        service.topology.dispatch.clone(),
        flotilla_proto::names::KEY_FLEET_METRICS,
    ));
    tokio::spawn({
        let (lease, stop) = (fleet_metrics.clone(), service.background.clone());
        async move { lease.hold(stop).await }
    });
    let state = Arc::new(AppState {
        config,
        client: service.client.clone(),
        topology: service.topology.clone(),
        catalog,
        index,
        nodes: flotilla_nats::NodeDirectory::start(&service.topology, service.background.clone()),
        keys,
        http_metrics: metrics::HttpMetrics::default(),
        fleet_metrics,
    });
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(url = %format!("http://{addr}"), "api-gateway listening");
    }
    flotilla_service::serve(listener, router(state), shutdown)
        .await
        .map_err(GatewayError::Serve)?;
    service.stop().await;
    tracing::info!("api-gateway stopped");
    Ok(())
}
