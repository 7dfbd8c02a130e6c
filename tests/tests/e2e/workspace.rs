//! Repositories in, changes out: a real `git daemon` on loopback, a fake forge speaking
//! GitHub's pulls API, the real fleet and Docker. The node fetches (the container has no
//! network), the job changes the checkout, and the node returns the diff, pushes a branch and
//! opens the pull request; outputs come back as artifacts.

use flotilla_testkit::{FakeForge, Fleet, GitServer, binary};
use reqwest::Method;
use serde_json::{Value, json};

use crate::{shell, submit, wait};

const TOKEN: &str = "flotilla-test-git-token-9c1e77";

/// A repository with a bit of everything the diff must handle.
fn seed(git: &GitServer) -> String {
    git.create(
        "acme/app.git",
        &[
            ("README.md", b"# app\n"),
            ("src/lib.rs", b"pub fn lib() {}\n"),
            ("old.txt", b"going away\n"),
            ("logo.png", &[0x89, b'P', b'N', b'G', 0, 1, 2, 3]),
            (".gitignore", b"target/\n"),
        ],
    )
    .unwrap()
}

async fn fleet(forge: &FakeForge) -> (Fleet, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("git.toml");
    std::fs::write(
        &credentials,
        format!(
            "[credentials.forge]\ntoken = \"{TOKEN}\"\nforge = \"github\"\napi_url = \"{}\"\n",
            forge.url()
        ),
    )
    .unwrap();
    let fleet = Fleet::builder()
        .env("FLOTILLA_GIT_ALLOWED_HOSTS", "127.0.0.1")
        .node_env(
            "FLOTILLA_GIT_CREDENTIALS_FILE",
            &credentials.display().to_string(),
        )
        .start()
        .await
        .unwrap();
    (fleet, dir)
}

async fn text(fleet: &Fleet, path: &str) -> (u16, String, String) {
    let response = fleet.request(Method::GET, path).send().await.unwrap();
    let status = response.status().as_u16();
    let kind = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, kind, response.text().await.unwrap())
}

const CHANGE: &str = r#"set -e
test -f README.md && test -d .git && echo "checkout ok"
echo "token in env: $(env | grep -c flotilla-test-git-token || true)"
echo new >> README.md
printf 'fn main() {}\n' > src/main.rs
rm old.txt
mv src/lib.rs src/core.rs
printf '\001\002\003' > logo.png
mkdir -p target dist/js
echo junk > target/x
echo '# report' > report.md
echo 'console.log(1)' > dist/js/app.js
"#;

