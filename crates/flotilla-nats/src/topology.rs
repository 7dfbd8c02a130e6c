//! Streams, consumers and buckets. Whichever service starts first creates them; the others
//! find them. Creation is idempotent: an existing object is used as it is.

use std::time::Duration;

use async_nats::jetstream::{
    self, consumer,
    kv::{self, Store},
    stream::{self, DiscardPolicy, RetentionPolicy, StorageType},
};
use flotilla_proto::names;

use crate::{GrantStore, JobStore, ScheduleStore};

/// How long a dispatcher leader lease lives without being refreshed.
pub const LEADER_LEASE: Duration = Duration::from_secs(5);

/// Tunables for the topology. Defaults suit a single-host stack; tests shorten the timings.
#[derive(Debug, Clone)]
pub struct TopologyConfig {
    /// How long a node may hold a job without a progress ack before JetStream redelivers it.
    pub ack_wait: Duration,
    /// Deliveries of one job message before JetStream gives up on it.
    pub max_deliver: i64,
    /// Fleet-wide cap on jobs handed out and not yet acked.
    pub max_ack_pending: i64,
    /// Queue bound: beyond it, publishing a job fails (and the API answers 503).
    pub queue_max_messages: i64,
    /// How long job output stays replayable.
    pub log_max_age: Duration,
    /// Total bytes of job output kept; beyond it the oldest output goes first.
    pub log_max_bytes: i64,
    /// How long an `Idempotency-Key` is remembered.
    pub idempotency_ttl: Duration,
    /// Bytes each work queue (direct submissions, the run queue) may hold; beyond it a
    /// submission is refused (the API answers 503).
    pub queue_max_bytes: i64,
    /// Bytes the rejected and dead-letter streams each keep; the oldest go first.
    pub kept_max_bytes: i64,
    /// Bytes each KV bucket may hold; beyond it new records are refused (503).
    pub bucket_max_bytes: i64,
    /// The largest message a stream takes and the largest value a bucket takes: the server's
    /// `max_payload` (`nats.conf`: 8 MB).
    pub max_message_bytes: i32,
    pub storage: StorageType,
}

/// The topology settings every service takes, so that whichever starts first creates the
/// same objects.
#[derive(Debug, Clone, clap::Args)]
pub struct TopologyArgs {
    /// Seconds a node may hold a job without a progress ack before it is redelivered.
    #[arg(long, env = "FLOTILLA_ACK_WAIT_SECS", default_value_t = 30)]
    pub ack_wait_secs: u64,
    /// Deliveries of a job message (attempts) before it is dead-lettered.
    #[arg(long, env = "FLOTILLA_MAX_DELIVER", default_value_t = 5)]
    pub max_deliver: i64,
    /// Queue bound: beyond it, POST /jobs answers 503 with Retry-After.
    #[arg(long, env = "FLOTILLA_QUEUE_MAX", default_value_t = 100_000)]
    pub queue_max: i64,
    /// Total job output kept for replay, in MiB (oldest dropped first; each job's output is
    /// also capped by its node).
    #[arg(long, env = "FLOTILLA_LOGS_MAX_MB", default_value_t = 8192)]
    pub logs_max_mb: i64,
    /// Bytes each work queue (direct submissions, the run queue) may hold, in MiB.
    #[arg(long, env = "FLOTILLA_QUEUE_MAX_MB", default_value_t = 1024)]
    pub queue_max_mb: i64,
    /// Bytes the rejected and dead-letter streams each keep, in MiB (oldest dropped first).
    #[arg(long, env = "FLOTILLA_KEPT_MAX_MB", default_value_t = 256)]
    pub kept_max_mb: i64,
    /// Bytes each KV bucket (jobs, nodes, schedules, ...) may hold, in MiB.
    #[arg(long, env = "FLOTILLA_BUCKET_MAX_MB", default_value_t = 1024)]
    pub bucket_max_mb: i64,
}

