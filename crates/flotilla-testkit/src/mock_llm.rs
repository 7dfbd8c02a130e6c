//! A mock LLM upstream speaking Anthropic Messages (`POST /v1/messages`,
//! `/v1/messages/count_tokens`), OpenAI Chat Completions (`POST /v1/chat/completions`) and
//! Responses (`POST /v1/responses`), the Gemini API
//! (`POST /v1beta/models/<model>:generateContent`, `:streamGenerateContent`, `:countTokens`,
//! `GET /v1beta/models`) and `GET /v1/models`, streamed (SSE) or not, with usage fields shaped
//! like the real APIs'. It records every request it gets, routed or not (method, headers and
//! query, so the key it was sent), and can hold a streamed answer half-way until released, so a
//! test can see bytes arrive before the upstream has finished.
//!
//! Every answer says "mock answer", except that OpenAI Chat Completions can be told to answer
//! with a given text ([`MockLlm::start_with_openai_reply`], [`MockLlm::set_openai_reply`]): an
//! edit in Aider's format ([`aider_whole_edit`], [`aider_search_replace`]) makes the real
//! `aider` CLI change a file; or with a script of whole assistant messages, tool calls included
//! ([`MockLlm::script_openai`]), answered one a request, so an agent loop can be driven turn by
//! turn.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{Path, RawQuery, Request, State},
    http::{HeaderMap, Method, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::watch;

/// What every answer says unless told otherwise.
pub const MOCK_ANSWER: &str = "mock answer";

/// Usage every Anthropic answer reports.
pub const ANTHROPIC_USAGE: MockUsage = MockUsage {
    input: 100,
    output: 20,
    cache_read: 1000,
    cache_write: 50,
};
/// Usage every OpenAI answer reports (`prompt_tokens` includes the cached ones).
pub const OPENAI_USAGE: MockUsage = MockUsage {
    input: 200,
    output: 40,
    cache_read: 50,
    cache_write: 0,
};

/// Usage every Gemini answer reports: `input` is `promptTokenCount` (it includes the cached
/// ones), `output` is `candidatesTokenCount` plus [`GOOGLE_THOUGHTS`] thinking tokens.
pub const GOOGLE_USAGE: MockUsage = MockUsage {
    input: 300,
    output: 50,
    cache_read: 100,
    cache_write: 0,
};
/// The thinking part of [`GOOGLE_USAGE`]`.output` (`thoughtsTokenCount`).
pub const GOOGLE_THOUGHTS: u64 = 20;

#[derive(Debug, Clone, Copy)]
pub struct MockUsage {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write: u64,
}

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    /// The raw query string, if any.
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Value,
}

#[derive(Clone)]
struct Shared {
    requests: Arc<Mutex<Vec<Recorded>>>,
    /// While true, streamed answers pause after their first event.
    hold: watch::Sender<bool>,
    /// The assistant's text in OpenAI Chat Completions answers.
    openai_reply: Arc<Mutex<String>>,
    /// Scripted assistant messages, answered in order before `openai_reply`.
    openai_script: Arc<Mutex<VecDeque<Value>>>,
}

pub struct MockLlm {
    pub addr: SocketAddr,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl MockLlm {
    /// Listens on 127.0.0.1, on a free port.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with_openai_reply(MOCK_ANSWER).await
    }

    /// Like [`MockLlm::start`], but `POST /v1/chat/completions` answers with `text` as the
    /// assistant's message, streamed or not (see [`MockLlm::set_openai_reply`]).
    pub async fn start_with_openai_reply(text: impl Into<String>) -> anyhow::Result<Self> {
        let shared = Shared {
            requests: Arc::default(),
            hold: watch::channel(false).0,
            openai_reply: Arc::new(Mutex::new(text.into())),
            openai_script: Arc::default(),
        };
        let app = Router::new()
            .route("/v1/messages", post(anthropic))
            .route("/v1/messages/count_tokens", post(anthropic_count_tokens))
            .route("/v1/chat/completions", post(openai))
            .route("/v1/responses", post(openai_responses))
            .route("/v1/models", get(models))
            .route("/v1beta/models", get(google_models))
            .route("/v1beta/models/{call}", post(google))
            .fallback(unrouted)
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        // Like a real provider's server: streamed events go out as they are written.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, shared, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().expect("requests").clone()
    }

