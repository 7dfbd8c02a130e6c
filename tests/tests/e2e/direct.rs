//! Jobs published straight to NATS, without HTTP.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use flotilla_proto::{SubmitRequest, names};
use flotilla_testkit::{Fleet, wait_until};
use futures::StreamExt;
use serde_json::json;

use crate::{LogReader, get_job, js_context, shell, stdout_of, submit, until_visible, wait};

const SCRIPT: &str = "for i in 1 2 3; do echo tick $i; sleep 0.2; done";

async fn publish(js: &jetstream::Context, payload: Bytes, json: bool) {
    let mut headers = async_nats::HeaderMap::new();
    if json {
        headers.insert(names::HEADER_CONTENT_TYPE, names::CONTENT_TYPE_JSON);
    }
    js.publish_with_headers(names::SUBJECT_SUBMIT, headers, payload)
        .await
        .unwrap()
        .await
        .expect("submission stored by JetStream");
}

/// Publishes, then measures how long until `GET /jobs/{id}` knows the job.
async fn submit_directly_and_run(fleet: &Fleet, job_id: &str, payload: Bytes, json: bool) {
    let js = js_context(fleet).await;
    publish(&js, payload, json).await;
    let acked = Instant::now();
    wait_until(
        Duration::from_secs(5),
        "the direct job to be visible over HTTP",
        || async { (get_job(fleet, job_id).await.0 == 200).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    println!(
        "direct submission visible over HTTP {:?} after its publish ack",
        acked.elapsed()
    );

    let mut logs = LogReader::open(&js, job_id).await;
    let chunks = logs.until_end().await;
    assert_eq!(stdout_of(&chunks), "tick 1\ntick 2\ntick 3\n");
    let job = wait(fleet, job_id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["result"]["text"], "tick 1\ntick 2\ntick 3\n");
    assert_eq!(job["agent_id"], "direct");
}

#[tokio::test]
async fn messagepack_submission_runs_like_any_other() {
    let fleet = Fleet::builder().start().await.unwrap();
    let request = SubmitRequest {
        job_id: Some("direct-msgpack-1".to_owned()),
        agent_id: Some("direct".to_owned()),
        engine: Some("shell".to_owned()),
        prompt: Some(SCRIPT.to_owned()),
        ..SubmitRequest::default()
    };
    let payload = flotilla_proto::encode(&request).unwrap();
    submit_directly_and_run(&fleet, "direct-msgpack-1", payload, false).await;
    fleet.assert_no_containers_left().await.unwrap();
}

#[tokio::test]
async fn json_submission_runs_like_any_other() {
    let fleet = Fleet::builder().start().await.unwrap();
    let body = json!({
        "job_id": "direct-json-1",
        "agent_id": "direct",
        "engine": "shell",
        "prompt": SCRIPT,
    });
    submit_directly_and_run(&fleet, "direct-json-1", Bytes::from(body.to_string()), true).await;
    fleet.assert_no_containers_left().await.unwrap();
}

#[tokio::test]
async fn bad_submissions_are_rejected_with_a_reason_and_do_not_stall_the_queue() {
    let fleet = Fleet::builder().start().await.unwrap();
    let js = js_context(&fleet).await;

    // Not decodable at all: kept on the rejected stream with its reason.
    publish(
        &js,
        Bytes::from_static(b"\xc1 definitely not msgpack"),
        false,
    )
    .await;
    // Valid JSON, invalid job (unknown engine), with a usable id: recorded as failed.
    let invalid =
        json!({ "job_id": "direct-bad-1", "agent_id": "direct", "engine": "nope", "prompt": "x" });
    publish(&js, Bytes::from(invalid.to_string()), true).await;
    // Unknown field: rejected too.
    let unknown =
        json!({ "job_id": "direct-bad-2", "agent_id": "direct", "engine": "shell", "colour": 1 });
    publish(&js, Bytes::from(unknown.to_string()), true).await;

    // A good job behind them still runs.
    let good = submit(&fleet, shell("echo still flowing")).await;
    assert_eq!(wait(&fleet, &good).await["status"], "completed");

    until_visible(&fleet, "direct-bad-1").await;
    let job = wait(&fleet, "direct-bad-1").await;
    assert_eq!(job["status"], "failed");
    let error = job["error"].as_str().unwrap();
    assert!(error.starts_with("rejected: engine:"), "{error}");

    let rejected = js.get_stream(names::STREAM_REJECTED).await.unwrap();
    let consumer = rejected
        .create_consumer(consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut reasons = Vec::new();
    while reasons.len() < 3 {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("three rejected messages")
            .unwrap()
            .unwrap();
        let reason = message
            .headers
            .as_ref()
            .and_then(|h| h.get(names::HEADER_REJECT_REASON));
        reasons.push((
            message.subject.to_string(),
            reason.map(|r| r.to_string()).unwrap_or_default(),
        ));
    }
    // The intake admits submissions concurrently: the rejections come in any order.
    let has = |subject: &str, reason: &dyn Fn(&str) -> bool| {
        reasons.iter().any(|(s, r)| s == subject && reason(r))
    };
    assert!(
        has("flotilla.rejected._unknown", &|r| r
            .starts_with("undecodable message")),
        "{reasons:?}"
    );
    assert!(
        has("flotilla.rejected.direct-bad-1", &|r| r.contains("engine")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|(_, r)| r.contains("unknown field `colour`")),
        "{reasons:?}"
    );
    fleet.assert_no_containers_left().await.unwrap();
}
