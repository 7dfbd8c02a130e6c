//! Heterogeneous fleets: jobs that need node labels, an image or an engine binary run only
//! where those are, say what they wait for meanwhile, and priorities order the starts.

use std::time::Duration;

use flotilla_testkit::{Fleet, wait_until};
use reqwest::Method;
use serde_json::{Value, json};

use crate::{get_job, shell, submit, wait};

const WITHIN: Duration = Duration::from_secs(60);

/// Waits until the pending job's record says it waits for `reason`.
async fn wait_for_note(fleet: &Fleet, job_id: &str, reason: &str) -> Value {
    wait_until(
        WITHIN,
        &format!("{job_id} to wait for {reason:?}"),
        || async {
            let (_, job) = get_job(fleet, job_id).await;
            (job["waiting_for"] == reason).then_some(job)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()))
}

#[tokio::test]
async fn a_job_requiring_labels_waits_for_a_node_that_offers_them() {
    let mut fleet = Fleet::builder().start().await.unwrap();
    let body = json!({"agent_id": "e2e", "engine": "shell", "prompt": "echo on-gpu",
                      "requires": {"gpu": "a100"}});
    let job_id = submit(&fleet, body).await;
    let job = wait_for_note(&fleet, &job_id, "no live node offers gpu=a100").await;
    assert_eq!(job["status"], "pending", "{job:#}");
    assert_eq!(job["requires"], json!({"gpu": "a100"}));
    // Plain jobs still run on the plain node meanwhile.
    let plain = submit(&fleet, shell("echo plain")).await;
    assert_eq!(wait(&fleet, &plain).await["status"], "completed");

    let gpu = fleet
        .add_node(&[("FLOTILLA_NODE_LABELS", "gpu=a100,region=eu")])
        .unwrap();
    let job = wait(&fleet, &job_id).await;
    assert_eq!(job["status"], "completed", "{job:#}");
    assert_eq!(job["node_id"], fleet.node_ids[gpu].as_str());
    assert_eq!(
        job["waiting_for"],
        Value::Null,
        "cleared once a node took it"
    );

    // One that no node will ever offer can be cancelled as usual.
    let body = json!({"agent_id": "e2e", "engine": "shell", "prompt": "true",
                      "requires": {"gpu": "h100"}});
    let never = submit(&fleet, body).await;
    wait_for_note(&fleet, &never, "no live node offers gpu=h100").await;
    let response = fleet
        .request(Method::DELETE, &format!("/jobs/{never}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(wait(&fleet, &never).await["status"], "cancelled");
    fleet.assert_no_containers_left().await.unwrap();
}

#[tokio::test]
async fn a_job_runtime_runs_only_where_docker_has_it() {
    let fleet = Fleet::builder().start().await.unwrap();
    let body = json!({"agent_id": "e2e", "engine": "shell", "prompt": "echo runc",
                      "runtime": "runc"});
    let job = wait(&fleet, &submit(&fleet, body).await).await;
    assert_eq!(job["status"], "completed", "{job:#}");
    assert_eq!(job["runtime"], "runc");
    let body = json!({"agent_id": "e2e", "engine": "shell", "prompt": "true",
                      "runtime": "no-such-runtime"});
    let job_id = submit(&fleet, body).await;
    wait_for_note(
        &fleet,
        &job_id,
        "no live node offers runtime no-such-runtime",
    )
    .await;
    fleet.assert_no_containers_left().await.unwrap();
}

#[tokio::test]
async fn a_node_whose_image_lacks_an_engine_s_binary_does_not_take_its_jobs() {
    let fleet = Fleet::builder().start().await.unwrap();
    let ghost = "[engine]\nname = \"Ghost\"\ndescription = \"test\"\n\n[command]\n\
                 binary = \"no-such-cli\"\nprompt_flag = \"\"\n\n[output]\nformat = \"text\"\n\
                 parser = \"text\"\n";
    let response = fleet
        .request(Method::PUT, "/configs/engine/ghost")
        .json(&json!({ "content": ghost }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = json!({"agent_id": "e2e", "engine": "ghost", "prompt": "hi"});
    let job_id = submit(&fleet, body).await;
    let job = wait_for_note(&fleet, &job_id, "no live node offers engine ghost").await;
    assert_eq!(job["attempt"], 0, "no node took it: {job:#}");
}

#[tokio::test]
async fn a_job_image_must_be_allowed_and_runs_only_where_it_is() {
    let tag = "flotilla-worker:e2e-routing-alt";
    build_marked_image(tag);
    let fleet = Fleet::builder()
        .env("FLOTILLA_ALLOWED_IMAGES", "flotilla-worker:*")
        .node_env("FLOTILLA_POOL_IMAGES", &format!("{tag}=1"))
        .start()
        .await
        .unwrap();
    // The node keeps one container of the job image warm, and says it holds the image.
    wait_until(WITHIN, "a warm container of the job image", || async {
        let nodes: Value = fleet
            .request(Method::GET, "/nodes")
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let node = &nodes["nodes"][0];
        let holds = node["images"].as_array()?.iter().any(|i| i == tag);
        (holds && node["warm"][tag] == 1).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    let refused = fleet
        .request(Method::POST, "/jobs")
        .json(
            &json!({"agent_id": "e2e", "engine": "shell", "prompt": "true",
                      "image": "busybox:latest"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 422);
    let body: Value = refused.json().await.unwrap();
    let message = body.to_string();
    assert!(
        message.contains("busybox:latest is not allowed"),
        "{message}"
    );
    assert!(message.contains("flotilla-worker:*"), "{message}");

    let body = json!({"agent_id": "e2e", "engine": "shell", "prompt": "cat /routing-marker",
                      "image": tag});
    let job_id = submit(&fleet, body).await;
    let job = wait(&fleet, &job_id).await;
    assert_eq!(job["status"], "completed", "{job:#}");
    assert_eq!(job["image"], tag);
    assert!(
        job.to_string().contains("alt image"),
        "ran in the job's image: {job:#}"
    );

    let missing = "flotilla-worker:e2e-nowhere";
    let body = json!({"agent_id": "e2e", "engine": "shell", "prompt": "true", "image": missing});
    let job_id = submit(&fleet, body).await;
    wait_for_note(
        &fleet,
        &job_id,
        &format!("no live node offers image {missing}"),
    )
    .await;
    fleet.assert_no_containers_left().await.unwrap();
    let _ = std::process::Command::new("docker")
        .args(["rmi", tag])
        .output();
}

/// `tag`: the worker image with a marker file, built locally (no registry).
fn build_marked_image(tag: &str) {
    use std::io::Write;
    let mut build = std::process::Command::new("docker")
        .args(["build", "-q", "-t", tag, "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("docker build: install and start Docker Engine");
    // The worker image runs as nobody; the marker is written as root, then the user restored.
    let dockerfile = "FROM flotilla-worker:latest\nUSER root\n\
                      RUN echo 'alt image' > /routing-marker\nUSER 65534:65534\n";
    build
        .stdin
        .take()
        .unwrap()
        .write_all(dockerfile.as_bytes())
        .unwrap();
    assert!(build.wait().unwrap().success(), "docker build {tag}");
}

type At = chrono::DateTime<chrono::Utc>;

fn time(value: &Value) -> At {
    value.as_str().unwrap().parse().unwrap()
}

/// The jobs in the order they started, with when, from their records.
async fn started_at(fleet: &Fleet, ids: &[String]) -> Vec<(String, At)> {
    let mut starts = Vec::new();
    for id in ids {
        let job = wait(fleet, id).await;
        assert_eq!(job["status"], "completed", "{job:#}");
        starts.push((time(&job["attempts"][0]["started_at"]), id.clone()));
    }
    starts.sort();
    starts.into_iter().map(|(at, id)| (id, at)).collect()
}

/// Submits `n` jobs of `priority` at once; returns their ids.
async fn submit_many(fleet: &Fleet, n: usize, priority: &str) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let body = json!({"agent_id": "e2e", "engine": "shell", "prompt": "true",
                          "priority": priority});
        ids.push(submit(fleet, body).await);
    }
    ids
}

#[tokio::test]
async fn a_high_job_starts_within_a_few_starts_of_200_queued_normal_ones() {
    let fleet = Fleet::builder().slots(1).start().await.unwrap();
    let normal = submit_many(&fleet, 200, "normal").await;
    let high = submit_many(&fleet, 1, "high").await;
    let mut all = normal.clone();
    all.extend(high.iter().cloned());
    let order = started_at(&fleet, &all).await;
    let high_at = order.iter().position(|(id, _)| *id == high[0]).unwrap();
    // Those that started before it but after it was queued: at most a few.
    let record = wait(&fleet, &high[0]).await;
    let queued_at = time(&record["created_at"]);
    let after_queued = order[..high_at]
        .iter()
        .filter(|(_, at)| *at > queued_at)
        .count();
    assert!(
        after_queued <= 3,
        "{after_queued} normal jobs started between the high job's submission and its start \
         (it started {high_at}th of {})",
        order.len()
    );
    assert!(
        high_at < 150,
        "the high job started {high_at}th: it did not jump the queue"
    );
    assert_eq!(record["priority"], "high");
}

#[tokio::test]
async fn low_jobs_still_start_under_a_steady_normal_load() {
    let fleet = Fleet::builder().slots(1).start().await.unwrap();
    let low = submit_many(&fleet, 5, "low").await;
    let normal = submit_many(&fleet, 150, "normal").await;
    let mut all = low.clone();
    all.extend(normal.iter().cloned());
    let order = started_at(&fleet, &all).await;
    let last_low = order.iter().rposition(|(id, _)| low.contains(id)).unwrap();
    // Weighted turns give low jobs one start in ten while normal ones wait: all five are done
    // long before the normal queue is.
    assert!(
        last_low < 100,
        "the last low job started {last_low}th of {}: low jobs starved",
        order.len()
    );
}

/// A registry on loopback (Debian's `docker-registry`), removed on drop with its storage.
struct Registry {
    process: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = flotilla_testkit::free_port();
        let config = format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let binary = ["/usr/bin/docker-registry", "/usr/sbin/docker-registry"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("docker-registry not found: apt-get install docker-registry");
        let process = std::process::Command::new(binary)
            .args(["serve", config_path.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("docker-registry serve");
        let url = format!("http://127.0.0.1:{port}/v2/");
        wait_until(WITHIN, "the registry to answer", || async {
            reqwest::get(&url).await.ok().map(|_| ())
        })
        .await
        .unwrap();
        Registry {
            process,
            port,
            _dir: dir,
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn docker(args: &[&str]) {
    let output = std::process::Command::new("docker")
        .args(args)
        .output()
        .expect("docker: install and start Docker Engine");
    assert!(
        output.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn a_prefetched_image_is_pulled_by_the_nodes_asked_and_runs_jobs() {
    let registry = Registry::start().await;
    let image = format!("127.0.0.1:{}/flotilla-prefetch:e2e", registry.port);
    docker(&["tag", "flotilla-worker:latest", &image]);
    docker(&["push", &image]);
    docker(&["rmi", &image]);
    let fleet = Fleet::builder()
        .env("FLOTILLA_ALLOWED_IMAGES", "127.0.0.1:*")
        .start()
        .await
        .unwrap();
    let prefetch = |body: Value| {
        let fleet = &fleet;
        async move {
            let response = fleet
                .request(Method::POST, "/images/prefetch")
                .json(&body)
                .send()
                .await
                .unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        }
    };
    let (status, body) = prefetch(json!({"image": "ghcr.io/evil/x:1"})).await;
    assert_eq!(status, 422, "{body}");
    assert!(body.to_string().contains("is not allowed"), "{body}");
    // A pool no node is in: nobody is asked.
    let (status, body) = prefetch(json!({"image": image, "labels": {"gpu": "a100"}})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["nodes"], json!([]));

    let (status, body) = prefetch(json!({"image": image})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["nodes"], json!([fleet.node_ids[0]]));
    wait_until(WITHIN, "the node to hold the prefetched image", || async {
        let nodes: Value = fleet
            .request(Method::GET, "/nodes")
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let images = nodes["nodes"][0]["images"].as_array()?.clone();
        images.iter().any(|i| *i == image).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    let body = json!({"agent_id": "e2e", "engine": "shell", "prompt": "echo pulled",
                      "image": image});
    let job = wait(&fleet, &submit(&fleet, body).await).await;
    assert_eq!(job["status"], "completed", "{job:#}");
    fleet.assert_no_containers_left().await.unwrap();
    let _ = std::process::Command::new("docker")
        .args(["rmi", &image])
        .output();
}
