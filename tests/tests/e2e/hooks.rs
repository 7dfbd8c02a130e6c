//! Profile hooks run inside the job's container: the pre-hook before the engine (its failure
//! fails the job), the post-hook after it whatever the outcome, with the status in its
//! environment.

use flotilla_testkit::Fleet;
use serde_json::json;

use crate::{submit, wait};

const HOOKED: &str = r#"
[agent]
description = "Shell with hooks (test)"
engine = "shell"

[hooks]
pre = "echo pre-ran; echo from-pre > /workspace/pre.txt"
post = "echo post-ran status=$JOB_STATUS code=$JOB_EXIT_CODE"
"#;

const FAILING_PRE: &str = r#"
[agent]
description = "Shell with a failing pre-hook (test)"
engine = "shell"

[hooks]
pre = "echo checking; exit 5"
post = "echo post-ran"
"#;

fn job(profile: &str, prompt: &str) -> serde_json::Value {
    json!({ "agent_id": "hooks", "profile": profile, "prompt": prompt })
}

#[tokio::test]
async fn hooks_run_around_the_engine_with_its_outcome() {
    let fleet = Fleet::builder()
        .profile("hooked", HOOKED)
        .profile("failing-pre", FAILING_PRE)
        .start()
        .await
        .unwrap();

    let ok = wait(
        &fleet,
        &submit(
            &fleet,
            job("hooked", "cat /workspace/pre.txt; echo engine-ran"),
        )
        .await,
    )
    .await;
    assert_eq!(ok["status"], "completed", "{ok}");
    assert_eq!(
        ok["result"]["text"],
        "pre-ran\nfrom-pre\nengine-ran\npost-ran status=completed code=0\n"
    );

    let failed = wait(
        &fleet,
        &submit(&fleet, job("hooked", "echo engine-ran; exit 3")).await,
    )
    .await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["exit_code"], 3);
    assert_eq!(
        failed["result"]["text"],
        "pre-ran\nengine-ran\npost-ran status=failed code=3\n"
    );

    let blocked = wait(
        &fleet,
        &submit(&fleet, job("failing-pre", "echo should-not-run")).await,
    )
    .await;
    assert_eq!(blocked["status"], "failed", "{blocked}");
    assert_eq!(blocked["error"], "pre-hook failed with exit code 5");
    assert_eq!(
        blocked["result"]["text"], "checking\n",
        "the engine must not run: {blocked}"
    );
    fleet.assert_no_containers_left().await.unwrap();
}
