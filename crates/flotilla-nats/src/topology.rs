//! Streams, consumers and buckets. Whichever service starts first creates them; the others
//! find them. Creation is idempotent. An existing object whose replicas or limits differ from
//! this service's settings stops the service with an error saying what differs and how to
//! change it, unless the service is told to update it (`FLOTILLA_TOPOLOGY_UPDATE`): settings
//! that must agree across the fleet are checked against what is in NATS.

use std::time::Duration;

use async_nats::jetstream::{
    self, consumer,
    kv::{self, Store},
    stream::{self, DiscardPolicy, RetentionPolicy, StorageType},
};
use flotilla_proto::names;

use crate::{
    GrantStore, JobStore, RunQueues, ScheduleStore,
    drift::{self, Drift, StreamLimits},
};

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
    /// Bytes the artifacts object store may hold.
    pub artifacts_max_bytes: i64,
    /// The largest message a stream takes and the largest value a bucket takes: the server's
    /// `max_payload` (`nats.conf`: 8 MB).
    pub max_message_bytes: i32,
    pub storage: StorageType,
    /// Replicas of every stream, durable consumer and bucket: 1 on one server, 3 on a
    /// three-server cluster.
    pub replicas: usize,
    /// Change existing objects whose replicas or limits differ, instead of refusing to start.
    pub update: bool,
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
    /// Bytes of job artifacts and patches kept (the flotilla_artifacts object store), in
    /// MiB; beyond it new artifacts are refused (the job says so) until retention frees room.
    #[arg(long, env = "FLOTILLA_ARTIFACTS_MAX_MB", default_value_t = 4096)]
    pub artifacts_max_mb: i64,
    /// Fleet-wide cap on job messages handed to nodes and not yet acked: at least the
    /// fleet's total slots, or slots go without work.
    #[arg(long, env = "FLOTILLA_MAX_ACK_PENDING", default_value_t = 1024)]
    pub max_ack_pending: i64,
    /// Replicas of every stream, consumer and bucket: 1 for one nats-server, 3 for a
    /// three-server cluster (at most 5, and no more than the cluster has servers).
    #[arg(long, env = "FLOTILLA_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=5))]
    pub replicas: u8,
    /// Change existing streams, consumers and buckets whose replicas or limits differ from
    /// these settings (where NATS allows it) instead of refusing to start. Give it to one
    /// service, once, when changing the fleet's settings.
    #[arg(long, env = "FLOTILLA_TOPOLOGY_UPDATE")]
    pub topology_update: bool,
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
            artifacts_max_bytes: self.artifacts_max_mb.max(1) << 20,
            max_ack_pending: self.max_ack_pending.max(1),
            replicas: usize::from(self.replicas),
            update: self.topology_update,
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
            artifacts_max_bytes: 4 << 30,
            max_message_bytes: 8 << 20,
            storage: StorageType::File,
            replicas: 1,
            update: false,
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
        name: String,
        source: jetstream::stream::ConsumerError,
    },
    #[error("cannot create bucket {name}: {source}")]
    Bucket {
        name: String,
        source: jetstream::context::CreateKeyValueError,
    },
    #[error("cannot read the settings of {name}: {source}")]
    Inspect {
        name: String,
        source: crate::BoxError,
    },
    #[error(
        "{kind} {name} in NATS differs from this service's settings: {drift}. Start this \
         service with the settings the rest of the fleet uses, or change the {kind} to these \
         settings: start one service once with FLOTILLA_TOPOLOGY_UPDATE=true, or run `{command}` \
         as the account's administrator"
    )]
    Drift {
        kind: &'static str,
        name: String,
        drift: Drift,
        command: String,
    },
    #[error(
        "cannot update {kind} {name} to this service's settings ({drift}): {source}. NATS may \
         refuse the change, or this service's NATS user may not update streams (nats.conf \
         denies it): run `{command}` as the account's administrator"
    )]
    Update {
        kind: &'static str,
        name: String,
        drift: Drift,
        command: String,
        source: crate::BoxError,
    },
}

