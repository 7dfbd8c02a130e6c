//! The API holds up to fuzzing: a bounded schemathesis run (examples, coverage and fuzzing
//! phases) against a real gateway with an API key, driven by the OpenAPI document it serves.
//! It must find no server error, no undocumented status code or content type, and no answer
//! that breaks its schema. The streaming and long-poll routes have their own tests.

use std::process::Command;

use flotilla_testkit::Fleet;

const KEY: &str = "fuzz-test-api-key-0123456789";

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_undocumented_answer() {
    let schemathesis = which("schemathesis").unwrap_or_else(|| {
        panic!("schemathesis not found on PATH: pip install schemathesis (.ci/run does)")
    });
    let fleet = Fleet::builder()
        .nodes(0)
        .api_key(KEY)
        .start()
        .await
        .unwrap();
    let report = tempfile::tempdir().unwrap();
    let output = tokio::task::spawn_blocking({
        let api = fleet.api.clone();
        let report = report.path().to_owned();
        move || {
            Command::new(schemathesis)
                .arg("run")
                .arg(format!("{api}/openapi.json"))
                .args(["--url", &api])
                .args(["--header", &format!("Authorization: Bearer {KEY}")])
                .args(["--phases", "examples,coverage,fuzzing"])
                .args([
                    "--checks",
                    "not_a_server_error,status_code_conformance,content_type_conformance,\
                     response_schema_conformance",
                ])
                // One worker: CPython 3.11's AST recursion check is not thread-safe
                // (python/cpython#106905) and fails multi-threaded runs now and then.
                .args(["--max-examples", "5", "--seed", "7", "--workers", "1"])
                .args(["--request-timeout", "10", "--max-time", "120"])
                // Server-sent events and the long poll: their own tests (logs::, events,
                // jobs::) cover them.
                .args(["--exclude-path-regex", "/(logs|events|wait)$"])
                .args(["--report", "junit", "--report-dir"])
                .arg(&report)
                .args(["--generation-database", "none"])
                // Whatever it caches stays out of the work tree.
                .current_dir(&report)
                .env("NO_COLOR", "1")
                .output()
                .expect("schemathesis runs")
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{stdout}\n{stderr}\n{}",
        fleet.logs()
    );
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| std::path::Path::new(dir).join(name))
        .find(|path| path.is_file())
}
