//! NATS plumbing shared by the services: connecting, creating the JetStream topology
//! idempotently, the job store (KV with compare-and-set) and queueing jobs.
//!
//! Names come from `flotilla_proto::names`; this crate only decides how they are configured.

mod grants;
mod store;
mod topology;

use std::time::Duration;

pub use grants::GrantStore;
pub use store::{JobStore, StoreError, Versioned, WatchEvent};
pub use topology::{LEADER_LEASE, Topology, TopologyArgs, TopologyConfig, TopologyError};

use async_nats::jetstream;
use bytes::Bytes;
use flotilla_proto::{JobRequest, names};

/// Connects with the settings every service wants: retry the first connect (NATS may start
/// after us), reconnect forever, and log connection changes.
pub async fn connect(
    url: &str,
    name: &str,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    let name_for_events = name.to_owned();
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            let service = name_for_events.clone();
            async move {
                match event {
                    async_nats::Event::Disconnected => {
                        tracing::warn!(%service, "nats disconnected")
                    }
                    async_nats::Event::Connected => tracing::info!(%service, "nats connected"),
                    other => tracing::debug!(%service, %other, "nats event"),
                }
            }
        })
        .connect(url)
        .await
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("cannot encode job: {0}")]
    Encode(#[from] flotilla_proto::CodecError),
    #[error("job queue refused the job: {0}")]
    Publish(#[from] jetstream::context::PublishError),
}

/// Puts a validated job on the run queue and waits until JetStream has stored it. Publishing the
/// same job twice within the dedupe window stores it once. `headers` travel with the message
/// (the submitter's trace context, possibly none); the job-id header is added here.
pub async fn enqueue(
    js: &jetstream::Context,
    request: &JobRequest,
    mut headers: async_nats::HeaderMap,
) -> Result<(), QueueError> {
    let payload: Bytes = flotilla_proto::encode(request)?;
    headers.insert(names::HEADER_JOB_ID, request.job_id.as_str());
    let message = jetstream::message::PublishMessage::build()
        .payload(payload)
        .headers(headers)
        .message_id(names::run_msg_id(&request.job_id));
    js.send_publish(names::SUBJECT_RUN, message).await?.await?;
    Ok(())
}

/// Keeps a copy of a job message the fleet gave up on, with the reason, on the dead-letter
/// stream. Never redelivered; inspect it with any JetStream client.
pub async fn dead_letter(
    js: &jetstream::Context,
    job_id: &str,
    payload: Bytes,
    reason: &str,
) -> Result<(), jetstream::context::PublishError> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(names::HEADER_JOB_ID, job_id);
    headers.insert(names::HEADER_REJECT_REASON, header_safe(reason).as_str());
    js.publish_with_headers(names::dead_subject(job_id), headers, payload)
        .await?
        .await?;
    Ok(())
}

/// Header values hold one line: control characters become spaces, and the length is bounded.
pub fn header_safe(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1000)
        .collect()
}
