//! Fleet-wide lifecycle: backpressure, lost nodes, dead letters, queue timeouts, retention.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer;
use flotilla_proto::names;
use flotilla_testkit::{Fleet, wait_until};
use futures::StreamExt;
use reqwest::Method;
use serde_json::Value;

use crate::{get_job, js_context, shell, submit, wait};

#[tokio::test]
async fn a_full_queue_answers_503_and_accepts_nothing() {
    let fleet = Fleet::builder()
        .nodes(0)
        .env("FLOTILLA_QUEUE_MAX", "3")
        .start()
        .await
        .unwrap();
    for _ in 0..3 {
        submit(&fleet, shell("echo queued")).await;
    }
    let response = fleet
        .request(Method::POST, "/jobs")
        .json(&shell("echo one too many"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "queue_unavailable");
    let list: Value = crate::list_jobs(&fleet).await;
    assert_eq!(
        list["total"], 3,
        "the refused job must not be half-accepted: {list}"
    );
}

/// Waits until `job_id` is running on one of the fleet's nodes; returns that node's index.
pub async fn running_on(fleet: &Fleet, job_id: &str) -> usize {
    let node_id = wait_until(Duration::from_secs(20), "the job to be running", || async {
        let (_, job) = get_job(fleet, job_id).await;
        (job["status"] == "running").then(|| job["node_id"].as_str().unwrap().to_owned())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    fleet.node_ids.iter().position(|id| *id == node_id).unwrap()
}

#[tokio::test]
async fn a_killed_node_s_job_is_requeued_within_seconds_and_completes_elsewhere() {
    let mut fleet = Fleet::builder().nodes(2).start().await.unwrap();
    let job_id = submit(&fleet, shell("echo start; sleep 3; echo finished")).await;
    let victim = running_on(&fleet, &job_id).await;
    fleet.nodes[victim].signal("KILL");
    let killed = Instant::now();

    let requeued = wait_until(
        Duration::from_secs(5),
        "the job to start again elsewhere",
        || async {
            let (_, job) = get_job(&fleet, &job_id).await;
            (job["attempt"] == 2 && job["status"] == "running").then_some(job)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    println!("node killed → job running again in {:?}", killed.elapsed());
    assert_ne!(requeued["node_id"], fleet.node_ids[victim].as_str());

    let job = wait(&fleet, &job_id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["result"]["text"], "start\nfinished\n");
    let attempts = job["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{job}");
    assert_eq!(attempts[0]["outcome"], "node lost");
    assert_eq!(attempts[0]["node_id"], fleet.node_ids[victim].as_str());
    assert_eq!(attempts[1]["outcome"], "completed");

    // The restarted node removes the container its previous run left behind.
    fleet.restart_node(victim).unwrap();
    fleet.assert_no_containers_left().await.unwrap();
}

#[tokio::test]
async fn a_job_out_of_deliveries_is_failed_and_dead_lettered() {
    // Two nodes: JetStream notices the exhausted message when the other node next pulls.
    let mut fleet = Fleet::builder()
        .nodes(2)
        .env("FLOTILLA_MAX_DELIVER", "1")
        .start()
        .await
        .unwrap();
    let job_id = submit(&fleet, shell("sleep 30")).await;
    let victim = running_on(&fleet, &job_id).await;
    fleet.nodes[victim].signal("KILL");

    let job = wait(&fleet, &job_id).await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(error.starts_with("gave up after 1 deliveries"), "{error}");

    let js = js_context(&fleet).await;
    let dead = js.get_stream(names::STREAM_DEAD).await.unwrap();
    let mut messages = dead
        .create_consumer(consumer::pull::OrderedConfig::default())
        .await
        .unwrap()
        .messages()
        .await
        .unwrap();
    let letter = tokio::time::timeout(Duration::from_secs(10), messages.next())
        .await
        .expect("a dead letter")
        .unwrap()
        .unwrap();
    assert_eq!(letter.subject.as_str(), names::dead_subject(&job_id));
    let reason = letter
        .headers
        .as_ref()
        .unwrap()
        .get(names::HEADER_REJECT_REASON)
        .unwrap();
    assert!(reason.as_str().starts_with("gave up"), "{reason}");
    // And it is out of the work queue for good.
    let queue = js
        .get_stream(names::STREAM_JOBS)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    assert_eq!(queue, 0);

    fleet.restart_node(victim).unwrap();
    fleet.assert_no_containers_left().await.unwrap();
}

/// The advisory JetStream publishes when a job runs out of deliveries waits in its stream while
/// no dispatcher runs, and the next dispatcher dead-letters the job.
#[tokio::test]
async fn a_job_out_of_deliveries_while_no_dispatcher_runs_is_dead_lettered_later() {
    // No dispatcher hands the lost job back: its message runs out when its ack wait ends.
    let mut fleet = Fleet::builder()
        .nodes(2)
        .env("FLOTILLA_MAX_DELIVER", "1")
        .env("FLOTILLA_ACK_WAIT_SECS", "2")
        .start()
        .await
        .unwrap();
    let job_id = submit(&fleet, shell("sleep 30")).await;
    let victim = running_on(&fleet, &job_id).await;
    fleet.dispatcher.signal("KILL");
    fleet.nodes[victim].signal("KILL");

    let js = js_context(&fleet).await;
    wait_until(Duration::from_secs(60), "the advisory to be kept", || {
        let js = js.clone();
        async move {
            let mut stream = js.get_stream(names::STREAM_ADVISORIES).await.ok()?;
            let kept = stream.info().await.ok()?.state.messages;
            (kept == 1).then_some(())
        }
    })
    .await
    .unwrap();
    assert_eq!(get_job(&fleet, &job_id).await.1["status"], "running");

    fleet.restart_dispatcher().unwrap();
    let job = wait(&fleet, &job_id).await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(error.starts_with("gave up after 1 deliveries"), "{error}");
    wait_until(Duration::from_secs(10), "the advisory to be acked", || {
        let js = js.clone();
        async move {
            let mut stream = js.get_stream(names::STREAM_ADVISORIES).await.ok()?;
            (stream.info().await.ok()?.state.messages == 0).then_some(())
        }
    })
    .await
    .unwrap();
    fleet.restart_node(victim).unwrap();
    fleet.assert_no_containers_left().await.unwrap();
}

/// A node that vanished while no dispatcher ran, its heartbeat gone too, still has its
/// running job found and requeued by the next dispatcher (not only after the job's ack wait,
/// which this test makes too long to matter).
#[tokio::test]
async fn a_job_whose_node_vanished_while_no_dispatcher_ran_is_requeued() {
    let mut fleet = Fleet::builder()
        .nodes(2)
        .env("FLOTILLA_ACK_WAIT_SECS", "300")
        .start()
        .await
        .unwrap();
    let job_id = submit(&fleet, shell("echo start; sleep 2; echo finished")).await;
    let victim = running_on(&fleet, &job_id).await;
    fleet.dispatcher.signal("KILL");
    fleet.nodes[victim].signal("KILL");
    let js = js_context(&fleet).await;
    let nodes = js.get_key_value(names::BUCKET_NODES).await.unwrap();
    nodes
        .delete(names::node_key(&fleet.node_ids[victim]))
        .await
        .unwrap();

    fleet.restart_dispatcher().unwrap();
    let job = wait(&fleet, &job_id).await;
    assert_eq!(job["status"], "completed", "{job}");
    let attempts = job["attempts"].as_array().unwrap();
    assert_eq!(attempts[0]["outcome"], "node lost", "{job}");
    assert_ne!(job["node_id"], fleet.node_ids[victim].as_str());
    fleet.restart_node(victim).unwrap();
    fleet.assert_no_containers_left().await.unwrap();
}

/// Node ids are unique: a node whose id is live elsewhere refuses to start, saying why, and
/// the live one carries on.
#[tokio::test]
async fn a_node_whose_id_is_live_elsewhere_refuses_to_start() {
    let mut fleet = Fleet::builder().nodes(1).start().await.unwrap();
    let mut twin = fleet.spawn_twin(0).unwrap();
    let code = wait_until(Duration::from_secs(30), "the twin to exit", || {
        std::future::ready(twin.try_exit_code())
    })
    .await
    .unwrap();
    assert_ne!(code, Some(0), "{}", twin.log());
    let log = twin.log();
    assert!(log.contains("is in use"), "{log}");
    assert!(log.contains("FLOTILLA_NODE_ID"), "{log}");
    let job_id = submit(&fleet, shell("echo still here")).await;
    assert_eq!(wait(&fleet, &job_id).await["status"], "completed");
}

#[tokio::test]
async fn a_job_queued_too_long_fails() {
    let fleet = Fleet::builder()
        .nodes(0)
        .dispatcher_env("FLOTILLA_MAX_QUEUED_SECS", "1")
        .dispatcher_env("FLOTILLA_SWEEP_SECS", "1")
        .start()
        .await
        .unwrap();
    let job_id = submit(&fleet, shell("echo late")).await;
    let job = wait(&fleet, &job_id).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["error"], "queued for more than 1s without starting");
}

#[tokio::test]
async fn finished_jobs_beyond_the_retained_count_are_deleted() {
    let fleet = Fleet::builder()
        .dispatcher_env("FLOTILLA_MAX_RETAINED_JOBS", "2")
        .dispatcher_env("FLOTILLA_SWEEP_SECS", "1")
        .start()
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..4 {
        let id = submit(&fleet, shell(&format!("echo {i}"))).await;
        wait(&fleet, &id).await;
        ids.push(id);
    }
    wait_until(
        Duration::from_secs(10),
        "the two oldest jobs to be deleted",
        || async {
            let (a, _) = get_job(&fleet, &ids[0]).await;
            let (b, _) = get_job(&fleet, &ids[1]).await;
            (a == 404 && b == 404).then_some(())
        },
    )
    .await
    .unwrap();
    for id in &ids[2..] {
        assert_eq!(get_job(&fleet, id).await.0, 200);
    }
    let list: Value = crate::list_jobs(&fleet).await;
    assert_eq!(list["total"], 2, "{list}");
    fleet.assert_no_containers_left().await.unwrap();
}
