//! Catalogue and operations routes: health, engines, profiles, nodes.

use std::sync::Arc;

use axum::{Json, extract::State, http::StatusCode, response::Redirect};
use chrono::Utc;
use flotilla_proto::{Encoding, NodeInfo};
use futures::TryStreamExt;
use serde_json::json;

use crate::{AppState, error::ApiError};

/// Every node whose heartbeat is still fresh.
pub async fn live_nodes(state: &AppState) -> Result<Vec<NodeInfo>, ApiError> {
    let keys: Vec<String> = state
        .topology
        .nodes
        .keys()
        .await
        .map_err(ApiError::unavailable)?
        .try_collect()
        .await
        .map_err(ApiError::unavailable)?;
    let now = Utc::now();
    let mut nodes = Vec::with_capacity(keys.len());
    for key in keys {
        let Ok(Some(value)) = state.topology.nodes.get(&key).await else {
            continue;
        };
        match flotilla_proto::decode::<NodeInfo>(&value, Encoding::MessagePack) {
            Ok(node) if node.is_live(now) => nodes.push(node),
            Ok(_) => {}
            Err(e) => tracing::warn!(key, error = %e, "undecodable node heartbeat"),
        }
    }
    nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    Ok(nodes)
}

/// `GET /health`: 200 when NATS and JetStream answer, 503 `degraded` otherwise.
pub async fn health(State(state): State<Arc<AppState>>) -> (StatusCode, Json<serde_json::Value>) {
    let nats_ok = state.client.connection_state() == async_nats::connection::State::Connected;
    let jetstream_ok = nats_ok && state.topology.js.query_account().await.is_ok();
    let nodes = if jetstream_ok {
        live_nodes(&state).await.ok()
    } else {
        None
    };
    let (nodes_check, pool_check) = match &nodes {
        Some(nodes) => {
            let warm: u32 = nodes.iter().flat_map(|n| n.warm.values()).sum();
            (format!("{} live", nodes.len()), format!("{warm} warm"))
        }
        None => ("unknown".to_owned(), "unknown".to_owned()),
    };
    let ok = nats_ok && jetstream_ok;
    let body = json!({
        "status": if ok { "ok" } else { "degraded" },
        "checks": {
            "nats": if nats_ok { "ok" } else { "unavailable" },
            "jetstream": if jetstream_ok { "ok" } else { "unavailable" },
            "nodes": nodes_check,
            "pool": pool_check,
        },
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

/// `GET /engines`: `available` is true when a live node can run the engine.
pub async fn engines(
    State(state): State<Arc<AppState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let nodes = live_nodes(&state).await?;
    let engines: Vec<_> = state
        .catalog
        .current()
        .engines()
        .map(|engine| {
            let available = nodes.iter().any(|node| node.engines.contains(&engine.id));
            json!({
                "id": engine.id,
                "name": engine.name,
                "description": engine.description,
                "available": available,
            })
        })
        .collect();
    Ok(Json(json!({ "engines": engines })))
}

pub async fn profiles(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let profiles: Vec<_> = state
        .catalog
        .current()
        .profiles()
        .map(|profile| profile.summary())
        .collect();
    Json(json!({ "profiles": profiles }))
}

/// `GET /nodes` (ext).
pub async fn nodes(
    State(state): State<Arc<AppState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let nodes = live_nodes(&state).await?;
    Ok(Json(json!({ "nodes": nodes })))
}

pub async fn root() -> Redirect {
    Redirect::temporary("/ui")
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("route")
}