    /// Streamed answers stop after their first event until [`MockLlm::release`].
    pub fn hold(&self) {
        self.shared.hold.send_replace(true);
    }

    pub fn release(&self) {
        self.shared.hold.send_replace(false);
    }

    /// From now on `POST /v1/chat/completions` answers with `text` as the assistant's message
    /// content instead of [`MOCK_ANSWER`]: the whole `message.content` when not streamed, one
    /// `delta.content` chunk when streamed; usage and everything else stay the same. Aider
    /// (`--no-stream`) sends one non-streamed request per answer, so an edit in its format
    /// ([`aider_whole_edit`], [`aider_search_replace`]) here is the edit it applies.
    pub fn set_openai_reply(&self, text: impl Into<String>) {
        *self.shared.openai_reply.lock().expect("openai reply") = text.into();
    }

    /// Queues assistant messages for `POST /v1/chat/completions`: each request takes the next
    /// one, streamed or not as it asks, and once they are used up the answers are the plain
    /// reply again. A message is `{"content"?, "tool_calls"?: [{"id", "function": {"name",
    /// "arguments"}}]}` (see [`tool_call`]); streamed, its tool calls go out as deltas by
    /// index, the id and name first, then the arguments in two pieces. `finish_reason` is
    /// `tool_calls` when it has any, else `stop`.
    pub fn script_openai(&self, messages: Vec<Value>) {
        self.shared
            .openai_script
            .lock()
            .expect("openai script")
            .extend(messages);
    }

    /// The `messages` of every Chat Completions request, in order: what the agent told the
    /// model, tool results included.
    pub fn openai_messages(&self) -> Vec<Vec<Value>> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == "/v1/chat/completions")
            .map(|r| r.body["messages"].as_array().cloned().unwrap_or_default())
            .collect()
    }
}

/// One tool call for [`MockLlm::script_openai`]: `arguments` is sent as given (a string, which
/// need not be valid JSON).
pub fn tool_call(id: &str, name: &str, arguments: &str) -> Value {
    json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
}

/// An answer in Aider's `whole` edit format, the one it uses for a model it does not know
/// (such as `openai/mock-model`): the file's path, then its whole new content in a fenced block.
pub fn aider_whole_edit(path: &str, content: &str) -> String {
    let content = content.strip_suffix('\n').unwrap_or(content);
    format!("{path}\n```\n{content}\n```\n")
}

/// An answer in Aider's `diff` edit format, the one it uses for `gpt-5`, Claude and most known
/// models: the file's path, then a SEARCH/REPLACE block that replaces the exact lines `search`
/// with `replace`.
pub fn aider_search_replace(path: &str, search: &str, replace: &str) -> String {
    let search = search.strip_suffix('\n').unwrap_or(search);
    let replace = replace.strip_suffix('\n').unwrap_or(replace);
    format!("{path}\n```\n<<<<<<< SEARCH\n{search}\n=======\n{replace}\n>>>>>>> REPLACE\n```\n")
}

