//! The dispatchers' pull loop on a shared durable consumer: each message goes to one replica.

use std::{future::Future, time::Duration};

use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// Hands each message of `consumer` to `handle` until `stop`, pulling again after errors.
/// `handle` acks (or naks) the message itself.
pub(crate) async fn consume<F, Fut>(
    consumer: &PullConsumer,
    what: &'static str,
    stop: &CancellationToken,
    mut handle: F,
) where
    F: FnMut(jetstream::Message) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        let messages = tokio::select! {
            () = stop.cancelled() => return,
            messages = consumer.stream().heartbeat(Duration::from_secs(5)).messages() => messages,
        };
        let mut messages = match messages {
            Ok(messages) => messages,
            Err(e) => {
                tracing::warn!(error = %e, what, "cannot consume, retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let next = tokio::select! {
                () = stop.cancelled() => return,
                next = messages.next() => next,
            };
            match next {
                Some(Ok(message)) => handle(message).await,
                Some(Err(e)) => tracing::debug!(error = %e, what, "stream hiccup"),
                None => break,
            }
        }
    }
}
