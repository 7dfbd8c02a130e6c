//! `flotilla artifacts`, `flotilla diff` and `flotilla compare`: what jobs left behind.

use std::path::{Component, Path};

use anyhow::{Context, bail};
use reqwest::Method;
use tokio::io::AsyncWriteExt as _;

use crate::Api;

/// Lists the job's artifacts, or downloads them all under `output`.
pub(crate) async fn run(
    api: &Api,
    job_id: &str,
    output: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    let listed = api
        .call(Method::GET, &format!("/jobs/{job_id}/artifacts"), None)
        .await?;
    let artifacts = listed["artifacts"].as_array().cloned().unwrap_or_default();
    let Some(dir) = output else {
        if json {
            println!("{}", serde_json::to_string_pretty(&listed)?);
        } else {
            for a in &artifacts {
                println!(
                    "{:>12}  {}  {}",
                    a["size"],
                    a["sha256"].as_str().unwrap_or_default(),
                    a["path"].as_str().unwrap_or_default()
                );
            }
        }
        return Ok(());
    };
    for artifact in &artifacts {
        let path = artifact["path"].as_str().unwrap_or_default();
        let target = dir.join(safe_relative(path)?);
        download(api, &format!("/jobs/{job_id}/artifacts/{path}"), &target).await?;
        if !json {
            println!("{}", target.display());
        }
    }
    Ok(())
}

/// Prints the patch of the job's change.
pub(crate) async fn diff(api: &Api, job_id: &str) -> anyhow::Result<()> {
    let response = api
        .request(Method::GET, &format!("/jobs/{job_id}/diff"))
        .send()
        .await
        .context("cannot reach the API")?;
    if !response.status().is_success() {
        bail!("{}: no diff for job {job_id}", response.status().as_u16());
    }
    let patch = response.bytes().await?;
    tokio::io::stdout().write_all(&patch).await?;
    Ok(())
}

/// An artifact path from the server, refused if it would leave the output directory.
fn safe_relative(path: &str) -> anyhow::Result<&Path> {
    let relative = Path::new(path);
    if path.is_empty()
        || !relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
    {
        bail!("refusing artifact path {path:?}: not a plain relative path");
    }
    Ok(relative)
}

async fn download(api: &Api, url_path: &str, target: &Path) -> anyhow::Result<()> {
    let mut response = api
        .request(Method::GET, url_path)
        .send()
        .await
        .context("cannot reach the API")?;
    if !response.status().is_success() {
        bail!("{}: cannot download {url_path}", response.status().as_u16());
    }
    if let Some(parent) = target.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    let mut file = tokio::fs::File::create(target)
        .await
        .with_context(|| format!("cannot write {}", target.display()))?;
    while let Some(chunk) = response.chunk().await? {
        file.write_all(&chunk).await?;
    }
    file.flush().await?;
    Ok(())
}

/// Prints a group's variants side by side; with `wait`, once every one has ended.
pub(crate) async fn compare(
    api: &Api,
    group_id: &str,
    wait: bool,
    json: bool,
) -> anyhow::Result<()> {
    let path = format!("/groups/{group_id}");
    let mut group = api.call(Method::GET, &path, None).await?;
    while wait && !all_ended(&group) {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        group = api.call(Method::GET, &path, None).await?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&group)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<10} {:>9} {:>9} {:>13} {:>6} {:>16}  result",
        "variant", "status", "seconds", "cost $", "tokens in/out", "turns", "files +/-"
    );
    for v in group["variants"].as_array().into_iter().flatten() {
        let seconds = v["duration_ms"]
            .as_f64()
            .map_or("-".to_owned(), |ms| format!("{:.1}", ms / 1000.0));
        let cost = v["cost_usd"]
            .as_f64()
            .map_or("-".to_owned(), |c| format!("{c:.4}"));
        let tokens = format!("{}/{}", v["input_tokens"], v["output_tokens"]).replace("null", "-");
        let diff = &v["diff_stat"];
        let files = if diff.is_null() {
            "-".to_owned()
        } else {
            format!(
                "{} +{} -{}",
                diff["files"], diff["insertions"], diff["deletions"]
            )
        };
        let head: String = v["text_head"]
            .as_str()
            .unwrap_or_default()
            .lines()
            .next()
            .unwrap_or_default()
            .chars()
            .take(60)
            .collect();
        println!(
            "{:<20} {:<10} {:>9} {:>9} {:>13} {:>6} {:>16}  {head}",
            v["name"].as_str().unwrap_or_default(),
            v["status"].as_str().unwrap_or_default(),
            seconds,
            cost,
            tokens,
            v["turns"]
                .as_u64()
                .map_or("-".to_owned(), |t| t.to_string()),
            files,
        );
    }
    Ok(())
}

fn all_ended(group: &serde_json::Value) -> bool {
    group["variants"].as_array().is_some_and(|variants| {
        variants.iter().all(|v| {
            matches!(
                v["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            )
        })
    })
}