impl TopologyError {
    /// NATS trouble that may pass (JetStream electing leaders, a request timing out), as
    /// against settings that differ, which only an operator can settle.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Stream { .. }
                | Self::Consumer { .. }
                | Self::Bucket { .. }
                | Self::Inspect { .. }
        )
    }
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
    /// What jobs leave behind: artifacts and patches ([`names::BUCKET_ARTIFACTS`]).
    pub artifacts: jetstream::object_store::ObjectStore,
    /// The run queues, one per priority and job class.
    pub queues: RunQueues,
    /// The dispatchers' shared pull consumer on direct submissions.
    pub intake: consumer::PullConsumer,
    /// The dispatchers' shared pull consumer on max-deliveries advisories (dead letters).
    pub advisories: consumer::PullConsumer,
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
        let Streams {
            submit,
            jobs,
            advisories,
        } = ensure_streams(&js, &config).await?;
        let pull = |name: &str, subject: &str| consumer::pull::Config {
            durable_name: Some(name.to_owned()),
            filter_subject: subject.to_owned(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: config.ack_wait,
            max_deliver: config.max_deliver,
            max_ack_pending: config.max_ack_pending,
            num_replicas: config.replicas,
            ..Default::default()
        };
        // Admission only fails on NATS trouble and is idempotent: a stored submission is
        // retried until admitted, never dropped after a few failures.
        let intake = ensure_consumer(
            &submit,
            consumer::pull::Config {
                max_deliver: -1,
                ..pull(names::CONSUMER_INTAKE, names::SUBJECT_SUBMIT)
            },
            config.update,
        )
        .await?;
        // Dead-lettering is idempotent and must happen however long it takes.
        let advisories = ensure_consumer(
            &advisories,
            consumer::pull::Config {
                max_deliver: -1,
                ..pull(
                    names::CONSUMER_DEAD_LETTERS,
                    &names::max_deliveries_advisory(),
                )
            },
            config.update,
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
                    num_replicas: config.replicas,
                    ..Default::default()
                },
                config.update,
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
        // Engine and profile files (flotilla-config reads and watches them): small, with a
        // short history of changes.
        let config_bucket = kv::Config {
            bucket: names::BUCKET_CONFIG.to_owned(),
            history: 10,
            max_bytes: 64 << 20,
            max_value_size: config.max_message_bytes.min(1 << 20),
            storage: config.storage,
            num_replicas: config.replicas,
            ..Default::default()
        };
        ensure_bucket(&js, config_bucket, config.update).await?;
        let artifacts = ensure_object_store(&js, &config).await?;
        let classes = bucket(names::BUCKET_CLASSES, Duration::ZERO).await?;
        let queues = RunQueues::new(jobs, classes, pull("", ""), config.update);
        Ok(Self {
            js: js.clone(),
            jobs: JobStore::new(job_bucket),
            nodes,
            idempotency,
            dispatch,
            grants: GrantStore::new(grants),
            schedules: ScheduleStore::new(schedules),
            artifacts,
            queues,
            intake,
            advisories,
            config,
        })
    }
}

/// The streams that have consumers.
struct Streams {
    submit: stream::Stream,
    jobs: stream::Stream,
    advisories: stream::Stream,
}

/// Every stream; returns those with consumers.
async fn ensure_streams(
    js: &jetstream::Context,
    config: &TopologyConfig,
) -> Result<Streams, TopologyError> {
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
        num_replicas: config.replicas,
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
        num_replicas: config.replicas,
        ..Default::default()
    };
    let submit = work_queue(names::STREAM_SUBMIT, names::SUBJECT_SUBMIT, 100_000);
    let submit = ensure_stream(js, submit, config.update).await?;
    let run = work_queue(
        names::STREAM_JOBS,
        &format!("{}.>", names::SUBJECT_RUN),
        config.queue_max_messages,
    );
    let jobs = ensure_stream(js, run, config.update).await?;
    let logs = stream::Config {
        max_bytes: config.log_max_bytes,
        duplicate_window: names::DEDUPE_WINDOW,
        ..kept(
            names::STREAM_LOGS,
            names::SUBJECT_LOGS_PREFIX,
            config.log_max_age,
        )
    };
    ensure_stream(js, logs, config.update).await?;
    let week = Duration::from_secs(7 * 24 * 3600);
    let rejected = stream::Config {
        max_messages: 10_000,
        ..kept(names::STREAM_REJECTED, names::SUBJECT_REJECTED_PREFIX, week)
    };
    ensure_stream(js, rejected, config.update).await?;
    let month = Duration::from_secs(30 * 24 * 3600);
    ensure_stream(
        js,
        kept(names::STREAM_DEAD, names::SUBJECT_DEAD_PREFIX, month),
        config.update,
    )
    .await?;
    let advisories = stream::Config {
        subjects: vec![names::max_deliveries_advisory()],
        retention: RetentionPolicy::WorkQueue,
        ..kept(names::STREAM_ADVISORIES, "", month)
    };
    let advisories = ensure_stream(js, advisories, config.update).await?;
    Ok(Streams {
        submit,
        jobs,
        advisories,
    })
}

