use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::Parser;

/// Flotilla dispatcher: admits jobs published straight to NATS and runs the fleet-wide lifecycle.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address of the health endpoint.
    #[arg(
        long,
        env = "FLOTILLA_DISPATCHER_LISTEN",
        default_value = "127.0.0.1:8422"
    )]
    listen: SocketAddr,
    #[arg(
        long,
        env = "FLOTILLA_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    #[arg(long, env = "FLOTILLA_ENGINES_DIR", default_value = "engines")]
    engines_dir: PathBuf,
    #[arg(long, env = "FLOTILLA_PROFILES_DIR", default_value = "profiles")]
    profiles_dir: PathBuf,
    #[command(flatten)]
    limits: flotilla_catalog::LimitsArgs,
    #[arg(long, env = "FLOTILLA_LOG_JSON")]
    log_json: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    flotilla_telemetry::init(args.log_json);
    let limits = match args.limits.into_limits() {
        Ok(limits) => limits,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(64);
        }
    };
    let config = dispatcher::Config {
        listen: args.listen,
        nats_url: args.nats_url,
        engines_dir: args.engines_dir,
        profiles_dir: args.profiles_dir,
        limits,
        topology: flotilla_nats::TopologyConfig::default(),
    };
    let shutdown = flotilla_telemetry::shutdown_on_signals();
    match dispatcher::run(config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
