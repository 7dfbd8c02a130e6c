//! What repositories and artifacts cost a job, run by hand (see docs/performance.md):
//!
//!     cargo build --workspace --bins --release && target/release/flotilla-workspace-bench
//!
//! One fleet (one node, real Docker), a `git daemon` on loopback with a 10 MB repository of
//! incompressible files, side by side in one run: (a) the start latency (`start_ms`: the node
//! receiving the job to its process running) of a job without a repository, of a job on the
//! repository with a cold mirror (a fresh copy of the repository each time), and with a warm
//! mirror; and the whole job (submit to finished), which adds the workspace sent back and the
//! diff; (b) a job writing 100 MB, with and without `outputs` collecting it.

use std::time::{Duration, Instant};

use flotilla_testkit::{Fleet, GitServer};
use reqwest::Method;
use serde_json::{Value, json};

const SAMPLES: usize = 8;
const REPO_FILES: usize = 100;
const FILE_BYTES: usize = 100 * 1024;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let git = GitServer::start().await?;
    let files: Vec<(String, Vec<u8>)> = (0..REPO_FILES)
        .map(|i| {
            (
                format!("data/{i:03}.bin"),
                random_bytes(FILE_BYTES, i as u64),
            )
        })
        .collect();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_slice()))
        .collect();
    for copy in 0..=SAMPLES {
        git.create(&format!("bench/ten-{copy}.git"), &refs)?;
    }
    let fleet = Fleet::builder()
        .env("FLOTILLA_GIT_ALLOWED_HOSTS", "127.0.0.1")
        .start()
        .await?;
    println!(
        "flotilla-workspace-bench: {SAMPLES} samples each; a repository of {REPO_FILES} files, {} MB\n",
        REPO_FILES * FILE_BYTES / 1_000_000
    );
    for _ in 0..3 {
        run(&fleet, shell("true")).await?;
    }
    let on_repo = |copy: usize| {
        let mut job = shell("true");
        job["workspace"] =
            json!({"git": {"url": git.url(&format!("bench/ten-{copy}.git")), "ref": "main"}});
        job
    };
    let mut plain = Vec::new();
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for i in 0..SAMPLES {
        plain.push(run(&fleet, shell("true")).await?);
        cold.push(run(&fleet, on_repo(i + 1)).await?);
        warm.push(run(&fleet, on_repo(0)).await?);
    }
    println!("(a) start latency (start_ms) and whole job (submit to finished), medians:");
    for (label, samples) in [
        ("no repository", &plain),
        ("10 MB repository, cold mirror", &cold),
        ("10 MB repository, warm mirror", &warm),
    ] {
        let start: Vec<f64> = samples.iter().map(|s| s.start_ms).collect();
        let whole: Vec<f64> = samples.iter().map(|s| s.whole_ms).collect();
        println!(
            "    {label:<32} start {:>8.1} ms   whole {:>8.1} ms",
            median(&start),
            median(&whole)
        );
    }

    let writer = "mkdir -p out && head -c 104857600 /dev/urandom > out/blob";
    let mut without = Vec::new();
    let mut with = Vec::new();
    for _ in 0..SAMPLES / 2 {
        without.push(run(&fleet, shell(writer)).await?.whole_ms);
        let mut job = shell(writer);
        job["outputs"] = json!(["out/**"]);
        with.push(run(&fleet, job).await?.whole_ms);
    }
    println!(
        "(b) a job writing 100 MB: without outputs {:.0} ms, collecting it as an artifact {:.0} ms (+{:.0} ms, medians)",
        median(&without),
        median(&with),
        median(&with) - median(&without)
    );
    Ok(())
}

struct Sample {
    start_ms: f64,
    whole_ms: f64,
}

fn shell(script: &str) -> Value {
    json!({"agent_id": "bench", "engine": "shell", "prompt": script})
}

async fn run(fleet: &Fleet, job: Value) -> anyhow::Result<Sample> {
    let started = Instant::now();
    let accepted: Value = fleet
        .request(Method::POST, "/jobs")
        .json(&job)
        .send()
        .await?
        .json()
        .await?;
    let id = accepted["job_id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("not accepted: {accepted}"))?
        .to_owned();
    let record: Value = fleet
        .request(Method::GET, &format!("/jobs/{id}/wait?timeout=300"))
        .timeout(Duration::from_secs(310))
        .send()
        .await?
        .json()
        .await?;
    let whole_ms = started.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(record["status"] == "completed", "job failed: {record}");
    let start_ms = record["attempts"][0]["start_ms"]
        .as_f64()
        .unwrap_or(f64::NAN);
    Ok(Sample { start_ms, whole_ms })
}

/// Incompressible bytes (xorshift), so git packs them at full size.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}
