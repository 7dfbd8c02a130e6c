//! Security review, issue 13: resource bounds that must hold after rounding, the recheck of a
//! queued job's bounds, and template limits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::Utc;
use flotilla_proto::{JobRequest, Resources, ResourcesRequest, SubmitRequest, WorkspaceFile};
use serde_json::json;

use crate::{Catalog, Limits, Origin, ValidationError, check_job_request, validate};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The shipped engines with one extra profile `custom`.
fn with_profile(toml: &str) -> Result<Catalog, crate::CatalogError> {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("custom.toml"), toml).unwrap();
    Catalog::load(&root().join("engines"), tmp.path())
}

fn shell(request: SubmitRequest) -> SubmitRequest {
    SubmitRequest {
        agent_id: Some("agent_1".to_owned()),
        engine: Some("shell".to_owned()),
        profile: Some("custom".to_owned()),
        ..request
    }
}

async fn submit(catalog: &Catalog, request: SubmitRequest) -> Result<JobRequest, ValidationError> {
    validate(
        catalog,
        &Limits::default(),
        request,
        Origin::Http,
        Utc::now(),
    )
    .await
}

#[track_caller]
fn assert_refused(result: &Result<impl std::fmt::Debug, ValidationError>, code: &str, field: &str) {
    match result {
        Err(e) => assert_eq!((e.code, e.field.as_deref()), (code, Some(field)), "{e:?}"),
        Ok(ok) => panic!("accepted, expected {code} on {field}: {ok:?}"),
    }
}

#[tokio::test]
async fn cpus_that_round_to_no_limit_are_refused() {
    let catalog = with_profile("").unwrap();
    let cpus = |cpus: f64| {
        shell(SubmitRequest {
            prompt: Some("true".to_owned()),
            resources: Some(ResourcesRequest {
                memory: None,
                cpus: Some(cpus),
            }),
            ..SubmitRequest::default()
        })
    };
    // 1e-10 CPUs is NanoCpus 0, which Docker reads as "no limit".
    for tiny in [1e-10, 4e-10, 0.004, 0.009_999_999] {
        let result = submit(&catalog, cpus(tiny)).await;
        assert_refused(&result, "invalid_field", "resources.cpus");
        let message = result.unwrap_err().message;
        assert!(message.contains("at least 0.01"), "{message}");
    }
    let smallest = submit(&catalog, cpus(0.01)).await.unwrap();
    assert_eq!(smallest.resources.nano_cpus, 10_000_000);
}

#[test]
fn profiles_and_operator_limits_cannot_set_cpus_below_the_floor() {
    let error = with_profile("[resources]\ncpus = 1e-10\n").unwrap_err();
    assert!(error.to_string().contains("[resources].cpus"), "{error}");
    let args = |cpus: f64| crate::LimitsArgs {
        default_timeout_secs: 3600,
        default_job_memory: "2g".to_owned(),
        default_job_cpus: cpus,
        max_job_memory: "8g".to_owned(),
        max_job_cpus: 4.0,
        allow_private_webhooks: false,
        git_allowed_hosts: String::new(),
        allowed_images: String::new(),
    };
    assert!(args(1e-10).into_limits().is_err());
    assert!(args(0.01).into_limits().is_ok());
}

#[test]
fn operator_limits_keep_the_default_timeout_within_the_job_bounds() {
    let args = |secs: u64| crate::LimitsArgs {
        default_timeout_secs: secs,
        default_job_memory: "2g".to_owned(),
        default_job_cpus: 1.0,
        max_job_memory: "8g".to_owned(),
        max_job_cpus: 4.0,
        allow_private_webhooks: false,
        git_allowed_hosts: String::new(),
        allowed_images: String::new(),
    };
    for bad in [0, 86_401, u64::MAX] {
        assert!(args(bad).into_limits().is_err(), "{bad}");
    }
    assert!(args(86_400).into_limits().is_ok());
}

/// A job as validation would produce it.
fn runnable() -> JobRequest {
    JobRequest::example("agent_1-01", "shell", "echo hi")
}

