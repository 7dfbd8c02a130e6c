//! The container runtime behind the node, as one trait: [`ContainerRuntime`]. The node's job
//! logic, warm pool and reapers speak only these runtime-neutral types; everything specific to
//! one runtime (Docker's API types, labels, host config, the job network) stays in its module.
//!
//! - [`docker`]: Docker through bollard, what the node runs on in production.
//! - `fake` (feature `test-support`, and in this crate's tests): scripted containers in
//!   process, for unit tests and fleet simulations.
//!
//! Another runtime (Kubernetes, Firecracker) is one more module implementing the trait.

pub mod docker;
#[cfg(any(test, feature = "test-support"))]
pub mod fake;

use std::{collections::HashSet, pin::Pin, time::Duration};

use bytes::Bytes;
use futures::{Stream, future::BoxFuture};
use tokio::io::{AsyncWrite, AsyncWriteExt as _};

pub use docker::DockerRuntime;

/// An error from a runtime, its cause kept as the source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A call to the runtime failed or was refused.
    #[error("{runtime}: {source}")]
    Api {
        runtime: &'static str,
        #[source]
        source: BoxError,
    },
    #[error("{runtime}: cannot send the job script: {source}")]
    Stdin {
        runtime: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The job network cannot be set up, or is not safe to use.
    #[error(transparent)]
    Network(BoxError),
}

impl RuntimeError {
    pub fn api(runtime: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Api {
            runtime,
            source: source.into(),
        }
    }
}

/// Everything that makes two job containers interchangeable: a warm container can serve any
/// job whose spec is equal (the warm pool's key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerSpec {
    pub image: String,
    pub memory_bytes: i64,
    pub nano_cpus: i64,
    pub pids_limit: i64,
    pub workspace_bytes: i64,
    pub network: Network,
    /// Optional isolation runtime by name, e.g. `runsc` (gVisor); `None` is the default one.
    pub runtime_class: Option<String>,
}

/// The network a job container is attached to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Network {
    /// No network at all.
    None,
    /// A named network, in production the fenced job network (see
    /// [`ContainerRuntime::job_network`]).
    Named(String),
}

impl Network {
    /// `none` is no network; any other name a named one.
    pub fn from_name(name: &str) -> Self {
        if name == "none" {
            Self::None
        } else {
            Self::Named(name.to_owned())
        }
    }
}

/// Who a container belongs to and what for. The runtime records it on the container, so that
/// the reapers find it again ([`ContainerRuntime::list`]), even after a node crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub node_id: String,
    /// The Flotilla system the node belongs to; nodes reap only their own system's containers.
    pub cluster: String,
    pub role: Role,
    /// The attempt a cold container was started for (warm ones learn their job later).
    pub job: Option<JobRef>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Prepared ahead of time, waiting in the pool.
    Warm,
    /// Started for a job (or a probe) that found no warm container.
    Cold,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Warm => "warm",
            Self::Cold => "cold",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRef {
    pub job_id: String,
    pub attempt: u32,
}

/// Which managed containers to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selector<'a> {
    /// Every container of this Flotilla system, of any node.
    Cluster(&'a str),
    /// Every container of this node id, of any system (what a previous run left behind).
    Node(&'a str),
}

/// A managed container found by [`ContainerRuntime::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub id: String,
    pub node_id: String,
    /// Creation time, unix seconds.
    pub created: i64,
}

/// How a container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub code: i64,
    /// The kernel killed it for exceeding its memory limit.
    pub oom_killed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// A container's live output, in the order the process wrote it; it ends when the process does.
pub type Output = Pin<Box<dyn Stream<Item = Result<(OutputStream, Bytes), RuntimeError>> + Send>>;
/// A container's standard input.
pub type Input = Pin<Box<dyn AsyncWrite + Send>>;

/// A created and started container whose launcher waits on stdin for its one job.
pub struct Prepared {
    pub id: String,
    pub prepared_at: tokio::time::Instant,
    runtime: &'static str,
    output: Output,
    input: Input,
}

impl Prepared {
    /// For runtimes: the container `id`, attached to its output and input.
    pub fn new(runtime: &'static str, id: String, output: Output, input: Input) -> Self {
        Self {
            id,
            prepared_at: tokio::time::Instant::now(),
            runtime,
            output,
            input,
        }
    }

    /// Sends the job script and closes stdin; the container runs the script at once.
    pub async fn launch(self, script: &[u8]) -> Result<Started, RuntimeError> {
        self.launch_with(script, None).await
    }

