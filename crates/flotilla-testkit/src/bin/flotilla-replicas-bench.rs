//! The cost of replication, run by hand (see docs/performance.md):
//!
//!     cargo build --workspace --bins --release && target/release/flotilla-replicas-bench
//!
//! Side by side in one run, on one nats-server with `FLOTILLA_REPLICAS=1` and on a
//! three-server cluster on loopback (deploy/nats/server.conf) with `FLOTILLA_REPLICAS=3`:
//! (a) JetStream publish round trips (publish and wait for the ack) into a work-queue stream,
//! (b) `POST /jobs` latency (a KV create and a queue publish, each acknowledged), and (c) jobs/s
//! for trivial jobs on one node with 4 slots and a warm pool of 4; and (d) lost-node failover
//! with the default settings (heartbeat 1 s, TTL 3 s, node check 500 ms): a second node is
//! started, the one running a long job is SIGKILLed, and the time until the job runs on the
//! other is taken.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, stream};
use flotilla_testkit::{
    NatsCluster, NatsServer, Process, binary, free_port, repo_root, wait_until,
};
use serde_json::{Value, json};

const PUBLISHES: usize = 500;
const JOBS: usize = 200;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    println!("flotilla-replicas-bench: {PUBLISHES} publishes, {JOBS} jobs per setup\n");
    let single = NatsServer::start().await?;
    let r1 = measure(&single.url(), 1).await?;
    drop(single);
    let cluster = NatsCluster::start().await?;
    cluster
        .wait_for_meta_leader(Duration::from_secs(30))
        .await?;
    let r3 = measure(&cluster.urls(), 3).await?;
    drop(cluster);

    for (label, a, b) in [
        ("(a) JetStream publish, acked", &r1.publish, &r3.publish),
        ("(b) POST /jobs", &r1.post, &r3.post),
    ] {
        println!(
            "{label:<32} R1 median {:>7.2} ms p99 {:>7.2} ms | R3 median {:>7.2} ms p99 {:>7.2} ms ({:.2}x)",
            median(a),
            p99(a),
            median(b),
            p99(b),
            median(b) / median(a)
        );
    }
    println!(
        "(c) jobs/s, 1 node x 4 slots      R1 {:.1} | R3 {:.1} ({:.2}x)",
        r1.jobs_per_sec,
        r3.jobs_per_sec,
        r3.jobs_per_sec / r1.jobs_per_sec
    );
    println!(
        "(d) SIGKILL → running elsewhere   R1 {:.2} s | R3 {:.2} s (default settings; goal 5 s)",
        r1.failover.as_secs_f64(),
        r3.failover.as_secs_f64()
    );
    Ok(())
}

struct Figures {
    publish: Vec<f64>,
    post: Vec<f64>,
    jobs_per_sec: f64,
    failover: Duration,
}

async fn measure(url: &str, replicas: usize) -> anyhow::Result<Figures> {
    let publish = publishes(url, replicas).await?;
    let mut stack = Stack::start(url, replicas).await?;
    let result = match jobs(&stack).await {
        Ok((post, rate)) => failover(&mut stack).await.map(|f| (post, rate, f)),
        Err(e) => Err(e),
    };
    if result.is_err() {
        for process in &stack.processes {
            eprintln!("--- {}\n{}", process.name(), process.log());
        }
    }
    stack.stop();
    let (post, jobs_per_sec, failover) = result?;
    Ok(Figures {
        publish,
        post,
        jobs_per_sec,
        failover,
    })
}

