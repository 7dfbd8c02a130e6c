//! Test harness: a real `nats-server` per test on a free port with its own store, the real
//! service binaries as child processes, polling helpers, and headless Chromium for the
//! dashboard. Missing tools fail the test with a message saying what to install; nothing is
//! skipped.

mod cluster;
mod fleet;
mod git;
mod hosts;
pub mod mock_llm;
mod nats;
mod otlp;
mod process;
mod prom;
mod proxy;
mod tls;
mod webdriver;

use std::{future::Future, path::PathBuf, time::Duration};

pub use cluster::{NatsCluster, NatsClusterBuilder};
pub use fleet::{
    Fleet, FleetBuilder, LlmGateway, TEST_ANTHROPIC_KEY, TEST_GOOGLE_KEY, TEST_OPENAI_KEY,
};
pub use git::{FakeForge, GitServer, PullRequestCall};
pub use hosts::{Host, Hosts};
pub use mock_llm::MockLlm;
pub use nats::{NatsServer, NatsServerAuth, NatsServerBuilder};
pub use otlp::{OtlpReceiver, ReceivedSpan};
pub use process::Process;
pub use prom::Scrape;
pub use proxy::TcpProxy;
pub use tls::TlsFiles;
pub use webdriver::{Browser, Element};

/// The repository root (engines/, profiles/, scripts/ live there).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("no free port on 127.0.0.1")
}

/// Path of a workspace binary built next to the running test (`target/<profile>/<name>`).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test-binary> (tests) or target/<profile>/<bin> (the bench)
    // -> target/<profile>/<name>
    let mut dir = exe.parent().ok_or_else(|| {
        anyhow::anyhow!("cannot locate the target directory from {}", exe.display())
    })?;
    if dir.ends_with("deps") {
        dir = dir.parent().unwrap_or(dir);
    }
    let path = dir.join(name);
    anyhow::ensure!(
        path.exists(),
        "{} is missing: build the services first with `cargo build --workspace --bins` \
         (scripts/test does this)",
        path.display()
    );
    Ok(path)
}

/// Polls `check` every 20 ms until it returns `Some`, or fails after `timeout` saying `what`.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Containers (running or not) that ran `job_id`: named `flotilla-<job_id>-<attempt>` (warm
/// containers are renamed when they take a job) or labelled with it (cold starts).
pub fn containers_for_job(job_id: &str) -> anyhow::Result<Vec<String>> {
    let output = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("name=flotilla-{job_id}-")])
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run docker ({e}): install and start Docker Engine"))?;
    let mut ids: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    for id in containers_with_label(flotilla_proto::names::LABEL_JOB, job_id)? {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// Ids of the containers (running or not) carrying `label=value`, via the docker CLI so that
/// tests see exactly what an operator would.
pub fn containers_with_label(label: &str, value: &str) -> anyhow::Result<Vec<String>> {
    let output = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label={label}={value}")])
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run docker ({e}): install and start Docker Engine"))?;
    anyhow::ensure!(
        output.status.success(),
        "docker ps failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}
