//! Flotilla on many hosts (issue 12), on one machine: each host is a network namespace with
//! its own address and its own Docker engine ([`Hosts`]), NATS is a real three-server JetStream
//! cluster ([`NatsCluster`]), and the services are the real binaries, started with
//! `FLOTILLA_REPLICAS=3` and every server's URL. Faults are real too: a SIGKILLed nats-server,
//! a host cut off the network (its packets dropped), a drained node, a killed dispatcher
//! leader. Each test prints its figures and checks that nothing is left behind.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, consumer};
use chrono::{DateTime, Utc};
use flotilla_proto::{Encoding, LogChunk, LogStream, names};
use flotilla_testkit::{
    Hosts, NatsCluster, Process, Scrape, binary, free_port, repo_root, wait_until,
};
use futures::StreamExt;
use serde_json::{Value, json};
use tempfile::TempDir;

/// A service process and where it answers.
struct Service {
    process: Process,
    /// Killed on purpose: its exit is not a failure.
    stopped: bool,
    /// `http://<addr>:<port>`
    url: String,
}

struct Node {
    process: Option<Process>,
    id: String,
    host: usize,
    metrics: String,
}

/// The services of a multi-host test, on its hosts and cluster. Fields drop in order:
/// services first (SIGKILL), then the NATS cluster, then the hosts (containers, engines,
/// namespaces). [`Self::finish`] stops the nodes cleanly first and checks what is left.
struct Deployment {
    gateways: Vec<Service>,
    dispatchers: Vec<Service>,
    nodes: Vec<Node>,
    nats: NatsCluster,
    hosts: Hosts,
    env: Vec<(String, String)>,
    /// `FLOTILLA_NATS_URL` of the services started from now on (default: every server).
    nats_urls: String,
    /// `FLOTILLA_API_KEY` of the gateways ([`Self::api_key`]).
    api_key: Option<String>,
    slots: u32,
    dir: TempDir,
    http: reqwest::Client,
}

impl Deployment {
    fn new(hosts: Hosts, nats: NatsCluster, env: &[(&str, &str)]) -> Self {
        Self {
            gateways: Vec::new(),
            dispatchers: Vec::new(),
            nodes: Vec::new(),
            nats_urls: nats.urls(),
            api_key: None,
            nats,
            hosts,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            slots: 4,
            dir: tempfile::Builder::new()
                .prefix("flotilla-hosts-")
                .tempdir()
                .unwrap(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(90))
                .build()
                .unwrap(),
        }
    }

