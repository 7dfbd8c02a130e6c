//! The fleet-wide lifecycle, run by the elected leader among dispatcher replicas: lost nodes,
//! jobs queued too long, retention of finished jobs. Dead letters are handled by whichever
//! replica pulls the advisory from its stream, so every replica shares that work.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::jetstream::{AckKind, kv};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use flotilla_nats::{ApplyError, Topology, WatchEvent};
use flotilla_proto::{Encoding, JobClass, JobStatus, Transition, names};
use futures::StreamExt as _;
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::DispatcherMetrics;
use flotilla_nats::{Heartbeat, Lease, NodeDirectory};

/// Lifecycle settings.
#[derive(Debug, Clone)]
pub struct LifecycleConfig {
    /// How often the leader looks for lost nodes.
    pub node_check_interval: Duration,
    /// How often queue timeouts and retention are enforced.
    pub sweep_interval: Duration,
    /// A job still pending after this long fails ("queued too long").
    pub max_queued: Duration,
    /// Finished jobs are deleted this long after they finished (Parpaing's `JOB_TTL_HOURS`).
    pub job_ttl: Duration,
    /// At most this many finished jobs are kept (Parpaing's `MAX_RETAINED_JOBS`).
    pub max_retained_jobs: usize,
}

pub(crate) struct Lifecycle {
    pub(crate) client: async_nats::Client,
    pub(crate) topology: Topology,
    pub(crate) config: LifecycleConfig,
    pub(crate) jobs: Mutex<HashMap<String, JobSummary>>,
    pub(crate) metrics: Arc<DispatcherMetrics>,
    pub(crate) webhooks: Arc<crate::webhooks::Webhooks>,
    /// Every leader action is fenced by it.
    pub(crate) lease: Arc<Lease>,
    pub(crate) nodes: Arc<NodeDirectory>,
}

/// How often the leader looks for webhooks to send.
const WEBHOOK_CHECK: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
pub(crate) struct JobSummary {
    status: JobStatus,
    node_id: Option<String>,
    created_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    /// While pending: what a node needs to run it, and what the record says it waits for.
    class: Option<JobClass>,
    waiting_for: Option<String>,
}

