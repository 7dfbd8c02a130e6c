//! Jobs and the llm-gateway, end to end: real nodes, real containers on the fenced job network,
//! the real llm-gateway binary, and a mock upstream standing in for the provider.

use std::process::Command;

use flotilla_proto::{Encoding, LlmGrant, names};
use flotilla_testkit::{
    Fleet, MockLlm, TEST_ANTHROPIC_KEY, TEST_GOOGLE_KEY, TEST_OPENAI_KEY, mock_llm,
};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::{js_context, shell, submit, wait};

fn claude(prompt: &str) -> Value {
    json!({"agent_id": "llm-e2e", "engine": "claude-code", "prompt": prompt,
           "model": "claude-sonnet-4-5", "output_format": "json"})
}

/// Every grant in the bucket.
async fn grants(fleet: &Fleet) -> Vec<LlmGrant> {
    let js = js_context(fleet).await;
    let store = js.get_key_value(names::BUCKET_LLM_GRANTS).await.unwrap();
    let mut keys = store.keys().await.unwrap();
    let mut out = Vec::new();
    while let Some(key) = keys.next().await {
        let value = store.get(key.unwrap()).await.unwrap().unwrap();
        out.push(flotilla_proto::decode(&value, Encoding::MessagePack).unwrap());
    }
    out
}

#[tokio::test]
async fn an_engine_job_calls_the_gateway_with_its_own_token_and_is_metered() {
    let mock = MockLlm::start().await.unwrap();
    let fleet = Fleet::builder().llm(&mock.url()).start().await.unwrap();
    let job_id = submit(&fleet, claude("say hi LLM_CALLS=2")).await;
    let job = wait(&fleet, &job_id).await;
    assert_eq!(job["status"], "completed", "{job:#}\n{}", fleet.logs());

    // The container called the gateway twice with its token; the upstream saw the real key.
    let seen = mock.requests();
    assert_eq!(seen.len(), 2, "{job:#}");
    for request in &seen {
        assert_eq!(request.headers["x-api-key"], TEST_ANTHROPIC_KEY);
        assert_eq!(request.headers["anthropic-beta"], "fake-beta-2025");
        assert_eq!(request.body["model"], "claude-sonnet-4-5");
    }
    let logs = job["result"]["logs_tail"].as_str().unwrap();
    assert!(logs.contains("llm call 2 answered"), "{logs}");

    // Metered by the gateway: exact, and it replaces what the CLI claimed (cost 0.0123).
    let usage = &job["usage"];
    assert_eq!(usage["metered"], true, "{usage}");
    assert_eq!(usage["requests"], 2);
    assert_eq!(usage["input_tokens"], 200);
    assert_eq!(usage["output_tokens"], 40);
    assert_eq!(usage["cache_read_tokens"], 2000);
    assert_eq!(usage["cache_write_tokens"], 100);
    let cost = usage["cost_usd"].as_f64().unwrap();
    assert!(
        (cost - 2.0 * mock_llm::ANTHROPIC_COST).abs() < 1e-9,
        "{usage}"
    );

    // One grant for the attempt, revoked when it ended.
    let all = grants(&fleet).await;
    let ours: Vec<_> = all.iter().filter(|g| g.job_id == job_id).collect();
    assert_eq!(ours.len(), 1, "{all:?}");
    assert_eq!(ours[0].providers, vec!["anthropic".to_owned()]);
    assert!(ours[0].revoked_at.is_some(), "{:?}", ours[0]);

    assert_no_secret_anywhere(&fleet, &job, &["sk-", "flj_"]);
    fleet.assert_no_containers_left().await.unwrap();
}