impl TopologyArgs {
    pub fn into_config(self) -> TopologyConfig {
        TopologyConfig {
            ack_wait: Duration::from_secs(self.ack_wait_secs.max(1)),
            max_deliver: self.max_deliver.max(1),
            queue_max_messages: self.queue_max.max(1),
            log_max_bytes: self.logs_max_mb.max(1) << 20,
            queue_max_bytes: self.queue_max_mb.max(1) << 20,
            kept_max_bytes: self.kept_max_mb.max(1) << 20,
            bucket_max_bytes: self.bucket_max_mb.max(1) << 20,
            ..TopologyConfig::default()
        }
    }
}

impl Default for TopologyConfig {
    fn default() -> Self {
        Self {
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            max_ack_pending: 1024,
            queue_max_messages: 100_000,
            log_max_age: Duration::from_secs(24 * 3600),
            log_max_bytes: 8 << 30,
            idempotency_ttl: Duration::from_secs(24 * 3600),
            queue_max_bytes: 1 << 30,
            kept_max_bytes: 256 << 20,
            bucket_max_bytes: 1 << 30,
            max_message_bytes: 8 << 20,
            storage: StorageType::File,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot create stream {name}: {source}")]
    Stream {
        name: String,
        source: jetstream::context::CreateStreamError,
    },
    #[error("cannot create consumer {name}: {source}")]
    Consumer {
        name: &'static str,
        source: jetstream::stream::ConsumerError,
    },
    #[error("cannot create bucket {name}: {source}")]
    Bucket {
        name: String,
        source: jetstream::context::CreateKeyValueError,
    },
}

/// Handles on everything a service may need. Cheap to clone.
#[derive(Clone)]
pub struct Topology {
    pub js: jetstream::Context,
    pub jobs: JobStore,
    pub nodes: Store,
    pub idempotency: Store,
    /// Dispatcher coordination (the leader lease).
    pub dispatch: Store,
    /// Per-job llm-gateway grants.
    pub grants: GrantStore,
    /// Schedules (API writes, dispatcher leader fires).
    pub schedules: ScheduleStore,
    /// The fleet's shared pull consumer on the run queue.
    pub agents: consumer::PullConsumer,
    /// The dispatchers' shared pull consumer on direct submissions.
    pub intake: consumer::PullConsumer,
    pub config: TopologyConfig,
}

impl Topology {
    /// Creates every stream, consumer and bucket the system uses, or checks that they are
    /// there; any number of services may do this at once.
    pub async fn ensure(
        client: async_nats::Client,
        config: TopologyConfig,
    ) -> Result<Self, TopologyError> {
        let js = jetstream::new(client);
        let (submit, jobs) = ensure_streams(&js, &config).await?;
        let pull = |name: &str, subject: &str| consumer::pull::Config {
            durable_name: Some(name.to_owned()),
            filter_subject: subject.to_owned(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: config.ack_wait,
            max_deliver: config.max_deliver,
            max_ack_pending: config.max_ack_pending,
            ..Default::default()
        };
        let agents = ensure_consumer(
            &jobs,
            names::CONSUMER_AGENTS,
            pull(names::CONSUMER_AGENTS, names::SUBJECT_RUN),
        )
        .await?;
        // Admission only fails on NATS trouble and is idempotent: a stored submission is
        // retried until admitted, never dropped after a few failures.
        let intake = ensure_consumer(
            &submit,
            names::CONSUMER_INTAKE,
            consumer::pull::Config {
                max_deliver: -1,
                ..pull(names::CONSUMER_INTAKE, names::SUBJECT_SUBMIT)
            },
        )
        .await?;
        let bucket = |name: &str, max_age: Duration| {
            ensure_bucket(
                &js,
                kv::Config {
                    bucket: name.to_owned(),
                    history: 1,
                    max_age,
                    max_bytes: config.bucket_max_bytes,
                    max_value_size: config.max_message_bytes,
                    storage: config.storage,
                    ..Default::default()
                },
            )
        };
        // No TTL (zero): a job lives until retention deletes it, a schedule until it is deleted.
        let job_bucket = bucket(names::BUCKET_JOBS, Duration::ZERO).await?;
        // Heartbeats of nodes that stopped long ago vanish by themselves.
        let nodes = bucket(names::BUCKET_NODES, Duration::from_secs(3600)).await?;
        let idempotency = bucket(names::BUCKET_IDEMPOTENCY, config.idempotency_ttl).await?;
        // The leader refreshes its lease every second; a dead leader's lease expires.
        let dispatch = bucket(names::BUCKET_DISPATCH, LEADER_LEASE).await?;
        // A grant lives at most as long as its job's timeout (24 h); one its node could not
        // revoke vanishes by itself after that.
        let grants = bucket(names::BUCKET_LLM_GRANTS, Duration::from_secs(48 * 3600)).await?;
        let schedules = bucket(names::BUCKET_SCHEDULES, Duration::ZERO).await?;
        Ok(Self {
            js: js.clone(),
            jobs: JobStore::new(job_bucket),
            nodes,
            idempotency,
            dispatch,
            grants: GrantStore::new(grants),
            schedules: ScheduleStore::new(schedules),
            agents,
            intake,
            config,
        })
    }
}

/// The streams; returns the two work queues (direct submissions, the run queue).
async fn ensure_streams(
    js: &jetstream::Context,
    config: &TopologyConfig,
) -> Result<(stream::Stream, stream::Stream), TopologyError> {
    let work_queue = |name: &'static str, subject: &str, max_messages: i64| stream::Config {
        name: name.to_owned(),
        subjects: vec![subject.to_owned()],
        retention: RetentionPolicy::WorkQueue,
        storage: config.storage,
        // Refuse new work when full rather than silently dropping accepted work.
        discard: DiscardPolicy::New,
        max_messages,
        max_bytes: config.queue_max_bytes,
        max_message_size: config.max_message_bytes,
        duplicate_window: names::DEDUPE_WINDOW,
        ..Default::default()
    };
    let kept = |name: &'static str, prefix: &str, max_age: Duration| stream::Config {
        name: name.to_owned(),
        subjects: vec![format!("{prefix}.>")],
        retention: RetentionPolicy::Limits,
        storage: config.storage,
        max_age,
        max_bytes: config.kept_max_bytes,
        max_message_size: config.max_message_bytes,
        ..Default::default()
    };
    let submit = work_queue(names::STREAM_SUBMIT, names::SUBJECT_SUBMIT, 100_000);
    let submit = ensure_stream(js, submit).await?;
    let run = work_queue(
        names::STREAM_JOBS,
        names::SUBJECT_RUN,
        config.queue_max_messages,
    );
    let jobs = ensure_stream(js, run).await?;
    let logs = stream::Config {
        max_bytes: config.log_max_bytes,
        duplicate_window: names::DEDUPE_WINDOW,
        ..kept(
            names::STREAM_LOGS,
            names::SUBJECT_LOGS_PREFIX,
            config.log_max_age,
        )
    };
    ensure_stream(js, logs).await?;
    let week = Duration::from_secs(7 * 24 * 3600);
    let rejected = stream::Config {
        max_messages: 10_000,
        ..kept(names::STREAM_REJECTED, names::SUBJECT_REJECTED_PREFIX, week)
    };
    ensure_stream(js, rejected).await?;
    let month = Duration::from_secs(30 * 24 * 3600);
    ensure_stream(
        js,
        kept(names::STREAM_DEAD, names::SUBJECT_DEAD_PREFIX, month),
    )
    .await?;
    Ok((submit, jobs))
}

async fn ensure_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, TopologyError> {
    let name = config.name.clone();
    js.get_or_create_stream(config)
        .await
        .map_err(|source| TopologyError::Stream { name, source })
}

async fn ensure_consumer(
    stream: &stream::Stream,
    name: &'static str,
    config: consumer::pull::Config,
) -> Result<consumer::PullConsumer, TopologyError> {
    stream
        .get_or_create_consumer::<consumer::pull::Config>(name, config)
        .await
        .map_err(|source| TopologyError::Consumer { name, source })
}

async fn ensure_bucket(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<Store, TopologyError> {
    if let Ok(store) = js.get_key_value(&config.bucket).await {
        return Ok(store);
    }
    let name = config.bucket.clone();
    js.create_key_value(config)
        .await
        .map_err(|source| TopologyError::Bucket { name, source })
}