impl Lifecycle {
    /// Runs the leader's duties while `leading` is true.
    pub(crate) async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut leading = self.lease.watch();
        tokio::spawn(self.clone().follow_jobs(stop.clone()));
        let mut nodes = NodeWatch::default();
        let mut node_ticker = tokio::time::interval(self.config.node_check_interval);
        let mut sweep_ticker = tokio::time::interval(self.config.sweep_interval);
        let mut webhook_ticker = tokio::time::interval(WEBHOOK_CHECK);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = leading.changed() => continue,
                _ = node_ticker.tick() => {
                    if *leading.borrow() {
                        self.check_nodes(&mut nodes).await;
                    } else {
                        nodes = NodeWatch::default();
                    }
                }
                _ = sweep_ticker.tick() => {
                    if *leading.borrow() {
                        self.sweep().await;
                    }
                }
                _ = webhook_ticker.tick() => {
                    if *leading.borrow() {
                        self.webhooks.start_due(Utc::now());
                    }
                }
            }
        }
    }

    /// Finds nodes whose heartbeat stopped and hands their jobs back to the queue at once;
    /// then running jobs whose node has no heartbeat at all.
    async fn check_nodes(&self, nodes: &mut NodeWatch) {
        if !self.nodes.is_synced() {
            return; // not loaded yet: judge no node
        }
        let heartbeats = self.nodes.all();
        let newest = heartbeats.iter().map(|h| h.revision).max().unwrap_or(0);
        let window = heartbeats.iter().map(|h| h.info.ttl_ms).max().unwrap_or(0);
        if !nodes.heartbeats_flow(newest, Duration::from_millis(window), heartbeats.len()) {
            return; // every node silent at once: NATS, not the nodes (a leader election)
        }
        let mut known = HashSet::new();
        for heartbeat in heartbeats {
            let Heartbeat {
                key,
                info,
                revision,
                ..
            } = heartbeat;
            known.insert(info.node_id.clone());
            let ttl = Duration::from_millis(info.ttl_ms);
            if !nodes.is_stale(&key, revision, ttl) || !self.still_at(&key, revision).await {
                continue;
            }
            if !self.lease.confirm().await {
                return;
            }
            if !self.node_lost(&info.node_id).await {
                // Keep the key (and the node stale): the next check tries again.
                continue;
            }
            // Only if no fresh heartbeat arrived meanwhile.
            let _ = self
                .topology
                .nodes
                .delete_expect_revision(&key, Some(revision))
                .await;
            nodes.forget(&key);
        }
        self.requeue_orphans(&known, nodes).await;
        self.note_waiting().await;
    }

    /// Pending jobs no live node can take say why in `waiting_for`; the note goes once one
    /// can. Jobs younger than [`WAIT_NOTE_AFTER`] are left alone: nodes report a new class's
    /// image at their next heartbeat.
    async fn note_waiting(&self) {
        let live = self.nodes.live(Utc::now());
        let since = Utc::now() - WAIT_NOTE_AFTER;
        let notes: Vec<(String, Option<String>)> = {
            let jobs = self.jobs.lock().expect("jobs lock");
            let mut reasons: HashMap<&JobClass, Option<String>> = HashMap::new();
            jobs.iter()
                .filter(|(_, s)| s.status == JobStatus::Pending && s.created_at < since)
                .filter_map(|(id, s)| {
                    let class = s.class.as_ref()?;
                    let reason = reasons
                        .entry(class)
                        .or_insert_with(|| class.waiting_for(&live));
                    (*reason != s.waiting_for).then(|| (id.clone(), reason.clone()))
                })
                .take(WAIT_NOTES_PER_CHECK)
                .collect()
        };
        for (job_id, reason) in notes {
            let wait = Transition::Wait { reason };
            if let Err(ApplyError::Store(e)) = self.topology.jobs.apply(&job_id, &wait).await {
                tracing::warn!(job_id, error = %e, "cannot note what a pending job waits for");
            }
        }
    }

    /// Whether the bucket still holds `revision` under `key`. The directory's watch may lag
    /// (a leader change); a node is judged lost only on what the bucket says now.
    async fn still_at(&self, key: &str, revision: u64) -> bool {
        match self.topology.nodes.entry(key).await {
            Ok(Some(entry)) => entry.operation == kv::Operation::Put && entry.revision == revision,
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(key, error = %e, "cannot read a node heartbeat");
                false
            }
        }
    }

    /// Hands back every job the lost node was running; false if some could not be, for now.
    async fn node_lost(&self, node_id: &str) -> bool {
        let held = self.running_on(|node| node == node_id);
        tracing::warn!(node_id, jobs = held.len(), "node lost");
        self.metrics.lost_nodes.inc();
        let mut all = true;
        for (job_id, _) in &held {
            all &= self.requeue_lost(node_id, job_id).await;
        }
        all
    }

    /// Running jobs whose node has no heartbeat at all: it vanished while no dispatcher
    /// watched (or before this one saw it). Requeued once that has lasted [`ORPHAN_GRACE`],
    /// which also covers a node that claimed a job before its first heartbeat arrived.
    async fn requeue_orphans(&self, known: &HashSet<String>, nodes: &mut NodeWatch) {
        let orphans = self.running_on(|node| !known.contains(node));
        nodes.keep_orphans(orphans.iter().map(|(job_id, _)| job_id.as_str()));
        for (job_id, node_id) in orphans {
            if !nodes.is_stale(&orphan_key(&job_id), 0, ORPHAN_GRACE) {
                continue;
            }
            if !self.lease.confirm().await {
                return;
            }
            tracing::warn!(job_id, node_id, "running on a node with no heartbeat");
            if self.requeue_lost(&node_id, &job_id).await {
                nodes.forget(&orphan_key(&job_id));
            }
        }
    }

    /// Running jobs, with their nodes, whose node matches.
    fn running_on(&self, node_matches: impl Fn(&str) -> bool) -> Vec<(String, String)> {
        let jobs = self.jobs.lock().expect("jobs lock");
        jobs.iter()
            .filter(|(_, s)| s.status == JobStatus::Running)
            .filter_map(|(id, s)| Some((id, s.node_id.as_deref()?)))
            .filter(|(_, node)| node_matches(node))
            .map(|(id, node)| (id.clone(), node.to_owned()))
            .collect()
    }

    /// Marks the lost node's attempt ended and hands the job's message back to the queue at
    /// once (instead of after its ack wait), so another node picks it up.
    /// False when NATS could not record it (to be tried again).
    async fn requeue_lost(&self, node_id: &str, job_id: &str) -> bool {
        let requeue = Transition::Requeue {
            node_id: node_id.to_owned(),
        };
        let ack_subject = match self.topology.jobs.apply(job_id, &requeue).await {
            Ok(applied) => applied.before.ack_subject,
            // Finished, or taken by another node meanwhile: nothing to hand back.
            Err(ApplyError::Refused(_) | ApplyError::NotFound(_)) => return true,
            Err(ApplyError::Store(e)) => {
                tracing::warn!(job_id, error = %e, "cannot record lost attempt, will retry");
                return false;
            }
        };
        if let Some(subject) = ack_subject
            && let Err(e) = self
                .client
                .publish(subject, Bytes::from_static(b"-NAK"))
                .await
        {
            tracing::warn!(job_id, error = %e, "cannot hand back lost job");
        }
        self.metrics.requeued.inc();
        tracing::info!(job_id, node_id, "lost job requeued");
        true
    }

    /// Keeps a small summary of every job, for the sweeps.
    async fn follow_jobs(self: Arc<Self>, stop: CancellationToken) {
        self.topology
            .jobs
            .follow(stop, |event| {
                let mut jobs = self.jobs.lock().expect("jobs lock");
                match event {
                    WatchEvent::Put(versioned) => {
                        let record = &versioned.record;
                        let pending = record.status == JobStatus::Pending;
                        let summary = JobSummary {
                            status: record.status,
                            node_id: record.node_id.clone(),
                            created_at: record.created_at,
                            finished_at: record.finished_at,
                            class: pending.then(|| JobClass::of_record(record)),
                            waiting_for: record.waiting_for.clone(),
                        };
                        self.webhooks
                            .track(&record.job_id, crate::webhooks::due(record));
                        jobs.insert(record.job_id.clone(), summary);
                    }
                    WatchEvent::Removed { job_id, .. } => {
                        self.webhooks.track(&job_id, None);
                        jobs.remove(&job_id);
                    }
                    WatchEvent::Corrupt { .. } | WatchEvent::Error(_) => {}
                }
            })
            .await;
    }

    /// Fails jobs queued too long and deletes finished jobs past retention.
    async fn sweep(&self) {
        let now = Utc::now();
        let (overdue, expired) = {
            let jobs = self.jobs.lock().expect("jobs lock");
            plan_sweep(&jobs, now, &self.config)
        };
        if (!overdue.is_empty() || !expired.is_empty()) && !self.lease.confirm().await {
            return;
        }
        let time_out = Transition::TimeOut {
            queued_limit_secs: self.config.max_queued.as_secs(),
        };
        for job_id in overdue {
            match self.topology.jobs.apply(&job_id, &time_out).await {
                Ok(_) => {
                    self.metrics.queue_timeouts.inc();
                    tracing::info!(job_id, "job failed: queued too long");
                }
                Err(ApplyError::Store(e)) => {
                    tracing::warn!(job_id, error = %e, "cannot time out queued job");
                }
                // Started (or gone) since the sweep looked.
                Err(ApplyError::Refused(_) | ApplyError::NotFound(_)) => {}
            }
        }
        if expired.is_empty() {
            return;
        }
        let logs = self.topology.js.get_stream(names::STREAM_LOGS).await;
        for job_id in &expired {
            if let Err(e) = self.topology.jobs.remove(job_id).await {
                tracing::warn!(job_id, error = %e, "cannot delete expired job");
                continue;
            }
            self.metrics.retention_deleted.inc();
            if let Ok(logs) = &logs {
                let _ = logs.purge().filter(names::log_subject(job_id)).await;
            }
            self.jobs.lock().expect("jobs lock").remove(job_id);
        }
        self.delete_artifacts(&expired).await;
        tracing::info!(
            count = expired.len(),
            "finished jobs past retention deleted"
        );
    }

    /// Deletes the objects (artifacts, patches) of deleted jobs, every attempt's: one pass
    /// over the object store's names.
    async fn delete_artifacts(&self, job_ids: &[String]) {
        let gone: HashSet<&str> = job_ids.iter().map(String::as_str).collect();
        let store = &self.topology.artifacts;
        let mut names = Vec::new();
        match store.list().await {
            Ok(mut list) => {
                while let Some(Ok(info)) = list.next().await {
                    let job = info.name.split('/').next().unwrap_or_default();
                    if gone.contains(job) {
                        names.push(info.name);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list job artifacts"),
        }
        for name in names {
            if let Err(e) = store.delete(&name).await {
                tracing::warn!(object = %name, error = %e, "cannot delete a job artifact");
            }
        }
    }
}

/// Which pending jobs are overdue, and which finished jobs are past their TTL or beyond the
/// retained count (oldest first).
fn plan_sweep(
    jobs: &HashMap<String, JobSummary>,
    now: DateTime<Utc>,
    config: &LifecycleConfig,
) -> (Vec<String>, Vec<String>) {
    let age = |t: DateTime<Utc>| now.signed_duration_since(t).to_std().unwrap_or_default();
    let overdue = jobs
        .iter()
        .filter(|(_, s)| s.status == JobStatus::Pending && age(s.created_at) > config.max_queued)
        .map(|(id, _)| id.clone())
        .collect();
    let mut finished: Vec<(&String, DateTime<Utc>)> = jobs
        .iter()
        .filter(|(_, s)| s.status.is_terminal())
        .map(|(id, s)| (id, s.finished_at.unwrap_or(s.created_at)))
        .collect();
    // Newest first: keep the first `max_retained_jobs`, drop the rest and anything too old.
    finished.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(a.0)));
    let expired = finished
        .iter()
        .enumerate()
        .filter(|(i, (_, at))| *i >= config.max_retained_jobs || age(*at) > config.job_ttl)
        .map(|(_, (id, _))| (*id).clone())
        .collect();
    (overdue, expired)
}