    /// Sends the job script, then `archive` (a tar the script unpacks in `/workspace`), and
    /// closes stdin. The header line gives the script's length and says whether a tar follows
    /// (see the Docker runtime's launcher).
    pub async fn launch_with(
        mut self,
        script: &[u8],
        archive: Option<&std::path::Path>,
    ) -> Result<Started, RuntimeError> {
        let stdin = |source| RuntimeError::Stdin {
            runtime: self.runtime,
            source,
        };
        let header = match archive {
            Some(_) => format!("{} tar\n", script.len()),
            None => format!("{}\n", script.len()),
        };
        self.input
            .write_all(header.as_bytes())
            .await
            .map_err(stdin)?;
        self.input.write_all(script).await.map_err(stdin)?;
        if let Some(archive) = archive {
            // Large writes: the attach stream costs per write, not per byte.
            let file = tokio::fs::File::open(archive).await.map_err(stdin)?;
            let mut file = tokio::io::BufReader::with_capacity(1 << 20, file);
            tokio::io::copy_buf(&mut file, &mut self.input)
                .await
                .map_err(stdin)?;
        }
        self.input.shutdown().await.map_err(stdin)?;
        Ok(Started {
            id: self.id,
            output: self.output,
        })
    }
}

/// A container running its job: its id and its live output.
pub struct Started {
    pub id: String,
    pub output: Output,
}

/// What the node needs from a container runtime. Object safe (`Arc<dyn ContainerRuntime>`):
/// the methods return boxed futures.
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Creates and starts a hardened container that waits for its job script on stdin. If
    /// anything fails after creation the container is removed before the error is returned.
    fn prepare<'a>(
        &'a self,
        spec: &'a ContainerSpec,
        name: &'a str,
        owner: &'a Owner,
    ) -> BoxFuture<'a, Result<Prepared, RuntimeError>>;

    /// Renames a container, for operators; failure is only logged.
    fn rename<'a>(&'a self, id: &'a str, name: &'a str) -> BoxFuture<'a, ()>;

    /// Whether the container exists and is running.
    fn is_running<'a>(&'a self, id: &'a str) -> BoxFuture<'a, bool>;

    /// Waits for the container to exit.
    fn wait<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Exit, RuntimeError>>;

    /// SIGTERM, then SIGKILL after `grace`; returns once the container has stopped. A container
    /// already stopped or gone counts as stopped.
    fn stop<'a>(&'a self, id: &'a str, grace: Duration) -> BoxFuture<'a, Result<(), RuntimeError>>;

    /// Force-removes the container and its volumes. Failure is logged, not returned: the
    /// reapers remove whatever is left behind.
    fn remove<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()>;

    /// Managed containers, running or not.
    fn list<'a>(
        &'a self,
        selector: Selector<'a>,
    ) -> BoxFuture<'a, Result<Vec<Listed>, RuntimeError>>;

    /// Whether the image is on this host.
    fn image_exists<'a>(&'a self, image: &'a str) -> BoxFuture<'a, Result<bool, RuntimeError>>;

    /// Pulls `image` from its registry (the Docker engine's settings say how to reach it).
    fn pull_image<'a>(&'a self, image: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>>;

    /// The OCI runtimes containers can run under here (`runc`, `runsc`, ...), sorted.
    fn runtimes(&self) -> BoxFuture<'_, Result<Vec<String>, RuntimeError>>;

    /// Which of `binaries` are on the PATH of a container of `spec`.
    fn find_binaries<'a>(
        &'a self,
        spec: &'a ContainerSpec,
        name: &'a str,
        owner: &'a Owner,
        binaries: &'a [String],
    ) -> BoxFuture<'a, Result<HashSet<String>, RuntimeError>>;

    /// Sets up the job network `network`, from which containers reach only the llm-gateway's
    /// `gateway_port` on this host; returns the gateway's base URL as containers see it.
    fn job_network<'a>(
        &'a self,
        network: &'a str,
        cluster: &'a str,
        gateway_port: u16,
    ) -> BoxFuture<'a, Result<String, RuntimeError>>;

    /// Checks, changing nothing, that the fence [`job_network`](Self::job_network) set up is
    /// all still in place (an operator or a firewall reload can undo it while the node runs);
    /// returns the gateway's base URL as containers now see it.
    fn check_job_network<'a>(
        &'a self,
        network: &'a str,
        gateway_port: u16,
    ) -> BoxFuture<'a, Result<String, RuntimeError>>;
}
