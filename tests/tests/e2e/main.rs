//! End-to-end tests: real nats-server, real Docker, the real service binaries as processes.
//! One test binary (modules below) so the suite links once.

mod agent;
mod api;
mod chaos;
mod cli;
mod cluster;
mod compose;
mod config;
mod direct;
mod engines;
mod fleet;
mod fuzz;
mod hooks;
mod jobs;
mod llm;
mod logs;
mod nats_auth;
mod observability;
mod openapi;
mod outage;
mod reliability;
mod routing;
mod schedules;
mod security;
mod ui;
mod webhooks;
mod workspace;

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use flotilla_proto::{Encoding, LogChunk, names};
use flotilla_testkit::Fleet;
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

/// `POST /jobs` that must be accepted; returns the job id.
pub async fn submit(fleet: &Fleet, body: Value) -> String {
    let response = fleet
        .request(Method::POST, "/jobs")
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, 202, "submit {body} -> {text}\n{}", fleet.logs());
    let value: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(value["status"], "pending");
    value["job_id"].as_str().unwrap().to_owned()
}

/// A page or asset served to browsers (dashboard, API reference): 200 with `content_type`, a
/// strict CSP without inline code, no sniffing or framing, a request id, and a body.
pub async fn assert_locked_down_asset(response: reqwest::Response, path: &str, content_type: &str) {
    assert_eq!(response.status(), 200, "{path}");
    let headers = response.headers();
    assert_eq!(headers["content-type"], content_type, "{path}");
    let csp = headers["content-security-policy"].to_str().unwrap();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{path}: {csp}");
    }
    assert!(!csp.contains("unsafe"), "{path}: {csp}");
    assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
    assert_eq!(headers["x-frame-options"], "DENY", "{path}");
    assert!(headers.contains_key("x-request-id"), "{path}");
    assert!(!response.text().await.unwrap().is_empty(), "{path}");
}

/// A shell job with sensible test defaults.
pub fn shell(script: &str) -> Value {
    json!({ "agent_id": "e2e", "engine": "shell", "prompt": script })
}

/// `GET /jobs/{id}/wait` until terminal.
pub async fn wait(fleet: &Fleet, job_id: &str) -> Value {
    let response = fleet
        .request(Method::GET, &format!("/jobs/{job_id}/wait?timeout=60"))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, 200, "wait {job_id} -> {text}\n{}", fleet.logs());
    serde_json::from_str(&text).unwrap()
}

/// `GET /jobs` (first page, default filters).
pub async fn list_jobs(fleet: &Fleet) -> Value {
    fleet
        .request(Method::GET, "/jobs")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

pub async fn get_job(fleet: &Fleet, job_id: &str) -> (u16, Value) {
    let response = fleet
        .request(Method::GET, &format!("/jobs/{job_id}"))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Polls until `GET /jobs/{id}` knows a job published straight to NATS: the dispatcher writes
/// its record asynchronously, and until then the job is a 404.
pub async fn until_visible(fleet: &Fleet, job_id: &str) {
    flotilla_testkit::wait_until(
        std::time::Duration::from_secs(10),
        "the direct submission's record",
        || async { (get_job(fleet, job_id).await.0 == 200).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {job_id}\n{}", fleet.logs()));
}

pub async fn js_context(fleet: &Fleet) -> jetstream::Context {
    let client = fleet.nats.client().await.unwrap();
    jetstream::new(client)
}

/// Replays a job's log stream from the start, in order, until the end marker of an attempt.
pub struct LogReader {
    messages: consumer::pull::Ordered,
}

impl LogReader {
    pub async fn open(js: &jetstream::Context, job_id: &str) -> Self {
        let stream = js.get_stream(names::STREAM_LOGS).await.unwrap();
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: names::log_subject(job_id),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .unwrap();
        Self {
            messages: consumer.messages().await.unwrap(),
        }
    }

    pub async fn next(&mut self) -> LogChunk {
        let message = tokio::time::timeout(Duration::from_secs(30), self.messages.next())
            .await
            .expect("a log chunk within 30 s")
            .expect("log stream open")
            .expect("log message");
        flotilla_proto::decode(&message.payload, Encoding::MessagePack).unwrap()
    }

    /// Every chunk up to and including the end marker.
    pub async fn until_end(&mut self) -> Vec<LogChunk> {
        let mut chunks = Vec::new();
        loop {
            let chunk = self.next().await;
            let end = chunk.end.is_some();
            chunks.push(chunk);
            if end {
                return chunks;
            }
        }
    }
}

/// Concatenated stdout of some chunks.
pub fn stdout_of(chunks: &[LogChunk]) -> String {
    chunks
        .iter()
        .filter(|c| c.stream == flotilla_proto::LogStream::Stdout)
        .map(|c| String::from_utf8_lossy(&c.data).into_owned())
        .collect()
}