#[tokio::test]
async fn a_job_on_a_repository_returns_its_diff_pushes_a_branch_and_opens_a_pull_request() {
    let git = GitServer::start().await.unwrap();
    let base = seed(&git);
    let forge = FakeForge::start().await.unwrap();
    let (fleet, _dir) = fleet(&forge).await;
    let mut job = shell(CHANGE);
    job["workspace"] = json!({"git": {"url": git.url("acme/app.git"), "ref": "main",
                                      "depth": 1, "credential": "forge"}});
    job["outputs"] = json!(["report.md", "dist/**"]);
    job["push"] = json!({"branch": "flotilla/test", "commit_message": "Agent change",
                         "pull_request": {"title": "An agent's change", "body": "Made by a test"}});
    let id = submit(&fleet, job).await;
    let record = wait(&fleet, &id).await;
    assert_eq!(record["status"], "completed", "{record}\n{}", fleet.logs());
    let result = &record["result"];
    assert!(
        result["text"]
            .as_str()
            .unwrap()
            .starts_with("checkout ok\ntoken in env: 0\n"),
        "{result}"
    );
    assert_eq!(result["base_commit"], base.as_str());
    // README modified, main.rs and report.md and app.js added, old.txt deleted, lib.rs
    // renamed, logo.png binary; target/ ignored.
    assert_eq!(
        result["diff_stat"],
        json!({"files": 7, "insertions": 4, "deletions": 1}),
        "{result}"
    );

    let (status, kind, patch) = text(&fleet, &format!("/jobs/{id}/diff")).await;
    assert_eq!(status, 200, "{patch}");
    assert!(kind.starts_with("text/x-diff"), "{kind}");
    for part in [
        "rename from src/lib.rs",
        "rename to src/core.rs",
        "deleted file mode",
        "GIT binary patch",
        "+new",
        "+++ b/dist/js/app.js",
    ] {
        assert!(patch.contains(part), "{part} missing from:\n{patch}");
    }
    assert!(!patch.contains("target/x"), "{patch}");

    // The branch, as a reviewer would fetch it.
    let pushed = git.commit_of("acme/app.git", "flotilla/test").unwrap();
    assert_eq!(result["commit"], pushed.as_str());
    assert_eq!(result["branch"], "flotilla/test");
    assert_eq!(
        git.show("acme/app.git", "flotilla/test", "README.md")
            .unwrap(),
        "# app\nnew\n"
    );
    assert!(
        git.show("acme/app.git", "flotilla/test", "target/x")
            .is_err()
    );
    assert_eq!(
        git.author("acme/app.git", "flotilla/test").unwrap(),
        "Flotilla <flotilla@localhost>"
    );
    let calls = forge.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].repo, "acme/app");
    assert_eq!(
        calls[0].authorization.as_deref(),
        Some(&*format!("Bearer {TOKEN}"))
    );
    assert_eq!(
        calls[0].body,
        json!({"title": "An agent's change", "body": "Made by a test",
               "head": "flotilla/test", "base": "main"})
    );
    assert_eq!(
        result["pull_request_url"],
        "https://forge.test/acme/app/pull/1"
    );

    assert_artifacts(&fleet, &id).await;
    // The token is nowhere: not in the record, the job's log or the services' logs.
    let (_, _, logs) = text(&fleet, &format!("/jobs/{id}/logs?follow=false")).await;
    for (what, haystack) in [
        ("record", record.to_string()),
        ("job log", logs),
        ("service logs", fleet.logs()),
    ] {
        assert!(
            !haystack.contains(TOKEN),
            "the git token leaked into the {what}"
        );
    }
    fleet.assert_no_containers_left().await.unwrap();
}

async fn assert_artifacts(fleet: &Fleet, id: &str) {
    let (status, _, listed) = text(fleet, &format!("/jobs/{id}/artifacts")).await;
    assert_eq!(status, 200, "{listed}");
    let listed: Value = serde_json::from_str(&listed).unwrap();
    let sha = |bytes: &[u8]| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes));
    assert_eq!(
        listed,
        json!({"artifacts": [
            {"path": "dist/js/app.js", "size": 15, "sha256": sha(b"console.log(1)\n")},
            {"path": "report.md", "size": 9, "sha256": sha(b"# report\n")},
        ]})
    );
    let (status, _, body) = text(fleet, &format!("/jobs/{id}/artifacts/dist/js/app.js")).await;
    assert_eq!((status, body.as_str()), (200, "console.log(1)\n"));
    let (status, _, _) = text(fleet, &format!("/jobs/{id}/artifacts/nope.txt")).await;
    assert_eq!(status, 404);
    let zip = fleet
        .request(Method::GET, &format!("/jobs/{id}/artifacts.zip"))
        .send()
        .await
        .unwrap();
    assert_eq!(zip.status(), 200);
    assert_eq!(zip.headers()["content-type"], "application/zip");
    let bytes = zip.bytes().await.unwrap();
    assert!(bytes.starts_with(b"PK"), "not a zip");
    for name in ["dist/js/app.js", "report.md"] {
        assert!(
            bytes.windows(name.len()).any(|w| w == name.as_bytes()),
            "{name} not in the zip"
        );
    }
}

