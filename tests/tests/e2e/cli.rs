//! The `flotilla` command against a real fleet: the exit status reflects the job's outcome and
//! `--json` gives machine-readable output.

use flotilla_testkit::{Fleet, binary};
use serde_json::Value;

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn flotilla(fleet: &Fleet, args: &[&str]) -> Output {
    let output = tokio::process::Command::new(binary("flotilla").unwrap())
        .args(args)
        .env("FLOTILLA_API", &fleet.api)
        .env_remove("FLOTILLA_API_KEY")
        .output()
        .await
        .unwrap();
    Output {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[tokio::test]
async fn submit_follow_get_ls_cancel_from_the_command_line() {
    let fleet = Fleet::builder().start().await.unwrap();

    let run = flotilla(
        &fleet,
        &[
            "submit",
            "--engine",
            "shell",
            "--follow",
            "echo from the cli; echo warn >&2",
        ],
    )
    .await;
    assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.starts_with("from the cli\n"),
        "live output first: {}",
        run.stdout
    );
    assert!(run.stderr.contains("warn"), "{}", run.stderr);
    assert!(run.stdout.contains(" completed "), "{}", run.stdout);

    let failed = flotilla(
        &fleet,
        &["submit", "--engine", "shell", "--wait", "--json", "exit 4"],
    )
    .await;
    assert_eq!(
        failed.code,
        Some(1),
        "a failed job exits 1: {}{}",
        failed.stdout,
        failed.stderr
    );
    let job: Value = serde_json::from_str(failed.stdout.trim()).unwrap();
    assert_eq!(job["exit_code"], 4);

    let queued = flotilla(
        &fleet,
        &["submit", "--engine", "shell", "--json", "sleep 30"],
    )
    .await;
    let job_id = serde_json::from_str::<Value>(queued.stdout.trim()).unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let cancel = flotilla(&fleet, &["cancel", &job_id]).await;
    assert_eq!(cancel.code, Some(0), "{}", cancel.stderr);
    let again = flotilla(&fleet, &["cancel", &job_id]).await;
    assert_eq!(again.code, Some(2), "a second cancel is an API error (409)");
    assert!(again.stderr.contains("409"), "{}", again.stderr);

    let list = flotilla(&fleet, &["ls", "--json", "--limit", "2"]).await;
    let list: Value = serde_json::from_str(list.stdout.trim()).unwrap();
    assert_eq!(list["total"], 3);
    assert_eq!(list["jobs"][0]["job_id"], job_id.as_str());

    let bad = flotilla(&fleet, &["submit", "--engine", "nope", "x"]).await;
    assert_eq!(bad.code, Some(2));
    assert!(bad.stderr.contains("422 (engine)"), "{}", bad.stderr);

    let vars = flotilla(
        &fleet,
        &[
            "submit",
            "--engine",
            "shell",
            "--profile",
            "researcher",
            "--var",
            "query=ships",
            "--dry-run",
            "--wait",
            "--json",
        ],
    )
    .await;
    assert_eq!(vars.code, Some(0), "{}{}", vars.stdout, vars.stderr);

    // Local files into the job's workspace: binary content, and an executable stays one.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.bin");
    std::fs::write(&data, [0u8, 0xfe, b'\n']).unwrap();
    let tool = dir.path().join("tool.sh");
    std::fs::write(&tool, "#!/bin/sh\necho tool ran\n").unwrap();
    std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let attached = flotilla(
        &fleet,
        &[
            "submit",
            "--engine",
            "shell",
            "--attach",
            &format!("{}:in/blob", data.display()),
            "--attach",
            &tool.display().to_string(),
            "--wait",
            "--json",
            "od -An -tx1 in/blob | tr -s ' '; ./tool.sh",
        ],
    )
    .await;
    assert_eq!(
        attached.code,
        Some(0),
        "{}{}",
        attached.stdout,
        attached.stderr
    );
    let job: Value = serde_json::from_str(attached.stdout.trim()).unwrap();
    assert_eq!(job["result"]["text"], " 00 fe 0a\ntool ran\n", "{job}");

    let nodes = flotilla(&fleet, &["nodes", "--json"]).await;
    let nodes: Value = serde_json::from_str(nodes.stdout.trim()).unwrap();
    assert_eq!(nodes["nodes"][0]["node_id"], fleet.node_ids[0].as_str());
    fleet.assert_no_containers_left().await.unwrap();
}