/// Remembers when each node's heartbeat last changed, by this process's clock (no
/// cross-host clock comparison).
#[derive(Default)]
struct NodeWatch {
    seen: HashMap<String, (u64, Instant)>,
    /// The newest heartbeat revision of any node, and since when.
    newest: Option<(u64, Instant)>,
    stalled: bool,
}

impl NodeWatch {
    /// Whether heartbeats still arrive: some node's moved within `window`. When several nodes
    /// go silent at once, it is NATS that is (a stream leader election), and no node is judged
    /// by the silence; the nodes' timers restart when heartbeats come again.
    fn heartbeats_flow(&mut self, newest: u64, window: Duration, nodes: usize) -> bool {
        let now = Instant::now();
        let (last, since) = self.newest.get_or_insert((newest, now));
        if *last != newest {
            (*last, *since) = (newest, now);
            if std::mem::take(&mut self.stalled) {
                for (_, seen_at) in self.seen.values_mut() {
                    *seen_at = now;
                }
            }
            return true;
        }
        self.stalled = nodes > 1 && now.duration_since(*since) > window;
        !self.stalled
    }

    fn is_stale(&mut self, key: &str, revision: u64, ttl: Duration) -> bool {
        let now = Instant::now();
        let (last_revision, since) = self.seen.entry(key.to_owned()).or_insert((revision, now));
        if *last_revision != revision {
            *last_revision = revision;
            *since = now;
        }
        now.duration_since(*since) > ttl
    }