#[tokio::test]
async fn a_second_job_on_a_repository_sees_its_new_commits_and_outputs_come_back_without_git() {
    let git = GitServer::start().await.unwrap();
    seed(&git);
    let forge = FakeForge::start().await.unwrap();
    let (fleet, _dir) = fleet(&forge).await;
    let url = git.url("acme/app.git");
    let on_repo = |script: &str| {
        let mut job = shell(script);
        job["workspace"] = json!({"git": {"url": url, "ref": "main"}});
        job
    };
    let first = wait(&fleet, &submit(&fleet, on_repo("cat README.md")).await).await;
    assert_eq!(first["result"]["text"], "# app\n", "{first}");
    let newer = git
        .commit("acme/app.git", &[("NEWS.md", b"fresh\n")])
        .unwrap();
    let second = wait(&fleet, &submit(&fleet, on_repo("cat NEWS.md")).await).await;
    assert_eq!(second["result"]["text"], "fresh\n", "{second}");
    assert_eq!(second["result"]["base_commit"], newer.as_str());
    assert_eq!(
        second["result"]["diff_stat"],
        json!({"files": 0, "insertions": 0, "deletions": 0})
    );

    // Outputs of a job without a repository, downloaded with the CLI.
    let mut job = shell("mkdir -p out; echo a > out/a.txt; echo b > out/b.log; echo c > c.txt");
    job["outputs"] = json!(["out/*.txt", "c.txt"]);
    let id = submit(&fleet, job).await;
    let record = wait(&fleet, &id).await;
    assert_eq!(record["status"], "completed", "{record}");
    assert!(record["result"].get("diff_stat").is_none(), "{record}");
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(binary("flotilla").unwrap())
        .env("FLOTILLA_API", &fleet.api)
        .env_remove("FLOTILLA_API_KEY")
        .args(["artifacts", &id, "-o"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out/a.txt")).unwrap(),
        "a\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("c.txt")).unwrap(),
        "c\n"
    );
    assert!(!dir.path().join("out/b.log").exists());
}

#[tokio::test]
async fn bad_repositories_are_refused_at_submit_or_fail_the_job_saying_why() {
    let git = GitServer::start().await.unwrap();
    seed(&git);
    let forge = FakeForge::start().await.unwrap();
    let (fleet, _dir) = fleet(&forge).await;
    for (git_spec, field, says) in [
        (
            json!({"url": "https://github.com/acme/app.git"}),
            "workspace.git.url",
            "not in FLOTILLA_GIT_ALLOWED_HOSTS",
        ),
        (
            json!({"url": "https://user:pw@127.0.0.1/acme/app.git"}),
            "workspace.git.url",
            "must not carry credentials",
        ),
        (
            json!({"url": git.url("acme/app.git"), "ref": "--upload-pack=evil"}),
            "workspace.git.ref",
            "git ref name",
        ),
        (json!({"ref": "main"}), "workspace.git.url", "required"),
    ] {
        let mut job = shell("true");
        job["workspace"] = json!({ "git": git_spec });
        let response = fleet
            .request(Method::POST, "/jobs")
            .json(&job)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422, "{git_spec}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["field"], field, "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(says),
            "{body}"
        );
    }
    let mut push_alone = shell("true");
    push_alone["push"] = json!({});
    let response = fleet
        .request(Method::POST, "/jobs")
        .json(&push_alone)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);

    for (git_spec, says) in [
        (
            json!({"url": git.url("acme/app.git"), "ref": "nope"}),
            "ref nope does not exist in git://127.0.0.1",
        ),
        (
            json!({"url": git.url("acme/app.git"), "credential": "unknown"}),
            "\"unknown\" is not held by this node",
        ),
    ] {
        let mut job = shell("echo should not run");
        job["workspace"] = json!({ "git": git_spec });
        let record = wait(&fleet, &submit(&fleet, job).await).await;
        assert_eq!(record["status"], "failed", "{record}");
        let error = record["error"].as_str().unwrap();
        assert!(error.contains(says), "{error}");
    }
    fleet.assert_no_containers_left().await.unwrap();
}

