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
