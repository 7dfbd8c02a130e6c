//! Jobs submitted over HTTP: live logs, results, failures, timeouts, cancellation.

use std::time::{Duration, Instant};

use base64::Engine as _;
use flotilla_proto::{JobStatus, LogStream};
use flotilla_testkit::{Fleet, containers_for_job, wait_until};
use reqwest::Method;
use serde_json::{Value, json};

use crate::{LogReader, get_job, js_context, shell, stdout_of, submit, wait};

const TEN_LINES: &str = "for i in 1 2 3 4 5 6 7 8 9 10; do echo line $i; sleep 0.2; done";

#[tokio::test]
async fn http_job_streams_logs_while_it_runs_then_completes() {
    let fleet = Fleet::builder().start().await.unwrap();
    let js = js_context(&fleet).await;
    let job_id = submit(&fleet, shell(TEN_LINES)).await;
    let mut logs = LogReader::open(&js, &job_id).await;

    // The first line arrives while the job is still running.
    let first_line = loop {
        let chunk = logs.next().await;
        if chunk.stream == LogStream::Stdout {
            break chunk;
        }
    };
    assert_eq!(String::from_utf8_lossy(&first_line.data), "line 1\n");
    let (_, job) = get_job(&fleet, &job_id).await;
    assert_eq!(
        job["status"], "running",
        "first line should arrive before the end: {job}"
    );

    let rest = logs.until_end().await;
    let mut all = vec![first_line];
    all.extend(rest);
    let expected: String = (1..=10).map(|i| format!("line {i}\n")).collect();
    assert_eq!(stdout_of(&all), expected, "all lines, in order");
    // Sequence numbers are contiguous from 0 within the attempt.
    let seqs: Vec<u64> = all.iter().map(|c| c.seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    let end = all.last().unwrap().end.clone().unwrap();
    assert_eq!(end.status, JobStatus::Completed);
    assert_eq!(end.exit_code, Some(0));

    let job = wait(&fleet, &job_id).await;
    assert_eq!(job["status"], "completed");
    assert_eq!(job["exit_code"], 0);
    assert_eq!(job["error"], serde_json::Value::Null);
    assert_eq!(job["result"]["text"], expected);
    assert_eq!(job["result"]["exit_code"], 0);
    assert_eq!(job["attempt"], 1);
    assert_eq!(job["node_id"], fleet.node_ids[0].as_str());
    assert!(job["started_at"].is_string() && job["finished_at"].is_string());
    fleet.assert_no_containers_left().await.unwrap();
}

#[tokio::test]
async fn non_zero_exit_fails_with_its_code() {
    let fleet = Fleet::builder().start().await.unwrap();
    let job_id = submit(&fleet, shell("echo about to fail >&2; exit 3")).await;
    let job = wait(&fleet, &job_id).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["exit_code"], 3);
    assert_eq!(job["error"], "exited with code 3");
    assert!(
        job["result"]["logs_tail"]
            .as_str()
            .unwrap()
            .contains("about to fail")
    );
    fleet.assert_no_containers_left().await.unwrap();
}

