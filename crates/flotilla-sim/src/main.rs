//! flotilla-sim: N agent-node cores on the fake container runtime, in this one process, against
//! a real nats-server (or a real three-server cluster), fed jobs at a steady rate. It prints
//! what fleet size costs: dispatch latency (published to claimed), jobs/s, KV writes/s,
//! JetStream API requests/s, heartbeats/s, nats-server CPU and memory, and its own CPU.
//!
//! `cargo run --release -p flotilla-sim -- --nodes 100 --rate 200 --seconds 20`

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use agent_node::runtime::fake::{Behaviour, FakeRuntime};
use anyhow::Context as _;
use clap::Parser;
use flotilla_nats::{NodeDirectory, Topology, TopologyConfig, WatchEvent};
use flotilla_proto::{JobRequest, JobStatus};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

mod figures;

use figures::{CpuClock, percentile, rss_mib};

#[derive(Debug, Parser)]
#[command(about = "Many agent-node cores on the fake runtime against a real nats-server")]
struct Args {
    /// Nodes to run.
    #[arg(long, default_value_t = 10)]
    nodes: usize,
    /// Slots per node.
    #[arg(long, default_value_t = 4)]
    slots: u32,
    /// Jobs published per second.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// How long jobs are published for, after the fleet is up.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Each node's heartbeat interval.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Mean job duration (exponentially distributed).
    #[arg(long, default_value_t = 500)]
    mean_job_ms: u64,
    /// Largest output of a job, in bytes (uniformly distributed).
    #[arg(long, default_value_t = 2048)]
    max_output: usize,
    /// Run a three-server cluster (replicas 3) instead of one server.
    #[arg(long)]
    cluster: bool,
}

/// The NATS the fleet runs on, and the processes to measure.
enum Nats {
    Single(Box<flotilla_testkit::NatsServer>),
    Cluster(flotilla_testkit::NatsCluster),
}

impl Nats {
    async fn start(cluster: bool) -> anyhow::Result<Self> {
        Ok(if cluster {
            Nats::Cluster(flotilla_testkit::NatsCluster::start().await?)
        } else {
            Nats::Single(Box::new(flotilla_testkit::NatsServer::start().await?))
        })
    }

    fn url(&self) -> String {
        match self {
            Nats::Single(server) => server.url(),
            Nats::Cluster(cluster) => cluster.urls(),
        }
    }

    fn pids(&self) -> Vec<u32> {
        match self {
            Nats::Single(server) => server.pid().into_iter().collect(),
            Nats::Cluster(cluster) => cluster.pids(),
        }
    }

