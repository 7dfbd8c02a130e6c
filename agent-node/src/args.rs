//! The agent-node's settings as flags and environment variables, turned into a [`Config`].
//! The binary parses them; simulations (`flotilla-sim`) build nodes from them too.

use std::{path::PathBuf, time::Duration};

use clap::Parser;

use crate::{Config, ConfigError};

/// Flotilla agent-node: runs queued jobs in Docker containers on this host.
#[derive(Debug, Parser)]
#[command(version)]
pub struct Args {
    #[arg(
        long,
        env = "FLOTILLA_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    #[command(flatten)]
    nats: flotilla_nats::NatsArgs,
    /// Unique, stable id of this node (default: the host name).
    #[arg(long, env = "FLOTILLA_NODE_ID")]
    node_id: Option<String>,
    /// The name of this node's host, as heartbeats show it (default: the kernel's host name).
    /// A restarted node takes over its id's heartbeat at once only from the same host.
    #[arg(long, env = "FLOTILLA_NODE_HOST")]
    node_host: Option<String>,
    /// Concurrent jobs on this node.
    #[arg(long, env = "FLOTILLA_NODE_SLOTS", default_value_t = 4)]
    slots: u32,
    #[arg(
        long,
        env = "FLOTILLA_WORKER_IMAGE",
        default_value = "flotilla-worker:latest"
    )]
    image: String,
    #[arg(long, env = "FLOTILLA_ENGINES_DIR", default_value = "engines")]
    engines_dir: PathBuf,
    #[arg(long, env = "FLOTILLA_PROFILES_DIR", default_value = "profiles")]
    profiles_dir: PathBuf,
    #[arg(long, env = "FLOTILLA_PIDS_LIMIT", default_value_t = 256)]
    pids_limit: i64,
    /// Size of the /workspace tmpfs, in MiB.
    #[arg(long, env = "FLOTILLA_WORKSPACE_MB", default_value_t = 1024)]
    workspace_mb: i64,
    /// Seconds between SIGTERM and SIGKILL when a job is cancelled or times out.
    #[arg(long, env = "FLOTILLA_STOP_GRACE_SECS", default_value_t = 10)]
    stop_grace_secs: u64,
    /// Seconds running jobs get to finish after SIGTERM before they are handed back.
    #[arg(long, env = "FLOTILLA_DRAIN_GRACE_SECS", default_value_t = 60)]
    drain_grace_secs: u64,
    #[arg(long, env = "FLOTILLA_HEARTBEAT_MS", default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Output kept per job attempt, in MiB.
    #[arg(long, env = "FLOTILLA_MAX_LOG_MB", default_value_t = 64)]
    max_log_mb: u64,
    /// Output chunks kept per job attempt (each is a JetStream message), beside the MiB cap.
    #[arg(long, env = "FLOTILLA_MAX_LOG_CHUNKS", default_value_t = 100_000)]
    max_log_chunks: u64,
    /// Cap on the job's `result.text`, in KiB.
    #[arg(long, env = "FLOTILLA_MAX_RESULT_KB", default_value_t = 1024)]
    max_result_kb: usize,
    #[command(flatten)]
    topology: flotilla_nats::TopologyArgs,
    /// Docker network for job containers: `none`, or an existing internal network's name.
    #[arg(long, env = "FLOTILLA_JOB_NETWORK", default_value = "none")]
    job_network: String,
    /// Port of the llm-gateway on this host. Engine jobs then get a per-job token and run on an
    /// internal network (FLOTILLA_JOB_NETWORK, default flotilla-jobs) that reaches only it.
    #[arg(long, env = "FLOTILLA_LLM_GATEWAY_PORT")]
    llm_gateway_port: Option<u16>,
    /// OCI runtime for job containers, e.g. runsc (default: Docker's default runtime).
    #[arg(long, env = "FLOTILLA_JOB_RUNTIME")]
    job_runtime: Option<String>,
    /// Labels this node offers, comma-separated `key=value` pairs (`gpu=a100,region=eu`):
    /// jobs that `require` labels run only on nodes that have them all.
    #[arg(long, env = "FLOTILLA_NODE_LABELS", default_value = "")]
    node_labels: String,
    /// Warm containers kept ready for the default job spec (0 disables the pool).
    #[arg(long, env = "FLOTILLA_POOL_SIZE", default_value_t = 2)]
    pool_size: usize,
    /// Pull a job image this host lacks as soon as a job class names it (the Docker engine
    /// must reach its registry); off: only images already here, or prefetched, run jobs.
    #[arg(long, env = "FLOTILLA_PULL_IMAGES")]
    pull_images: bool,
    /// Warm containers kept per job image besides the worker image, comma-separated
    /// `image=count` pairs (`ghcr.io/acme/tools:1=2`).
    #[arg(long, env = "FLOTILLA_POOL_IMAGES", default_value = "")]
    pool_images: String,
    /// Seconds a warm container may wait before it is replaced.
    #[arg(long, env = "FLOTILLA_POOL_MAX_IDLE_SECS", default_value_t = 3600)]
    pool_max_idle_secs: u64,
    #[command(flatten)]
    limits: flotilla_catalog::LimitsArgs,
    /// Name of this Flotilla system; nodes only reap containers of their own system.
    #[arg(long, env = "FLOTILLA_CLUSTER", default_value = "default")]
    cluster: String,
    /// Seconds between orphan-container sweeps (also the minimum age of an orphan).
    #[arg(long, env = "FLOTILLA_REAP_SECS", default_value_t = 60)]
    reap_secs: u64,
    /// Directory for node-local durable state (the outbox).
    #[arg(long, env = "FLOTILLA_STATE_DIR", default_value = ".flotilla/state")]
    state_dir: PathBuf,
    /// Where repositories are mirrored and checked out (default: `<state dir>/<node id>/git`).
    #[arg(long, env = "FLOTILLA_GIT_CACHE_DIR")]
    git_cache_dir: Option<PathBuf>,
    /// TOML file of named git credentials (tokens, SSH keys) jobs may name in
    /// `workspace.git.credential`; see docs/engines.md.
    #[arg(long, env = "FLOTILLA_GIT_CREDENTIALS_FILE")]
    git_credentials_file: Option<PathBuf>,
    /// Author and committer of the commits the node pushes.
    #[arg(long, env = "FLOTILLA_GIT_AUTHOR_NAME", default_value = "Flotilla")]
    git_author_name: String,
    #[arg(
        long,
        env = "FLOTILLA_GIT_AUTHOR_EMAIL",
        default_value = "flotilla@localhost"
    )]
    git_author_email: String,
    /// A repository whose objects exceed this many MiB fails its job.
    #[arg(long, env = "FLOTILLA_GIT_MAX_REPO_MB", default_value_t = 1024)]
    git_max_repo_mb: u64,
    /// Files of a job's `outputs` kept at most.
    #[arg(long, env = "FLOTILLA_MAX_ARTIFACTS", default_value_t = 1000)]
    max_artifacts: usize,
    /// MiB of a job's `outputs` kept at most.
    #[arg(long, env = "FLOTILLA_MAX_ARTIFACT_MB", default_value_t = 1024)]
    max_artifact_mb: u64,
    /// A job's final workspace up to this many MiB is saved, so that it can be continued.
    #[arg(long, env = "FLOTILLA_MAX_SAVED_WORKSPACE_MB", default_value_t = 512)]
    max_saved_workspace_mb: u64,
    /// Address of the Prometheus `GET /metrics` endpoint (unset: no metrics are served).
    #[arg(long, env = "FLOTILLA_NODE_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub telemetry: flotilla_telemetry::TelemetryArgs,
}

