//! The schedule store: one [`Schedule`] per schedule in KV, changed only by compare-and-set,
//! like the job store.

use std::time::Duration;

use async_nats::jetstream::kv::{CreateErrorKind, Operation, Store, UpdateErrorKind};
use flotilla_proto::{Encoding, Schedule, names};
use futures::{StreamExt, TryStreamExt};
use tokio_util::sync::CancellationToken;

use crate::StoreError;

/// A schedule together with the KV revision it was read at.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionedSchedule {
    pub schedule: Schedule,
    pub revision: u64,
}

/// A change seen by [`ScheduleStore::follow`].
#[derive(Debug)]
pub enum ScheduleEvent {
    Put(Box<VersionedSchedule>),
    Removed(String),
}

#[derive(Clone)]
pub struct ScheduleStore {
    kv: Store,
}

impl ScheduleStore {
    pub fn new(kv: Store) -> Self {
        Self { kv }
    }

    /// Stores a new schedule; fails with [`StoreError::AlreadyExists`] if the id is taken.
    pub async fn create(&self, schedule: &Schedule) -> Result<u64, StoreError> {
        let value = flotilla_proto::encode(schedule)?;
        self.kv
            .create(names::schedule_key(&schedule.schedule_id), value)
            .await
            .map_err(|e| match e.kind() {
                CreateErrorKind::AlreadyExists => {
                    StoreError::AlreadyExists(format!("schedule {}", schedule.schedule_id))
                }
                _ => StoreError::nats(e),
            })
    }

    pub async fn get(&self, schedule_id: &str) -> Result<Option<VersionedSchedule>, StoreError> {
        let entry = self
            .kv
            .entry(names::schedule_key(schedule_id))
            .await
            .map_err(StoreError::nats)?;
        match entry {
            Some(entry) if entry.operation == Operation::Put => Ok(Some(VersionedSchedule {
                schedule: flotilla_proto::decode(&entry.value, Encoding::MessagePack)?,
                revision: entry.revision,
            })),
            _ => Ok(None),
        }
    }

    /// Writes `schedule` only if the stored revision is still `revision`.
    pub async fn update(&self, schedule: &Schedule, revision: u64) -> Result<u64, StoreError> {
        let value = flotilla_proto::encode(schedule)?;
        self.kv
            .update(names::schedule_key(&schedule.schedule_id), value, revision)
            .await
            .map_err(|e| match e.kind() {
                UpdateErrorKind::WrongLastRevision => {
                    StoreError::Conflict(format!("schedule {}", schedule.schedule_id))
                }
                _ => StoreError::nats(e),
            })
    }

    /// Removes a schedule (purged: no history is kept). Returns whether it existed.
    pub async fn remove(&self, schedule_id: &str) -> Result<bool, StoreError> {
        if self.get(schedule_id).await?.is_none() {
            return Ok(false);
        }
        self.kv
            .purge(names::schedule_key(schedule_id))
            .await
            .map_err(StoreError::nats)?;
        Ok(true)
    }

    /// Every schedule, in id order. Reads each one: schedules are few (one per recurring
    /// task), unlike jobs.
    pub async fn list(&self) -> Result<Vec<Schedule>, StoreError> {
        let keys: Vec<String> = match self.kv.keys().await {
            Ok(keys) => keys.try_collect().await.map_err(StoreError::nats)?,
            Err(e) => return Err(StoreError::nats(e)),
        };
        let mut ids: Vec<&str> = keys
            .iter()
            .filter_map(|key| names::schedule_id_from_key(key))
            .collect();
        ids.sort_unstable();
        let mut schedules = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(current) = self.get(id).await? {
                schedules.push(current.schedule);
            }
        }
        Ok(schedules)
    }

    /// Feeds `apply` every schedule now in the store, then every change, until `stop`. After a
    /// NATS interruption the watch starts over (a full replay; `apply` must be idempotent).
    pub async fn follow(&self, stop: CancellationToken, mut apply: impl FnMut(ScheduleEvent)) {
        loop {
            let watch = tokio::select! {
                () = stop.cancelled() => return,
                watch = self.kv.watch_with_history(format!("{}>", names::schedule_key(""))) => watch,
            };
            let mut events = match watch {
                Ok(events) => events,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch schedules, retrying");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            loop {
                let entry = tokio::select! {
                    () = stop.cancelled() => return,
                    entry = events.next() => entry,
                };
                let entry = match entry {
                    Some(Ok(entry)) => entry,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "schedule watch failed, re-watching");
                        break;
                    }
                    None => break,
                };
                let Some(id) = names::schedule_id_from_key(&entry.key) else {
                    continue;
                };
                match entry.operation {
                    Operation::Put => {
                        match flotilla_proto::decode(&entry.value, Encoding::MessagePack) {
                            Ok(schedule) => {
                                apply(ScheduleEvent::Put(Box::new(VersionedSchedule {
                                    schedule,
                                    revision: entry.revision,
                                })))
                            }
                            Err(e) => {
                                tracing::warn!(key = entry.key, error = %e, "ignoring undecodable schedule");
                            }
                        }
                    }
                    Operation::Delete | Operation::Purge => {
                        apply(ScheduleEvent::Removed(id.to_owned()));
                    }
                }
            }
        }
    }
}
