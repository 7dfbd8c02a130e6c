//! The job store: one [`JobRecord`] per job in KV, changed only by compare-and-set on the
//! entry's revision, so two writers can never both win.

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, Store, UpdateErrorKind};
use chrono::Utc;
use flotilla_proto::{Encoding, JobRecord, Refusal, Transition, names};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// What already exists: `job <id>` or `schedule <id>`.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// Someone else changed the record since it was read.
    #[error("{0} changed concurrently")]
    Conflict(String),
    #[error("record is corrupt: {0}")]
    Corrupt(#[from] flotilla_proto::CodecError),
    /// NATS did not answer, or refused: worth retrying later.
    #[error("KV store unavailable: {0}")]
    Nats(#[source] BoxError),
}

/// The cause behind [`StoreError::Nats`]: an async-nats error, kept whole for the log.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl StoreError {
    pub fn nats(cause: impl Into<BoxError>) -> Self {
        Self::Nats(cause.into())
    }
}

/// What [`JobStore::apply`] did: the record it decided on, and the record as stored after
/// the transition (the same record, at the same revision, when there was nothing to write).
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub before: JobRecord,
    pub after: Versioned,
}

impl Applied {
    pub fn changed(&self) -> bool {
        self.before != self.after.record
    }
}

/// Why [`JobStore::apply`] did not apply a transition.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("job {0} not found")]
    NotFound(String),
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[cfg(debug_assertions)]
fn state_of(record: &JobRecord) -> (flotilla_proto::JobStatus, u32, Option<String>) {
    (record.status, record.attempt, record.node_id.clone())
}

/// A record together with the KV revision it was read at.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    pub record: JobRecord,
    pub revision: u64,
}

#[derive(Clone)]
pub struct JobStore {
    kv: Store,
}

impl JobStore {
    pub fn new(kv: Store) -> Self {
        Self { kv }
    }

    /// Stores a new job; fails with [`StoreError::AlreadyExists`] if the id is taken.
    pub async fn create(&self, record: &JobRecord) -> Result<u64, StoreError> {
        let value = flotilla_proto::encode(record)?;
        self.kv
            .create(names::job_key(&record.job_id), value)
            .await
            .map_err(|e| match e.kind() {
                CreateErrorKind::AlreadyExists => {
                    StoreError::AlreadyExists(format!("job {}", record.job_id))
                }
                _ => StoreError::nats(e),
            })
    }

    pub async fn get(&self, job_id: &str) -> Result<Option<Versioned>, StoreError> {
        let entry = self
            .kv
            .entry(names::job_key(job_id))
            .await
            .map_err(StoreError::nats)?;
        match entry {
            Some(entry) if entry.operation == Operation::Put => Ok(Some(Versioned {
                record: flotilla_proto::decode(&entry.value, Encoding::MessagePack)?,
                revision: entry.revision,
            })),
            _ => Ok(None),
        }
    }