#[tokio::test]
async fn a_gemini_job_calls_the_gateway_with_its_own_token_and_is_metered() {
    let mock = MockLlm::start().await.unwrap();
    let fleet = Fleet::builder().llm(&mock.url()).start().await.unwrap();
    let job_id = submit(
        &fleet,
        json!({"agent_id": "llm-e2e", "engine": "gemini", "prompt": "say hi LLM_CALLS=2",
               "model": "gemini-2.5-pro", "output_format": "json"}),
    )
    .await;
    let job = wait(&fleet, &job_id).await;
    assert_eq!(job["status"], "completed", "{job:#}\n{}", fleet.logs());

    // The fake CLI streamed twice through GOOGLE_GEMINI_BASE_URL with its token as the key;
    // the upstream saw the real key, in a header, and the model in the path.
    let seen = mock.requests();
    assert_eq!(seen.len(), 2, "{job:#}");
    for request in &seen {
        assert_eq!(
            request.path,
            "/v1beta/models/gemini-2.5-pro:streamGenerateContent"
        );
        assert_eq!(request.query.as_deref(), Some("alt=sse"));
        assert_eq!(request.headers["x-goog-api-key"], TEST_GOOGLE_KEY);
    }
    let logs = job["result"]["logs_tail"].as_str().unwrap();
    assert!(logs.contains("llm call 2 answered"), "{logs}");

    // Metered by the gateway from the streams' last usage, replacing what the CLI reported.
    let usage = &job["usage"];
    let u = mock_llm::GOOGLE_USAGE;
    assert_eq!(usage["metered"], true, "{usage}");
    assert_eq!(usage["requests"], 2);
    assert_eq!(usage["input_tokens"], 2 * (u.input - u.cache_read));
    assert_eq!(usage["output_tokens"], 2 * u.output);
    assert_eq!(usage["cache_read_tokens"], 2 * u.cache_read);
    let cost = usage["cost_usd"].as_f64().unwrap();
    assert!((cost - 2.0 * mock_llm::GOOGLE_COST).abs() < 1e-9, "{usage}");

    let all = grants(&fleet).await;
    let ours: Vec<_> = all.iter().filter(|g| g.job_id == job_id).collect();
    assert_eq!(ours.len(), 1, "{all:?}");
    assert_eq!(ours[0].providers, vec!["google".to_owned()]);
    assert!(ours[0].revoked_at.is_some(), "{:?}", ours[0]);

    assert_no_secret_anywhere(&fleet, &job, &["AIza", "flj_"]);
    fleet.assert_no_containers_left().await.unwrap();
}

#[tokio::test]
async fn a_job_that_spends_its_budget_is_cut_off_and_fails_with_budget_exceeded() {
    let mock = MockLlm::start().await.unwrap();
    let fleet = Fleet::builder().llm(&mock.url()).start().await.unwrap();
    // Each call costs 0.0010875: the second crosses 0.002, the third is refused.
    let mut body = claude("work hard LLM_CALLS=5");
    body["max_budget_usd"] = json!(0.002);
    let job_id = submit(&fleet, body).await;
    let job = wait(&fleet, &job_id).await;
    assert_eq!(job["status"], "failed", "{job:#}");
    let error = job["error"].as_str().unwrap();
    assert!(error.starts_with("budget exceeded"), "{error}");
    assert_eq!(
        error,
        "budget exceeded: spent $0.0022 of its $0.002 max_budget_usd"
    );
    assert_eq!(
        mock.requests().len(),
        2,
        "the third call must not reach the upstream"
    );
    assert_eq!(job["usage"]["budget_exceeded"], true);
    assert_eq!(job["usage"]["requests"], 2);
    let text = job["result"]["text"].as_str().unwrap_or_default();
    assert!(text.contains("refused") && text.contains("402"), "{job:#}");
}