async fn ensure_stream(
    js: &jetstream::Context,
    config: stream::Config,
    update: bool,
) -> Result<stream::Stream, TopologyError> {
    let name = config.name.clone();
    let wanted = StreamLimits::of(&config);
    let mut stream =
        js.get_or_create_stream(config)
            .await
            .map_err(|source| TopologyError::Stream {
                name: name.clone(),
                source,
            })?;
    let existing = stream.cached_info().config.clone();
    reconcile_stream(js, "stream", &name, existing, &wanted, update).await?;
    if update {
        stream = js.get_stream(&name).await.map_err(|e| inspect(&name, e))?;
    }
    Ok(stream)
}

/// Checks an existing stream against `wanted`; with `update`, changes it.
async fn reconcile_stream(
    js: &jetstream::Context,
    kind: &'static str,
    name: &str,
    existing: stream::Config,
    wanted: &StreamLimits,
    update: bool,
) -> Result<(), TopologyError> {
    let drift = wanted.drift(&existing);
    if drift.is_empty() {
        return Ok(());
    }
    if !update {
        return Err(TopologyError::Drift {
            kind,
            name: name.to_owned(),
            command: drift::stream_command(&existing.name, wanted),
            drift,
        });
    }
    tracing::warn!(%kind, %name, %drift, "updating to this service's settings (FLOTILLA_TOPOLOGY_UPDATE)");
    js.update_stream(wanted.apply(existing))
        .await
        .map_err(|e| update_failed(kind, name, &drift, wanted, e))?;
    Ok(())
}

/// Direct gets are answered by any replica, one that is behind too: a job read from a
/// replica that has not caught up looks unfinished, or missing. With several replicas reads
/// go to the leader; with one, the direct path is as consistent and cheaper.
fn direct_reads(replicas: usize) -> bool {
    replicas <= 1
}

/// Creates a bucket as `create_key_value` would, but with [`direct_reads`].
async fn create_bucket(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<Store, TopologyError> {
    let name = config.bucket.clone();
    let stream = stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: config.history.max(1),
        max_bytes: config.max_bytes,
        max_age: config.max_age,
        max_message_size: config.max_value_size,
        storage: config.storage,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: direct_reads(config.num_replicas),
        num_replicas: config.num_replicas.max(1),
        discard: DiscardPolicy::New,
        ..Default::default()
    };
    if let Err(source) = js.create_stream(stream).await {
        // Another service may have created it meanwhile; if not, say why.
        if let Ok(store) = js.get_key_value(&name).await {
            return Ok(store);
        }
        return Err(TopologyError::Stream { name, source });
    }
    js.get_key_value(&name).await.map_err(|e| inspect(&name, e))
}

fn inspect(name: &str, source: impl std::error::Error + Send + Sync + 'static) -> TopologyError {
    TopologyError::Inspect {
        name: name.to_owned(),
        source: Box::new(source),
    }
}

fn update_failed(
    kind: &'static str,
    name: &str,
    drift: &Drift,
    wanted: &StreamLimits,
    source: impl std::error::Error + Send + Sync + 'static,
) -> TopologyError {
    let stream = match kind {
        "bucket" => format!("KV_{name}"),
        _ => name.to_owned(),
    };
    TopologyError::Update {
        kind,
        name: name.to_owned(),
        drift: drift.clone(),
        command: drift::stream_command(&stream, wanted),
        source: Box::new(source),
    }
}

