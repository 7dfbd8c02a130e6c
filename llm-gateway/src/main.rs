use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Flotilla llm-gateway: keeps LLM API keys out of job containers, meters and budgets jobs.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Job containers must reach this address: on a node's host, listen on the job network's
    /// gateway address (or 0.0.0.0) at the port the nodes are given.
    #[arg(
        long,
        env = "FLOTILLA_LLM_GATEWAY_LISTEN",
        default_value = "127.0.0.1:8421"
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
    /// Providers and prices (TOML); without it, deploy/llm-gateway.toml as built in.
    #[arg(long, env = "FLOTILLA_LLM_CONFIG")]
    config: Option<PathBuf>,
    /// Request body cap, in bytes.
    #[arg(long, env = "FLOTILLA_LLM_MAX_REQUEST_BYTES", default_value_t = 32 << 20)]
    max_request_bytes: usize,
    /// Seconds an upstream may take to start answering.
    #[arg(
        long,
        env = "FLOTILLA_LLM_UPSTREAM_TIMEOUT_SECS",
        default_value_t = 600
    )]
    upstream_timeout_secs: u64,
    /// Requests of one job at once (beyond: 429 with Retry-After).
    #[arg(long, env = "FLOTILLA_LLM_MAX_CONCURRENT_PER_JOB", default_value_t = 8)]
    max_concurrent_per_job: usize,
    /// Requests of all jobs at once (beyond: 503 with Retry-After). Each may hold a body of
    /// up to FLOTILLA_LLM_MAX_REQUEST_BYTES.
    #[arg(long, env = "FLOTILLA_LLM_MAX_CONCURRENT", default_value_t = 256)]
    max_concurrent: usize,
    /// Where the `openai` provider forwards instead of the config's `base_url`: any
    /// OpenAI-compatible server (vLLM, Ollama, llama.cpp's server), e.g. http://10.0.0.5:11434.
    #[arg(long, env = "FLOTILLA_LLM_OPENAI_BASE_URL")]
    openai_base_url: Option<String>,
    /// Serve /metrics here, and not on the address jobs reach.
    #[arg(long, env = "FLOTILLA_LLM_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    topology: flotilla_nats::TopologyArgs,
    #[command(flatten)]
    telemetry: flotilla_telemetry::TelemetryArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let telemetry = args.telemetry.clone();
    flotilla_service::main("llm-gateway", telemetry, || config(args), run).await
}

async fn run(config: llm_gateway::Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let jobs = flotilla_service::bind(config.listen).await?;
    let metrics = match config.metrics_listen {
        Some(addr) => Some(flotilla_service::bind(addr).await?),
        None => None,
    };
    let listeners = llm_gateway::Listeners { jobs, metrics };
    llm_gateway::run(config, listeners, shutdown).await?;
    Ok(())
}

fn config(args: Args) -> anyhow::Result<llm_gateway::Config> {
    let text = match &args.config {
        Some(path) => {
            std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => llm_gateway::DEFAULT_CONFIG.to_owned(),
    };
    // Credentials come from the variables and files the config names, read here only.
    let mut upstreams = llm_gateway::Upstreams::parse(&text, &llm_gateway::ProcessSecrets)?;
    if let Some(url) = args
        .openai_base_url
        .as_deref()
        .filter(|u| !u.trim().is_empty())
    {
        upstreams.override_base_url("openai", url.trim())?;
    }
    Ok(llm_gateway::Config {
        listen: args.listen,
        nats_url: args.nats_url,
        nats: args.nats.into_options()?,
        topology: args.topology.into_config(),
        providers: upstreams.providers,
        prices: upstreams.prices,
        max_request_bytes: args.max_request_bytes,
        upstream_timeout: Duration::from_secs(args.upstream_timeout_secs.max(1)),
        max_concurrent_per_job: args.max_concurrent_per_job.max(1),
        max_concurrent: args.max_concurrent.max(1),
        metrics_listen: args.metrics_listen,
        allowed_betas: upstreams.allowed_betas,
    })
}
