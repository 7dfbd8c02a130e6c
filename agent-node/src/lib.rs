//! The agent-node: pulls jobs from the shared JetStream consumer, never more than it has free
//! slots, and runs each in a fresh hardened container. One per Docker host; add nodes to add
//! capacity. The containers come from a [`ContainerRuntime`]: Docker in production
//! ([`run`]), any other through [`run_with_runtime`].

mod args;
mod binaries;
mod config;
mod decide;
pub(crate) mod egress;
mod exit_report;
mod fence;
mod forge;
mod git;
mod identity;
mod job;
mod lease;
mod llm_health;
mod logs;
mod marker;
mod metrics;
mod outbox;
mod pool;
mod routes;
pub mod runtime;
mod script;
mod workspace;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::Utc;
use flotilla_config::LiveCatalog;
use flotilla_nats::Topology;
use flotilla_proto::{NodeInfo, names};
use flotilla_service::{NatsConfig, Service};
use futures::StreamExt;
use tokio::{net::TcpListener, sync::Semaphore, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use args::Args;
pub use config::{Config, ConfigError, parse_labels, parse_pool_images};
pub use forge::Credentials;
pub use git::GitConfig;
pub use runtime::{ContainerRuntime, DockerRuntime, RuntimeError};
pub use workspace::OutputLimits;

use runtime::{ContainerSpec, Listed, Network, Selector};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Start(#[from] flotilla_service::StartError),
    #[error("the container runtime is not usable: {0}")]
    Runtime(#[from] RuntimeError),
    #[error("worker image {0} is missing: build it with scripts/build-image")]
    MissingImage(String),
    #[error("cannot open the outbox: {0}")]
    Outbox(#[from] outbox::OutboxError),
    #[error("cannot subscribe to cancels: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    /// The job network cannot be set up or is unsafe.
    #[error(transparent)]
    Network(RuntimeError),
    #[error(transparent)]
    NodeIdInUse(#[from] identity::NodeIdInUse),
}

/// State shared by the pull loop and the job tasks.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) topology: Topology,
    pub(crate) runtime: Arc<dyn ContainerRuntime>,
    /// Engines, kept current from the shared configuration.
    pub(crate) catalog: Arc<LiveCatalog>,
    /// Cancel tokens of the jobs on this node, by job id.
    pub(crate) running: Mutex<HashMap<String, CancellationToken>>,
    /// Cancelled when the drain grace period is over: stop every container and hand jobs back.
    pub(crate) hard_stop: CancellationToken,
    pub(crate) client: async_nats::Client,
    /// Where logs and outcomes wait while NATS is unreachable.
    pub(crate) outbox: outbox::Outbox,
    pub(crate) pool: pool::Pool,
    /// Container removals in flight; waited for before the node exits.
    pub(crate) removals: TaskTracker,
    /// The llm-gateway's base URL as job containers see it, when jobs may call it.
    pub(crate) llm_url: Option<String>,
    /// With `llm_url`: checks the job network is still fenced before a job is let on it.
    pub(crate) fence: Option<fence::FenceCheck>,
    /// Providers the llm-gateway holds a credential for (from its `/health`).
    pub(crate) llm_providers: Arc<Mutex<Vec<String>>>,
    /// Which engine binaries the worker image has.
    pub(crate) binaries: binaries::Binaries,
    /// The container spec of those probes.
    pub(crate) probe_key: ContainerSpec,
    /// The run queues this node pulls from.
    pub(crate) routes: routes::Routes,
    /// The OCI runtimes this host's Docker has.
    pub(crate) runtimes: Vec<String>,
    pub(crate) started_at: chrono::DateTime<Utc>,
    pub(crate) metrics: metrics::NodeMetrics,
    /// The node's repositories (mirrors, checkouts, pushes).
    pub(crate) git: git::Git,
}

impl Shared {
    pub(crate) fn nats_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

/// Runs the node on Docker until `shutdown` is cancelled, then drains: stops pulling, lets
/// running jobs finish within the drain grace period, hands back the rest, and returns.
pub async fn run(
    config: Config,
    metrics_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    let runtime = Arc::new(DockerRuntime::connect().await?);
    serve(config, runtime, metrics_listener, shutdown).await
}

/// [`run`] on another container runtime, e.g. the fake one (feature `test-support`).
pub async fn run_with_runtime(
    config: Config,
    runtime: Arc<dyn ContainerRuntime>,
    metrics_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    serve(config, runtime, metrics_listener, shutdown).await
}

async fn serve(
    config: Config,
    runtime: Arc<dyn ContainerRuntime>,
    metrics_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    let name = format!("agent-node {}", config.node_id);
    let nats = NatsConfig {
        name: &name,
        url: &config.nats_url,
        options: &config.nats,
        topology: &config.topology,
    };
    let Some(service) = Service::start(nats, &shutdown).await? else {
        return Ok(());
    };
    // Before touching the host's containers: another live node of this id may own them.
    let ttl = config.heartbeat_interval * 3;
    identity::ensure_unique(&service.topology.nodes, &config.node_id, &config.host, ttl).await?;
    let llm_url = prepare_host(runtime.as_ref(), &config).await?;
    let outbox = open_outbox(&config)?;
    let catalog = service
        .catalog(&config.engines_dir, &config.profiles_dir)
        .await?;
    service.check_limits(&catalog, &config.job_limits).await?;
    let Service {
        client,
        topology,
        background,
    } = service;
    let cancels = client.subscribe(names::cancel_wildcard()).await?;
    let prefetches = client.subscribe(names::SUBJECT_PREFETCH).await?;
    let metrics = metrics::NodeMetrics::default();
    let (pool, probe_key) = build_pool(&config, runtime.clone(), llm_url.is_some(), &metrics);
    let fence = fence_check(&config, llm_url.as_deref());
    let git = git::Git::new(config.git.clone(), config.job_limits.git_allowed.clone());
    let runtimes = runtime.runtimes().await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot list the host's container runtimes");
        Vec::new()
    });
    let shared = Arc::new(Shared {
        config,
        topology,
        runtime,
        catalog,
        running: Mutex::new(HashMap::new()),
        hard_stop: CancellationToken::new(),
        client,
        outbox,
        pool,
        removals: TaskTracker::new(),
        fence,
        llm_url,
        llm_providers: Arc::default(),
        binaries: binaries::Binaries::default(),
        probe_key,
        routes: routes::Routes::default(),
        runtimes,
        started_at: Utc::now(),
        metrics,
        git,
    });
    tokio::spawn(routes::listen_for_prefetch(
        shared.clone(),
        prefetches,
        background.clone(),
    ));
    let tasks = start_tasks(&shared, cancels, &background, metrics_listener).await;
    tracing::info!(node_id = %shared.config.node_id, slots = shared.config.slots, "agent-node ready");

    let slots = Arc::new(Semaphore::new(shared.config.slots as usize));
    let jobs = TaskTracker::new();
    pull_loop(&shared, &slots, &jobs, &shutdown).await;
    drain(&shared, &jobs).await;
    stop_tasks(&shared, tasks, &background).await;
    tracing::info!("agent-node stopped");
    Ok(())
}

/// Before the node takes jobs: the image is there, what a previous run left behind is gone,
/// and the job network is ready when jobs may call the llm-gateway (its URL is returned).
async fn prepare_host(
    runtime: &dyn ContainerRuntime,
    config: &Config,
) -> Result<Option<String>, NodeError> {
    let pooled = config.pool_images.iter().map(|(image, _)| image);
    for image in std::iter::once(&config.image).chain(pooled) {
        if !runtime.image_exists(image).await? {
            return Err(NodeError::MissingImage(image.clone()));
        }
    }
    reap_leftovers(runtime, &config.node_id).await?;
    let Some(port) = config.llm_gateway_port else {
        return Ok(None);
    };
    let url = runtime
        .job_network(&config.network, &config.cluster, port)
        .await
        .map_err(NodeError::Network)?;
    Ok(Some(url))
}

/// The check of the fence `prepare_host` set up, when jobs may call the llm-gateway.
fn fence_check(config: &Config, llm_url: Option<&str>) -> Option<fence::FenceCheck> {
    let (url, port) = (llm_url?, config.llm_gateway_port?);
    Some(fence::FenceCheck::new(&config.network, port, url))
}

fn open_outbox(config: &Config) -> Result<outbox::Outbox, NodeError> {
    let outbox = outbox::Outbox::open(&config.state_dir.join(&config.node_id).join("outbox.redb"))?;
    if !outbox.is_empty() {
        tracing::info!(
            entries = outbox.len(),
            "outbox holds output from a previous run; relaying it"
        );
    }
    Ok(outbox)
}

/// The warm pool, and the spec of the engine-binary probes.
fn build_pool(
    config: &Config,
    runtime: Arc<dyn ContainerRuntime>,
    llm_gateway: bool,
    metrics: &metrics::NodeMetrics,
) -> (pool::Pool, ContainerSpec) {
    let default_key = ContainerSpec {
        image: config.image.clone(),
        memory_bytes: config.default_memory_bytes,
        nano_cpus: config.default_nano_cpus,
        pids_limit: config.pids_limit,
        workspace_bytes: config.workspace_bytes,
        network: Network::from_name(&config.network),
        runtime_class: config.runtime.clone(),
    };
    // Probes run with no network, whatever the jobs get.
    let probe_key = ContainerSpec {
        network: Network::None,
        ..default_key.clone()
    };
    let mut targets = Vec::new();
    if config.pool_size > 0 {
        if llm_gateway {
            // Engine jobs run on the fenced job network, the others on none: keep both warm.
            let isolated = ContainerSpec {
                network: Network::None,
                ..default_key.clone()
            };
            targets.push((isolated, config.pool_size));
        }
        targets.push((default_key.clone(), config.pool_size));
    }
    // Job images kept warm too: a job naming one of them starts like one in the worker image.
    for (image, size) in &config.pool_images {
        let key = ContainerSpec {
            image: image.clone(),
            ..default_key.clone()
        };
        targets.push((key, *size));
    }
    let pool = pool::Pool::new(
        runtime,
        config.node_id.clone(),
        config.cluster.clone(),
        targets,
        config.slots as usize,
        config.pool_max_idle,
        metrics.pool.clone(),
    );
    (pool, probe_key)
}

/// Background tasks that [`stop_tasks`] waits for.
struct Tasks {
    relay: JoinHandle<()>,
    pool: JoinHandle<()>,
    /// Stops the pool, which then removes its warm containers; after the job removals.
    pool_stop: CancellationToken,
}

async fn start_tasks(
    shared: &Arc<Shared>,
    cancels: async_nats::Subscriber,
    background: &CancellationToken,
    metrics_listener: Option<TcpListener>,
) -> Tasks {
    tokio::spawn(listen_for_cancels(
        shared.clone(),
        cancels,
        background.clone(),
    ));
    if let Some(url) = &shared.llm_url {
        tokio::spawn(llm_health::watch(
            url.clone(),
            shared.llm_providers.clone(),
            background.clone(),
        ));
    }
    // Before the first heartbeat, so the node never offers an engine its image lacks.
    binaries::probe_new(shared, &shared.probe_key).await;
    tokio::spawn(routes::follow(shared.clone(), background.clone()));
    tokio::spawn(heartbeat(shared.clone(), background.clone()));
    let relay = tokio::spawn(lease::relay(shared.clone(), background.clone()));
    tokio::spawn(reap_periodically(shared.clone(), background.clone()));
    if let Some(listener) = metrics_listener {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(url = %format!("http://{addr}/metrics"), "serving metrics");
        }
        tokio::spawn(metrics::serve(listener, shared.clone(), background.clone()));
    }
    let pool_stop = CancellationToken::new();
    let pool = {
        let shared = shared.clone();
        let stop = pool_stop.clone();
        tokio::spawn(async move { shared.pool.maintain(stop).await })
    };
    Tasks {
        relay,
        pool,
        pool_stop,
    }
}

/// Lets running jobs finish within the drain grace period, then stops the rest (their jobs
/// are handed back).
async fn drain(shared: &Shared, jobs: &TaskTracker) {
    jobs.close();
    let running = jobs.len();
    if running > 0 {
        tracing::info!(running, grace = ?shared.config.drain_grace, "draining running jobs");
    }
    if tokio::time::timeout(shared.config.drain_grace, jobs.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain grace period over, handing back unfinished jobs");
        shared.hard_stop.cancel();
        jobs.wait().await;
    }
}

/// Once no job runs: stops the background tasks, waits for container removals, empties the
/// pool and deletes the heartbeat key.
async fn stop_tasks(shared: &Shared, tasks: Tasks, background: &CancellationToken) {
    background.cancel();
    shared.removals.close();
    shared.removals.wait().await;
    tasks.pool_stop.cancel();
    let _ = tasks.pool.await;
    let _ = tasks.relay.await;
    if !shared.outbox.is_empty() {
        tracing::warn!(
            entries = shared.outbox.len(),
            "outbox not empty at exit; relayed at next start"
        );
    }
    let _ = shared
        .topology
        .nodes
        .delete(names::node_key(&shared.config.node_id))
        .await;
    let _ = shared.client.flush().await;
}

/// Pulls exactly as many messages as there are free slots, so no job waits in this node's
/// buffer while another node is idle, from the queues of the job classes this node serves.
/// First it takes what is waiting now, priorities in weighted turns (`routes::PullOrder`);
/// when nothing waits, it spreads its free slots over the queues in long pulls.
async fn pull_loop(
    shared: &Arc<Shared>,
    slots: &Arc<Semaphore>,
    jobs: &TaskTracker,
    shutdown: &CancellationToken,
) {
    let mut served = shared.routes.queues();
    let mut order = routes::PullOrder::default();
    let pulls = TaskTracker::new();
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = slots.clone().acquire_owned() => permit.expect("semaphore never closed"),
        };
        let mut permits = vec![first];
        while let Ok(permit) = slots.clone().try_acquire_owned() {
            permits.push(permit);
        }
        let queues = served.borrow_and_update().clone();
        if queues.is_empty() {
            drop(permits);
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = served.changed() => continue,
            }
        }
        for queue in order.next(&queues) {
            if permits.is_empty() {
                break;
            }
            let batch = queue
                .consumer
                .fetch()
                .max_messages(permits.len())
                .messages()
                .await;
            take(shared, batch, &mut permits, PULL_GRACE, jobs, shutdown).await;
        }
        if permits.is_empty() {
            continue;
        }
        // Nothing waits: long pulls hold the free slots; each gives back what it did not use
        // when it ends, and slots freed meanwhile start a round of their own.
        let expiry = pull_expiry(shared.config.heartbeat_interval);
        for (queue, credits) in routes::spread(&queues, permits.len()) {
            let mut mine: Vec<_> = permits.drain(..credits).collect();
            let (shared, jobs, shutdown) = (shared.clone(), jobs.clone(), shutdown.clone());
            let consumer = queue.consumer.clone();
            pulls.spawn(async move {
                let batch = consumer
                    .batch()
                    .max_messages(mine.len())
                    .expires(expiry)
                    .messages()
                    .await;
                let limit = expiry + PULL_GRACE;
                take(&shared, batch, &mut mine, limit, &jobs, &shutdown).await;
            });
        }
    }
    pulls.close();
    pulls.wait().await;
}

