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
        .start()
        .await
        .unwrap();
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
