//! Publishes a job attempt's output as ordered [`LogChunk`]s and keeps what the result needs
//! (standard output up to a cap, the last 4 KiB of everything).

use std::collections::VecDeque;

use std::{sync::Arc, time::Duration};

use async_nats::jetstream;
use bytes::Bytes;
use flotilla_proto::{LogChunk, LogEnd, LogStream, names};

use crate::{Shared, outbox::Entry};

const TAIL_BYTES: usize = 4096;
/// Chunks larger than this are split, keeping each message well under NATS' payload limit.
const MAX_CHUNK_BYTES: usize = 64 * 1024;

/// How long a direct publish may take before the chunk goes to the outbox instead.
const DIRECT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) struct LogPublisher {
    shared: Arc<Shared>,
    subject: String,
    job_id: String,
    attempt: u32,
    next_seq: u64,
    budget: Budget,
    stdout: Vec<u8>,
    max_stdout: usize,
    stdout_truncated: bool,
    tail: VecDeque<u8>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot publish log chunk: {0}")]
pub(crate) struct LogError(String);

impl LogPublisher {
    pub(crate) fn new(
        shared: Arc<Shared>,
        job_id: &str,
        attempt: u32,
        limits: LogLimits,
        max_stdout: usize,
    ) -> Self {
        Self {
            shared,
            subject: names::log_subject(job_id),
            job_id: job_id.to_owned(),
            attempt,
            next_seq: 0,
            budget: Budget::new(limits),
            stdout: Vec::new(),
            max_stdout,
            stdout_truncated: false,
            tail: VecDeque::with_capacity(TAIL_BYTES),
        }
    }

    pub(crate) async fn system(&mut self, text: &str) -> Result<(), LogError> {
        self.shared
            .metrics
            .log_bytes(LogStream::System, text.len(), 0);
        self.publish(LogStream::System, text.as_bytes().to_vec(), None)
            .await
    }

    /// Records and publishes process output.
    pub(crate) async fn output(&mut self, stream: LogStream, data: &[u8]) -> Result<(), LogError> {
        if stream == LogStream::Stdout {
            let room = self.max_stdout.saturating_sub(self.stdout.len());
            self.stdout.extend_from_slice(&data[..data.len().min(room)]);
            self.stdout_truncated |= data.len() > room;
        }
        for byte in data {
            if self.tail.len() == TAIL_BYTES {
                self.tail.pop_front();
            }
            self.tail.push_back(*byte);
        }
        let (kept, notice) = self.budget.admit(data.len());
        let kept = &data[..kept];
        self.shared
            .metrics
            .log_bytes(stream, kept.len(), data.len() - kept.len());
        for piece in kept.chunks(MAX_CHUNK_BYTES) {
            self.publish(stream, piece.to_vec(), None).await?;
        }
        if let Some(notice) = notice {
            self.system(&notice).await?;
        }
        Ok(())
    }

    pub(crate) fn stdout_text(&self) -> (String, bool) {
        (
            String::from_utf8_lossy(&self.stdout).into_owned(),
            self.stdout_truncated,
        )
    }

    pub(crate) fn tail_text(&self) -> String {
        let (a, b) = self.tail.as_slices();
        let mut bytes = Vec::with_capacity(a.len() + b.len());
        bytes.extend_from_slice(a);
        bytes.extend_from_slice(b);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Reserves the sequence number of the end marker (sent later, possibly by the relay).
    pub(crate) fn reserve_end_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    async fn publish(
        &mut self,
        stream: LogStream,
        data: Vec<u8>,
        end: Option<LogEnd>,
    ) -> Result<(), LogError> {
        let seq = self.next_seq;
        // Advance first: a chunk that could not be published must not make the next one reuse
        // its message id (it would be dropped as a duplicate).
        self.next_seq += 1;
        let chunk = LogChunk {
            job_id: self.job_id.clone(),
            attempt: self.attempt,
            seq,
            stream,
            data,
            end,
        };
        let payload = flotilla_proto::encode(&chunk).map_err(|e| LogError(e.to_string()))?;
        let msg_id = names::log_msg_id(&self.job_id, self.attempt, seq);
        // Straight to NATS while it answers and nothing older is waiting in the outbox (order);
        // otherwise into the outbox, which the relay drains in order when NATS is back.
        if self.shared.outbox.is_empty() && self.shared.nats_connected() {
            let sent = tokio::time::timeout(
                DIRECT_PUBLISH_TIMEOUT,
                publish_chunk(
                    &self.shared.topology.js,
                    &self.subject,
                    &msg_id,
                    &self.job_id,
                    payload.clone(),
                ),
            )
            .await;
            match sent {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => tracing::warn!(error = %e, "log publish failed, using the outbox"),
                Err(_) => tracing::warn!("log publish timed out, using the outbox"),
            }
        }
        let entry = Entry::Publish {
            subject: self.subject.clone(),
            msg_id,
            job_id: self.job_id.clone(),
            attempt: self.attempt,
            payload: payload.to_vec(),
        };
        self.shared
            .outbox
            .push(&entry)
            .await
            .map_err(|e| LogError(e.to_string()))
    }
}

/// What one attempt may publish of its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogLimits {
    pub(crate) max_bytes: u64,
    /// Also a cap on chunks: a process that flips between stdout and stderr a byte at a time
    /// makes one chunk (one JetStream message, ~100 bytes of overhead) per byte.
    pub(crate) max_chunks: u64,
}

/// The output published so far against [`LogLimits`]. Once either cap is reached, the rest of
/// the attempt's output is dropped (still counted, and still in the result's tail).
#[derive(Debug)]
struct Budget {
    limits: LogLimits,
    bytes: u64,
    chunks: u64,
    exhausted: bool,
}

impl Budget {
    fn new(limits: LogLimits) -> Self {
        Self {
            limits,
            bytes: 0,
            chunks: 0,
            exhausted: false,
        }
    }

    /// How many of `len` bytes may be published (as chunks of at most [`MAX_CHUNK_BYTES`]),
    /// and the notice to publish when this write is where the output starts being dropped.
    fn admit(&mut self, len: usize) -> (usize, Option<String>) {
        if self.exhausted || len == 0 {
            return (0, None);
        }
        let room_bytes = self.limits.max_bytes.saturating_sub(self.bytes);
        let room_chunks = self.limits.max_chunks.saturating_sub(self.chunks);
        let by_chunks = room_chunks.saturating_mul(MAX_CHUNK_BYTES as u64);
        let kept = (len as u64).min(room_bytes).min(by_chunks);
        self.bytes += kept;
        self.chunks += kept.div_ceil(MAX_CHUNK_BYTES as u64);
        if kept == len as u64 {
            return (len, None);
        }
        self.exhausted = true;
        let notice = if kept == room_bytes {
            format!(
                "output truncated: more than {} bytes; the rest is not kept",
                self.limits.max_bytes
            )
        } else {
            format!(
                "output truncated: more than {} chunks; the rest is not kept",
                self.limits.max_chunks
            )
        };
        // `kept` is at most `len`, a usize.
        (kept as usize, Some(notice))
    }
}

/// Publishes one log chunk and waits until JetStream has stored it. The message id makes a
/// replayed chunk count once.
pub(crate) async fn publish_chunk(
    js: &jetstream::Context,
    subject: &str,
    msg_id: &str,
    job_id: &str,
    payload: Bytes,
) -> Result<(), LogError> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(names::HEADER_JOB_ID, job_id);
    let message = jetstream::message::PublishMessage::build()
        .payload(payload)
        .headers(headers)
        .message_id(msg_id);
    js.send_publish(subject.to_owned(), message)
        .await
        .map_err(|e| LogError(e.to_string()))?
        .await
        .map_err(|e| LogError(e.to_string()))?;
    Ok(())
}

