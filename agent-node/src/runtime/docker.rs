//! Docker behind [`ContainerRuntime`], through bollard: hardened, labelled containers that run
//! one job script each, the label filters of the reapers, the engine-binary probe and the
//! fenced job network (`network.rs`). Nothing outside this module sees a Docker type.

mod network;

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use bollard::{
    Docker,
    container::LogOutput,
    models::{ContainerCreateBody, HostConfig, HostConfigLogConfig, ResourcesUlimits},
    query_parameters::{
        AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, ListContainersOptionsBuilder,
        RemoveContainerOptionsBuilder, RenameContainerOptionsBuilder, StopContainerOptionsBuilder,
        WaitContainerOptionsBuilder,
    },
};
use flotilla_proto::names;
use futures::{StreamExt as _, future::BoxFuture};

pub use network::NetworkError;

use super::{
    ContainerRuntime, ContainerSpec, Exit, Input, Listed, Network, Output, OutputStream, Owner,
    Prepared, RuntimeError, Selector,
};
use crate::script;

/// The job script arrives on stdin: a 1 MB prompt does not fit in one argv element
/// (MAX_ARG_STRLEN is 128 KiB) and stdin keeps it out of `docker inspect` and `ps`.
/// Reads the header line (the script's length, and `tar` when the workspace tar follows the
/// script). With a tar, it copies exactly the script (`dd` with `fullblock` reads no further,
/// unlike `head -c` in busybox) and runs it, leaving the rest of stdin to the script. Without
/// one, the launcher's own shell runs the script straight from stdin: no `dd` and no second
/// shell before the job (about 2.5 ms of a warm job's first byte here). The programs the
/// script starts that could read stdin (hooks, the engine) get `/dev/null`, so none can read
/// the script's own text.
const LAUNCHER: &str = "umask 077; read n rest || exit 1; if [ \"$rest\" = tar ]; then \
                        dd bs=65536 count=\"$n\" iflag=count_bytes,fullblock \
                        of=/tmp/.flotilla-job 2>/dev/null && exec /bin/sh /tmp/.flotilla-job; \
                        else . /dev/stdin; fi";
/// Unprivileged uid:gid inside every job container.
const JOB_USER: &str = "65534:65534";
/// Open files per process (soft, hard): what a build or a language server needs, not the
/// million Docker's default can pass on from dockerd, which lets one job exhaust the host's
/// file table.
const NOFILE: (i64, i64) = (1024, 4096);
/// Label saying whether a container waits in the pool (`warm`) or was started cold.
const ROLE_LABEL: &str = "flotilla.role";
const RUNTIME: &str = "docker";

fn api(e: bollard::errors::Error) -> RuntimeError {
    RuntimeError::api(RUNTIME, e)
}

#[derive(Clone)]
pub struct DockerRuntime {
    docker: Docker,
}

impl DockerRuntime {
    /// Connects to the local Docker daemon and checks that it answers.
    pub async fn connect() -> Result<Self, RuntimeError> {
        let docker = Docker::connect_with_local_defaults()
            .map_err(api)?
            .negotiate_version()
            .await
            .map_err(api)?;
        docker.ping().await.map_err(api)?;
        Ok(Self { docker })
    }

