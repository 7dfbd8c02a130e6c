//! Catalogue and operations routes: health, engines, profiles, nodes.

use std::{collections::BTreeMap, sync::Arc};

use axum::{Json, extract::State, http::StatusCode, response::Redirect};
use chrono::Utc;
use flotilla_proto::NodeInfo;
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use crate::{
    AppState,
    error::ApiError,
    responses::{Internal, Keyless, Unauthorized, Unavailable},
};

// Response bodies. Fields are in alphabetical order so that the JSON keys come out in the
// order they had when these were built with `json!`. The types that only describe JSON built
// with `json!` (a struct would change the order of the keys of the records inside) are not
// constructed, hence their `allow(dead_code)`.

/// `GET /health`'s body.
#[derive(Serialize, ToSchema)]
pub struct Health {
    checks: HealthChecks,
    status: HealthStatus,
}

#[derive(Serialize, ToSchema)]
pub struct HealthChecks {
    /// The job store (KV bucket `flotilla_jobs`) answers; Parpaing's name for its database.
    db: HealthCheck,
    /// A JetStream account query.
    jetstream: HealthCheck,
    /// The gateway's NATS connection.
    nats: HealthCheck,
    /// `<n> live` (agent-nodes with a fresh heartbeat), or `unknown` when JetStream is down.
    #[schema(example = "2 live")]
    nodes: String,
    /// `<n> warm` (idle warm containers over the live nodes), or `unknown`.
    #[schema(example = "8 warm")]
    pool: String,
}

/// `degraded` when NATS, JetStream or the job store is down. No live node, or no warm container, is not.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Ok,
    Degraded,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheck {
    Ok,
    Unavailable,
}

/// `GET /engines`'s body, sorted by id.
#[derive(Serialize, ToSchema)]
pub struct EngineList {
    engines: Vec<EngineSummary>,
}

#[derive(Serialize, ToSchema)]
pub struct EngineSummary {
    /// True when some live agent-node can run the engine: it lists it and, for an engine that
    /// calls an LLM, its llm-gateway holds a credential for one of the engine's providers.
    available: bool,
    description: String,
    /// What `engine` names in `POST /jobs`.
    id: String,
    name: String,
}

/// `GET /profiles`'s body, sorted by name.
// The items are `flotilla_catalog::Profile::summary`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ProfileList {
    profiles: Vec<ProfileSummary>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ProfileSummary {
    description: String,
    /// The engine the profile names, if any; a job must name one when it does not.
    #[schema(required)]
    engine: Option<String>,
    #[schema(required)]
    model: Option<String>,
    /// What `profile` names in `POST /jobs`.
    name: String,
    /// The prompt template's variables, to set in `prompt_vars`.
    prompt_vars: BTreeMap<String, PromptVar>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct PromptVar {
    /// Used when the job does not set the variable.
    #[schema(required)]
    default: Option<Value>,
    description: String,
    /// The only values allowed, if the list is set.
    #[schema(rename = "enum", required)]
    values: Option<Vec<Value>>,
    required: bool,
    #[schema(rename = "type")]
    var_type: PromptVarType,
}

/// A variable's type; `float` accepts integers too.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum PromptVarType {
    String,
    Integer,
    Float,
    Boolean,
}

/// `GET /nodes`'s body, sorted by node id.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct NodeList {
    nodes: Vec<NodeInfo>,
}

/// Every node whose heartbeat is still fresh.
pub async fn live_nodes(state: &AppState) -> Result<Vec<NodeInfo>, ApiError> {
    if !state.nodes.synced(NODES_LOAD).await {
        return Err(ApiError::unavailable("node heartbeats not loaded yet"));
    }
    Ok(state.nodes.live(Utc::now()))
}

/// How long a request waits for the gateway's first load of the node heartbeats.
const NODES_LOAD: std::time::Duration = std::time::Duration::from_secs(2);