    fn forget(&mut self, key: &str) {
        self.seen.remove(key);
    }

    /// Forgets orphans that are no longer (finished, or their node came back).
    fn keep_orphans<'a>(&mut self, orphans: impl Iterator<Item = &'a str>) {
        let current: HashSet<String> = orphans.map(orphan_key).collect();
        self.seen
            .retain(|key, _| !key.starts_with(ORPHAN_PREFIX) || current.contains(key));
    }
}

/// [`NodeWatch`] keys of orphaned jobs; node keys never start so.
const ORPHAN_PREFIX: &str = "orphan ";

fn orphan_key(job_id: &str) -> String {
    format!("{ORPHAN_PREFIX}{job_id}")
}

/// Notes written per node check: a queue of 20,000 jobs with no node live would otherwise be
/// 20,000 KV writes at once, competing with the submissions (measured: direct intake fell from
/// 20,000 to 11,600 a second).
const WAIT_NOTES_PER_CHECK: usize = 64;

/// How long a job is pending before the leader says what it waits for.
const WAIT_NOTE_AFTER: chrono::TimeDelta = chrono::TimeDelta::seconds(2);

/// How long a running job's node may have no heartbeat before the job is requeued.
const ORPHAN_GRACE: Duration = Duration::from_secs(10);

/// Body of a JetStream max-deliveries advisory (the fields we use).
#[derive(Deserialize)]
struct MaxDeliveries {
    stream_seq: u64,
    deliveries: u64,
}