/// The first real agent inside Flotilla: aider (PyPI `aider-chat`, image built by
/// scripts/build-aider-image) edits a file of a cloned repository, talking through the
/// llm-gateway to the mock LLM, which answers with an edit in aider's own format.
#[tokio::test]
async fn real_aider_edits_a_cloned_repository_and_the_diff_shows_it() {
    let reply = flotilla_testkit::mock_llm::aider_whole_edit("hello.py", "print(\"goodbye\")");
    let mock = flotilla_testkit::MockLlm::start_with_openai_reply(reply)
        .await
        .unwrap();
    let git = GitServer::start().await.unwrap();
    let base = git
        .create("acme/hello.git", &[("hello.py", b"print(\"hello\")\n")])
        .unwrap();
    let fleet = Fleet::builder()
        .llm(&mock.url())
        .env("FLOTILLA_GIT_ALLOWED_HOSTS", "127.0.0.1")
        .node_env("FLOTILLA_WORKER_IMAGE", "flotilla-aider:latest")
        .start()
        .await
        .expect("the aider image: run scripts/build-aider-image");
    let job = json!({
        "agent_id": "e2e", "engine": "aider", "model": "openai/mock-model",
        "prompt": "In hello.py, say goodbye instead of hello.",
        "workspace": {"git": {"url": git.url("acme/hello.git"), "ref": "main"}},
    });
    let id = submit(&fleet, job).await;
    let record = wait(&fleet, &id).await;
    assert_eq!(
        record["status"],
        "completed",
        "{record:#}\n{}",
        fleet.logs()
    );
    assert_eq!(record["result"]["base_commit"], base.as_str());
    let requests = mock.requests();
    assert_eq!(requests.len(), 1, "aider asked the LLM once: {requests:?}");
    assert_eq!(requests[0].body["model"], "mock-model");
    assert_eq!(
        record["result"]["diff_stat"],
        json!({"files": 1, "insertions": 1, "deletions": 1}),
        "only hello.py changed (aider's own files are ignored): {record:#}"
    );
    let (status, _, patch) = text(&fleet, &format!("/jobs/{id}/diff")).await;
    assert_eq!(status, 200);
    assert!(
        patch.contains("-print(\"hello\")") && patch.contains("+print(\"goodbye\")"),
        "{patch}"
    );
    fleet.assert_no_containers_left().await.unwrap();
}

