//! The HTTP contract: validation rules, errors, auth, headers, idempotency, listing, waiting.

use flotilla_testkit::Fleet;
use reqwest::Method;
use serde_json::{Value, json};

use crate::{shell, submit};

fn base() -> Value {
    shell("echo hi")
}

fn with(field: &str, value: Value) -> Value {
    let mut body = base();
    if value.is_null() && field != "prompt" {
        body.as_object_mut().unwrap().remove(field);
    } else {
        body[field] = value;
    }
    body
}

/// Every rule of the contract's `POST /jobs` table, each with the field it must name.
fn invalid_bodies() -> Vec<(&'static str, Value, &'static str)> {
    let mut no_agent = base();
    no_agent.as_object_mut().unwrap().remove("agent_id");
    let mut no_engine = base();
    no_engine.as_object_mut().unwrap().remove("engine");
    let many_metadata: serde_json::Map<String, Value> =
        (0..33).map(|i| (format!("k{i}"), json!("v"))).collect();
    vec![
        ("agent_id missing", no_agent, "agent_id"),
        (
            "agent_id pattern",
            with("agent_id", json!("bad id!")),
            "agent_id",
        ),
        (
            "agent_id too long",
            with("agent_id", json!("a".repeat(65))),
            "agent_id",
        ),
        ("engine missing, profile names none", no_engine, "engine"),
        (
            "engine unknown",
            with("engine", json!("not-an-engine")),
            "engine",
        ),
        (
            "prompt too long",
            with("prompt", json!("x".repeat(1_000_001))),
            "prompt",
        ),
        (
            "prompt with NUL",
            with("prompt", json!("echo \u{0}")),
            "prompt",
        ),
        (
            "prompt null, template renders nothing",
            with("prompt", Value::Null),
            "prompt",
        ),
        (
            "profile unknown",
            with("profile", json!("no-such-profile")),
            "profile",
        ),
        (
            "profile unsafe",
            with("profile", json!("../etc")),
            "profile",
        ),
        (
            "prompt_vars missing required",
            json!({"agent_id": "a", "engine": "shell", "profile": "researcher", "prompt_vars": {}}),
            "prompt_vars.query",
        ),
        (
            "prompt_vars wrong type",
            json!({"agent_id": "a", "engine": "shell", "profile": "researcher", "prompt_vars": {"query": 5}}),
            "prompt_vars.query",
        ),
        (
            "prompt_vars not in enum",
            json!({"agent_id": "a", "engine": "shell", "profile": "code-review",
                   "prompt_vars": {"repo_url": "https://example.com/r.git", "focus": "vibes"}}),
            "prompt_vars.focus",
        ),
        ("model pattern", with("model", json!("bad model")), "model"),
        (
            "system_prompt too long",
            with("system_prompt", json!("s".repeat(500_001))),
            "system_prompt",
        ),
        ("max_turns zero", with("max_turns", json!(0)), "max_turns"),
        (
            "max_turns above 100",
            with("max_turns", json!(101)),
            "max_turns",
        ),
        (
            "max_budget_usd zero",
            with("max_budget_usd", json!(0)),
            "max_budget_usd",
        ),
        (
            "max_budget_usd above 50",
            with("max_budget_usd", json!(50.01)),
            "max_budget_usd",
        ),
        (
            "output_format unknown",
            with("output_format", json!("yaml")),
            "output_format",
        ),
        (
            "mcp_config not an object",
            with("mcp_config", json!([1, 2])),
            "mcp_config",
        ),
        (
            "plugins unsafe",
            with("plugins", json!(["ok", "not ok"])),
            "plugins[1]",
        ),
        (
            "webhook_url scheme",
            with("webhook_url", json!("ftp://example.com/x")),
            "webhook_url",
        ),
        (
            "webhook_url loopback",
            with("webhook_url", json!("http://127.0.0.1/x")),
            "webhook_url",
        ),
        (
            "webhook_url localhost",
            with("webhook_url", json!("http://localhost/x")),
            "webhook_url",
        ),
        (
            "webhook_url private",
            with("webhook_url", json!("http://10.1.2.3/x")),
            "webhook_url",
        ),
        (
            "webhook_url metadata",
            with("webhook_url", json!("http://169.254.169.254/")),
            "webhook_url",
        ),
        (
            "webhook_url too long",
            with(
                "webhook_url",
                json!(format!("https://example.com/{}", "a".repeat(2048))),
            ),
            "webhook_url",
        ),
        (
            "timeout_seconds zero",
            with("timeout_seconds", json!(0)),
            "timeout_seconds",
        ),
        (
            "timeout_seconds above a day",
            with("timeout_seconds", json!(86_401)),
            "timeout_seconds",
        ),
        (
            "resources memory unparsable",
            with("resources", json!({"memory": "lots"})),
            "resources.memory",
        ),
        (
            "resources memory above cap",
            with("resources", json!({"memory": "64g"})),
            "resources.memory",
        ),
        (
            "resources cpus above cap",
            with("resources", json!({"cpus": 64})),
            "resources.cpus",
        ),
        (
            "resources cpus zero",
            with("resources", json!({"cpus": 0})),
            "resources.cpus",
        ),
        (
            "metadata too many keys",
            with("metadata", Value::Object(many_metadata)),
            "metadata",
        ),
        (
            "metadata value not a string",
            with("metadata", json!({"k": 1})),
            "metadata.k",
        ),
        ("unknown field", with("colour", json!("red")), "colour"),
        ("wrong type", with("dry_run", json!("yes")), "dry_run"),
        (
            "job_id is server-assigned",
            with("job_id", json!("mine")),
            "job_id",
        ),
    ]
}