impl Drop for MockLlm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn record(
    shared: &Shared,
    path: &str,
    query: Option<String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Value {
    record_call(shared, Method::POST, path, query, headers, body)
}

fn record_call(
    shared: &Shared,
    method: Method,
    path: &str,
    query: Option<String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Value {
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    shared.requests.lock().expect("requests").push(Recorded {
        method,
        path: path.to_owned(),
        query,
        headers: headers.clone(),
        body: body.clone(),
    });
    body
}

async fn anthropic(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let request = record(&shared, "/v1/messages", None, &headers, &body);
    let model = request["model"]
        .as_str()
        .unwrap_or("claude-sonnet-4-5")
        .to_owned();
    let u = ANTHROPIC_USAGE;
    if request["stream"] != Value::Bool(true) {
        return Json(json!({
            "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": "mock answer"}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": u.input, "output_tokens": u.output,
                      "cache_read_input_tokens": u.cache_read,
                      "cache_creation_input_tokens": u.cache_write}
        }))
        .into_response();
    }
    let first = vec![sse(
        "message_start",
        &json!({"type": "message_start", "message": {"id": "msg_mock", "type": "message",
            "role": "assistant", "model": model, "content": [],
            "usage": {"input_tokens": u.input, "output_tokens": 1,
                      "cache_read_input_tokens": u.cache_read,
                      "cache_creation_input_tokens": u.cache_write}}}),
    )];
    let rest = vec![
        sse(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        sse(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "mock answer"}}),
        ),
        sse(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": 0}),
        ),
        sse(
            "message_delta",
            &json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                    "usage": {"output_tokens": u.output}}),
        ),
        sse("message_stop", &json!({"type": "message_stop"})),
    ];
    stream(&shared, first, rest)
}

async fn openai(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let request = record(&shared, "/v1/chat/completions", None, &headers, &body);
    let model = request["model"].as_str().unwrap_or("gpt-5").to_owned();
    let scripted = shared
        .openai_script
        .lock()
        .expect("openai script")
        .pop_front();
    let message = scripted.unwrap_or_else(
        || json!({"content": shared.openai_reply.lock().expect("openai reply").clone()}),
    );
    let content = message["content"].as_str().map(str::to_owned);
    let calls = message["tool_calls"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let finish = if calls.is_empty() {
        "stop"
    } else {
        "tool_calls"
    };
    let u = OPENAI_USAGE;
    let usage = json!({"prompt_tokens": u.input, "completion_tokens": u.output,
        "total_tokens": u.input + u.output,
        "prompt_tokens_details": {"cached_tokens": u.cache_read}});
    if request["stream"] != Value::Bool(true) {
        let mut answer = json!({"role": "assistant", "content": content});
        if !calls.is_empty() {
            answer["tool_calls"] = Value::Array(calls);
        }
        return Json(json!({
            "id": "chatcmpl-mock", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": answer, "finish_reason": finish}],
            "usage": usage
        }))
        .into_response();
    }
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1,
               "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let first = vec![data(&chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    ))];
    let mut rest = Vec::new();
    if let Some(content) = content.filter(|c| !c.is_empty() || calls.is_empty()) {
        rest.push(data(&chunk(json!({"content": content}), Value::Null)));
    }
    for (index, call) in calls.iter().enumerate() {
        let arguments = call["function"]["arguments"].as_str().unwrap_or_default();
        let split = arguments
            .char_indices()
            .nth(arguments.chars().count() / 2)
            .map_or(arguments.len(), |(i, _)| i);
        rest.push(data(&chunk(
            json!({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                   "function": {"name": call["function"]["name"], "arguments": ""}}]}),
            Value::Null,
        )));
        for part in [&arguments[..split], &arguments[split..]] {
            rest.push(data(&chunk(
                json!({"tool_calls": [{"index": index, "function": {"arguments": part}}]}),
                Value::Null,
            )));
        }
    }
    rest.push(data(&chunk(json!({}), json!(finish))));
    // Like OpenAI: usage only when the client asked for it.
    if request["stream_options"]["include_usage"] == Value::Bool(true) {
        rest.push(data(
            &json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk",
            "created": 1, "model": model, "choices": [], "usage": usage}),
        ));
    }
    rest.push("data: [DONE]\n\n".to_owned());
    stream(&shared, first, rest)
}

async fn anthropic_count_tokens(
    State(shared): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    record(&shared, "/v1/messages/count_tokens", None, &headers, &body);
    Json(json!({"input_tokens": ANTHROPIC_USAGE.input})).into_response()
}

