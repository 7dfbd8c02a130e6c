//! In-memory index of every job, fed by a watch on the jobs bucket. It answers `GET /jobs`
//! (filters, newest first) and wakes `/wait` callers the moment a job ends.
//!
//! Only a small summary is kept per job (no prompt, no result): about 300 bytes plus metadata,
//! so 100k jobs cost roughly 30-50 MB. Full records are read from KV for the page returned.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex, RwLock},
};

use chrono::{DateTime, Utc};
use flotilla_nats::{JobStore, Versioned, WatchEvent};
use flotilla_proto::JobRecord;
use flotilla_proto::JobStatus;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

/// Buffered changes per `/jobs/events` subscriber before it is told it lagged.
const CHANGES_BUFFER: usize = 1024;

/// A change seen by the watch, as `/jobs/events` subscribers get it.
#[derive(Debug, Clone)]
pub enum Change {
    Put(Arc<JobRecord>),
    Removed(String),
}

#[derive(Debug, Clone)]
struct Summary {
    revision: u64,
    status: JobStatus,
    agent_id: String,
    engine: String,
    profile: String,
    created_at: DateTime<Utc>,
    metadata: BTreeMap<String, String>,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<String, Summary>,
    /// (created_at, job_id), iterated backwards for newest first.
    order: BTreeSet<(DateTime<Utc>, String)>,
}

/// What `GET /jobs` may filter on.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub status: Option<JobStatus>,
    pub agent_id: Option<String>,
    pub engine: Option<String>,
    pub profile: Option<String>,
    pub metadata: Vec<(String, String)>,
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
}

impl Summary {
    fn of(record: &JobRecord, revision: u64) -> Self {
        Self {
            revision,
            status: record.status,
            agent_id: record.agent_id.clone(),
            engine: record.engine.clone(),
            profile: record.profile.clone(),
            created_at: record.created_at,
            metadata: record.metadata.clone(),
        }
    }
}

impl Filter {
    pub fn matches_record(&self, record: &JobRecord) -> bool {
        self.matches(&Summary::of(record, 0))
    }

    fn matches(&self, s: &Summary) -> bool {
        self.status.is_none_or(|status| s.status == status)
            && self.agent_id.as_ref().is_none_or(|a| *a == s.agent_id)
            && self.engine.as_ref().is_none_or(|e| *e == s.engine)
            && self.profile.as_ref().is_none_or(|p| *p == s.profile)
            && self.created_after.is_none_or(|t| s.created_at > t)
            && self.created_before.is_none_or(|t| s.created_at < t)
            && self
                .metadata
                .iter()
                .all(|(k, v)| s.metadata.get(k) == Some(v))
    }
}

pub struct JobIndex {
    inner: RwLock<Inner>,
    /// Every accepted change, for `/jobs/events`; sent only while someone listens.
    changes: broadcast::Sender<Change>,
    /// Jobs someone is waiting on, woken when they become terminal.
    waiters: Mutex<HashMap<String, Arc<Notify>>>,
    /// Jobs taken back after a failed submit: their creation may still arrive from the watch
    /// and must not resurrect them. Cleared when the watch reports the removal.
    forgotten: Mutex<HashSet<String>>,
}

impl Default for JobIndex {
    fn default() -> Self {
        Self {
            inner: RwLock::default(),
            changes: broadcast::channel(CHANGES_BUFFER).0,
            waiters: Mutex::default(),
            forgotten: Mutex::default(),
        }
    }
}

impl JobIndex {
    /// Changes from now on (see [`Change`]).
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Adds or refreshes a job; stale revisions (an older update seen late) are ignored.
    pub fn upsert(&self, versioned: &Versioned) {
        let record = &versioned.record;
        if self
            .forgotten
            .lock()
            .expect("forgotten lock")
            .contains(&record.job_id)
        {
            return;
        }
        {
            let mut inner = self.inner.write().expect("index lock");
            if inner
                .by_id
                .get(&record.job_id)
                .is_some_and(|s| s.revision >= versioned.revision)
            {
                return;
            }
            let summary = Summary::of(record, versioned.revision);
            if let Some(old) = inner.by_id.insert(record.job_id.clone(), summary) {
                inner.order.remove(&(old.created_at, record.job_id.clone()));
            }
            inner
                .order
                .insert((record.created_at, record.job_id.clone()));
        }
        if self.changes.receiver_count() > 0 {
            let _ = self.changes.send(Change::Put(Arc::new(record.clone())));
        }
        if record.status.is_terminal() {
            self.wake(&record.job_id);
        }
    }

    /// Drops a job whose submission was taken back (see `forgotten`).
    pub fn forget(&self, job_id: &str) {
        self.forgotten
            .lock()
            .expect("forgotten lock")
            .insert(job_id.to_owned());
        self.drop_entry(job_id);
    }

    /// The watch reported the job deleted.
    pub fn remove(&self, job_id: &str) {
        self.forgotten
            .lock()
            .expect("forgotten lock")
            .remove(job_id);
        self.drop_entry(job_id);
    }

    fn drop_entry(&self, job_id: &str) {
        let mut inner = self.inner.write().expect("index lock");
        let removed = inner.by_id.remove(job_id);
        if let Some(old) = &removed {
            inner.order.remove(&(old.created_at, job_id.to_owned()));
        }
        drop(inner);
        if removed.is_some() && self.changes.receiver_count() > 0 {
            let _ = self.changes.send(Change::Removed(job_id.to_owned()));
        }
        self.wake(job_id);
    }

