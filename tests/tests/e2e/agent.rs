//! Flotilla's own agent (`engine: flotilla`, crates/flotilla-agent) end to end: the static
//! binary in the test worker image, the real llm-gateway with the job's token, and the mock LLM
//! scripted turn by turn with the tool calls a model would make.

use std::time::Duration;

use flotilla_testkit::{Fleet, MockLlm, mock_llm::tool_call};
use reqwest::Method;
use serde_json::{Value, json};

use crate::{LogReader, js_context, submit, wait};

fn agent(prompt: &str) -> Value {
    json!({"agent_id": "agent-e2e", "engine": "flotilla", "prompt": prompt, "model": "gpt-5"})
}

async fn fleet(mock: &MockLlm) -> Fleet {
    Fleet::builder().llm(&mock.url()).start().await.unwrap()
}

/// The content of the tool result answering `call_id`, as the model received it in `request`.
fn tool_result(mock: &MockLlm, request: usize, call_id: &str) -> String {
    let messages = &mock.openai_messages()[request];
    messages
        .iter()
        .find(|m| m["role"] == "tool" && m["tool_call_id"] == call_id)
        .and_then(|m| m["content"].as_str())
        .unwrap_or_else(|| panic!("no result for {call_id} in {messages:#?}"))
        .to_owned()
}