/// `GET /health`: 200 when NATS, JetStream and the job store answer, 503 `degraded` otherwise.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    operation_id = "health",
    summary = "Health of the gateway and its dependencies",
    responses(
        (status = 200, description = "NATS and JetStream answer.", body = Health,
            example = json!({"checks": {"db": "ok", "jetstream": "ok", "nats": "ok", "nodes": "2 live", "pool": "8 warm"}, "status": "ok"})),
        (status = 503, description = "`degraded`: NATS, JetStream or the job store is down; \
            the failed check says `unavailable`.", body = Health,
            example = json!({"checks": {"db": "unavailable", "jetstream": "unavailable", "nats": "ok", "nodes": "unknown", "pool": "unknown"}, "status": "degraded"})),
    ),
)]
pub async fn health(State(state): State<Arc<AppState>>) -> (StatusCode, Json<Health>) {
    let nats_ok = state.client.connection_state() == async_nats::connection::State::Connected;
    let jetstream_ok = nats_ok && state.topology.js.query_account().await.is_ok();
    let db_ok = jetstream_ok && state.topology.jobs.ping().await.is_ok();
    let nodes = if jetstream_ok {
        live_nodes(&state).await.map_err(ApiError::log_dropped).ok()
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
    let ok = nats_ok && jetstream_ok && db_ok;
    let check = |ok: bool| {
        if ok {
            HealthCheck::Ok
        } else {
            HealthCheck::Unavailable
        }
    };
    let body = Health {
        checks: HealthChecks {
            db: check(db_ok),
            jetstream: check(jetstream_ok),
            nats: check(nats_ok),
            nodes: nodes_check,
            pool: pool_check,
        },
        status: if ok {
            HealthStatus::Ok
        } else {
            HealthStatus::Degraded
        },
    };
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

/// `GET /engines`: `available` is true when a live node can run the engine.
#[utoipa::path(
    get,
    path = "/engines",
    tag = "catalogue",
    operation_id = "list_engines",
    summary = "List engines",
    description = "The engines of the shared configuration. `available` is true when a live \
        agent-node lists the engine; whether its binary is in the node's worker image, or the \
        llm-gateway holds a key for it, is not checked.",
    responses(
        (status = 200, description = "Engines, sorted by id.", body = EngineList),
        (status = 401, response = Unauthorized),
        (status = 403, response = Keyless),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn engines(State(state): State<Arc<AppState>>) -> Result<Json<EngineList>, ApiError> {
    let nodes = live_nodes(&state).await?;
    let engines = state
        .catalog
        .current()
        .engines()
        .map(|engine| EngineSummary {
            available: nodes.iter().any(|node| can_run(node, engine)),
            description: engine.description.clone(),
            id: engine.id.clone(),
            name: engine.name.clone(),
        })
        .collect();
    Ok(Json(EngineList { engines }))
}

/// A live node lists the engine and, if the engine calls an LLM, the node's llm-gateway holds
/// a credential for one of its providers.
fn can_run(node: &NodeInfo, engine: &flotilla_catalog::Engine) -> bool {
    node.engines.contains(&engine.id)
        && engine.llm.as_ref().is_none_or(|llm| {
            node.llm_providers
                .as_ref()
                .is_some_and(|held| llm.providers.iter().any(|p| held.contains(p)))
        })
}

#[utoipa::path(
    get,
    path = "/profiles",
    tag = "catalogue",
    operation_id = "list_profiles",
    summary = "List profiles",
    description = "Profiles bundle an engine, a model, tools, limits and templates with typed \
        variables; a job names one in `profile`.",
    responses(
        (status = 200, description = "Profiles, sorted by name.", body = ProfileList),
        (status = 401, response = Unauthorized),
        (status = 403, response = Keyless),
    ),
    security(("api_key" = [])),
)]
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
#[utoipa::path(
    get,
    path = "/nodes",
    tag = "operations",
    operation_id = "list_nodes",
    summary = "List live agent-nodes",
    description = "Nodes whose heartbeat is fresh (`now - heartbeat_at < ttl_ms`), with their \
        slots and warm pools as of their last heartbeat.",
    responses(
        (status = 200, description = "Live nodes, sorted by id.", body = NodeList),
        (status = 401, response = Unauthorized),
        (status = 403, response = Keyless),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn nodes(
    State(state): State<Arc<AppState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let nodes = live_nodes(&state).await?;
    Ok(Json(json!({ "nodes": nodes })))
}

#[utoipa::path(
    get,
    path = "/",
    tag = "dashboard",
    operation_id = "root",
    summary = "Redirect to the dashboard",
    responses((status = 307, description = "To `/ui`.",
        headers(("Location" = String, description = "`/ui`")))),
)]
pub async fn root() -> Redirect {
    Redirect::temporary("/ui")
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("route")
}