/// How long past its expiry a pull is waited for before it is given up as lost.
const PULL_GRACE: Duration = Duration::from_secs(5);

/// How long a long pull waits: short, so that a slot freed during one is used at the next,
/// and shorter than a heartbeat's time to live: a node frozen with pulls outstanding (a
/// stopped process) is declared lost only once they have expired, so the jobs handed back
/// from it cannot be delivered to them.
fn pull_expiry(heartbeat_interval: Duration) -> Duration {
    (heartbeat_interval * 2).min(Duration::from_secs(2))
}

/// Starts a job for each message of `batch`, each with one of `permits`.
async fn take(
    shared: &Arc<Shared>,
    batch: Result<
        async_nats::jetstream::consumer::pull::Batch,
        async_nats::jetstream::consumer::pull::BatchError,
    >,
    permits: &mut Vec<tokio::sync::OwnedSemaphorePermit>,
    limit: Duration,
    jobs: &TaskTracker,
    shutdown: &CancellationToken,
) {
    let mut batch = match batch {
        Ok(batch) => batch,
        Err(e) => {
            tracing::warn!(error = %e, "cannot pull jobs");
            // A NATS outage: do not spin.
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            return;
        }
    };
    // The server ends a pull at its expiry; a pull whose request or end was lost with the
    // connection (a partition) would otherwise hold its slots forever.
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => {
                hand_back_rest(batch).await;
                return;
            }
            next = tokio::time::timeout_at(deadline, batch.next()) => next,
        };
        let Ok(next) = next else {
            tracing::warn!("a pull outlived its expiry (connection lost?): pulling afresh");
            return;
        };
        match next {
            None => return,
            Some(Ok(message)) => {
                let permit = permits.pop().expect("never more messages than permits");
                let shared = shared.clone();
                jobs.spawn(async move {
                    job::handle(shared, message).await;
                    drop(permit);
                });
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "pull ended");
                return;
            }
        }
    }
}

