//! The dispatchers' pull loop on a shared durable consumer: each message goes to one replica.

use std::{future::Future, time::Duration};

use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// Hands each message of `consumer` to `handle`, up to `concurrency` at a time, until `stop`,
/// pulling again after errors. `handle` acks (or naks) the message itself. On `stop`, no new
/// message is taken and those being handled are finished.
pub(crate) async fn consume<F, Fut>(
    consumer: &PullConsumer,
    what: &'static str,
    stop: &CancellationToken,
    concurrency: usize,
    mut handle: F,
) where
    F: FnMut(jetstream::Message) -> Fut,
    Fut: Future<Output = ()>,
{
    while !stop.is_cancelled() {
        let messages = tokio::select! {
            () = stop.cancelled() => return,
            messages = consumer.stream().heartbeat(Duration::from_secs(5)).messages() => messages,
        };
        let messages = match messages {
            Ok(messages) => messages,
            Err(e) => {
                tracing::warn!(error = %e, what, "cannot consume, retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        messages
            .take_until(stop.cancelled())
            .filter_map(|next| async move {
                next.inspect_err(|e| tracing::debug!(error = %e, what, "stream hiccup"))
                    .ok()
            })
            .for_each_concurrent(concurrency, &mut handle)
            .await;
    }
}
