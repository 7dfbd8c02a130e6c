//! Prometheus `/metrics` on every service, and one trace from `POST /jobs` (or a direct NATS
//! submission) to the job's outcome, exported by the real binaries over OTLP/HTTP to an
//! in-memory receiver.

use std::time::Duration;

use bytes::Bytes;
use flotilla_proto::names;
use flotilla_testkit::{Fleet, OtlpReceiver, ReceivedSpan, Scrape, wait_until};
use serde_json::json;

use crate::{js_context, shell, submit, until_visible, wait};

/// Bytes the test script writes to stdout and stderr.
const STDOUT: &str = "hello metrics\n";
const STDERR: &str = "to stderr\n";

async fn publish_direct(fleet: &Fleet, body: serde_json::Value, trace: Option<&str>) {
    let js = js_context(fleet).await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(names::HEADER_CONTENT_TYPE, names::CONTENT_TYPE_JSON);
    if let Some(traceparent) = trace {
        headers.insert(names::HEADER_TRACEPARENT, traceparent);
    }
    js.publish_with_headers(
        names::SUBJECT_SUBMIT,
        headers,
        Bytes::from(body.to_string()),
    )
    .await
    .unwrap()
    .await
    .expect("submission stored by JetStream");
    until_visible(
        fleet,
        body["job_id"].as_str().expect("direct jobs name their id"),
    )
    .await;
}

/// Scrapes `url` until `ready` holds for the scrape, which it returns.
async fn scrape_until(
    fleet: &Fleet,
    url: &str,
    what: &str,
    ready: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let last = std::sync::Mutex::new(None);
    let scraped = wait_until(Duration::from_secs(15), what, || async {
        let scrape = Scrape::get(&fleet.http, url).await?;
        let done = ready(&scrape);
        *last.lock().unwrap() = Some(scrape.text.clone());
        done.then_some(scrape)
    })
    .await;
    scraped.unwrap_or_else(|e| {
        let last = last.lock().unwrap().take().unwrap_or_default();
        panic!("{e}\nlast scrape of {url}:\n{last}\n{}", fleet.logs())
    })
}