/// On shutdown mid-pull: messages the server still delivers to this pull go straight back
/// (NAK) instead of waiting out their ack wait. Bounded by the pull's expiry.
async fn hand_back_rest(mut batch: async_nats::jetstream::consumer::pull::Batch) {
    while let Some(Ok(message)) = batch.next().await {
        if let Err(e) = message
            .ack_with(async_nats::jetstream::AckKind::Nak(None))
            .await
        {
            tracing::warn!(error = %e, "cannot hand back job message");
        }
    }
}

async fn listen_for_cancels(
    shared: Arc<Shared>,
    mut cancels: async_nats::Subscriber,
    stop: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return,
            message = cancels.next() => message,
        };
        let Some(message) = message else { return };
        let Some(job_id) = message.subject.as_str().rsplit('.').next() else {
            continue;
        };
        if let Some(token) = shared.running.lock().expect("running map").get(job_id) {
            tracing::info!(job_id, "cancel received");
            token.cancel();
        }
    }
}

/// Publishes this node's liveness and load every heartbeat interval.
async fn heartbeat(shared: Arc<Shared>, stop: CancellationToken) {
    let config = &shared.config;
    let mut ticker = tokio::time::interval(config.heartbeat_interval);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let catalog = shared.catalog.current();
        if catalog
            .engines()
            .any(|e| shared.binaries.has(&e.binary).is_none())
        {
            // An engine added at runtime: probe its binary off the heartbeat's path.
            let shared = shared.clone();
            tokio::spawn(async move { binaries::probe_new(&shared, &shared.probe_key).await });
        }
        // Engines probed and images pulled since the last beat may open queues.
        routes::refresh(&shared).await;
        let info = node_info(&shared);
        match flotilla_proto::encode(&info) {
            Ok(value) => {
                if let Err(e) = shared
                    .topology
                    .nodes
                    .put(names::node_key(&config.node_id), value)
                    .await
                {
                    tracing::warn!(error = %e, "heartbeat failed");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot encode heartbeat"),
        }
    }
}

/// This node as its heartbeat describes it.
pub(crate) fn node_info(shared: &Shared) -> NodeInfo {
    let config = &shared.config;
    let pool = shared.pool.stats();
    let catalog = shared.catalog.current();
    let engines: Vec<String> = catalog
        .engines()
        .filter(|e| shared.binaries.has(&e.binary) == Some(true))
        .map(|e| e.id.clone())
        .collect();
    let mut info = NodeInfo {
        node_id: config.node_id.clone(),
        host: config.host.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        engines,
        slots_total: config.slots,
        // Jobs actually here; free permits are mostly held by the outstanding pulls.
        slots_busy: shared.running.lock().expect("running map").len() as u32,
        warm: pool.warm,
        pool_hits: pool.hits,
        pool_misses: pool.misses,
        pool_refill_ms: pool.refill_avg_ms,
        started_at: shared.started_at,
        heartbeat_at: Utc::now(),
        // As identity::ensure_unique waits for.
        ttl_ms: u64::try_from(config.heartbeat_interval.as_millis() * 3).unwrap_or(u64::MAX),
        llm_providers: shared
            .llm_url
            .as_ref()
            .map(|_| shared.llm_providers.lock().expect("llm providers").clone()),
        labels: Default::default(),
        images: Vec::new(),
        runtimes: Vec::new(),
        classes: Vec::new(),
    };
    routes::offers(&mut info, shared);
    info
}

/// Every reap interval: removes containers older than the interval that are this node's but
/// neither run a job nor wait in the pool, or that belong to a node with no heartbeat (gone).
async fn reap_periodically(shared: Arc<Shared>, stop: CancellationToken) {
    let every = shared.config.reap_interval;
    let mut ticker = tokio::time::interval(every);
    ticker.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let cluster = Selector::Cluster(&shared.config.cluster);
        let Ok(containers) = shared.runtime.list(cluster).await else {
            continue;
        };
        let live_nodes: HashSet<String> = match shared.topology.nodes.keys().await {
            Ok(keys) => keys.filter_map(|k| async move { k.ok() }).collect().await,
            Err(_) => continue, // without NATS, do not judge other nodes
        };
        let reaper = Reaper {
            node_id: &shared.config.node_id,
            min_age_secs: every.as_secs() as i64,
            live_nodes: &live_nodes,
        };
        let orphans = reaper.orphans(containers, Utc::now().timestamp(), |id| {
            shared.pool.owns(id)
        });
        for orphan in orphans {
            tracing::info!(container = %orphan.id, node = %orphan.node_id, "removing orphan container");
            shared.runtime.remove(&orphan.id).await;
        }
    }
}

