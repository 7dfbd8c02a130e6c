//! `GET /jobs/{id}/logs`: server-sent events, replayed then followed live.

use std::time::{Duration, Instant};

use flotilla_testkit::Fleet;
use reqwest::Method;
use serde_json::Value;

use crate::{shell, submit};

/// Reads SSE events (name, data, arrival time) until `end` or the stream closes.
async fn read_events(fleet: &Fleet, path: &str) -> Vec<(String, Value, Instant)> {
    let response = open_events(fleet, path).await;
    read_events_until(response, |name, _| name == "end").await
}

/// Starts an SSE request: once this returns, the server is sending.
async fn open_events(fleet: &Fleet, path: &str) -> reqwest::Response {
    let response = fleet.request(Method::GET, path).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    response
}

/// Reads SSE events (name, data, arrival time) until `last` holds for one (included) or the
/// stream closes.
async fn read_events_until(
    mut response: reqwest::Response,
    last: impl Fn(&str, &Value) -> bool,
) -> Vec<(String, Value, Instant)> {
    let mut events = Vec::new();
    let mut buffer = String::new();
    let mut name = String::new();
    loop {
        let chunk = tokio::time::timeout(Duration::from_secs(30), response.chunk())
            .await
            .expect("an SSE chunk within 30 s")
            .unwrap();
        let Some(chunk) = chunk else { return events };
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(newline) = buffer.find('\n') {
            let line: String = buffer.drain(..=newline).collect();
            let line = line.trim_end();
            if let Some(event) = line.strip_prefix("event:") {
                name = event.trim().to_owned();
            } else if let Some(data) = line.strip_prefix("data:") {
                let data: Value = serde_json::from_str(data.trim()).unwrap();
                let done = last(&name, &data);
                events.push((name.clone(), data, Instant::now()));
                if done {
                    return events;
                }
            }
        }
    }
}

#[tokio::test]
async fn logs_stream_live_then_end_and_replay_later() {
    let fleet = Fleet::builder().start().await.unwrap();
    let job_id = submit(
        &fleet,
        shell("for i in 1 2 3 4 5; do echo out $i; sleep 0.3; done; echo oops >&2"),
    )
    .await;
    let live = read_events(&fleet, &format!("/jobs/{job_id}/logs")).await;
    let (last, end, ended_at) = live.last().unwrap().clone();
    assert_eq!(last, "end");
    assert_eq!(end["status"], "completed");
    assert_eq!(end["exit_code"], 0);
    let stdout: Vec<&Value> = live
        .iter()
        .filter(|(n, d, _)| n == "log" && d["stream"] == "stdout")
        .map(|(_, d, _)| d)
        .collect();
    let text: String = stdout.iter().map(|d| d["data"].as_str().unwrap()).collect();
    assert_eq!(text, "out 1\nout 2\nout 3\nout 4\nout 5\n");
    assert!(
        live.iter()
            .any(|(n, d, _)| n == "log" && d["stream"] == "stderr" && d["data"] == "oops\n")
    );
    // Followed live: the first line arrived well before the end (the job takes ~1.5 s).
    let first_at = live
        .iter()
        .find(|(n, d, _)| n == "log" && d["stream"] == "stdout")
        .unwrap()
        .2;
    assert!(
        ended_at.duration_since(first_at) > Duration::from_millis(900),
        "not streamed live"
    );

    // Replay after the fact, without following: same output, then end.
    let replay = read_events(&fleet, &format!("/jobs/{job_id}/logs?follow=false")).await;
    let replayed: String = replay
        .iter()
        .filter(|(n, d, _)| n == "log" && d["stream"] == "stdout")
        .map(|(_, d, _)| d["data"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(replayed, text);
    assert_eq!(replay.last().unwrap().1["status"], "completed");
}

#[tokio::test]
async fn logs_of_a_job_that_never_ran_end_at_once() {
    let fleet = Fleet::builder().nodes(0).start().await.unwrap();
    let job_id = submit(&fleet, shell("echo never")).await;
    let response = fleet
        .request(Method::DELETE, &format!("/jobs/{job_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let events = read_events(&fleet, &format!("/jobs/{job_id}/logs")).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].0, "end");
    assert_eq!(events[0].1["status"], "cancelled");
    let missing = fleet
        .request(Method::GET, "/jobs/nope/logs")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn the_log_stream_is_bounded_in_total_as_configured() {
    let fleet = Fleet::builder()
        .env("FLOTILLA_LOGS_MAX_MB", "64")
        .start()
        .await
        .unwrap();
    let js = crate::js_context(&fleet).await;
    let mut stream = js
        .get_stream(flotilla_proto::names::STREAM_LOGS)
        .await
        .unwrap();
    let config = stream.info().await.unwrap().config.clone();
    assert_eq!(config.max_bytes, 64 << 20);
    assert_eq!(config.max_age, Duration::from_secs(24 * 3600));
    assert_eq!(
        config.discard,
        async_nats::jetstream::stream::DiscardPolicy::Old,
        "a full log stream drops the oldest output, never new output"
    );
}

#[tokio::test]
async fn job_events_push_each_change_of_the_matching_jobs() {
    let fleet = Fleet::builder().start().await.unwrap();
    let events = open_events(&fleet, "/jobs/events?agent_id=watched").await;
    let mut other = shell("echo not watched");
    other["agent_id"] = "someone-else".into();
    submit(&fleet, other).await;
    let mut watched = shell("echo watched");
    watched["agent_id"] = "watched".into();
    let job_id = submit(&fleet, watched).await;

    let events = read_events_until(events, |name, data| {
        name == "job" && data["job_id"] == job_id.as_str() && data["status"] == "completed"
    })
    .await;
    let mut statuses: Vec<&str> = Vec::new();
    for (name, data, _) in &events {
        assert_eq!(name, "job", "{data}");
        assert_eq!(
            data["job_id"],
            job_id.as_str(),
            "only the watched agent's job: {data}"
        );
        let status = data["status"].as_str().unwrap();
        if statuses.last() != Some(&status) {
            statuses.push(status);
        }
    }
    assert_eq!(statuses, ["pending", "running", "completed"]);
    let (_, last, _) = events.last().unwrap();
    assert_eq!(
        last["result"]["text"], "watched\n",
        "the whole record: {last}"
    );
    assert!(
        last.get("ack_subject").is_none(),
        "as GET /jobs/{{id}} shows it"
    );

    // A bad filter is refused before the stream starts.
    let response = fleet
        .request(Method::GET, "/jobs/events?status=done")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
}
