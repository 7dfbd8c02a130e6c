use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use tempfile::TempDir;

use crate::{NatsServer, NatsServerBuilder, Process, binary, free_port, repo_root, wait_until};

/// The whole system as real processes: nats-server, api-gateway, dispatcher and N agent-nodes.
/// Node ids are unique per fleet, so the containers of one test are told apart from another's.
pub struct Fleet {
    pub nats: NatsServer,
    pub gateway: Process,
    /// Further gateways (see [`FleetBuilder::gateways`]) and their URLs.
    pub extra_gateways: Vec<(Process, String)>,
    pub dispatcher: Process,
    /// The dispatcher's health and metrics endpoints: `http://127.0.0.1:<port>`.
    pub dispatcher_url: String,
    pub nodes: Vec<Process>,
    pub node_ids: Vec<String>,
    /// Each node's metrics URL, `http://127.0.0.1:<port>/metrics` (same port across restarts).
    pub node_metrics: Vec<String>,
    /// The profiles directory every service of this fleet reads.
    pub profiles: PathBuf,
    /// The `flotilla.cluster` label of this fleet's containers.
    pub cluster: String,
    /// One per node when built with [`FleetBuilder::proxied_nodes`].
    pub proxies: Vec<crate::TcpProxy>,
    /// `http://127.0.0.1:<port>`
    pub api: String,
    pub api_key: Option<String>,
    pub http: reqwest::Client,
    /// The llm-gateway, when built with [`FleetBuilder::llm`].
    pub llm: Option<LlmGateway>,
    dir: TempDir,
    builder: FleetBuilder,
}

/// The fleet's llm-gateway process and the job network its nodes fence.
pub struct LlmGateway {
    pub process: Process,
    pub port: u16,
    /// The gateway from the host: `http://127.0.0.1:<port>`.
    pub url: String,
    pub network: String,
}

/// The provider keys the test llm-gateway holds: they must never reach a job.
pub const TEST_ANTHROPIC_KEY: &str = "sk-ant-api03-TEST-REAL-KEY-never-in-a-container";
pub const TEST_OPENAI_KEY: &str = "sk-proj-TEST-REAL-KEY-never-in-a-container";
pub const TEST_GOOGLE_KEY: &str = "AIzaSy-TEST-REAL-KEY-never-in-a-container";

#[derive(Clone)]
pub struct FleetBuilder {
    nodes: usize,
    slots: u32,
    api_key: Option<String>,
    stop_grace_secs: u64,
    drain_grace_secs: u64,
    extra_gateway_env: Vec<(String, String)>,
    extra_dispatcher_env: Vec<(String, String)>,
    extra_node_env: Vec<(String, String)>,
    /// Applied to every service.
    common_env: Vec<(String, String)>,
    heartbeat_ms: u64,
    /// Profiles added to the shipped ones, as (name, TOML).
    extra_profiles: Vec<(String, String)>,
    /// Nodes reach NATS through a [`TcpProxy`] each, so a test can cut one off.
    proxied_nodes: bool,
    gateways: usize,
    /// Base URL of the upstream the fleet's llm-gateway forwards to.
    llm_upstream: Option<String>,
    llm_port: Option<u16>,
    /// The fleet's nats-server; every service gets its credentials and CA through the
    /// environment ([`NatsServer::service_env`]).
    nats: NatsServerBuilder,
}

/// `OTEL_BSP_SCHEDULE_DELAY` (ms) of a fleet exporting traces: spans reach the test's
/// receiver within a fraction of a second instead of the SDK's default five.
const TEST_EXPORT_DELAY_MS: &str = "100";

