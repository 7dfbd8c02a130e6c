//! `flotilla`: the command-line client of the HTTP API.
//!
//! Exit status: 0 success (or the job completed), 1 the job failed, 3 the job was cancelled,
//! 2 a usage or API error.

mod artifacts;

use std::{io::IsTerminal, path::PathBuf, process::ExitCode, time::Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{Map, Value, json};

#[derive(Parser)]
#[command(
    name = "flotilla",
    version,
    about = "Run AI coding agents on a Flotilla fleet"
)]
struct Cli {
    /// API base URL.
    #[arg(
        long,
        env = "FLOTILLA_API",
        default_value = "http://127.0.0.1:8420",
        global = true
    )]
    api: String,
    /// API key (prefer the FLOTILLA_API_KEY environment variable: flags show in `ps`).
    #[arg(long, env = "FLOTILLA_API_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
    /// Print JSON instead of human output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Submit a job.
    Submit {
        /// The prompt (for the shell engine, the script). Or use --file.
        prompt: Option<String>,
        #[arg(long, short)]
        engine: Option<String>,
        #[arg(long, short)]
        profile: Option<String>,
        /// A prompt variable, `name=value` (values that parse as JSON are typed).
        #[arg(long = "var", value_name = "NAME=VALUE")]
        vars: Vec<String>,
        /// Read the prompt from a file.
        #[arg(long, short, conflicts_with = "prompt")]
        file: Option<PathBuf>,
        /// Put a local file in the job's /workspace, as `PATH` (its file name there) or
        /// `PATH:DEST` (DEST relative to /workspace). Repeatable; binary files are fine, and
        /// an executable stays executable.
        #[arg(long, value_name = "PATH[:DEST]")]
        attach: Vec<String>,
        #[arg(long, default_value = "cli")]
        agent_id: String,
        #[arg(long)]
        timeout: Option<u64>,
        #[arg(long)]
        dry_run: bool,
        /// Wait for the job to end; the exit status reflects its outcome.
        #[arg(long, short)]
        wait: bool,
        /// Print the job's output live until it ends (implies --wait).
        #[arg(long)]
        follow: bool,
    },
    /// Print a job's output (from the start); -f follows it live until the job ends.
    Logs {
        job_id: String,
        #[arg(long, short)]
        follow: bool,
    },
    /// Show a job.
    Get { job_id: String },
    /// List jobs, newest first.
    Ls {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        agent_id: Option<String>,
        #[arg(long)]
        engine: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Cancel a job.
    Cancel { job_id: String },
    /// Live agent-nodes.
    Nodes,
    /// Have every node (or those with all the --label labels) pull an image now.
    Prefetch {
        image: String,
        /// Only nodes with this label, `key=value`; repeatable.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    /// Profiles and their variables.
    Profiles,
    /// Engines and whether a node can run them.
    Engines,
    /// List a job's collected outputs, or download them all with -o.
    Artifacts {
        job_id: String,
        /// Download every artifact under this directory, by its path.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Print the patch of a job's change to its repository.
    Diff { job_id: String },
    /// A group's variants side by side (`POST /groups` makes one); --wait until all ended.
    Compare {
        group_id: String,
        #[arg(long, short)]
        wait: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("flotilla: {e:#}");
            ExitCode::from(2)
        }
    }
}

struct Api {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Api {
    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let request = self
            .http
            .request(method, format!("{}{path}", self.base.trim_end_matches('/')));
        match &self.key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    /// Sends and returns the JSON body, turning the error envelope into a readable error.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let mut request = self.request(method, path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let error = &body["error"];
            let field = error["field"]
                .as_str()
                .map(|f| format!(" ({f})"))
                .unwrap_or_default();
            bail!(
                "{}{field}: {}",
                status.as_u16(),
                error["message"].as_str().unwrap_or("request failed")
            );
        }
        Ok(body)
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let api = Api {
        http: reqwest::Client::new(),
        base: cli.api,
        key: cli.api_key.filter(|k| !k.is_empty()),
    };
    let json = cli.json;
    match cli.command {
        Command::Submit {
            prompt,
            engine,
            profile,
            vars,
            file,
            attach,
            agent_id,
            timeout,
            dry_run,
            wait,
            follow,
        } => {
            let prompt = match (prompt, file) {
                (Some(prompt), _) => Some(prompt),
                (None, Some(path)) => Some(
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                ),
                (None, None) => None,
            };
            let mut body = Map::new();
            body.insert("agent_id".into(), json!(agent_id));
            let optional = [
                ("engine", engine.map(Value::from)),
                ("profile", profile.map(Value::from)),
                ("prompt", prompt.map(Value::from)),
                ("timeout_seconds", timeout.map(Value::from)),
            ];
            for (key, value) in optional {
                if let Some(value) = value {
                    body.insert(key.into(), value);
                }
            }
            if !vars.is_empty() {
                body.insert("prompt_vars".into(), Value::Object(parse_vars(&vars)?));
            }
            if !attach.is_empty() {
                let files = attach
                    .iter()
                    .map(|spec| attachment(spec))
                    .collect::<anyhow::Result<_>>()?;
                body.insert("files".into(), Value::Array(files));
            }
            if dry_run {
                body.insert("dry_run".into(), json!(true));
            }
            let accepted = api
                .call(Method::POST, "/jobs", Some(Value::Object(body)))
                .await?;
            let job_id = accepted["job_id"]
                .as_str()
                .context("no job id in the answer")?
                .to_owned();
            if !(wait || follow) {
                print_value(json, &accepted, || println!("{job_id}"));
                return Ok(ExitCode::SUCCESS);
            }
            if follow {
                stream_logs(&api, &job_id, true, json).await?;
            }
            let job = wait_for(&api, &job_id, !follow && !json).await?;
            print_value(json, &job, || print_job(&job));
            Ok(outcome(&job))
        }
        Command::Artifacts { job_id, output } => {
            artifacts::run(&api, &job_id, output.as_deref(), json).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Compare { group_id, wait } => {
            artifacts::compare(&api, &group_id, wait, json).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Diff { job_id } => {
            artifacts::diff(&api, &job_id).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs { job_id, follow } => {
            stream_logs(&api, &job_id, follow, json).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Get { job_id } => {
            let job = api
                .call(Method::GET, &format!("/jobs/{job_id}"), None)
                .await?;
            print_value(json, &job, || print_job(&job));
            Ok(ExitCode::SUCCESS)
        }
        Command::Ls {
            status,
            agent_id,
            engine,
            limit,
        } => {
            let mut query = vec![format!("limit={limit}")];
            for (key, value) in [
                ("status", status),
                ("agent_id", agent_id),
                ("engine", engine),
            ] {
                if let Some(value) = value {
                    query.push(format!("{key}={value}"));
                }
            }
            let list = api
                .call(Method::GET, &format!("/jobs?{}", query.join("&")), None)
                .await?;
            print_value(json, &list, || {
                println!(
                    "{:<52} {:<10} {:<12} {:<8} CREATED",
                    "JOB", "STATUS", "ENGINE", "ATTEMPT"
                );
                for job in list["jobs"].as_array().into_iter().flatten() {
                    println!(
                        "{:<52} {:<10} {:<12} {:<8} {}",
                        text(&job["job_id"]),
                        text(&job["status"]),
                        text(&job["engine"]),
                        job["attempt"],
                        text(&job["created_at"])
                    );
                }
                println!(
                    "{} of {} shown",
                    list["jobs"].as_array().map_or(0, Vec::len),
                    list["total"]
                );
            });
            Ok(ExitCode::SUCCESS)
        }
        Command::Cancel { job_id } => {
            let answer = api
                .call(Method::DELETE, &format!("/jobs/{job_id}"), None)
                .await?;
            print_value(json, &answer, || println!("{job_id} cancelled"));
            Ok(ExitCode::SUCCESS)
        }
        Command::Prefetch { image, labels } => {
            let mut wanted = serde_json::Map::new();
            for label in labels {
                let Some((key, value)) = label.split_once('=') else {
                    anyhow::bail!("--label {label:?} is not key=value");
                };
                wanted.insert(key.to_owned(), value.into());
            }
            let body = serde_json::json!({"image": image, "labels": wanted});
            let answer = api
                .call(Method::POST, "/images/prefetch", Some(body))
                .await?;
            print_value(json, &answer, || {
                let nodes = answer["nodes"].as_array().map_or(0, Vec::len);
                println!("{image}: {nodes} node(s) asked to pull it");
            });
            Ok(ExitCode::SUCCESS)
        }
        Command::Nodes => {
            let nodes = api.call(Method::GET, "/nodes", None).await?;
            print_value(json, &nodes, || {
                for node in nodes["nodes"].as_array().into_iter().flatten() {
                    println!(
                        "{}  slots {}/{}  warm {}  hits/misses {}/{}  host {}",
                        text(&node["node_id"]),
                        node["slots_busy"],
                        node["slots_total"],
                        node["warm"],
                        node["pool_hits"],
                        node["pool_misses"],
                        text(&node["host"])
                    );
                }
            });
            Ok(ExitCode::SUCCESS)
        }
        Command::Profiles => {
            let profiles = api.call(Method::GET, "/profiles", None).await?;
            print_value(json, &profiles, || {
                for profile in profiles["profiles"].as_array().into_iter().flatten() {
                    let vars: Vec<String> = profile["prompt_vars"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(name, spec)| {
                            let required = if spec["required"] == true { "*" } else { "" };
                            format!("{name}{required}:{}", text(&spec["type"]))
                        })
                        .collect();
                    println!(
                        "{:<14} {}  [{}]",
                        text(&profile["name"]),
                        text(&profile["description"]),
                        vars.join(", ")
                    );
                }
            });
            Ok(ExitCode::SUCCESS)
        }
        Command::Engines => {
            let engines = api.call(Method::GET, "/engines", None).await?;
            print_value(json, &engines, || {
                for engine in engines["engines"].as_array().into_iter().flatten() {
                    let available = if engine["available"] == true {
                        "available"
                    } else {
                        "unavailable"
                    };
                    println!(
                        "{:<12} {:<14} {}",
                        text(&engine["id"]),
                        available,
                        text(&engine["description"])
                    );
                }
            });
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `name=value` pairs; values that parse as JSON keep their type (`n=3` is a number).
/// One `--attach PATH[:DEST]` as an entry of the job's `files`.
fn attachment(spec: &str) -> anyhow::Result<Value> {
    use base64::Engine as _;
    let (local, dest) = match spec.split_once(':') {
        Some((local, dest)) => (PathBuf::from(local), dest.to_owned()),
        None => {
            let local = PathBuf::from(spec);
            let name = local
                .file_name()
                .with_context(|| format!("--attach {spec}: no file name"))?
                .to_string_lossy()
                .into_owned();
            (local, name)
        }
    };
    let content =
        std::fs::read(&local).with_context(|| format!("cannot read {}", local.display()))?;
    let executable = {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(&local)?.permissions().mode() & 0o111 != 0
    };
    Ok(json!({
        "path": dest,
        "content": base64::engine::general_purpose::STANDARD.encode(content),
        "encoding": "base64",
        "executable": executable,
    }))
}

fn parse_vars(vars: &[String]) -> anyhow::Result<Map<String, Value>> {
    let mut map = Map::new();
    for var in vars {
        let Some((name, value)) = var.split_once('=') else {
            bail!("--var {var:?}: expected NAME=VALUE");
        };
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::from(value));
        map.insert(name.to_owned(), value);
    }
    Ok(map)
}

/// Waits for the job to end (in one-hour slices), showing elapsed time on a terminal.
async fn wait_for(api: &Api, job_id: &str, show_progress: bool) -> anyhow::Result<Value> {
    let started = Instant::now();
    let progress = (show_progress && std::io::stderr().is_terminal()).then(|| {
        tokio::spawn(async move {
            const FRAMES: [char; 4] = ['|', '/', '-', '\\'];
            let mut tick = 0usize;
            loop {
                eprint!(
                    "\r{} waiting for the job… {:.0?}",
                    FRAMES[tick % 4],
                    started.elapsed()
                );
                tick += 1;
                tokio::time::sleep(std::time::Duration::from_millis(120)).await;
            }
        })
    });
    let result = loop {
        let response = api
            .request(Method::GET, &format!("/jobs/{job_id}/wait?timeout=3600"))
            .send()
            .await?;
        if response.status() == StatusCode::REQUEST_TIMEOUT {
            continue;
        }
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            break Err(anyhow::anyhow!(
                "{}: {}",
                status.as_u16(),
                body["error"]["message"].as_str().unwrap_or("wait failed")
            ));
        }
        break Ok(body);
    };
    if let Some(progress) = progress {
        progress.abort();
        eprint!("\r\x1b[2K");
    }
    result
}

/// Prints the job's output from the start; with `follow`, until the job ends.
async fn stream_logs(api: &Api, job_id: &str, follow: bool, json: bool) -> anyhow::Result<()> {
    let mut response = api
        .request(Method::GET, &format!("/jobs/{job_id}/logs?follow={follow}"))
        .send()
        .await
        .with_context(|| format!("cannot reach {}", api.base))?;
    if !response.status().is_success() {
        let body: Value = response.json().await.unwrap_or(Value::Null);
        bail!(
            "{}",
            body["error"]["message"]
                .as_str()
                .unwrap_or("cannot read the job's output")
        );
    }
    let mut buffer = String::new();
    let mut event = String::new();
    while let Some(chunk) = response.chunk().await? {
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(newline) = buffer.find('\n') {
            let line: String = buffer.drain(..=newline).collect();
            let line = line.trim_end_matches(['\r', '\n']);
            if let Some(name) = line.strip_prefix("event:") {
                event = name.trim().to_owned();
            } else if let Some(data) = line.strip_prefix("data:") {
                let data: Value = serde_json::from_str(data.trim()).unwrap_or(Value::Null);
                if json {
                    println!("{}", json!({ "event": event, "data": data }));
                } else if event == "log" {
                    let text = data["data"].as_str().unwrap_or("");
                    match data["stream"].as_str() {
                        Some("stderr") => eprint!("{text}"),
                        Some("system") => eprintln!("# {text}"),
                        _ => print!("{text}"),
                    }
                }
                if event == "end" {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

fn outcome(job: &Value) -> ExitCode {
    match job["status"].as_str() {
        Some("completed") => ExitCode::SUCCESS,
        Some("cancelled") => ExitCode::from(3),
        _ => ExitCode::from(1),
    }
}

fn print_value(json: bool, value: &Value, human: impl FnOnce()) {
    if json {
        println!("{value}");
    } else {
        human();
    }
}

fn print_job(job: &Value) {
    println!(
        "{}  {}  engine {}  attempt {}",
        text(&job["job_id"]),
        text(&job["status"]),
        text(&job["engine"]),
        job["attempt"]
    );
    if let Some(error) = job["error"].as_str() {
        println!("error: {error}");
    }
    if let Some(result) = job["result"]["text"].as_str() {
        println!("{}", result.trim_end());
    }
}

fn text(value: &Value) -> String {
    value
        .as_str()
        .map_or_else(|| value.to_string(), str::to_owned)
}