#[tokio::test]
async fn every_service_serves_metrics_about_the_jobs_it_handled() {
    let fleet = Fleet::builder().start().await.unwrap();
    let script = format!(
        "printf '{}'; printf '{}' >&2",
        STDOUT.replace('\n', "\\n"),
        STDERR.replace('\n', "\\n")
    );
    for _ in 0..2 {
        let id = submit(&fleet, shell(&script)).await;
        assert_eq!(wait(&fleet, &id).await["status"], "completed");
    }
    // One direct submission admitted, one rejected (unknown engine).
    publish_direct(
        &fleet,
        json!({ "job_id": "metrics-direct-1", "agent_id": "direct", "engine": "shell", "prompt": script }),
        None,
    )
    .await;
    publish_direct(
        &fleet,
        json!({ "job_id": "metrics-direct-2", "agent_id": "direct", "engine": "nope", "prompt": "x" }),
        None,
    )
    .await;
    assert_eq!(
        wait(&fleet, "metrics-direct-1").await["status"],
        "completed"
    );
    assert_eq!(wait(&fleet, "metrics-direct-2").await["status"], "failed");
    let ran = 3.0;

    // The node: every job it ran, in each instrument.
    let node = scrape_until(
        &fleet,
        &fleet.node_metrics[0],
        "the node to count three finished jobs, and none running",
        // A job counts as finished once its outcome is recorded, and leaves the running set
        // a moment later (after its ack).
        |s| {
            s.value(
                "flotilla_node_jobs_finished_total",
                &[("outcome", "completed")],
            ) == Some(ran)
                && s.value("flotilla_node_jobs_running", &[]) == Some(0.0)
        },
    )
    .await;
    let value = |name: &str, labels: &[(&str, &str)]| {
        node.value(name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{}", node.text))
    };
    assert_eq!(value("flotilla_node_jobs_received_total", &[]), ran);
    assert_eq!(value("flotilla_node_jobs_started_total", &[]), ran);
    assert_eq!(value("flotilla_node_jobs_redelivered_total", &[]), 0.0);
    assert_eq!(value("flotilla_dispatch_latency_seconds_count", &[]), ran);
    assert_eq!(
        value(
            "flotilla_dispatch_latency_seconds_bucket",
            &[("le", "+Inf")]
        ),
        ran
    );
    let latency = value("flotilla_dispatch_latency_seconds_sum", &[]);
    assert!(
        latency > 0.0 && latency < 30.0 * ran,
        "dispatch latency sum {latency}"
    );
    // Every start is a warm-pool hit or a miss, and the pool counters agree.
    assert_eq!(value("flotilla_container_start_seconds_count", &[]), ran);
    let hits = node
        .value("flotilla_container_start_seconds_count", &[("pool", "hit")])
        .unwrap_or(0.0);
    assert_eq!(value("flotilla_node_pool_hits_total", &[]), hits);
    assert_eq!(value("flotilla_node_pool_misses_total", &[]), ran - hits);
    assert!(
        hits >= 1.0,
        "a warm pool of 2 serves some of 3 sequential jobs:\n{}",
        node.text
    );
    assert!(value("flotilla_node_pool_refill_seconds_count", &[]) >= 2.0);
    assert_eq!(
        value("flotilla_node_log_bytes_total", &[("stream", "stdout")]),
        ran * STDOUT.len() as f64
    );
    assert_eq!(
        value("flotilla_node_log_bytes_total", &[("stream", "stderr")]),
        ran * STDERR.len() as f64
    );
    assert!(value("flotilla_node_log_bytes_total", &[("stream", "system")]) > 0.0);
    assert_eq!(value("flotilla_node_slots", &[]), 4.0);
    assert_eq!(value("flotilla_node_jobs_running", &[]), 0.0);
    assert_eq!(value("flotilla_node_outbox_entries", &[]), 0.0);
    assert!(node.has_type("flotilla_dispatch_latency_seconds", "histogram"));

    // The dispatcher: leadership and its intake's decisions.
    let dispatcher_metrics = format!("{}/metrics", fleet.dispatcher_url);
    let dispatcher = scrape_until(
        &fleet,
        &dispatcher_metrics,
        "the dispatcher to lead and count its submissions",
        |s| {
            s.value("flotilla_dispatcher_leader", &[]) == Some(1.0)
                && s.value(
                    "flotilla_dispatcher_submissions_total",
                    &[("result", "rejected")],
                ) == Some(1.0)
        },
    )
    .await;
    assert_eq!(
        dispatcher.value(
            "flotilla_dispatcher_submissions_total",
            &[("result", "accepted")]
        ),
        Some(1.0),
        "{}",
        dispatcher.text
    );
    for counter in [
        "flotilla_dispatcher_lost_nodes_total",
        "flotilla_dispatcher_requeued_jobs_total",
        "flotilla_dispatcher_dead_letters_total",
        "flotilla_dispatcher_queue_timeouts_total",
        "flotilla_dispatcher_retention_deleted_total",
    ] {
        assert_eq!(
            dispatcher.value(counter, &[]),
            Some(0.0),
            "{counter}:\n{}",
            dispatcher.text
        );
    }

    // The gateway: the fleet's state, and its HTTP requests by route template.
    let gateway = scrape_until(
        &fleet,
        &format!("{}/metrics", fleet.api),
        "the gateway to list every job",
        |s| s.value("flotilla_jobs", &[("status", "completed")]) == Some(ran),
    )
    .await;
    let value = |name: &str, labels: &[(&str, &str)]| {
        gateway
            .value(name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{}", gateway.text))
    };
    assert_eq!(value("flotilla_jobs", &[("status", "failed")]), 1.0);
    assert_eq!(value("flotilla_queue_depth", &[]), 0.0);
    assert_eq!(value("flotilla_queue_oldest_age_seconds", &[]), 0.0);
    assert_eq!(value("flotilla_jobs_ack_pending", &[]), 0.0);
    assert_eq!(value("flotilla_nodes_live", &[]), 1.0);
    let post_jobs = [("method", "POST"), ("route", "/jobs")];
    assert_eq!(
        value(
            "flotilla_http_requests_total",
            &[post_jobs[0], post_jobs[1], ("status", "2xx")]
        ),
        2.0
    );
    assert_eq!(
        value("flotilla_http_request_duration_seconds_count", &post_jobs),
        2.0
    );
    // Path parameters never become label values: the template does.
    assert_eq!(
        value(
            "flotilla_http_requests_total",
            &[("method", "GET"), ("route", "/jobs/{job_id}/wait")]
        ),
        4.0
    );
    assert!(
        !gateway.text.contains("metrics-direct-1"),
        "job ids must not be label values:\n{}",
        gateway.text
    );
}

/// Spans of `trace_id` that `service` exported under `name`.
fn find<'a>(
    spans: &'a [ReceivedSpan],
    service: &str,
    name: &str,
    trace_id: &str,
) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.service == service && s.name == name && s.trace_id == trace_id)
        .collect()
}