    async fn create_and_start(
        &self,
        spec: &ContainerSpec,
        name: &str,
        owner: &Owner,
    ) -> Result<Prepared, RuntimeError> {
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptionsBuilder::default().name(name).build()),
                container_body(spec, labels(owner)),
            )
            .await
            .map_err(api)?;
        match self.attach_and_start(&created.id).await {
            Ok((output, input)) => Ok(Prepared::new(RUNTIME, created.id, output, input)),
            Err(e) => {
                self.remove_container(&created.id).await;
                Err(e)
            }
        }
    }

    async fn attach_and_start(&self, id: &str) -> Result<(Output, Input), RuntimeError> {
        let options = AttachContainerOptionsBuilder::default()
            .stdin(true)
            .stdout(true)
            .stderr(true)
            .stream(true)
            .build();
        let attached = self
            .docker
            .attach_container(id, Some(options))
            .await
            .map_err(api)?;
        self.docker.start_container(id, None).await.map_err(api)?;
        let output = attached.output.filter_map(|item| async move {
            match item {
                Ok(LogOutput::StdOut { message }) => Some(Ok((OutputStream::Stdout, message))),
                Ok(LogOutput::StdErr { message }) => Some(Ok((OutputStream::Stderr, message))),
                Ok(_) => None,
                Err(e) => Some(Err(api(e))),
            }
        });
        Ok((Box::pin(output), attached.input))
    }

    async fn inspect_state(&self, id: &str) -> Option<bollard::models::ContainerState> {
        self.docker
            .inspect_container(id, None)
            .await
            .ok()
            .and_then(|inspect| inspect.state)
    }

    async fn wait_exit(&self, id: &str) -> Result<Exit, RuntimeError> {
        let options = WaitContainerOptionsBuilder::default()
            .condition("not-running")
            .build();
        let mut waits = self.docker.wait_container(id, Some(options));
        let code = match waits.next().await {
            Some(Ok(response)) => response.status_code,
            // bollard reports a non-zero exit as an error carrying the code.
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
            Some(Err(e)) => return Err(api(e)),
            None => {
                return Err(api(bollard::errors::Error::DockerStreamError {
                    error: "container wait ended without a status".to_owned(),
                }));
            }
        };
        let oom_killed = code == 137 && self.oom_killed(id).await;
        Ok(Exit { code, oom_killed })
    }

    /// Whether the memory limit SIGKILLed the container. Docker learns it from an OOM event of
    /// its own, which on cgroup v1 can arrive after the exit: ask again for up to 2 s.
    async fn oom_killed(&self, id: &str) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            let oom = self.inspect_state(id).await.and_then(|s| s.oom_killed);
            if oom == Some(true) {
                return true;
            }
            if oom.is_none() || tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let seconds = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
        let options = StopContainerOptionsBuilder::default().t(seconds).build();
        match self.docker.stop_container(id, Some(options)).await {
            // 304: already stopped; 404: already gone. Both mean "stopped".
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304 | 404,
                ..
            }) => Ok(()),
            Err(e) => Err(api(e)),
        }
    }

    async fn remove_container(&self, id: &str) {
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

    /// Managed containers matching `selector`, by their labels.
    async fn list_labelled(&self, selector: Selector<'_>) -> Result<Vec<Listed>, RuntimeError> {
        let filters = match selector {
            Selector::Cluster(cluster) => vec![
                format!("{}=true", names::LABEL_MANAGED),
                format!("{}={cluster}", names::LABEL_CLUSTER),
            ],
            Selector::Node(node) => vec![format!("{}={node}", names::LABEL_NODE)],
        };
        let filters = HashMap::from([("label", filters.iter().map(String::as_str).collect())]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let containers = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(api)?;
        Ok(containers
            .into_iter()
            .filter_map(|c| {
                let node_id = c.labels.as_ref()?.get(names::LABEL_NODE)?.clone();
                Some(Listed {
                    id: c.id?,
                    node_id,
                    created: c.created.unwrap_or(0),
                })
            })
            .collect())
    }

    async fn inspect_image(&self, image: &str) -> Result<bool, RuntimeError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(false),
            Err(e) => Err(api(e)),
        }
    }

    /// Runs one hardened container that prints which of `binaries` are on its PATH.
    async fn probe(
        &self,
        spec: &ContainerSpec,
        name: &str,
        owner: &Owner,
        binaries: &[String],
    ) -> Result<HashSet<String>, RuntimeError> {
        let args: Vec<String> = binaries.iter().map(|b| script::quote(b)).collect();
        let probe = format!(
            "for b in {}; do command -v \"$b\" >/dev/null 2>&1 && printf '%s\\n' \"$b\"; done; exit 0\n",
            args.join(" ")
        );
        let prepared = self.create_and_start(spec, name, owner).await?;
        let id = prepared.id.clone();
        let result = async {
            let mut started = prepared.launch(probe.as_bytes()).await?;
            let mut stdout = Vec::new();
            while let Some(item) = started.output.next().await {
                if let Ok((OutputStream::Stdout, bytes)) = item {
                    stdout.extend_from_slice(&bytes);
                }
            }
            self.wait_exit(&id).await?;
            Ok(String::from_utf8_lossy(&stdout)
                .lines()
                .map(str::to_owned)
                .collect())
        }
        .await;
        self.remove_container(&id).await;
        result
    }
}