async fn continue_job(fleet: &Fleet, id: &str, body: Value) -> (u16, Value) {
    let response = fleet
        .request(Method::POST, &format!("/jobs/{id}/continue"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A follow-up starts from the finished job's final workspace (its diff is the whole chain's),
/// records its parent and chain, and resumes the agent session of an engine that can.
#[tokio::test]
async fn a_finished_job_is_continued_from_its_workspace_and_its_session() {
    let git = GitServer::start().await.unwrap();
    let base = seed(&git);
    let forge = FakeForge::start().await.unwrap();
    let (fleet, _dir) = fleet(&forge).await;
    let mut first = shell("echo step1 > notes.txt");
    first["workspace"] = json!({"git": {"url": git.url("acme/app.git"), "ref": "main"}});
    let first = submit(&fleet, first).await;
    let done = wait(&fleet, &first).await;
    assert_eq!(done["result"]["workspace_saved"], true, "{done}");

    let (status, reply) = continue_job(
        &fleet,
        &first,
        json!({"prompt": "echo step2 >> notes.txt; cat notes.txt"}),
    )
    .await;
    assert_eq!(status, 202, "{reply}");
    let second = reply["job_id"].as_str().unwrap().to_owned();
    let record = wait(&fleet, &second).await;
    assert_eq!(record["status"], "completed", "{record}\n{}", fleet.logs());
    assert_eq!(record["result"]["text"], "step1\nstep2\n");
    assert_eq!(record["parent"], first.as_str());
    assert_eq!(record["chain"], json!([first]));
    assert_eq!(record["result"]["base_commit"], base.as_str());
    assert_eq!(
        record["result"]["diff_stat"],
        json!({"files": 1, "insertions": 2, "deletions": 0}),
        "the diff covers the whole chain: {record}"
    );
    let (status, reply) = continue_job(&fleet, &second, json!({"prompt": "cat notes.txt"})).await;
    assert_eq!(status, 202, "{reply}");
    let third = wait(&fleet, reply["job_id"].as_str().unwrap()).await;
    assert_eq!(third["chain"], json!([first, second]));
    assert_eq!(third["result"]["text"], "step1\nstep2\n");

    // Claude Code resumes its session: its state in $HOME (/workspace) came back too.
    let mut agent = json!({"agent_id": "e2e", "engine": "claude-code", "prompt": "hello",
                           "output_format": "json"});
    agent["workspace"] = json!({"git": {"url": git.url("acme/app.git"), "ref": "main"}});
    let agent = submit(&fleet, agent).await;
    let done = wait(&fleet, &agent).await;
    let session = done["result"]["session_id"].as_str().unwrap().to_owned();
    let (status, reply) = continue_job(&fleet, &agent, json!({"prompt": "and again"})).await;
    assert_eq!(status, 202, "{reply}");
    let resumed = wait(&fleet, reply["job_id"].as_str().unwrap()).await;
    assert_eq!(resumed["status"], "completed", "{resumed}");
    assert_eq!(
        resumed["result"]["text"],
        format!("fake claude (turn 2 of session {session}): and again")
    );
    assert_eq!(resumed["result"]["diff_stat"]["files"], 0, "{resumed}");

    // What cannot be continued says why.
    let plain = wait(&fleet, &submit(&fleet, shell("true")).await).await;
    let plain = plain["job_id"].as_str().unwrap();
    let (status, reply) = continue_job(&fleet, plain, json!({"prompt": "x"})).await;
    assert_eq!(status, 409, "{reply}");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no saved workspace")
    );
    let (status, reply) = continue_job(&fleet, &first, json!({})).await;
    assert_eq!(
        (status, reply["error"]["field"].as_str()),
        (422, Some("prompt"))
    );
    let (status, _) = continue_job(&fleet, "e2e-nope", json!({"prompt": "x"})).await;
    assert_eq!(status, 404);
    fleet.assert_no_containers_left().await.unwrap();
}

/// One task, several engines: one job per variant on the same commit, compared side by side
/// over HTTP and in the CLI.
#[tokio::test]
async fn a_group_runs_one_task_per_variant_and_compares_them() {
    let git = GitServer::start().await.unwrap();
    let base = seed(&git);
    let forge = FakeForge::start().await.unwrap();
    let (fleet, _dir) = fleet(&forge).await;
    let mut job = shell("echo better >> README.md; echo done");
    job["workspace"] = json!({"git": {"url": git.url("acme/app.git"), "ref": "main"}});
    job["output_format"] = json!("json");
    let post = |body: Value| fleet.request(Method::POST, "/groups").json(&body).send();
    let refused = post(json!({"job": job, "variants": [{}, {"engine": "nope"}]}))
        .await
        .unwrap();
    assert_eq!(refused.status(), 422);
    let refused: Value = refused.json().await.unwrap();
    assert_eq!(refused["error"]["field"], "variants[1].engine", "{refused}");

    let body = json!({"job": job, "variants": [
        {"name": "script"},
        {"name": "claude", "engine": "claude-code", "metadata": {"team": "x"}},
    ]});
    let accepted = post(body).await.unwrap();
    assert_eq!(accepted.status(), 202);
    let accepted: Value = accepted.json().await.unwrap();
    let group_id = accepted["group_id"].as_str().unwrap().to_owned();
    assert_eq!(
        accepted["job_ids"],
        json!([format!("{group_id}-v0"), format!("{group_id}-v1")])
    );

    let group = flotilla_testkit::wait_until(
        std::time::Duration::from_secs(60),
        "every variant to end",
        || async {
            let (_, _, body) = text(&fleet, &format!("/groups/{group_id}")).await;
            let group: Value = serde_json::from_str(&body).ok()?;
            let ended = group["variants"]
                .as_array()?
                .iter()
                .all(|v| v["status"] == "completed" || v["status"] == "failed");
            ended.then_some(group)
        },
    )
    .await
    .unwrap();
    assert_eq!(group["same_commit"], true, "{group:#}");
    let [script, claude] = group["variants"].as_array().unwrap().as_slice() else {
        panic!("two variants: {group:#}");
    };
    assert_eq!(script["name"], "script");
    assert_eq!(script["status"], "completed");
    assert_eq!(script["base_commit"], base.as_str());
    assert_eq!(
        script["diff_stat"],
        json!({"files": 1, "insertions": 1, "deletions": 0})
    );
    assert_eq!(script["text_head"], "done\n");
    assert_eq!(claude["name"], "claude");
    assert_eq!(claude["engine"], "claude-code");
    assert_eq!(claude["status"], "completed", "{claude}");
    assert_eq!(claude["turns"], 1);
    assert!(claude["cost_usd"].as_f64().unwrap() > 0.0, "{claude}");
    assert_eq!(claude["diff_stat"]["files"], 0);
    assert!(claude["duration_ms"].as_i64().unwrap() >= 0);
    let (status, _, _) = text(&fleet, "/groups/e2e-00000000000000000000000000000000").await;
    assert_eq!(status, 404);

    let out = std::process::Command::new(binary("flotilla").unwrap())
        .env("FLOTILLA_API", &fleet.api)
        .env_remove("FLOTILLA_API_KEY")
        .args(["compare", &group_id])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        table.contains("script") && table.contains("claude"),
        "{table}"
    );
    assert!(table.contains("1 +1 -0"), "{table}");
}
