//! The llm-gateway against a real nats-server and a mock upstream over real HTTP: credential
//! swap and header allow-list, the token checks, streaming, metering and budgets.

use std::time::Duration;

use chrono::Utc;
use flotilla_nats::{Topology, TopologyConfig};
use flotilla_proto::{JobRecord, JobStatus, LlmGrant};
use flotilla_testkit::{
    MockLlm, NatsServer, TEST_ANTHROPIC_KEY, TEST_GOOGLE_KEY, TEST_OPENAI_KEY, mock_llm, wait_until,
};
use llm_gateway::{Config, SecretSource, Upstreams};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

struct Keys;

impl SecretSource for Keys {
    fn env(&self, name: &str) -> Option<String> {
        match name {
            "FLOTILLA_TEST_ANTHROPIC_KEY" => Some(TEST_ANTHROPIC_KEY.to_owned()),
            "FLOTILLA_TEST_OPENAI_KEY" => Some(TEST_OPENAI_KEY.to_owned()),
            "FLOTILLA_TEST_GOOGLE_KEY" => Some(TEST_GOOGLE_KEY.to_owned()),
            _ => None,
        }
    }
    fn file(&self, path: &std::path::Path) -> Result<String, std::io::Error> {
        Err(std::io::Error::other(path.display().to_string()))
    }
}

