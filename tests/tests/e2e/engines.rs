//! Every agent engine end to end through its fake CLI in a real container: the fake checks
//! the argv the engine file builds, prints output in the real CLI's format, and the node
//! extracts the structured result.

use flotilla_testkit::Fleet;
use serde_json::{Value, json};

use crate::{submit, wait};

async fn run(fleet: &Fleet, engine: &str, extra: Value) -> Value {
    let mut body = json!({ "agent_id": "engines", "engine": engine, "prompt": "list the files" });
    for (key, value) in extra.as_object().unwrap() {
        body[key] = value.clone();
    }
    let job_id = submit(fleet, body).await;
    wait(fleet, &job_id).await
}

#[tokio::test]
async fn every_engine_runs_through_its_cli_and_yields_a_structured_result() {
    let fleet = Fleet::builder().slots(4).start().await.unwrap();
    for (engine, name, format) in [
        ("claude-code", "claude", "json"),
        ("claude-code", "claude", "stream-json"),
        ("codex", "codex", "json"),
        ("gemini", "gemini", "json"),
        ("opencode", "opencode", "json"),
        // OpenCode spells these `default` and `json` (`[command.values]`).
        ("opencode", "opencode", "text"),
        ("opencode", "opencode", "stream-json"),
        ("aider", "aider", "text"),
    ] {
        let job = run(&fleet, engine, json!({ "output_format": format })).await;
        assert_eq!(job["status"], "completed", "{engine}/{format}: {job}");
        let result = &job["result"];
        let answer = format!("fake {name}: list the files");
        if engine == "aider" {
            // Aider prints plain text: the whole output is the answer; its token report is read.
            assert!(result["text"].as_str().unwrap().contains(&answer), "{job}");
            assert_eq!(job["usage"]["input_tokens"], 1200, "{job}");
        } else if format == "text" {
            assert_eq!(result["text"], answer, "{engine}/{format}: {job}");
            assert!(result["raw"].is_null(), "plain text has no raw: {job}");
        } else {
            assert_eq!(result["text"], answer, "{engine}/{format}: {job}");
            assert!(
                result["raw"].is_object() || result["raw"].is_array(),
                "{engine}/{format}: raw kept: {job}"
            );
        }
        if engine == "claude-code" {
            assert!(
                result["session_id"].as_str().is_some_and(|s| !s.is_empty()),
                "{job}"
            );
            assert_eq!(result["num_turns"], 1, "{job}");
            assert!(
                job["usage"]["output_tokens"]
                    .as_u64()
                    .is_some_and(|t| t > 0),
                "{job}"
            );
            assert!(
                job["usage"]["cost_usd"].as_f64().is_some_and(|c| c > 0.0),
                "{job}"
            );
        }
    }
}

/// Flotilla's own agent has no fake: the real binary runs, against the mock LLM behind a real
/// llm-gateway, which answers with what a fake CLI would say.
#[tokio::test]
async fn the_flotilla_agent_runs_through_the_gateway_and_yields_a_structured_result() {
    let mock = flotilla_testkit::MockLlm::start_with_openai_reply("fake flotilla: list the files")
        .await
        .unwrap();
    let fleet = Fleet::builder().llm(&mock.url()).start().await.unwrap();
    let job = run(
        &fleet,
        "flotilla",
        json!({ "model": "gpt-5", "output_format": "json" }),
    )
    .await;
    assert_eq!(job["status"], "completed", "{job}\n{}", fleet.logs());
    let result = &job["result"];
    assert_eq!(result["text"], "fake flotilla: list the files", "{job}");
    assert_eq!(result["num_turns"], 1, "{job}");
    assert!(result["raw"].is_array(), "the transcript is kept: {job}");
    assert_eq!(job["usage"]["metered"], true, "{job}");
    assert!(
        job["usage"]["cost_usd"].as_f64().is_some_and(|c| c > 0.0),
        "{job}"
    );
}

#[tokio::test]
async fn an_engine_error_result_fails_the_job_with_its_message() {
    let fleet = Fleet::builder().start().await.unwrap();
    let mut body =
        json!({ "agent_id": "engines", "engine": "claude-code", "prompt": "please FAIL now" });
    body["output_format"] = json!("json");
    let job = wait(&fleet, &submit(&fleet, body).await).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert!(
        job["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{job}"
    );
}

#[tokio::test]
async fn dry_run_shows_the_exact_command_for_every_engine() {
    let fleet = Fleet::builder().slots(4).start().await.unwrap();
    for (engine, binary) in [
        ("claude-code", "claude"),
        ("codex", "codex"),
        ("gemini", "gemini"),
        ("opencode", "opencode"),
        ("aider", "aider"),
        ("flotilla", "flotilla-agent"),
        ("shell", "/bin/sh"),
    ] {
        let job = run(&fleet, engine, json!({ "dry_run": true })).await;
        assert_eq!(job["status"], "completed", "{engine}: {job}");
        let command = job["result"]["command"].as_array().unwrap();
        assert_eq!(command[0], binary, "{engine}: {job}");
        assert!(
            command.iter().any(|arg| arg == "list the files"),
            "{engine}: prompt missing: {job}"
        );
        assert_eq!(job["result"]["raw"]["engine"], engine);
    }
}