/// Dead-letters job messages that reached their maximum deliveries: the job is marked failed
/// with the reason, a copy of the message is kept on the dead-letter stream, and the message
/// leaves the work queue. The advisories wait in their stream, so one published while no
/// dispatcher ran is handled when one starts; any replica may take each.
pub(crate) async fn dead_letters(
    topology: Topology,
    metrics: Arc<DispatcherMetrics>,
    stop: CancellationToken,
) {
    let consumer = topology.advisories.clone();
    crate::consume::consume(
        &consumer,
        "max-deliveries advisories",
        &stop,
        1,
        |message| dead_letter_advisory(&topology, &metrics, message),
    )
    .await;
}

async fn dead_letter_advisory(
    topology: &Topology,
    metrics: &DispatcherMetrics,
    message: async_nats::jetstream::Message,
) {
    let ack = match serde_json::from_slice::<MaxDeliveries>(&message.payload) {
        Err(_) => {
            tracing::warn!("undecodable max-deliveries advisory");
            AckKind::Ack
        }
        Ok(advisory) => match dead_letter_one(topology, &advisory).await {
            Ok(()) => {
                metrics.dead_letters.inc();
                AckKind::Ack
            }
            Err(DeadLetterError::Gone) => AckKind::Ack,
            Err(DeadLetterError::Nats(e)) => {
                tracing::warn!(seq = advisory.stream_seq, error = %e, "cannot dead-letter job message, will retry");
                let delivered = message.info().map_or(1, |info| info.delivered);
                AckKind::Nak(Some(flotilla_nats::redelivery_delay(delivered)))
            }
        },
    };
    if let Err(e) = message.ack_with(ack).await {
        tracing::warn!(error = %e, "cannot acknowledge advisory");
    }
}

enum DeadLetterError {
    /// The job message is no longer in the queue: dead-lettered already (this advisory came
    /// twice) or deleted.
    Gone,
    Nats(String),
}

