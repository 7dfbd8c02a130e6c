//! The llm-gateway sits between job containers and LLM APIs so that real keys never enter a
//! container. This first version only serves `/health`; the proxy, per-job credentials,
//! metering and budgets come with their own issue.

use std::net::SocketAddr;

use axum::{Json, Router, routing::get};
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum LlmGatewayError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("http server failed: {0}")]
    Serve(std::io::Error),
}

pub fn router() -> Router {
    Router::new().route(
        "/health",
        get(|| async { Json(json!({ "status": "ok", "checks": {} })) }),
    )
}

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), LlmGatewayError> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| LlmGatewayError::Listen {
            addr: config.listen,
            source,
        })?;
    tracing::info!(listen = %config.listen, "llm-gateway ready");
    axum::serve(listener, router())
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(LlmGatewayError::Serve)?;
    tracing::info!("llm-gateway stopped");
    Ok(())
}
