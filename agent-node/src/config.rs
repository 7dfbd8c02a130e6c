use std::{path::PathBuf, time::Duration};

use flotilla_nats::TopologyConfig;

/// Agent-node settings, validated once by [`Config::validate`].
#[derive(Debug, Clone)]
pub struct Config {
    pub nats_url: String,
    /// Credentials and TLS for NATS.
    pub nats: flotilla_nats::NatsOptions,
    /// Unique per node and stable across restarts: it labels this node's containers, so a
    /// restarted node can remove what its previous run left behind.
    pub node_id: String,
    pub host: String,
    /// Jobs this node runs at once; it never holds more queue messages than free slots.
    pub slots: u32,
    pub image: String,
    pub engines_dir: PathBuf,
    pub profiles_dir: PathBuf,
    pub pids_limit: i64,
    pub workspace_bytes: i64,
    /// Between SIGTERM and SIGKILL when a job is cancelled or times out.
    pub stop_grace: Duration,
    /// On SIGTERM, how long running jobs may take to finish before they are handed back.
    pub drain_grace: Duration,
    pub heartbeat_interval: Duration,
    /// Output kept per attempt; beyond it a truncation notice is logged and the rest dropped.
    pub max_log_bytes: u64,
    /// Chunks kept per attempt, beside the byte cap (see `logs::LogLimits`).
    pub max_log_chunks: u64,
    /// Cap on `result.text`.
    pub max_result_bytes: usize,
    pub topology: TopologyConfig,
    /// Node-local durable state (the outbox) lives under `<state_dir>/<node_id>/`.
    pub state_dir: PathBuf,
    /// Docker network for job containers: `none` (no network at all, the default) or the name
    /// of an existing internal network.
    pub network: String,
    /// Optional OCI runtime by name (e.g. `runsc` for gVisor).
    pub runtime: Option<String>,
    /// What this node offers jobs that `require` labels (`FLOTILLA_NODE_LABELS`).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Name of the Flotilla system this node belongs to (a container label): nodes only reap
    /// containers of their own system.
    pub cluster: String,
    /// How often orphan containers are looked for (and how old they must be).
    pub reap_interval: Duration,
    /// Warm containers kept for the default job spec (0 disables the pool).
    pub pool_size: usize,
    /// Pull a job image this host lacks when a class names it (`FLOTILLA_PULL_IMAGES`; the
    /// Docker engine must reach its registry).
    pub pull_images: bool,
    /// Warm containers per job image (`FLOTILLA_POOL_IMAGES`), besides the worker image's.
    pub pool_images: Vec<(String, usize)>,
    /// A warm container unused this long is replaced.
    pub pool_max_idle: Duration,
    /// The default job resources (must match the gateway's), used for the pool's key.
    pub default_memory_bytes: i64,
    pub default_nano_cpus: i64,
    /// The bounds every job is rechecked against before it runs (the queue message is not
    /// trusted): the same operator limits as the gateway's, this node's maximums.
    pub job_limits: flotilla_catalog::Limits,
    /// Port of the llm-gateway on this host. When set, engine jobs get a per-job token and
    /// run on `network`, an internal network fenced so that the gateway is all they reach.
    pub llm_gateway_port: Option<u16>,
    /// Where `GET /metrics` is served; `None` serves no metrics.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Repositories: mirrors, credentials, the author of pushed commits.
    pub git: crate::GitConfig,
    /// What the node takes back out of a job's workspace.
    pub output_limits: crate::OutputLimits,
}

/// The job network used when the llm-gateway is on and none is named.
pub const DEFAULT_LLM_NETWORK: &str = "flotilla-jobs";

#[derive(Debug, thiserror::Error)]
#[error("invalid agent-node config: {0}")]
pub struct ConfigError(pub(crate) String);

/// `FLOTILLA_NODE_LABELS`: `key=value` pairs, comma-separated; empty for none.
pub fn parse_labels(text: &str) -> Result<std::collections::BTreeMap<String, String>, ConfigError> {
    let mut labels = std::collections::BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let valid = flotilla_proto::routing::is_valid_label;
        match pair.split_once('=') {
            Some((key, value)) if valid(key) && valid(value) => {
                labels.insert(key.to_owned(), value.to_owned());
            }
            _ => {
                return Err(ConfigError(format!(
                    "FLOTILLA_NODE_LABELS: {pair:?} is not key=value with key and value \
                     matching ^[A-Za-z0-9_.-]{{1,64}}$"
                )));
            }
        }
    }
    Ok(labels)
}

/// `FLOTILLA_POOL_IMAGES`: `image=count` pairs, comma-separated; empty for none. The count
/// follows the last `=`: image references have none, but may have `:` and `@`.
pub fn parse_pool_images(text: &str) -> Result<Vec<(String, usize)>, ConfigError> {
    let mut pools = Vec::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let parsed = pair
            .rsplit_once('=')
            .and_then(|(image, n)| Some((image.trim(), n.trim().parse::<usize>().ok()?)));
        match parsed {
            Some((image, n)) if !image.is_empty() => pools.push((image.to_owned(), n)),
            _ => {
                return Err(ConfigError(format!(
                    "FLOTILLA_POOL_IMAGES: {pair:?} is not image=count"
                )));
            }
        }
    }
    Ok(pools)
}

impl Config {
    pub fn validate(mut self) -> Result<Self, ConfigError> {
        if self.llm_gateway_port.is_some() && self.network == "none" {
            // Jobs need a network to reach the gateway: a fenced internal one.
            DEFAULT_LLM_NETWORK.clone_into(&mut self.network);
        }
        if self.llm_gateway_port == Some(0) {
            return Err(ConfigError("llm-gateway port must not be 0".to_owned()));
        }
        if !flotilla_proto::ids::is_safe_id(&self.node_id, 64) {
            return Err(ConfigError(format!(
                "node id {:?} must match ^[A-Za-z0-9_-]{{1,64}}$",
                self.node_id
            )));
        }
        if self.slots == 0 || self.slots > 256 {
            return Err(ConfigError(format!(
                "slots must be 1-256, got {}",
                self.slots
            )));
        }
        if self.image.trim().is_empty() {
            return Err(ConfigError("image must not be empty".to_owned()));
        }
        if self.heartbeat_interval.is_zero() {
            return Err(ConfigError(
                "heartbeat interval must be positive".to_owned(),
            ));
        }
        if self.max_log_chunks == 0 {
            return Err(ConfigError("max log chunks must be at least 1".to_owned()));
        }
        if self.pids_limit < 16 {
            return Err(ConfigError(format!(
                "pids limit must be >= 16, got {}",
                self.pids_limit
            )));
        }
        Ok(self)
    }
}