impl Default for FleetBuilder {
    fn default() -> Self {
        Self {
            nodes: 1,
            slots: 4,
            api_key: None,
            stop_grace_secs: 1,
            drain_grace_secs: 10,
            extra_gateway_env: Vec::new(),
            extra_dispatcher_env: Vec::new(),
            extra_node_env: Vec::new(),
            common_env: Vec::new(),
            heartbeat_ms: 500,
            extra_profiles: Vec::new(),
            proxied_nodes: false,
            gateways: 1,
            llm_upstream: None,
            llm_port: None,
            nats: NatsServerBuilder::default(),
        }
    }
}

impl FleetBuilder {
    pub fn nodes(mut self, nodes: usize) -> Self {
        self.nodes = nodes;
        self
    }

    pub fn slots(mut self, slots: u32) -> Self {
        self.slots = slots;
        self
    }

    pub fn api_key(mut self, key: &str) -> Self {
        self.api_key = Some(key.to_owned());
        self
    }

    pub fn gateway_env(mut self, name: &str, value: &str) -> Self {
        self.extra_gateway_env
            .push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn dispatcher_env(mut self, name: &str, value: &str) -> Self {
        self.extra_dispatcher_env
            .push((name.to_owned(), value.to_owned()));
        self
    }

    /// An environment variable for every agent-node (after [`Self::env`]'s).
    pub fn node_env(mut self, name: &str, value: &str) -> Self {
        self.extra_node_env
            .push((name.to_owned(), value.to_owned()));
        self
    }

    /// An environment variable for every service (topology settings must agree).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.common_env.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn heartbeat_ms(mut self, ms: u64) -> Self {
        self.heartbeat_ms = ms;
        self
    }

    /// Adds a profile (TOML) next to the shipped ones, for this fleet only.
    pub fn profile(mut self, name: &str, toml: &str) -> Self {
        self.extra_profiles.push((name.to_owned(), toml.to_owned()));
        self
    }

    /// Runs this many api-gateways on the same NATS (default 1).
    pub fn gateways(mut self, gateways: usize) -> Self {
        self.gateways = gateways.max(1);
        self
    }

    pub fn proxied_nodes(mut self) -> Self {
        self.proxied_nodes = true;
        self
    }

    /// Runs an llm-gateway whose `anthropic`, `openai` and `google` providers forward to
    /// `upstream` (a [`crate::MockLlm`]), holding [`TEST_ANTHROPIC_KEY`], [`TEST_OPENAI_KEY`] and
    /// [`TEST_GOOGLE_KEY`]; nodes get its port and a fenced job network of their own.
    pub fn llm(mut self, upstream: &str) -> Self {
        self.llm_upstream = Some(upstream.to_owned());
        self
    }

    /// The llm-gateway's port, when a test must know it before the fleet starts.
    pub fn llm_port(mut self, port: u16) -> Self {
        self.llm_port = Some(port);
        self
    }

    /// Every service exports its spans over OTLP/HTTP to `endpoint` (a [`crate::OtlpReceiver`]).
    pub fn otlp(self, endpoint: &str) -> Self {
        self.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
            .env("OTEL_BSP_SCHEDULE_DELAY", TEST_EXPORT_DELAY_MS)
    }

    /// Runs the fleet on a nats-server built this way (authorization, TLS).
    pub fn nats(mut self, nats: NatsServerBuilder) -> Self {
        self.nats = nats;
        self
    }

    pub fn drain_grace_secs(mut self, seconds: u64) -> Self {
        self.drain_grace_secs = seconds;
        self
    }

