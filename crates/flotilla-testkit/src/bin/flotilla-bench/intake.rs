//! Intake without nodes: `POST /jobs` one at a time, under load from concurrent clients on the
//! same machine, and direct NATS submissions admitted per second.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use flotilla_proto::names;
use flotilla_testkit::Fleet;
use futures::{StreamExt, stream};
use serde_json::json;

use crate::stats::ms;

/// `count` submissions one after another: each one's latency.
pub async fn one_at_a_time(fleet: &Fleet, count: usize) -> anyhow::Result<Vec<f64>> {
    let mut figures = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        crate::path::post(fleet, "true").await?;
        figures.push(ms(started.elapsed()));
    }
    Ok(figures)
}

/// What a load run measured.
pub struct Load {
    pub per_s: f64,
    pub latencies: Vec<f64>,
    pub refused: usize,
}

/// `clients` connections, each submitting one job after another, for `duration`.
pub async fn loaded(fleet: &Fleet, clients: usize, duration: Duration) -> anyhow::Result<Load> {
    let url = format!("{}/jobs", fleet.api);
    let body =
        serde_json::to_vec(&json!({ "agent_id": "load", "engine": "shell", "prompt": "true" }))?;
    let started = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            tokio::spawn(async move {
                // One connection per client, kept alive, as wrk's are.
                let http = reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .build()?;
                let (mut latencies, mut refused) = (Vec::new(), 0);
                while started.elapsed() < duration {
                    let sent = Instant::now();
                    let response = http
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await?;
                    let status = response.status();
                    let answer = response.bytes().await?;
                    latencies.push(ms(sent.elapsed()));
                    if status != reqwest::StatusCode::ACCEPTED {
                        if refused == 0 {
                            eprintln!(
                                "flotilla-bench: a POST was refused: {status} {}",
                                String::from_utf8_lossy(&answer)
                            );
                        }
                        refused += 1;
                    }
                }
                anyhow::Ok((latencies, refused))
            })
        })
        .collect();
    let mut load = Load {
        per_s: 0.0,
        latencies: Vec::new(),
        refused: 0,
    };
    for worker in workers {
        let (latencies, refused) = worker.await??;
        load.latencies.extend(latencies);
        load.refused += refused;
    }
    load.per_s = load.latencies.len() as f64 / started.elapsed().as_secs_f64();
    Ok(load)
}

/// Publishes `count` submissions straight to NATS (publish acks awaited 256 at a time) and
/// waits until the intake has admitted them all: submissions admitted per second.
pub async fn direct(fleet: &Fleet, count: usize) -> anyhow::Result<f64> {
    let js = jetstream::new(fleet.nats.client().await?);
    let started = Instant::now();
    let acks = stream::iter(0..count)
        .map(|_| {
            let js = js.clone();
            async move {
                let job = json!({ "agent_id": "direct", "engine": "shell", "prompt": "true" });
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(names::HEADER_CONTENT_TYPE, "application/json");
                let payload = serde_json::to_vec(&job)?.into();
                js.publish_with_headers(names::SUBJECT_SUBMIT, headers, payload)
                    .await?
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await;
    acks.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let stream = js.get_stream(names::STREAM_SUBMIT).await?;
    flotilla_testkit::wait_until(Duration::from_secs(300), "the intake to drain", || async {
        let info = stream.consumer_info(names::CONSUMER_INTAKE).await.ok()?;
        (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
    })
    .await?;
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// The same load from `wrk -t2 -c16` when wrk is installed (`apt-get install wrk`): a leaner
/// load generator than this process's own, as issue 16 measured. Its summary lines, or `None`.
pub fn wrk(fleet: &Fleet, duration: Duration) -> anyhow::Result<Option<String>> {
    if std::process::Command::new("wrk")
        .arg("--version")
        .output()
        .is_err()
    {
        return Ok(None);
    }
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("post.lua");
    std::fs::write(
        &script,
        r#"wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"agent_id": "wrk", "engine": "shell", "prompt": "true"}'
"#,
    )?;
    let output = std::process::Command::new("wrk")
        .args(["-t2", "-c16", "--latency", "-s"])
        .arg(&script)
        .arg(format!("-d{}s", duration.as_secs()))
        .arg(format!("{}/jobs", fleet.api))
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let wanted = ["Latency ", "99%", "Requests/sec", "Non-2xx"];
    Ok(Some(
        text.lines()
            .filter(|line| wanted.iter().any(|w| line.trim_start().starts_with(w)))
            .map(|line| format!("    wrk: {}", line.trim()))
            .collect::<Vec<_>>()
            .join("\n"),
    ))
}
