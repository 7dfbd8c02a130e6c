//! Validation and command lines against the shipped engines/ and profiles/ directories.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, TimeZone, Utc};
use flotilla_proto::{
    FileRequest, JobRequest, Priority, ResourcesRequest, SubmitRequest, WorkspaceFile,
};
use serde_json::{Value, json};

use crate::{Catalog, ImageAllowList, Limits, Origin, ValidationError, validate};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn shipped() -> Catalog {
    Catalog::load(&root().join("engines"), &root().join("profiles")).unwrap()
}

/// The shipped engines with one extra profile `custom`.
fn with_profile(toml: &str) -> Catalog {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("custom.toml"), toml).unwrap();
    Catalog::load(&root().join("engines"), tmp.path()).unwrap()
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap()
}

/// A request that passes: agent, shell engine, a prompt.
fn base() -> SubmitRequest {
    SubmitRequest {
        agent_id: Some("agent_1".to_owned()),
        engine: Some("shell".to_owned()),
        prompt: Some("echo hi".to_owned()),
        ..SubmitRequest::default()
    }
}

fn obj(value: Value) -> Option<serde_json::Map<String, Value>> {
    match value {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

async fn run_with(
    catalog: &Catalog,
    limits: &Limits,
    request: SubmitRequest,
) -> Result<JobRequest, ValidationError> {
    validate(catalog, limits, request, Origin::Http, now()).await
}

async fn ok(request: SubmitRequest) -> JobRequest {
    run_with(&shipped(), &Limits::default(), request)
        .await
        .unwrap()
}

async fn err(request: SubmitRequest) -> ValidationError {
    run_with(&shipped(), &Limits::default(), request)
        .await
        .unwrap_err()
}

#[track_caller]
fn assert_err(err: &ValidationError, code: &str, field: &str) {
    assert_eq!(
        (err.code, err.field.as_deref()),
        (code, Some(field)),
        "{err:?}"
    );
}

#[tokio::test]
async fn minimal_request_gets_every_default() {
    let job = ok(base()).await;
    assert!(job.job_id.starts_with("agent_1-"), "{}", job.job_id);
    assert!(flotilla_proto::ids::is_valid_job_id(&job.job_id));
    assert_eq!(job.engine, "shell");
    assert_eq!(job.profile, "default");
    assert_eq!(job.prompt, "echo hi");
    assert_eq!(job.model.as_deref(), Some("claude-sonnet-4-6"));
    assert_eq!(
        job.allowed_tools,
        ["Read", "Grep", "Glob", "Bash", "Write", "Edit"]
    );
    assert_eq!(job.output_format.as_deref(), Some("json"));
    assert_eq!((job.max_turns, job.max_budget_usd), (None, None));
    assert_eq!(job.timeout_seconds, 3600);
    assert_eq!(job.resources.memory_bytes, 2 << 30);
    assert_eq!(job.resources.nano_cpus, 1_000_000_000);
    assert!(!job.dry_run);
    assert_eq!(job.instructions, None);
    assert_eq!(job.created_at, now());
}

#[tokio::test]
async fn job_id_depends_on_origin() {
    let catalog = shipped();
    let limits = Limits::default();
    let with_id = SubmitRequest {
        job_id: Some("mine-1".to_owned()),
        ..base()
    };

    let e = run_with(&catalog, &limits, with_id.clone())
        .await
        .unwrap_err();
    assert_err(&e, "invalid_field", "job_id");
    assert_eq!(e.message, "job_id is assigned by the server");

    let job = validate(&catalog, &limits, with_id, Origin::Nats, now())
        .await
        .unwrap();
    assert_eq!(job.job_id, "mine-1");
    let bad = SubmitRequest {
        job_id: Some("a.b".to_owned()),
        ..base()
    };
    let e = validate(&catalog, &limits, bad, Origin::Nats, now())
        .await
        .unwrap_err();
    assert_err(&e, "invalid_field", "job_id");
    let job = validate(&catalog, &limits, base(), Origin::Nats, now())
        .await
        .unwrap();
    assert!(job.job_id.starts_with("agent_1-"));

    // A scheduled run's id is the scheduler's alone: a direct submitter may not take one.
    let hijack = SubmitRequest {
        job_id: Some("sched-nightly-1767225600".to_owned()),
        ..base()
    };
    let e = validate(&catalog, &limits, hijack.clone(), Origin::Nats, now())
        .await
        .unwrap_err();
    assert_err(&e, "invalid_field", "job_id");
    assert!(e.message.contains("sched-"), "{}", e.message);
    let run = validate(&catalog, &limits, hijack, Origin::Schedule, now())
        .await
        .unwrap();
    assert_eq!(run.job_id, "sched-nightly-1767225600");
}

#[tokio::test]
async fn agent_profile_and_engine_rules() {
    assert_err(
        &err(SubmitRequest {
            agent_id: None,
            ..base()
        })
        .await,
        "missing_field",
        "agent_id",
    );
    for bad in ["", "a b", "a.b", &"x".repeat(65)] {
        let e = err(SubmitRequest {
            agent_id: Some(bad.to_owned()),
            ..base()
        })
        .await;
        assert_err(&e, "invalid_field", "agent_id");
    }
    let e = err(SubmitRequest {
        profile: Some("../x".to_owned()),
        ..base()
    })
    .await;
    assert_err(&e, "invalid_field", "profile");
    let e = err(SubmitRequest {
        profile: Some("nope".to_owned()),
        ..base()
    })
    .await;
    assert_err(&e, "unknown_profile", "profile");

    let e = err(SubmitRequest {
        engine: None,
        ..base()
    })
    .await;
    assert_err(&e, "missing_field", "engine");
    let e = err(SubmitRequest {
        engine: Some("gpt-9".to_owned()),
        ..base()
    })
    .await;
    assert_err(&e, "unknown_engine", "engine");

    // The shell profile names its engine.
    let job = ok(SubmitRequest {
        engine: None,
        profile: Some("shell".to_owned()),
        ..base()
    })
    .await;
    assert_eq!((job.engine.as_str(), job.model), ("shell", None));
}

#[tokio::test]
async fn prompt_rules() {
    let e = err(SubmitRequest {
        prompt: Some("a\0b".to_owned()),
        ..base()
    })
    .await;
    assert_err(&e, "invalid_field", "prompt");
    let e = err(SubmitRequest {
        prompt: Some("x".repeat(1_000_001)),
        ..base()
    })
    .await;
    assert_err(&e, "invalid_field", "prompt");
    // The limit counts characters: a million 2-byte characters fit.
    let job = ok(SubmitRequest {
        prompt: Some("é".repeat(1_000_000)),
        ..base()
    })
    .await;
    assert_eq!(job.prompt.chars().count(), 1_000_000);

    // An agent CLI takes it as one argument, which Linux caps at 128 KiB.
    let cli = |field: &str, text: String| {
        let mut request = SubmitRequest {
            engine: Some("claude-code".to_owned()),
            ..base()
        };
        match field {
            "prompt" => request.prompt = Some(text),
            _ => request.system_prompt = Some(text),
        }
        request
    };
    for field in ["prompt", "system_prompt"] {
        let job = ok(cli(field, "x".repeat(128 * 1024 - 1))).await;
        assert_eq!(job.engine, "claude-code");
        let e = err(cli(field, "x".repeat(128 * 1024))).await;
        assert_err(&e, "invalid_field", field);
        assert!(
            e.to_string().contains("one command-line argument"),
            "{field}: {e}"
        );
    }
}

#[tokio::test]
async fn prompt_template_rendering() {
    let job = ok(SubmitRequest {
        prompt: None,
        prompt_vars: obj(json!({"task": "list files"})),
        ..base()
    })
    .await;
    assert_eq!(job.prompt, "list files");

    // default's `task` defaults to "" so the template renders nothing.
    for prompt in [None, Some(String::new()), Some("  \n".to_owned())] {
        let e = err(SubmitRequest { prompt, ..base() }).await;
        assert_err(&e, "missing_prompt", "prompt");
    }
    // No template at all.
    let e = err(SubmitRequest {
        prompt: None,
        profile: Some("shell".to_owned()),
        ..base()
    })
    .await;
    assert_err(&e, "missing_prompt", "prompt");

    let job = ok(SubmitRequest {
        prompt: None,
        profile: Some("code-review".to_owned()),
        prompt_vars: obj(json!({"repo_url": "https://example.com/r.git", "focus": "security"})),
        ..base()
    })
    .await;
    assert!(
        job.prompt
            .contains("https://example.com/r.git (branch main)"),
        "{}",
        job.prompt
    );
    assert!(
        job.prompt.contains("Concentrate on security."),
        "{}",
        job.prompt
    );
    assert!(!job.prompt.contains("Run the tests"), "{}", job.prompt);
    let instructions = job.instructions.unwrap();
    assert!(
        instructions.contains("You are a senior code reviewer."),
        "{instructions}"
    );
}

#[tokio::test]
async fn typed_variables() {
    let e = err(SubmitRequest {
        prompt: None,
        profile: Some("researcher".to_owned()),
        ..base()
    })
    .await;
    assert_err(&e, "missing_field", "prompt_vars.query");
    let e = err(SubmitRequest {
        profile: Some("code-review".to_owned()),
        prompt_vars: obj(json!({"repo_url": "r", "focus": "vibes"})),
        ..base()
    })
    .await;
    assert_err(&e, "invalid_field", "prompt_vars.focus");
    assert!(
        e.message
            .contains(r#"["all","security","performance","style"]"#),
        "{}",
        e.message
    );

    let catalog = with_profile(
        r#"
        [prompt]
        template = "{{ n }}/{{ f }}/{{ b }}/{{ extra }}/{{ absent }}."
        [prompt.variables.n]
        type = "integer"
        default = 1
        [prompt.variables.f]
        type = "float"
        required = true
        [prompt.variables.b]
        type = "boolean"
        default = false
        [prompt.variables.absent]
        type = "string"
        [claude_md]
        template = "role={{ role }}"
        [claude_md.variables.role]
        default = "helper"
        "#,
    );
    let limits = Limits::default();
    let request = |vars: Value, md: Value| SubmitRequest {
        prompt: None,
        profile: Some("custom".to_owned()),
        prompt_vars: obj(vars),
        claude_md_vars: obj(md),
        ..base()
    };
    // Floats accept integers; undeclared keys reach the template; unset optional ones render empty.
    let job = run_with(
        &catalog,
        &limits,
        request(json!({"f": 2, "extra": "x"}), json!({})),
    )
    .await
    .unwrap();
    assert_eq!(job.prompt, "1/2/False/x/.");
    assert_eq!(job.instructions.as_deref(), Some("role=helper"));
    let job = run_with(
        &catalog,
        &limits,
        request(json!({"f": 2.5, "n": null}), json!({"role": "boss"})),
    )
    .await
    .unwrap();
    assert_eq!(job.prompt, "1/2.5/False//.");
    assert_eq!(job.instructions.as_deref(), Some("role=boss"));

    for (vars, md, field) in [
        (json!({"f": 1, "n": true}), json!({}), "prompt_vars.n"),
        (json!({"f": 1, "n": 1.5}), json!({}), "prompt_vars.n"),
        (json!({"f": "1"}), json!({}), "prompt_vars.f"),
        (json!({"f": 1, "b": 0}), json!({}), "prompt_vars.b"),
        (json!({"f": 1}), json!({"role": 7}), "claude_md_vars.role"),
    ] {
        let e = run_with(&catalog, &limits, request(vars, md))
            .await
            .unwrap_err();
        assert_err(&e, "invalid_field", field);
    }
    let e = run_with(&catalog, &limits, request(json!({}), json!({})))
        .await
        .unwrap_err();
    assert_err(&e, "missing_field", "prompt_vars.f");
}

#[tokio::test]
async fn template_runtime_errors_are_reported() {
    let catalog = with_profile("[prompt]\ntemplate = \"{{ x.y.z }}\"\n");
    let request = SubmitRequest {
        prompt: None,
        profile: Some("custom".to_owned()),
        ..base()
    };
    let e = run_with(&catalog, &Limits::default(), request)
        .await
        .unwrap_err();
    assert_err(&e, "template_error", "prompt_vars");
}

#[tokio::test]
async fn scalar_field_rules() {
    let cases: Vec<(SubmitRequest, &str)> = vec![
        (
            SubmitRequest {
                model: Some("a b".to_owned()),
                ..base()
            },
            "model",
        ),
        (
            SubmitRequest {
                model: Some("m".repeat(129)),
                ..base()
            },
            "model",
        ),
        (
            SubmitRequest {
                system_prompt: Some("x".repeat(500_001)),
                ..base()
            },
            "system_prompt",
        ),
        (
            SubmitRequest {
                system_prompt: Some("\0".to_owned()),
                ..base()
            },
            "system_prompt",
        ),
        (
            SubmitRequest {
                allowed_tools: Some(vec!["Read".to_owned(), String::new()]),
                ..base()
            },
            "allowed_tools[1]",
        ),
        (
            SubmitRequest {
                allowed_tools: Some(vec!["a\nb".to_owned()]),
                ..base()
            },
            "allowed_tools[0]",
        ),
        (
            SubmitRequest {
                allowed_tools: Some(vec!["x".repeat(257)]),
                ..base()
            },
            "allowed_tools[0]",
        ),
        (
            SubmitRequest {
                allowed_tools: Some(vec!["T".to_owned(); 101]),
                ..base()
            },
            "allowed_tools",
        ),
        (
            SubmitRequest {
                max_turns: Some(0),
                ..base()
            },
            "max_turns",
        ),
        (
            SubmitRequest {
                max_turns: Some(101),
                ..base()
            },
            "max_turns",
        ),
        (
            SubmitRequest {
                max_budget_usd: Some(0.0),
                ..base()
            },
            "max_budget_usd",
        ),
        (
            SubmitRequest {
                max_budget_usd: Some(50.01),
                ..base()
            },
            "max_budget_usd",
        ),
        (
            SubmitRequest {
                max_budget_usd: Some(f64::NAN),
                ..base()
            },
            "max_budget_usd",
        ),
        (
            SubmitRequest {
                max_budget_usd: Some(f64::INFINITY),
                ..base()
            },
            "max_budget_usd",
        ),
        (
            SubmitRequest {
                output_format: Some("xml".to_owned()),
                ..base()
            },
            "output_format",
        ),
        (
            SubmitRequest {
                mcp_config: Some(json!([1])),
                ..base()
            },
            "mcp_config",
        ),
        (
            SubmitRequest {
                mcp_config: Some(json!("{}")),
                ..base()
            },
            "mcp_config",
        ),
        (
            SubmitRequest {
                mcp_config: Some(json!({"x": "y".repeat(256 * 1024)})),
                ..base()
            },
            "mcp_config",
        ),
        (
            SubmitRequest {
                plugins: Some(vec!["ok".to_owned(), "not/ok".to_owned()]),
                ..base()
            },
            "plugins[1]",
        ),
        (
            SubmitRequest {
                webhook_url: Some("http://localhost:8080/x".to_owned()),
                ..base()
            },
            "webhook_url",
        ),
        (
            SubmitRequest {
                webhook_url: Some("http://10.0.0.1/x".to_owned()),
                ..base()
            },
            "webhook_url",
        ),
        (
            SubmitRequest {
                webhook_url: Some("gopher://93.184.216.34/".to_owned()),
                ..base()
            },
            "webhook_url",
        ),
        (
            SubmitRequest {
                timeout_seconds: Some(0),
                ..base()
            },
            "timeout_seconds",
        ),
        (
            SubmitRequest {
                timeout_seconds: Some(86_401),
                ..base()
            },
            "timeout_seconds",
        ),
    ];
    for (request, field) in cases {
        assert_err(&err(request).await, "invalid_field", field);
    }
}

#[tokio::test]
async fn valid_scalar_fields_pass_through() {
    let job = ok(SubmitRequest {
        model: Some("anthropic/claude-opus-4-6:beta".to_owned()),
        system_prompt: Some("be brief".to_owned()),
        allowed_tools: Some(vec!["Read".to_owned()]),
        max_turns: Some(100),
        max_budget_usd: Some(50.0),
        output_format: Some("stream-json".to_owned()),
        mcp_config: Some(json!({"mcpServers": {}})),
        plugins: Some(vec!["p-1".to_owned()]),
        dry_run: Some(true),
        webhook_url: Some("https://93.184.216.34/hook".to_owned()),
        timeout_seconds: Some(86_400),
        metadata: Some(BTreeMap::from([("team.name".to_owned(), "x".repeat(1024))])),
        ..base()
    })
    .await;
    assert_eq!(job.model.as_deref(), Some("anthropic/claude-opus-4-6:beta"));
    assert_eq!(job.allowed_tools, ["Read"]);
    assert_eq!((job.max_turns, job.max_budget_usd), (Some(100), Some(50.0)));
    assert_eq!(job.output_format.as_deref(), Some("stream-json"));
    assert_eq!(job.mcp_config, Some(json!({"mcpServers": {}})));
    assert_eq!(job.plugins, ["p-1"]);
    assert!(job.dry_run);
    assert_eq!(job.timeout_seconds, 86_400);
    assert_eq!(job.metadata.len(), 1);

    // An empty tools list means "no preference": the profile's list applies.
    let job = ok(SubmitRequest {
        allowed_tools: Some(Vec::new()),
        ..base()
    })
    .await;
    assert_eq!(job.allowed_tools.len(), 6);
}

#[tokio::test]
async fn private_webhooks_when_allowed() {
    let limits = Limits {
        allow_private_webhooks: true,
        ..Limits::default()
    };
    let request = SubmitRequest {
        webhook_url: Some("http://127.0.0.1:9999/hook".to_owned()),
        ..base()
    };
    let job = run_with(&shipped(), &limits, request).await.unwrap();
    assert_eq!(
        job.webhook_url.as_deref(),
        Some("http://127.0.0.1:9999/hook")
    );
}

#[tokio::test]
async fn resources_rules() {
    let res = |memory: Option<&str>, cpus: Option<f64>| SubmitRequest {
        resources: Some(ResourcesRequest {
            memory: memory.map(str::to_owned),
            cpus,
        }),
        ..base()
    };
    let job = ok(res(Some("512m"), Some(0.5))).await;
    assert_eq!(job.resources.memory_bytes, 512 << 20);
    assert_eq!(job.resources.nano_cpus, 500_000_000);

    for (request, field) in [
        (res(Some("lots"), None), "resources.memory"),
        (res(Some("5m"), None), "resources.memory"),
        (res(Some("9g"), None), "resources.memory"),
        (res(None, Some(0.0)), "resources.cpus"),
        (res(None, Some(-1.0)), "resources.cpus"),
        (res(None, Some(f64::NAN)), "resources.cpus"),
        (res(None, Some(4.5)), "resources.cpus"),
    ] {
        assert_err(&err(request).await, "invalid_field", field);
    }
    let e = err(res(Some("9g"), None)).await;
    assert_eq!(
        e.message,
        "resources.memory 9g is above the operator limit of 8g"
    );
    let e = err(res(Some("lots"), None)).await;
    assert!(e.message.contains("\"512m\""), "{}", e.message);
}

#[tokio::test]
async fn metadata_rules() {
    let meta = |pairs: Vec<(String, String)>| SubmitRequest {
        metadata: Some(pairs.into_iter().collect()),
        ..base()
    };
    let many = (0..33).map(|i| (format!("k{i}"), String::new())).collect();
    assert_err(&err(meta(many)).await, "invalid_field", "metadata");
    let bad_key = vec![("a b".to_owned(), "v".to_owned())];
    assert_err(&err(meta(bad_key)).await, "invalid_field", "metadata");
    let long_key = vec![("k".repeat(65), "v".to_owned())];
    assert_err(&err(meta(long_key)).await, "invalid_field", "metadata");
    let long_value = vec![("team".to_owned(), "v".repeat(1025))];
    assert_err(
        &err(meta(long_value)).await,
        "invalid_field",
        "metadata.team",
    );
}

#[tokio::test]
async fn first_broken_rule_wins() {
    let e = err(SubmitRequest {
        model: Some("bad model".to_owned()),
        max_turns: Some(0),
        metadata: Some(BTreeMap::from([("a b".to_owned(), String::new())])),
        ..base()
    })
    .await;
    assert_err(&e, "invalid_field", "model");
}

#[tokio::test]
async fn defaults_request_then_profile_then_limits() {
    let catalog = with_profile(
        r#"
        [agent]
        engine = "claude-code"
        model = "profile-model"
        max_turns = 7
        max_budget_usd = 3.0
        output_format = "text"
        [tools]
        allowed = ["Read"]
        [plugins]
        enabled = ["from-profile"]
        [resources]
        timeout = 120
        memory = "1g"
        cpus = 2
        "#,
    );
    let limits = Limits {
        default_timeout_seconds: 99,
        ..Limits::default()
    };
    let from_profile = SubmitRequest {
        engine: None,
        profile: Some("custom".to_owned()),
        ..base()
    };

    let job = run_with(&catalog, &limits, from_profile.clone())
        .await
        .unwrap();
    assert_eq!(job.engine, "claude-code");
    assert_eq!(job.model.as_deref(), Some("profile-model"));
    assert_eq!((job.max_turns, job.max_budget_usd), (Some(7), Some(3.0)));
    assert_eq!(job.output_format.as_deref(), Some("text"));
    assert_eq!(job.allowed_tools, ["Read"]);
    assert_eq!(job.plugins, ["from-profile"]);
    assert_eq!(job.timeout_seconds, 120);
    assert_eq!(job.resources.memory_bytes, 1 << 30);
    assert_eq!(job.resources.nano_cpus, 2_000_000_000);

    let job = run_with(
        &catalog,
        &limits,
        SubmitRequest {
            engine: Some("shell".to_owned()),
            model: Some("request-model".to_owned()),
            max_turns: Some(2),
            max_budget_usd: Some(1.0),
            output_format: Some("json".to_owned()),
            allowed_tools: Some(vec!["Bash".to_owned()]),
            plugins: Some(Vec::new()),
            timeout_seconds: Some(5),
            resources: Some(ResourcesRequest {
                memory: Some("64m".to_owned()),
                cpus: Some(0.25),
            }),
            ..from_profile
        },
    )
    .await
    .unwrap();
    assert_eq!(job.engine, "shell");
    assert_eq!(job.model.as_deref(), Some("request-model"));
    assert_eq!((job.max_turns, job.max_budget_usd), (Some(2), Some(1.0)));
    assert_eq!(job.output_format.as_deref(), Some("json"));
    assert_eq!(job.allowed_tools, ["Bash"]);
    assert!(job.plugins.is_empty());
    assert_eq!(job.timeout_seconds, 5);
    assert_eq!(job.resources.memory_bytes, 64 << 20);
    assert_eq!(job.resources.nano_cpus, 250_000_000);

    // Neither request nor profile: the operator's defaults.
    let job = run_with(&shipped(), &limits, base()).await.unwrap();
    assert_eq!(job.timeout_seconds, 99);

    // A profile above a stricter operator cap is refused, not clamped.
    let strict = Limits {
        max_memory_bytes: 512 << 20,
        max_cpus: 1.0,
        ..Limits::default()
    };
    let e = run_with(
        &catalog,
        &strict,
        SubmitRequest {
            engine: None,
            profile: Some("custom".to_owned()),
            ..base()
        },
    )
    .await
    .unwrap_err();
    assert_err(&e, "invalid_field", "resources.memory");
}

fn job(engine: &str, prompt: &str) -> JobRequest {
    JobRequest {
        created_at: now(),
        ..JobRequest::example("a-1", engine, prompt)
    }
}

#[test]
fn claude_code_command_line() {
    let catalog = shipped();
    let claude = catalog.engine("claude-code").unwrap();
    let request = JobRequest {
        model: Some("claude-sonnet-4-6".to_owned()),
        output_format: Some("json".to_owned()),
        max_turns: Some(12),
        max_budget_usd: Some(2.5),
        system_prompt: Some("Be terse.".to_owned()),
        allowed_tools: vec!["Read".to_owned(), "Bash(git:*)".to_owned()],
        mcp_config: Some(json!({"mcpServers": {}})),
        ..job("claude-code", "Fix the bug")
    };
    assert_eq!(
        claude.command_line(&request),
        [
            "claude",
            "--verbose",
            "-p",
            "--model",
            "claude-sonnet-4-6",
            "--output-format",
            "json",
            "--max-turns",
            "12",
            "--max-budget-usd",
            "2.50",
            "--system-prompt",
            "Be terse.",
            "--allowedTools",
            "Read,Bash(git:*)",
            "--dangerously-skip-permissions",
            "--mcp-config",
            "/workspace/.flotilla/mcp.json",
            "--",
            "Fix the bug",
        ]
    );
    // Unset fields add nothing, and no MCP flag without an MCP config.
    assert_eq!(
        claude.command_line(&job("claude-code", "hi")),
        [
            "claude",
            "--verbose",
            "-p",
            "--dangerously-skip-permissions",
            "--",
            "hi"
        ]
    );
}

#[test]
fn opencode_prompt_is_positional() {
    let catalog = shipped();
    let request = JobRequest {
        model: Some("anthropic/claude-sonnet-4-6".to_owned()),
        output_format: Some("json".to_owned()),
        max_turns: Some(3),
        mcp_config: Some(json!({})),
        ..job("opencode", "Explain this repo")
    };
    assert_eq!(
        catalog.engine("opencode").unwrap().command_line(&request),
        [
            "opencode",
            "run",
            "--model",
            "anthropic/claude-sonnet-4-6",
            "--format",
            "json",
            "--",
            "Explain this repo",
        ]
    );
    // OpenCode's --format has no `text`: it is `default` there.
    let text = JobRequest {
        output_format: Some("text".to_owned()),
        ..job("opencode", "Explain this repo")
    };
    assert_eq!(
        catalog.engine("opencode").unwrap().command_line(&text)[2..],
        ["--format", "default", "--", "Explain this repo"]
    );
}

#[test]
fn shell_command_line() {
    let catalog = shipped();
    let request = JobRequest {
        model: Some("ignored".to_owned()),
        ..job("shell", "echo hi; exit 3")
    };
    assert_eq!(
        catalog.engine("shell").unwrap().command_line(&request),
        ["/bin/sh", "-c", "echo hi; exit 3"]
    );
}

#[test]
fn other_shipped_engines_put_the_prompt_where_their_cli_expects_it() {
    let catalog = shipped();
    let request = JobRequest {
        model: Some("m".to_owned()),
        ..job("x", "P")
    };
    let argv = |id: &str| catalog.engine(id).unwrap().command_line(&request);
    let codex = argv("codex");
    assert_eq!(codex[..2], ["codex", "exec"]);
    assert!(codex.contains(&"--json".to_owned()));
    assert!(
        codex.ends_with(&["--".to_owned(), "P".to_owned()]),
        "{codex:?}"
    );
    // Gemini and Aider take the prompt as an option's value, where `--` would not apply.
    let gemini = argv("gemini");
    assert_eq!(gemini[..3], ["gemini", "-p", "P"]);
    let aider = argv("aider");
    let at = aider.iter().position(|a| a == "--message").unwrap();
    assert_eq!(aider[at + 1], "P");
    assert!(aider.ends_with(&["--model".to_owned(), "m".to_owned()]));
}

#[test]
fn profile_summaries() {
    let catalog = shipped();
    let review = catalog.profile("code-review").unwrap().summary();
    assert_eq!(review["name"], "code-review");
    assert_eq!(review["engine"], "claude-code");
    assert_eq!(review["prompt_vars"]["repo_url"]["required"], true);
    assert_eq!(review["prompt_vars"]["focus"]["default"], "all");
    assert_eq!(review["prompt_vars"]["focus"]["enum"][1], "security");
    assert_eq!(review["prompt_vars"]["focus"]["type"], "string");
    assert_eq!(
        catalog.profile("shell").unwrap().summary()["engine"],
        "shell"
    );
}

#[tokio::test]
async fn a_profile_model_allow_list_travels_with_the_job_and_refuses_other_models() {
    let catalog = with_profile(
        "[agent]\nengine = \"claude-code\"\nmodel = \"claude-sonnet-4-5\"\nallowed_models = [\"claude-sonnet-4-5*\", \"claude-haiku-4-5\"]\n",
    );
    let request = |model: Option<&str>| SubmitRequest {
        engine: None,
        profile: Some("custom".to_owned()),
        model: model.map(str::to_owned),
        ..base()
    };
    let job = run_with(&catalog, &Limits::default(), request(None))
        .await
        .unwrap();
    assert_eq!(
        job.allowed_models,
        vec!["claude-sonnet-4-5*", "claude-haiku-4-5"]
    );
    run_with(
        &catalog,
        &Limits::default(),
        request(Some("claude-haiku-4-5")),
    )
    .await
    .unwrap();
    let e = run_with(
        &catalog,
        &Limits::default(),
        request(Some("claude-opus-4-1")),
    )
    .await
    .unwrap_err();
    assert_err(&e, "invalid_field", "model");
    assert!(
        e.message.contains("not allowed by profile custom"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn a_profile_s_provider_tools_travel_with_the_job() {
    let catalog = with_profile(
        "[agent]\nengine = \"claude-code\"\nallowed_provider_tools = [\"web_search\", \"web-fetch-2025-09-10\"]\n",
    );
    let request = SubmitRequest {
        engine: None,
        profile: Some("custom".to_owned()),
        ..base()
    };
    let job = run_with(&catalog, &Limits::default(), request)
        .await
        .unwrap();
    assert_eq!(
        job.allowed_provider_tools,
        vec!["web_search", "web-fetch-2025-09-10"]
    );
    // None named: none travel (and the field stays out of the message).
    let job = ok(base()).await;
    assert!(job.allowed_provider_tools.is_empty());
    let text = serde_json::to_string(&job).unwrap();
    assert!(!text.contains("allowed_provider_tools"), "{text}");
}

#[test]
fn a_profile_whose_model_is_outside_its_allow_list_does_not_load() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("bad.toml"),
        "[agent]\nmodel = \"gpt-5\"\nallowed_models = [\"claude-*\"]\n",
    )
    .unwrap();
    let e = Catalog::load(&root().join("engines"), tmp.path()).unwrap_err();
    assert!(
        e.to_string().contains("not in [agent].allowed_models"),
        "{e}"
    );
}

fn file(path: &str, content: &str, encoding: Option<&str>) -> FileRequest {
    FileRequest {
        path: Some(path.to_owned()),
        content: Some(content.to_owned()),
        encoding: encoding.map(str::to_owned),
        executable: None,
    }
}

fn with_files(files: Vec<FileRequest>) -> SubmitRequest {
    SubmitRequest {
        files: Some(files),
        ..base()
    }
}

#[tokio::test]
async fn files_are_decoded_and_their_paths_checked() {
    let job = ok(with_files(vec![
        file("notes/a.txt", "héllo\n", None),
        FileRequest {
            executable: Some(true),
            ..file("bin/data", "AP9h", Some("base64"))
        },
    ]))
    .await;
    assert_eq!(
        job.files,
        [
            WorkspaceFile {
                path: "notes/a.txt".to_owned(),
                content: "héllo\n".as_bytes().to_vec(),
                executable: false,
            },
            WorkspaceFile {
                path: "bin/data".to_owned(),
                content: vec![0, 0xff, 0x61],
                executable: true,
            },
        ]
    );
    assert!(ok(base()).await.files.is_empty());

    for (files, field) in [
        (vec![file("/etc/passwd", "x", None)], "files[0].path"),
        (vec![file("a/../../etc", "x", None)], "files[0].path"),
        (vec![file("a//b", "x", None)], "files[0].path"),
        (vec![file("./a", "x", None)], "files[0].path"),
        (vec![file(".flotilla/job.sh", "x", None)], "files[0].path"),
        (vec![file("", "x", None)], "files[0].path"),
        (
            vec![file("a", "x", None), file("a", "y", None)],
            "files[1].path",
        ),
        (vec![file("a", "%%%", Some("base64"))], "files[0].content"),
        (vec![file("a", "x", Some("hex"))], "files[0].encoding"),
    ] {
        let e = err(with_files(files)).await;
        assert_err(&e, "invalid_field", field);
    }
    let e = err(with_files(vec![FileRequest {
        content: None,
        ..file("a", "", None)
    }]))
    .await;
    assert_err(&e, "missing_field", "files[0].content");

    // 2 MiB in all, decoded.
    let half = "x".repeat(1024 * 1024);
    ok(with_files(vec![
        file("a", &half, None),
        file("b", &half, None),
    ]))
    .await;
    let e = err(with_files(vec![
        file("a", &half, None),
        file("b", &half, None),
        file("c", "x", None),
    ]))
    .await;
    assert_err(&e, "invalid_field", "files");
    let many = (0..1001)
        .map(|i| file(&format!("f{i}"), "", None))
        .collect();
    assert_err(&err(with_files(many)).await, "invalid_field", "files");
}

#[tokio::test]
async fn retries_come_from_the_request_or_the_profile() {
    assert_eq!(ok(base()).await.retries, 0);
    let retries = |n: i64| SubmitRequest {
        retries: Some(n),
        ..base()
    };
    assert_eq!(ok(retries(5)).await.retries, 5);
    for bad in [-1, 6] {
        assert_err(&err(retries(bad)).await, "invalid_field", "retries");
    }
    let catalog = with_profile("[agent]\nengine = \"shell\"\nretries = 2\n");
    let limits = Limits::default();
    let job = run_with(&catalog, &limits, custom(base())).await.unwrap();
    assert_eq!(job.retries, 2, "the profile's");
    let job = run_with(&catalog, &limits, custom(retries(0)))
        .await
        .unwrap();
    assert_eq!(job.retries, 0, "the request's, even 0");
}

/// `request` against the extra profile `custom`.
fn custom(request: SubmitRequest) -> SubmitRequest {
    SubmitRequest {
        profile: Some("custom".to_owned()),
        ..request
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[tokio::test]
async fn priority_comes_from_the_request_the_profile_or_normal() {
    assert_eq!(ok(base()).await.priority, Priority::Normal);
    let priority = |p: &str| SubmitRequest {
        priority: Some(p.to_owned()),
        ..base()
    };
    assert_eq!(ok(priority("high")).await.priority, Priority::High);
    assert_eq!(ok(priority("low")).await.priority, Priority::Low);
    for bad in ["urgent", "HIGH", ""] {
        let e = err(priority(bad)).await;
        assert_err(&e, "invalid_field", "priority");
        assert_eq!(e.message, "priority must be high, normal or low");
    }
    let catalog = with_profile("[agent]\npriority = \"low\"\n");
    let limits = Limits::default();
    let job = run_with(&catalog, &limits, custom(base())).await.unwrap();
    assert_eq!(job.priority, Priority::Low, "the profile's");
    let job = run_with(&catalog, &limits, custom(priority("normal")))
        .await
        .unwrap();
    assert_eq!(job.priority, Priority::Normal, "the request's");
}

#[tokio::test]
async fn requires_are_merged_over_the_profile_s() {
    assert!(ok(base()).await.requires.is_empty());
    let requires = |pairs: &[(&str, &str)]| SubmitRequest {
        requires: Some(labels(pairs)),
        ..base()
    };
    let catalog = with_profile("[agent.requires]\ngpu = \"a100\"\nregion = \"eu\"\n");
    let limits = Limits::default();
    let job = run_with(&catalog, &limits, custom(base())).await.unwrap();
    assert_eq!(job.requires, labels(&[("gpu", "a100"), ("region", "eu")]));
    let request = custom(requires(&[("gpu", "h100"), ("disk", "ssd")]));
    let job = run_with(&catalog, &limits, request).await.unwrap();
    assert_eq!(
        job.requires,
        labels(&[("disk", "ssd"), ("gpu", "h100"), ("region", "eu")]),
        "the request wins per key"
    );
    assert_eq!(ok(requires(&[("gpu", "a100")])).await.requires.len(), 1);
}

#[tokio::test]
async fn requires_rules() {
    let requires = |map: BTreeMap<String, String>| SubmitRequest {
        requires: Some(map),
        ..base()
    };
    let e = err(requires(labels(&[("gpu type", "a100")]))).await;
    assert_err(&e, "invalid_field", "requires");
    assert!(e.message.contains("keys must match"), "{}", e.message);
    assert!(e.message.contains("\"gpu type\""), "{}", e.message);
    for bad in ["", "a100;x", &"x".repeat(65)] {
        let e = err(requires(labels(&[("gpu", bad)]))).await;
        assert_err(&e, "invalid_field", "requires.gpu");
        assert!(
            e.message.starts_with("requires.gpu must match"),
            "{}",
            e.message
        );
    }
    let many = (0..17).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    let e = err(requires(many)).await;
    assert_err(&e, "invalid_field", "requires");
    assert_eq!(e.message, "requires must have at most 16 keys");
    let sixteen = (0..16).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    assert_eq!(ok(requires(sixteen)).await.requires.len(), 16);

    // Within the cap each, but not together.
    let catalog = with_profile("[agent.requires]\nfrom_profile = \"yes\"\n");
    let sixteen = (0..16).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    let e = run_with(&catalog, &Limits::default(), custom(requires(sixteen)))
        .await
        .unwrap_err();
    assert_err(&e, "invalid_field", "requires");
    assert!(e.message.contains("profile custom"), "{}", e.message);
}

fn allowing(patterns: &str) -> Limits {
    Limits {
        allowed_images: ImageAllowList::parse(patterns).unwrap(),
        ..Limits::default()
    }
}

fn image(image: &str) -> SubmitRequest {
    SubmitRequest {
        image: Some(image.to_owned()),
        ..base()
    }
}

#[tokio::test]
async fn an_image_must_be_allowed_by_the_operator() {
    assert_eq!(ok(base()).await.image, None, "the node's worker image");
    let limits = allowing("flotilla-worker:*,ghcr.io/acme/*");
    for allowed in ["flotilla-worker:gpu", "ghcr.io/acme/tools/x:1"] {
        let job = run_with(&shipped(), &limits, image(allowed)).await.unwrap();
        assert_eq!(job.image.as_deref(), Some(allowed));
    }
    let e = run_with(&shipped(), &limits, image("docker.io/evil:1"))
        .await
        .unwrap_err();
    assert_err(&e, "invalid_field", "image");
    assert_eq!(
        e.message,
        "image docker.io/evil:1 is not allowed: FLOTILLA_ALLOWED_IMAGES allows \
         flotilla-worker:*, ghcr.io/acme/*"
    );
    let e = err(image("flotilla-worker:gpu")).await;
    assert_err(&e, "invalid_field", "image");
    assert_eq!(
        e.message,
        "image flotilla-worker:gpu is not allowed: no job images are allowed \
         (set FLOTILLA_ALLOWED_IMAGES)"
    );
}

#[tokio::test]
async fn an_image_must_look_like_an_image_reference() {
    // Allowing everything shows the shape is checked on its own.
    let limits = allowing("*");
    for bad in [
        "",
        "--privileged",
        "Alpine",
        "alpine latest",
        "alpine\n",
        "alpine;id",
        &format!("a{}", "b".repeat(256)),
    ] {
        let e = run_with(&shipped(), &limits, image(bad)).await.unwrap_err();
        assert_err(&e, "invalid_field", "image");
    }
    let job = run_with(&shipped(), &limits, image("registry:5000/a/b@sha256:0f"))
        .await
        .unwrap();
    assert_eq!(job.image.as_deref(), Some("registry:5000/a/b@sha256:0f"));
}

#[tokio::test]
async fn a_profile_s_image_is_allowed_when_a_job_uses_it() {
    let catalog = with_profile("[agent]\nimage = \"ghcr.io/acme/x:1\"\n");
    let e = run_with(&catalog, &Limits::default(), custom(base()))
        .await
        .unwrap_err();
    assert_err(&e, "invalid_field", "image");
    assert_eq!(
        e.message,
        "image ghcr.io/acme/x:1 (from profile custom) is not allowed: no job images are \
         allowed (set FLOTILLA_ALLOWED_IMAGES)"
    );
    let limits = allowing("flotilla-worker:*");
    let e = run_with(&catalog, &limits, custom(base()))
        .await
        .unwrap_err();
    assert!(
        e.message.contains("allows flotilla-worker:*"),
        "{}",
        e.message
    );
    let limits = allowing("ghcr.io/acme/*,flotilla-worker:*");
    let job = run_with(&catalog, &limits, custom(base())).await.unwrap();
    assert_eq!(job.image.as_deref(), Some("ghcr.io/acme/x:1"));
    // The request's image replaces the profile's, and is the one checked.
    let request = custom(SubmitRequest {
        image: Some("flotilla-worker:gpu".to_owned()),
        ..base()
    });
    let job = run_with(&catalog, &limits, request).await.unwrap();
    assert_eq!(job.image.as_deref(), Some("flotilla-worker:gpu"));
}

#[tokio::test]
async fn runtime_comes_from_the_request_or_the_profile() {
    assert_eq!(ok(base()).await.runtime, None);
    let runtime = |r: &str| SubmitRequest {
        runtime: Some(r.to_owned()),
        ..base()
    };
    assert_eq!(ok(runtime("runsc")).await.runtime.as_deref(), Some("runsc"));
    for bad in [
        "",
        "run sc",
        "../runc",
        "--privileged=true",
        &"r".repeat(65),
    ] {
        let e = err(runtime(bad)).await;
        assert_err(&e, "invalid_field", "runtime");
        assert!(e.message.starts_with("runtime must match"), "{}", e.message);
    }
    let catalog = with_profile("[agent]\nruntime = \"kata\"\n");
    let limits = Limits::default();
    let job = run_with(&catalog, &limits, custom(base())).await.unwrap();
    assert_eq!(job.runtime.as_deref(), Some("kata"), "the profile's");
    let job = run_with(&catalog, &limits, custom(runtime("runsc")))
        .await
        .unwrap();
    assert_eq!(job.runtime.as_deref(), Some("runsc"), "the request's");
}

#[test]
fn operator_image_patterns_are_compiled_with_the_limits() {
    let args = |images: &str| crate::LimitsArgs {
        default_timeout_secs: 3600,
        default_job_memory: "2g".to_owned(),
        default_job_cpus: 1.0,
        max_job_memory: "8g".to_owned(),
        max_job_cpus: 4.0,
        allow_private_webhooks: false,
        git_allowed_hosts: String::new(),
        allowed_images: images.to_owned(),
    };
    let limits = args("flotilla-worker:*, ghcr.io/acme/*")
        .into_limits()
        .unwrap();
    assert_eq!(
        limits.allowed_images.patterns(),
        ["flotilla-worker:*", "ghcr.io/acme/*"]
    );
    assert!(args("").into_limits().unwrap().allowed_images.is_empty());
    let error = args("ghcr.io/{acme").into_limits().unwrap_err();
    assert!(error.contains("FLOTILLA_ALLOWED_IMAGES"), "{error}");
}
