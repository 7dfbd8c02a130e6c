//! The dashboard at `/ui`: served from the gateway binary, public, locked down by its CSP; and
//! used in headless Chromium from the submit form to a job's live output, the job list and the
//! nodes view.

use std::{future::Future, time::Duration};

use flotilla_testkit::{Browser, Fleet, wait_until};
use reqwest::{Method, redirect::Policy};

use crate::get_job;

const KEY: &str = "ui-test-key-0123456789";

#[tokio::test]
async fn ui_is_public_and_locked_down_while_the_api_needs_the_key() {
    let fleet = Fleet::builder()
        .nodes(0)
        .api_key(KEY)
        .start()
        .await
        .unwrap();
    // No Authorization header, and no redirects followed.
    let anonymous = reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap();
    let get = |path: &str| anonymous.get(format!("{}{path}", fleet.api)).send();

    for (path, content_type) in [
        ("/ui", "text/html; charset=utf-8"),
        ("/ui/", "text/html; charset=utf-8"),
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/app.css", "text/css; charset=utf-8"),
    ] {
        crate::assert_locked_down_asset(get(path).await.unwrap(), path, content_type).await;
    }

    // Every script is the one file (an inline one would be blocked by the CSP), and there is
    // no inline style either.
    let html = get("/ui").await.unwrap().text().await.unwrap();
    assert_eq!(html.matches("<script").count(), 1, "{html}");
    assert!(html.contains(r#"<script src="/ui/app.js""#), "{html}");
    assert!(html.contains(r#"<link rel="stylesheet" href="/ui/app.css">"#));
    assert!(!html.contains("style="), "{html}");
    // Text from the API goes into the DOM as text, never parsed as HTML.
    let script = get("/ui/app.js").await.unwrap().text().await.unwrap();
    for sink in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
    ] {
        assert!(!script.contains(sink), "app.js uses {sink}");
    }

    // A key sent to a public path is not checked; unknown files under /ui are 404, not 401.
    let with_wrong_key = anonymous
        .get(format!("{}/ui", fleet.api))
        .bearer_auth("not-the-key-at-all")
        .send()
        .await
        .unwrap();
    assert_eq!(with_wrong_key.status(), 200);
    assert_eq!(get("/ui/nope.js").await.unwrap().status(), 404);
    let root = get("/").await.unwrap();
    assert_eq!(root.status(), 307);
    assert_eq!(root.headers()["location"], "/ui");

    // The API itself still needs the key.
    for path in ["/jobs", "/profiles", "/engines", "/nodes"] {
        let response = get(path).await.unwrap();
        assert_eq!(response.status(), 401, "{path}");
        assert_eq!(
            fleet
                .request(Method::GET, path)
                .send()
                .await
                .unwrap()
                .status(),
            200,
            "{path}"
        );
    }
}

/// What the page shows, for failure messages.
async fn page_state(browser: &Browser) -> String {
    let state = browser
        .execute(
            "return location.href + '\\n' + document.body.innerText;",
            Vec::new(),
        )
        .await;
    match state {
        Ok(value) => value.as_str().unwrap_or_default().to_owned(),
        Err(e) => e.to_string(),
    }
}

/// [`wait_until`] that says what the page shows when it times out.
async fn wait_in_page<T, F, Fut>(browser: &Browser, what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match wait_until(Duration::from_secs(60), what, check).await {
        Ok(value) => value,
        Err(e) => panic!("{e}; the page shows:\n{}", page_state(browser).await),
    }
}

/// Polls until `css` exists and its text satisfies `check`; returns the text.
async fn wait_for_text(
    browser: &Browser,
    css: &str,
    what: &str,
    check: impl Fn(&str) -> bool,
) -> String {
    wait_in_page(browser, what, || async {
        browser.text_of(css).await.filter(|text| check(text))
    })
    .await
}

#[tokio::test]
async fn ui_submits_a_shell_job_and_follows_its_output_live() {
    let browser = Browser::start().await.unwrap();
    let fleet = Fleet::builder().api_key(KEY).start().await.unwrap();

    browser
        .goto(&format!("{}/ui#/submit", fleet.api))
        .await
        .unwrap();
    // No key stored yet: the page asks for one, and takes it.
    wait_for_text(
        &browser,
        "#notice",
        "the page to ask for the API key",
        |t| t.contains("API key"),
    )
    .await;
    let key = browser.find("#api-key").await.unwrap();
    browser.send_keys(&key, KEY).await.unwrap();
    browser
        .click(&browser.find("#api-key-save").await.unwrap())
        .await
        .unwrap();

    // The form is built from /profiles and /engines.
    let shell = wait_in_page(&browser, "the engine list", || async {
        browser
            .find(r#"#f-engine option[value="shell"]"#)
            .await
            .ok()
    })
    .await;
    browser.click(&shell).await.unwrap();
    let agent = browser.find("#f-agent").await.unwrap();
    browser.clear(&agent).await.unwrap();
    browser.send_keys(&agent, "ui-e2e").await.unwrap();
    let prompt = browser.find("#f-prompt").await.unwrap();
    browser
        .send_keys(&prompt, "echo hello-from-ui; sleep 0.5; echo bye-from-ui")
        .await
        .unwrap();
    browser
        .click(&browser.find("#f-submit").await.unwrap())
        .await
        .unwrap();

    // The page moves to the new job.
    let job_id = wait_in_page(&browser, "the job's page", || async {
        let hash = browser
            .execute("return location.hash;", Vec::new())
            .await
            .ok()?;
        let id = hash.as_str()?.strip_prefix("#/jobs/")?;
        (!id.is_empty()).then(|| id.to_owned())
    })
    .await;
    assert!(job_id.starts_with("ui-e2e-"), "{job_id}");

    // Live output and status, as the page shows them.
    wait_for_text(&browser, "#log", "the output in the log view", |t| {
        t.contains("hello-from-ui") && t.contains("bye-from-ui")
    })
    .await;
    wait_for_text(
        &browser,
        "#job-status",
        "the status to show completed",
        |t| t == "completed",
    )
    .await;
    wait_for_text(&browser, "#log-state", "the log stream's end", |t| {
        t.starts_with("ended: completed")
    })
    .await;

    // What the form sent.
    let (status, job) = get_job(&fleet, &job_id).await;
    assert_eq!(status, 200);
    assert_eq!(job["status"], "completed");
    assert_eq!(job["engine"], "shell");
    assert_eq!(job["agent_id"], "ui-e2e");
    assert_eq!(job["result"]["text"], "hello-from-ui\nbye-from-ui\n");

    // The job list shows it, completed.
    browser
        .goto(&format!("{}/ui#/jobs", fleet.api))
        .await
        .unwrap();
    let row = format!(r#"#jobs-table tr[data-job-id="{job_id}"]"#);
    wait_for_text(&browser, &row, "the job in the list", |t| {
        t.contains("completed") && t.contains("ui-e2e") && t.contains("shell")
    })
    .await;

    // The nodes view shows the fleet's node and its slots.
    browser
        .goto(&format!("{}/ui#/nodes", fleet.api))
        .await
        .unwrap();
    let node = format!(r#"#nodes-table tr[data-node-id="{}"]"#, fleet.node_ids[0]);
    wait_for_text(&browser, &node, "the node in the nodes view", |t| {
        t.contains("/ 4")
    })
    .await;

    browser.quit().await.unwrap();
}

/// A job on a repository shows its change and artifacts (downloaded with the key), and a
/// group's variants are compared side by side.
#[tokio::test]
async fn ui_shows_a_job_s_change_and_artifacts_and_compares_a_group() {
    let browser = Browser::start().await.unwrap();
    let git = flotilla_testkit::GitServer::start().await.unwrap();
    git.create("acme/ui.git", &[("README.md", b"# ui\n")])
        .unwrap();
    let fleet = Fleet::builder()
        .api_key(KEY)
        .env("FLOTILLA_GIT_ALLOWED_HOSTS", "127.0.0.1")
        .start()
        .await
        .unwrap();
    let mut job = crate::shell("echo more >> README.md; echo '# r' > report.md; echo done");
    job["workspace"] = serde_json::json!({"git": {"url": git.url("acme/ui.git"), "ref": "main"}});
    job["outputs"] = serde_json::json!(["report.md"]);
    let id = crate::submit(&fleet, job.clone()).await;
    crate::wait(&fleet, &id).await;

    browser
        .goto(&format!("{}/ui#/jobs/{id}", fleet.api))
        .await
        .unwrap();
    wait_for_text(&browser, "#notice", "the key prompt", |t| {
        t.contains("API key")
    })
    .await;
    let key = browser.find("#api-key").await.unwrap();
    browser.send_keys(&key, KEY).await.unwrap();
    browser
        .click(&browser.find("#api-key-save").await.unwrap())
        .await
        .unwrap();
    let stat = wait_for_text(&browser, "#job-diff-stat", "the diff figures", |t| {
        t.contains("files changed")
    })
    .await;
    assert!(stat.contains("2 files changed, +2 −0"), "{stat}");
    let artifacts = wait_for_text(&browser, "#job-artifacts", "the artifacts", |t| {
        t.contains("report.md")
    })
    .await;
    assert!(artifacts.contains("4 B"), "{artifacts}");
    // The download link fetches with the key the page holds.
    let fetched = browser
        .execute(
            "const a = document.querySelector('#job-artifacts a.download'); \
             return fetch(a.dataset.path, {headers: {Authorization: 'Bearer ' + localStorage.getItem('flotilla.apiKey')}}) \
               .then(r => r.text());",
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(fetched, "# r\n", "{}", page_state(&browser).await);

    let group: serde_json::Value = fleet
        .request(Method::POST, "/groups")
        .json(&serde_json::json!({"job": job, "variants": [
            {"name": "shell-a"}, {"name": "claude-b", "engine": "claude-code"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let group_id = group["group_id"].as_str().unwrap();
    browser
        .goto(&format!("{}/ui#/groups/{group_id}", fleet.api))
        .await
        .unwrap();
    let table = wait_for_text(&browser, "#group-variants", "both variants to end", |t| {
        t.matches("completed").count() == 2
    })
    .await;
    assert!(
        table.contains("shell-a") && table.contains("claude-b"),
        "{table}"
    );
    assert!(table.contains("2 files +2 −0"), "{table}");
    let commit = browser.text_of("#group-commit").await.unwrap_or_default();
    assert!(commit.contains("same commit"), "{commit}");
    browser.quit().await.unwrap();
}
