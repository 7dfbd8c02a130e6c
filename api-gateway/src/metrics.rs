//! `GET /metrics`: Prometheus text format, computed at scrape time from the job index, the
//! queue's stream and consumer, and the nodes' heartbeats. Labels are bounded (job status only).

use std::{fmt::Write as _, sync::Arc};

use axum::{
    extract::State,
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};
use flotilla_proto::names;

use crate::{AppState, ops::live_nodes};

pub async fn render(State(state): State<Arc<AppState>>) -> Response {
    let mut out = String::new();
    gauge(
        &mut out,
        "flotilla_jobs",
        "Jobs known to the gateway, by status.",
        None,
    );
    for (status, count) in state.index.counts() {
        let _ = writeln!(out, "flotilla_jobs{{status=\"{status}\"}} {count}");
    }

    if let Ok(mut stream) = state.topology.js.get_stream(names::STREAM_JOBS).await
        && let Ok(info) = stream.info().await
    {
        let depth = info.state.messages;
        gauge(
            &mut out,
            "flotilla_queue_depth",
            "Job messages in the work queue (waiting or held by a node).",
            Some(depth as f64),
        );
        let oldest = if depth == 0 {
            0.0
        } else {
            let now = time::OffsetDateTime::now_utc();
            (now - info.state.first_timestamp).as_seconds_f64().max(0.0)
        };
        gauge(
            &mut out,
            "flotilla_queue_oldest_age_seconds",
            "Age of the oldest message in the work queue.",
            Some(oldest),
        );
    }
    let mut consumer = state.topology.agents.clone();
    if let Ok(info) = consumer.info().await {
        gauge(
            &mut out,
            "flotilla_jobs_ack_pending",
            "Job messages handed to nodes and not yet acked.",
            Some(info.num_ack_pending as f64),
        );
        gauge(
            &mut out,
            "flotilla_jobs_redelivered",
            "Job messages currently redelivered at least once.",
            Some(info.num_redelivered as f64),
        );
        gauge(
            &mut out,
            "flotilla_jobs_waiting_for_a_node",
            "Job messages no node has taken yet.",
            Some(info.num_pending as f64),
        );
    }

    if let Ok(nodes) = live_nodes(&state).await {
        let sum = |f: fn(&flotilla_proto::NodeInfo) -> f64| nodes.iter().map(f).sum::<f64>();
        gauge(
            &mut out,
            "flotilla_nodes_live",
            "Agent-nodes with a fresh heartbeat.",
            Some(nodes.len() as f64),
        );
        gauge(
            &mut out,
            "flotilla_slots_total",
            "Job slots across live nodes.",
            Some(sum(|n| f64::from(n.slots_total))),
        );
        gauge(
            &mut out,
            "flotilla_slots_busy",
            "Busy job slots across live nodes.",
            Some(sum(|n| f64::from(n.slots_busy))),
        );
        gauge(
            &mut out,
            "flotilla_pool_warm",
            "Warm containers ready across live nodes.",
            Some(sum(|n| n.warm.values().map(|v| f64::from(*v)).sum())),
        );
        counter(
            &mut out,
            "flotilla_pool_hits_total",
            "Jobs that found a warm container (live nodes, since they started).",
            sum(|n| n.pool_hits as f64),
        );
        counter(
            &mut out,
            "flotilla_pool_misses_total",
            "Jobs that needed a cold start (live nodes, since they started).",
            sum(|n| n.pool_misses as f64),
        );
    }
    gauge(
        &mut out,
        "flotilla_config_version",
        "Revision of the shared configuration this gateway runs.",
        Some(state.catalog.version() as f64),
    );

    let mut response = out.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

fn gauge(out: &mut String, name: &str, help: &str, value: Option<f64>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    if let Some(value) = value {
        let _ = writeln!(out, "{name} {value}");
    }
}

fn counter(out: &mut String, name: &str, help: &str, value: f64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}
