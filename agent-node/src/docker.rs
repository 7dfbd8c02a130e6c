//! The node's view of Docker: start a hardened, labelled container that runs one job script,
//! stream its output, stop it gracefully, remove it.

use std::{collections::HashMap, pin::Pin, time::Duration};

use bollard::{
    Docker,
    container::LogOutput,
    models::{ContainerCreateBody, HostConfig, Mount, MountTmpfsOptions, MountType},
    query_parameters::{
        AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, ListContainersOptionsBuilder,
        RemoveContainerOptionsBuilder, StopContainerOptionsBuilder, WaitContainerOptionsBuilder,
    },
};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;

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

/// Everything that varies between job containers.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub labels: HashMap<String, String>,
    pub memory_bytes: i64,
    pub nano_cpus: i64,
    pub pids_limit: i64,
    pub workspace_bytes: i64,
    /// The shell script the container runs (as `/bin/sh <script>`).
    pub script: Bytes,
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

#[derive(Clone)]
pub struct DockerRuntime {
    docker: Docker,
}

impl DockerRuntime {
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

    /// Creates, attaches to and starts the container, then sends the script. If anything fails
    /// after creation the container is removed before the error is returned.
    pub async fn start(&self, spec: &ContainerSpec) -> Result<Started, DockerError> {
        let created = self
            .docker
            .create_container(
                Some(
                    CreateContainerOptionsBuilder::default()
                        .name(&spec.name)
                        .build(),
                ),
                container_body(spec),
            )
            .await?;
        match self.attach_and_start(&created.id, &spec.script).await {
            Ok(output) => Ok(Started {
                id: created.id,
                output,
            }),
            Err(e) => {
                self.remove(&created.id).await;
                Err(e)
            }
        }
    }

    async fn attach_and_start(&self, id: &str, script: &Bytes) -> Result<Output, DockerError> {
        let options = AttachContainerOptionsBuilder::default()
            .stdin(true)
            .stdout(true)
            .stderr(true)
            .stream(true)
            .build();
        let attached = self.docker.attach_container(id, Some(options)).await?;
        self.docker.start_container(id, None).await?;
        let mut input = attached.input;
        input.write_all(script).await?;
        input.shutdown().await?;
        let output = attached.output.filter_map(|item| async move {
            match item {
                Ok(LogOutput::StdOut { message }) => Some(Ok((OutputStream::Stdout, message))),
                Ok(LogOutput::StdErr { message }) => Some(Ok((OutputStream::Stderr, message))),
                Ok(_) => None,
                Err(e) => Some(Err(DockerError::from(e))),
            }
        });
        Ok(Box::pin(output))
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
fn container_body(spec: &ContainerSpec) -> ContainerCreateBody {
    let tmpfs = |target: &str, size_bytes: i64| Mount {
        target: Some(target.to_owned()),
        typ: Some(MountType::TMPFS),
        tmpfs_options: Some(MountTmpfsOptions {
            size_bytes: Some(size_bytes),
            mode: Some(0o1777),
            ..Default::default()
        }),
        ..Default::default()
    };
    let host_config = HostConfig {
        memory: Some(spec.memory_bytes),
        // Equal to memory: no swap on top.
        memory_swap: Some(spec.memory_bytes),
        nano_cpus: Some(spec.nano_cpus),
        pids_limit: Some(spec.pids_limit),
        cap_drop: Some(vec!["ALL".to_owned()]),
        security_opt: Some(vec!["no-new-privileges:true".to_owned()]),
        readonly_rootfs: Some(true),
        network_mode: Some("none".to_owned()),
        ipc_mode: Some("private".to_owned()),
        init: Some(true),
        mounts: Some(vec![
            tmpfs("/workspace", spec.workspace_bytes),
            tmpfs("/tmp", 64 << 20),
        ]),
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        user: Some(JOB_USER.to_owned()),
        cmd: Some(vec![
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            LAUNCHER.to_owned(),
        ]),
        working_dir: Some("/workspace".to_owned()),
        env: Some(vec!["HOME=/workspace".to_owned(), "TMPDIR=/tmp".to_owned()]),
        labels: Some(spec.labels.clone()),
        attach_stdin: Some(true),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        open_stdin: Some(true),
        // Close the container's stdin once the node has sent the script.
        stdin_once: Some(true),
        tty: Some(false),
        network_disabled: Some(true),
        host_config: Some(host_config),
        ..Default::default()
    }
}