fn one<'a>(
    spans: &'a [ReceivedSpan],
    service: &str,
    name: &str,
    trace_id: &str,
) -> &'a ReceivedSpan {
    let found = find(spans, service, name, trace_id);
    assert_eq!(
        found.len(),
        1,
        "one {service} span {name:?} in trace {trace_id}: {spans:#?}"
    );
    found[0]
}

#[tokio::test]
async fn one_trace_runs_from_post_jobs_to_the_job_outcome() {
    let receiver = OtlpReceiver::start().await.unwrap();
    let fleet = Fleet::builder().otlp(&receiver.url).start().await.unwrap();

    // Over HTTP: POST /jobs (api-gateway) -> job (agent-node) and its steps.
    let job_id = submit(&fleet, shell("echo \"$TRACEPARENT\"")).await;
    let record = wait(&fleet, &job_id).await;
    assert_eq!(record["status"], "completed", "{record}");
    // Each service exports in its own batches: wait for both ends of the trace.
    let spans = wait_until(Duration::from_secs(15), "the job's spans", || async {
        let spans = receiver.spans();
        let job = spans.iter().find(|s| {
            s.service == "agent-node"
                && s.name == "job"
                && s.attributes.get("job_id") == Some(&job_id)
                && s.attributes.contains_key("status")
        })?;
        let post = find(&spans, "api-gateway", "POST /jobs", &job.trace_id);
        let recorded = find(&spans, "agent-node", "record outcome", &job.trace_id);
        (!post.is_empty() && !recorded.is_empty()).then_some(spans.clone())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:#?}\n{}", receiver.spans(), fleet.logs()));
    let job = spans
        .iter()
        .find(|s| s.name == "job" && s.attributes.get("job_id") == Some(&job_id))
        .unwrap();
    let trace = job.trace_id.as_str();
    let post = one(&spans, "api-gateway", "POST /jobs", trace);
    assert_eq!(post.parent_span_id, "", "POST /jobs starts the trace");
    assert_eq!(
        post.attributes.get("http.route").map(String::as_str),
        Some("/jobs")
    );
    assert_eq!(
        job.parent_span_id, post.span_id,
        "the job span is a child of POST /jobs"
    );
    assert_eq!(
        job.attributes.get("status").map(String::as_str),
        Some("completed")
    );
    // The container carries the trace on (OpenTelemetry's TRACEPARENT variable).
    assert_eq!(
        record["result"]["text"],
        format!("00-{trace}-{}-01\n", job.span_id),
        "the job's processes see its span as their parent"
    );
    // Claim, container start, run and the recorded outcome, inside the job span.
    for step in [
        "claim",
        "start container",
        "run container",
        "record outcome",
    ] {
        let step_span = one(&spans, "agent-node", step, trace);
        assert_eq!(
            step_span.parent_span_id, job.span_id,
            "{step} is part of the job"
        );
        assert!(
            step_span.start_ns >= job.start_ns && step_span.end_ns <= job.end_ns,
            "{step} runs within the job span"
        );
    }
    // The trace ends with the job's outcome, after the HTTP request answered.
    let recorded = one(&spans, "agent-node", "record outcome", trace);
    assert!(job.end_ns >= recorded.end_ns && job.end_ns > post.end_ns);
    assert!(
        spans
            .iter()
            .filter(|s| s.trace_id == trace)
            .all(|s| s.service == "api-gateway" || s.service == "agent-node"),
        "nothing else joins an HTTP job's trace"
    );

    // Straight over NATS: the publisher's traceparent -> intake (dispatcher) -> job (node).
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    publish_direct(
        &fleet,
        json!({ "job_id": "traced-direct-1", "agent_id": "direct", "engine": "shell", "prompt": "echo direct" }),
        Some(&format!("00-{caller_trace}-{caller_span}-01")),
    )
    .await;
    assert_eq!(wait(&fleet, "traced-direct-1").await["status"], "completed");
    let spans = wait_until(
        Duration::from_secs(15),
        "the direct job's spans",
        || async {
            let spans = receiver.spans();
            let job_done = find(&spans, "agent-node", "job", caller_trace)
                .iter()
                .any(|s| s.attributes.contains_key("status"));
            let intake = !find(&spans, "dispatcher", "intake", caller_trace).is_empty();
            (job_done && intake).then_some(spans)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:#?}\n{}", receiver.spans(), fleet.logs()));
    let intake = one(&spans, "dispatcher", "intake", caller_trace);
    assert_eq!(
        intake.parent_span_id, caller_span,
        "intake continues the publisher's trace"
    );
    let job = one(&spans, "agent-node", "job", caller_trace);
    assert_eq!(
        job.parent_span_id, intake.span_id,
        "the job span is a child of the intake"
    );
}

#[tokio::test]
async fn a_job_s_llm_calls_are_spans_of_its_trace() {
    let receiver = OtlpReceiver::start().await.unwrap();
    let mock = flotilla_testkit::MockLlm::start().await.unwrap();
    let fleet = Fleet::builder()
        .otlp(&receiver.url)
        .llm(&mock.url())
        .start()
        .await
        .unwrap();
    let job_id = submit(
        &fleet,
        json!({"agent_id": "traced", "engine": "claude-code", "model": "claude-sonnet-4-5",
               "prompt": "two calls LLM_CALLS=2"}),
    )
    .await;
    assert_eq!(wait(&fleet, &job_id).await["status"], "completed");
    let spans = wait_until(Duration::from_secs(15), "the gateway's spans", || async {
        let spans = receiver.spans();
        let job = spans.iter().find(|s| {
            s.service == "agent-node"
                && s.name == "job"
                && s.attributes.get("job_id") == Some(&job_id)
        })?;
        let calls = find(&spans, "llm-gateway", "llm request", &job.trace_id);
        (calls.len() == 2).then(|| spans.clone())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:#?}\n{}", receiver.spans(), fleet.logs()));
    let job = spans
        .iter()
        .find(|s| s.name == "job" && s.attributes.get("job_id") == Some(&job_id))
        .unwrap();
    for call in find(&spans, "llm-gateway", "llm request", &job.trace_id) {
        assert_eq!(call.attributes.get("job_id"), Some(&job_id));
        assert_eq!(
            call.attributes.get("status").map(String::as_str),
            Some("200")
        );
        assert_eq!(
            call.attributes.get("input_tokens").map(String::as_str),
            Some("100")
        );
        assert!(
            call.start_ns >= job.start_ns && call.end_ns <= job.end_ns,
            "the call happens within the job"
        );
    }
}
