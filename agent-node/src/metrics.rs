//! `GET /metrics` of an agent-node (Prometheus text format 0.0.4), on
//! `FLOTILLA_NODE_METRICS_LISTEN`. Every label has a fixed, small set of values.

use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio_util::sync::CancellationToken;

use crate::Shared;

/// Upper bounds (seconds) for job creation → process running: milliseconds when a node is
/// idle and its pool warm, up to minutes when jobs queue behind busy slots.
const DISPATCH_BUCKETS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
];
/// Upper bounds (seconds) for receipt → process running: about a millisecond from the warm
/// pool, a few hundred from a cold `docker create` + `start`.
const START_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How one attempt on this node ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Finish {
    /// Recorded with this status (directly or later from the outbox).
    Completed,
    Failed,
    Cancelled,
    /// The node shut down first; the job went back to the queue.
    HandedBack,
    /// Docker (or the engine lookup) failed; the job went back to the queue for a retry.
    Retried,
    /// Another attempt owned the job when this one tried to record its outcome.
    LeaseLost,
    /// The outcome could not be recorded, or the record had vanished.
    Abandoned,
}

impl Finish {
    pub(crate) fn from_status(status: flotilla_proto::JobStatus) -> Self {
        use flotilla_proto::JobStatus;
        match status {
            JobStatus::Completed => Self::Completed,
            JobStatus::Cancelled => Self::Cancelled,
            // A recorded outcome is terminal; anything else would be a bug, counted as failed.
            JobStatus::Failed | JobStatus::Pending | JobStatus::Running => Self::Failed,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::HandedBack => "handed_back",
            Self::Retried => "retried",
            Self::LeaseLost => "lease_lost",
            Self::Abandoned => "abandoned",
        }
    }
}

impl EncodeLabelValue for Finish {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: Finish,
}

/// Where the job's container came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum PoolUse {
    Hit,
    Miss,
}

