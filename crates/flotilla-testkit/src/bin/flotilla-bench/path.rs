//! Flotilla's own path, as a user sees it: `POST /jobs` to the first output line and to
//! `/wait` returning, one job at a time; and sustained jobs per second.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use flotilla_proto::{Encoding, LogChunk, LogStream};
use flotilla_testkit::Fleet;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::stats::ms;

/// One job's timings, taken by the client.
pub struct Sample {
    pub job_id: String,
    /// Node receipt → process running, as the node recorded it.
    pub start_ms: Option<f64>,
    pub first_line_ms: f64,
    pub done_ms: f64,
}

/// `samples` jobs run one after another (after one unmeasured warm-up), each `echo hi`, with
/// `gap` between them.
pub async fn sequential(
    fleet: &Fleet,
    samples: usize,
    gap: Duration,
) -> anyhow::Result<Vec<Sample>> {
    let client = fleet.nats.client().await?;
    let mut figures = Vec::new();
    for i in 0..=samples {
        let mut logs = client.subscribe("flotilla.logs.>").await?;
        let sent = Instant::now();
        let job_id = post(fleet, "echo hi").await?;
        let accepted = Instant::now();
        first_stdout(&mut logs, &job_id).await?;
        let first_line = accepted.elapsed();
        let job = wait(fleet, &job_id).await?;
        let done = sent.elapsed();
        anyhow::ensure!(job["status"] == "completed", "job failed: {job}");
        if i > 0 {
            figures.push(Sample {
                job_id,
                start_ms: job["attempts"][0]["start_ms"].as_f64(),
                first_line_ms: ms(first_line),
                done_ms: ms(done),
            });
        }
        tokio::time::sleep(gap.saturating_sub(sent.elapsed())).await;
    }
    Ok(figures)
}

async fn first_stdout(logs: &mut async_nats::Subscriber, job_id: &str) -> anyhow::Result<()> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), logs.next())
            .await?
            .context("log stream")?;
        let chunk: LogChunk = flotilla_proto::decode(&message.payload, Encoding::MessagePack)?;
        if chunk.job_id == job_id && chunk.stream == LogStream::Stdout {
            return Ok(());
        }
    }
}

pub async fn post(fleet: &Fleet, prompt: &str) -> anyhow::Result<String> {
    let response: Value = fleet
        .http
        .post(format!("{}/jobs", fleet.api))
        .json(&json!({ "agent_id": "bench", "engine": "shell", "prompt": prompt }))
        .send()
        .await?
        .json()
        .await?;
    Ok(response["job_id"]
        .as_str()
        .with_context(|| format!("no job id in {response}"))?
        .to_owned())
}

async fn wait(fleet: &Fleet, job_id: &str) -> anyhow::Result<Value> {
    Ok(fleet
        .http
        .get(format!("{}/jobs/{job_id}/wait?timeout=300", fleet.api))
        .send()
        .await?
        .json()
        .await?)
}

/// The node's pool hits and misses so far, as `hits/misses`.
pub async fn pool_use(fleet: &Fleet) -> anyhow::Result<String> {
    let nodes = nodes(fleet).await?;
    let node = &nodes["nodes"][0];
    Ok(format!("{}/{}", node["pool_hits"], node["pool_misses"]))
}

async fn nodes(fleet: &Fleet) -> anyhow::Result<Value> {
    Ok(fleet
        .http
        .get(format!("{}/nodes", fleet.api))
        .send()
        .await?
        .json()
        .await?)
}

/// Waits until the node's warm pool holds `size`, so the first samples are not misses.
pub async fn wait_for_pool(fleet: &Fleet, size: u64) -> anyhow::Result<()> {
    flotilla_testkit::wait_until(Duration::from_secs(60), "the warm pool to fill", || async {
        let nodes = nodes(fleet).await.ok()?;
        let warm: u64 = nodes["nodes"][0]["warm"]
            .as_object()?
            .values()
            .filter_map(Value::as_u64)
            .sum();
        (warm >= size).then_some(())
    })
    .await
}

/// Submits `jobs` trivial jobs at once and waits for all: jobs per second, and the node's CPU
/// time per job.
pub async fn throughput(fleet: &Fleet, jobs: usize) -> anyhow::Result<(f64, Duration)> {
    let node = fleet.nodes[0].pid();
    let cpu_before = crate::stats::cpu_time(node)?;
    let started = Instant::now();
    let mut ids = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        ids.push(post(fleet, "true").await?);
    }
    for id in ids {
        let job = wait(fleet, &id).await?;
        anyhow::ensure!(job["status"] == "completed", "job failed: {job}");
    }
    let per_s = jobs as f64 / started.elapsed().as_secs_f64();
    let cpu = crate::stats::cpu_time(node)? - cpu_before;
    Ok((per_s, cpu / jobs as u32))
}