#[tokio::test]
async fn every_post_jobs_rule_answers_422_naming_the_field_and_changes_nothing() {
    let fleet = Fleet::builder().nodes(0).start().await.unwrap();
    for (rule, body, field) in invalid_bodies() {
        let response = fleet
            .request(Method::POST, "/jobs")
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let error: Value = response.json().await.unwrap();
        assert_eq!(status, 422, "{rule}: {error}");
        assert_eq!(error["error"]["field"], field, "{rule}: {error}");
        assert!(
            error["error"]["code"]
                .as_str()
                .is_some_and(|c| !c.is_empty()),
            "{rule}: {error}"
        );
        assert!(
            error["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{rule}: {error}"
        );
    }
    let not_json = fleet
        .request(Method::POST, "/jobs")
        .header("content-type", "application/json")
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), 422);
    // Nothing was accepted.
    let list: Value = crate::list_jobs(&fleet).await;
    assert_eq!(list["total"], 0, "{list}");
}

/// Without an API key, a web page the user visits must not be able to use the gateway: only
/// loopback Host names, no cross-site requests, and JSON bodies that say so.
#[tokio::test]
async fn without_a_key_only_this_machine_s_own_programs_are_served() {
    let fleet = Fleet::builder().nodes(0).start().await.unwrap();
    let body = json!({"agent_id": "csrf", "engine": "shell", "prompt": "echo pwned"}).to_string();
    let post = |headers: &[(&str, &str)]| {
        let mut request = fleet.request(Method::POST, "/jobs").body(body.clone());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send()
    };
    let json = ("content-type", "application/json");
    // A form post or a `fetch` with a text body: no preflight, so the body type tells.
    for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
        let response = post(&[("content-type", content_type)]).await.unwrap();
        assert_eq!(response.status(), 415, "{content_type}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "unsupported_media_type");
    }
    let cross = post(&[json, ("origin", "https://evil.example")])
        .await
        .unwrap();
    assert_eq!(cross.status(), 403);
    let error: Value = cross.json().await.unwrap();
    assert_eq!(error["error"]["code"], "cross_site");
    let cross = post(&[json, ("sec-fetch-site", "cross-site")])
        .await
        .unwrap();
    assert_eq!(cross.status(), 403);
    // A DNS name rebound to 127.0.0.1.
    let rebound = fleet
        .request(Method::GET, "/jobs")
        .header("host", "rebind.evil.example:8420")
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), 403);
    let error: Value = rebound.json().await.unwrap();
    assert_eq!(error["error"]["code"], "forbidden_host");
    // Nothing was accepted; the same request sent as JSON from this machine is.
    let list: Value = crate::list_jobs(&fleet).await;
    assert_eq!(list["total"], 0, "{list}");
    let ok = post(&[json, ("sec-fetch-site", "same-origin")])
        .await
        .unwrap();
    assert_eq!(ok.status(), 202);
}

#[tokio::test]
async fn body_over_the_cap_is_413() {
    let fleet = Fleet::builder()
        .nodes(0)
        .gateway_env("FLOTILLA_MAX_BODY_BYTES", "65536")
        .start()
        .await
        .unwrap();
    let response = fleet
        .request(Method::POST, "/jobs")
        .json(&with("prompt", json!("x".repeat(70_000))))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "payload_too_large");
}

