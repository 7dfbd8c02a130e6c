//! The llm-gateway against a real nats-server and a mock upstream over real HTTP: credential
//! swap and header allow-list, the token checks, streaming, metering and budgets.

use std::time::Duration;

use chrono::Utc;
use flotilla_nats::{Topology, TopologyConfig};
use flotilla_proto::{JobRecord, JobStatus, LlmGrant};
use flotilla_testkit::{
    MockLlm, NatsServer, TEST_ANTHROPIC_KEY, TEST_GOOGLE_KEY, TEST_OPENAI_KEY, mock_llm,
    wait_until,
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
    let nats = NatsServer::start().await.unwrap();
    let mock = MockLlm::start().await.unwrap();
    let text = mock_llm::gateway_config(&mock.url());
    let upstreams = Upstreams::parse(&text, keys).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = Config {
        listen: ([127, 0, 0, 1], port).into(),
        nats_url: nats.url(),
        nats: flotilla_nats::NatsOptions::default(),
        topology: TopologyConfig::default(),
        providers: upstreams.providers,
        prices: upstreams.prices,
        max_request_bytes: 1 << 20,
        upstream_timeout: Duration::from_secs(30),
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(llm_gateway::run(config, listener, shutdown.clone()));
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
