use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let args = agent_node::Args::parse();
    let telemetry = args.telemetry.clone();
    flotilla_service::main("agent-node", telemetry, || Ok(args.into_config()?), run).await
}

async fn run(config: agent_node::Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Bound first, so that a taken port fails the start instead of going unnoticed.
    let metrics = match config.metrics_listen {
        Some(addr) => Some(flotilla_service::bind(addr).await?),
        None => None,
    };
    agent_node::run(config, metrics, shutdown).await?;
    Ok(())
}
