use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Flotilla dispatcher: admits jobs published straight to NATS and runs the fleet-wide lifecycle.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address of the health and metrics endpoints.
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
    #[command(flatten)]
    nats: flotilla_nats::NatsArgs,
    #[arg(long, env = "FLOTILLA_ENGINES_DIR", default_value = "engines")]
    engines_dir: PathBuf,
    #[arg(long, env = "FLOTILLA_PROFILES_DIR", default_value = "profiles")]
    profiles_dir: PathBuf,
    #[command(flatten)]
    limits: flotilla_catalog::LimitsArgs,
    /// How often lost nodes are looked for, in milliseconds.
    #[arg(long, env = "FLOTILLA_NODE_CHECK_MS", default_value_t = 500)]
    node_check_ms: u64,
    /// How often queue timeouts and retention are enforced, in seconds.
    #[arg(long, env = "FLOTILLA_SWEEP_SECS", default_value_t = 10)]
    sweep_secs: u64,
    /// A job still queued after this many seconds fails.
    #[arg(long, env = "FLOTILLA_MAX_QUEUED_SECS", default_value_t = 86_400)]
    max_queued_secs: u64,
    /// Hours a finished job is kept (Parpaing's JOB_TTL_HOURS).
    #[arg(long, env = "FLOTILLA_JOB_TTL_HOURS", default_value_t = 24)]
    job_ttl_hours: u64,
    /// Finished jobs kept at most (Parpaing's MAX_RETAINED_JOBS).
    #[arg(long, env = "FLOTILLA_MAX_RETAINED_JOBS", default_value_t = 1000)]
    max_retained_jobs: usize,
    /// Seconds a webhook receiver may take to answer.
    #[arg(long, env = "FLOTILLA_WEBHOOK_TIMEOUT_SECS", default_value_t = 10)]
    webhook_timeout_secs: u64,
    #[command(flatten)]
    topology: flotilla_nats::TopologyArgs,
    #[command(flatten)]
    telemetry: flotilla_telemetry::TelemetryArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let telemetry = args.telemetry.clone();
    flotilla_service::main("dispatcher", telemetry, || config(args), run).await
}

async fn run(config: dispatcher::Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = flotilla_service::bind(config.listen).await?;
    dispatcher::run(config, listener, shutdown).await?;
    Ok(())
}

fn config(args: Args) -> anyhow::Result<dispatcher::Config> {
    let limits = args.limits.into_limits().map_err(anyhow::Error::msg)?;
    let lifecycle = dispatcher::LifecycleConfig {
        node_check_interval: Duration::from_millis(args.node_check_ms.max(50)),
        sweep_interval: Duration::from_secs(args.sweep_secs.max(1)),
        max_queued: Duration::from_secs(args.max_queued_secs),
        job_ttl: Duration::from_secs(args.job_ttl_hours * 3600),
        max_retained_jobs: args.max_retained_jobs,
    };
    let webhooks = dispatcher::WebhookConfig {
        // Only from the environment: a secret on the command line would show in `ps`.
        secret: std::env::var("FLOTILLA_WEBHOOK_SECRET")
            .ok()
            .filter(|s| !s.is_empty()),
        allow_private: limits.allow_private_webhooks,
        timeout: Duration::from_secs(args.webhook_timeout_secs.clamp(1, 60)),
    };
    Ok(dispatcher::Config {
        listen: args.listen,
        lifecycle,
        nats_url: args.nats_url,
        nats: args.nats.into_options()?,
        engines_dir: args.engines_dir,
        profiles_dir: args.profiles_dir,
        limits,
        topology: args.topology.into_config(),
        webhooks,
    })
}