impl Args {
    /// The validated node settings.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        config(self)
    }
}

fn config(args: Args) -> Result<Config, ConfigError> {
    let host = args.node_host.clone().unwrap_or_else(hostname);
    let limits = args.limits.into_limits().map_err(ConfigError)?;
    let node_id = args.node_id.unwrap_or_else(|| host.clone());
    let credentials = match &args.git_credentials_file {
        Some(path) => crate::Credentials::load(path).map_err(ConfigError)?,
        None => crate::Credentials::default(),
    };
    // Absolute: git reaches the mirrors through file:// URLs.
    let git_cache_dir = std::path::absolute(
        args.git_cache_dir
            .unwrap_or_else(|| args.state_dir.join(&node_id).join("git")),
    )
    .map_err(|e| ConfigError(format!("git cache directory: {e}")))?;
    let git = crate::GitConfig {
        cache_dir: git_cache_dir,
        credentials,
        author_name: args.git_author_name,
        author_email: args.git_author_email,
        max_repo_bytes: args.git_max_repo_mb << 20,
    };
    let workspace_bytes = args.workspace_mb << 20;
    let output_limits = crate::OutputLimits {
        // The tar of a full workspace: its bytes, plus headers.
        max_workspace_bytes: u64::try_from(workspace_bytes).unwrap_or(0) + (64 << 20),
        max_artifacts: args.max_artifacts,
        max_artifact_bytes: args.max_artifact_mb << 20,
        max_saved_workspace_bytes: args.max_saved_workspace_mb << 20,
    };
    let config = crate::Config {
        nats_url: args.nats_url,
        nats: args
            .nats
            .into_options()
            .map_err(|e| ConfigError(e.to_string()))?,
        node_id,
        host,
        slots: args.slots,
        image: args.image,
        engines_dir: args.engines_dir,
        profiles_dir: args.profiles_dir,
        pids_limit: args.pids_limit,
        workspace_bytes,
        stop_grace: Duration::from_secs(args.stop_grace_secs),
        drain_grace: Duration::from_secs(args.drain_grace_secs),
        heartbeat_interval: Duration::from_millis(args.heartbeat_ms),
        max_log_bytes: args.max_log_mb << 20,
        max_log_chunks: args.max_log_chunks,
        max_result_bytes: args.max_result_kb << 10,
        topology: args.topology.into_config(),
        state_dir: args.state_dir,
        network: args.job_network,
        runtime: args.job_runtime,
        labels: crate::parse_labels(&args.node_labels)?,
        pool_size: args.pool_size,
        pool_images: crate::parse_pool_images(&args.pool_images)?,
        pull_images: args.pull_images,
        reap_interval: Duration::from_secs(args.reap_secs.max(1)),
        cluster: args.cluster,
        pool_max_idle: Duration::from_secs(args.pool_max_idle_secs),
        default_memory_bytes: limits.default_memory_bytes,
        default_nano_cpus: limits.default_nano_cpus,
        job_limits: limits,
        llm_gateway_port: args.llm_gateway_port,
        metrics_listen: args.metrics_listen,
        git,
        output_limits,
    };
    config.validate()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| {
            // Node ids are safe ids: host names may contain dots.
            name.trim().replace(
                |c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                "-",
            )
        })
        .unwrap_or_else(|_| "localhost".to_owned())
}