/// What the periodic reaper judges by.
struct Reaper<'a> {
    node_id: &'a str,
    /// Younger containers may be between creation and registration; the next round decides.
    min_age_secs: i64,
    /// Heartbeat keys present now.
    live_nodes: &'a HashSet<String>,
}

impl Reaper<'_> {
    /// The containers to remove: this node's that `owned` does not know, and those of nodes
    /// without a heartbeat.
    fn orphans(
        &self,
        containers: Vec<Listed>,
        now: i64,
        owned: impl Fn(&str) -> bool,
    ) -> Vec<Listed> {
        containers
            .into_iter()
            .filter(|c| now - c.created > self.min_age_secs)
            .filter(|c| {
                if c.node_id == self.node_id {
                    !owned(&c.id)
                } else {
                    !self.live_nodes.contains(&names::node_key(&c.node_id))
                }
            })
            .collect()
    }
}

/// Removes containers a previous run of this node left behind (after a crash). Their jobs were
/// never acked, so JetStream hands them out again.
async fn reap_leftovers(runtime: &dyn ContainerRuntime, node_id: &str) -> Result<(), RuntimeError> {
    let leftovers = runtime.list(Selector::Node(node_id)).await?;
    for container in &leftovers {
        runtime.remove(&container.id).await;
    }
    if !leftovers.is_empty() {
        tracing::info!(
            count = leftovers.len(),
            "removed containers left by a previous run"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{
        Owner, Role,
        fake::{FakeRuntime, Phase},
    };

    fn listed(id: &str, node: &str, created: i64) -> Listed {
        Listed {
            id: id.to_owned(),
            node_id: node.to_owned(),
            created,
        }
    }

    #[test]
    fn orphans_are_old_and_unowned_or_of_lost_nodes() {
        let live = HashSet::from([names::node_key("alive")]);
        let reaper = Reaper {
            node_id: "me",
            min_age_secs: 60,
            live_nodes: &live,
        };
        let containers = vec![
            listed("mine-owned", "me", 0),
            listed("mine-orphan", "me", 0),
            listed("mine-young", "me", 990),
            listed("alive-node", "alive", 0),
            listed("lost-node", "lost", 0),
            listed("lost-young", "lost", 950),
        ];
        let orphans = reaper.orphans(containers, 1000, |id| id == "mine-owned");
        let ids: Vec<&str> = orphans.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["mine-orphan", "lost-node"]);
    }

    #[tokio::test]
    async fn leftovers_of_this_node_are_removed() {
        let fake = FakeRuntime::default();
        let spec = ContainerSpec {
            image: "img".to_owned(),
            memory_bytes: 1 << 30,
            nano_cpus: 1_000_000_000,
            pids_limit: 64,
            workspace_bytes: 1 << 20,
            network: Network::None,
            runtime_class: None,
        };
        for node in ["me", "me", "other"] {
            let owner = Owner {
                node_id: node.to_owned(),
                cluster: "c".to_owned(),
                role: Role::Warm,
                job: None,
            };
            fake.prepare(&spec, "warm", &owner).await.unwrap();
        }
        reap_leftovers(&fake, "me").await.unwrap();
        let left = fake.containers();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].owner.node_id, "other");
        assert_eq!(left[0].phase, Phase::Waiting);
    }
}
