//! A node cut off from NATS: its job keeps running, and everything the job produced reaches
//! NATS once it is back, from the node's durable outbox, even across a node crash.

use std::time::Duration;

use flotilla_proto::LogStream;
use flotilla_testkit::{Fleet, containers_for_job, wait_until};
use serde_json::json;

use crate::{LogReader, js_context, reliability::running_on, stdout_of, submit, wait};

const SCRIPT: &str = "echo one; sleep 1; echo two; sleep 1; echo three";

/// Starts the job, reads its first line, cuts the node off and waits until the job has ended
/// inside Docker (its container is gone) while NATS is still unreachable.
async fn run_through_an_outage(fleet: &Fleet) -> String {
    let js = js_context(fleet).await;
    let job_id = submit(
        fleet,
        json!({ "agent_id": "outage", "engine": "shell", "prompt": SCRIPT }),
    )
    .await;
    running_on(fleet, &job_id).await;
    let mut logs = LogReader::open(&js, &job_id).await;
    while !logs.next().await.data.starts_with(b"one") {}
    fleet.proxies[0].cut();
    wait_until(
        Duration::from_secs(30),
        "the job to end while the node is cut off",
        || async { containers_for_job(&job_id).ok().filter(|c| c.is_empty()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    job_id
}

/// Every line once, in order, one end marker, one attempt.
async fn assert_delivered_once(fleet: &Fleet, job_id: &str) {
    let job = wait(fleet, job_id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["attempt"], 1, "the job must not have moved: {job}");
    assert_eq!(job["result"]["text"], "one\ntwo\nthree\n");
    let js = js_context(fleet).await;
    let chunks = LogReader::open(&js, job_id).await.until_end().await;
    assert_eq!(stdout_of(&chunks), "one\ntwo\nthree\n", "{chunks:?}");
    let seqs: Vec<u64> = chunks.iter().map(|c| c.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "out of order or duplicated: {seqs:?}"
    );
    assert_eq!(chunks.iter().filter(|c| c.end.is_some()).count(), 1);
    assert!(
        chunks
            .iter()
            .all(|c| c.attempt == 1 && (c.stream != LogStream::Stdout || !c.data.is_empty()))
    );
}

#[tokio::test]
async fn a_node_cut_off_from_nats_delivers_everything_when_it_is_back() {
    // Long heartbeats: the outage must not look like a dead node here.
    let fleet = Fleet::builder()
        .proxied_nodes()
        .heartbeat_ms(5000)
        .start()
        .await
        .unwrap();
    let job_id = run_through_an_outage(&fleet).await;
    fleet.proxies[0].heal();
    assert_delivered_once(&fleet, &job_id).await;
    let log = fleet.nodes[0].log();
    assert!(log.contains("outcome kept in the outbox"), "{log}");
    assert!(log.contains("outcome relayed from the outbox"), "{log}");
    fleet.assert_no_containers_left().await.unwrap();
}

#[tokio::test]
async fn the_outbox_survives_a_node_crash_during_the_outage() {
    let mut fleet = Fleet::builder()
        .proxied_nodes()
        .heartbeat_ms(5000)
        .start()
        .await
        .unwrap();
    let job_id = run_through_an_outage(&fleet).await;
    wait_until(
        Duration::from_secs(10),
        "the outcome to be kept in the outbox",
        || async {
            fleet.nodes[0]
                .log()
                .contains("outcome kept in the outbox")
                .then_some(())
        },
    )
    .await
    .unwrap();
    fleet.nodes[0].signal("KILL");
    fleet.proxies[0].heal();
    fleet.restart_node(0).unwrap();
    assert_delivered_once(&fleet, &job_id).await;
    fleet.assert_no_containers_left().await.unwrap();
}