#[test]
fn a_valid_job_passes_the_recheck() {
    let limits = Limits::default();
    assert_eq!(check_job_request(&runnable(), &limits), Ok(()));
    let at_the_bounds = JobRequest {
        timeout_seconds: 86_400,
        resources: Resources {
            memory_bytes: limits.max_memory_bytes,
            nano_cpus: 4_000_000_000,
        },
        max_turns: Some(100),
        retries: 5,
        max_budget_usd: Some(50.0),
        model: Some("claude-sonnet-4-6".to_owned()),
        output_format: Some("stream-json".to_owned()),
        mcp_config: Some(json!({"mcpServers": {}})),
        files: vec![WorkspaceFile {
            path: "src/main.rs".to_owned(),
            content: b"fn main() {}".to_vec(),
            executable: false,
        }],
        requires: (0..16).map(|i| (format!("k{i}"), "v".repeat(64))).collect(),
        image: Some(format!("ghcr.io/{}", "x".repeat(248))),
        runtime: Some("runsc".to_owned()),
        ..runnable()
    };
    assert_eq!(check_job_request(&at_the_bounds, &limits), Ok(()));
}

/// [`runnable`] as `change` leaves it.
fn hostile(change: impl FnOnce(&mut JobRequest)) -> JobRequest {
    let mut request = runnable();
    change(&mut request);
    request
}

fn label(key: &str, value: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(key.to_owned(), value.to_owned())])
}

fn file(path: &str, size: usize) -> WorkspaceFile {
    WorkspaceFile {
        path: path.to_owned(),
        content: vec![b'x'; size],
        executable: false,
    }
}

#[test]
fn a_hostile_queue_message_fails_the_recheck_naming_the_field() {
    let cpus = |nano| hostile(|r| r.resources.nano_cpus = nano);
    let memory = |bytes| hostile(|r| r.resources.memory_bytes = bytes);
    let cases: Vec<(JobRequest, &str)> = vec![
        // Near u64::MAX, the node's timeout arithmetic overflowed and panicked.
        (hostile(|r| r.timeout_seconds = u64::MAX), "timeout_seconds"),
        (hostile(|r| r.timeout_seconds = 0), "timeout_seconds"),
        (hostile(|r| r.timeout_seconds = 86_401), "timeout_seconds"),
        // NanoCpus 0 is "no limit" to Docker; a negative one is refused only by Docker.
        (cpus(0), "resources.cpus"),
        (cpus(-1), "resources.cpus"),
        (cpus(9_999_999), "resources.cpus"),
        (cpus(i64::MAX), "resources.cpus"),
        (memory(0), "resources.memory"),
        (memory(-1), "resources.memory"),
        (memory(i64::MAX), "resources.memory"),
        (
            hostile(|r| r.files = (0..1001).map(|i| file(&format!("f{i}"), 1)).collect()),
            "files",
        ),
        (
            hostile(|r| r.files = vec![file("a", 2 << 20), file("b", 1)]),
            "files",
        ),
        (
            hostile(|r| r.files = vec![file("../../etc/passwd", 1)]),
            "files[0].path",
        ),
        (
            hostile(|r| r.files = vec![file(".flotilla/pre-hook", 1)]),
            "files[0].path",
        ),
        (hostile(|r| r.prompt = "x".repeat(1_000_001)), "prompt"),
        (hostile(|r| r.prompt = "a\0b".to_owned()), "prompt"),
        (
            hostile(|r| r.system_prompt = Some("x".repeat(500_001))),
            "system_prompt",
        ),
        (
            hostile(|r| r.instructions = Some("x".repeat((4 << 20) + 1))),
            "instructions",
        ),
        (hostile(|r| r.max_turns = Some(0)), "max_turns"),
        (hostile(|r| r.max_turns = Some(u32::MAX)), "max_turns"),
        (hostile(|r| r.retries = u32::MAX), "retries"),
        (
            hostile(|r| r.max_budget_usd = Some(f64::INFINITY)),
            "max_budget_usd",
        ),
        (hostile(|r| r.max_budget_usd = Some(-1.0)), "max_budget_usd"),
        (
            hostile(|r| r.model = Some("m; rm -rf /".to_owned())),
            "model",
        ),
        (
            hostile(|r| r.output_format = Some("yaml".to_owned())),
            "output_format",
        ),
        (
            hostile(|r| r.allowed_tools = vec!["t".to_owned(); 101]),
            "allowed_tools",
        ),
        (
            hostile(|r| r.allowed_tools = vec!["a\nb".to_owned()]),
            "allowed_tools[0]",
        ),
        (hostile(|r| r.mcp_config = Some(json!([1]))), "mcp_config"),
        (
            hostile(|r| r.mcp_config = Some(json!({"x": "y".repeat(256 * 1024)}))),
            "mcp_config",
        ),
        (
            hostile(|r| r.plugins = vec!["../x".to_owned()]),
            "plugins[0]",
        ),
        (hostile(|r| r.job_id = "a/b".to_owned()), "job_id"),
        (hostile(|r| r.agent_id = String::new()), "agent_id"),
        (hostile(|r| r.engine = "sh ell".to_owned()), "engine"),
        (hostile(|r| r.profile = "x".repeat(65)), "profile"),
        (
            hostile(|r| r.requires = (0..17).map(|i| (format!("k{i}"), "v".to_owned())).collect()),
            "requires",
        ),
        (
            hostile(|r| r.requires = label("gpu;rm", "a100")),
            "requires",
        ),
        (hostile(|r| r.requires = label("gpu", "")), "requires.gpu"),
        (
            hostile(|r| r.requires = label("gpu", &"x".repeat(65))),
            "requires.gpu",
        ),
        (
            hostile(|r| r.image = Some(format!("ghcr.io/{}", "x".repeat(249)))),
            "image",
        ),
        (
            hostile(|r| r.image = Some("--privileged".to_owned())),
            "image",
        ),
        (hostile(|r| r.image = Some("alpine\nx".to_owned())), "image"),
        (hostile(|r| r.image = Some(String::new())), "image"),
        (
            hostile(|r| r.runtime = Some("../runc".to_owned())),
            "runtime",
        ),
        (hostile(|r| r.runtime = Some(String::new())), "runtime"),
    ];
    let limits = Limits::default();
    for (request, field) in cases {
        let result = check_job_request(&request, &limits);
        assert_refused(&result, "invalid_field", field);
    }
    let forever = hostile(|r| r.timeout_seconds = u64::MAX);
    assert_eq!(
        check_job_request(&forever, &limits).unwrap_err().message,
        "timeout_seconds must be between 1 and 86400, got 18446744073709551615"
    );
}

