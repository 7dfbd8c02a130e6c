//! The raw Docker baselines: `docker exec` into a running container, and a whole container
//! run (create + start + wait + remove).

use std::time::Instant;

use bollard::{
    Docker,
    container::LogOutput,
    exec::{CreateExecOptions, StartExecResults},
    models::{ContainerCreateBody, HostConfig},
    query_parameters::{CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder},
};
use futures::StreamExt;
use tokio::io::AsyncWriteExt as _;

use crate::stats::ms;

const IMAGE: &str = "flotilla-worker:latest";

/// Exec `echo` into one running container, `samples` times after one warm-up.
pub async fn exec(docker: &Docker, samples: usize) -> anyhow::Result<Vec<f64>> {
    let id = create(docker, vec!["sleep", "3600"]).await?;
    docker.start_container(&id, None).await?;
    let mut figures = Vec::new();
    for i in 0..=samples {
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
            figures.push(ms(started.elapsed()));
        }
    }
    remove(docker, &id).await;
    Ok(figures)
}

/// The floor under a warm job's first byte: a line written to an attached, running container's
/// stdin until `cmd` (run per line by the container's shell) answers on stdout.
pub async fn attach_echo(docker: &Docker, samples: usize, cmd: &str) -> anyhow::Result<Vec<f64>> {
    let script = format!("while read line; do {cmd}; done");
    let id = create_with(docker, vec!["/bin/sh", "-c", &script], true).await?;
    let options = bollard::query_parameters::AttachContainerOptionsBuilder::default()
        .stdin(true)
        .stdout(true)
        .stream(true)
        .build();
    let mut attached = docker.attach_container(&id, Some(options)).await?;
    docker.start_container(&id, None).await?;
    let mut figures = Vec::new();
    for i in 0..=samples {
        let started = Instant::now();
        attached.input.write_all(b"hi\n").await?;
        attached.input.flush().await?;
        while let Some(item) = attached.output.next().await {
            if let LogOutput::StdOut { .. } = item? {
                break;
            }
        }
        if i > 0 {
            figures.push(ms(started.elapsed()));
        }
    }
    remove(docker, &id).await;
    Ok(figures)
}

/// Create + start + wait + remove an `echo` container, `count` times in a row.
pub async fn run(docker: &Docker, count: usize) -> anyhow::Result<Vec<f64>> {
    let mut figures = Vec::new();
    for _ in 0..count {
        let started = Instant::now();
        let id = create(docker, vec!["echo", "hi"]).await?;
        docker.start_container(&id, None).await?;
        let _ = docker.wait_container(&id, None).next().await;
        remove(docker, &id).await;
        figures.push(ms(started.elapsed()));
    }
    Ok(figures)
}

/// Containers run per second with `parallel` runners of `each` containers.
pub async fn churn(docker: &Docker, parallel: usize, each: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let workers: Vec<_> = (0..parallel)
        .map(|_| {
            let docker = docker.clone();
            tokio::spawn(async move { run(&docker, each).await })
        })
        .collect();
    for worker in workers {
        worker.await??;
    }
    Ok((parallel * each) as f64 / started.elapsed().as_secs_f64())
}

async fn create(docker: &Docker, cmd: Vec<&str>) -> anyhow::Result<String> {
    create_with(docker, cmd, false).await
}

async fn create_with(docker: &Docker, cmd: Vec<&str>, stdin: bool) -> anyhow::Result<String> {
    let body = ContainerCreateBody {
        image: Some(IMAGE.to_owned()),
        cmd: Some(cmd.into_iter().map(str::to_owned).collect()),
        open_stdin: Some(stdin),
        attach_stdin: Some(stdin),
        attach_stdout: Some(stdin),
        labels: Some([("flotilla.bench".to_owned(), "true".to_owned())].into()),
        host_config: Some(HostConfig {
            network_mode: Some("none".to_owned()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let name = format!("flotilla-bench-{}", uuid::Uuid::new_v4().simple());
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