impl ContainerRuntime for DockerRuntime {
    fn prepare<'a>(
        &'a self,
        spec: &'a ContainerSpec,
        name: &'a str,
        owner: &'a Owner,
    ) -> BoxFuture<'a, Result<Prepared, RuntimeError>> {
        Box::pin(self.create_and_start(spec, name, owner))
    }

    fn rename<'a>(&'a self, id: &'a str, name: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let options = RenameContainerOptionsBuilder::default().name(name).build();
            if let Err(e) = self.docker.rename_container(id, options).await {
                tracing::debug!(container = id, error = %e, "cannot rename container");
            }
        })
    }

    fn is_running<'a>(&'a self, id: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let state = self.inspect_state(id).await;
            state.and_then(|s| s.running).unwrap_or(false)
        })
    }

    fn wait<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Exit, RuntimeError>> {
        Box::pin(self.wait_exit(id))
    }

    fn stop<'a>(&'a self, id: &'a str, grace: Duration) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(self.stop_container(id, grace))
    }

    fn remove<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(self.remove_container(id))
    }

    fn list<'a>(
        &'a self,
        selector: Selector<'a>,
    ) -> BoxFuture<'a, Result<Vec<Listed>, RuntimeError>> {
        Box::pin(self.list_labelled(selector))
    }

    fn image_exists<'a>(&'a self, image: &'a str) -> BoxFuture<'a, Result<bool, RuntimeError>> {
        Box::pin(self.inspect_image(image))
    }

    fn pull_image<'a>(&'a self, image: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let options = bollard::query_parameters::CreateImageOptionsBuilder::default()
                .from_image(image)
                .build();
            let mut progress = self.docker.create_image(Some(options), None, None);
            while let Some(step) = progress.next().await {
                step.map_err(api)?;
            }
            Ok(())
        })
    }

    fn runtimes(&self) -> BoxFuture<'_, Result<Vec<String>, RuntimeError>> {
        Box::pin(async move {
            let info = self.docker.info().await.map_err(api)?;
            let mut names: Vec<String> = info.runtimes.unwrap_or_default().into_keys().collect();
            names.sort();
            Ok(names)
        })
    }

    fn find_binaries<'a>(
        &'a self,
        spec: &'a ContainerSpec,
        name: &'a str,
        owner: &'a Owner,
        binaries: &'a [String],
    ) -> BoxFuture<'a, Result<HashSet<String>, RuntimeError>> {
        Box::pin(self.probe(spec, name, owner, binaries))
    }

    fn job_network<'a>(
        &'a self,
        network: &'a str,
        cluster: &'a str,
        gateway_port: u16,
    ) -> BoxFuture<'a, Result<String, RuntimeError>> {
        Box::pin(async move {
            network::prepare(&self.docker, network, cluster, gateway_port)
                .await
                .map_err(|e| RuntimeError::Network(Box::new(e)))
        })
    }

    fn check_job_network<'a>(
        &'a self,
        network: &'a str,
        gateway_port: u16,
    ) -> BoxFuture<'a, Result<String, RuntimeError>> {
        Box::pin(async move {
            network::check(&self.docker, network, gateway_port)
                .await
                .map_err(|e| RuntimeError::Network(Box::new(e)))
        })
    }
}

/// The labels that make a container findable by the reapers (managed, node, system), its
/// role and, for a cold start, its job and attempt.
fn labels(owner: &Owner) -> HashMap<String, String> {
    let mut labels = HashMap::from([
        (names::LABEL_MANAGED.to_owned(), "true".to_owned()),
        (names::LABEL_NODE.to_owned(), owner.node_id.clone()),
        (names::LABEL_CLUSTER.to_owned(), owner.cluster.clone()),
        (ROLE_LABEL.to_owned(), owner.role.as_str().to_owned()),
    ]);
    if let Some(job) = &owner.job {
        labels.insert(names::LABEL_JOB.to_owned(), job.job_id.clone());
        labels.insert(names::LABEL_ATTEMPT.to_owned(), job.attempt.to_string());
    }
    labels
}

/// Docker's network mode for `network`.
fn network_mode(network: &Network) -> &str {
    match network {
        Network::None => "none",
        Network::Named(name) => name,
    }
}

