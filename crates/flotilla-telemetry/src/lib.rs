//! What every service binary does before calling its library's `run`: set up logging and turn
//! SIGTERM/SIGINT into a cancellation token.

use tokio_util::sync::CancellationToken;
use tracing_subscriber::{EnvFilter, fmt};

/// Logs to stderr, filtered by `RUST_LOG` (default `info`). `json` selects one JSON object
/// per line for log shippers.
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (tests that call it twice) is harmless, so the error is ignored.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
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
