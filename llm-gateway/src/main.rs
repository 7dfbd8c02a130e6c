use std::{net::SocketAddr, process::ExitCode};

use clap::Parser;

/// Flotilla llm-gateway: keeps LLM API keys out of job containers.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[arg(
        long,
        env = "FLOTILLA_LLM_GATEWAY_LISTEN",
        default_value = "127.0.0.1:8421"
    )]
    listen: SocketAddr,
    #[arg(long, env = "FLOTILLA_LOG_JSON")]
    log_json: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    flotilla_telemetry::init(args.log_json);
    let shutdown = flotilla_telemetry::shutdown_on_signals();
    let config = llm_gateway::Config {
        listen: args.listen,
    };
    flotilla_telemetry::exit_code(llm_gateway::run(config, shutdown).await)
}
