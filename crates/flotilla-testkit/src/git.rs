//! A real git server on loopback (`git daemon`, fetch and push over `git://`) with repositories
//! made from files, and a fake forge that speaks GitHub's pulls API. Nothing reaches the
//! internet.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, bail};
use axum::{
    Json, Router,
    extract::{Path as UrlPath, State},
    http::{HeaderMap, StatusCode},
    routing::post,
};
use serde_json::{Value, json};

use crate::{Process, free_port, wait_until};

/// `git daemon` serving every repository under its base directory, push enabled.
pub struct GitServer {
    dir: tempfile::TempDir,
    port: u16,
    _daemon: Process,
}

impl GitServer {
    pub async fn start() -> anyhow::Result<Self> {
        if Command::new("git").arg("--version").output().is_err() {
            bail!("git not found: apt-get install git (the git workspace tests run git daemon)");
        }
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let mut daemon = Command::new("git");
        daemon
            .args([
                "daemon",
                "--reuseaddr",
                "--export-all",
                "--enable=receive-pack",
            ])
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", dir.path().display()))
            .arg(dir.path());
        let log = dir.path().join("daemon.log");
        let daemon = Process::spawn_command("git-daemon", daemon, &log)?;
        wait_until(
            Duration::from_secs(10),
            "git daemon to listen",
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(drop)
            },
        )
        .await?;
        Ok(Self {
            dir,
            port,
            _daemon: daemon,
        })
    }

    /// `git://127.0.0.1:<port>/<name>`.
    pub fn url(&self, name: &str) -> String {
        format!("git://127.0.0.1:{}/{name}", self.port)
    }

    fn bare(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Makes bare repository `name` whose `main` has one commit of `files` (path, content).
    /// Returns the commit id.
    pub fn create(&self, name: &str, files: &[(&str, &[u8])]) -> anyhow::Result<String> {
        let work = tempfile::tempdir()?;
        git(work.path(), &["init", "-q", "-b", "main"])?;
        for (path, content) in files {
            let file = work.path().join(path);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(file, content)?;
        }
        git(work.path(), &["add", "-A"])?;
        git(work.path(), &["commit", "-q", "-m", "initial"])?;
        let bare = self.bare(name);
        git(
            self.dir.path(),
            &[
                "clone",
                "-q",
                "--bare",
                &work.path().display().to_string(),
                &bare.display().to_string(),
            ],
        )?;
        self.commit_of(name, "main")
    }

    /// Adds a commit to `main` of `name` writing `files`; returns its id.
    pub fn commit(&self, name: &str, files: &[(&str, &[u8])]) -> anyhow::Result<String> {
        let work = tempfile::tempdir()?;
        let bare = self.bare(name).display().to_string();
        git(work.path(), &["clone", "-q", &bare, "w"])?;
        let w = work.path().join("w");
        for (path, content) in files {
            let file = w.join(path);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(file, content)?;
        }
        git(&w, &["add", "-A"])?;
        git(&w, &["commit", "-q", "-m", "more"])?;
        git(&w, &["push", "-q", "origin", "main"])?;
        self.commit_of(name, "main")
    }

    /// The commit `branch` of `name` points to.
    pub fn commit_of(&self, name: &str, branch: &str) -> anyhow::Result<String> {
        let out = git_output(&self.bare(name), &["rev-parse", branch])?;
        Ok(out.trim().to_owned())
    }

    /// A file's content at `rev` of `name`.
    pub fn show(&self, name: &str, rev: &str, path: &str) -> anyhow::Result<String> {
        git_output(&self.bare(name), &["show", &format!("{rev}:{path}")])
    }

    /// A commit's author, as `name <email>`.
    pub fn author(&self, name: &str, rev: &str) -> anyhow::Result<String> {
        let out = git_output(&self.bare(name), &["log", "-1", "--format=%an <%ae>", rev])?;
        Ok(out.trim().to_owned())
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    git_output(dir, args).map(drop)
}

fn git_output(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .args(args)
        .output()
        .with_context(|| format!("git {args:?}"))?;
    if !out.status.success() {
        bail!(
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A pull request the fake forge was asked to open.
#[derive(Debug, Clone)]
pub struct PullRequestCall {
    /// `owner/name`.
    pub repo: String,
    pub authorization: Option<String>,
    pub body: Value,
}

/// Answers `POST /repos/{owner}/{repo}/pulls` as GitHub does (201 with `html_url`), and
/// records each call.
pub struct FakeForge {
    url: String,
    calls: Arc<Mutex<Vec<PullRequestCall>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeForge {
    pub async fn start() -> anyhow::Result<Self> {
        let calls: Arc<Mutex<Vec<PullRequestCall>>> = Arc::default();
        let app = Router::new()
            .route("/repos/{owner}/{repo}/pulls", post(pulls))
            .with_state(calls.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { url, calls, task })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn calls(&self) -> Vec<PullRequestCall> {
        self.calls.lock().expect("forge calls").clone()
    }
}

impl Drop for FakeForge {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pulls(
    State(calls): State<Arc<Mutex<Vec<PullRequestCall>>>>,
    UrlPath((owner, repo)): UrlPath<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let mut calls = calls.lock().expect("forge calls");
    calls.push(PullRequestCall {
        repo: format!("{owner}/{repo}"),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body,
    });
    let number = calls.len();
    let html_url = format!("https://forge.test/{owner}/{repo}/pull/{number}");
    (
        StatusCode::CREATED,
        Json(json!({ "number": number, "html_url": html_url })),
    )
}