    pub async fn start(self) -> anyhow::Result<Fleet> {
        let nats = self.nats.clone().start().await?;
        let dir = tempfile::Builder::new()
            .prefix("flotilla-fleet-")
            .tempdir()?;
        let root = repo_root();
        let port = free_port();
        let tag = uuid_fragment();

        let profiles = if self.extra_profiles.is_empty() {
            root.join("profiles")
        } else {
            // The shipped profiles plus this fleet's own, in the fleet's directory.
            let dir = dir.path().join("profiles");
            copy_dir(&root.join("profiles"), &dir)?;
            for (name, toml) in &self.extra_profiles {
                std::fs::write(dir.join(format!("{name}.toml")), toml)?;
            }
            dir
        };
        let common = |command: &mut Command| service_env(command, &nats, &profiles, &self);

        let mut command = Command::new(binary("api-gateway")?);
        common(&mut command);
        command.env("FLOTILLA_LISTEN", format!("127.0.0.1:{port}"));
        if let Some(key) = &self.api_key {
            command.env("FLOTILLA_API_KEY", key);
        }
        for (name, value) in &self.extra_gateway_env {
            command.env(name, value);
        }
        let gateway =
            Process::spawn_command("api-gateway", command, &dir.path().join("gateway.log"))?;

        let mut extra_gateways = Vec::new();
        for n in 1..self.gateways {
            let port = free_port();
            let mut command = Command::new(binary("api-gateway")?);
            common(&mut command);
            command.env("FLOTILLA_LISTEN", format!("127.0.0.1:{port}"));
            if let Some(key) = &self.api_key {
                command.env("FLOTILLA_API_KEY", key);
            }
            let log = dir.path().join(format!("gateway-{n}.log"));
            extra_gateways.push((
                Process::spawn_command("api-gateway", command, &log)?,
                format!("http://127.0.0.1:{port}"),
            ));
        }

        let dispatcher_port = free_port();
        let dispatcher = spawn_dispatcher(&nats, &profiles, &self, dir.path(), dispatcher_port)?;

        let cluster = format!("test-{tag}");
        let llm = match &self.llm_upstream {
            Some(upstream) => {
                let port = self.llm_port.unwrap_or_else(free_port);
                let config = dir.path().join("llm-gateway.toml");
                std::fs::write(&config, crate::mock_llm::gateway_config(upstream))?;
                let mut command = Command::new(binary("llm-gateway")?);
                common(&mut command);
                command
                    // Containers reach it on the job network's bridge address.
                    .env("FLOTILLA_LLM_GATEWAY_LISTEN", format!("0.0.0.0:{port}"))
                    .env("FLOTILLA_LLM_CONFIG", &config)
                    // `/metrics` apart, as deployed, where jobs cannot reach it. Port 0: no test
                    // scrapes it, and a port picked here could be taken before it is bound.
                    .env("FLOTILLA_LLM_METRICS_LISTEN", "127.0.0.1:0")
                    .env("FLOTILLA_TEST_ANTHROPIC_KEY", TEST_ANTHROPIC_KEY)
                    .env("FLOTILLA_TEST_OPENAI_KEY", TEST_OPENAI_KEY)
                    .env("FLOTILLA_TEST_GOOGLE_KEY", TEST_GOOGLE_KEY);
                let log = dir.path().join("llm-gateway.log");
                Some(LlmGateway {
                    process: Process::spawn_command("llm-gateway", command, &log)?,
                    port,
                    url: format!("http://127.0.0.1:{port}"),
                    network: format!("flotilla-{cluster}"),
                })
            }
            None => None,
        };

        let mut fleet = Fleet {
            nats,
            gateway,
            extra_gateways,
            dispatcher,
            dispatcher_url: format!("http://127.0.0.1:{dispatcher_port}"),
            nodes: Vec::new(),
            node_ids: Vec::new(),
            node_metrics: Vec::new(),
            proxies: Vec::new(),
            cluster,
            llm,
            profiles: profiles.clone(),
            api: format!("http://127.0.0.1:{port}"),
            api_key: self.api_key.clone(),
            http: reqwest::Client::new(),
            dir,
            builder: self.clone(),
        };
        for i in 0..self.nodes {
            fleet.node_ids.push(format!("test-{tag}-{i}"));
            fleet
                .node_metrics
                .push(format!("http://127.0.0.1:{}/metrics", free_port()));
            if self.proxied_nodes {
                fleet
                    .proxies
                    .push(crate::TcpProxy::start(fleet.nats.port()).await?);
            }
            let node = fleet.spawn_node(i)?;
            fleet.nodes.push(node);
        }
        fleet.wait_ready().await?;
        Ok(fleet)
    }
}