#[test]
fn the_recheck_applies_the_node_s_own_maximums() {
    let limits = Limits {
        max_memory_bytes: 1 << 30,
        max_cpus: 1.0,
        ..Limits::default()
    };
    let big = JobRequest {
        resources: Resources {
            memory_bytes: 2 << 30,
            nano_cpus: 1_000_000_000,
        },
        ..runnable()
    };
    assert_refused(
        &check_job_request(&big, &limits),
        "invalid_field",
        "resources.memory",
    );
    let many = JobRequest {
        resources: Resources {
            memory_bytes: 1 << 30,
            nano_cpus: 2_000_000_000,
        },
        ..runnable()
    };
    assert_refused(
        &check_job_request(&many, &limits),
        "invalid_field",
        "resources.cpus",
    );
}

fn templated(section: &str, template: &str) -> Catalog {
    let toml = format!("[{section}]\ntemplate = '''{template}'''\n");
    with_profile(&toml).unwrap()
}

fn from_profile(prompt: Option<&str>) -> SubmitRequest {
    shell(SubmitRequest {
        prompt: prompt.map(str::to_owned),
        ..SubmitRequest::default()
    })
}

#[tokio::test]
async fn a_template_that_runs_too_long_runs_out_of_fuel() {
    // About six million instructions: done in a moment, but far more than any real template.
    let catalog = templated(
        "prompt",
        "{% for i in range(2000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}go",
    );
    let result = submit(&catalog, from_profile(None)).await;
    assert_refused(&result, "template_error", "prompt_vars");
    let message = result.unwrap_err().message;
    assert!(message.contains("fuel"), "{message}");
}

#[tokio::test]
async fn a_template_may_not_render_more_than_the_output_cap() {
    // The agent-instructions file has no character cap of its own: only the render cap holds it.
    let catalog = templated("claude_md", "{{ 'x' * 5000000 }}");
    let result = submit(&catalog, from_profile(Some("go"))).await;
    assert_refused(&result, "template_error", "claude_md_vars");
    let message = result.unwrap_err().message;
    assert!(message.contains("more than 4 MiB"), "{message}");
    // Ordinary templates render as before.
    let catalog = templated(
        "claude_md",
        "# Rules\n{% for i in range(3) %}- rule {{ i }}\n{% endfor %}",
    );
    let job = submit(&catalog, from_profile(Some("go"))).await.unwrap();
    assert_eq!(
        job.instructions.as_deref(),
        Some("# Rules\n- rule 0\n- rule 1\n- rule 2\n")
    );
}
