//! What every service binary does before calling its library's `run`: set up logging and,
//! when an OTLP endpoint is configured, trace export; turn SIGTERM/SIGINT into a cancellation
//! token. [`propagation`] carries trace context across NATS and HTTP headers.

pub mod propagation;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::{
    EnvFilter, Layer as _, filter::LevelFilter, fmt, layer::SubscriberExt as _,
    util::SubscriberInitExt as _,
};

/// The telemetry flags every service takes (flatten into its clap `Args`).
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryArgs {
    /// Log as JSON lines.
    #[arg(long, env = "FLOTILLA_LOG_JSON")]
    pub log_json: bool,
    /// Base URL of an OTLP/HTTP collector (`http://host:4318`; plain HTTP only); spans go to
    /// `<url>/v1/traces`. Unset: no traces are exported.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

impl TelemetryArgs {
    pub fn into_config(self, service: &'static str) -> TelemetryConfig {
        TelemetryConfig {
            service,
            json: self.log_json,
            // An empty variable means unset, as the OpenTelemetry spec has it.
            otlp_endpoint: self.otlp_endpoint.filter(|url| !url.trim().is_empty()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// `service.name` of the exported spans.
    pub service: &'static str,
    /// One JSON object per log line, for log shippers.
    pub json: bool,
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot set up OTLP trace export to {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// Holds the trace pipeline; call [`Telemetry::shutdown`] before exiting so that the last
/// spans are exported.
#[must_use = "call shutdown() before exiting, or the last spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still buffered and stops the exporter.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The SDK's shutdown blocks on its export thread: keep it off the async workers.
        let result = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = result {
            tracing::warn!(error = %e, "trace export did not shut down cleanly");
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`). With an OTLP endpoint, spans at
/// info level and above are also exported (batched, on the SDK's own thread), whatever
/// `RUST_LOG` says. On error, logging is still set up, so the caller can report it.
pub fn init(config: TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = fmt::layer().with_writer(std::io::stderr);
    let logs = if config.json {
        logs.json().with_filter(filter).boxed()
    } else {
        logs.with_filter(filter).boxed()
    };
    let registry = tracing_subscriber::registry().with(logs);
    let Some(endpoint) = config.otlp_endpoint.clone() else {
        // A second init (tests that call it twice) is harmless, so the error is ignored.
        let _ = registry.try_init();
        return Ok(Telemetry { provider: None });
    };
    let provider = match tracer_provider(config.service, &endpoint) {
        Ok(provider) => provider,
        Err(source) => {
            let _ = registry.try_init();
            return Err(TelemetryError::Exporter { endpoint, source });
        }
    };
    let traces = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(config.service))
        .with_filter(LevelFilter::INFO);
    let _ = registry.with(traces).try_init();
    tracing::info!(%endpoint, "exporting traces over OTLP/HTTP");
    Ok(Telemetry {
        provider: Some(provider),
    })
}

fn tracer_provider(
    service: &'static str,
    endpoint: &str,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(traces_url(endpoint))
        .build()?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service).build())
        .build())
}

/// The OTLP/HTTP traces URL for a base endpoint, as `OTEL_EXPORTER_OTLP_ENDPOINT` defines it.
fn traces_url(endpoint: &str) -> String {
    format!("{}/v1/traces", endpoint.trim_end_matches('/'))
}

/// A token cancelled on the first SIGTERM or SIGINT. A second signal exits at once, so an
/// operator can always stop a stuck drain.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        cancel.cancel();
        wait_for_signal().await;
        tracing::warn!("second signal, exiting now");
        std::process::exit(130);
    });
    token
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process can still be killed; never resolve.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// The process exit status for a service's `run` result: success, or 1 after logging why.
pub fn exit_code<E: std::fmt::Display>(result: Result<(), E>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs a configuration error; exit status 64 (EX_USAGE) tells supervisors not to retry.
pub fn config_error(error: impl std::fmt::Display) -> std::process::ExitCode {
    tracing::error!("{error}");
    std::process::ExitCode::from(64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_url_appends_the_signal_path_once() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/"),
            "http://collector:4318/v1/traces"
        );
    }
}