#[tokio::test]
async fn idempotency_key_returns_the_same_job_or_409() {
    let fleet = Fleet::builder().nodes(0).start().await.unwrap();
    let post = |body: Value| {
        fleet
            .request(Method::POST, "/jobs")
            .header("Idempotency-Key", "order-42")
            .json(&body)
            .send()
    };
    let first: Value = post(base()).await.unwrap().json().await.unwrap();
    let second = post(base()).await.unwrap();
    assert_eq!(second.status(), 202);
    let second: Value = second.json().await.unwrap();
    assert_eq!(first["job_id"], second["job_id"]);
    let conflict = post(with("prompt", json!("echo different"))).await.unwrap();
    assert_eq!(conflict.status(), 409);
    let error: Value = conflict.json().await.unwrap();
    assert_eq!(error["error"]["code"], "idempotency_conflict");
    let list: Value = crate::list_jobs(&fleet).await;
    assert_eq!(list["total"], 1);
}

/// A replay that finds the key claimed but no job yet (the first request is still submitting
/// it, and may yet roll it back) is told to retry: a 202 would name a job that may never exist.
#[tokio::test]
async fn a_replay_while_the_first_request_is_still_submitting_is_told_to_retry() {
    #[derive(serde::Serialize)]
    struct Claim {
        key: String,
        body_sha256: String,
        job_id: String,
    }
    let fleet = Fleet::builder().nodes(0).start().await.unwrap();
    let body = base();
    let digest = <sha2::Sha256 as sha2::Digest>::digest(body.to_string().as_bytes());
    let claim = Claim {
        key: "order-7".to_owned(),
        body_sha256: hex::encode(digest),
        job_id: "e2e-0000000000000000000000000000abcd".to_owned(),
    };
    let client = async_nats::connect(fleet.nats.url()).await.unwrap();
    let kv = async_nats::jetstream::new(client)
        .get_key_value(flotilla_proto::names::BUCKET_IDEMPOTENCY)
        .await
        .unwrap();
    kv.create(
        flotilla_proto::names::idempotency_key("order-7"),
        flotilla_proto::encode(&claim).unwrap(),
    )
    .await
    .unwrap();
    let response = fleet
        .request(Method::POST, "/jobs")
        .header("Idempotency-Key", "order-7")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
}

#[tokio::test]
async fn api_key_is_required_except_on_public_paths_and_headers_are_always_set() {
    let fleet = Fleet::builder()
        .nodes(0)
        .api_key("a-long-enough-test-key")
        .start()
        .await
        .unwrap();
    let anonymous = reqwest::Client::new();
    for (method, path) in [
        (Method::GET, "/jobs"),
        (Method::POST, "/jobs"),
        (Method::GET, "/jobs/x"),
    ] {
        let response = anonymous
            .request(method, format!("{}{path}", fleet.api))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{path}");
        assert_eq!(response.headers()["x-content-type-options"], "nosniff");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "unauthorized");
    }
    let wrong = anonymous
        .get(format!("{}/jobs", fleet.api))
        .bearer_auth("a-long-enough-test-kez")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let health = anonymous
        .get(format!("{}/health", fleet.api))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    // Parpaing's health probes read `checks.db`: here, the job store.
    let health: Value = health.json().await.unwrap();
    assert_eq!(health["checks"]["db"], "ok", "{health}");

    let response = fleet
        .request(Method::GET, "/jobs/unknown-job")
        .header("X-Request-Id", "trace-me-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let headers = response.headers();
    assert_eq!(headers["x-request-id"], "trace-me-123");
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    let generated = fleet.request(Method::GET, "/health").send().await.unwrap();
    assert!(!generated.headers()["x-request-id"].is_empty());
}