async fn dead_letter_one(
    topology: &Topology,
    advisory: &MaxDeliveries,
) -> Result<(), DeadLetterError> {
    let nats = |e: &dyn std::fmt::Display| DeadLetterError::Nats(e.to_string());
    let stream = topology
        .js
        .get_stream(names::STREAM_JOBS)
        .await
        .map_err(|e| nats(&e))?;
    let raw = match stream.get_raw_message(advisory.stream_seq).await {
        Ok(raw) => raw,
        Err(e)
            if e.kind() == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
        {
            return Err(DeadLetterError::Gone);
        }
        Err(e) => return Err(nats(&e)),
    };
    let payload = raw.payload.clone();
    let job_id =
        flotilla_proto::decode::<flotilla_proto::JobRequest>(&payload, Encoding::MessagePack)
            .map(|request| request.job_id)
            .map_err(|e| nats(&e))?;
    let dead = Transition::DeadLetter {
        deliveries: advisory.deliveries,
    };
    let reason = match topology.jobs.apply(&job_id, &dead).await {
        Ok(applied) => {
            let reason = applied.after.record.error.unwrap_or_default();
            tracing::warn!(job_id, %reason, "job dead-lettered");
            reason
        }
        Err(ApplyError::Refused(_) | ApplyError::NotFound(_)) => {
            format!("gave up after {} deliveries", advisory.deliveries)
        }
        Err(ApplyError::Store(e)) => return Err(nats(&e)),
    };
    flotilla_nats::dead_letter(&topology.js, &job_id, payload, &reason)
        .await
        .map_err(|e| nats(&e))?;
    stream
        .delete_message(advisory.stream_seq)
        .await
        .map_err(|e| nats(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(
        status: JobStatus,
        created_secs_ago: i64,
        finished_secs_ago: Option<i64>,
    ) -> JobSummary {
        let now = Utc::now();
        JobSummary {
            status,
            node_id: None,
            created_at: now - chrono::Duration::seconds(created_secs_ago),
            finished_at: finished_secs_ago.map(|s| now - chrono::Duration::seconds(s)),
            class: None,
            waiting_for: None,
        }
    }

    #[test]
    fn sweep_plan_times_out_and_retains() {
        let config = LifecycleConfig {
            node_check_interval: Duration::from_secs(1),
            sweep_interval: Duration::from_secs(1),
            max_queued: Duration::from_secs(60),
            job_ttl: Duration::from_secs(3600),
            max_retained_jobs: 2,
        };
        let jobs = HashMap::from([
            (
                "fresh-pending".to_owned(),
                summary(JobStatus::Pending, 10, None),
            ),
            (
                "old-pending".to_owned(),
                summary(JobStatus::Pending, 120, None),
            ),
            (
                "old-running".to_owned(),
                summary(JobStatus::Running, 120, None),
            ),
            (
                "done-1".to_owned(),
                summary(JobStatus::Completed, 30, Some(10)),
            ),
            (
                "done-2".to_owned(),
                summary(JobStatus::Failed, 30, Some(20)),
            ),
            (
                "done-3".to_owned(),
                summary(JobStatus::Cancelled, 30, Some(30)),
            ),
            (
                "done-ancient".to_owned(),
                summary(JobStatus::Completed, 9000, Some(7200)),
            ),
        ]);
        let (overdue, mut expired) = plan_sweep(&jobs, Utc::now(), &config);
        assert_eq!(overdue, ["old-pending"]);
        expired.sort();
        assert_eq!(expired, ["done-3", "done-ancient"]);
    }

    #[tokio::test(start_paused = true)]
    async fn node_is_stale_only_after_ttl_without_a_new_revision() {
        let mut watch = NodeWatch::default();
        let ttl = Duration::from_millis(50);
        assert!(!watch.is_stale("n", 1, ttl));
        tokio::time::advance(Duration::from_millis(60)).await;
        assert!(
            !watch.is_stale("n", 2, ttl),
            "a new heartbeat resets the clock"
        );
        tokio::time::advance(Duration::from_millis(60)).await;
        assert!(watch.is_stale("n", 2, ttl));
    }

    #[tokio::test(start_paused = true)]
    async fn nodes_silent_all_at_once_are_not_judged_and_get_a_fresh_start() {
        let mut watch = NodeWatch::default();
        let ttl = Duration::from_millis(50);
        assert!(watch.heartbeats_flow(10, ttl, 2));
        assert!(!watch.is_stale("a", 10, ttl));
        tokio::time::advance(Duration::from_millis(60)).await;
        assert!(!watch.heartbeats_flow(10, ttl, 2), "both silent: a stall");
        tokio::time::advance(Duration::from_millis(60)).await;
        // Heartbeats again, from node b only: a's clock restarts with them.
        assert!(watch.heartbeats_flow(11, ttl, 2));
        assert!(
            !watch.is_stale("a", 10, ttl),
            "a gets a full ttl after the stall"
        );
        tokio::time::advance(Duration::from_millis(60)).await;
        assert!(watch.heartbeats_flow(12, ttl, 2));
        assert!(watch.is_stale("a", 10, ttl), "then its silence is its own");
        // A lone node's silence is its own at once.
        let mut alone = NodeWatch::default();
        assert!(alone.heartbeats_flow(3, ttl, 1));
        tokio::time::advance(Duration::from_millis(60)).await;
        assert!(alone.heartbeats_flow(3, ttl, 1));
    }
}