/// What every service of a fleet is started with.
fn service_env(command: &mut Command, nats: &NatsServer, profiles: &Path, builder: &FleetBuilder) {
    command
        .env("FLOTILLA_NATS_URL", nats.url())
        .envs(nats.service_env())
        .env("FLOTILLA_ENGINES_DIR", repo_root().join("engines"))
        .env("FLOTILLA_PROFILES_DIR", profiles)
        .env("RUST_LOG", "info")
        .envs(builder.common_env.iter().map(|(k, v)| (k, v)));
}

fn spawn_dispatcher(
    nats: &NatsServer,
    profiles: &Path,
    builder: &FleetBuilder,
    dir: &Path,
    port: u16,
) -> anyhow::Result<Process> {
    let mut command = Command::new(binary("dispatcher")?);
    service_env(&mut command, nats, profiles, builder);
    command
        .env("FLOTILLA_DISPATCHER_LISTEN", format!("127.0.0.1:{port}"))
        .env("FLOTILLA_NODE_CHECK_MS", "250")
        .envs(builder.extra_dispatcher_env.iter().map(|(k, v)| (k, v)));
    let log = dir.join(format!("dispatcher-{}.log", uuid_fragment()));
    Process::spawn_command("dispatcher", command, &log)
}

impl Fleet {
    pub fn builder() -> FleetBuilder {
        FleetBuilder::default()
    }

    /// Starts the dispatcher again after it was stopped or killed, with the same settings and
    /// a fresh health port (`dispatcher_url` follows).
    pub fn restart_dispatcher(&mut self) -> anyhow::Result<()> {
        let port = free_port();
        let dispatcher = spawn_dispatcher(
            &self.nats,
            &self.profiles,
            &self.builder,
            self.dir.path(),
            port,
        )?;
        let _old = std::mem::replace(&mut self.dispatcher, dispatcher);
        self.dispatcher_url = format!("http://127.0.0.1:{port}");
        Ok(())
    }

    fn spawn_node(&self, i: usize) -> anyhow::Result<Process> {
        self.spawn_node_with(i, &[])
    }

    fn spawn_node_with(&self, i: usize, env: &[(&str, &str)]) -> anyhow::Result<Process> {
        let mut command = Command::new(binary("agent-node")?);
        let root = repo_root();
        command
            .env(
                "FLOTILLA_NATS_URL",
                self.proxies
                    .get(i)
                    .map_or_else(|| self.nats.url(), |p| p.url()),
            )
            .envs(self.nats.service_env())
            .env("FLOTILLA_ENGINES_DIR", root.join("engines"))
            .env("FLOTILLA_PROFILES_DIR", &self.profiles)
            .env("FLOTILLA_STATE_DIR", self.dir.path().join("state"))
            .env("FLOTILLA_NODE_ID", &self.node_ids[i])
            .env(
                "FLOTILLA_NODE_METRICS_LISTEN",
                metrics_addr(&self.node_metrics[i]),
            )
            .env("FLOTILLA_CLUSTER", &self.cluster)
            .env("FLOTILLA_NODE_SLOTS", self.builder.slots.to_string())
            .env(
                "FLOTILLA_STOP_GRACE_SECS",
                self.builder.stop_grace_secs.to_string(),
            )
            .env(
                "FLOTILLA_DRAIN_GRACE_SECS",
                self.builder.drain_grace_secs.to_string(),
            )
            .env(
                "FLOTILLA_HEARTBEAT_MS",
                self.builder.heartbeat_ms.to_string(),
            )
            .env("RUST_LOG", "info")
            .envs(self.builder.common_env.iter().map(|(k, v)| (k, v)))
            .envs(self.builder.extra_node_env.iter().map(|(k, v)| (k, v)))
            .envs(env.iter().copied());
        if let Some(llm) = &self.llm {
            command
                .env("FLOTILLA_LLM_GATEWAY_PORT", llm.port.to_string())
                .env("FLOTILLA_JOB_NETWORK", &llm.network);
        }
        Process::spawn_command(
            &format!("agent-node {}", self.node_ids[i]),
            command,
            &self
                .dir
                .path()
                .join(format!("node-{i}-{}.log", uuid_fragment())),
        )
    }