#[tokio::test]
async fn list_filters_paginates_newest_first_and_unknown_ids_are_404() {
    // No nodes: every job stays pending, so the listing is stable.
    let fleet = Fleet::builder().nodes(0).start().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..6 {
        let mut body = shell("echo hi");
        body["agent_id"] = json!(if i % 2 == 0 { "even" } else { "odd" });
        body["metadata"] = json!({ "batch": "b1", "index": i.to_string() });
        ids.push(submit(&fleet, body).await);
    }
    let fleet = &fleet;
    let get = |query: &'static str| async move {
        let response = fleet
            .request(Method::GET, &format!("/jobs{query}"))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json::<Value>().await.unwrap())
    };
    let ids_of = |list: &Value| -> Vec<String> {
        list["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["job_id"].as_str().unwrap().to_owned())
            .collect()
    };

    let (_, page) = get("?limit=4").await;
    assert_eq!(page["total"], 6);
    assert_eq!(page["limit"], 4);
    assert_eq!(page["offset"], 0);
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(ids_of(&page), newest_first[..4]);
    let (_, page) = get("?limit=4&offset=4").await;
    assert_eq!(ids_of(&page), newest_first[4..]);

    let (_, odd) = get("?agent_id=odd").await;
    assert_eq!(odd["total"], 3);
    let (_, pending) = get("?status=pending&metadata.index=2").await;
    assert_eq!(ids_of(&pending), [ids[2].clone()]);
    let (_, none) = get("?status=completed").await;
    assert_eq!(none["total"], 0);
    let (_, shell_jobs) =
        get("?engine=shell&profile=default&created_after=2000-01-01T00:00:00Z").await;
    assert_eq!(shell_jobs["total"], 6);

    for bad in [
        "?limit=0",
        "?limit=201",
        "?offset=-1",
        "?status=done",
        "?limit=abc",
        "?created_after=yesterday",
    ] {
        let (status, error) = get(bad).await;
        assert_eq!(status, 422, "{bad}: {error}");
        assert!(error["error"]["field"].is_string(), "{bad}: {error}");
    }

    // Waiting on a job that does not finish times out with 408.
    let response = fleet
        .request(Method::GET, &format!("/jobs/{}/wait?timeout=1", ids[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 408);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "wait_timeout");

    for (method, path) in [
        (Method::GET, "/jobs/no-such-job"),
        (Method::GET, "/jobs/no-such-job/wait?timeout=1"),
        (Method::DELETE, "/jobs/no-such-job"),
        (Method::GET, "/jobs/not.a.valid.id"),
    ] {
        let response = fleet.request(method, path).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "not_found");
    }
}

/// With several gateways, the fleet-wide figures come from one of them: summed over the
/// replicas, each counts once. When that one stops, another takes over.
#[tokio::test]
async fn fleet_wide_metrics_count_once_across_gateway_replicas() {
    let mut fleet = Fleet::builder().gateways(2).start().await.unwrap();
    let urls = [fleet.api.clone(), fleet.extra_gateways[0].1.clone()];
    let live_nodes = |text: &str| -> Option<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with("flotilla_nodes_live "))?;
        line.split(' ').nth(1)?.parse().ok()
    };
    let scrape = |url: String| async move {
        let text = reqwest::get(format!("{url}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        Some(text)
    };
    let first = scrape(urls[0].clone()).await.unwrap();
    let second = scrape(urls[1].clone()).await.unwrap();
    let sum = live_nodes(&first).unwrap_or(0) + live_nodes(&second).unwrap_or(0);
    assert_eq!(sum, 1, "one node, counted once:\n{first}\n---\n{second}");
    for text in [&first, &second] {
        assert!(text.contains("flotilla_config_version"), "{text}");
    }
    // The exporter stops: the other gateway takes the figures over.
    let exporter = if live_nodes(&first).is_some() { 0 } else { 1 };
    let other = urls[1 - exporter].clone();
    if exporter == 0 {
        fleet
            .gateway
            .terminate_and_wait(std::time::Duration::from_secs(10));
    } else {
        fleet.extra_gateways[0]
            .0
            .terminate_and_wait(std::time::Duration::from_secs(10));
    }
    let taken = flotilla_testkit::wait_until(
        std::time::Duration::from_secs(20),
        "the other gateway to export the fleet-wide figures",
        || {
            let other = other.clone();
            async move { live_nodes(&scrape(other).await?) }
        },
    )
    .await
    .unwrap();
    assert_eq!(taken, 1);
}

#[tokio::test]
async fn metrics_are_public_and_describe_jobs_queue_and_nodes() {
    let fleet = Fleet::builder()
        .api_key("a-long-enough-test-key")
        .start()
        .await
        .unwrap();
    for _ in 0..2 {
        let id = submit(&fleet, shell("echo measured")).await;
        crate::wait(&fleet, &id).await;
    }
    let response = reqwest::get(format!("{}/metrics", fleet.api))
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "metrics need no key");
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = response.text().await.unwrap();
    for line in [
        "flotilla_jobs{status=\"completed\"} 2",
        "flotilla_jobs{status=\"pending\"} 0",
        "flotilla_queue_depth 0",
        "flotilla_nodes_live 1",
        "# TYPE flotilla_pool_hits_total counter",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
}
