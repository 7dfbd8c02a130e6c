//! One configuration everywhere: a profile or engine changed through one gateway reaches the
//! other gateway and the nodes without a restart; a change that does not load is refused.

use std::time::Duration;

use flotilla_testkit::{Fleet, wait_until};
use reqwest::Method;
use serde_json::{Value, json};

use crate::wait;

const GREETER: &str = r#"
[agent]
description = "Greets (test)"
engine = "shell"

[prompt]
template = "echo hello {{ name }}"

[prompt.variables.name]
type = "string"
required = true
"#;

const ECHOER: &str = r#"
[engine]
name = "Echoer"
description = "Prints its prompt (test)"

[command]
binary = "echo"
prompt_flag = ""

[output]
format = "text"
parser = "text"
"#;

async fn put(fleet: &Fleet, path: &str, content: &str) -> (u16, Value) {
    let response = fleet
        .request(Method::PUT, path)
        .json(&json!({ "content": content }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// `POST /jobs` on the second gateway.
async fn submit_on_second(fleet: &Fleet, body: Value) -> (u16, Value) {
    let url = format!("{}/jobs", fleet.extra_gateways[0].1);
    let response = fleet.http.post(url).json(&body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn a_configuration_change_reaches_every_gateway_and_node() {
    let fleet = Fleet::builder().gateways(2).start().await.unwrap();
    let second = fleet.extra_gateways[0].1.clone();

    let (status, body) = put(&fleet, "/configs/profile/greeter", GREETER).await;
    assert_eq!(status, 200, "{body}");
    wait_until(
        Duration::from_secs(10),
        "the second gateway to know the new profile",
        || async {
            let profiles: Value = fleet
                .http
                .get(format!("{second}/profiles"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            profiles["profiles"]
                .as_array()?
                .iter()
                .any(|p| p["name"] == "greeter")
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));

    // Its typed variables are enforced at submit on the other gateway too.
    let (status, error) =
        submit_on_second(&fleet, json!({ "agent_id": "cfg", "profile": "greeter" })).await;
    assert_eq!(status, 422, "{error}");
    assert_eq!(error["error"]["field"], "prompt_vars.name");
    let (status, accepted) = submit_on_second(
        &fleet,
        json!({ "agent_id": "cfg", "profile": "greeter", "prompt_vars": { "name": "fleet" } }),
    )
    .await;
    assert_eq!(status, 202, "{accepted}");
    let job = wait(&fleet, accepted["job_id"].as_str().unwrap()).await;
    assert_eq!(job["result"]["text"], "hello fleet\n", "{job}");

    // A new engine reaches the node as well.
    let (status, body) = put(&fleet, "/configs/engine/echoer", ECHOER).await;
    assert_eq!(status, 200, "{body}");
    let version = body["version"].as_u64().unwrap();
    wait_until(
        Duration::from_secs(10),
        "both gateways on the same configuration version",
        || async {
            let configs: Value = fleet
                .http
                .get(format!("{second}/configs"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (configs["version"].as_u64()? >= version).then_some(())
        },
    )
    .await
    .unwrap();
    let (status, accepted) = submit_on_second(
        &fleet,
        json!({ "agent_id": "cfg", "engine": "echoer", "prompt": "from a new engine" }),
    )
    .await;
    assert_eq!(status, 202, "{accepted}");
    let job = wait(&fleet, accepted["job_id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["result"]["text"], "from a new engine", "{job}");

    // A change that does not load is refused, and nothing changes.
    let (status, error) = put(
        &fleet,
        "/configs/profile/greeter",
        "[agent]\nengine = \"no-such-engine\"\n",
    )
    .await;
    assert_eq!(status, 422, "{error}");
    assert_eq!(error["error"]["code"], "invalid_config");
    let (status, accepted) = submit_on_second(
        &fleet,
        json!({ "agent_id": "cfg", "profile": "greeter", "prompt_vars": { "name": "again" } }),
    )
    .await;
    assert_eq!(status, 202, "{accepted}");
    fleet.assert_no_containers_left().await.unwrap();
}

/// `available` of `engine` in `GET /engines`, if it is listed.
async fn available(fleet: &Fleet, engine: &str) -> Option<bool> {
    let engines: Value = fleet
        .request(Method::GET, "/engines")
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    engines["engines"]
        .as_array()?
        .iter()
        .find(|e| e["id"] == engine)
        .map(|e| e["available"] == true)
}

#[tokio::test]
async fn an_engine_is_available_only_if_the_worker_image_has_its_binary() {
    let fleet = Fleet::builder().start().await.unwrap();
    // The shipped engines' (fake) CLIs are in the test image.
    for engine in [
        "shell",
        "claude-code",
        "codex",
        "opencode",
        "aider",
        "gemini",
    ] {
        let expected = match engine {
            // These call an LLM, and this fleet has no llm-gateway.
            "claude-code" | "codex" | "opencode" | "aider" | "gemini" => false,
            _ => true,
        };
        assert_eq!(available(&fleet, engine).await, Some(expected), "{engine}");
    }
    let ghost = ECHOER.replace("\"echo\"", "\"no-such-cli\"");
    let (status, body) = put(&fleet, "/configs/engine/ghost", &ghost).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = put(&fleet, "/configs/engine/echoer", ECHOER).await;
    assert_eq!(status, 200, "{body}");
    // Added at runtime: the node probes both binaries; only echo is in the image. A deadline,
    // not a timing goal: the probe is a container, slow to start while the suite loads Docker.
    wait_until(
        Duration::from_secs(60),
        "echoer to become available",
        || async { available(&fleet, "echoer").await.filter(|a| *a) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    wait_until(
        Duration::from_secs(20),
        "the node to report no-such-cli missing",
        || async { fleet.logs().contains("no-such-cli").then_some(()) },
    )
    .await
    .unwrap();
    assert_eq!(available(&fleet, "ghost").await, Some(false));
    fleet.assert_no_containers_left().await.unwrap();
}

#[tokio::test]
async fn configs_are_listed_whole_or_by_type() {
    let fleet = Fleet::builder().start().await.unwrap();
    let list = |query: &'static str| {
        let fleet = &fleet;
        async move {
            let response = fleet
                .request(Method::GET, &format!("/configs{query}"))
                .send()
                .await
                .unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        }
    };
    let (status, all) = list("").await;
    assert_eq!(status, 200, "{all}");
    let kinds = |body: &Value| -> Vec<String> {
        let mut kinds: Vec<String> = body["configs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|file| file["type"].as_str().unwrap().to_owned())
            .collect();
        kinds.dedup();
        kinds
    };
    assert_eq!(kinds(&all), ["engine", "profile", "template"], "{all}");
    for (kind, query) in [
        ("engine", "?type=engine"),
        ("profile", "?type=profile"),
        ("template", "?type=template"),
    ] {
        let (status, some) = list(query).await;
        assert_eq!(status, 200, "{some}");
        assert_eq!(kinds(&some), [kind], "{some}");
        let expected = all["configs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|file| file["type"] == kind)
            .count();
        assert_eq!(some["configs"].as_array().unwrap().len(), expected);
    }
    let (status, error) = list("?type=engines").await;
    assert_eq!(status, 422, "{error}");
    assert_eq!(error["error"]["field"], "type", "{error}");
}

/// With `FLOTILLA_ADMIN_API_KEY` set, only that key changes the configuration: the ordinary key
/// still reads it and does everything else, but its `PUT` and `DELETE` get 403 and change
/// nothing. The admin key works everywhere.
#[tokio::test]
async fn only_the_admin_key_changes_the_configuration_when_one_is_set() {
    const KEY: &str = "submit-key-0123456789";
    const ADMIN: &str = "admin-key-0123456789";
    let fleet = Fleet::builder()
        .nodes(0)
        .api_key(KEY)
        .gateway_env("FLOTILLA_ADMIN_API_KEY", ADMIN)
        .start()
        .await
        .unwrap();
    let call = |key: &str, method: Method, path: &str| {
        fleet
            .http
            .request(method, format!("{}{path}", fleet.api))
            .bearer_auth(key)
    };
    let template = json!({ "content": "Hello {{ name }}" });
    let path = "/configs/template/admin-e2e.md.j2";

    // The ordinary key: 403 naming the admin key, and nothing written or deleted.
    for (method, path) in [
        (Method::PUT, path),
        (Method::DELETE, "/configs/template/agent-base.md.j2"),
    ] {
        let response = call(KEY, method.clone(), path)
            .json(&template)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403, "{method} {path}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "forbidden", "{error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains("FLOTILLA_ADMIN_API_KEY"), "{message}");
    }
    let read = |key: &'static str, path: &'static str| {
        let request = call(key, Method::GET, path);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(read(KEY, "/configs/template/admin-e2e.md.j2").await, 404);
    assert_eq!(read(KEY, "/configs/template/agent-base.md.j2").await, 200);
    assert_eq!(read(KEY, "/configs").await, 200);

    // The admin key writes and deletes, and works on the other paths too.
    let written = call(ADMIN, Method::PUT, path)
        .json(&template)
        .send()
        .await
        .unwrap();
    assert_eq!(written.status(), 200, "{}", written.text().await.unwrap());
    assert_eq!(read(KEY, "/configs/template/admin-e2e.md.j2").await, 200);
    let deleted = call(ADMIN, Method::DELETE, path).send().await.unwrap();
    assert_eq!(deleted.status(), 200, "{}", deleted.text().await.unwrap());
    let job = json!({"agent_id": "admin", "engine": "shell", "prompt": "true"});
    let submitted = call(ADMIN, Method::POST, "/jobs")
        .json(&job)
        .send()
        .await
        .unwrap();
    assert_eq!(submitted.status(), 202);
    assert_eq!(read(ADMIN, "/jobs").await, 200);

    // Any other key is still 401, on reads and writes alike.
    assert_eq!(read("wrong-key-0123456789", "/configs").await, 401);
    let wrong = call("wrong-key-0123456789", Method::PUT, path)
        .json(&template)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
}