struct Harness {
    _nats: NatsServer,
    mock: MockLlm,
    url: String,
    /// `/metrics` when it has a listener of its own.
    metrics_url: Option<String>,
    topology: Topology,
    http: reqwest::Client,
    shutdown: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

const ANTHROPIC_COST: f64 = mock_llm::ANTHROPIC_COST;
const OPENAI_COST: f64 = mock_llm::OPENAI_COST;
const GOOGLE_COST: f64 = mock_llm::GOOGLE_COST;

async fn harness() -> Harness {
    harness_with(&Keys).await
}

/// Holds the Anthropic key only.
struct AnthropicOnly;

impl SecretSource for AnthropicOnly {
    fn env(&self, name: &str) -> Option<String> {
        Keys.env(name).filter(|_| name.contains("ANTHROPIC"))
    }
    fn file(&self, path: &std::path::Path) -> Result<String, std::io::Error> {
        Keys.file(path)
    }
}

async fn harness_with(keys: &dyn SecretSource) -> Harness {
    harness_custom(keys, |_| {}).await
}

/// A gateway whose config `change` bends (with `/metrics` on a listener of its own when the
/// config names one: then on a free port, which `metrics_url` gives).
async fn harness_custom(keys: &dyn SecretSource, change: impl FnOnce(&mut Config)) -> Harness {
    let nats = NatsServer::start().await.unwrap();
    let mock = MockLlm::start().await.unwrap();
    let text = mock_llm::gateway_config(&mock.url());
    let upstreams = Upstreams::parse(&text, keys).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut config = Config {
        listen: ([127, 0, 0, 1], port).into(),
        nats_url: nats.url(),
        nats: flotilla_nats::NatsOptions::default(),
        topology: TopologyConfig::default(),
        providers: upstreams.providers,
        prices: upstreams.prices,
        max_request_bytes: 1 << 20,
        upstream_timeout: Duration::from_secs(30),
        max_concurrent_per_job: 8,
        max_concurrent: 256,
        metrics_listen: None,
        allowed_betas: upstreams.allowed_betas,
    };
    change(&mut config);
    let metrics = match config.metrics_listen {
        Some(_) => Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
        None => None,
    };
    let metrics_url = metrics
        .as_ref()
        .map(|l| format!("http://{}/metrics", l.local_addr().unwrap()));
    let listeners = llm_gateway::Listeners {
        jobs: listener,
        metrics,
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(llm_gateway::run(config, listeners, shutdown.clone()));
    let client = flotilla_nats::connect(&nats.url(), "test", &Default::default())
        .await
        .unwrap();
    let topology = Topology::ensure(client, TopologyConfig::default())
        .await
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    wait_until(Duration::from_secs(10), "the llm-gateway to answer", || {
        let request = http.get(format!("{url}/health")).send();
        async move { request.await.ok().filter(|r| r.status().is_success()) }
    })
    .await
    .unwrap();
    Harness {
        _nats: nats,
        mock,
        url,
        metrics_url,
        topology,
        http,
        shutdown,
    }
}

/// What a node grants a job; tests bend it.
fn grant(job_id: &str) -> LlmGrant {
    mock_llm::grant(job_id)
}

impl Harness {
    /// A job record that is running its first attempt.
    async fn running_job(&self, job_id: &str) {
        let record = mock_llm::running_record(job_id);
        self.topology.jobs.create(&record).await.unwrap();
    }

    /// Forces a state no transition leads to in one step: a raw write, for the test only.
    async fn set_job(&self, job_id: &str, status: JobStatus, attempt: u32) {
        let mut current = self.topology.jobs.get(job_id).await.unwrap().unwrap();
        current.record.status = status;
        current.record.attempt = attempt;
        self.topology
            .jobs
            .update(&current.record, current.revision)
            .await
            .unwrap();
    }

    async fn record(&self, job_id: &str) -> JobRecord {
        self.topology
            .jobs
            .get(job_id)
            .await
            .unwrap()
            .unwrap()
            .record
    }

    /// A job allowed the `google` provider only, with `models` as its allow-list.
    async fn gemini_job(&self, job_id: &str, models: &[&str], budget: Option<f64>) -> String {
        self.running_job(job_id).await;
        let mut g = grant(job_id);
        g.engine = "gemini".to_owned();
        g.providers = vec!["google".to_owned()];
        g.models = models.iter().map(|m| (*m).to_owned()).collect();
        g.max_budget_usd = budget;
        self.topology.grants.issue(&g).await.unwrap()
    }

    /// A Gemini API call the way `@google/genai` makes it: `x-goog-api-key` holds the key.
    async fn gemini(&self, token: &str, path_and_query: &str) -> (u16, String) {
        let response = self
            .http
            .post(format!("{}/google/v1beta/{path_and_query}", self.url))
            .header("x-goog-api-key", token)
            .json(&gemini_request())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

    async fn messages(&self, token: &str, body: Value) -> (u16, String) {
        let response = self
            .http
            .post(format!("{}/anthropic/v1/messages", self.url))
            .header("x-api-key", token)
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }
}

fn gemini_request() -> Value {
    json!({"contents": [{"role": "user", "parts": [{"text": "hello"}]}]})
}

fn message(model: &str, stream: bool) -> Value {
    json!({"model": model, "max_tokens": 64, "stream": stream,
           "messages": [{"role": "user", "content": "hello"}]})
}

#[tokio::test]
async fn the_real_key_is_swapped_in_and_only_allowed_headers_pass() {
    let h = harness().await;
    h.running_job("job-headers").await;
    let mut g = grant("job-headers");
    g.providers.push("openai".to_owned());
    let token = h.topology.grants.issue(&g).await.unwrap();

    let response = h
        .http
        .post(format!("{}/anthropic/v1/messages", h.url))
        .header("x-api-key", &token)
        .header("authorization", format!("Bearer {token}"))
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", "prompt-caching-2024-07-31")
        .header("cookie", "session=secret")
        .header("x-forwarded-for", "10.0.0.9")
        .header("x-custom-tracking", "abc")
        .json(&message("claude-sonnet-4-5", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["content"][0]["text"], "mock answer");

    let seen = &h.mock.requests()[0];
    let header = |name: &str| {
        seen.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    assert_eq!(header("x-api-key").as_deref(), Some(TEST_ANTHROPIC_KEY));
    assert_eq!(header("anthropic-version").as_deref(), Some("2023-06-01"));
    assert_eq!(
        header("anthropic-beta").as_deref(),
        Some("prompt-caching-2024-07-31")
    );
    for dropped in [
        "authorization",
        "cookie",
        "x-forwarded-for",
        "x-custom-tracking",
    ] {
        assert_eq!(
            header(dropped),
            None,
            "{dropped} must not reach the upstream"
        );
    }
    // The job's token goes no further than the gateway.
    for (name, value) in &seen.headers {
        assert!(
            !value.to_str().unwrap_or_default().contains(&token),
            "token leaked upstream in {name}"
        );
    }

    // OpenAI: the key goes as a bearer token.
    let response = h
        .http
        .post(format!("{}/openai/v1/chat/completions", h.url))
        .bearer_auth(&token)
        .json(&json!({"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = &h.mock.requests()[1];
    assert_eq!(
        seen.headers["authorization"].to_str().unwrap(),
        format!("Bearer {TEST_OPENAI_KEY}")
    );
}

#[tokio::test]
async fn tokens_are_checked_on_every_request() {
    let h = harness().await;
    let body = message("claude-sonnet-4-5", false);

    // (case, grant changes, job changes after issue, revoke?, expected status, message part)
    struct Case {
        name: &'static str,
        grant: fn(&mut LlmGrant),
        job: Option<(JobStatus, u32)>,
        revoke: bool,
        path: &'static str,
        status: u16,
        says: &'static str,
    }
    let cases = [
        Case {
            name: "valid",
            grant: |_| {},
            job: None,
            revoke: false,
            path: "/anthropic/v1/messages",
            status: 200,
            says: "mock answer",
        },
        Case {
            name: "revoked",
            grant: |_| {},
            job: None,
            revoke: true,
            path: "/anthropic/v1/messages",
            status: 401,
            says: "revoked",
        },
        Case {
            name: "expired",
            grant: |g| g.expires_at = Utc::now() - Duration::from_secs(1),
            job: None,
            revoke: false,
            path: "/anthropic/v1/messages",
            status: 401,
            says: "expired",
        },
        Case {
            name: "after the job ended",
            grant: |_| {},
            job: Some((JobStatus::Completed, 1)),
            revoke: false,
            path: "/anthropic/v1/messages",
            status: 401,
            says: "no longer running",
        },
        Case {
            name: "wrong job attempt (the job moved on to attempt 2)",
            grant: |_| {},
            job: Some((JobStatus::Running, 2)),
            revoke: false,
            path: "/anthropic/v1/messages",
            status: 401,
            says: "attempt 2",
        },
        Case {
            name: "wrong job (its record is another job's)",
            grant: |g| g.job_id = "job-that-does-not-exist".to_owned(),
            job: None,
            revoke: false,
            path: "/anthropic/v1/messages",
            status: 401,
            says: "does not exist",
        },
        Case {
            name: "wrong provider",
            grant: |_| {},
            job: None,
            revoke: false,
            path: "/openai/v1/chat/completions",
            status: 403,
            says: "may use provider(s) anthropic, not openai",
        },
        Case {
            name: "disallowed model",
            grant: |g| g.models = vec!["claude-haiku-*".to_owned()],
            job: None,
            revoke: false,
            path: "/anthropic/v1/messages",
            status: 403,
            says: "not allowed for profile default",
        },
        Case {
            name: "allowed model by prefix",
            grant: |g| g.models = vec!["claude-sonnet-4-5*".to_owned()],
            job: None,
            revoke: false,
            path: "/anthropic/v1/messages",
            status: 200,
            says: "mock answer",
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        let job_id = format!("job-check-{i}");
        h.running_job(&job_id).await;
        let mut g = grant(&job_id);
        (case.grant)(&mut g);
        let token = h.topology.grants.issue(&g).await.unwrap();
        if case.revoke {
            h.topology.grants.revoke(&token).await.unwrap();
        }
        if let Some((status, attempt)) = case.job {
            h.set_job(&job_id, status, attempt).await;
        }
        let before = h.mock.requests().len();
        let response = h
            .http
            .post(format!("{}{}", h.url, case.path))
            .header("x-api-key", &token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        assert_eq!(status, case.status, "{}: {text}", case.name);
        assert!(text.contains(case.says), "{}: {text}", case.name);
        let forwarded = h.mock.requests().len() - before;
        assert_eq!(forwarded, usize::from(status == 200), "{}", case.name);
    }

    // Unknown and missing tokens, and an unknown provider.
    let (status, text) = h.messages("flj_0000", body.clone()).await;
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("authentication_error") && text.contains("unknown token"));
    let response = h
        .http
        .post(format!("{}/anthropic/v1/messages", h.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let response = h
        .http
        .post(format!("{}/gemini/v1/models", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn streamed_answers_pass_through_before_the_upstream_finishes() {
    let h = harness().await;
    h.running_job("job-stream").await;
    let token = h.topology.grants.issue(&grant("job-stream")).await.unwrap();
    h.mock.hold();
    let response = h
        .http
        .post(format!("{}/anthropic/v1/messages", h.url))
        .header("x-api-key", &token)
        .json(&message("claude-sonnet-4-5", true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut response = response;
    // The upstream is holding the rest of its answer: this first event came through alone.
    let first = tokio::time::timeout(Duration::from_secs(10), response.chunk())
        .await
        .expect("first bytes while the upstream is still answering")
        .unwrap()
        .unwrap();
    let first = String::from_utf8_lossy(&first).into_owned();
    assert!(first.contains("message_start"), "{first}");
    assert!(!first.contains("message_stop"), "{first}");
    assert!(h.record("job-stream").await.usage.is_none());

    h.mock.release();
    let mut rest = String::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(rest.contains("message_stop"), "{rest}");
    // Charged before the answer ended.
    let usage = h.record("job-stream").await.usage.unwrap();
    assert_eq!((usage.input_tokens, usage.output_tokens), (100, 20));
    assert_eq!(usage.requests, 1);
}

#[tokio::test]
async fn metering_is_exact_and_the_budget_cuts_off() {
    let h = harness().await;
    h.running_job("job-budget").await;
    let mut g = grant("job-budget");
    g.providers.push("openai".to_owned());
    // Two Anthropic answers plus one OpenAI answer cross it; the next request is refused.
    g.max_budget_usd = Some(0.0025);
    let token = h.topology.grants.issue(&g).await.unwrap();

    let (status, text) = h
        .messages(&token, message("claude-sonnet-4-5", false))
        .await;
    assert_eq!(status, 200, "{text}");
    let (status, text) = h.messages(&token, message("claude-sonnet-4-5", true)).await;
    assert_eq!(status, 200, "{text}");
    let usage = h.record("job-budget").await.usage.unwrap();
    assert!(usage.metered && !usage.budget_exceeded);
    assert_eq!(
        (
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_read_tokens,
            usage.cache_write_tokens,
            usage.requests
        ),
        (200, 40, 2000, 100, 2)
    );
    assert!(
        (usage.cost_usd - 2.0 * ANTHROPIC_COST).abs() < 1e-12,
        "{usage:?}"
    );

    // A streamed OpenAI answer: the gateway asks for usage and counts it.
    let response = h
        .http
        .post(format!("{}/openai/v1/chat/completions", h.url))
        .bearer_auth(&token)
        .json(&json!({"model": "gpt-5", "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("\"usage\""), "{text}");
    let sent = h.mock.requests().last().unwrap().body.clone();
    assert_eq!(sent["stream_options"]["include_usage"], true);

    let usage = h.record("job-budget").await.usage.unwrap();
    let u = mock_llm::OPENAI_USAGE;
    assert_eq!(usage.input_tokens, 200 + (u.input - u.cache_read));
    assert_eq!(usage.cache_read_tokens, 2000 + u.cache_read);
    assert_eq!(usage.output_tokens, 40 + u.output);
    let spent = 2.0 * ANTHROPIC_COST + OPENAI_COST;
    assert!((usage.cost_usd - spent).abs() < 1e-12, "{usage:?}");
    assert!(usage.budget_exceeded, "{usage:?}");

    let before = h.mock.requests().len();
    let (status, text) = h
        .messages(&token, message("claude-sonnet-4-5", false))
        .await;
    assert_eq!(status, 402, "{text}");
    assert!(text.contains("budget exceeded"), "{text}");
    assert_eq!(
        h.mock.requests().len(),
        before,
        "a refused request is not forwarded"
    );

    let metrics = h
        .http
        .get(format!("{}/metrics", h.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("flotilla_llm_tokens_total{provider=\"anthropic\",engine=\"claude-code\",profile=\"default\",agent_id=\"agent-7\",kind=\"output\"} 40"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "flotilla_llm_requests_total{provider=\"anthropic\",outcome=\"budget_exceeded\"} 1"
        ),
        "{metrics}"
    );

    // A model without a price would cost 0: with a budget it is refused, without one it runs.
    h.running_job("job-unpriced").await;
    let mut g = grant("job-unpriced");
    g.max_budget_usd = Some(1.0);
    let budgeted = h.topology.grants.issue(&g).await.unwrap();
    let (status, text) = h
        .messages(&budgeted, message("claude-unpriced-1", false))
        .await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("has no price"), "{text}");
    assert_eq!(h.mock.requests().len(), before, "not forwarded");
    g.max_budget_usd = None;
    let unbudgeted = h.topology.grants.issue(&g).await.unwrap();
    let (status, text) = h
        .messages(&unbudgeted, message("claude-unpriced-1", false))
        .await;
    assert_eq!(status, 200, "{text}");
}

/// Parallel requests of a job with a budget: one whose worst case would not fit beside those
/// in flight waits for them to settle, then runs against the spend they left.
#[tokio::test]
async fn requests_in_flight_count_against_the_budget() {
    let h = harness().await;
    h.running_job("job-parallel").await;
    let mut g = grant("job-parallel");
    // Room for one answer's worst case (about $0.0011 here), not two.
    g.max_budget_usd = Some(0.0015);
    let token = h.topology.grants.issue(&g).await.unwrap();

    h.mock.hold();
    let mut first = h
        .http
        .post(format!("{}/anthropic/v1/messages", h.url))
        .header("x-api-key", &token)
        .json(&message("claude-sonnet-4-5", true))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    first.chunk().await.unwrap().expect("the first event");

    let second = tokio::spawn({
        let (http, url, token) = (h.http.clone(), h.url.clone(), token.clone());
        async move {
            let response = http
                .post(format!("{url}/anthropic/v1/messages"))
                .header("x-api-key", &token)
                .json(&message("claude-sonnet-4-5", false))
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    });
    wait_until(
        Duration::from_secs(10),
        "the second request to wait",
        || {
            let (http, url) = (h.http.clone(), h.url.clone());
            async move {
                let metrics = http.get(format!("{url}/metrics")).send().await.ok()?;
                let metrics = metrics.text().await.ok()?;
                metrics
                    .contains("flotilla_llm_requests_waiting 1")
                    .then_some(())
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(h.mock.requests().len(), 1, "the second is held back");

    h.mock.release();
    while first.chunk().await.unwrap().is_some() {}
    let (status, text) = second.await.unwrap();
    assert_eq!(status, 200, "{text}");
    assert_eq!(h.mock.requests().len(), 2);
    let usage = h.record("job-parallel").await.usage.unwrap();
    assert_eq!(usage.requests, 2);
    assert!(usage.budget_exceeded, "two answers cost more: {usage:?}");
}

#[tokio::test]
async fn a_provider_without_its_credential_refuses_instead_of_forwarding() {
    let h = harness_with(&AnthropicOnly).await;
    h.running_job("job-nokey").await;
    let mut g = grant("job-nokey");
    g.providers.push("openai".to_owned());
    let token = h.topology.grants.issue(&g).await.unwrap();
    let response = h
        .http
        .post(format!("{}/openai/v1/chat/completions", h.url))
        .bearer_auth(&token)
        .json(&json!({"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let text = response.text().await.unwrap();
    assert!(
        text.contains("no credential for provider openai: set FLOTILLA_TEST_OPENAI_KEY"),
        "{text}"
    );
    assert!(
        h.mock.requests().is_empty(),
        "nothing goes upstream unauthenticated"
    );
    let (status, text) = h
        .messages(&token, message("claude-sonnet-4-5", false))
        .await;
    assert_eq!(status, 200, "{text}");
}

#[tokio::test]
async fn gemini_the_real_key_goes_upstream_as_a_header_and_the_job_token_nowhere() {
    let h = harness().await;
    let token = h.gemini_job("job-gemini-keys", &[], None).await;

    // As the SDK sends it: x-goog-api-key, plus a header that must not pass.
    let response = h
        .http
        .post(format!(
            "{}/google/v1beta/models/gemini-2.5-pro:generateContent",
            h.url
        ))
        .header("x-goog-api-key", &token)
        .header("x-goog-api-client", "google-genai-sdk/1.30.0 gl-node/v22")
        .header("cookie", "session=secret")
        .json(&gemini_request())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["candidates"][0]["content"]["parts"][0]["text"],
        "mock answer"
    );

    // The token as `?key=`, among other parameters, on a stream and on the model listing.
    let response = h
        .http
        .post(format!(
            "{}/google/v1beta/models/gemini-2.5-pro:streamGenerateContent?key={token}&alt=sse",
            h.url
        ))
        .json(&gemini_request())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("\"finishReason\":\"STOP\""), "{text}");
    let response = h
        .http
        .get(format!(
            "{}/google/v1beta/models?pageSize=50&key={token}",
            h.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let listing: Value = response.json().await.unwrap();
    assert_eq!(listing["models"][0]["name"], "models/gemini-2.5-pro");

    let seen = h.mock.requests();
    let upstream: Vec<(&str, Option<&str>)> = seen
        .iter()
        .map(|r| (r.path.as_str(), r.query.as_deref()))
        .collect();
    assert_eq!(
        upstream,
        [
            ("/v1beta/models/gemini-2.5-pro:generateContent", None),
            (
                "/v1beta/models/gemini-2.5-pro:streamGenerateContent",
                Some("alt=sse")
            ),
            ("/v1beta/models", Some("pageSize=50")),
        ]
    );
    for request in &seen {
        assert_eq!(
            request.headers["x-goog-api-key"].to_str().unwrap(),
            TEST_GOOGLE_KEY,
            "{}",
            request.path
        );
        assert!(request.headers.get("cookie").is_none());
        assert!(request.headers.get("authorization").is_none());
        for (name, value) in &request.headers {
            assert!(
                !value.to_str().unwrap_or_default().contains(&token),
                "token leaked upstream in {name}"
            );
        }
    }
    assert_eq!(
        seen[0].headers["x-goog-api-client"],
        "google-genai-sdk/1.30.0 gl-node/v22"
    );

    // No token: refused in the Gemini API's own error shape, and nothing is forwarded.
    let response = h
        .http
        .post(format!(
            "{}/google/v1beta/models/gemini-2.5-pro:generateContent?key=",
            h.url
        ))
        .json(&gemini_request())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["status"], "UNAUTHENTICATED", "{error}");
    assert_eq!(error["error"]["code"], 401, "{error}");
    assert_eq!(h.mock.requests().len(), 3);
}

#[tokio::test]
async fn gemini_the_model_allow_list_is_checked_against_the_model_in_the_path() {
    let h = harness().await;
    let token = h
        .gemini_job("job-gemini-models", &["gemini-2.5-flash*"], None)
        .await;
    let cases = [
        (
            "models/gemini-2.5-flash:generateContent",
            200,
            "mock answer",
        ),
        (
            "models/gemini-2.5-flash-lite:countTokens",
            200,
            "totalTokens",
        ),
        (
            "models/gemini-2.5-pro:generateContent",
            403,
            // The message, JSON-escaped.
            r#"model \"gemini-2.5-pro\" is not allowed"#,
        ),
        (
            "models/gemini-2.5-pro:streamGenerateContent?alt=sse",
            403,
            "PERMISSION_DENIED",
        ),
        // An escape the upstream would decode into something else is not a model name.
        (
            "models/gemini-2.5-flash%252F..%252Fgemini-2.5-pro:generateContent",
            400,
            "not a model name",
        ),
        // Listing models names none.
        ("models", 200, "models/gemini-2.5-pro"),
    ];
    for (path, status, says) in cases {
        let before = h.mock.requests().len();
        let response = if path == "models" {
            h.http
                .get(format!("{}/google/v1beta/models", h.url))
                .header("x-goog-api-key", &token)
                .send()
                .await
                .unwrap()
        } else {
            h.http
                .post(format!("{}/google/v1beta/{path}", h.url))
                .header("x-goog-api-key", &token)
                .json(&gemini_request())
                .send()
                .await
                .unwrap()
        };
        let got = response.status().as_u16();
        let text = response.text().await.unwrap();
        assert_eq!(got, status, "{path}: {text}");
        assert!(text.contains(says), "{path}: {text}");
        let forwarded = h.mock.requests().len() - before;
        assert_eq!(forwarded, usize::from(status == 200), "{path}");
    }
    // A body `model` (context caches, batches) is checked too.
    let response = h
        .http
        .post(format!("{}/google/v1beta/cachedContents", h.url))
        .header("x-goog-api-key", &token)
        .json(&json!({"model": "models/gemini-2.5-pro", "contents": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
}

#[tokio::test]
async fn gemini_streams_pass_through_are_metered_exactly_and_the_budget_cuts_off() {
    let h = harness().await;
    // Two answers cross the budget; the third request is refused.
    let token = h
        .gemini_job("job-gemini-budget", &[], Some(1.5 * GOOGLE_COST))
        .await;
    let u = mock_llm::GOOGLE_USAGE;
    let one = (u.input - u.cache_read, u.output, u.cache_read);

    // Streamed: the first chunk arrives while the upstream holds the rest.
    h.mock.hold();
    let mut response = h
        .http
        .post(format!(
            "{}/google/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
            h.url
        ))
        .header("x-goog-api-key", &token)
        .json(&gemini_request())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let first = tokio::time::timeout(Duration::from_secs(10), response.chunk())
        .await
        .expect("first bytes while the upstream is still answering")
        .unwrap()
        .unwrap();
    let first = String::from_utf8_lossy(&first).into_owned();
    assert!(
        first.starts_with("data: ") && first.contains("mock "),
        "{first}"
    );
    assert!(!first.contains("STOP"), "{first}");
    assert!(h.record("job-gemini-budget").await.usage.is_none());
    h.mock.release();
    let mut rest = String::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert_eq!(rest.matches("data: ").count(), 2, "{rest}");
    // Charged before the answer ended: the last chunk's usage, not the sum of the three.
    let usage = h.record("job-gemini-budget").await.usage.unwrap();
    assert_eq!(
        (
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_read_tokens,
            usage.cache_write_tokens,
            usage.requests
        ),
        (one.0, one.1, one.2, 0, 1)
    );
    assert!((usage.cost_usd - GOOGLE_COST).abs() < 1e-12, "{usage:?}");
    assert!(!usage.budget_exceeded);

    // countTokens is a request but costs nothing.
    let (status, text) = h.gemini(&token, "models/gemini-2.5-pro:countTokens").await;
    assert_eq!(status, 200, "{text}");
    let (status, text) = h
        .gemini(&token, "models/gemini-2.5-pro:generateContent")
        .await;
    assert_eq!(status, 200, "{text}");
    let usage = h.record("job-gemini-budget").await.usage.unwrap();
    assert_eq!(
        (
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_read_tokens,
            usage.requests
        ),
        (2 * one.0, 2 * one.1, 2 * one.2, 3)
    );
    assert!(
        (usage.cost_usd - 2.0 * GOOGLE_COST).abs() < 1e-12,
        "{usage:?}"
    );
    assert!(usage.budget_exceeded, "{usage:?}");

    let before = h.mock.requests().len();
    let (status, text) = h
        .gemini(&token, "models/gemini-2.5-pro:generateContent")
        .await;
    assert_eq!(status, 402, "{text}");
    let error: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(error["error"]["status"], "RESOURCE_EXHAUSTED", "{error}");
    assert!(text.contains("budget exceeded"), "{text}");
    assert_eq!(h.mock.requests().len(), before, "not forwarded");

    let metrics = h
        .http
        .get(format!("{}/metrics", h.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!("flotilla_llm_tokens_total{{provider=\"google\",engine=\"gemini\",profile=\"default\",agent_id=\"agent-7\",kind=\"output\"}} {}", 2 * one.1)),
        "{metrics}"
    );
}

/// A job allowed all three providers, sonnet and gpt-5 models, and `tools` by name.
async fn any_provider_job(h: &Harness, job_id: &str, tools: &[&str]) -> String {
    h.running_job(job_id).await;
    let mut g = grant(job_id);
    g.providers = ["anthropic", "openai", "google"]
        .map(str::to_owned)
        .to_vec();
    g.models = ["claude-sonnet-4-5*", "gpt-5*", "gemini-2.5-pro"]
        .map(str::to_owned)
        .to_vec();
    g.allowed_provider_tools = tools.iter().map(|t| (*t).to_owned()).collect();
    h.topology.grants.issue(&g).await.unwrap()
}

impl Harness {
    /// `method` `/<path>` with the job's token where each provider looks for it, `body` as
    /// JSON (or as raw bytes when it is a string), and extra `headers`.
    async fn call(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (u16, String) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self
            .http
            .request(method, format!("{}/{path}", self.url))
            .header("x-api-key", token)
            .header("x-goog-api-key", token)
            .bearer_auth(token);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request = match body {
            Some(Value::String(raw)) => request.body(raw),
            Some(json) => request.json(&json),
            None => request,
        };
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }
}

/// Batches, files, fine-tuning and every other API of the provider's account are refused
/// before they reach it, in the provider's own error shape.
#[tokio::test]
async fn apis_outside_the_allow_list_are_refused_before_the_provider() {
    let h = harness().await;
    let token = any_provider_job(&h, "job-paths", &[]).await;
    let claude = message("claude-sonnet-4-5", false);
    let refused = [
        ("POST", "anthropic/v1/messages/batches"),
        ("GET", "anthropic/v1/messages/batches"),
        ("GET", "anthropic/v1/messages/batches/msgbatch_1/results"),
        ("POST", "anthropic/v1/files"),
        ("GET", "anthropic/v1/files"),
        ("DELETE", "anthropic/v1/files/file_1"),
        ("GET", "anthropic/v1/messages"),
        ("POST", "anthropic/v1/complete"),
        ("POST", "anthropic/v1/skills"),
        ("POST", "openai/v1/files"),
        ("GET", "openai/v1/files"),
        ("POST", "openai/v1/batches"),
        ("POST", "openai/v1/fine_tuning/jobs"),
        ("GET", "openai/v1/fine_tuning/jobs"),
        ("POST", "openai/v1/vector_stores"),
        ("POST", "openai/v1/assistants"),
        ("GET", "openai/v1/responses/resp_1"),
        ("DELETE", "openai/v1/responses/resp_1"),
        ("POST", "openai/v1/chat/completions/extra"),
        ("GET", "openai/v1/chat/completions"),
        ("POST", "google/v1beta/files"),
        ("POST", "google/v1beta/cachedContents"),
        ("GET", "google/v1beta/cachedContents"),
        ("POST", "google/v1beta/batches"),
        ("POST", "google/v1beta/tunedModels"),
        ("POST", "google/v1beta/tunedModels/mine:generateContent"),
        (
            "POST",
            "google/v1beta/models/gemini-2.5-pro:batchGenerateContent",
        ),
        ("GET", "google/v1beta/models/gemini-2.5-pro:generateContent"),
    ];
    for (method, path) in refused {
        let before = h.mock.requests().len();
        let (status, text) = h
            .call(&token, method, path, Some(claude.clone()), &[])
            .await;
        assert_eq!(status, 403, "{method} {path}: {text}");
        let relative = path.split_once('/').unwrap().1;
        assert!(
            text.contains(&format!("{method} {relative} is not")),
            "{method} {path}: {text}"
        );
        assert_eq!(
            h.mock.requests().len(),
            before,
            "{method} {path} was forwarded"
        );
    }
    // In the provider's own error shape.
    let (_, text) = h
        .call(&token, "POST", "anthropic/v1/files", None, &[])
        .await;
    let error: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(error["error"]["type"], "permission_error", "{error}");
}

/// What jobs need still passes: model calls, token counts and model listings.
#[tokio::test]
async fn the_apis_jobs_need_pass() {
    let h = harness().await;
    let token = any_provider_job(&h, "job-apis", &[]).await;
    let claude = message("claude-sonnet-4-5", false);
    let allowed = [
        (
            "POST",
            "anthropic/v1/messages?beta=true",
            Some(claude.clone()),
        ),
        (
            "POST",
            "anthropic/v1/messages/count_tokens",
            Some(claude.clone()),
        ),
        ("GET", "anthropic/v1/models", None),
        ("GET", "openai/v1/models", None),
        (
            "POST",
            "openai/v1/responses",
            Some(json!({"model": "gpt-5", "input": "hi"})),
        ),
        ("GET", "google/v1beta/models", None),
        (
            "POST",
            "google/v1beta/models/gemini-2.5-pro:countTokens",
            Some(gemini_request()),
        ),
    ];
    for (method, path, body) in allowed {
        let (status, text) = h.call(&token, method, path, body, &[]).await;
        assert_eq!(status, 200, "{method} {path}: {text}");
    }
    assert_eq!(h.mock.requests().len(), 7);
}

/// A body the gateway cannot read is not forwarded: not JSON, not an object, or nested beyond
/// the parser's limit (which used to skip the model check: opus is not allowed here); nor is
/// a model call that names no model.
#[tokio::test]
async fn a_body_the_gateway_cannot_check_is_refused() {
    let h = harness().await;
    let token = any_provider_job(&h, "job-bodies", &[]).await;
    let deep = format!(
        r#"{{"model":"claude-opus-4-1","max_tokens":1,"messages":[{}1{}]}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let unreadable = [
        ("anthropic/v1/messages", deep),
        ("anthropic/v1/messages", "not json".to_owned()),
        ("anthropic/v1/messages", "[1, 2]".to_owned()),
        ("openai/v1/chat/completions", String::new()),
    ];
    for (path, body) in unreadable {
        let before = h.mock.requests().len();
        let (status, text) = h
            .call(&token, "POST", path, Some(Value::String(body)), &[])
            .await;
        assert_eq!(status, 400, "{path}: {text}");
        assert!(text.contains("not a JSON object"), "{path}: {text}");
        assert_eq!(h.mock.requests().len(), before, "{path}: {text}");
    }
    let nameless = [
        (
            "anthropic/v1/messages",
            json!({"max_tokens": 1, "messages": []}),
        ),
        (
            "anthropic/v1/messages/count_tokens",
            json!({"messages": []}),
        ),
        ("anthropic/v1/messages", json!({"model": 5, "messages": []})),
        ("openai/v1/chat/completions", json!({"messages": []})),
        ("openai/v1/responses", json!({"input": "hi"})),
    ];
    for (path, body) in nameless {
        let before = h.mock.requests().len();
        let (status, text) = h.call(&token, "POST", path, Some(body), &[]).await;
        assert_eq!(status, 400, "{path}: {text}");
        assert!(text.contains("names no model"), "{path}: {text}");
        assert_eq!(h.mock.requests().len(), before, "{path}: {text}");
    }
}

/// A job that hangs up mid-answer still pays for all of it: the gateway reads the upstream
/// to its end, as the provider bills it.
#[tokio::test]
async fn a_job_that_drops_a_streamed_answer_is_charged_for_all_of_it() {
    let h = harness().await;
    let token = any_provider_job(&h, "job-dropped", &[]).await;
    h.mock.hold();
    let calls = [
        ("anthropic/v1/messages", message("claude-sonnet-4-5", true)),
        (
            "openai/v1/chat/completions",
            json!({"model": "gpt-5", "stream": true,
                   "messages": [{"role": "user", "content": "hi"}]}),
        ),
    ];
    for (path, body) in calls {
        let mut response = h
            .http
            .post(format!("{}/{path}", h.url))
            .header("x-api-key", &token)
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        response.chunk().await.unwrap().expect("the first event");
        drop(response);
    }
    // Let the gateway see both jobs' connections close while the upstream still holds the
    // answers' usage.
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.mock.release();
    let charged = wait_until(Duration::from_secs(10), "both answers charged", || async {
        let usage = h.record("job-dropped").await.usage?;
        let full = (usage.cost_usd - (ANTHROPIC_COST + OPENAI_COST)).abs() < 1e-12;
        (usage.requests == 2 && full).then_some(usage)
    })
    .await;
    let usage = h.record("job-dropped").await.usage;
    assert!(charged.is_ok(), "{usage:?}");
}

/// (path, body, `anthropic-beta`, status without any allowance, status for a job whose
/// profile allows `web_search` and `mcp`)
type ToolCase = (&'static str, Value, Option<&'static str>, u16, u16);

/// Runs `cases` for a job allowed no provider-side tool and one allowed `web_search` and
/// `mcp`; a refusal says how a profile allows the tool, and is not forwarded.
async fn check_tool_cases(h: &Harness, cases: Vec<ToolCase>) {
    let plain = any_provider_job(h, "job-tools-none", &[]).await;
    let allowed = any_provider_job(h, "job-tools-some", &["web_search", "mcp"]).await;
    for (path, body, beta, without, with) in cases {
        for (token, expected) in [(&plain, without), (&allowed, with)] {
            let before = h.mock.requests().len();
            let headers: Vec<(&str, &str)> =
                beta.map(|b| ("anthropic-beta", b)).into_iter().collect();
            let (status, text) = h
                .call(token, "POST", path, Some(body.clone()), &headers)
                .await;
            assert_eq!(status, expected, "{path} {body} {beta:?}: {text}");
            let forwarded = h.mock.requests().len() - before;
            assert_eq!(forwarded, usize::from(expected == 200), "{path} {body}");
            if expected == 403 {
                assert!(text.contains("allowed_provider_tools"), "{text}");
            }
        }
    }
}

/// Anthropic's server tools that reach the internet (web search and fetch, the MCP
/// connector) and beta flags pass only when the job's profile names them; the client's own
/// tools, and harmless or gateway-wide betas, always pass.
#[tokio::test]
async fn anthropic_server_tools_and_betas_pass_only_when_the_profile_names_them() {
    let h = harness().await;
    let claude = |extra: Value| {
        let mut body = message("claude-sonnet-4-5", false);
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let search = claude(json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}));
    let fetch = claude(json!({"tools": [{"type": "web_fetch_20250910", "name": "web_fetch"}]}));
    let mcp = claude(
        json!({"mcp_servers": [{"type": "url", "url": "https://mcp.example.com/sse", "name": "x"}]}),
    );
    let client_side = claude(json!({"tools": [
        {"name": "Read", "description": "read a file", "input_schema": {"type": "object"}},
        {"type": "custom", "name": "f", "input_schema": {"type": "object"}},
        {"type": "bash_20250124", "name": "bash"},
        {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"}
    ]}));
    let plain = || claude(json!({}));
    let (messages, count) = (
        "anthropic/v1/messages",
        "anthropic/v1/messages/count_tokens",
    );
    check_tool_cases(
        &h,
        vec![
            (messages, plain(), None, 200, 200),
            (messages, client_side, None, 200, 200),
            (messages, search.clone(), None, 403, 200),
            (count, search, None, 403, 200),
            (messages, fetch, Some("web-fetch-2025-09-10"), 403, 403),
            (messages, mcp, Some("mcp-client-2025-04-04"), 403, 200),
            (messages, plain(), Some("files-api-2025-04-14"), 403, 403),
            // Built-in flags, the gateway config's own, several in one header.
            (
                messages,
                plain(),
                Some("claude-code-20250219, interleaved-thinking-2025-05-14,fake-beta-2025"),
                200,
                200,
            ),
            // A flag is allowed through the tool it turns on.
            (
                messages,
                plain(),
                Some("claude-code-20250219,mcp-client-2025-04-04"),
                403,
                200,
            ),
        ],
    )
    .await;
}

/// OpenAI's hosted tools (web search, MCP, file search) and Chat Completions' web search, and
/// Gemini's Google Search and URL context, pass only when the job's profile names them.
#[tokio::test]
async fn openai_and_gemini_hosted_tools_pass_only_when_the_profile_names_them() {
    let h = harness().await;
    let responses = |tools: Value| json!({"model": "gpt-5", "input": "hi", "tools": tools});
    let gemini = |tools: Value| json!({"contents": [], "tools": tools});
    let mcp =
        json!([{"type": "mcp", "server_label": "x", "server_url": "https://mcp.example.com"}]);
    let files = json!([{"type": "file_search", "vector_store_ids": ["vs_1"]}]);
    let function = json!([{"type": "function", "name": "f", "parameters": {}}]);
    let chat_search = json!({"model": "gpt-5", "messages": [], "web_search_options": {}});
    let (resp, chat) = ("openai/v1/responses", "openai/v1/chat/completions");
    let generate = "google/v1beta/models/gemini-2.5-pro:generateContent";
    check_tool_cases(
        &h,
        vec![
            (resp, responses(function), None, 200, 200),
            (
                resp,
                responses(json!([{"type": "web_search_preview"}])),
                None,
                403,
                200,
            ),
            (
                resp,
                responses(json!([{"type": "web_search"}])),
                None,
                403,
                200,
            ),
            (resp, responses(mcp), None, 403, 200),
            (resp, responses(files), None, 403, 403),
            (chat, chat_search, None, 403, 200),
            (
                generate,
                gemini(json!([{"functionDeclarations": [{"name": "f"}]}])),
                None,
                200,
                200,
            ),
            (
                generate,
                gemini(json!([{"googleSearch": {}}])),
                None,
                403,
                403,
            ),
            (
                generate,
                gemini(json!([{"url_context": {}}])),
                None,
                403,
                403,
            ),
        ],
    )
    .await;
}

/// Requests at once are capped per job (429) and for the whole gateway (503), both with
/// Retry-After, so no job can fill the gateway's memory with buffered bodies.
#[tokio::test]
async fn requests_at_once_are_capped_per_job_and_in_total() {
    let h = harness_custom(&Keys, |config| {
        config.max_concurrent_per_job = 2;
        config.max_concurrent = 3;
    })
    .await;
    let a = any_provider_job(&h, "job-busy-a", &[]).await;
    let b = any_provider_job(&h, "job-busy-b", &[]).await;
    h.mock.hold();
    let open = |token: &str| {
        h.http
            .post(format!("{}/anthropic/v1/messages", h.url))
            .header("x-api-key", token)
            .json(&message("claude-sonnet-4-5", true))
            .send()
    };
    let mut held = Vec::new();
    for token in [&a, &a, &b] {
        let mut response = open(token).await.unwrap();
        assert_eq!(response.status(), 200);
        response.chunk().await.unwrap().expect("the first event");
        held.push(response);
    }
    // Job a has its two; job b its one, which fills the gateway.
    let over_job = open(&a).await.unwrap();
    assert_eq!(over_job.status(), 429);
    assert_eq!(over_job.headers()["retry-after"], "1");
    let text = over_job.text().await.unwrap();
    assert!(
        text.contains("rate_limit_error") && text.contains("2 requests"),
        "{text}"
    );
    let over_all = open(&b).await.unwrap();
    assert_eq!(over_all.status(), 503);
    assert!(over_all.headers().contains_key("retry-after"));
    let text = over_all.text().await.unwrap();
    assert!(text.contains("overloaded_error"), "{text}");
    assert_eq!(
        h.mock.requests().len(),
        3,
        "refused requests are not forwarded"
    );

    // Once the answers end, both may call again.
    h.mock.release();
    for mut response in held {
        while response.chunk().await.unwrap().is_some() {}
    }
    for token in [&a, &b] {
        let (status, text) = h.messages(token, message("claude-sonnet-4-5", false)).await;
        assert_eq!(status, 200, "{text}");
    }
}

/// With a metrics listener of its own, `/metrics` is not on the address jobs reach.
#[tokio::test]
async fn metrics_are_kept_off_the_job_listener_when_they_have_their_own() {
    let h = harness_custom(&Keys, |config| {
        config.metrics_listen = Some(([127, 0, 0, 1], 0).into());
    })
    .await;
    let on_jobs = h
        .http
        .get(format!("{}/metrics", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(on_jobs.status(), 404);
    let text = on_jobs.text().await.unwrap();
    assert!(text.contains("FLOTILLA_LLM_METRICS_LISTEN"), "{text}");
    let metrics_url = h.metrics_url.clone().unwrap();
    let metrics = h.http.get(metrics_url).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    assert!(text.contains("flotilla_llm_requests_waiting"), "{text}");
}
