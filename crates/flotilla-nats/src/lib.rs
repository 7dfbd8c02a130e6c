//! NATS plumbing shared by the services: connecting, creating the JetStream topology
//! idempotently, the job store (KV with compare-and-set) and queueing jobs.
//!
//! Names come from `flotilla_proto::names`; this crate only decides how they are configured.

mod store;
mod topology;

use std::time::Duration;

pub use store::{JobStore, StoreError, Versioned, WatchEvent};
pub use topology::{Topology, TopologyConfig, TopologyError};

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
/// same job twice within the dedupe window stores it once.
pub async fn enqueue(js: &jetstream::Context, request: &JobRequest) -> Result<(), QueueError> {
    let payload: Bytes = flotilla_proto::encode(request)?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(names::HEADER_JOB_ID, request.job_id.as_str());
    let message = jetstream::message::PublishMessage::build()
        .payload(payload)
        .headers(headers)
        .message_id(names::run_msg_id(&request.job_id));
    js.send_publish(names::SUBJECT_RUN, message).await?.await?;
    Ok(())
}