    /// Starts a second process with node `i`'s settings, its id included, as if on another
    /// host (`FLOTILLA_NODE_HOST`, its own state directory), on a fresh metrics port.
    pub fn spawn_twin(&mut self, i: usize) -> anyhow::Result<Process> {
        let fresh = format!("http://127.0.0.1:{}/metrics", free_port());
        let own = std::mem::replace(&mut self.node_metrics[i], fresh);
        let state = self.dir.path().join(format!("twin-state-{i}"));
        let env = [
            ("FLOTILLA_NODE_HOST", "another-host"),
            ("FLOTILLA_STATE_DIR", state.to_str().unwrap_or_default()),
        ];
        let twin = self.spawn_node_with(i, &env);
        self.node_metrics[i] = own;
        twin
    }

    /// Starts one more node with `env` on top of the fleet's node settings (labels, say); its
    /// id is the next in line. Returns its index.
    pub fn add_node(&mut self, env: &[(&str, &str)]) -> anyhow::Result<usize> {
        let i = self.node_ids.len();
        anyhow::ensure!(
            self.proxies.is_empty(),
            "add_node does not proxy nodes: the fleet's nodes are proxied"
        );
        let tag = self.node_ids[0].rsplit_once('-').map_or("", |(tag, _)| tag);
        self.node_ids.push(format!("{tag}-{i}"));
        self.node_metrics
            .push(format!("http://127.0.0.1:{}/metrics", free_port()));
        let node = self.spawn_node_with(i, env)?;
        self.nodes.push(node);
        Ok(i)
    }

    /// Starts node `i` again (same id) after it was killed: it reaps what it left behind.
    pub fn restart_node(&mut self, i: usize) -> anyhow::Result<()> {
        // A fresh metrics port: the old process may not have released its own yet (a KILL is
        // delivered asynchronously).
        self.node_metrics[i] = format!("http://127.0.0.1:{}/metrics", free_port());
        let node = self.spawn_node(i)?;
        let _old = std::mem::replace(&mut self.nodes[i], node);
        Ok(())
    }

