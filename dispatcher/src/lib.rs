//! The dispatcher: the fleet-wide lifecycle. It admits jobs published straight to NATS, and its
//! leader handles lost nodes, timeouts, retention, webhooks and schedules. Any number of
//! replicas may run: they share one durable consumer, so each submission is admitted once.

mod consume;
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
use flotilla_nats::TopologyConfig;
use flotilla_service::{NatsConfig, Service};
use serde_json::json;
use tokio::{net::TcpListener, task::JoinHandle};
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
    #[error(transparent)]
    Start(#[from] flotilla_service::StartError),
    #[error("health server failed: {0}")]
    Serve(std::io::Error),
    #[error("cannot set up the webhook HTTP client (TLS): {0}")]
    Http(std::io::Error),
}

impl Config {
    fn nats(&self) -> NatsConfig<'_> {
        NatsConfig {
            name: "dispatcher",
            url: &self.nats_url,
            options: &self.nats,
            topology: &self.topology,
        }
    }
}

/// What the HTTP endpoints read.
#[derive(Clone)]
struct HttpState {
    client: async_nats::Client,
    metrics: Arc<metrics::DispatcherMetrics>,
    lease: Arc<flotilla_nats::Lease>,
}

/// Runs the dispatcher until `shutdown`, serving health and metrics on `listener`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), DispatcherError> {
    let Some(service) = Service::start(config.nats(), &shutdown).await? else {
        return Ok(());
    };
    let catalog = service
        .catalog(&config.engines_dir, &config.profiles_dir)
        .await?;
    service.check_limits(&catalog, &config.limits).await?;
    let metrics = Arc::new(metrics::DispatcherMetrics::default());
    let lease = Arc::new(flotilla_nats::Lease::new(
        service.topology.dispatch.clone(),
        flotilla_proto::names::KEY_LEADER,
    ));
    let workers = Workers::start(&service, &config, catalog, metrics.clone(), lease.clone())?;
    let http_state = HttpState {
        client: service.client.clone(),
        metrics,
        lease,
    };
    tracing::info!(listen = ?listener.local_addr().ok(), "dispatcher ready");
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(render_metrics))
        .with_state(http_state);
    flotilla_service::serve(listener, app, shutdown)
        .await
        .map_err(DispatcherError::Serve)?;
    service.background.cancel();
    workers.join().await;
    service.stop().await;
    tracing::info!("dispatcher stopped");
    Ok(())
}

/// The dispatcher's tasks, which stop when the service's background token is cancelled.
struct Workers {
    intake: JoinHandle<()>,
    election: JoinHandle<()>,
    dead_letters: JoinHandle<()>,
}

impl Workers {
    fn start(
        service: &Service,
        config: &Config,
        catalog: Arc<LiveCatalog>,
        metrics: Arc<metrics::DispatcherMetrics>,
        lease: Arc<flotilla_nats::Lease>,
    ) -> Result<Self, DispatcherError> {
        let (client, topology, stop) = (&service.client, &service.topology, &service.background);
        let election = {
            let (lease, stop) = (lease.clone(), stop.clone());
            tokio::spawn(async move { lease.hold(stop).await })
        };
        let lifecycle = Arc::new(lifecycle::Lifecycle {
            client: client.clone(),
            topology: topology.clone(),
            config: config.lifecycle.clone(),
            jobs: Default::default(),
            metrics: metrics.clone(),
            webhooks: webhooks::Webhooks::new(
                topology.clone(),
                lease.clone(),
                config.webhooks.clone(),
            )
            .map_err(DispatcherError::Http)?,
            lease: lease.clone(),
            nodes: flotilla_nats::NodeDirectory::start(topology, stop.clone()),
        });
        tokio::spawn(lifecycle.run(stop.clone()));
        let dead_letters = tokio::spawn(lifecycle::dead_letters(
            topology.clone(),
            metrics.clone(),
            stop.clone(),
        ));
        let intake = Arc::new(intake::Intake {
            topology: topology.clone(),
            catalog,
            limits: config.limits.clone(),
            metrics,
        });
        tokio::spawn(schedules::Scheduler::new(intake.clone(), lease).run(stop.clone()));
        Ok(Self {
            intake: tokio::spawn(intake::run(intake, stop.clone())),
            election,
            dead_letters,
        })
    }

    async fn join(self) {
        let _ = self.intake.await;
        let _ = self.election.await;
        let _ = self.dead_letters.await;
    }
}

async fn render_metrics(State(state): State<HttpState>) -> Response {
    let leading = state.lease.is_leading();
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