pub(crate) async fn ensure_consumer(
    stream: &stream::Stream,
    config: consumer::pull::Config,
    update: bool,
) -> Result<consumer::PullConsumer, TopologyError> {
    let name = config.durable_name.clone().unwrap_or_default();
    let consumer_error = |source| TopologyError::Consumer {
        name: name.clone(),
        source,
    };
    let mut consumer = stream
        .get_or_create_consumer::<consumer::pull::Config>(&name, config.clone())
        .await
        .map_err(consumer_error)?;
    let drift = drift::consumer_drift(&consumer.cached_info().config, &config);
    if drift.is_empty() {
        return Ok(consumer);
    }
    let stream_name = &stream.cached_info().config.name;
    let command = format!(
        "nats consumer edit {stream_name} {name} --replicas {} --wait {}s --max-deliver {} \
         --max-pending {}",
        config.num_replicas,
        config.ack_wait.as_secs(),
        config.max_deliver,
        config.max_ack_pending
    );
    if !update {
        return Err(TopologyError::Drift {
            kind: "consumer",
            name,
            drift,
            command,
        });
    }
    tracing::warn!(consumer = %name, %drift, "updating to this service's settings (FLOTILLA_TOPOLOGY_UPDATE)");
    consumer = stream
        .update_consumer(config)
        .await
        .map_err(|e| TopologyError::Update {
            kind: "consumer",
            name: name.clone(),
            drift,
            command,
            source: Box::new(e),
        })?;
    Ok(consumer)
}

/// The artifacts object store: no TTL (retention deletes a job's objects with its record).
async fn ensure_object_store(
    js: &jetstream::Context,
    config: &TopologyConfig,
) -> Result<jetstream::object_store::ObjectStore, TopologyError> {
    let name = names::BUCKET_ARTIFACTS;
    let direct = direct_reads(config.replicas);
    if js.get_object_store(name).await.is_err() {
        // The stream async-nats' create_object_store makes, with the bounds every stream has
        // here and, on a cluster, reads from the leader (as the buckets).
        js.get_or_create_stream(stream::Config {
            name: format!("OBJ_{name}"),
            subjects: vec![format!("$O.{name}.C.>"), format!("$O.{name}.M.>")],
            max_bytes: config.artifacts_max_bytes,
            max_message_size: config.max_message_bytes,
            storage: config.storage,
            num_replicas: config.replicas,
            discard: stream::DiscardPolicy::New,
            allow_rollup: true,
            allow_direct: direct,
            ..Default::default()
        })
        .await
        .map_err(|e| inspect(name, e))?;
    }
    let store = js
        .get_object_store(name)
        .await
        .map_err(|e| inspect(name, e))?;
    let wanted = StreamLimits {
        replicas: config.replicas.max(1),
        max_messages: None,
        max_bytes: config.artifacts_max_bytes,
        max_age: Duration::ZERO,
        max_message_size: config.max_message_bytes,
        direct: Some(direct),
    }
    .normalized();
    let mut stream = js
        .get_stream(format!("OBJ_{name}"))
        .await
        .map_err(|e| inspect(name, e))?;
    let existing = stream
        .info()
        .await
        .map_err(|e| inspect(name, e))?
        .config
        .clone();
    reconcile_stream(js, "object store", name, existing, &wanted, config.update).await?;
    Ok(store)
}

async fn ensure_bucket(
    js: &jetstream::Context,
    config: kv::Config,
    update: bool,
) -> Result<Store, TopologyError> {
    let name = config.bucket.clone();
    let wanted = StreamLimits {
        replicas: config.num_replicas.max(1),
        max_messages: None,
        max_bytes: config.max_bytes,
        max_age: config.max_age,
        max_message_size: config.max_value_size,
        direct: Some(direct_reads(config.num_replicas)),
    }
    .normalized();
    let store = match js.get_key_value(&name).await {
        Ok(store) => store,
        Err(_) => create_bucket(js, config).await?,
    };
    let mut stream = js
        .get_stream(format!("KV_{name}"))
        .await
        .map_err(|e| inspect(&name, e))?;
    let existing = stream
        .info()
        .await
        .map_err(|e| inspect(&name, e))?
        .config
        .clone();
    reconcile_stream(js, "bucket", &name, existing, &wanted, update).await?;
    Ok(store)
}
