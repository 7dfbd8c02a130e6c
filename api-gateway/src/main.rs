use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Flotilla api-gateway: the HTTP API for submitting and following jobs.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[arg(long, env = "FLOTILLA_LISTEN", default_value = "127.0.0.1:8420")]
    listen: SocketAddr,
    #[arg(
        long,
        env = "FLOTILLA_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    #[command(flatten)]
    nats: flotilla_nats::NatsArgs,
    /// Listen beyond loopback even without an API key.
    #[arg(long, env = "FLOTILLA_ALLOW_UNAUTHENTICATED_PUBLIC")]
    allow_unauthenticated_public: bool,
    /// Request body cap, in bytes.
    #[arg(long, env = "FLOTILLA_MAX_BODY_BYTES", default_value_t = 8 << 20)]
    max_body_bytes: usize,
    #[arg(long, env = "FLOTILLA_ENGINES_DIR", default_value = "engines")]
    engines_dir: PathBuf,
    #[arg(long, env = "FLOTILLA_PROFILES_DIR", default_value = "profiles")]
    profiles_dir: PathBuf,
    #[command(flatten)]
    limits: flotilla_catalog::LimitsArgs,
    #[command(flatten)]
    topology: flotilla_nats::TopologyArgs,
    #[command(flatten)]
    telemetry: flotilla_telemetry::TelemetryArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let telemetry = args.telemetry.clone();
    flotilla_service::main("api-gateway", telemetry, || config(args), run).await
}

async fn run(config: api_gateway::Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = flotilla_service::bind(config.listen).await?;
    api_gateway::run(config, listener, shutdown).await?;
    Ok(())
}

fn config(args: Args) -> anyhow::Result<api_gateway::Config> {
    let config = api_gateway::Config {
        listen: args.listen,
        nats_url: args.nats_url,
        nats: args.nats.into_options()?,
        // Only from the environment: a key on the command line would show in `ps`.
        api_key: std::env::var("FLOTILLA_API_KEY").ok(),
        admin_api_key: std::env::var("FLOTILLA_ADMIN_API_KEY").ok(),
        allow_unauthenticated_public: args.allow_unauthenticated_public,
        max_body_bytes: args.max_body_bytes,
        engines_dir: args.engines_dir,
        profiles_dir: args.profiles_dir,
        limits: args.limits.into_limits().map_err(anyhow::Error::msg)?,
        topology: args.topology.into_config(),
    };
    Ok(config.validate()?)
}
