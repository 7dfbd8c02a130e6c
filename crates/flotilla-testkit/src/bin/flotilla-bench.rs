//! Dispatch-latency benchmark, run by hand (see docs/performance.md):
//!
//!     cargo build --workspace --bins --release && target/release/flotilla-bench
//!
//! In one run it measures (a) raw `docker exec` of `echo` into a running container, (b) raw
//! create + start + wait + remove of an `echo` container, (c) Flotilla's warm path and (d) its
//! cold path (`POST /jobs` → first output line at a NATS subscriber, → `/wait` returning, and
//! node receipt → process running), and (e) sustained jobs/s for 200 trivial jobs on one node
//! against the raw container rate. Prints medians, p99 and ratios.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use bollard::{
    Docker,
    exec::{CreateExecOptions, StartExecResults},
    models::{ContainerCreateBody, HostConfig},
    query_parameters::{CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder},
};
use flotilla_proto::{Encoding, LogChunk, LogStream};
use flotilla_testkit::Fleet;
use futures::StreamExt;
use serde_json::{Value, json};

const IMAGE: &str = "flotilla-worker:latest";
const SAMPLES: usize = 40;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let docker = Docker::connect_with_local_defaults()?
        .negotiate_version()
        .await?;
    println!("flotilla-bench: {SAMPLES} samples per latency figure\n");

    let exec = raw_exec(&docker).await?;
    report("(a) raw docker exec echo", &exec, None);
    let run = raw_run(&docker, SAMPLES).await?;
    report("(b) raw create+start+wait+remove echo", &run, None);
    let base = (median(&exec), median(&run));

    for (label, pool) in [("warm", "4"), ("cold", "0")] {
        let fleet = Fleet::builder()
            .nodes(1)
            .slots(1)
            .env("FLOTILLA_POOL_SIZE", pool)
            .start()
            .await?;
        wait_for_pool(&fleet, pool.parse()?).await?;
        let path = flotilla_path(&fleet).await?;
        println!();
        report(
            &format!(
                "({}) {label}: node receipt → process running",
                if label == "warm" { 'c' } else { 'd' }
            ),
            &path.start,
            Some(base),
        );
        report(
            &format!("    {label}: POST returned → first line at subscriber"),
            &path.first_line,
            Some(base),
        );
        report(
            &format!("    {label}: POST sent → /wait returned"),
            &path.done,
            Some(base),
        );
        println!("    {label}: pool hits/misses on the node: {}", path.pool);
    }

    println!();
    let fleet = Fleet::builder()
        .nodes(1)
        .slots(4)
        .env("FLOTILLA_POOL_SIZE", "4")
        .start()
        .await?;
    let jobs_per_s = throughput(&fleet, 200).await?;
    drop(fleet);
    let raw_started = Instant::now();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let d = docker.clone();
            tokio::spawn(async move { raw_run(&d, 25).await })
        })
        .collect();
    for worker in workers {
        worker.await??;
    }
    let raw_per_s = 100.0 / raw_started.elapsed().as_secs_f64();
    println!("(e) 200 trivial jobs, one node, 4 slots, warm pool 4: {jobs_per_s:.1} jobs/s");
    println!(
        "    raw create+start+wait+remove, 4 in parallel: {raw_per_s:.1} containers/s (ratio {:.2})",
        jobs_per_s / raw_per_s
    );
    Ok(())
}

struct PathFigures {
    start: Vec<f64>,
    first_line: Vec<f64>,
    done: Vec<f64>,
    pool: String,
}

async fn flotilla_path(fleet: &Fleet) -> anyhow::Result<PathFigures> {
    let client = fleet.nats.client().await?;
    let mut figures = PathFigures {
        start: Vec::new(),
        first_line: Vec::new(),
        done: Vec::new(),
        pool: String::new(),
    };
    for i in 0..=SAMPLES {
        let mut logs = client.subscribe("flotilla.logs.>").await?;
        let sent = Instant::now();
        let response: Value = fleet
            .http
            .post(format!("{}/jobs", fleet.api))
            .json(&json!({ "agent_id": "bench", "engine": "shell", "prompt": "echo hi" }))
            .send()
            .await?
            .json()
            .await?;
        let accepted = Instant::now();
        let job_id = response["job_id"].as_str().context("job id")?.to_owned();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), logs.next())
                .await?
                .context("log stream")?;
            let chunk: LogChunk = flotilla_proto::decode(&message.payload, Encoding::MessagePack)?;
            if chunk.job_id == job_id && chunk.stream == LogStream::Stdout {
                break;
            }
        }
        let first_line = accepted.elapsed();
        let job: Value = fleet
            .http
            .get(format!("{}/jobs/{job_id}/wait?timeout=60", fleet.api))
            .send()
            .await?
            .json()
            .await?;
        let done = sent.elapsed();
        if i == 0 {
            continue; // warm-up
        }
        figures.first_line.push(ms(first_line));
        figures.done.push(ms(done));
        if let Some(start) = job["attempts"][0]["start_ms"].as_f64() {
            figures.start.push(start);
        }
    }
    let nodes: Value = fleet
        .http
        .get(format!("{}/nodes", fleet.api))
        .send()
        .await?
        .json()
        .await?;
    let node = &nodes["nodes"][0];
    figures.pool = format!("{}/{}", node["pool_hits"], node["pool_misses"]);
    Ok(figures)
}