/// The hardened container: unprivileged user, no capabilities, no privilege escalation,
/// read-only root, no network, bounded memory/CPU/pids/open files, writable scratch only on
/// tmpfs, no log kept by Docker.
fn container_body(spec: &ContainerSpec, labels: HashMap<String, String>) -> ContainerCreateBody {
    // The `--tmpfs` form, because mounts made through `Mounts` are always `noexec` before API
    // 1.46: a coding agent must run what it builds and installs (tests, `node_modules/.bin`,
    // Go's binaries in TMPDIR), and `noexec` stops none of that anyway (`sh x`, `ld.so x`).
    let tmpfs = |size_bytes: i64| format!("rw,exec,nosuid,nodev,size={size_bytes},mode=1777");
    let host_config = HostConfig {
        memory: Some(spec.memory_bytes),
        // Equal to memory: no swap on top.
        memory_swap: Some(spec.memory_bytes),
        nano_cpus: Some(spec.nano_cpus),
        pids_limit: Some(spec.pids_limit),
        cap_drop: Some(vec!["ALL".to_owned()]),
        security_opt: Some(vec!["no-new-privileges:true".to_owned()]),
        readonly_rootfs: Some(true),
        network_mode: Some(network_mode(&spec.network).to_owned()),
        runtime: spec.runtime_class.clone(),
        ipc_mode: Some("private".to_owned()),
        init: Some(true),
        tmpfs: Some(HashMap::from([
            ("/workspace".to_owned(), tmpfs(spec.workspace_bytes)),
            ("/tmp".to_owned(), tmpfs(64 << 20)),
        ])),
        // The node reads the attach stream and keeps at most its per-attempt cap; any log
        // driver would keep a second, uncapped copy (json-file: on the host's disk).
        log_config: Some(HostConfigLogConfig {
            typ: Some("none".to_owned()),
            config: None,
        }),
        ulimits: Some(vec![ResourcesUlimits {
            name: Some("nofile".to_owned()),
            soft: Some(NOFILE.0),
            hard: Some(NOFILE.1),
        }]),
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
        labels: Some(labels),
        attach_stdin: Some(true),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        open_stdin: Some(true),
        // Close the container's stdin once the node has sent the script.
        stdin_once: Some(true),
        tty: Some(false),
        network_disabled: Some(spec.network == Network::None),
        host_config: Some(host_config),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{JobRef, Role};

    fn spec(network: Network) -> ContainerSpec {
        ContainerSpec {
            image: "flotilla-worker:latest".to_owned(),
            memory_bytes: 512 << 20,
            nano_cpus: 1_000_000_000,
            pids_limit: 256,
            workspace_bytes: 1 << 30,
            network,
            runtime_class: Some("runsc".to_owned()),
        }
    }

    #[test]
    fn cold_labels_name_the_job() {
        let owner = Owner {
            node_id: "n1".to_owned(),
            cluster: "c1".to_owned(),
            role: Role::Cold,
            job: Some(JobRef {
                job_id: "j1".to_owned(),
                attempt: 2,
            }),
        };
        let labels = labels(&owner);
        let expected = [
            ("flotilla.managed", "true"),
            ("flotilla.node", "n1"),
            ("flotilla.cluster", "c1"),
            ("flotilla.role", "cold"),
            ("flotilla.job", "j1"),
            ("flotilla.attempt", "2"),
        ];
        assert_eq!(labels.len(), expected.len());
        for (k, v) in expected {
            assert_eq!(labels.get(k).map(String::as_str), Some(v), "{k}");
        }
    }

    #[test]
    fn hardened_body() {
        let body = container_body(&spec(Network::None), HashMap::new());
        let host = body.host_config.expect("host config");
        assert_eq!(body.user.as_deref(), Some(JOB_USER));
        assert_eq!(body.network_disabled, Some(true));
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(host.readonly_rootfs, Some(true));
        assert_eq!(host.memory_swap, host.memory);
        assert_eq!(host.runtime.as_deref(), Some("runsc"));
        let named = container_body(&spec(Network::Named("jobs".to_owned())), HashMap::new());
        assert_eq!(named.network_disabled, Some(false));
        let mode = named.host_config.and_then(|h| h.network_mode);
        assert_eq!(mode.as_deref(), Some("jobs"));
    }

    #[test]
    fn docker_keeps_no_copy_of_the_output() {
        // The node reads the attach stream and caps what it keeps; a json-file log would keep
        // everything on the host's disk. Warm, cold and probe containers share this body.
        let host = container_body(&spec(Network::None), HashMap::new())
            .host_config
            .expect("host config");
        let log = host.log_config.expect("a log config");
        assert_eq!(log.typ.as_deref(), Some("none"));
        assert_eq!(log.config, None);
    }

    #[test]
    fn open_files_are_limited() {
        let host = container_body(&spec(Network::None), HashMap::new())
            .host_config
            .expect("host config");
        let ulimits = host.ulimits.expect("ulimits");
        assert_eq!(ulimits.len(), 1);
        assert_eq!(ulimits[0].name.as_deref(), Some("nofile"));
        assert_eq!((ulimits[0].soft, ulimits[0].hard), (Some(1024), Some(4096)));
    }
}