/// Responses API, not streamed: the usage of [`OPENAI_USAGE`] in its own field names.
async fn openai_responses(
    State(shared): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = record(&shared, "/v1/responses", None, &headers, &body);
    let model = request["model"].as_str().unwrap_or("gpt-5").to_owned();
    let u = OPENAI_USAGE;
    Json(json!({
        "id": "resp_mock", "object": "response", "created_at": 1, "status": "completed",
        "model": model,
        "output": [{"type": "message", "id": "msg_mock", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": "mock answer", "annotations": []}]}],
        "usage": {"input_tokens": u.input, "output_tokens": u.output,
                  "total_tokens": u.input + u.output,
                  "input_tokens_details": {"cached_tokens": u.cache_read}}
    }))
    .into_response()
}

/// `GET /v1/models`, the listing Anthropic and OpenAI both serve (each with a few more fields).
async fn models(
    State(shared): State<Shared>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    record_call(
        &shared,
        Method::GET,
        "/v1/models",
        query,
        &headers,
        &Bytes::new(),
    );
    Json(json!({"object": "list", "data": [
        {"id": "claude-sonnet-4-5", "type": "model", "object": "model"},
        {"id": "gpt-5", "type": "model", "object": "model"}
    ]}))
    .into_response()
}

/// Anything else (files, batches, ...): recorded, so a test sees what got through, and 404.
async fn unrouted(State(shared): State<Shared>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_default();
    record_call(
        &shared,
        parts.method,
        parts.uri.path(),
        parts.uri.query().map(str::to_owned),
        &parts.headers,
        &body,
    );
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": "not a mock route"})),
    )
        .into_response()
}

async fn google_models(
    State(shared): State<Shared>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    record_call(
        &shared,
        Method::GET,
        "/v1beta/models",
        query,
        &headers,
        &Bytes::new(),
    );
    Json(json!({"models": [
        {"name": "models/gemini-2.5-pro", "displayName": "Gemini 2.5 Pro",
         "supportedGenerationMethods": ["generateContent", "countTokens"]},
        {"name": "models/gemini-2.5-flash", "displayName": "Gemini 2.5 Flash",
         "supportedGenerationMethods": ["generateContent", "countTokens"]}
    ]}))
    .into_response()
}

/// `/v1beta/models/<model>:<method>`: the model is in the path, as the Gemini API has it.
async fn google(
    State(shared): State<Shared>,
    Path(call): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let sse = query
        .as_deref()
        .is_some_and(|q| q.split('&').any(|p| p == "alt=sse"));
    record(
        &shared,
        &format!("/v1beta/models/{call}"),
        query,
        &headers,
        &body,
    );
    let Some((model, method)) = call.split_once(':') else {
        return (StatusCode::NOT_FOUND, "no method").into_response();
    };
    let u = GOOGLE_USAGE;
    // Cumulative usage, as every chunk of a Gemini stream reports it.
    let usage = |candidates: u64| {
        json!({"promptTokenCount": u.input, "candidatesTokenCount": candidates,
               "cachedContentTokenCount": u.cache_read, "thoughtsTokenCount": GOOGLE_THOUGHTS,
               "totalTokenCount": u.input + candidates + GOOGLE_THOUGHTS})
    };
    let chunk = |text: &str, candidates: u64, finish: bool| {
        let mut candidate = json!({"content": {"parts": [{"text": text}], "role": "model"},
                                   "index": 0});
        if finish {
            candidate["finishReason"] = json!("STOP");
        }
        json!({"candidates": [candidate], "usageMetadata": usage(candidates),
               "modelVersion": model, "responseId": "mock-response"})
    };
    let answer = u.output - GOOGLE_THOUGHTS;
    match method {
        "generateContent" => Json(chunk("mock answer", answer, true)).into_response(),
        "countTokens" => Json(json!({"totalTokens": u.input})).into_response(),
        "streamGenerateContent" => {
            let chunks = [
                chunk("mock ", 5, false),
                chunk("ans", 18, false),
                chunk("wer", answer, true),
            ];
            if !sse {
                // Without `alt=sse` the API streams one JSON array.
                return Json(Value::Array(chunks.to_vec())).into_response();
            }
            // The Gemini API ends its SSE lines with CRLF.
            let event = |v: &Value| format!("data: {v}\r\n\r\n");
            let first = vec![event(&chunks[0])];
            let rest = chunks[1..].iter().map(event).collect();
            stream(&shared, first, rest)
        }
        _ => (StatusCode::NOT_FOUND, format!("no method {method:?}")).into_response(),
    }
}

fn sse(event: &str, value: &Value) -> String {
    format!("event: {event}\ndata: {value}\n\n")
}

fn data(value: &Value) -> String {
    format!("data: {value}\n\n")
}

/// Sends `first`, waits while held, then sends `rest`.
fn stream(shared: &Shared, first: Vec<String>, rest: Vec<String>) -> Response {
    let mut hold = shared.hold.subscribe();
    let body = futures::stream::iter(first)
        .chain(futures::stream::once(async move {
            let _ =
                tokio::time::timeout(Duration::from_secs(30), hold.wait_for(|held| !held)).await;
            String::new()
        }))
        .chain(futures::stream::iter(rest))
        .filter(|s| std::future::ready(!s.is_empty()))
        .map(|s| Ok::<_, std::io::Error>(Bytes::from(s)));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header("request-id", "req_mock")
        .body(Body::from_stream(body))
        .expect("response")
}

/// An llm-gateway config whose `anthropic`, `openai` and `google` providers forward to
/// `upstream`, with keys from `FLOTILLA_TEST_ANTHROPIC_KEY` / `FLOTILLA_TEST_OPENAI_KEY` /
/// `FLOTILLA_TEST_GOOGLE_KEY` and prices per million tokens under which the Anthropic answer
/// above costs [`ANTHROPIC_COST`], the OpenAI one [`OPENAI_COST`] and the Gemini one
/// [`GOOGLE_COST`].
pub fn gateway_config(upstream: &str) -> String {
    format!(
        r#"# The fake claude CLI of the test worker image sends this beta flag.
allowed_betas = ["fake-beta-2025"]

[providers.anthropic]
kind = "anthropic"
base_url = "{upstream}"
api_key_env = "FLOTILLA_TEST_ANTHROPIC_KEY"

[providers.openai]
kind = "openai"
base_url = "{upstream}"
api_key_env = "FLOTILLA_TEST_OPENAI_KEY"

[providers.google]
kind = "google"
base_url = "{upstream}"
api_key_env = "FLOTILLA_TEST_GOOGLE_KEY"

[prices."claude-sonnet-4-5"]
input = 3.0
output = 15.0
cache_read = 0.3
cache_write = 3.75

[prices."gpt-5"]
input = 1.25
output = 10.0
cache_read = 0.125

[prices."gemini-2.5-pro"]
input = 1.25
output = 10.0
cache_read = 0.3125
"#
    )
}

/// USD of one Anthropic answer (100 in, 20 out, 1000 cache read, 50 cache write) at the test
/// prices.
pub const ANTHROPIC_COST: f64 = 0.0010875;
/// USD of one OpenAI answer (150 uncached in, 40 out, 50 cached) at the test prices.
pub const OPENAI_COST: f64 = 0.00059375;
/// USD of one Gemini answer from `gemini-2.5-pro` (200 uncached in, 30 + 20 thinking out, 100
/// cached) at the test prices.
pub const GOOGLE_COST: f64 = 0.00078125;

/// A job record running its first attempt, as a node leaves it after claiming: what a job
/// token is checked against.
pub fn running_record(job_id: &str) -> flotilla_proto::JobRecord {
    let request = flotilla_proto::JobRequest {
        agent_id: "agent-7".to_owned(),
        ..flotilla_proto::JobRequest::example(job_id, "claude-code", "hi")
    };
    let mut record = flotilla_proto::JobRecord::pending(&request);
    record.status = flotilla_proto::JobStatus::Running;
    record.attempt = 1;
    record
}

/// What a node grants a claude-code job on attempt 1 (ten minutes, Anthropic only).
pub fn grant(job_id: &str) -> flotilla_proto::LlmGrant {
    let now = chrono::Utc::now();
    flotilla_proto::LlmGrant {
        job_id: job_id.to_owned(),
        attempt: 1,
        node_id: "node-a".to_owned(),
        engine: "claude-code".to_owned(),
        profile: "default".to_owned(),
        agent_id: "agent-7".to_owned(),
        providers: vec!["anthropic".to_owned()],
        models: Vec::new(),
        max_budget_usd: None,
        allowed_provider_tools: Vec::new(),
        issued_at: now,
        expires_at: now + Duration::from_secs(600),
        revoked_at: None,
        traceparent: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn chat(mock: &MockLlm, stream: bool) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", mock.url()))
            .json(&json!({"model": "mock-model", "stream": stream,
                          "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .expect("request")
    }

    #[tokio::test]
    async fn openai_answers_with_the_reply_it_is_given() {
        let edit = aider_whole_edit("hello.py", "print(\"goodbye\")\n");
        assert_eq!(edit, "hello.py\n```\nprint(\"goodbye\")\n```\n");
        let mock = MockLlm::start_with_openai_reply(edit.clone())
            .await
            .expect("mock");
        let answer: Value = chat(&mock, false).await.json().await.expect("json");
        assert_eq!(answer["choices"][0]["message"]["content"], json!(edit));
        assert_eq!(answer["model"], json!("mock-model"));

        let edit = aider_search_replace("hello.py", "print(\"hello\")", "print(\"goodbye\")");
        assert_eq!(
            edit,
            "hello.py\n```\n<<<<<<< SEARCH\nprint(\"hello\")\n=======\nprint(\"goodbye\")\n>>>>>>> REPLACE\n```\n"
        );
        mock.set_openai_reply(edit.clone());
        let events = chat(&mock, true).await.text().await.expect("text");
        let text: String = events
            .lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .filter(|data| *data != "[DONE]")
            .map(|data| serde_json::from_str::<Value>(data).expect("chunk"))
            .filter_map(|chunk| {
                chunk["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        assert_eq!(text, edit);
        assert_eq!(mock.requests().len(), 2);
    }

    #[tokio::test]
    async fn scripted_openai_answers_come_in_order_streamed_or_not() {
        let mock = MockLlm::start().await.expect("mock");
        mock.script_openai(vec![
            json!({"tool_calls": [tool_call("c1", "shell", r#"{"command":"ls"}"#)]}),
            json!({"content": "thinking", "tool_calls": [tool_call("c2", "read_file", "{bad")]}),
            json!({"content": "done"}),
        ]);
        let first: Value = chat(&mock, false).await.json().await.expect("json");
        let choice = &first["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(
            choice["message"]["tool_calls"][0]["function"]["name"],
            "shell"
        );
        assert_eq!(choice["message"]["content"], Value::Null);

        let events = chat(&mock, true).await.text().await.expect("text");
        let chunks: Vec<Value> = events
            .lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .filter(|data| *data != "[DONE]")
            .map(|data| serde_json::from_str(data).expect("chunk"))
            .collect();
        let arguments: String = chunks
            .iter()
            .filter_map(|c| {
                c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str()
            })
            .collect();
        assert_eq!(arguments, "{bad");
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "thinking");
        assert_eq!(
            chunks.last().unwrap()["choices"][0]["finish_reason"],
            "tool_calls"
        );

        let third: Value = chat(&mock, false).await.json().await.expect("json");
        assert_eq!(third["choices"][0]["message"]["content"], "done");
        assert_eq!(third["choices"][0]["finish_reason"], "stop");
        let fourth: Value = chat(&mock, false).await.json().await.expect("json");
        assert_eq!(fourth["choices"][0]["message"]["content"], MOCK_ANSWER);
        assert_eq!(mock.openai_messages().len(), 4);
        assert_eq!(mock.openai_messages()[0][0]["content"], "hi");
    }

    #[tokio::test]
    async fn openai_says_mock_answer_by_default() {
        let mock = MockLlm::start().await.expect("mock");
        let answer: Value = chat(&mock, false).await.json().await.expect("json");
        assert_eq!(
            answer["choices"][0]["message"]["content"],
            json!(MOCK_ANSWER)
        );
    }
}
