//! The node's view of Docker: start a hardened, labelled container that runs one job script,
//! stream its output, stop it gracefully, remove it.

use std::{collections::HashMap, pin::Pin, time::Duration};

use bollard::{
    Docker,
    container::LogOutput,
    models::{ContainerCreateBody, HostConfig},
    query_parameters::{
        AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, ListContainersOptionsBuilder,
        RemoveContainerOptionsBuilder, StopContainerOptionsBuilder, WaitContainerOptionsBuilder,
    },
};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::AsyncWriteExt as _;

/// The job script arrives on stdin: a 1 MB prompt does not fit in one argv element
/// (MAX_ARG_STRLEN is 128 KiB) and stdin keeps it out of `docker inspect` and `ps`.
const LAUNCHER: &str = "umask 077; cat > /tmp/.flotilla-job && exec /bin/sh /tmp/.flotilla-job";
/// Unprivileged uid:gid inside every job container.
pub(crate) const JOB_USER: &str = "65534:65534";

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("docker: {0}")]
    Api(#[from] bollard::errors::Error),
    #[error("docker: cannot send the job script: {0}")]
    Stdin(#[from] std::io::Error),
}

/// Everything that makes two job containers interchangeable: a warm container can serve any
/// job whose key is equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub image: String,
    pub memory_bytes: i64,
    pub nano_cpus: i64,
    pub pids_limit: i64,
    pub workspace_bytes: i64,
    /// Docker network mode: `none` (default) or the name of an internal network.
    pub network: String,
    /// Optional OCI runtime by name, e.g. `runsc`.
    pub runtime: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

pub type Output = Pin<Box<dyn Stream<Item = Result<(OutputStream, Bytes), DockerError>> + Send>>;

/// A started container: its id and its live output, in the order the process wrote it.
pub struct Started {
    pub id: String,
    pub output: Output,
}

/// A created, attached and started container whose launcher waits on stdin for its one job.
pub struct Prepared {
    pub id: String,
    pub prepared_at: tokio::time::Instant,
    output: Output,
    input: Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
}

impl Prepared {
    /// Sends the job script; the container runs it at once.
    pub async fn launch(mut self, script: &[u8]) -> Result<Started, DockerError> {
        self.input.write_all(script).await?;
        self.input.shutdown().await?;
        Ok(Started {
            id: self.id,
            output: self.output,
        })
    }
}

#[derive(Clone)]
pub struct DockerRuntime {
    docker: Docker,
}

impl DockerRuntime {
    pub(crate) fn api(&self) -> &Docker {
        &self.docker
    }

    pub async fn connect() -> Result<Self, DockerError> {
        let docker = Docker::connect_with_local_defaults()?
            .negotiate_version()
            .await?;
        docker.ping().await?;
        Ok(Self { docker })
    }

    pub async fn image_exists(&self, image: &str) -> Result<bool, DockerError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates, attaches to and starts a container that waits for its job on stdin. If
    /// anything fails after creation the container is removed before the error is returned.
    pub async fn prepare(
        &self,
        key: &PoolKey,
        name: &str,
        labels: HashMap<String, String>,
    ) -> Result<Prepared, DockerError> {
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptionsBuilder::default().name(name).build()),
                container_body(key, labels),
            )
            .await?;
        match self.attach_and_start(&created.id).await {
            Ok((output, input)) => Ok(Prepared {
                id: created.id,
                prepared_at: tokio::time::Instant::now(),
                output,
                input,
            }),
            Err(e) => {
                self.remove(&created.id).await;
                Err(e)
            }
        }
    }

    async fn attach_and_start(
        &self,
        id: &str,
    ) -> Result<(Output, Pin<Box<dyn tokio::io::AsyncWrite + Send>>), DockerError> {
        let options = AttachContainerOptionsBuilder::default()
            .stdin(true)
            .stdout(true)
            .stderr(true)
            .stream(true)
            .build();
        let attached = self.docker.attach_container(id, Some(options)).await?;
        self.docker.start_container(id, None).await?;
        let output = attached.output.filter_map(|item| async move {
            match item {
                Ok(LogOutput::StdOut { message }) => Some(Ok((OutputStream::Stdout, message))),
                Ok(LogOutput::StdErr { message }) => Some(Ok((OutputStream::Stderr, message))),
                Ok(_) => None,
                Err(e) => Some(Err(DockerError::from(e))),
            }
        });
        Ok((Box::pin(output), attached.input))
    }

    pub async fn rename(&self, id: &str, name: &str) {
        let options = bollard::query_parameters::RenameContainerOptionsBuilder::default()
            .name(name)
            .build();
        if let Err(e) = self.docker.rename_container(id, options).await {
            tracing::debug!(container = id, error = %e, "cannot rename container");
        }
    }

    /// Whether the container exists and is running.
    pub async fn is_running(&self, id: &str) -> bool {
        match self.docker.inspect_container(id, None).await {
            Ok(inspect) => inspect.state.and_then(|s| s.running).unwrap_or(false),
            Err(_) => false,
        }
    }

    /// Whether the kernel killed the container for exceeding its memory limit.
    pub async fn oom_killed(&self, id: &str) -> bool {
        match self.docker.inspect_container(id, None).await {
            Ok(inspect) => inspect.state.and_then(|s| s.oom_killed).unwrap_or(false),
            Err(_) => false,
        }
    }

    /// Waits for the container to exit and returns its exit code.
    pub async fn wait(&self, id: &str) -> Result<i64, DockerError> {
        let options = WaitContainerOptionsBuilder::default()
            .condition("not-running")
            .build();
        let mut waits = self.docker.wait_container(id, Some(options));
        match waits.next().await {
            Some(Ok(response)) => Ok(response.status_code),
            // bollard reports a non-zero exit as an error carrying the code.
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(e)) => Err(e.into()),
            None => Err(DockerError::Api(
                bollard::errors::Error::DockerStreamError {
                    error: "container wait ended without a status".to_owned(),
                },
            )),
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&self, id: &str, grace: Duration) -> Result<(), DockerError> {
        let seconds = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
        let options = StopContainerOptionsBuilder::default().t(seconds).build();
        match self.docker.stop_container(id, Some(options)).await {
            // 304: already stopped; 404: already gone. Both mean "stopped".
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304 | 404,
                ..
            }) => Ok(()),
            other => other.map_err(DockerError::from),
        }
    }

    /// Force-removes the container and its anonymous volumes. Failure is logged, not returned:
    /// the startup reaper removes whatever is left behind.
    pub async fn remove(&self, id: &str) {
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match self.docker.remove_container(id, Some(options)).await {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(e) => tracing::warn!(container = id, error = %e, "cannot remove container"),
        }
    }

    /// Every container of Flotilla system `cluster` on this host: (id, node label, created
    /// unix seconds).
    pub async fn list_managed(
        &self,
        cluster: &str,
    ) -> Result<Vec<(String, String, i64)>, DockerError> {
        let managed = format!("{}=true", flotilla_proto::names::LABEL_MANAGED);
        let cluster = format!("{}={cluster}", flotilla_proto::names::LABEL_CLUSTER);
        let filters = HashMap::from([("label", vec![managed.as_str(), cluster.as_str()])]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let containers = self.docker.list_containers(Some(options)).await?;
        Ok(containers
            .into_iter()
            .filter_map(|c| {
                let node = c
                    .labels
                    .as_ref()?
                    .get(flotilla_proto::names::LABEL_NODE)?
                    .clone();
                Some((c.id?, node, c.created.unwrap_or(0)))
            })
            .collect())
    }

    /// Ids of every container carrying `label=value`, running or not.
    pub async fn list_labelled(
        &self,
        label: &str,
        value: &str,
    ) -> Result<Vec<String>, DockerError> {
        let filter = format!("{label}={value}");
        let filters = HashMap::from([("label", vec![filter.as_str()])]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let containers = self.docker.list_containers(Some(options)).await?;
        Ok(containers.into_iter().filter_map(|c| c.id).collect())
    }
}

/// The hardened container: unprivileged user, no capabilities, no privilege escalation,
/// read-only root, no network, bounded memory/CPU/pids, writable scratch only on tmpfs.
fn container_body(key: &PoolKey, labels: HashMap<String, String>) -> ContainerCreateBody {
    // The `--tmpfs` form, because mounts made through `Mounts` are always `noexec` before API
    // 1.46: a coding agent must run what it builds and installs (tests, `node_modules/.bin`,
    // Go's binaries in TMPDIR), and `noexec` stops none of that anyway (`sh x`, `ld.so x`).
    let tmpfs = |size_bytes: i64| format!("rw,exec,nosuid,nodev,size={size_bytes},mode=1777");
    let host_config = HostConfig {
        memory: Some(key.memory_bytes),
        // Equal to memory: no swap on top.
        memory_swap: Some(key.memory_bytes),
        nano_cpus: Some(key.nano_cpus),
        pids_limit: Some(key.pids_limit),
        cap_drop: Some(vec!["ALL".to_owned()]),
        security_opt: Some(vec!["no-new-privileges:true".to_owned()]),
        readonly_rootfs: Some(true),
        network_mode: Some(key.network.clone()),
        runtime: key.runtime.clone(),
        ipc_mode: Some("private".to_owned()),
        init: Some(true),
        tmpfs: Some(HashMap::from([
            ("/workspace".to_owned(), tmpfs(key.workspace_bytes)),
            ("/tmp".to_owned(), tmpfs(64 << 20)),
        ])),
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(key.image.clone()),
        user: Some(JOB_USER.to_owned()),
        cmd: Some(vec![
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            LAUNCHER.to_owned(),
        ]),
        working_dir: Some("/workspace".to_owned()),
        env: Some(vec!["HOME=/workspace".to_owned(), "TMPDIR=/tmp".to_owned()]),
        labels: Some(labels),
        attach_stdin: Some(true),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        open_stdin: Some(true),
        // Close the container's stdin once the node has sent the script.
        stdin_once: Some(true),
        tty: Some(false),
        network_disabled: Some(key.network == "none"),
        host_config: Some(host_config),
        ..Default::default()
    }
}