    /// An authorised request builder for `path` on the gateway.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.api));
        match &self.api_key {
            Some(key) => builder.bearer_auth(key),
            None => builder,
        }
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let expected = self.nodes.len();
        let result = wait_until(Duration::from_secs(30), "the fleet to be ready", || async {
            if let Some(llm) = &self.llm {
                let health = self
                    .http
                    .get(format!("{}/health", llm.url))
                    .send()
                    .await
                    .ok()?;
                if !health.status().is_success() {
                    return None;
                }
            }
            let health = self
                .request(reqwest::Method::GET, "/health")
                .send()
                .await
                .ok()?;
            if !health.status().is_success() {
                return None;
            }
            let nodes: serde_json::Value = self
                .request(reqwest::Method::GET, "/nodes")
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (nodes["nodes"].as_array()?.len() == expected).then_some(())
        })
        .await;
        result.map_err(|e| anyhow::anyhow!("{e}\n{}", self.logs()))
    }

    /// Every process's output, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for process in [&self.gateway, &self.dispatcher]
            .into_iter()
            .chain(self.llm.as_ref().map(|l| &l.process))
            .chain(self.nodes.iter())
        {
            let log = process.log();
            let tail: String = log
                .chars()
                .rev()
                .take(6000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            out.push_str(&format!("----- {} -----\n{tail}\n", process.name()));
        }
        out
    }

    /// Containers (running or not) created by this fleet's nodes.
    pub fn containers(&self) -> anyhow::Result<Vec<String>> {
        let mut all = Vec::new();
        for id in &self.node_ids {
            all.extend(crate::containers_with_label(
                flotilla_proto::names::LABEL_NODE,
                id,
            )?);
        }
        Ok(all)
    }

    /// Containers that ran (or are running) a job: every container of this fleet except the
    /// idle ones waiting in warm pools (named `flotilla-warm-*` until they take a job).
    pub fn job_containers(&self) -> anyhow::Result<Vec<String>> {
        let mut found = Vec::new();
        for node in &self.node_ids {
            let output = Command::new("docker")
                .args([
                    "ps",
                    "-a",
                    "--format",
                    "{{.ID}} {{.Names}}|{{.Status}}",
                    "--filter",
                ])
                .arg(format!(
                    "label={}={node}",
                    flotilla_proto::names::LABEL_NODE
                ))
                .output()?;
            anyhow::ensure!(output.status.success(), "docker ps failed");
            for line in String::from_utf8_lossy(&output.stdout).lines() {
                // Removed, though dockerd on fuse-overlayfs may go on listing it.
                if line.ends_with("|Removal In Progress") {
                    continue;
                }
                let line = line
                    .rsplit_once('|')
                    .map_or(line, |(container, _)| container);
                let (id, name) = line.split_once(' ').unwrap_or((line, ""));
                if !name.starts_with("flotilla-warm-") {
                    found.push(format!("{id} {name}"));
                }
            }
        }
        Ok(found)
    }

    /// Checks that every job container of this fleet has been removed (warm containers still
    /// waiting for a job are not leftovers; nodes remove them when they stop).
    pub async fn assert_no_containers_left(&self) -> anyhow::Result<()> {
        wait_until(
            Duration::from_secs(20),
            "this fleet's job containers to be removed",
            || async {
                self.job_containers()
                    .ok()
                    .filter(|c| c.is_empty())
                    .map(|_| ())
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}: {:?}\n{}", self.job_containers(), self.logs()))
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.terminate_and_wait(Duration::from_secs(5));
        }
        // Whatever a failed test left behind still goes: no orphans across the suite.
        if let Ok(ids) = self.containers()
            && !ids.is_empty()
        {
            let _ = Command::new("docker")
                .arg("rm")
                .arg("-f")
                .args(&ids)
                .output();
        }
        if let Some(llm) = &self.llm {
            remove_job_network(&llm.network);
        }
    }
}

/// Removes a job network a node created, and the firewall chain that fenced it.
fn remove_job_network(network: &str) {
    let Ok(output) = Command::new("docker")
        .args(["network", "inspect", "-f", "{{.Id}}", network])
        .output()
    else {
        return;
    };
    let id = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let _ = Command::new("docker")
        .args(["network", "rm", network])
        .output();
    if id.len() < 12 {
        return;
    }
    let chain = flotilla_proto::names::job_network_chain(&id);
    let bridge = format!("br-{}", &id[..12]);
    // The node fences IPv6 too (ip6tables) on hosts with an IPv6 stack.
    for binary in ["iptables", "ip6tables"] {
        for args in [
            vec!["-D", "INPUT", "-i", &bridge, "-j", &chain],
            vec!["-F", &chain],
            vec!["-X", &chain],
        ] {
            let _ = Command::new(binary).arg("-w").args(&args).output();
        }
    }
}

/// `127.0.0.1:<port>` from `http://127.0.0.1:<port>/metrics`.
fn metrics_addr(url: &str) -> &str {
    url.trim_start_matches("http://")
        .trim_end_matches("/metrics")
}

fn uuid_fragment() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}", std::process::id(), nanos)
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}