/// Waits until the node's warm pool is full, so the first samples are not misses.
async fn wait_for_pool(fleet: &Fleet, size: u64) -> anyhow::Result<()> {
    flotilla_testkit::wait_until(Duration::from_secs(30), "the warm pool to fill", || async {
        let nodes: Value = fleet
            .http
            .get(format!("{}/nodes", fleet.api))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let warm: u64 = nodes["nodes"][0]["warm"]
            .as_object()?
            .values()
            .filter_map(Value::as_u64)
            .sum();
        (warm >= size).then_some(())
    })
    .await
}

async fn throughput(fleet: &Fleet, jobs: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut ids = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        let response: Value = fleet
            .http
            .post(format!("{}/jobs", fleet.api))
            .json(&json!({ "agent_id": "bench", "engine": "shell", "prompt": "true" }))
            .send()
            .await?
            .json()
            .await?;
        ids.push(response["job_id"].as_str().context("job id")?.to_owned());
    }
    for id in ids {
        let job: Value = fleet
            .http
            .get(format!("{}/jobs/{id}/wait?timeout=300", fleet.api))
            .send()
            .await?
            .json()
            .await?;
        anyhow::ensure!(job["status"] == "completed", "job failed: {job}");
    }
    Ok(jobs as f64 / started.elapsed().as_secs_f64())
}

/// (a): exec `echo` into one running container.
async fn raw_exec(docker: &Docker) -> anyhow::Result<Vec<f64>> {
    let id = create(docker, vec!["sleep", "3600"]).await?;
    docker.start_container(&id, None).await?;
    let mut samples = Vec::new();
    for i in 0..=SAMPLES {
        let started = Instant::now();
        let exec = docker
            .create_exec(
                &id,
                CreateExecOptions {
                    cmd: Some(vec!["echo", "hi"]),
                    attach_stdout: Some(true),
                    ..Default::default()
                },
            )
            .await?;
        if let StartExecResults::Attached { mut output, .. } =
            docker.start_exec(&exec.id, None).await?
        {
            while output.next().await.is_some() {}
        }
        if i > 0 {
            samples.push(ms(started.elapsed()));
        }
    }
    remove(docker, &id).await;
    Ok(samples)
}

/// (b): create + start + wait + remove an `echo` container, `count` times in a row.
async fn raw_run(docker: &Docker, count: usize) -> anyhow::Result<Vec<f64>> {
    let mut samples = Vec::new();
    for _ in 0..count {
        let started = Instant::now();
        let id = create(docker, vec!["echo", "hi"]).await?;
        docker.start_container(&id, None).await?;
        let _ = docker.wait_container(&id, None).next().await;
        remove(docker, &id).await;
        samples.push(ms(started.elapsed()));
    }
    Ok(samples)
}

async fn create(docker: &Docker, cmd: Vec<&str>) -> anyhow::Result<String> {
    let body = ContainerCreateBody {
        image: Some(IMAGE.to_owned()),
        cmd: Some(cmd.into_iter().map(str::to_owned).collect()),
        labels: Some([("flotilla.bench".to_owned(), "true".to_owned())].into()),
        host_config: Some(HostConfig {
            network_mode: Some("none".to_owned()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let name = format!("flotilla-bench-{}", uuid_like());
    Ok(docker
        .create_container(
            Some(CreateContainerOptionsBuilder::default().name(&name).build()),
            body,
        )
        .await?
        .id)
}

async fn remove(docker: &Docker, id: &str) {
    let _ = docker
        .remove_container(
            id,
            Some(RemoveContainerOptionsBuilder::default().force(true).build()),
        )
        .await;
}

fn uuid_like() -> String {
    format!(
        "{:x}",
        Instant::now().elapsed().as_nanos() ^ u128::from(std::process::id()) << 64 ^ rand_nanos()
    )
}

fn rand_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn median(samples: &[f64]) -> f64 {
    percentile(samples, 0.5)
}

fn percentile(samples: &[f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index]
}

fn report(label: &str, samples: &[f64], base: Option<(f64, f64)>) {
    let (p50, p99) = (median(samples), percentile(samples, 0.99));
    let ratios = base
        .map(|(exec, run)| format!("  ({:.2}× exec, {:.2}× run)", p50 / exec, p50 / run))
        .unwrap_or_default();
    println!("{label:<55} median {p50:8.2} ms   p99 {p99:8.2} ms{ratios}");
}