#[tokio::test]
async fn job_over_its_timeout_fails_and_its_container_goes() {
    let fleet = Fleet::builder().start().await.unwrap();
    let mut body = shell("echo sleeping; sleep 60");
    body["timeout_seconds"] = json!(1);
    let job_id = submit(&fleet, body).await;
    let job = wait(&fleet, &job_id).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["error"], "timed out after 1s");
    assert_eq!(job["result"]["text"], "sleeping\n");
    // Removal runs just after the outcome is recorded.
    wait_until(
        Duration::from_secs(10),
        "the timed-out job's container to be removed",
        || async { containers_for_job(&job_id).ok().filter(|c| c.is_empty()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", containers_for_job(&job_id)));
    fleet.assert_no_containers_left().await.unwrap();
}

#[tokio::test]
async fn cancel_stops_a_running_job_and_a_second_cancel_conflicts() {
    let fleet = Fleet::builder().start().await.unwrap();
    let js = js_context(&fleet).await;
    let job_id = submit(&fleet, shell("echo started; sleep 60")).await;
    let mut logs = LogReader::open(&js, &job_id).await;
    while stdout_of(&[logs.next().await]).is_empty() {}

    let started = Instant::now();
    let response = fleet
        .request(Method::DELETE, &format!("/jobs/{job_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body, json!({ "job_id": job_id, "status": "cancelled" }));

    let (_, job) = get_job(&fleet, &job_id).await;
    assert_eq!(job["status"], "cancelled");
    // A deadline, not a timing goal (the figure is printed): under the suite's load, Docker
    // itself can take seconds to stop and remove a container.
    wait_until(
        Duration::from_secs(30),
        "the cancelled job's container to be removed",
        || async { containers_for_job(&job_id).ok().filter(|c| c.is_empty()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    println!("cancel → container gone in {:?}", started.elapsed());

    // The node attaches the output produced so far, and the log stream ends as cancelled.
    let end = logs.until_end().await.pop().unwrap().end.unwrap();
    assert_eq!(end.status, JobStatus::Cancelled);
    let job = wait(&fleet, &job_id).await;
    assert_eq!(job["status"], "cancelled");
    wait_until(
        Duration::from_secs(10),
        "the output so far on the cancelled job",
        || async {
            let (_, job) = get_job(&fleet, &job_id).await;
            (job["result"]["text"] == "started\n").then_some(())
        },
    )
    .await
    .unwrap();

    let again = fleet
        .request(Method::DELETE, &format!("/jobs/{job_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    let body: serde_json::Value = again.json().await.unwrap();
    assert_eq!(body["error"]["code"], "conflict");
    assert_eq!(body["error"]["message"], "job already cancelled");
    fleet.assert_no_containers_left().await.unwrap();
}

#[tokio::test]
async fn cancelling_a_pending_job_means_it_never_runs() {
    // No nodes: the job stays queued.
    let fleet = Fleet::builder().nodes(0).start().await.unwrap();
    let job_id = submit(&fleet, shell("echo should never run")).await;
    let response = fleet
        .request(Method::DELETE, &format!("/jobs/{job_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let job = wait(&fleet, &job_id).await;
    assert_eq!(job["status"], "cancelled");
    assert_eq!(job["attempt"], 0);
    assert_eq!(job["started_at"], serde_json::Value::Null);
}

#[tokio::test]
async fn dry_run_of_an_agent_engine_records_the_command_line() {
    let fleet = Fleet::builder().start().await.unwrap();
    let job_id = submit(
        &fleet,
        json!({
            "agent_id": "e2e",
            "engine": "claude-code",
            "prompt": "Say 'hello'",
            "model": "claude-sonnet-4-6",
            "max_turns": 3,
            "dry_run": true,
        }),
    )
    .await;
    let job = wait(&fleet, &job_id).await;
    assert_eq!(job["status"], "completed", "{job}");
    let result = &job["result"];
    assert_eq!(result["raw"]["dry_run"], true);
    assert_eq!(result["raw"]["engine"], "claude-code");
    assert_eq!(result["raw"]["binary"], "claude");
    let command: Vec<String> = serde_json::from_value(result["command"].clone()).unwrap();
    assert_eq!(command[0], "claude");
    assert!(command.iter().any(|a| a == "-p"), "{command:?}");
    // The prompt is the last argument, after the end of options: never read as a flag.
    assert_eq!(command[command.len() - 2..], ["--", "Say 'hello'"]);
    let turns_at = command.iter().position(|a| a == "--max-turns").unwrap();
    assert_eq!(command[turns_at + 1], "3");
    // The command really went through a container: the node saw it printed as JSON.
    let printed: serde_json::Value =
        serde_json::from_str(result["logs_tail"].as_str().unwrap().trim()).unwrap();
    assert_eq!(printed["args"], result["raw"]["args"]);
    fleet.assert_no_containers_left().await.unwrap();
}

#[tokio::test]
async fn submitted_files_are_in_the_workspace_byte_for_byte() {
    let fleet = Fleet::builder().start().await.unwrap();
    // \0, \377, a quote, a percent sign and a backslash: what a shell string cannot hold as is.
    let binary = [0u8, 0xff, b'\'', b'%', b'\\', b'\n'];
    let script = "cat notes/readme.md; od -An -tx1 data/blob.bin | tr -s ' '; ./tools/run.sh";
    let job_id = submit(
        &fleet,
        json!({
            "agent_id": "e2e", "engine": "shell", "prompt": script,
            "files": [
                {"path": "notes/readme.md", "content": "# Title\n100% done\n"},
                {"path": "data/blob.bin", "encoding": "base64",
                 "content": base64::engine::general_purpose::STANDARD.encode(binary)},
                {"path": "tools/run.sh", "content": "#!/bin/sh\necho ran\n", "executable": true},
            ],
        }),
    )
    .await;
    let job = wait(&fleet, &job_id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(
        job["result"]["text"], "# Title\n100% done\n 00 ff 27 25 5c 0a\nran\n",
        "{job}"
    );

    // A path outside the workspace is refused at submit.
    let response = fleet
        .request(Method::POST, "/jobs")
        .json(
            &json!({"agent_id": "e2e", "engine": "shell", "prompt": "true",
                      "files": [{"path": "../etc/passwd", "content": "x"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["field"], "files[0].path", "{body}");
}

#[tokio::test]
async fn a_failed_job_runs_again_as_many_times_as_it_asks() {
    let fleet = Fleet::builder().start().await.unwrap();
    let job = |retries: u32, script: &str| json!({"agent_id": "e2e", "engine": "shell", "retries": retries, "prompt": script});
    // Fails on its first two attempts (each in a new container), then succeeds.
    let flaky =
        "echo attempt $FLOTILLA_ATTEMPT of $FLOTILLA_JOB_ID; [ $FLOTILLA_ATTEMPT -ge 3 ] || exit 7";
    let id = submit(&fleet, job(2, flaky)).await;
    let record = wait(&fleet, &id).await;
    assert_eq!(record["status"], "completed", "{record}");
    assert_eq!(record["attempt"], 3, "{record}");
    assert_eq!(record["result"]["text"], format!("attempt 3 of {id}\n"));
    let outcomes: Vec<&str> = record["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        ["exited with code 7", "exited with code 7", "completed"],
        "{record}"
    );

    // Out of retries: failed with the last attempt's error.
    let id = submit(&fleet, job(1, "exit 7")).await;
    let record = wait(&fleet, &id).await;
    assert_eq!(
        (&record["status"], &record["attempt"], &record["exit_code"]),
        (&json!("failed"), &json!(2), &json!(7)),
        "{record}"
    );
    // None asked: one attempt. A timeout is not retried, retries or not.
    let id = submit(&fleet, job(0, "exit 7")).await;
    assert_eq!(wait(&fleet, &id).await["attempt"], 1);
    let mut slow = job(2, "sleep 30");
    slow["timeout_seconds"] = json!(1);
    let id = submit(&fleet, slow).await;
    let record = wait(&fleet, &id).await;
    assert_eq!(
        (&record["status"], &record["attempt"]),
        (&json!("failed"), &json!(1)),
        "{record}"
    );
    fleet.assert_no_containers_left().await.unwrap();
}
