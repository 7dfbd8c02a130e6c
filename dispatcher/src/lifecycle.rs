//! The fleet-wide lifecycle, run by the elected leader among dispatcher replicas: lost nodes,
//! jobs queued too long, retention of finished jobs. Dead letters are handled by whichever
//! replica the advisory reaches (a queue group), so every replica shares that work.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::jetstream::kv;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use flotilla_nats::{ApplyError, Topology, WatchEvent};
use flotilla_proto::{Encoding, JobStatus, NodeInfo, Transition, names};
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::metrics::DispatcherMetrics;

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
}

/// How often the leader looks for webhooks to send.
const WEBHOOK_CHECK: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
pub(crate) struct JobSummary {
    status: JobStatus,
    node_id: Option<String>,
    created_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
}

/// Holds the leader lease while this replica is alive: `true` on the channel while leading.
pub(crate) async fn elect(
    topology: Topology,
    stop: CancellationToken,
    leading: watch::Sender<bool>,
) {
    let me = uuid::Uuid::new_v4().to_string();
    let mut revision: Option<u64> = None;
    let mut ticker = tokio::time::interval(Duration::from_millis(1000));
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let value = Bytes::from(me.clone());
        revision = match revision {
            Some(rev) => topology
                .dispatch
                .update(names::KEY_LEADER, value, rev)
                .await
                .ok(),
            None => topology
                .dispatch
                .create(names::KEY_LEADER, value)
                .await
                .ok(),
        };
        let now_leading = revision.is_some();
        if *leading.borrow() != now_leading {
            tracing::info!(leader = now_leading, "dispatcher leadership changed");
            let _ = leading.send(now_leading);
        }
    }
    // Step down at once so another replica takes over without waiting for the lease to expire.
    if let Some(rev) = revision {
        let _ = topology
            .dispatch
            .delete_expect_revision(names::KEY_LEADER, Some(rev))
            .await;
    }
}

impl Lifecycle {
    /// Runs the leader's duties while `leading` is true.
    pub(crate) async fn run(
        self: Arc<Self>,
        mut leading: watch::Receiver<bool>,
        stop: CancellationToken,
    ) {
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

    /// Finds nodes whose heartbeat stopped and hands their jobs back to the queue at once.
    async fn check_nodes(&self, nodes: &mut NodeWatch) {
        let entries = match node_entries(&self.topology.nodes).await {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read node heartbeats");
                return;
            }
        };
        for (key, entry) in entries {
            let Ok(info) = flotilla_proto::decode::<NodeInfo>(&entry.value, Encoding::MessagePack)
            else {
                continue;
            };
            let ttl = Duration::from_millis(info.ttl_ms);
            if !nodes.is_stale(&key, entry.revision, ttl) {
                continue;
            }
            let held: Vec<String> = {
                let jobs = self.jobs.lock().expect("jobs lock");
                jobs.iter()
                    .filter(|(_, s)| {
                        s.status == JobStatus::Running
                            && s.node_id.as_deref() == Some(info.node_id.as_str())
                    })
                    .map(|(id, _)| id.clone())
                    .collect()
            };
            tracing::warn!(node_id = %info.node_id, jobs = held.len(), "node lost");
            self.metrics.lost_nodes.inc();
            for job_id in &held {
                self.requeue_lost(&info.node_id, job_id).await;
            }
            // Only if no fresh heartbeat arrived meanwhile.
            let _ = self
                .topology
                .nodes
                .delete_expect_revision(&key, Some(entry.revision))
                .await;
            nodes.forget(&key);
        }
    }

    /// Marks the lost node's attempt ended and hands the job's message back to the queue at
    /// once (instead of after its ack wait), so another node picks it up.
    async fn requeue_lost(&self, node_id: &str, job_id: &str) {
        let requeue = Transition::Requeue {
            node_id: node_id.to_owned(),
        };
        let ack_subject = match self.topology.jobs.apply(job_id, &requeue).await {
            Ok(applied) => applied.before.ack_subject,
            // Finished, or taken by another node meanwhile: nothing to hand back.
            Err(ApplyError::Refused(_) | ApplyError::NotFound(_)) => return,
            Err(ApplyError::Store(e)) => {
                tracing::warn!(job_id, error = %e, "cannot record lost attempt");
                return;
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
                        let summary = JobSummary {
                            status: record.status,
                            node_id: record.node_id.clone(),
                            created_at: record.created_at,
                            finished_at: record.finished_at,
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
        tracing::info!(
            count = expired.len(),
            "finished jobs past retention deleted"
        );
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
}

impl NodeWatch {
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
}

async fn node_entries(nodes: &kv::Store) -> Result<Vec<(String, kv::Entry)>, String> {
    let keys: Vec<String> = nodes
        .keys()
        .await
        .map_err(|e| e.to_string())?
        .try_collect()
        .await
        .map_err(|e| e.to_string())?;
    let mut entries = Vec::with_capacity(keys.len());
    for key in keys {
        if let Ok(Some(entry)) = nodes.entry(key.clone()).await
            && entry.operation == kv::Operation::Put
        {
            entries.push((key, entry));
        }
    }
    Ok(entries)
}

/// Body of a JetStream max-deliveries advisory (the fields we use).
#[derive(Deserialize)]
struct MaxDeliveries {
    stream_seq: u64,
    deliveries: u64,
}

/// Dead-letters job messages that reached their maximum deliveries: the job is marked failed
/// with the reason, a copy of the message is kept on the dead-letter stream, and the message
/// leaves the work queue.
pub(crate) async fn dead_letters(
    client: async_nats::Client,
    topology: Topology,
    metrics: Arc<DispatcherMetrics>,
    stop: CancellationToken,
) -> Result<(), async_nats::SubscribeError> {
    let mut advisories = client
        .queue_subscribe(
            names::max_deliveries_advisory(),
            names::QUEUE_DISPATCHERS.to_owned(),
        )
        .await?;
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            message = advisories.next() => message,
        };
        let Some(message) = message else {
            return Ok(());
        };
        let Ok(advisory) = serde_json::from_slice::<MaxDeliveries>(&message.payload) else {
            tracing::warn!("undecodable max-deliveries advisory");
            continue;
        };
        match dead_letter_one(&topology, &advisory).await {
            Ok(()) => {
                metrics.dead_letters.inc();
            }
            Err(e) => {
                tracing::warn!(seq = advisory.stream_seq, error = %e, "cannot dead-letter job message");
            }
        }
    }
}

async fn dead_letter_one(topology: &Topology, advisory: &MaxDeliveries) -> Result<(), String> {
    let stream = topology
        .js
        .get_stream(names::STREAM_JOBS)
        .await
        .map_err(|e| e.to_string())?;
    let raw = stream
        .get_raw_message(advisory.stream_seq)
        .await
        .map_err(|e| e.to_string())?;
    let payload = raw.payload.clone();
    let job_id =
        flotilla_proto::decode::<flotilla_proto::JobRequest>(&payload, Encoding::MessagePack)
            .map(|request| request.job_id)
            .map_err(|e| e.to_string())?;
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
        Err(ApplyError::Store(e)) => return Err(e.to_string()),
    };
    flotilla_nats::dead_letter(&topology.js, &job_id, payload, &reason)
        .await
        .map_err(|e| e.to_string())?;
    stream
        .delete_message(advisory.stream_seq)
        .await
        .map_err(|e| e.to_string())?;
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
}