#[tokio::test]
async fn job_containers_reach_the_gateway_and_nothing_else() {
    let mock = MockLlm::start().await.unwrap();
    // A service on the host, listening on every address, that jobs must not reach.
    let host_service = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = host_service.local_addr().unwrap().port();
    let host_ip = String::from_utf8(Command::new("hostname").arg("-I").output().unwrap().stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap_or("127.0.0.1")
        .to_owned();
    // The probe is written before the fleet starts, so the gateway's port is chosen up front.
    let gateway_port = flotilla_testkit::free_port();
    // An engine job (it holds a token, so it runs on the fenced network); its pre-hook probes.
    let probe = format!(
        r#"[agent]
engine = "claude-code"

[hooks]
pre = '''
gw=$(ip route | awk '/^default/ {{print $3}}')
if wget -q -O - "http://$gw:{gateway_port}/health" >/dev/null 2>&1; then echo "gateway reached"; else echo "gateway unreachable"; fi
for target in "$gw {host_port}" "{host_ip} {host_port}" "$gw 22" "1.1.1.1 80"; do
  if nc -w 2 $target </dev/null >/dev/null 2>&1; then echo "reached $target"; else echo "blocked $target"; fi
done
'''
"#
    );
    let fleet = Fleet::builder()
        .llm(&mock.url())
        .llm_port(gateway_port)
        .profile("probe", &probe)
        .start()
        .await
        .unwrap();
    let llm = fleet.llm.as_ref().unwrap();
    let job_id = submit(
        &fleet,
        json!({"agent_id": "llm-e2e", "profile": "probe", "prompt": "probe",
               "model": "claude-sonnet-4-5"}),
    )
    .await;
    let job = wait(&fleet, &job_id).await;
    let out = job["result"]["logs_tail"].as_str().unwrap();
    assert!(out.contains("gateway reached"), "{out}\n{job:#}");
    assert_eq!(out.matches("blocked").count(), 4, "{out}");
    assert!(!out.lines().any(|l| l.starts_with("reached")), "{out}");

    // The network the node made: internal, and containers cannot talk to each other.
    let output = Command::new("docker")
        .args([
            "network",
            "inspect",
            "-f",
            "{{.Internal}} {{json .Options}}",
            &llm.network,
        ])
        .output()
        .unwrap();
    let inspect = String::from_utf8_lossy(&output.stdout);
    assert!(inspect.starts_with("true "), "{inspect}");
    assert!(
        inspect.contains(r#""com.docker.network.bridge.enable_icc":"false""#),
        "{inspect}"
    );
    drop(host_service);
    fleet.assert_no_containers_left().await.unwrap();
}

#[tokio::test]
async fn dry_runs_and_engines_without_llm_access_get_no_token() {
    let mock = MockLlm::start().await.unwrap();
    let fleet = Fleet::builder().llm(&mock.url()).start().await.unwrap();
    // A shell job has no [llm] section: no token, no provider variables, and no network at all.
    let job_id = submit(
        &fleet,
        shell("env | grep -c -E 'API_KEY|BASE_URL|flj_' || true; ip route | wc -l"),
    )
    .await;
    let job = wait(&fleet, &job_id).await;
    assert_eq!(job["result"]["text"], "0\n0\n", "{job:#}");
    // A dry run calls nothing and is granted nothing.
    let mut body = claude("plan only");
    body["dry_run"] = json!(true);
    let job_id = submit(&fleet, body).await;
    let job = wait(&fleet, &job_id).await;
    assert_eq!(job["status"], "completed", "{job:#}");
    assert!(grants(&fleet).await.is_empty());
    assert!(mock.requests().is_empty());
}

/// `available` per engine id, from `GET /engines`.
async fn availability(fleet: &Fleet) -> std::collections::BTreeMap<String, bool> {
    let engines: Value = fleet
        .request(reqwest::Method::GET, "/engines")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    engines["engines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["id"].as_str().unwrap().to_owned(), e["available"] == true))
        .collect()
}

#[tokio::test]
async fn engines_that_call_an_llm_are_available_only_where_a_gateway_holds_a_key() {
    let plain = Fleet::builder().start().await.unwrap();
    let engines = availability(&plain).await;
    assert!(engines["shell"], "{engines:?}");
    assert!(
        !engines["claude-code"] && !engines["gemini"],
        "no llm-gateway, no LLM: {engines:?}"
    );
    drop(plain);

    let mock = MockLlm::start().await.unwrap();
    let fleet = Fleet::builder().llm(&mock.url()).start().await.unwrap();
    let engines = flotilla_testkit::wait_until(
        std::time::Duration::from_secs(20),
        "claude-code to become available",
        || async {
            let engines = availability(&fleet).await;
            engines["claude-code"].then_some(engines)
        },
    )
    .await
    .unwrap();
    assert!(
        engines["shell"] && engines["codex"] && engines["gemini"],
        "{engines:?}"
    );
}

/// No real key in the job's record or any service's log, and no key or token (`patterns`) in
/// any container's environment or command.
fn assert_no_secret_anywhere(fleet: &Fleet, job: &Value, patterns: &[&str]) {
    let record = job.to_string();
    for key in [TEST_ANTHROPIC_KEY, TEST_OPENAI_KEY, TEST_GOOGLE_KEY] {
        assert!(!record.contains(key), "a key in the job record");
        assert!(!fleet.logs().contains(key), "a service logged a key");
    }
    for container in fleet.containers().unwrap() {
        let output = Command::new("docker")
            .args([
                "inspect",
                "-f",
                "{{json .Config.Env}} {{json .Config.Cmd}}",
                &container,
            ])
            .output()
            .unwrap();
        let config = String::from_utf8_lossy(&output.stdout);
        for pattern in patterns {
            assert!(!config.contains(pattern), "{pattern} in {config}");
        }
    }
}

#[tokio::test]
async fn a_fence_undone_while_the_node_runs_fails_engine_jobs_before_they_get_a_token() {
    let mock = MockLlm::start().await.unwrap();
    // One delivery: the infrastructure failure is recorded at once instead of retried.
    let fleet = Fleet::builder()
        .llm(&mock.url())
        .env("FLOTILLA_MAX_DELIVER", "1")
        .start()
        .await
        .unwrap();
    let network = &fleet.llm.as_ref().unwrap().network;
    // A job runs while the fence is whole.
    let job_id = submit(&fleet, claude("before")).await;
    let job = wait(&fleet, &job_id).await;
    assert_eq!(job["status"], "completed", "{job:#}\n{}", fleet.logs());
    // Then the host's firewall loses the jump into the fence (a reload, say).
    let id = Command::new("docker")
        .args(["network", "inspect", "-f", "{{.Id}}", network])
        .output()
        .unwrap()
        .stdout;
    let id = String::from_utf8(id).unwrap().trim().to_owned();
    let chain = names::job_network_chain(&id);
    let bridge = format!("br-{}", &id[..12]);
    let removed = Command::new("iptables")
        .args(["-w", "-D", "INPUT", "-i", &bridge, "-j", &chain])
        .status()
        .unwrap();
    assert!(removed.success());
    // The next engine job fails (once the last good check is stale), without a token and
    // without reaching the gateway; jobs without LLM access are not affected.
    let tries = std::sync::atomic::AtomicU32::new(0);
    let failed = flotilla_testkit::wait_until(
        std::time::Duration::from_secs(30),
        "an engine job to be refused for the broken fence",
        || async {
            let n = tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let prompt = format!("after {n}");
            let job = wait(&fleet, &submit(&fleet, claude(&prompt)).await).await;
            (job["status"] == "failed").then_some((job, prompt))
        },
    )
    .await
    .unwrap();
    let (failed, prompt) = failed;
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("is not safe to run on"), "{error}");
    assert!(error.contains("is gone"), "{error}");
    assert!(
        grants(&fleet)
            .await
            .iter()
            .all(|g| g.job_id != failed["job_id"]),
        "a token was issued"
    );
    let reached = mock
        .requests()
        .iter()
        .any(|r| r.body.to_string().contains(&prompt));
    assert!(!reached, "{prompt:?} reached the upstream");
    let shell_job = wait(&fleet, &submit(&fleet, shell("echo fine")).await).await;
    assert_eq!(shell_job["status"], "completed", "{shell_job:#}");
}
