//! What the local llm-gateway can serve: the providers it holds a credential for, read from its
//! `/health` every few seconds and reported in the heartbeat, so `GET /engines` can say whether
//! an engine that needs an LLM can really run.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::http::Request;
use http_body_util::BodyExt as _;
use tokio_util::sync::CancellationToken;

const PERIOD: Duration = Duration::from_secs(5);
const TIMEOUT: Duration = Duration::from_secs(2);

/// Keeps `providers` current until `stop`; an unreachable gateway serves no provider.
pub(crate) async fn watch(
    url: String,
    providers: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
) {
    let client = match flotilla_http::client(TIMEOUT) {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "cannot build an HTTP client to ask the llm-gateway");
            return;
        }
    };
    let health = format!("{url}/health");
    let mut ticker = tokio::time::interval(PERIOD);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let found = match tokio::time::timeout(TIMEOUT, fetch(&client, &health)).await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "llm-gateway health unavailable");
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        *providers.lock().expect("llm providers") = found;
    }
}

/// The providers the gateway's `GET /health` marks `credential: true`.
async fn fetch(
    client: &flotilla_http::Client,
    url: &str,
) -> Result<Vec<String>, Box<dyn std::error::Error + Send + Sync>> {
    let request = Request::get(url).body(flotilla_http::Full::default())?;
    let response = client.request(request).await?;
    if !response.status().is_success() {
        return Ok(Vec::new());
    }
    let body = response.into_body().collect().await?.to_bytes();
    Ok(credentialed(&serde_json::from_slice(&body)?))
}

/// The providers marked `credential: true` in a `/health` body.
fn credentialed(health: &serde_json::Value) -> Vec<String> {
    health["providers"]
        .as_object()
        .map(|providers| {
            providers
                .iter()
                .filter(|(_, p)| p["credential"] == true)
                .map(|(name, _)| name.clone())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_providers_with_a_credential() {
        let health = serde_json::json!({"status": "ok", "providers": {
            "anthropic": {"credential": true}, "openai": {"credential": false}}});
        assert_eq!(credentialed(&health), vec!["anthropic".to_owned()]);
        assert!(credentialed(&serde_json::json!({})).is_empty());
    }
}
