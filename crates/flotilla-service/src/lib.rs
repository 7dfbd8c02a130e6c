//! The skeleton every service shares, so that each `main.rs` only parses its configuration
//! and each library's `run(config, listener, shutdown)` starts with what is its own.
//!
//! - [`main`]: telemetry, the configuration (validated once), the listener bound by the caller,
//!   signals, the exit status.
//! - [`Service::start`]: the NATS connection (waited for, unless a stop comes first) and the
//!   JetStream topology; [`Service::catalog`]: the live catalogue of engines and profiles.
//! - [`serve`]: an axum router on the caller's listener until the stop.

use std::{future::Future, net::SocketAddr, path::Path, process::ExitCode, sync::Arc};

use backon::{ExponentialBuilder, Retryable as _};
use flotilla_config::LiveCatalog;
use flotilla_nats::{NatsOptions, Topology, TopologyConfig};
use flotilla_telemetry::TelemetryArgs;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A service binary from start to exit status. `config` builds and validates the
/// configuration once telemetry is up (so its errors are logged like any other); a refused
/// configuration exits with status 64, which tells supervisors not to restart. `run` gets the
/// configuration and the stop signal (the first SIGTERM or SIGINT; a second exits at once).
pub async fn main<C, F>(
    name: &'static str,
    telemetry: TelemetryArgs,
    config: impl FnOnce() -> anyhow::Result<C>,
    run: impl FnOnce(C, CancellationToken) -> F,
) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    let telemetry = match flotilla_telemetry::init(telemetry.into_config(name)) {
        Ok(telemetry) => telemetry,
        Err(e) => return flotilla_telemetry::config_error(e),
    };
    let config = match config() {
        Ok(config) => config,
        Err(e) => return flotilla_telemetry::config_error(format!("{e:#}")),
    };
    let shutdown = flotilla_telemetry::shutdown_on_signals();
    let result = run(config, shutdown).await.map_err(|e| format!("{e:#}"));
    telemetry.shutdown().await;
    flotilla_telemetry::exit_code(result)
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds a service's listener; `main.rs` calls it so that tests can hand `run` a listener on
/// port 0 instead.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Connect(#[from] flotilla_nats::ConnectError),
    #[error(transparent)]
    Topology(#[from] flotilla_nats::TopologyError),
    #[error("cannot load engines/profiles: {0}")]
    Catalog(#[from] flotilla_config::ConfigError),
}

/// Where a service finds NATS.
#[derive(Debug, Clone)]
pub struct NatsConfig<'a> {
    /// The client name the server shows; its first word is the service, whose inbox prefix
    /// the client uses (`agent-node <node id>`).
    pub name: &'a str,
    pub url: &'a str,
    pub options: &'a NatsOptions,
    pub topology: &'a TopologyConfig,
}

/// A started service's connection to the system.
pub struct Service {
    pub client: async_nats::Client,
    pub topology: Topology,
    /// Cancelled by [`Service::stop`]: the service's background tasks watch it.
    pub background: CancellationToken,
}

impl Service {
    /// Connects to NATS and ensures the JetStream topology. `None` when `shutdown` came first:
    /// NATS may never come up, and a stop request must still stop the service.
    pub async fn start(
        nats: NatsConfig<'_>,
        shutdown: &CancellationToken,
    ) -> Result<Option<Self>, StartError> {
        let client = tokio::select! {
            client = flotilla_nats::connect(nats.url, nats.name, nats.options) => client?,
            () = shutdown.cancelled() => return Ok(None),
        };
        let ensure = || Topology::ensure(client.clone(), nats.topology.clone());
        let topology = ensure
            .retry(startup_backoff())
            .when(flotilla_nats::TopologyError::is_transient)
            .notify(|e, delay| tracing::warn!(error = %e, ?delay, "JetStream not ready, retrying"))
            .await?;
        Ok(Some(Self {
            client,
            topology,
            background: CancellationToken::new(),
        }))
    }

    /// The live catalogue: seeded from the directories when the shared bucket is empty, then
    /// kept current from the bucket until the service stops.
    pub async fn catalog(
        &self,
        engines_dir: &Path,
        profiles_dir: &Path,
    ) -> Result<Arc<LiveCatalog>, StartError> {
        let start = || {
            LiveCatalog::start(
                &self.topology.js,
                engines_dir,
                profiles_dir,
                self.background.clone(),
            )
        };
        let catalog = start
            .retry(startup_backoff())
            .when(|e| matches!(e, flotilla_config::ConfigError::Nats(_)))
            .notify(|e, delay| tracing::warn!(error = %e, ?delay, "configuration not readable yet, retrying"))
            .await?;
        Ok(catalog)
    }

    /// Checks the service's validation limits against the fleet's (see
    /// [`LiveCatalog::check_limits`]); `FLOTILLA_TOPOLOGY_UPDATE` makes them the fleet's.
    pub async fn check_limits(
        &self,
        catalog: &LiveCatalog,
        limits: &impl std::fmt::Debug,
    ) -> Result<(), StartError> {
        let update = self.topology.config.update;
        Ok(catalog.check_limits(&format!("{limits:?}"), update).await?)
    }

    /// Stops the background tasks and sends what is still buffered.
    pub async fn stop(&self) {
        self.background.cancel();
        let _ = self.client.flush().await;
    }
}

/// Serves `router` on `listener` until `shutdown`, without Nagle's delay: live log events and
/// streamed answers are small writes that must not wait for a delayed ACK (measured: +40 ms a
/// request in the llm-gateway).
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Retries at startup for what a moment fixes: a stream just created whose direct gets have
/// no responder yet, a cluster electing its leaders. About 15 s in all.
fn startup_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(std::time::Duration::from_millis(100))
        .with_max_delay(std::time::Duration::from_secs(2))
        .with_max_times(12)
}