    /// Whether the bucket answers (a stream info request), for health checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.kv.status().await.map(|_| ()).map_err(StoreError::nats)
    }

    /// Removes a job's record entirely (used when a submission could not be queued).
    pub async fn remove(&self, job_id: &str) -> Result<(), StoreError> {
        self.kv
            .purge(names::job_key(job_id))
            .await
            .map_err(StoreError::nats)
    }

    /// Writes `record` only if the stored revision is still `revision`.
    pub async fn update(&self, record: &JobRecord, revision: u64) -> Result<u64, StoreError> {
        let value = flotilla_proto::encode(record)?;
        self.kv
            .update(names::job_key(&record.job_id), value, revision)
            .await
            .map_err(|e| match e.kind() {
                UpdateErrorKind::WrongLastRevision => {
                    StoreError::Conflict(format!("job {}", record.job_id))
                }
                _ => StoreError::nats(e),
            })
    }

    /// Applies `transition` by compare-and-set: reads the record, lets the transition decide,
    /// writes the result if it differs, and on a conflict reads and decides again. The only way
    /// a record's status, attempt or node changes.
    pub async fn apply(
        &self,
        job_id: &str,
        transition: &Transition,
    ) -> Result<Applied, ApplyError> {
        loop {
            let current = self
                .get(job_id)
                .await?
                .ok_or_else(|| ApplyError::NotFound(job_id.to_owned()))?;
            let next = transition.apply(&current.record, Utc::now())?;
            if next == current.record {
                return Ok(Applied {
                    before: current.record.clone(),
                    after: current,
                });
            }
            match self.update(&next, current.revision).await {
                Ok(revision) => {
                    return Ok(Applied {
                        before: current.record,
                        after: Versioned {
                            record: next,
                            revision,
                        },
                    });
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Read-modify-write with retry on conflict, for what is not a job's state: its usage, its
    /// webhook delivery. `change` sees the current record and returns `Ok(false)` to leave it
    /// alone; its `Err` aborts. Returns the record as finally stored (or found), or `None` if
    /// the job does not exist. Changing the status, attempt or node here is a bug (checked in
    /// debug builds): that is what [`JobStore::apply`] is for.
    pub async fn modify<E>(
        &self,
        job_id: &str,
        mut change: impl FnMut(&mut JobRecord) -> Result<bool, E>,
    ) -> Result<Option<Result<Versioned, E>>, StoreError> {
        loop {
            let Some(mut current) = self.get(job_id).await? else {
                return Ok(None);
            };
            #[cfg(debug_assertions)]
            let state = state_of(&current.record);
            let changed = change(&mut current.record);
            #[cfg(debug_assertions)]
            assert_eq!(
                state,
                state_of(&current.record),
                "JobStore::modify changed a job's state: use JobStore::apply"
            );
            match changed {
                Err(e) => return Ok(Some(Err(e))),
                Ok(false) => return Ok(Some(Ok(current))),
                Ok(true) => match self.update(&current.record, current.revision).await {
                    Ok(revision) => {
                        return Ok(Some(Ok(Versioned {
                            record: current.record,
                            revision,
                        })));
                    }
                    Err(StoreError::Conflict(_)) => continue,
                    Err(e) => return Err(e),
                },
            }
        }
    }

    /// Every record now in the store, then every change, in revision order (or, with
    /// `from_revision`, every change from that revision on).
    pub async fn watch(
        &self,
        from_revision: Option<u64>,
    ) -> Result<impl Stream<Item = WatchEvent> + Send + use<>, StoreError> {
        let watch = match from_revision {
            Some(revision) => self.kv.watch_all_from_revision(revision).await,
            None => {
                self.kv
                    .watch_with_history(format!("{}>", names::job_key("")))
                    .await
            }
        }
        .map_err(StoreError::nats)?;
        Ok(watch.map(|item| match item {
            Ok(entry) => decode_entry(entry),
            Err(e) => WatchEvent::Error(e.to_string()),
        }))
    }
}

impl JobStore {
    /// Feeds `apply` every record now in the store and then every change (`Put` and
    /// `Removed` only), until `stop`. After a NATS interruption the watch resumes from the last
    /// revision seen, so nothing is missed or replayed twice.
    pub async fn follow(&self, stop: CancellationToken, mut apply: impl FnMut(WatchEvent)) {
        let mut next_revision: Option<u64> = None;
        loop {
            let watch = tokio::select! {
                () = stop.cancelled() => return,
                watch = self.watch(next_revision) => watch,
            };
            let mut events = match watch {
                Ok(events) => Box::pin(events),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch jobs, retrying");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            loop {
                let event = tokio::select! {
                    () = stop.cancelled() => return,
                    event = events.next() => event,
                };
                match event {
                    Some(WatchEvent::Put(versioned)) => {
                        next_revision = Some(versioned.revision + 1);
                        apply(WatchEvent::Put(versioned));
                    }
                    Some(WatchEvent::Removed { job_id, revision }) => {
                        next_revision = Some(revision + 1);
                        apply(WatchEvent::Removed { job_id, revision });
                    }
                    Some(WatchEvent::Corrupt { key, error }) => {
                        tracing::warn!(key, error, "ignoring undecodable job record");
                    }
                    Some(WatchEvent::Error(error)) => {
                        tracing::warn!(error, "job watch failed, re-watching");
                        break;
                    }
                    None => break,
                }
            }
        }
    }
}

#[derive(Debug)]
pub enum WatchEvent {
    Put(Box<Versioned>),
    Removed {
        job_id: String,
        revision: u64,
    },
    /// A record that does not decode; logged and skipped by callers.
    Corrupt {
        key: String,
        error: String,
    },
    Error(String),
}

fn decode_entry(entry: kv::Entry) -> WatchEvent {
    let Some(job_id) = names::job_id_from_key(&entry.key) else {
        return WatchEvent::Corrupt {
            key: entry.key,
            error: "not a job key".to_owned(),
        };
    };
    match entry.operation {
        Operation::Put => match flotilla_proto::decode(&entry.value, Encoding::MessagePack) {
            Ok(record) => WatchEvent::Put(Box::new(Versioned {
                record,
                revision: entry.revision,
            })),
            Err(e) => WatchEvent::Corrupt {
                key: entry.key.clone(),
                error: e.to_string(),
            },
        },
        Operation::Delete | Operation::Purge => WatchEvent::Removed {
            job_id: job_id.to_owned(),
            revision: entry.revision,
        },
    }
}
