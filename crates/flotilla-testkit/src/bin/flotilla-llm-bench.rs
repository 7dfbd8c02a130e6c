//! llm-gateway overhead benchmark, run by hand (see docs/performance.md):
//!
//!     cargo build --workspace --bins --release && target/release/flotilla-llm-bench
//!
//! Starts a fleet whose llm-gateway forwards to a local mock upstream, grants one job a token,
//! and measures (a) a non-streamed Messages request straight to the mock and through the
//! gateway (token check, two KV reads, forwarding, metering, one KV compare-and-set), (b) time
//! to the first streamed byte both ways, and (c) requests/s through the gateway with 8
//! concurrent clients. Prints medians and p99.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use flotilla_proto::{llm, names};
use flotilla_testkit::{Fleet, MockLlm, mock_llm};
use serde_json::{Value, json};

const SAMPLES: usize = 200;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mock = MockLlm::start().await?;
    let fleet = Fleet::builder().nodes(0).llm(&mock.url()).start().await?;
    let gateway = fleet.llm.as_ref().expect("llm-gateway").url.clone();

    // A running job and its token, written the way a node writes them.
    let js = jetstream::new(fleet.nats.client().await?);
    let jobs = js.get_key_value(names::BUCKET_JOBS).await?;
    let grants = js.get_key_value(names::BUCKET_LLM_GRANTS).await?;
    let record = mock_llm::running_record("bench-job");
    jobs.put(
        names::job_key("bench-job"),
        flotilla_proto::encode(&record)?,
    )
    .await?;
    let token = llm::new_token();
    let grant = mock_llm::grant("bench-job");
    grants
        .put(llm::grant_key(&token), flotilla_proto::encode(&grant)?)
        .await?;

    let http = reqwest::Client::new();
    let direct = format!("{}/v1/messages", mock.url());
    let via = format!("{gateway}/anthropic/v1/messages");
    let body = |stream: bool| {
        json!({"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": stream,
               "messages": [{"role": "user", "content": "hello"}]})
    };
    println!("flotilla-llm-bench: {SAMPLES} samples per figure\n");

    let mut plain = (Vec::new(), Vec::new());
    let mut first_byte = (Vec::new(), Vec::new());
    for _ in 0..SAMPLES {
        plain
            .0
            .push(call(&http, &direct, &token, body(false), false).await?);
        plain
            .1
            .push(call(&http, &via, &token, body(false), false).await?);
        first_byte
            .0
            .push(call(&http, &direct, &token, body(true), true).await?);
        first_byte
            .1
            .push(call(&http, &via, &token, body(true), true).await?);
    }
    report(
        "(a) non-streamed request, straight to the upstream",
        &plain.0,
    );
    report(
        "(a) non-streamed request, through the llm-gateway",
        &plain.1,
    );
    println!(
        "    gateway overhead (median): {:.2} ms",
        median(&plain.1) - median(&plain.0)
    );
    report(
        "(b) first streamed byte, straight to the upstream",
        &first_byte.0,
    );
    report(
        "(b) first streamed byte, through the llm-gateway",
        &first_byte.1,
    );

    let started = Instant::now();
    let total = 2000;
    let clients = 8;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, via, token) = (http.clone(), via.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..total / clients {
                call(&http, &via, &token, body(false), false).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    println!(
        "(c) {total} requests, {clients} concurrent clients, through the gateway: {rate:.0} requests/s"
    );

    let record: Value = serde_json::to_value(flotilla_proto::decode::<flotilla_proto::JobRecord>(
        &jobs
            .get(names::job_key("bench-job"))
            .await?
            .unwrap_or_default(),
        flotilla_proto::Encoding::MessagePack,
    )?)?;
    println!(
        "    metered on the job: {} requests (expected {})",
        record["usage"]["requests"],
        2 * SAMPLES + total
    );
    Ok(())
}

/// One request; returns milliseconds to the whole body, or to the first chunk if `first`.
async fn call(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    body: Value,
    first: bool,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut response = http
        .post(url)
        .header("x-api-key", token)
        .json(&body)
        .send()
        .await?
        .error_for_status()?;
    let mut elapsed = None;
    while response.chunk().await?.is_some() {
        if first && elapsed.is_none() {
            elapsed = Some(started.elapsed());
        }
    }
    Ok(ms(elapsed.unwrap_or_else(|| started.elapsed())))
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn median(samples: &[f64]) -> f64 {
    percentile(samples, 0.5)
}

fn percentile(samples: &[f64], q: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let index = ((sorted.len().saturating_sub(1)) as f64 * q).round() as usize;
    sorted.get(index).copied().unwrap_or(f64::NAN)
}

fn report(label: &str, samples: &[f64]) {
    println!(
        "{label:<55} median {:8.2} ms   p99 {:8.2} ms",
        median(samples),
        percentile(samples, 0.99)
    );
}