    fn replicas(&self) -> usize {
        match self {
            Nats::Single(_) => 1,
            Nats::Cluster(_) => 3,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let nats = Nats::start(args.cluster).await?;
    let dir = tempfile::tempdir()?;
    let stop = CancellationToken::new();
    let servers = nats
        .url()
        .split(',')
        .map(str::parse::<async_nats::ServerAddr>)
        .collect::<Result<Vec<_>, _>>()?;
    let client = async_nats::connect(servers).await?;
    let config = TopologyConfig {
        replicas: nats.replicas(),
        ..TopologyConfig::default()
    };
    let topology = Topology::ensure(client.clone(), config).await?;

    let started = Instant::now();
    start_nodes(&args, &nats, dir.path().to_path_buf(), &stop).await?;
    let directory = NodeDirectory::start(&topology, stop.clone());
    flotilla_testkit::wait_until(Duration::from_secs(300), "every node live", || async {
        (directory.live(chrono::Utc::now()).len() >= args.nodes).then_some(())
    })
    .await?;
    println!("{} nodes live in {:?}", args.nodes, started.elapsed());

    let run = measure(&args, &nats, &client, &topology, &stop).await?;
    println!("{}", run.summary(&args));
    stop.cancel();
    Ok(())
}

/// Starts `args.nodes` agent-node cores, a few at a time (each makes sure of the topology).
async fn start_nodes(
    args: &Args,
    nats: &Nats,
    state: PathBuf,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let repo = flotilla_testkit::repo_root();
    let seed = Arc::new(AtomicU64::new(0x9e37_79b9_7f4a_7c15));
    for i in 0..args.nodes {
        let flags = agent_node::Args::try_parse_from([
            "agent-node".to_owned(),
            format!("--nats-url={}", nats.url()),
            format!("--node-id=sim-{i}"),
            "--node-host=sim".to_owned(),
            format!("--slots={}", args.slots),
            format!("--heartbeat-ms={}", args.heartbeat_ms),
            format!("--state-dir={}", state.display()),
            format!("--engines-dir={}", repo.join("engines").display()),
            format!("--profiles-dir={}", repo.join("profiles").display()),
            format!("--replicas={}", nats.replicas()),
            "--pool-size=0".to_owned(),
            "--reap-secs=3600".to_owned(),
            "--drain-grace-secs=1".to_owned(),
        ])?;
        let config = flags.into_config().context("node settings")?;
        let runtime = Arc::new(FakeRuntime::default());
        let (seed, mean, max_output) = (seed.clone(), args.mean_job_ms, args.max_output);
        runtime.set_script(move |_| behaviour(&seed, mean, max_output));
        let stop = stop.clone();
        tokio::spawn(async move {
            if let Err(e) = agent_node::run_with_runtime(config, runtime, None, stop).await {
                eprintln!("node sim-{i} stopped: {e}");
            }
        });
        if i % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// A job as the distributions say: exponential duration, uniform output size.
fn behaviour(seed: &AtomicU64, mean_ms: u64, max_output: usize) -> Behaviour {
    let a = next_random(seed);
    let b = next_random(seed);
    let duration = -(mean_ms as f64) * (1.0 - a).ln();
    let size = (b * max_output as f64) as usize;
    let mut output = "x".repeat(size);
    output.push('\n');
    let mut job = Behaviour::exit(0).stdout(output);
    job.duration = Duration::from_secs_f64(duration / 1000.0);
    job
}

/// Uniform in [0, 1), from a shared xorshift state.
fn next_random(seed: &AtomicU64) -> f64 {
    let mut x = seed.load(Ordering::Relaxed);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    seed.store(x, Ordering::Relaxed);
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// What one run measured.
struct Run {
    jobs: usize,
    dispatch_ms: Vec<f64>,
    unclaimed: usize,
    completed: u64,
    window: Duration,
    kv_writes: u64,
    heartbeats: u64,
    api_requests: u64,
    server_cpu: f64,
    server_rss_mib: f64,
    own_cpu: f64,
}

impl Run {
    fn summary(&self, args: &Args) -> String {
        let secs = self.window.as_secs_f64();
        format!(
            "flotilla-sim: {} nodes, {} jobs, dispatch p50 {:.2} ms p99 {:.2} ms, {:.1} jobs/s, \
             {:.0} KV writes/s, {:.0} JetStream API requests/s, {:.0} heartbeats/s, \
             nats-server CPU {:.0}% RSS {:.0} MiB, sim CPU {:.0}%{}",
            args.nodes,
            self.jobs,
            percentile(&self.dispatch_ms, 50.0),
            percentile(&self.dispatch_ms, 99.0),
            self.completed as f64 / secs,
            self.kv_writes as f64 / secs,
            self.api_requests as f64 / secs,
            self.heartbeats as f64 / secs,
            self.server_cpu * 100.0,
            self.server_rss_mib,
            self.own_cpu * 100.0,
            if self.unclaimed > 0 {
                format!(" ({} never claimed)", self.unclaimed)
            } else {
                String::new()
            }
        )
    }
}

/// Publishes jobs at the rate for the window and measures everything meanwhile.
async fn measure(
    args: &Args,
    nats: &Nats,
    client: &async_nats::Client,
    topology: &Topology,
    stop: &CancellationToken,
) -> anyhow::Result<Run> {
    let submitted: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let claims: Arc<Mutex<Vec<f64>>> = Arc::default();
    let completed = Arc::new(AtomicU64::new(0));
    tokio::spawn(observe(
        topology.clone(),
        submitted.clone(),
        claims.clone(),
        completed.clone(),
        stop.clone(),
    ));
    let kv_writes = count(client, "$KV.>").await?;
    let heartbeats = count(client, "$KV.flotilla_nodes.>").await?;
    let js = async_nats::jetstream::new(client.clone());
    let api_before = js.query_account().await?.requests.total;
    let server = CpuClock::of(&nats.pids());
    let own = CpuClock::of(&[std::process::id()]);
    let (writes_before, beats_before) = (
        kv_writes.load(Ordering::Relaxed),
        heartbeats.load(Ordering::Relaxed),
    );
    let completed_before = completed.load(Ordering::Relaxed);
    let window = Duration::from_secs(args.seconds);
    let jobs = publish(args, topology, &submitted, window).await;
    let elapsed = server.elapsed();
    let run = Run {
        jobs,
        dispatch_ms: Vec::new(),
        unclaimed: 0,
        completed: completed.load(Ordering::Relaxed) - completed_before,
        window: elapsed,
        kv_writes: kv_writes.load(Ordering::Relaxed) - writes_before,
        heartbeats: heartbeats.load(Ordering::Relaxed) - beats_before,
        api_requests: js.query_account().await?.requests.total - api_before,
        server_cpu: server.cores_used(),
        server_rss_mib: nats.pids().into_iter().map(rss_mib).sum(),
        own_cpu: own.cores_used(),
    };
    // Late claims still count for latency: wait for them a while.
    let _ = flotilla_testkit::wait_until(Duration::from_secs(30), "every job claimed", || async {
        (claims.lock().expect("claims").len() >= jobs).then_some(())
    })
    .await;
    let dispatch_ms = claims.lock().expect("claims").clone();
    Ok(Run {
        unclaimed: jobs.saturating_sub(dispatch_ms.len()),
        dispatch_ms,
        ..run
    })
}

/// Publishes `args.rate` jobs a second for `window`, each straight onto the run queue as
/// the intake would (record, then message). Returns how many.
async fn publish(
    args: &Args,
    topology: &Topology,
    submitted: &Arc<Mutex<HashMap<String, Instant>>>,
    window: Duration,
) -> usize {
    let period = Duration::from_secs_f64(1.0 / args.rate);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let end = Instant::now() + window;
    let mut n = 0;
    while Instant::now() < end {
        ticker.tick().await;
        let job_id = format!("sim-{n}");
        n += 1;
        let request = JobRequest::example(&job_id, "shell", "true");
        let topology = topology.clone();
        let submitted = submitted.clone();
        tokio::spawn(async move {
            submitted
                .lock()
                .expect("submitted")
                .insert(job_id, Instant::now());
            let headers = async_nats::HeaderMap::new();
            if let Err(e) = flotilla_nats::submit(&topology, &request, headers).await {
                eprintln!("submit failed: {e}");
            }
        });
    }
    n
}

/// Follows the jobs bucket: the first claim of each job gives its dispatch latency.
async fn observe(
    topology: Topology,
    submitted: Arc<Mutex<HashMap<String, Instant>>>,
    claims: Arc<Mutex<Vec<f64>>>,
    completed: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    topology
        .jobs
        .follow(stop, |event| {
            let WatchEvent::Put(versioned) = event else {
                return;
            };
            let record = &versioned.record;
            match record.status {
                JobStatus::Running if record.attempt == 1 => {
                    let at = submitted.lock().expect("submitted").remove(&record.job_id);
                    if let Some(at) = at {
                        let ms = at.elapsed().as_secs_f64() * 1000.0;
                        claims.lock().expect("claims").push(ms);
                    }
                }
                JobStatus::Completed => {
                    completed.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        })
        .await;
}

/// Counts the messages on `subject` from now on.
async fn count(client: &async_nats::Client, subject: &str) -> anyhow::Result<Arc<AtomicU64>> {
    let mut subscription = client.subscribe(subject.to_owned()).await?;
    let counter = Arc::new(AtomicU64::new(0));
    let seen = counter.clone();
    tokio::spawn(async move {
        while subscription.next().await.is_some() {
            seen.fetch_add(1, Ordering::Relaxed);
        }
    });
    Ok(counter)
}