fn logs(job: &Value) -> &str {
    job["result"]["logs_tail"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn several_tools_in_order_feed_their_results_back_to_the_model() {
    let mock = MockLlm::start().await.unwrap();
    mock.script_openai(vec![
        json!({"content": "I will write a script.", "tool_calls": [tool_call(
            "w", "write_file",
            r#"{"path": "calc/run.sh", "content": "echo $((6 * 7)) > answer.txt\necho computed\n"}"#,
        )]}),
        json!({"tool_calls": [tool_call("s", "shell", r#"{"command": "sh calc/run.sh"}"#)]}),
        json!({"tool_calls": [
            tool_call("r", "read_file", r#"{"path": "answer.txt"}"#),
            tool_call("l", "list_dir", r#"{"path": "."}"#),
        ]}),
        json!({"content": "The answer is 42."}),
    ]);
    let fleet = fleet(&mock).await;
    let job = wait(
        &fleet,
        &submit(&fleet, agent("compute 6 * 7 with a script")).await,
    )
    .await;
    assert_eq!(job["status"], "completed", "{job:#}\n{}", fleet.logs());

    // Each result reached the model in the next request, in order.
    assert_eq!(mock.openai_messages().len(), 4, "{job:#}");
    assert_eq!(tool_result(&mock, 1, "w"), "wrote 43 bytes to calc/run.sh");
    assert_eq!(tool_result(&mock, 2, "s"), "exit code: 0\ncomputed\n");
    assert_eq!(tool_result(&mock, 3, "r"), "42\n");
    let listing = tool_result(&mock, 3, "l");
    assert!(
        listing.contains("answer.txt") && listing.contains("calc/"),
        "{listing}"
    );
    let first = &mock.openai_messages()[0];
    assert_eq!(first[0]["role"], "system");
    assert_eq!(first[1]["content"], "compute 6 * 7 with a script");
    // Through the gateway: the job's token, the real key upstream, streamed by default.
    let request = &mock.requests()[0];
    assert_eq!(
        request.headers["authorization"],
        format!("Bearer {}", flotilla_testkit::TEST_OPENAI_KEY)
    );
    assert_eq!(request.body["stream"], true);
    let tools: Vec<&str> = request.body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(tools, ["shell", "read_file", "write_file", "list_dir"]);

    let result = &job["result"];
    assert_eq!(result["text"], "The answer is 42.", "{job:#}");
    assert_eq!(result["num_turns"], 4);
    let transcript = result["raw"].as_array().unwrap();
    assert_eq!(transcript.last().unwrap()["content"], "The answer is 42.");
    assert_eq!(job["usage"]["metered"], true, "{job:#}");
    assert_eq!(job["usage"]["requests"], 4);
    // The steps were in the job's log as they happened.
    let log = logs(&job);
    for step in [
        "I will write a script.",
        "-> shell",
        "<- exit code: 0",
        "-> read_file",
    ] {
        assert!(log.contains(step), "{step:?} not in {log}");
    }
    fleet.assert_no_containers_left().await.unwrap();
}

#[tokio::test]
async fn the_agent_runs_without_streaming_too() {
    let mock = MockLlm::start().await.unwrap();
    mock.script_openai(vec![
        json!({"tool_calls": [tool_call("s", "shell", r#"{"command": "echo plain"}"#)]}),
        json!({"content": "said plain"}),
    ]);
    let fleet = fleet(&mock).await;
    // The same engine with --no-stream, added at runtime.
    let engine = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../engines/flotilla.toml"
    ))
    .unwrap()
    .replace(
        "end_of_options = true",
        "end_of_options = true\nstatic_args = [\"--no-stream\"]",
    );
    let response = fleet
        .request(Method::PUT, "/configs/engine/flotilla-plain")
        .json(&json!({ "content": engine }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let mut body = agent("say plain");
    body["engine"] = json!("flotilla-plain");
    let job = flotilla_testkit::wait_until(
        Duration::from_secs(60),
        "flotilla-plain to be accepted and run",
        || async {
            let response = fleet
                .request(Method::POST, "/jobs")
                .json(&body)
                .send()
                .await
                .ok()?;
            if response.status() != 202 {
                return None;
            }
            let id: Value = response.json().await.ok()?;
            Some(wait(&fleet, id["job_id"].as_str()?).await)
        },
    )
    .await
    .unwrap();
    assert_eq!(job["status"], "completed", "{job:#}\n{}", fleet.logs());
    assert_eq!(job["result"]["text"], "said plain");
    let requests = mock.requests();
    assert!(
        requests.iter().all(|r| r.body.get("stream").is_none()),
        "{requests:?}"
    );
    assert_eq!(tool_result(&mock, 1, "s"), "exit code: 0\nplain\n");
}

#[tokio::test]
async fn a_missing_binary_is_a_tool_error_and_the_agent_carries_on() {
    let mock = MockLlm::start().await.unwrap();
    mock.script_openai(vec![
        json!({"tool_calls": [tool_call("py", "shell", r#"{"command": "python3 -c 'print(1)'"}"#)]}),
        json!({"tool_calls": [tool_call("sh", "shell", r#"{"command": "echo $((1 + 1))"}"#)]}),
        json!({"content": "No python here; the shell says 2."}),
    ]);
    let fleet = fleet(&mock).await;
    let job = wait(&fleet, &submit(&fleet, agent("print 1 + 1")).await).await;
    assert_eq!(job["status"], "completed", "{job:#}\n{}", fleet.logs());
    let missing = tool_result(&mock, 1, "py");
    assert!(missing.starts_with("exit code: 127\n"), "{missing}");
    assert!(missing.contains("not found"), "{missing}");
    assert_eq!(tool_result(&mock, 2, "sh"), "exit code: 0\n2\n");
    assert_eq!(job["result"]["num_turns"], 3);
}

#[tokio::test]
async fn malformed_tool_calls_are_answered_as_errors_and_the_loop_goes_on() {
    let mock = MockLlm::start().await.unwrap();
    mock.script_openai(vec![
        json!({"tool_calls": [
            tool_call("bad", "shell", r#"{"command": "ls"#),
            tool_call("unknown", "frobnicate", "{}"),
            tool_call("array", "read_file", "[1, 2]"),
            tool_call("missing", "write_file", r#"{"path": "x"}"#),
        ]}),
        json!({"content": "recovered"}),
    ]);
    let fleet = fleet(&mock).await;
    let job = wait(&fleet, &submit(&fleet, agent("do something")).await).await;
    assert_eq!(job["status"], "completed", "{job:#}\n{}", fleet.logs());
    assert_eq!(job["result"]["text"], "recovered");
    let bad = tool_result(&mock, 1, "bad");
    assert!(
        bad.starts_with("error: the arguments of shell are not valid JSON"),
        "{bad}"
    );
    let unknown = tool_result(&mock, 1, "unknown");
    assert!(
        unknown.starts_with("error: unknown tool \"frobnicate\""),
        "{unknown}"
    );
    let array = tool_result(&mock, 1, "array");
    assert!(array.contains("not a JSON object"), "{array}");
    let missing = tool_result(&mock, 1, "missing");
    assert!(
        missing.contains("missing the required argument content"),
        "{missing}"
    );
}

#[tokio::test]
async fn max_turns_ends_the_run_and_fails_the_job() {
    let mock = MockLlm::start().await.unwrap();
    let again = || json!({"tool_calls": [tool_call("t", "shell", r#"{"command": "true"}"#)]});
    mock.script_openai(vec![again(), again(), again(), again()]);
    let fleet = fleet(&mock).await;
    let mut body = agent("loop forever");
    body["max_turns"] = json!(2);
    let job = wait(&fleet, &submit(&fleet, body).await).await;
    assert_eq!(job["status"], "failed", "{job:#}");
    assert_eq!(mock.openai_messages().len(), 2, "{job:#}");
    assert_eq!(
        job["result"]["text"],
        "max turns (2) reached without a final answer"
    );
    assert_eq!(job["result"]["num_turns"], 2);
    assert_eq!(job["exit_code"], 3, "{job:#}");
}

#[tokio::test]
async fn a_spent_budget_cuts_the_agent_off_with_the_budget_message() {
    let mock = MockLlm::start().await.unwrap();
    let again = || json!({"tool_calls": [tool_call("t", "shell", r#"{"command": "true"}"#)]});
    mock.script_openai(vec![again(), again(), again(), again(), again()]);
    let fleet = fleet(&mock).await;
    // Each answer costs 0.00059375: the second crosses 0.001, the third is refused with 402.
    let mut body = agent("work hard");
    body["max_budget_usd"] = json!(0.001);
    let job = wait(&fleet, &submit(&fleet, body).await).await;
    assert_eq!(job["status"], "failed", "{job:#}");
    assert_eq!(
        job["error"], "budget exceeded: spent $0.0012 of its $0.001 max_budget_usd",
        "{job:#}"
    );
    assert_eq!(
        mock.openai_messages().len(),
        2,
        "the third call must not reach the upstream"
    );
    assert_eq!(job["usage"]["budget_exceeded"], true);
    // The agent says why it stopped (unless the node stopped it first: it watches the budget).
    let text = job["result"]["text"].as_str().unwrap_or_default();
    if !text.is_empty() {
        assert!(
            text.starts_with("budget exceeded: the llm-gateway refused turn 3 (402)"),
            "{job:#}"
        );
        assert_eq!(job["exit_code"], 4, "{job:#}");
    }
}

#[tokio::test]
async fn cancelling_mid_tool_stops_the_command_with_the_container() {
    let mock = MockLlm::start().await.unwrap();
    mock.script_openai(vec![json!({"tool_calls": [tool_call(
        "long", "shell", r#"{"command": "echo sleeping; sleep 300", "timeout_seconds": 600}"#,
    )]})]);
    let fleet = fleet(&mock).await;
    let js = js_context(&fleet).await;
    let job_id = submit(&fleet, agent("wait a long time")).await;
    // Until the agent says it runs the command.
    let mut logs = LogReader::open(&js, &job_id).await;
    let mut seen = String::new();
    while !seen.contains("-> shell") {
        seen.push_str(&String::from_utf8_lossy(&logs.next().await.data));
    }
    let response = fleet
        .request(Method::DELETE, &format!("/jobs/{job_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let job = wait(&fleet, &job_id).await;
    assert_eq!(job["status"], "cancelled", "{job:#}");
    assert_eq!(mock.openai_messages().len(), 1);
    fleet.assert_no_containers_left().await.unwrap();
}

#[tokio::test]
async fn file_tools_stay_inside_the_workspace() {
    let mock = MockLlm::start().await.unwrap();
    mock.script_openai(vec![
        json!({"tool_calls": [
            tool_call("dotdot", "read_file", r#"{"path": "../etc/passwd"}"#),
            tool_call("abs", "read_file", r#"{"path": "/etc/passwd"}"#),
            tool_call("sneaky", "write_file", r#"{"path": "/workspace/../tmp/x", "content": "x"}"#),
            tool_call("link", "shell", r#"{"command": "ln -s /etc etc-link && ln -s /tmp/nowhere dangling"}"#),
        ]}),
        json!({"tool_calls": [
            tool_call("through", "read_file", r#"{"path": "etc-link/passwd"}"#),
            tool_call("dangling", "write_file", r#"{"path": "dangling", "content": "x"}"#),
            tool_call("inside", "write_file", r#"{"path": "/workspace/ok/inside.txt", "content": "fine"}"#),
            tool_call("list", "list_dir", r#"{"path": "/"}"#),
        ]}),
        json!({"tool_calls": [tool_call("check", "shell", r#"{"command": "cat ok/inside.txt; echo; test -e /tmp/x || echo no-x"}"#)]}),
        json!({"content": "done"}),
    ]);
    let fleet = fleet(&mock).await;
    let job = wait(&fleet, &submit(&fleet, agent("try to escape")).await).await;
    assert_eq!(job["status"], "completed", "{job:#}\n{}", fleet.logs());
    for (request, id) in [
        (1, "dotdot"),
        (1, "abs"),
        (1, "sneaky"),
        (2, "through"),
        (2, "list"),
    ] {
        let answer = tool_result(&mock, request, id);
        assert!(
            answer.starts_with("error: ") && answer.contains("is outside the workspace /workspace"),
            "{id}: {answer}"
        );
    }
    let dangling = tool_result(&mock, 2, "dangling");
    assert!(
        dangling.contains("symlink that points nowhere"),
        "{dangling}"
    );
    assert_eq!(
        tool_result(&mock, 2, "inside"),
        "wrote 4 bytes to /workspace/ok/inside.txt"
    );
    // Nothing was written outside; the file inside was.
    assert_eq!(tool_result(&mock, 3, "check"), "exit code: 0\nfine\nno-x\n");
}