    /// Ids of the matching jobs, newest first, for one page, and the total match count.
    pub fn query(&self, filter: &Filter, offset: usize, limit: usize) -> (Vec<String>, usize) {
        let inner = self.inner.read().expect("index lock");
        let mut total = 0;
        let mut page = Vec::with_capacity(limit);
        for (_, job_id) in inner.order.iter().rev() {
            let Some(summary) = inner.by_id.get(job_id) else {
                continue;
            };
            if !filter.matches(summary) {
                continue;
            }
            if total >= offset && page.len() < limit {
                page.push(job_id.clone());
            }
            total += 1;
        }
        (page, total)
    }

    /// How many jobs are in each status.
    pub fn counts(&self) -> BTreeMap<JobStatus, usize> {
        let inner = self.inner.read().expect("index lock");
        let mut counts: BTreeMap<JobStatus, usize> =
            JobStatus::ALL.into_iter().map(|s| (s, 0)).collect();
        for summary in inner.by_id.values() {
            *counts.entry(summary.status).or_default() += 1;
        }
        counts
    }

    pub fn len(&self) -> usize {
        self.inner.read().expect("index lock").by_id.len()
    }

    /// A handle that is notified when `job_id` becomes terminal (or is removed). Register
    /// before reading the job's state, so an end between the read and the wait is not missed.
    pub fn waiter(&self, job_id: &str) -> Arc<Notify> {
        self.waiters
            .lock()
            .expect("waiters lock")
            .entry(job_id.to_owned())
            .or_default()
            .clone()
    }

    /// Gives up a waiter handle; the entry goes when nobody else holds it, so abandoned waits
    /// (timeouts, disconnects) do not accumulate.
    pub fn release_waiter(&self, job_id: &str, notify: Arc<Notify>) {
        let mut waiters = self.waiters.lock().expect("waiters lock");
        // One reference in the map, one here: nobody else waits.
        if Arc::strong_count(&notify) == 2 {
            waiters.remove(job_id);
        }
    }

    /// The job's status as last seen by the watch.
    pub fn status(&self, job_id: &str) -> Option<JobStatus> {
        self.inner
            .read()
            .expect("index lock")
            .by_id
            .get(job_id)
            .map(|s| s.status)
    }

    fn wake(&self, job_id: &str) {
        if let Some(notify) = self.waiters.lock().expect("waiters lock").remove(job_id) {
            notify.notify_waiters();
        }
    }
}

/// Keeps `index` in step with the jobs bucket until `stop`; re-watches from the last revision
/// seen if the watch breaks (NATS restart).
pub async fn follow(index: Arc<JobIndex>, store: JobStore, stop: CancellationToken) {
    store
        .follow(stop, |event| match event {
            WatchEvent::Put(versioned) => index.upsert(&versioned),
            WatchEvent::Removed { job_id, .. } => index.remove(&job_id),
            WatchEvent::Corrupt { .. } | WatchEvent::Error(_) => {}
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::JobRecord;
    use std::time::Duration;

    fn versioned(record: JobRecord, revision: u64) -> Versioned {
        Versioned { record, revision }
    }

    fn record(id: &str, secs: i64, status: JobStatus) -> JobRecord {
        JobRecord {
            job_id: id.to_owned(),
            status,
            agent_id: "a".to_owned(),
            engine: "shell".to_owned(),
            profile: "default".to_owned(),
            created_at: DateTime::from_timestamp(secs, 0).unwrap(),
            started_at: None,
            finished_at: None,
            exit_code: None,
            error: None,
            result: None,
            attempt: 0,
            node_id: None,
            usage: None,
            metadata: BTreeMap::from([(
                "team".to_owned(),
                if secs % 2 == 0 { "x" } else { "y" }.to_owned(),
            )]),
            dry_run: false,
            timeout_seconds: 60,
            attempts: Vec::new(),
            ack_subject: None,
            webhook_url: None,
            webhook: None,
            git: None,
            parent: None,
            chain: Vec::new(),
            priority: Default::default(),
            requires: Default::default(),
            image: None,
            runtime: None,
            waiting_for: None,
        }
    }

    #[test]
    fn newest_first_with_filters_and_pages() {
        let index = JobIndex::default();
        for i in 0..10 {
            index.upsert(&versioned(
                record(&format!("j{i}"), i, JobStatus::Pending),
                1,
            ));
        }
        let (page, total) = index.query(&Filter::default(), 0, 3);
        assert_eq!(page, ["j9", "j8", "j7"]);
        assert_eq!(total, 10);
        let (page, _) = index.query(&Filter::default(), 8, 5);
        assert_eq!(page, ["j1", "j0"]);
        let team_x = Filter {
            metadata: vec![("team".into(), "x".into())],
            ..Filter::default()
        };
        let (page, total) = index.query(&team_x, 0, 50);
        assert_eq!(total, 5);
        assert_eq!(page[0], "j8");
    }

    #[test]
    fn stale_revisions_are_ignored() {
        let index = JobIndex::default();
        index.upsert(&versioned(record("j", 1, JobStatus::Completed), 5));
        index.upsert(&versioned(record("j", 1, JobStatus::Running), 4));
        let done = Filter {
            status: Some(JobStatus::Completed),
            ..Filter::default()
        };
        assert_eq!(index.query(&done, 0, 10).1, 1);
    }

    #[tokio::test]
    async fn terminal_update_wakes_waiters() {
        let index = Arc::new(JobIndex::default());
        let notify = index.waiter("j");
        let notified = notify.notified();
        index.upsert(&versioned(record("j", 1, JobStatus::Failed), 2));
        tokio::time::timeout(Duration::from_secs(1), notified)
            .await
            .expect("woken");
    }
}