    /// Gateways require `key` (a gateway on a host's address refuses to run without one), and
    /// every request of the test presents it.
    fn api_key(&mut self, key: &str) {
        self.api_key = Some(key.to_owned());
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {key}").parse().unwrap(),
        );
        self.http = reqwest::Client::builder()
            .timeout(Duration::from_secs(90))
            .default_headers(headers)
            .build()
            .unwrap();
    }

    /// `program` in the root namespace, or inside host `host`.
    fn command(&self, program: &str, host: Option<usize>) -> Command {
        let path = binary(program).unwrap();
        let mut command = match host {
            Some(h) => self.hosts[h].command(path),
            None => Command::new(path),
        };
        let root = repo_root();
        command
            .env("FLOTILLA_NATS_URL", &self.nats_urls)
            .env("FLOTILLA_REPLICAS", "3")
            .env("FLOTILLA_ENGINES_DIR", root.join("engines"))
            .env("FLOTILLA_PROFILES_DIR", root.join("profiles"))
            .env("RUST_LOG", "info");
        command
    }

    fn addr(&self, host: Option<usize>) -> String {
        host.map_or_else(
            || "127.0.0.1".to_owned(),
            |h| self.hosts[h].addr().to_string(),
        )
    }

    fn log(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    fn spawn_gateway(&mut self, host: Option<usize>) -> usize {
        let listen = format!("{}:{}", self.addr(host), free_port());
        let mut command = self.command("api-gateway", host);
        command
            .env("FLOTILLA_LISTEN", &listen)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(key) = &self.api_key {
            command.env("FLOTILLA_API_KEY", key);
        }
        let n = self.gateways.len();
        let process = Process::spawn_command(
            &format!("api-gateway {n}"),
            command,
            &self.log(&format!("gateway-{n}")),
        )
        .unwrap();
        self.gateways.push(Service {
            process,
            stopped: false,
            url: format!("http://{listen}"),
        });
        n
    }

    fn spawn_dispatcher(&mut self, host: Option<usize>) -> usize {
        let listen = format!("{}:{}", self.addr(host), free_port());
        let mut command = self.command("dispatcher", host);
        command
            .env("FLOTILLA_DISPATCHER_LISTEN", &listen)
            .env("FLOTILLA_NODE_CHECK_MS", "250")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let n = self.dispatchers.len();
        let process = Process::spawn_command(
            &format!("dispatcher {n}"),
            command,
            &self.log(&format!("dispatcher-{n}")),
        )
        .unwrap();
        self.dispatchers.push(Service {
            process,
            stopped: false,
            url: format!("http://{listen}"),
        });
        n
    }

    /// Starts an agent-node inside host `host`, on its Docker engine; returns its index.
    fn spawn_node(&mut self, host: usize) -> usize {
        let n = self.nodes.len();
        let id = format!("test-{}-n{n}", self.hosts.tag());
        let metrics = format!("{}:{}", self.hosts[host].addr(), free_port());
        let process = self.node_process(n, &id, host, &metrics, 0);
        self.nodes.push(Node {
            process: Some(process),
            id,
            host,
            metrics: format!("http://{metrics}/metrics"),
        });
        n
    }

    fn node_process(&self, n: usize, id: &str, host: usize, metrics: &str, run: usize) -> Process {
        let mut command = self.command("agent-node", Some(host));
        command
            .env(
                "DOCKER_HOST",
                self.hosts[host]
                    .docker_host()
                    .expect("nodes run on hosts with an engine"),
            )
            .env("FLOTILLA_NODE_ID", id)
            .env("FLOTILLA_STATE_DIR", self.dir.path().join("state"))
            .env("FLOTILLA_NODE_METRICS_LISTEN", metrics)
            .env("FLOTILLA_CLUSTER", format!("test-{}", self.hosts.tag()))
            .env("FLOTILLA_NODE_SLOTS", self.slots.to_string())
            .env("FLOTILLA_STOP_GRACE_SECS", "1")
            .env("FLOTILLA_DRAIN_GRACE_SECS", "10")
            .env("FLOTILLA_HEARTBEAT_MS", "500")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        Process::spawn_command(
            &format!("agent-node {n} (host {host})"),
            command,
            &self.log(&format!("node-{n}-{run}")),
        )
        .unwrap()
    }

    /// Starts node `n` again after it stopped, same id, same host.
    fn restart_node(&mut self, n: usize) {
        let node = &self.nodes[n];
        let metrics = format!("{}:{}", self.hosts[node.host].addr(), free_port());
        let run = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref().is_ok_and(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!("node-{n}-"))
                })
            })
            .count();
        let process = self.node_process(n, &node.id.clone(), node.host, &metrics, run);
        let node = &mut self.nodes[n];
        node.process = Some(process);
        node.metrics = format!("http://{metrics}/metrics");
    }

    fn node_log(&self, n: usize) -> String {
        let mut out = String::new();
        let mut logs: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|f| f.to_string_lossy().starts_with(&format!("node-{n}-")))
            })
            .collect();
        logs.sort();
        for log in logs {
            out.push_str(&std::fs::read_to_string(log).unwrap_or_default());
        }
        out
    }

    /// The index of the node whose id is `id`.
    fn node_index(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|node| node.id == id)
    }

    /// Until gateway `gw` is healthy and lists `nodes` live nodes; fails at once if a service
    /// exits.
    async fn wait_ready(&mut self, gw: usize, nodes: usize) {
        let url = self.gateways[gw].url.clone();
        self.wait_for(
            "the fleet to be ready",
            Duration::from_secs(60),
            async |d| {
                let health = d.http.get(format!("{url}/health")).send().await.ok()?;
                if !health.status().is_success() {
                    return None;
                }
                (d.live_nodes(gw).await?.len() == nodes).then_some(())
            },
        )
        .await;
    }

    /// Until `url` answers 200; fails at once if a service exits.
    async fn wait_healthy(&mut self, what: &str, url: &str) {
        self.wait_for(what, Duration::from_secs(60), async |d| {
            let health = d.http.get(url).send().await.ok()?;
            health.status().is_success().then_some(())
        })
        .await;
    }

    /// Polls `check` every 50 ms until `Some`, panicking with the logs after `timeout` or as
    /// soon as a service process has exited.
    async fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        check: impl AsyncFn(&Self) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = check(self).await {
                return value;
            }
            if let Some(name) = self.exited() {
                panic!("waiting for {what}: {name} exited\n{}", self.logs());
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The name of a service process that has exited, if one has.
    fn exited(&mut self) -> Option<String> {
        let services = self
            .gateways
            .iter_mut()
            .chain(self.dispatchers.iter_mut())
            .filter(|s| !s.stopped)
            .map(|s| &mut s.process);
        let nodes = self.nodes.iter_mut().filter_map(|n| n.process.as_mut());
        for process in services.chain(nodes) {
            if let Some(code) = process.try_exit_code() {
                return Some(format!("{} (exit code {code:?})", process.name()));
            }
        }
        None
    }

    /// Starts gateways, then dispatchers, then nodes, on these hosts (`None`: the root
    /// namespace), each kind once the previous one answers, and waits until gateway 0 lists
    /// every node. One after the other, the first service creates the topology alone: a few
    /// seconds, against 10-20 s when all race to create it
    /// (`services_started_together_on_a_fresh_cluster_all_come_up`).
    async fn start_services(
        &mut self,
        gateways: &[Option<usize>],
        dispatchers: &[Option<usize>],
        nodes: &[usize],
    ) {
        for host in gateways {
            let gw = self.spawn_gateway(*host);
            let url = format!("{}/health", self.gateways[gw].url);
            self.wait_healthy("the gateway to be healthy", &url).await;
        }
        for host in dispatchers {
            let n = self.spawn_dispatcher(*host);
            let url = format!("{}/health", self.dispatchers[n].url);
            self.wait_healthy("the dispatcher to be healthy", &url)
                .await;
        }
        for host in nodes {
            self.spawn_node(*host);
        }
        self.wait_ready(0, nodes.len()).await;
    }

    /// The ids of the live nodes as gateway `gw` lists them.
    async fn live_nodes(&self, gw: usize) -> Option<Vec<Value>> {
        let nodes: Value = self
            .http
            .get(format!("{}/nodes", self.gateways[gw].url))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        nodes["nodes"].as_array().cloned()
    }

    async fn submit(&self, gw: usize, body: &Value) -> String {
        let response = self
            .http
            .post(format!("{}/jobs", self.gateways[gw].url))
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("submit: {e}\n{}", self.logs()));
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, 202, "submit {body} -> {text}\n{}", self.logs());
        let value: Value = serde_json::from_str(&text).unwrap();
        value["job_id"].as_str().unwrap().to_owned()
    }

    /// `POST /jobs` with an `Idempotency-Key`, retried while the gateway answers 503 or does
    /// not answer, as a client would (the key makes a retry the same job); the job id and the
    /// number of tries, or `None` if it was not accepted within `timeout`.
    async fn submit_retrying(
        &self,
        gw: usize,
        body: &Value,
        key: &str,
        timeout: Duration,
    ) -> Option<(String, u32)> {
        let deadline = Instant::now() + timeout;
        let mut tries = 0;
        loop {
            tries += 1;
            let response = self
                .http
                .post(format!("{}/jobs", self.gateways[gw].url))
                .header("Idempotency-Key", key)
                .timeout(Duration::from_secs(15))
                .json(body)
                .send()
                .await;
            match response {
                Ok(response) if response.status() == 202 || response.status() == 200 => {
                    let value: Value = response.json().await.unwrap();
                    return Some((value["job_id"].as_str().unwrap().to_owned(), tries));
                }
                Ok(response) if response.status() == 503 => {}
                Ok(response) => {
                    let status = response.status();
                    panic!(
                        "submit {body} -> {status} {}",
                        response.text().await.unwrap()
                    );
                }
                Err(_) => {}
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The job's record through gateway `gw`; `None` if it does not answer.
    async fn job(&self, gw: usize, job_id: &str) -> Option<Value> {
        let response = self
            .http
            .get(format!("{}/jobs/{job_id}", self.gateways[gw].url))
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json().await.ok()
    }

    /// Until every job is terminal (polling through gateway `gw`); their records.
    async fn wait_all(&self, gw: usize, jobs: &[String], timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let mut records = Vec::new();
        for job_id in jobs {
            let left = deadline.saturating_duration_since(Instant::now());
            let record = wait_until(left, &format!("job {job_id} to end"), || async {
                let record = self.job(gw, job_id).await?;
                matches!(
                    record["status"].as_str(),
                    Some("completed" | "failed" | "cancelled")
                )
                .then_some(record)
            })
            .await;
            let record = match record {
                Ok(record) => record,
                Err(e) => {
                    let last = self.job(gw, job_id).await;
                    panic!("{e}; its record: {last:?}\n{}", self.logs())
                }
            };
            records.push(record);
        }
        records
    }

    /// Until `job_id` is running; the record.
    async fn running(&self, gw: usize, job_id: &str, attempt: u64) -> Value {
        // A deadline, not a timing goal: on a loaded CI machine the first of 100 jobs can
        // take a while to start.
        wait_until(Duration::from_secs(90), "the job to be running", || async {
            let record = self.job(gw, job_id).await?;
            (record["status"] == "running" && record["attempt"] == attempt).then_some(record)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    /// SIGKILLs dispatcher `n`.
    fn kill_dispatcher(&mut self, n: usize) {
        let dispatcher = &mut self.dispatchers[n];
        dispatcher.stopped = true;
        dispatcher.process.signal("KILL");
    }

    /// SIGKILLs node `n` (its containers stay until its engine goes).
    fn kill_node(&mut self, n: usize) {
        if let Some(process) = self.nodes[n].process.take() {
            process.signal("KILL");
        }
    }

    /// Which dispatchers say they hold the leader lease (`flotilla_dispatcher_leader 1`).
    async fn dispatcher_leaders(&self) -> Vec<usize> {
        let mut leaders = Vec::new();
        for (i, dispatcher) in self.dispatchers.iter().enumerate() {
            if let Some(scrape) =
                Scrape::get(&self.http, &format!("{}/metrics", dispatcher.url)).await
                && scrape.value("flotilla_dispatcher_leader", &[]) == Some(1.0)
            {
                leaders.push(i);
            }
        }
        leaders
    }

    /// Every process's log tail, and the NATS servers'.
    fn logs(&self) -> String {
        let mut out = String::new();
        let mut push = |name: &str, log: String| {
            let tail: String = log
                .chars()
                .rev()
                .take(5000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            out.push_str(&format!("----- {name} -----\n{tail}\n"));
        };
        for service in self.gateways.iter().chain(&self.dispatchers) {
            push(service.process.name(), service.process.log());
        }
        for (n, node) in self.nodes.iter().enumerate() {
            push(&format!("agent-node {n} ({})", node.id), self.node_log(n));
        }
        out.push_str(&self.nats.logs());
        out
    }

    /// Job containers (not warm ones) still on any host's engine.
    fn job_containers(&self) -> Vec<String> {
        self.hosts
            .iter()
            .filter(|host| host.docker_host().is_some())
            .flat_map(|host| {
                host.job_containers()
                    .unwrap_or_else(|e| vec![format!("host {}: {e}", host.index())])
                    .into_iter()
                    .map(move |c| format!("host {}: {c}", host.index()))
            })
            .collect()
    }

    /// Stops the nodes cleanly (they remove their containers), checks that no container is
    /// left on any engine, then removes everything and checks that nothing of the hosts is
    /// left on the machine.
    async fn finish(mut self) {
        wait_until(
            Duration::from_secs(30),
            "the job containers to be removed",
            || async { self.job_containers().is_empty().then_some(()) },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", self.job_containers(), self.logs()));
        for node in &mut self.nodes {
            if let Some(mut process) = node.process.take() {
                process.terminate_and_wait(Duration::from_secs(30));
            }
        }
        for host in self.hosts.iter() {
            if host.docker_host().is_some() {
                let left = host.containers().unwrap();
                assert!(
                    left.is_empty(),
                    "host {}: containers left after the nodes stopped: {left:?}",
                    host.index()
                );
            }
        }
        let tag = self.hosts.tag().to_owned();
        drop(self);
        let left = Hosts::leftovers(&tag);
        assert!(left.is_empty(), "left on the machine: {left:?}");
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        // A failed test keeps its services' logs.
        if std::thread::panicking()
            && let Ok(empty) = tempfile::tempdir()
        {
            let dir = std::mem::replace(&mut self.dir, empty);
            eprintln!("the services' logs are kept in {}", dir.keep().display());
        }
    }
}

/// How many of a record's attempts completed.
fn completions(record: &Value) -> usize {
    record["attempts"].as_array().map_or(0, |a| {
        a.iter().filter(|a| a["outcome"] == "completed").count()
    })
}

/// How many records have more attempts than one (claims whose container may not have run:
/// the log tells, see [`runs_by_job`]).
fn reclaimed(records: &[Value]) -> usize {
    records
        .iter()
        .filter(|r| r["attempts"].as_array().map_or(0, Vec::len) > 1)
        .count()
}

fn shell(script: &str) -> Value {
    json!({ "agent_id": "hosts", "engine": "shell", "prompt": script })
}

fn timestamp(value: &Value) -> Option<DateTime<Utc>> {
    value.as_str()?.parse().ok()
}

/// For every job in FLOTILLA_LOGS: the attempts whose container printed `marker` on stdout,
/// i.e. the attempts that really ran the job's script. Read again (for up to 30 s) while one of
/// `expected` has none: right after a leader change or a heal, the stream's info may come from
/// a server that has not caught up, and the read would stop short of the last chunks.
async fn runs_by_job<'a>(
    nats: &NatsCluster,
    marker: &str,
    expected: impl IntoIterator<Item = &'a String> + Clone,
) -> BTreeMap<String, BTreeSet<u32>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let runs = read_runs(nats, marker).await;
        let complete = expected.clone().into_iter().all(|id| runs.contains_key(id));
        if complete || Instant::now() > deadline {
            return runs;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn read_runs(nats: &NatsCluster, marker: &str) -> BTreeMap<String, BTreeSet<u32>> {
    let js = jetstream::new(nats.client().await.unwrap());
    let stream = js.get_stream(names::STREAM_LOGS).await.unwrap();
    let last = stream.cached_info().state.last_sequence;
    let mut runs: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    if last == 0 {
        return runs;
    }
    // Right after a partition heals, the stream's leader may still be settling.
    let mut messages = wait_until(
        Duration::from_secs(30),
        "a consumer on the logs",
        || async {
            stream
                .create_consumer(consumer::pull::OrderedConfig {
                    deliver_policy: consumer::DeliverPolicy::All,
                    ..Default::default()
                })
                .await
                .ok()?
                .messages()
                .await
                .ok()
        },
    )
    .await
    .unwrap();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .expect("log chunks within 30 s")
            .expect("log stream open")
            .expect("log message");
        let chunk: LogChunk =
            flotilla_proto::decode(&message.payload, Encoding::MessagePack).unwrap();
        if chunk.stream == LogStream::Stdout
            && String::from_utf8_lossy(&chunk.data).contains(marker)
        {
            runs.entry(chunk.job_id).or_default().insert(chunk.attempt);
        }
        if message.info().unwrap().stream_sequence >= last {
            return runs;
        }
    }
}

/// Whether a process on `host` can open a TCP connection to `addr:port` within 2 s.
fn reaches(host: &flotilla_testkit::Host, addr: &str, port: u16) -> bool {
    host.command("timeout")
        .args([
            "2",
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/{addr}/{port}"),
        ])
        .status()
        .is_ok_and(|status| status.success())
}

/// A host with its own engine runs a container; processes in it see only its address; it
/// reaches the root namespace and the root reaches it; a partition cuts it off and healing
/// restores it; nothing is left once it is dropped.
#[tokio::test]
async fn a_host_has_its_own_address_engine_and_network() {
    let started = Instant::now();
    let mut hosts = Hosts::start(1).await.unwrap();
    println!("one host with its engine ready in {:?}", started.elapsed());
    let host = &hosts[0];
    let image = std::env::var("FLOTILLA_WORKER_IMAGE")
        .unwrap_or_else(|_| "flotilla-worker:latest".to_owned());
    let ran = Instant::now();
    let output = host
        .docker([
            "run",
            "--rm",
            "--network",
            "none",
            &image,
            "echo",
            "hello from host 0",
        ])
        .unwrap();
    assert_eq!(output.trim(), "hello from host 0");
    println!(
        "a container on the host's engine ran in {:?}",
        ran.elapsed()
    );
    assert!(host.containers().unwrap().is_empty());
    // The machine's own engine does not know the host's containers or engine.
    let info = host
        .docker(["info", "--format", "{{.DockerRootDir}}"])
        .unwrap();
    assert!(info.contains("flotilla-test-hosts"), "{info}");

    let addresses = String::from_utf8(
        host.command("ip")
            .args(["-o", "-4", "addr", "show"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        addresses.contains(&format!("{}/24", host.addr())),
        "{addresses}"
    );
    assert_eq!(
        addresses.lines().count(),
        2,
        "only lo and eth0: {addresses}"
    );

    // Host -> root: a listener on the bridge address accepts a connection from the host.
    let listener = std::net::TcpListener::bind((hosts.root_addr(), 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let root = hosts.root_addr().to_string();
    assert!(
        reaches(&hosts[0], &root, port),
        "the host cannot reach the root namespace"
    );
    hosts[0].partition().unwrap();
    assert!(
        !reaches(&hosts[0], &root, port),
        "the partition let a connection through"
    );
    hosts[0].heal().unwrap();
    assert!(
        reaches(&hosts[0], &root, port),
        "healing did not restore the network"
    );
    drop(listener);

    let tag = hosts.tag().to_owned();
    drop(hosts);
    let left = Hosts::leftovers(&tag);
    assert!(left.is_empty(), "left behind: {left:?}");
    println!("whole test {:?}", started.elapsed());
}

/// The cluster harness alone: three servers on loopback elect a meta leader; a killed one
/// is replaced as leader, and comes back on its store.
#[tokio::test]
async fn a_nats_cluster_elects_and_survives_a_killed_leader() {
    let started = Instant::now();
    let mut nats = NatsCluster::start().await.unwrap();
    let leader = nats
        .wait_for_meta_leader(Duration::from_secs(20))
        .await
        .unwrap();
    println!(
        "cluster up, meta leader {} in {:?}",
        nats.name(leader),
        started.elapsed()
    );
    let client = nats.client().await.unwrap();
    let js = jetstream::new(client);
    js.create_stream(jetstream::stream::Config {
        name: "PROBE".to_owned(),
        subjects: vec!["probe.>".to_owned()],
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    // An R3 stream takes a moment to elect its own leader after it is created; a publish
    // before that finds no stream ("stream not found").
    let stream_leader = nats
        .wait_for_stream_leader("PROBE", Duration::from_secs(10))
        .await
        .unwrap();
    js.publish("probe.1", "one".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let killed = Instant::now();
    nats.kill(stream_leader);
    let next = nats
        .wait_for_stream_leader("PROBE", Duration::from_secs(30))
        .await
        .unwrap();
    assert_ne!(next, stream_leader);
    println!(
        "stream leader {} killed, {} leads after {:?}",
        nats.name(stream_leader),
        nats.name(next),
        killed.elapsed()
    );
    js.publish("probe.2", "two".into())
        .await
        .unwrap()
        .await
        .unwrap();
    nats.restart(stream_leader).await.unwrap();
    wait_until(
        Duration::from_secs(20),
        "the restarted replica to catch up",
        || async {
            let counts = nats.stream_messages("PROBE").await;
            (counts.len() == 3 && counts.iter().all(|(_, n)| *n == 2)).then_some(())
        },
    )
    .await
    .unwrap();
    println!(
        "restarted and caught up; whole test {:?}",
        started.elapsed()
    );
}

/// a. Three hosts, each with one agent-node on its own engine and one nats-server of the
/// cluster. 100 jobs; while they run, the server leading FLOTILLA_JOBS is SIGKILLed. Every job
/// completes, and its script ran exactly once (one attempt in its record, and only that
/// attempt's output in its log).
#[tokio::test]
async fn killing_the_job_stream_leader_loses_and_repeats_nothing() {
    let started = Instant::now();
    let hosts = Hosts::start(3).await.unwrap();
    let nats = NatsCluster::builder()
        .on_host(0, &hosts[0])
        .on_host(1, &hosts[1])
        .on_host(2, &hosts[2])
        .start()
        .await
        .unwrap();
    let mut d = Deployment::new(hosts, nats, &[("FLOTILLA_ACK_WAIT_SECS", "10")]);
    d.start_services(&[None], &[None], &[0, 1, 2]).await;
    println!(
        "3 hosts, 3 nats-servers, 3 nodes ready in {:?}",
        started.elapsed()
    );

    let mut jobs = Vec::new();
    let submitting = Instant::now();
    for i in 0..100 {
        // The first one runs until well after the last is submitted: the kill comes while it
        // runs (a 1 s job could end before 100 submissions do).
        let pause = if i == 0 { 8 } else { 1 };
        jobs.push(
            d.submit(
                0,
                &shell(&format!("echo start; sleep {pause}; echo job {i}")),
            )
            .await,
        );
    }
    println!("100 jobs submitted in {:?}", submitting.elapsed());
    d.running(0, &jobs[0], 1).await;

    let leader = d
        .nats
        .wait_for_stream_leader(names::STREAM_JOBS, Duration::from_secs(10))
        .await
        .unwrap();
    let replicas = d.nats.stream_messages(names::STREAM_JOBS).await;
    assert_eq!(
        replicas.len(),
        3,
        "FLOTILLA_JOBS should have 3 replicas: {replicas:?}"
    );
    let kill_time = Utc::now();
    let killed = Instant::now();
    d.nats.kill(leader);
    println!(
        "SIGKILLed {} (FLOTILLA_JOBS leader) with {:?} messages per replica",
        d.nats.name(leader),
        replicas
    );
    let next = d
        .nats
        .wait_for_stream_leader(names::STREAM_JOBS, Duration::from_secs(30))
        .await
        .unwrap();
    println!(
        "{} leads FLOTILLA_JOBS {:?} after the kill",
        d.nats.name(next),
        killed.elapsed()
    );

    let records = d.wait_all(0, &jobs, Duration::from_secs(240)).await;
    let all_done = started.elapsed();
    let mut next_start: Option<DateTime<Utc>> = None;
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record["status"], "completed", "{record}\n{}", d.logs());
        assert_eq!(
            record["result"]["text"],
            format!("start\njob {i}\n"),
            "{record}"
        );
        let attempts = record["attempts"].as_array().unwrap();
        assert_eq!(completions(record), 1, "{record}");
        *per_node
            .entry(record["node_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
        for attempt in attempts {
            let at = timestamp(&attempt["started_at"]).unwrap();
            if at > kill_time && next_start.is_none_or(|n| at < n) {
                next_start = Some(at);
            }
        }
    }
    let runs = runs_by_job(&d.nats, "start", &jobs).await;
    for job_id in &jobs {
        let ran = runs.get(job_id).cloned().unwrap_or_default();
        assert_eq!(
            ran,
            BTreeSet::from([1]),
            "job {job_id} ran in attempts {ran:?}"
        );
    }
    let gap = next_start
        .map(|n| (n - kill_time).to_std().unwrap_or_default())
        .expect("some job started after the kill");
    println!("kill -> next job start: {gap:?}");
    println!("jobs per node: {per_node:?}");
    println!(
        "jobs claimed more than once (the log shows one run each): {}",
        reclaimed(&records)
    );
    println!("all 100 completed exactly once, {all_done:?} after the start");

    let restarted = Instant::now();
    d.nats.restart(leader).await.unwrap();
    println!(
        "{} restarted and healthy in {:?}",
        d.nats.name(leader),
        restarted.elapsed()
    );
    d.finish().await;
    println!("whole test {:?}", started.elapsed());
}

/// The lines of `log` that contain every one of `words` (the logs have ANSI colours between a
/// field's name and its value, so fields are matched by value).
fn lines_with<'a>(log: &'a str, words: &[&str]) -> Vec<&'a str> {
    log.lines()
        .filter(|line| words.iter().all(|w| line.contains(w)))
        .collect()
}

/// c. One host (its node and its nats-server) is cut off for longer than a lease. Its jobs
/// run again elsewhere; its own copies finish during the partition and their outcomes wait in
/// its outbox; once healed, those late outcomes are refused (each job keeps the other node's
/// result) and dropped from the outbox with a log line; the node rejoins and takes work again.
#[tokio::test]
async fn a_partitioned_host_s_jobs_move_and_its_late_results_are_refused() {
    const ACK_WAIT_SECS: u64 = 4;
    let started = Instant::now();
    let hosts = Hosts::start(3).await.unwrap();
    let nats = NatsCluster::builder()
        .on_host(0, &hosts[0])
        .on_host(1, &hosts[1])
        .on_host(2, &hosts[2])
        .start()
        .await
        .unwrap();
    let ack_wait = ACK_WAIT_SECS.to_string();
    // More deliveries than the default 5: while the cut-off server's streams and consumers
    // elect new leaders, claims fail (KV reads answer "no responders") and each failed claim
    // uses a delivery; with 5, jobs are dead-lettered in that window (see the report).
    let mut d = Deployment::new(
        hosts,
        nats,
        &[
            ("FLOTILLA_ACK_WAIT_SECS", &ack_wait),
            ("FLOTILLA_MAX_DELIVER", "20"),
        ],
    );
    // Host 0 (node 0 and n1) is cut off. Node 0 talks to the server on its own host; every
    // other service to the other two, so that none of them hangs on the cut-off server
    // (`a_service_on_a_cut_off_server_fails_over` is about that).
    let victim = 0;
    d.nats_urls = d.nats.urls_of(&[1, 2]);
    d.start_services(&[None], &[None], &[]).await;
    d.nats_urls = d.nats.url(0);
    d.spawn_node(0);
    d.nats_urls = d.nats.urls_of(&[1, 2]);
    d.spawn_node(1);
    d.spawn_node(2);
    d.wait_ready(0, 3).await;
    let victim_id = d.nodes[victim].id.clone();
    println!(
        "ready in {:?}; cutting off host {victim} (node {victim_id}, nats-server {})",
        started.elapsed(),
        d.nats.name(victim)
    );

    let mut jobs = Vec::new();
    for i in 0..12 {
        jobs.push(
            d.submit(0, &shell(&format!("echo start; sleep 3; echo job {i}")))
                .await,
        );
    }
    let moved: Vec<String> = d
        .wait_for(
            "jobs running on the victim's node",
            Duration::from_secs(30),
            async |d| {
                let mut on_victim = Vec::new();
                for job_id in &jobs {
                    let record = d.job(0, job_id).await?;
                    if record["status"] == "running" && record["node_id"] == victim_id.as_str() {
                        on_victim.push(job_id.clone());
                    }
                }
                (!on_victim.is_empty()).then_some(on_victim)
            },
        )
        .await;
    d.hosts[victim].partition().unwrap();
    let cut = Instant::now();
    println!("host {victim} cut off while it runs {} jobs", moved.len());

    // Another node runs each of them again.
    let again = d.wait_for(
        "the victim's jobs to run elsewhere",
        Duration::from_secs(30),
        async |d| {
            for job_id in &moved {
                let record = d.job(0, job_id).await?;
                if record["attempt"].as_u64()? < 2 || record["node_id"] == victim_id.as_str() {
                    return None;
                }
            }
            Some(())
        },
    );
    again.await;
    println!(
        "cut off -> all its jobs claimed again elsewhere: {:?}",
        cut.elapsed()
    );
    let records = d.wait_all(0, &moved, Duration::from_secs(60)).await;
    for record in &records {
        assert_eq!(record["status"], "completed", "{record}");
        assert_ne!(record["node_id"], victim_id.as_str(), "{record}");
        let first = &record["attempts"][0];
        assert_eq!(first["node_id"], victim_id.as_str(), "{record}");
        assert!(
            first["outcome"] == "node lost" || first["outcome"] == "lease expired",
            "{record}"
        );
    }
    println!(
        "cut off -> all its jobs completed elsewhere: {:?}",
        cut.elapsed()
    );
    // Its own copies finished meanwhile: their outcomes wait in its outbox.
    let victim_n = victim;
    d.wait_for(
        "the victim's outcomes to wait in its outbox",
        Duration::from_secs(30),
        async |d| {
            let log = d.node_log(victim_n);
            (lines_with(&log, &["outcome kept in the outbox"]).len() >= moved.len()).then_some(())
        },
    )
    .await;
    // Longer than a lease (the ack wait) and the heartbeat's time to live, twice over.
    tokio::time::sleep_until((cut + Duration::from_secs(2 * ACK_WAIT_SECS)).into()).await;
    d.hosts[victim].heal().unwrap();
    let healed = Instant::now();
    println!("healed after {:?}", cut.elapsed());

    // The relay finds every late outcome fenced off and drops it, saying so.
    d.wait_for(
        "the late outcomes to be refused",
        Duration::from_secs(60),
        async |d| {
            let log = d.node_log(victim_n);
            moved
                .iter()
                .all(|job_id| {
                    !lines_with(&log, &["outbox outcome rejected: late result", job_id]).is_empty()
                })
                .then_some(())
        },
    )
    .await;
    println!("healed -> late outcomes refused: {:?}", healed.elapsed());
    // Each job keeps the other node's result. Reads may lag for a moment after the heal:
    // a KV get is a direct get, which any replica answers, the healed one too while it
    // catches up (reported; see `stale` below).
    let lagging = std::cell::Cell::new(0u32);
    let mut stale = 0;
    for (job_id, before) in moved.iter().zip(&records) {
        let record = d
            .wait_for(
                "the record to read as the other node's result",
                Duration::from_secs(30),
                async |d| {
                    let record = d.job(0, job_id).await?;
                    if record["attempt"] == before["attempt"] {
                        Some(record)
                    } else {
                        lagging.set(lagging.get() + 1);
                        None
                    }
                },
            )
            .await;
        assert_eq!(record["status"], "completed", "{record}");
        assert_eq!(record["node_id"], before["node_id"], "{record}");
        assert_eq!(record["result"], before["result"], "{record}");
        for _ in 0..20 {
            let read = d.job(0, job_id).await.unwrap();
            if read["attempt"] != before["attempt"] {
                stale += 1;
            }
        }
    }
    println!(
        "stale reads of the moved jobs after the heal: {} before they first read right, \
         {stale} of {} after",
        lagging.get(),
        20 * moved.len()
    );
    let runs = runs_by_job(&d.nats, "start", &moved).await;
    let ran: Vec<_> = moved
        .iter()
        .map(|id| runs.get(id).cloned().unwrap_or_default())
        .collect();
    println!("attempts whose output reached the log, per moved job: {ran:?}");

    // The node rejoins and takes work again.
    d.wait_for(
        "the healed node to be live",
        Duration::from_secs(60),
        async |d| {
            let nodes = d.live_nodes(0).await?;
            nodes
                .iter()
                .any(|n| n["node_id"] == victim_id.as_str())
                .then_some(())
        },
    )
    .await;
    println!("healed -> node live again: {:?}", healed.elapsed());
    let mut later = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let took = loop {
        let mut batch = Vec::new();
        for i in 0..6 {
            let body = shell(&format!("echo start; sleep 1; echo later {i}"));
            let key = format!("later-{}-{i}", later.len());
            let (id, _) = d
                .submit_retrying(0, &body, &key, Duration::from_secs(30))
                .await
                .unwrap_or_else(|| panic!("not accepted after the heal\n{}", d.logs()));
            batch.push(id);
        }
        let records = d.wait_all(0, &batch, Duration::from_secs(60)).await;
        later.extend(batch);
        if records.iter().any(|r| r["node_id"] == victim_id.as_str()) {
            break healed.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the healed node takes no work\n{}",
            d.logs()
        );
    };
    println!("healed -> a new job completed on the healed node: {took:?}");
    let records = d.wait_all(0, &later, Duration::from_secs(60)).await;
    assert!(records.iter().all(|r| r["status"] == "completed"));
    let all = d.wait_all(0, &jobs, Duration::from_secs(60)).await;
    assert!(all.iter().all(|r| r["status"] == "completed"), "{all:?}");
    d.finish().await;
    println!("whole test {:?}", started.elapsed());
}

/// d. One nats-server alone is cut off (its host runs nothing else): the fleet carries on
/// through the other two. Jobs submitted during the partition complete, each once; once
/// healed, the server catches up and the fleet still works.
#[tokio::test]
async fn a_partitioned_nats_server_does_not_stop_the_fleet() {
    let started = Instant::now();
    let mut hosts = Hosts::new().unwrap();
    for _ in 0..3 {
        hosts.add(false).await.unwrap(); // a nats-server each
    }
    for _ in 0..2 {
        hosts.add(true).await.unwrap(); // a node each
    }
    let nats = NatsCluster::builder()
        .on_host(0, &hosts[0])
        .on_host(1, &hosts[1])
        .on_host(2, &hosts[2])
        .start()
        .await
        .unwrap();
    let mut d = Deployment::new(hosts, nats, &[("FLOTILLA_ACK_WAIT_SECS", "10")]);
    d.nats_urls = d.nats.urls_of(&[1, 2]);
    d.start_services(&[None], &[None], &[3, 4]).await;
    let mut warm = Vec::new();
    for i in 0..4 {
        warm.push(
            d.submit(0, &shell(&format!("echo start; echo before {i}")))
                .await,
        );
    }
    d.wait_all(0, &warm, Duration::from_secs(60)).await;
    println!("ready and 4 jobs done in {:?}", started.elapsed());

    // n1 (host 0) is cut off while it leads FLOTILLA_JOBS. The services are given the other
    // two servers' URLs, so that none is connected to n1: a client of the cut-off server
    // hangs until it notices, which is `a_service_on_a_cut_off_server_fails_over`'s subject.
    let victim = 0;
    d.nats
        .move_stream_leader(names::STREAM_JOBS, victim)
        .await
        .unwrap();
    let clients = d.nats.client_names(victim).await.unwrap_or_default();
    assert!(
        !clients
            .iter()
            .any(|c| c.starts_with("agent-node") || c == "api-gateway" || c == "dispatcher"),
        "{clients:?}"
    );
    println!(
        "cutting off {} (host {victim}), leader of FLOTILLA_JOBS",
        d.nats.name(victim)
    );
    d.hosts[victim].partition().unwrap();
    let cut = Instant::now();

    let mut during = Vec::new();
    let mut slowest = Duration::ZERO;
    let mut retried = 0;
    for i in 0..10 {
        let asked = Instant::now();
        let (id, tries) = d
            .submit_retrying(
                0,
                &shell(&format!("echo start; sleep 1; echo during {i}")),
                &format!("during-{i}"),
                Duration::from_secs(120),
            )
            .await
            .unwrap_or_else(|| panic!("job {i} not accepted within 120 s\n{}", d.logs()));
        slowest = slowest.max(asked.elapsed());
        retried += tries - 1;
        during.push(id);
    }
    println!(
        "10 jobs submitted during the partition in {:?} (slowest {slowest:?}, {retried} retries)",
        cut.elapsed()
    );
    let records = d.wait_all(0, &during, Duration::from_secs(120)).await;
    for record in &records {
        assert_eq!(record["status"], "completed", "{record}\n{}", d.logs());
        assert_eq!(completions(record), 1, "{record}\n{}", d.logs());
    }
    println!(
        "cut off -> the 10 jobs completed: {:?} ({} claimed more than once)",
        cut.elapsed(),
        reclaimed(&records)
    );
    let leader = d
        .nats
        .wait_for_stream_leader(names::STREAM_JOBS, Duration::from_secs(30))
        .await
        .unwrap();
    println!("FLOTILLA_JOBS now led by {}", d.nats.name(leader));

    d.hosts[victim].heal().unwrap();
    let healed = Instant::now();
    let monitor = format!("{}/healthz", d.nats.monitor_url(victim));
    d.wait_for(
        "the healed server to be current",
        Duration::from_secs(60),
        async |d| {
            let response = d.http.get(&monitor).send().await.ok()?;
            response.status().is_success().then_some(())
        },
    )
    .await;
    println!(
        "healed -> {} healthy again: {:?}",
        d.nats.name(victim),
        healed.elapsed()
    );
    // Right after the heal the cluster may still be settling: a client retries a 503.
    let mut after = Vec::new();
    for i in 0..4 {
        let body = shell(&format!("echo start; echo after {i}"));
        let (id, _) = d
            .submit_retrying(0, &body, &format!("after-{i}"), Duration::from_secs(60))
            .await
            .unwrap_or_else(|| panic!("job after {i} not accepted within 60 s\n{}", d.logs()));
        after.push(id);
    }
    let records = d.wait_all(0, &after, Duration::from_secs(60)).await;
    assert!(
        records.iter().all(|r| r["status"] == "completed"),
        "{records:?}"
    );
    let runs = runs_by_job(&d.nats, "start", warm.iter().chain(&during).chain(&after)).await;
    for job_id in warm.iter().chain(&during).chain(&after) {
        let ran = runs.get(job_id).cloned().unwrap_or_default();
        assert_eq!(
            ran,
            BTreeSet::from([1]),
            "job {job_id} ran in attempts {ran:?}"
        );
    }
    d.finish().await;
    println!("whole test {:?}", started.elapsed());
}

/// d'. The nats-server a service is connected to is cut off: the service must notice and
/// move to another server of the cluster. Here the gateway's server; jobs submitted through
/// the gateway (retried on 503, as a client would) must be accepted within 30 s and complete.
#[tokio::test]
async fn a_service_on_a_cut_off_server_fails_over() {
    let started = Instant::now();
    let mut hosts = Hosts::new().unwrap();
    for _ in 0..3 {
        hosts.add(false).await.unwrap();
    }
    hosts.add(true).await.unwrap();
    let nats = NatsCluster::builder()
        .on_host(0, &hosts[0])
        .on_host(1, &hosts[1])
        .on_host(2, &hosts[2])
        .start()
        .await
        .unwrap();
    let mut d = Deployment::new(hosts, nats, &[("FLOTILLA_ACK_WAIT_SECS", "10")]);
    let gw = d.spawn_gateway(None);
    let url = format!("{}/health", d.gateways[gw].url);
    d.wait_healthy("the gateway to be healthy", &url).await;
    let mut victim = None;
    for i in 0..d.nats.len() {
        if d.nats
            .client_names(i)
            .await
            .unwrap_or_default()
            .iter()
            .any(|c| c == "api-gateway")
        {
            victim = Some(i);
        }
    }
    let victim = victim.expect("the gateway's server");
    let others: Vec<usize> = (0..d.nats.len()).filter(|i| *i != victim).collect();
    d.nats_urls = d.nats.urls_of(&others);
    let n = d.spawn_dispatcher(None);
    let url = format!("{}/health", d.dispatchers[n].url);
    d.wait_healthy("the dispatcher to be healthy", &url).await;
    d.spawn_node(3);
    d.wait_ready(gw, 1).await;
    println!(
        "ready in {:?}; cutting off {}, the gateway's server",
        started.elapsed(),
        d.nats.name(victim)
    );
    d.hosts[victim].partition().unwrap();
    let cut = Instant::now();

    let submitted = d
        .submit_retrying(
            gw,
            &shell("echo start; echo first"),
            "failover-0",
            Duration::from_secs(30),
        )
        .await;
    let health = d
        .http
        .get(format!("{}/health", d.gateways[gw].url))
        .send()
        .await
        .map(|r| r.status().as_u16());
    println!(
        "cut off -> first job accepted: {submitted:?} after {:?}; gateway /health: {health:?}",
        cut.elapsed()
    );
    let Some((first, _)) = submitted else {
        panic!(
            "the gateway did not move off its cut-off server within 30 s (its /health: \
             {health:?}): a client notices a dead server only by its pings (async-nats: every \
             60 s, disconnects after 2 unanswered), and flotilla-nats does not set \
             ConnectOptions::ping_interval"
        );
    };
    let mut jobs = vec![first];
    for i in 1..5 {
        let (id, _) = d
            .submit_retrying(
                gw,
                &shell(&format!("echo start; echo job {i}")),
                &format!("failover-{i}"),
                Duration::from_secs(30),
            )
            .await
            .expect("accepted once the gateway has moved");
        jobs.push(id);
    }
    let records = d.wait_all(gw, &jobs, Duration::from_secs(60)).await;
    assert!(
        records.iter().all(|r| r["status"] == "completed"),
        "{records:?}"
    );
    println!("cut off -> 5 jobs completed: {:?}", cut.elapsed());
    d.hosts[victim].heal().unwrap();
    d.finish().await;
    println!("whole test {:?}", started.elapsed());
}

/// e. A host joins a running fleet (a new namespace, a new engine, a new node) while jobs
/// wait: it takes work soon after its first heartbeat. Then one node is drained with SIGTERM
/// while it runs jobs: it finishes them, takes no more, and no job is lost or run twice.
#[tokio::test]
async fn a_host_joins_a_running_fleet_and_a_drained_node_loses_nothing() {
    let started = Instant::now();
    let hosts = Hosts::start(2).await.unwrap();
    // The servers run in the root namespace, on the bridge's address: every host, the one
    // added later too, reaches them there.
    let root = std::net::IpAddr::V4(hosts.root_addr());
    let nats = NatsCluster::builder()
        .on_addr(0, root)
        .on_addr(1, root)
        .on_addr(2, root)
        .start()
        .await
        .unwrap();
    let mut d = Deployment::new(hosts, nats, &[("FLOTILLA_ACK_WAIT_SECS", "10")]);
    d.slots = 2;
    d.start_services(&[None], &[None], &[0, 1]).await;
    println!("2 hosts ready in {:?}", started.elapsed());

    let mut jobs = Vec::new();
    for i in 0..30 {
        jobs.push(
            d.submit(0, &shell(&format!("echo start; sleep 2; echo job {i}")))
                .await,
        );
    }
    d.running(0, &jobs[0], 1).await;

    let joining = Instant::now();
    let host = d.hosts.add(true).await.unwrap();
    println!(
        "host {host} (namespace, engine, image) added in {:?}",
        joining.elapsed()
    );
    let js = jetstream::new(d.nats.client().await.unwrap());
    let nodes_kv = js.get_key_value(names::BUCKET_NODES).await.unwrap();
    let node_id = format!("test-{}-n2", d.hosts.tag());
    let mut watch = nodes_kv.watch(names::node_key(&node_id)).await.unwrap();
    let n = d.spawn_node(host);
    assert_eq!(d.nodes[n].id, node_id);
    let first_heartbeat = tokio::time::timeout(Duration::from_secs(60), watch.next())
        .await
        .expect("a heartbeat from the new node within 60 s")
        .unwrap()
        .unwrap();
    let heartbeat_at: DateTime<Utc> =
        DateTime::from_timestamp_nanos(first_heartbeat.created.unix_timestamp_nanos() as i64);
    println!("node started -> first heartbeat: {:?}", joining.elapsed());
    let first_start = d
        .wait_for(
            "the new node to take a job",
            Duration::from_secs(30),
            async |d| {
                let mut first: Option<DateTime<Utc>> = None;
                for job_id in &jobs {
                    let record = d.job(0, job_id).await?;
                    for attempt in record["attempts"].as_array()? {
                        if attempt["node_id"] == node_id.as_str() {
                            let at = timestamp(&attempt["started_at"])?;
                            first = Some(first.map_or(at, |f| f.min(at)));
                        }
                    }
                }
                first
            },
        )
        .await;
    let took = (first_start - heartbeat_at).to_std().unwrap_or_default();
    println!("first heartbeat -> first job started on the new node: {took:?}");

    // Drain node 0 while it runs jobs.
    let victim = d
        .wait_for("node 0 to run jobs", Duration::from_secs(30), async |d| {
            for job_id in &jobs {
                let record = d.job(0, job_id).await?;
                if record["status"] == "running" && record["node_id"] == d.nodes[0].id.as_str() {
                    return Some(0);
                }
            }
            None
        })
        .await;
    let drain_time = Utc::now();
    let draining = Instant::now();
    d.nodes[victim].process.as_ref().unwrap().signal("TERM");
    let exit = loop {
        if let Some(code) = d.nodes[victim].process.as_mut().unwrap().try_exit_code() {
            break code;
        }
        assert!(
            draining.elapsed() < Duration::from_secs(30),
            "the drain takes over 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    d.nodes[victim].process = None;
    println!(
        "SIGTERM -> drained node exited ({exit:?}) in {:?}",
        draining.elapsed()
    );
    assert_eq!(exit, Some(0), "{}", d.node_log(victim));

    let records = d.wait_all(0, &jobs, Duration::from_secs(120)).await;
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record["status"], "completed", "{record}\n{}", d.logs());
        assert_eq!(
            record["result"]["text"],
            format!("start\njob {i}\n"),
            "{record}"
        );
        assert_eq!(completions(record), 1, "{record}");
        *per_node
            .entry(record["node_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
        for attempt in record["attempts"].as_array().unwrap() {
            if attempt["node_id"] == d.nodes[victim].id.as_str() {
                let at = timestamp(&attempt["started_at"]).unwrap();
                assert!(at < drain_time, "the draining node started a job: {record}");
            }
        }
    }
    let runs = runs_by_job(&d.nats, "start", &jobs).await;
    for job_id in &jobs {
        let ran = runs.get(job_id).cloned().unwrap_or_default();
        assert_eq!(ran.len(), 1, "job {job_id} ran in attempts {ran:?}");
    }
    println!("jobs per node: {per_node:?}");
    println!(
        "all 30 completed once ({} claimed more than once), {:?} after the start",
        reclaimed(&records),
        started.elapsed()
    );
    assert!(per_node.contains_key(&node_id), "the new node ran nothing");
    // Its metrics, served on its host's address, count the same.
    let scrape = Scrape::get(&d.http, &d.nodes[n].metrics)
        .await
        .expect("the new node's /metrics");
    let started_there = scrape.value("flotilla_node_jobs_started_total", &[]);
    println!("the new node's flotilla_node_jobs_started_total: {started_there:?}");
    assert_eq!(started_there, Some(per_node[&node_id] as f64));
    d.finish().await;
    println!("whole test {:?}", started.elapsed());
}

/// f. Two api-gateways and two dispatchers on different hosts. A job submitted through one
/// gateway is waited on and cancelled through the other. The dispatcher leader is killed, and
/// at once a node holding a job: the other dispatcher takes the lease and requeues the job,
/// which runs elsewhere. A schedule ticking every second across the change runs once per slot.
#[tokio::test]
async fn gateways_and_dispatchers_on_different_hosts_share_the_work_and_the_lease() {
    let started = Instant::now();
    let hosts = Hosts::start(3).await.unwrap();
    let nats = NatsCluster::builder()
        .on_host(0, &hosts[0])
        .on_host(1, &hosts[1])
        .on_host(2, &hosts[2])
        .start()
        .await
        .unwrap();
    let mut d = Deployment::new(hosts, nats, &[("FLOTILLA_ACK_WAIT_SECS", "30")]);
    d.api_key("a-long-enough-key-for-the-hosts");
    d.start_services(&[Some(0), Some(1)], &[Some(0), Some(1)], &[0, 1, 2])
        .await;
    d.wait_ready(1, 3).await;
    println!(
        "2 gateways, 2 dispatchers, 3 nodes on 3 hosts ready in {:?}",
        started.elapsed()
    );

    // Submitted through gateway 0, waited on and cancelled through gateway 1.
    let job_id = d
        .submit(0, &shell("echo start; sleep 60; echo never"))
        .await;
    let waiter = {
        let http = d.http.clone();
        let url = format!("{}/jobs/{job_id}/wait?timeout=60", d.gateways[1].url);
        tokio::spawn(async move {
            let response = http.get(url).send().await.unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        })
    };
    d.running(1, &job_id, 1).await;
    let cancelling = Instant::now();
    let response = d
        .http
        .delete(format!("{}/jobs/{job_id}", d.gateways[1].url))
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{:?}",
        response.text().await
    );
    let (status, waited) = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("the wait on the other gateway returns")
        .unwrap();
    assert_eq!(status, 200, "{waited}");
    assert_eq!(waited["status"], "cancelled", "{waited}");
    println!(
        "cancel through gateway 1 -> its /wait returned: {:?}",
        cancelling.elapsed()
    );
    let record = d.job(0, &job_id).await.unwrap();
    assert_eq!(record["status"], "cancelled", "{record}");

    // A schedule every second, across the leader change.
    let response = d
        .http
        .post(format!("{}/schedules", d.gateways[0].url))
        .json(
            &json!({"name": "tick", "interval_seconds": 1, "job": shell("echo start; echo tick")}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let schedule: Value = response.json().await.unwrap();
    let schedule_id = schedule["schedule_id"].as_str().unwrap().to_owned();
    let runs_of = async |d: &Deployment| -> Option<Vec<Value>> {
        let list: Value = d
            .http
            .get(format!(
                "{}/jobs?metadata.schedule_id={schedule_id}&limit=200",
                d.gateways[1].url
            ))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        list["jobs"].as_array().cloned()
    };
    d.wait_for("three scheduled runs", Duration::from_secs(30), async |d| {
        (runs_of(d).await?.len() >= 3).then_some(())
    })
    .await;

    // The leader, and a node with a job, die together.
    let leaders = d.dispatcher_leaders().await;
    assert_eq!(leaders.len(), 1, "one leader: {leaders:?}");
    let old = leaders[0];
    let moving = d.submit(0, &shell("echo start; sleep 4; echo moved")).await;
    let record = d.running(0, &moving, 1).await;
    let holder = d.node_index(record["node_id"].as_str().unwrap()).unwrap();
    let kill_time = Utc::now();
    let killed = Instant::now();
    d.kill_dispatcher(old);
    d.kill_node(holder);
    println!(
        "killed dispatcher {old} (host {}, leader) and node {holder} (host {}) holding a job",
        old, d.nodes[holder].host
    );
    let new = d
        .wait_for(
            "the other dispatcher to lead",
            Duration::from_secs(30),
            async |d| {
                let leaders = d.dispatcher_leaders().await;
                (leaders.len() == 1 && leaders[0] != old).then(|| leaders[0])
            },
        )
        .await;
    println!(
        "dispatcher {new} leads {:?} after the kill",
        killed.elapsed()
    );
    let again = d
        .wait_for(
            "the lost node's job to run elsewhere",
            Duration::from_secs(30),
            async |d| {
                let record = d.job(0, &moving).await?;
                (record["attempt"] == 2 && record["status"] != "pending").then_some(record)
            },
        )
        .await;
    println!(
        "kill -> lost node's job claimed again: {:?}",
        killed.elapsed()
    );
    assert_ne!(again["node_id"], d.nodes[holder].id.as_str(), "{again}");
    let records = d
        .wait_all(1, std::slice::from_ref(&moving), Duration::from_secs(60))
        .await;
    assert_eq!(records[0]["status"], "completed", "{}", records[0]);
    assert_eq!(
        records[0]["attempts"][0]["outcome"], "node lost",
        "{}",
        records[0]
    );
    assert_eq!(records[0]["result"]["text"], "start\nmoved\n");
    // Started again, the killed node removes the container it left behind.
    d.restart_node(holder);

    // The schedule carried on: runs after the change, one job per slot, each run once.
    let seen = runs_of(&d).await.unwrap().len();
    d.wait_for(
        "scheduled runs after the change",
        Duration::from_secs(30),
        async |d| {
            let runs = runs_of(d).await?;
            let after = runs
                .iter()
                .filter(|r| timestamp(&r["created_at"]).is_some_and(|at| at > kill_time))
                .count();
            (runs.len() >= seen + 3 && after >= 3).then_some(())
        },
    )
    .await;
    let schedule: Value = d
        .http
        .get(format!("{}/schedules/{schedule_id}", d.gateways[0].url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let response = d
        .http
        .delete(format!("{}/schedules/{schedule_id}", d.gateways[1].url))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let runs = runs_of(&d).await.unwrap();
    let ids: Vec<String> = runs
        .iter()
        .map(|r| r["job_id"].as_str().unwrap().to_owned())
        .collect();
    let records = d.wait_all(1, &ids, Duration::from_secs(60)).await;
    let mut slots: Vec<i64> = ids
        .iter()
        .map(|id| {
            id.rsplit('-')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("{id}"))
        })
        .collect();
    slots.sort();
    let distinct: BTreeSet<i64> = slots.iter().copied().collect();
    assert_eq!(distinct.len(), slots.len(), "a slot ran twice: {slots:?}");
    let gaps: Vec<i64> = slots.windows(2).map(|w| w[1] - w[0]).collect();
    let from_kill: Vec<i64> = slots.iter().map(|s| s - kill_time.timestamp()).collect();
    println!(
        "scheduled slots: {} jobs; seconds from the kill: {from_kill:?}; gaps: {gaps:?}",
        slots.len()
    );
    let recorded = schedule["runs"].as_u64().unwrap() as usize;
    assert!(
        recorded == slots.len() || recorded + 1 == slots.len(),
        "the schedule counts {recorded} runs, {} jobs exist",
        slots.len()
    );
    for record in &records {
        assert_eq!(record["status"], "completed", "{record}");
        assert_eq!(completions(record), 1, "{record}");
    }
    let runs_by = runs_by_job(&d.nats, "start", &ids).await;
    for id in &ids {
        let ran = runs_by.get(id).cloned().unwrap_or_default();
        assert_eq!(ran.len(), 1, "scheduled job {id} ran in attempts {ran:?}");
    }
    d.finish().await;
    println!("whole test {:?}", started.elapsed());
}

/// Every service started at the same moment on a fresh cluster, as a deployment does (the
/// other tests start them one kind after the other): all of them create the topology at once,
/// with three replicas, and all must come up.
#[tokio::test]
async fn services_started_together_on_a_fresh_cluster_all_come_up() {
    let started = Instant::now();
    let hosts = Hosts::start(3).await.unwrap();
    let nats = NatsCluster::builder()
        .on_host(0, &hosts[0])
        .on_host(1, &hosts[1])
        .on_host(2, &hosts[2])
        .start()
        .await
        .unwrap();
    let mut d = Deployment::new(hosts, nats, &[]);
    d.spawn_gateway(None);
    d.spawn_dispatcher(None);
    for host in 0..3 {
        d.spawn_node(host);
    }
    d.wait_ready(0, 3).await;
    let url = format!("{}/health", d.dispatchers[0].url);
    d.wait_healthy("the dispatcher to be healthy", &url).await;
    println!("all five services up in {:?}", started.elapsed());
    let job = d.submit(0, &shell("echo start; echo together")).await;
    let records = d.wait_all(0, &[job], Duration::from_secs(30)).await;
    assert_eq!(records[0]["status"], "completed", "{}", records[0]);
    d.finish().await;
}

/// What a steady submitter saw during test b.
#[derive(Default)]
struct Load {
    /// Accepted jobs: over HTTP (202) and straight to NATS (publish acked).
    accepted: Vec<String>,
    http_202: u32,
    http_503: u32,
    /// Any other answer, a 503 without Retry-After, or no answer within 15 s.
    http_bad: Vec<String>,
    direct_acked: u32,
    direct_retried: u32,
}

/// One HTTP submission and one direct one every 100 ms until `stop`. A direct publish that
/// fails is retried with the same `Nats-Msg-Id` (JetStream drops the duplicate), as a
/// client would, until acked.
async fn steady_load(
    gateway: String,
    nats: async_nats::Client,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Load {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let js = jetstream::new(nats);
    let mut load = Load::default();
    let mut i = 0u32;
    while !*stop.borrow() {
        i += 1;
        let body = shell(&format!("echo rolling {i}"));
        match http
            .post(format!("{gateway}/jobs"))
            .json(&body)
            .send()
            .await
        {
            Ok(r) if r.status() == 202 => {
                load.http_202 += 1;
                let v: Value = r.json().await.unwrap();
                load.accepted.push(v["job_id"].as_str().unwrap().to_owned());
            }
            Ok(r) if r.status() == 503 && r.headers().contains_key("retry-after") => {
                load.http_503 += 1;
            }
            Ok(r) => load.http_bad.push(format!(
                "{} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            )),
            Err(e) => load.http_bad.push(format!("no answer: {e}")),
        }
        let job_id = format!("rolling-direct-{i}");
        let payload = json!({ "job_id": job_id, "agent_id": "hosts", "engine": "shell",
                              "prompt": format!("echo direct {i}") });
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(names::HEADER_CONTENT_TYPE, names::CONTENT_TYPE_JSON);
        headers.insert("Nats-Msg-Id", job_id.as_str());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let sent = js
                .publish_with_headers(
                    names::SUBJECT_SUBMIT,
                    headers.clone(),
                    payload.to_string().into(),
                )
                .await;
            let acked = match sent {
                Ok(ack) => tokio::time::timeout(Duration::from_secs(10), ack)
                    .await
                    .is_ok_and(|a| a.is_ok()),
                Err(_) => false,
            };
            if acked {
                load.direct_acked += 1;
                load.accepted.push(job_id.clone());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "direct submission {job_id} never acked"
            );
            load.direct_retried += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    load
}

/// b. The three nats-servers are restarted one at a time under a steady load of HTTP and
/// direct submissions. Every POST answers 202, or 503 with Retry-After: never a 500, never a
/// hang. Every accepted job completes, and none completes twice.
#[tokio::test]
async fn a_rolling_restart_of_the_nats_servers_loses_and_repeats_nothing() {
    let started = Instant::now();
    let hosts = Hosts::start(3).await.unwrap();
    let nats = NatsCluster::builder()
        .on_host(0, &hosts[0])
        .on_host(1, &hosts[1])
        .on_host(2, &hosts[2])
        .start()
        .await
        .unwrap();
    let mut d = Deployment::new(hosts, nats, &[("FLOTILLA_ACK_WAIT_SECS", "10")]);
    d.start_services(&[None], &[None], &[0, 1, 2]).await;
    println!(
        "3 hosts, 3 nats-servers, 3 nodes ready in {:?}",
        started.elapsed()
    );

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(steady_load(
        d.gateways[0].url.clone(),
        d.nats.client().await.unwrap(),
        stopped,
    ));
    let rolling = Instant::now();
    for i in 0..3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let restart = Instant::now();
        d.nats
            .restart(i)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", d.logs()));
        println!(
            "{} restarted and caught up in {:?}",
            d.nats.name(i),
            restart.elapsed()
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.send_replace(true);
    let load = load.await.unwrap();
    println!(
        "rolling restart took {:?}: HTTP 202 {}, 503 {}, other {}; direct acked {} (retried {})",
        rolling.elapsed(),
        load.http_202,
        load.http_503,
        load.http_bad.len(),
        load.direct_acked,
        load.direct_retried
    );
    assert!(
        load.http_bad.is_empty(),
        "answers other than 202 / 503 + Retry-After: {:?}",
        load.http_bad
    );
    assert!(load.http_202 > 0 && load.direct_acked > 0);

    let records = d
        .wait_all(0, &load.accepted, Duration::from_secs(180))
        .await;
    for record in &records {
        assert_eq!(record["status"], "completed", "{record}");
        let completed = record["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["outcome"] == "completed")
            .count();
        assert_eq!(completed, 1, "completed more than once: {record}");
    }
    println!("{} accepted jobs, each completed once", records.len());
    d.finish().await;
}
