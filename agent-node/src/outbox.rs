//! The node's durable outbox (redb). When NATS is unreachable, log chunks and job outcomes are
//! written here instead, and a relay task publishes them in order once NATS is back. Message
//! ids make a replayed chunk count once; outcomes are applied with the same lease check as a
//! direct write. The file survives a node restart, so nothing a job produced is lost while
//! NATS is away.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use flotilla_proto::{JobResult, JobStatus};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

const ENTRIES: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("outbox");

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox storage: {0}")]
    Storage(String),
    #[error("outbox entry: {0}")]
    Codec(String),
}

fn storage(e: impl std::fmt::Display) -> OutboxError {
    OutboxError::Storage(e.to_string())
}

/// Something that must reach NATS, in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Entry {
    /// A JetStream publish (a log chunk).
    Publish {
        subject: String,
        msg_id: String,
        job_id: String,
        /// The attempt whose output this is (0 in entries kept by older nodes: not checked).
        #[serde(default)]
        attempt: u32,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// A job outcome to record, then its end marker and its message ack.
    Finish(Box<PendingFinish>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PendingFinish {
    pub(crate) job_id: String,
    pub(crate) attempt: u32,
    pub(crate) status: JobStatus,
    pub(crate) exit_code: Option<i64>,
    pub(crate) error: Option<String>,
    pub(crate) outcome: String,
    pub(crate) result: JobResult,
    /// Where to ack the job's message once the outcome is recorded.
    pub(crate) ack_subject: Option<String>,
    /// Sequence number of the end-of-stream chunk.
    pub(crate) end_seq: u64,
    /// Milliseconds from receipt to the process running.
    #[serde(default)]
    pub(crate) start_ms: Option<f64>,
    #[serde(default)]
    pub(crate) usage: Option<flotilla_proto::Usage>,
    /// The job's budget, to say how far past it a job that ran out went.
    #[serde(default)]
    pub(crate) max_budget_usd: Option<f64>,
}

pub(crate) struct Outbox {
    db: Arc<Database>,
    next_key: AtomicU64,
    len: AtomicUsize,
    /// Woken on every push, so the relay starts at once.
    pub(crate) pushed: Notify,
}

impl Outbox {
    pub(crate) fn open(path: &Path) -> Result<Self, OutboxError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(storage)?;
        }
        let db = Database::create(path).map_err(storage)?;
        let write = db.begin_write().map_err(storage)?;
        write.open_table(ENTRIES).map_err(storage)?;
        write.commit().map_err(storage)?;
        let read = db.begin_read().map_err(storage)?;
        let table = read.open_table(ENTRIES).map_err(storage)?;
        let len = table.len().map_err(storage)? as usize;
        let next_key = match table.last().map_err(storage)? {
            Some((key, _)) => key.value() + 1,
            None => 0,
        };
        drop(table);
        Ok(Self {
            db: Arc::new(db),
            next_key: AtomicU64::new(next_key),
            len: AtomicUsize::new(len),
            pushed: Notify::new(),
        })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len.load(Ordering::SeqCst) == 0
    }

    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::SeqCst)
    }

    /// Appends `entry`; it is on disk when this returns.
    pub(crate) async fn push(&self, entry: &Entry) -> Result<(), OutboxError> {
        let bytes =
            rmp_serde::to_vec_named(entry).map_err(|e| OutboxError::Codec(e.to_string()))?;
        let key = self.next_key.fetch_add(1, Ordering::SeqCst);
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || -> Result<(), OutboxError> {
            let write = db.begin_write().map_err(storage)?;
            write
                .open_table(ENTRIES)
                .map_err(storage)?
                .insert(key, bytes.as_slice())
                .map_err(storage)?;
            write.commit().map_err(storage)
        })
        .await
        .map_err(storage)??;
        self.len.fetch_add(1, Ordering::SeqCst);
        self.pushed.notify_one();
        Ok(())
    }

    /// The oldest entries, in order.
    pub(crate) async fn peek(&self, max: usize) -> Result<Vec<(u64, Entry)>, OutboxError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || -> Result<Vec<(u64, Entry)>, OutboxError> {
            let read = db.begin_read().map_err(storage)?;
            let table = read.open_table(ENTRIES).map_err(storage)?;
            let mut entries = Vec::new();
            for row in table.iter().map_err(storage)?.take(max) {
                let (key, value) = row.map_err(storage)?;
                let entry = rmp_serde::from_slice(value.value())
                    .map_err(|e| OutboxError::Codec(e.to_string()))?;
                entries.push((key.value(), entry));
            }
            Ok(entries)
        })
        .await
        .map_err(storage)?
    }

    pub(crate) async fn remove(&self, key: u64) -> Result<(), OutboxError> {
        let db = self.db.clone();
        let removed = tokio::task::spawn_blocking(move || -> Result<bool, OutboxError> {
            let write = db.begin_write().map_err(storage)?;
            let removed = write
                .open_table(ENTRIES)
                .map_err(storage)?
                .remove(key)
                .map_err(storage)?
                .is_some();
            write.commit().map_err(storage)?;
            Ok(removed)
        })
        .await
        .map_err(storage)??;
        if removed {
            self.len.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8) -> Entry {
        Entry::Publish {
            subject: "flotilla.logs.j".to_owned(),
            msg_id: format!("j.1.{n}"),
            job_id: "j".to_owned(),
            attempt: 1,
            payload: vec![n],
        }
    }

    #[tokio::test]
    async fn entries_survive_reopening_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.redb");
        {
            let outbox = Outbox::open(&path).unwrap();
            for n in 0..3 {
                outbox.push(&chunk(n)).await.unwrap();
            }
            let first = outbox.peek(1).await.unwrap()[0].0;
            outbox.remove(first).await.unwrap();
            assert_eq!(outbox.len(), 2);
        }
        let outbox = Outbox::open(&path).unwrap();
        assert_eq!(outbox.len(), 2);
        let payloads: Vec<Vec<u8>> = outbox
            .peek(10)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, entry)| match entry {
                Entry::Publish { payload, .. } => payload,
                Entry::Finish(_) => panic!("unexpected"),
            })
            .collect();
        assert_eq!(payloads, [vec![1], vec![2]]);
        // New entries go after the old ones.
        outbox.push(&chunk(9)).await.unwrap();
        let last = outbox.peek(10).await.unwrap().pop().unwrap();
        assert!(matches!(last.1, Entry::Publish { payload, .. } if payload == vec![9]));
    }
}