impl EncodeLabelValue for PoolUse {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        let value = match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
        };
        EncodeLabelValue::encode(&value, encoder)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PoolLabel {
    pool: PoolUse,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StreamLabel {
    stream: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The node's instruments. Cloned handles share their values with the registry.
pub(crate) struct NodeMetrics {
    registry: Registry,
    received: Counter,
    redelivered: Counter,
    started: Counter,
    finished: Family<OutcomeLabel, Counter>,
    dispatch_latency: Histogram,
    container_start: HistogramFamily<PoolLabel>,
    log_bytes: Family<StreamLabel, Counter>,
    log_bytes_dropped: Counter,
    /// Shared with the pool, which counts hits, misses and refills itself.
    pub(crate) pool: PoolMetrics,
    // Set at scrape time.
    slots: Gauge,
    running: Gauge,
    warm: Gauge,
    outbox: Gauge,
}

/// The warm pool's instruments.
#[derive(Debug, Clone)]
pub(crate) struct PoolMetrics {
    pub(crate) hits: Counter,
    pub(crate) misses: Counter,
    pub(crate) refill_seconds: Histogram,
}

impl Default for PoolMetrics {
    fn default() -> Self {
        Self {
            hits: Counter::default(),
            misses: Counter::default(),
            refill_seconds: Histogram::new(START_BUCKETS),
        }
    }
}

impl Default for NodeMetrics {
    fn default() -> Self {
        let mut metrics = Self {
            registry: Registry::default(),
            received: Counter::default(),
            redelivered: Counter::default(),
            started: Counter::default(),
            finished: Family::default(),
            dispatch_latency: Histogram::new(DISPATCH_BUCKETS),
            container_start: Family::new_with_constructor(|| Histogram::new(START_BUCKETS)),
            log_bytes: Family::default(),
            log_bytes_dropped: Counter::default(),
            pool: PoolMetrics::default(),
            slots: Gauge::default(),
            running: Gauge::default(),
            warm: Gauge::default(),
            outbox: Gauge::default(),
        };
        metrics.register();
        metrics
    }
}

impl NodeMetrics {
    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "flotilla_node_jobs_received",
            "Job messages received, redeliveries included",
            self.received.clone(),
        );
        r.register(
            "flotilla_node_jobs_redelivered",
            "Job messages received again (a retry, a lost node's job, an expired ack wait)",
            self.redelivered.clone(),
        );
        r.register(
            "flotilla_node_jobs_started",
            "Job attempts claimed and run on this node",
            self.started.clone(),
        );
        r.register(
            "flotilla_node_jobs_finished",
            "Job attempts ended on this node, by outcome",
            self.finished.clone(),
        );
        r.register(
            "flotilla_dispatch_latency_seconds",
            "First attempts: from the job's creation (created_at, the submitter's clock) to its process running",
            self.dispatch_latency.clone(),
        );
        r.register(
            "flotilla_container_start_seconds",
            "From a job message's receipt to its process running, by warm-pool hit or miss",
            self.container_start.clone(),
        );
        r.register(
            "flotilla_node_log_bytes",
            "Job output bytes kept and published, by stream",
            self.log_bytes.clone(),
        );
        r.register(
            "flotilla_node_log_bytes_dropped",
            "Job output bytes beyond the per-attempt cap, not kept",
            self.log_bytes_dropped.clone(),
        );
        r.register(
            "flotilla_node_pool_hits",
            "Jobs that took a warm container",
            self.pool.hits.clone(),
        );
        r.register(
            "flotilla_node_pool_misses",
            "Jobs that needed a cold start",
            self.pool.misses.clone(),
        );
        r.register(
            "flotilla_node_pool_refill_seconds",
            "Time to prepare one warm container (create, attach, start)",
            self.pool.refill_seconds.clone(),
        );
        r.register("flotilla_node_slots", "Job slots", self.slots.clone());
        r.register(
            "flotilla_node_jobs_running",
            "Jobs on this node now",
            self.running.clone(),
        );
        r.register(
            "flotilla_node_pool_warm",
            "Warm containers ready now",
            self.warm.clone(),
        );
        r.register(
            "flotilla_node_outbox_entries",
            "Log chunks and outcomes waiting in the outbox for NATS",
            self.outbox.clone(),
        );
    }

    pub(crate) fn received(&self, delivered: i64) {
        self.received.inc();
        if delivered > 1 {
            self.redelivered.inc();
        }
    }

    pub(crate) fn started(&self) {
        self.started.inc();
    }

    pub(crate) fn finished(&self, finish: Finish) {
        self.finished
            .get_or_create(&OutcomeLabel { outcome: finish })
            .inc();
    }

    /// The job's process runs: `since_receipt` on this node, `since_created` since it was
    /// submitted (first attempts only; `None` otherwise).
    pub(crate) fn process_running(
        &self,
        pool: PoolUse,
        since_receipt: std::time::Duration,
        since_created: Option<std::time::Duration>,
    ) {
        self.container_start
            .get_or_create(&PoolLabel { pool })
            .observe(since_receipt.as_secs_f64());
        if let Some(latency) = since_created {
            self.dispatch_latency.observe(latency.as_secs_f64());
        }
    }

    pub(crate) fn log_bytes(&self, stream: flotilla_proto::LogStream, kept: usize, dropped: usize) {
        let stream = match stream {
            flotilla_proto::LogStream::Stdout => "stdout",
            flotilla_proto::LogStream::Stderr => "stderr",
            flotilla_proto::LogStream::System => "system",
        };
        if kept > 0 {
            self.log_bytes
                .get_or_create(&StreamLabel { stream })
                .inc_by(kept as u64);
        }
        if dropped > 0 {
            self.log_bytes_dropped.inc_by(dropped as u64);
        }
    }

    fn render(&self, shared: &Shared) -> String {
        self.slots.set(i64::from(shared.config.slots));
        self.running
            .set(shared.running.lock().expect("running map").len() as i64);
        self.warm
            .set(i64::from(shared.pool.stats().warm.values().sum::<u32>()));
        self.outbox.set(shared.outbox.len() as i64);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves `GET /metrics` on `listener` until `stop`.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let app = Router::new()
        .route("/metrics", get(render))
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "metrics server failed");
    }
}

async fn render(State(shared): State<Arc<Shared>>) -> Response {
    let mut response = shared.metrics.render(&shared).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(prometheus_client::encoding::prometheus_text::CONTENT_TYPE),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_and_labelled_counters_render_in_text_format() {
        let metrics = NodeMetrics::default();
        metrics.finished(Finish::Completed);
        metrics.finished(Finish::HandedBack);
        metrics.process_running(
            PoolUse::Hit,
            std::time::Duration::from_millis(2),
            Some(std::time::Duration::from_millis(30)),
        );
        metrics.log_bytes(flotilla_proto::LogStream::Stdout, 10, 0);
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &metrics.registry).unwrap();
        for line in [
            "flotilla_node_jobs_finished_total{outcome=\"completed\"} 1",
            "flotilla_node_jobs_finished_total{outcome=\"handed_back\"} 1",
            "flotilla_dispatch_latency_seconds_count 1",
            "flotilla_container_start_seconds_count{pool=\"hit\"} 1",
            "flotilla_container_start_seconds_bucket{pool=\"hit\",le=\"0.0025\"} 1",
            "flotilla_node_log_bytes_total{stream=\"stdout\"} 10",
        ] {
            assert!(
                out.lines().any(|l| l == line),
                "missing {line:?} in:\n{out}"
            );
        }
    }
}