/// Encodes and publishes an end-of-stream chunk directly.
pub(crate) async fn publish_end(
    js: &jetstream::Context,
    job_id: &str,
    attempt: u32,
    seq: u64,
    end: LogEnd,
) -> Result<(), LogError> {
    let chunk = LogChunk {
        job_id: job_id.to_owned(),
        attempt,
        seq,
        stream: LogStream::System,
        data: Vec::new(),
        end: Some(end),
    };
    let payload = flotilla_proto::encode(&chunk).map_err(|e| LogError(e.to_string()))?;
    let msg_id = names::log_msg_id(job_id, attempt, seq);
    publish_chunk(js, &names::log_subject(job_id), &msg_id, job_id, payload).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(max_bytes: u64, max_chunks: u64) -> Budget {
        Budget::new(LogLimits {
            max_bytes,
            max_chunks,
        })
    }

    #[test]
    fn many_small_writes_stop_at_the_chunk_cap() {
        let mut budget = budget(64 << 20, 3);
        for _ in 0..3 {
            assert_eq!(budget.admit(1), (1, None));
        }
        let (kept, notice) = budget.admit(1);
        assert_eq!(kept, 0);
        assert_eq!(
            notice.as_deref(),
            Some("output truncated: more than 3 chunks; the rest is not kept")
        );
        // Said once; everything after is dropped.
        assert_eq!(budget.admit(100), (0, None));
    }

    #[test]
    fn large_writes_count_one_chunk_per_piece() {
        let mut budget = budget(64 << 20, 3);
        // Two pieces and a bit: three chunks, all of it kept.
        let len = 2 * MAX_CHUNK_BYTES + 10;
        assert_eq!(budget.admit(len), (len, None));
        let (kept, notice) = budget.admit(MAX_CHUNK_BYTES);
        assert_eq!(kept, 0);
        assert!(notice.unwrap().contains("3 chunks"));
        // A write bigger than the chunks left keeps what fits in them.
        let mut budget = self::budget(64 << 20, 2);
        let (kept, notice) = budget.admit(3 * MAX_CHUNK_BYTES);
        assert_eq!(kept, 2 * MAX_CHUNK_BYTES);
        assert!(notice.unwrap().contains("2 chunks"));
    }

    #[test]
    fn the_byte_cap_still_applies_and_says_so() {
        let mut budget = budget(10, 100_000);
        assert_eq!(budget.admit(6), (6, None));
        let (kept, notice) = budget.admit(6);
        assert_eq!(kept, 4);
        assert_eq!(
            notice.as_deref(),
            Some("output truncated: more than 10 bytes; the rest is not kept")
        );
        assert_eq!(budget.admit(1), (0, None));
        // Exactly at the cap with nothing more: nothing was dropped, nothing to say.
        let mut exact = self::budget(10, 100_000);
        assert_eq!(exact.admit(10), (10, None));
    }
}