/// (a): acknowledged publishes, one after another, into a work queue of `replicas`.
async fn publishes(url: &str, replicas: usize) -> anyhow::Result<Vec<f64>> {
    let client = async_nats::connect(url.split(',').collect::<Vec<_>>()).await?;
    let js = jetstream::new(client);
    js.create_stream(stream::Config {
        name: "BENCH".into(),
        subjects: vec!["bench".into()],
        retention: stream::RetentionPolicy::WorkQueue,
        num_replicas: replicas,
        ..Default::default()
    })
    .await?;
    let mut samples = Vec::with_capacity(PUBLISHES);
    for i in 0..PUBLISHES {
        let started = Instant::now();
        js.publish("bench", format!("message {i}").into())
            .await?
            .await?;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    js.delete_stream("BENCH").await?;
    Ok(samples)
}

/// An api-gateway, a dispatcher and one agent-node on `url`.
struct Stack {
    processes: Vec<Process>,
    /// The second node's command, started by [`failover`].
    spare: Option<std::process::Command>,
    api: String,
    cluster: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Stack {
    async fn start(url: &str, replicas: usize) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let cluster = format!("bench-r{replicas}-{}", std::process::id());
        let command = |program: &str| -> anyhow::Result<std::process::Command> {
            let mut command = std::process::Command::new(binary(program)?);
            command
                .env("FLOTILLA_NATS_URL", url)
                .env("FLOTILLA_REPLICAS", replicas.to_string())
                .env("FLOTILLA_ENGINES_DIR", repo_root().join("engines"))
                .env("FLOTILLA_PROFILES_DIR", repo_root().join("profiles"))
                .env(
                    "RUST_LOG",
                    std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into()),
                );
            Ok(command)
        };
        let mut gateway = command("api-gateway")?;
        gateway.env("FLOTILLA_LISTEN", format!("127.0.0.1:{port}"));
        let mut dispatcher = command("dispatcher")?;
        dispatcher.env(
            "FLOTILLA_DISPATCHER_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        );
        let mut node = command("agent-node")?;
        node.env("FLOTILLA_NODE_ID", format!("{cluster}-node-0"))
            .env("FLOTILLA_CLUSTER", &cluster)
            .env("FLOTILLA_NODE_SLOTS", "4")
            .env("FLOTILLA_POOL_SIZE", "4")
            .env("FLOTILLA_STATE_DIR", dir.path().join("state"))
            .env(
                "FLOTILLA_NODE_METRICS_LISTEN",
                format!("127.0.0.1:{}", free_port()),
            );
        let mut spare = command("agent-node")?;
        spare
            .env("FLOTILLA_NODE_ID", format!("{cluster}-node-1"))
            .env("FLOTILLA_CLUSTER", &cluster)
            .env("FLOTILLA_STATE_DIR", dir.path().join("state-1"))
            .env(
                "FLOTILLA_NODE_METRICS_LISTEN",
                format!("127.0.0.1:{}", free_port()),
            );
        let mut processes = Vec::new();
        for (name, command) in [
            ("api-gateway", gateway),
            ("dispatcher", dispatcher),
            ("agent-node-0", node),
        ] {
            let log = dir.path().join(format!("{name}.log"));
            processes.push(Process::spawn_command(name, command, &log)?);
        }
        let stack = Self {
            processes,
            spare: Some(spare),
            api: format!("http://127.0.0.1:{port}"),
            cluster,
            http: reqwest::Client::new(),
            _dir: dir,
        };
        if let Err(e) = stack.wait_ready().await {
            for process in &stack.processes {
                eprintln!("--- {}\n{}", process.name(), process.log());
            }
            return Err(e);
        }
        Ok(stack)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        wait_until(Duration::from_secs(60), "the stack to be ready", || async {
            let nodes: Value = self
                .http
                .get(format!("{}/nodes", self.api))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let warm = nodes["nodes"].get(0)?["warm"]
                .as_object()?
                .values()
                .filter_map(Value::as_u64)
                .sum::<u64>();
            (warm >= 4).then_some(())
        })
        .await
    }

    fn stop(mut self) {
        for process in self.processes.iter_mut().rev() {
            process.terminate_and_wait(Duration::from_secs(30));
        }
        let _ = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "docker ps -aq --filter label=flotilla.cluster={} | xargs -r docker rm -f",
                self.cluster
            ))
            .status();
    }
}

/// (b) and (c): POSTs one after another (each timed), then every job waited for.
async fn jobs(stack: &Stack) -> anyhow::Result<(Vec<f64>, f64)> {
    let started = Instant::now();
    let mut post = Vec::with_capacity(JOBS);
    let mut ids = Vec::with_capacity(JOBS);
    for _ in 0..JOBS {
        let sent = Instant::now();
        let response: Value = stack
            .http
            .post(format!("{}/jobs", stack.api))
            .json(&json!({ "agent_id": "bench", "engine": "shell", "prompt": "true" }))
            .send()
            .await?
            .json()
            .await?;
        post.push(sent.elapsed().as_secs_f64() * 1000.0);
        ids.push(response["job_id"].as_str().context("job id")?.to_owned());
    }
    for id in ids {
        let job: Value = stack
            .http
            .get(format!("{}/jobs/{id}/wait?timeout=300", stack.api))
            .send()
            .await?
            .json()
            .await?;
        anyhow::ensure!(job["status"] == "completed", "job failed: {job}");
    }
    Ok((post, JOBS as f64 / started.elapsed().as_secs_f64()))
}

fn sorted(samples: &[f64]) -> Vec<f64> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted
}

fn median(samples: &[f64]) -> f64 {
    let sorted = sorted(samples);
    sorted[sorted.len() / 2]
}

fn p99(samples: &[f64]) -> f64 {
    let sorted = sorted(samples);
    sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)]
}

/// (d): a long job on node 0, a second node started, node 0 SIGKILLed; the time until the
/// job's record says it runs on node 1.
async fn failover(stack: &mut Stack) -> anyhow::Result<Duration> {
    let spare = stack.spare.take().context("spare node")?;
    let log = stack._dir.path().join("agent-node-1.log");
    stack
        .processes
        .push(Process::spawn_command("agent-node-1", spare, &log)?);
    let response: Value = stack
        .http
        .post(format!("{}/jobs", stack.api))
        .json(&json!({ "agent_id": "bench", "engine": "shell", "prompt": "sleep 20" }))
        .send()
        .await?
        .json()
        .await?;
    let id = response["job_id"].as_str().context("job id")?.to_owned();
    let job = |stack: &Stack| {
        let url = format!("{}/jobs/{id}", stack.api);
        let http = stack.http.clone();
        async move { http.get(url).send().await.ok()?.json::<Value>().await.ok() }
    };
    let first = wait_until(Duration::from_secs(30), "the job to run", || async {
        let job = job(stack).await?;
        (job["status"] == "running").then(|| job["node_id"].as_str().map(str::to_owned))?
    })
    .await?;
    let index = if first.ends_with("-node-0") { 0 } else { 1 };
    let victim = stack
        .processes
        .iter()
        .position(|p| p.name() == format!("agent-node-{index}"))
        .context("the node running the job")?;
    stack.processes[victim].signal("KILL");
    let killed = Instant::now();
    wait_until(
        Duration::from_secs(60),
        "the job to run elsewhere",
        || async {
            let job = job(stack).await?;
            (job["status"] == "running" && job["node_id"].as_str() != Some(first.as_str()))
                .then_some(())
        },
    )
    .await?;
    Ok(killed.elapsed())
}
