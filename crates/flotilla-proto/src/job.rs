//! Jobs: what a client submits, what travels to an agent-node, and the record kept in KV.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Priority;

/// A job as a client submits it: the body of `POST /jobs`, or a message published on
/// [`crate::names::SUBJECT_SUBMIT`]. Nothing here is trusted yet; validation turns it into a
/// [`JobRequest`]. Every field is optional at this level so that a missing required field gets
/// a validation error naming it rather than a decoding error.
// The field comments are also the OpenAPI descriptions (feature `openapi`); the rules they state
// are enforced by `flotilla_catalog::validate`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(
    feature = "openapi",
    derive(utoipa::ToSchema),
    schema(
        description = "The body of `POST /jobs`. Unknown fields are refused (422). The schema \
        states every rule it can; the rest depend on the live configuration (`GET /engines`, \
        `GET /profiles`) or the operator's limits, and are in the field descriptions: `engine` \
        is required when the profile names none, and must name a loaded engine; `profile` must \
        name a loaded profile; `model` must be allowed by the profile; `prompt_vars` and \
        `claude_md_vars` must fit the profile's variables; `resources` are capped by the \
        operator; a `webhook_url` host must resolve to a public address.",
        examples(json!({"agent_id": "me", "engine": "shell", "prompt": "echo hello"}))
    )
)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// Only for direct NATS submissions: the id the publisher wants (see `ids::is_valid_job_id`).
    /// Over HTTP the server assigns it (and refuses this field), so the API does not list it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(ignore))]
    pub job_id: Option<String>,
    /// Who submits the job; the job id starts with it. Required: `^[A-Za-z0-9_-]{1,64}$`.
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(value_type = String, required, pattern = "^[A-Za-z0-9_-]{1,64}$")
    )]
    pub agent_id: Option<String>,
    /// An engine id (`GET /engines`). Required when the profile names none (the shipped
    /// `default` profile names none); an id that names no loaded engine is refused
    /// (`unknown_engine`). Both depend on the live configuration, so the schema cannot state them.
    #[serde(default)]
    pub engine: Option<String>,
    /// At most 1,000,000 characters, no NUL. When null or blank, the profile's prompt template
    /// is rendered with `prompt_vars` (`missing_prompt` if it has none or it renders blank). For
    /// the `shell` engine, the script to run; an agent CLI engine takes it as one command-line
    /// argument, so there it is also at most 131,071 bytes.
    // "No NUL" (here and in `system_prompt`) stays in the description: as a pattern
    // (`^[^\u0000]*$`) beside so large a `maxLength`, it makes schemathesis' generation several
    // times slower.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_length = 1_000_000))]
    pub prompt: Option<String>,
    /// A profile name (`GET /profiles`); `default` when absent. A name that matches no loaded
    /// profile is refused (`unknown_profile`).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9_-]{1,64}$"))]
    pub profile: Option<String>,
    /// Values for the profile's prompt template variables, checked against their declared
    /// types, `required` and `enum`.
    #[serde(default)]
    pub prompt_vars: Option<serde_json::Map<String, Value>>,
    /// Values for the profile's agent-instructions (CLAUDE.md) template; same checks.
    #[serde(default)]
    pub claude_md_vars: Option<serde_json::Map<String, Value>>,
    /// The profile's when absent: `^[A-Za-z0-9._/:-]{1,128}$`, and one the profile's model
    /// list allows, if it has one.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9._/:-]{1,128}$"))]
    pub model: Option<String>,
    /// At most 500,000 characters, no NUL; at most 131,071 bytes for an engine that passes it
    /// on its command line.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_length = 500_000))]
    pub system_prompt: Option<String>,
    /// The profile's when absent or empty. At most 100 items of 1-256 characters, none a
    /// control character.
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(
            max_items = 100,
            min_length = 1,
            max_length = 256,
            pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$"
        )
    )]
    pub allowed_tools: Option<Vec<String>>,
    /// The profile's when absent: 1-100.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 100))]
    pub max_turns: Option<i64>,
    /// The profile's when absent: more than 0, at most 50.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(exclusive_minimum = 0, maximum = 50))]
    pub max_budget_usd: Option<f64>,
    /// `json`, `text` or `stream-json`; the profile's, else `json`, when absent.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(schema_with = schemas::output_format))]
    pub output_format: Option<String>,
    /// An MCP configuration object (at most 256 KiB as JSON), written into the job's container.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub mcp_config: Option<Value>,
    /// Plugin ids (`^[A-Za-z0-9_-]{1,64}$`); validated and carried with the job.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9_-]{1,64}$"))]
    pub plugins: Option<Vec<String>>,
    /// Run the job through the fleet and a real container, but record the command line instead
    /// of running the engine.
    #[serde(default)]
    pub dry_run: Option<bool>,
    /// An http or https URL with a host, at most 2048 characters. The host is resolved when the
    /// job is submitted, and must not resolve to loopback, private, link-local or metadata
    /// addresses. The dispatcher POSTs the record there once the job ends.
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(max_length = 2048, pattern = "^[Hh][Tt][Tt][Pp][Ss]?://[^/?#]")
    )]
    pub webhook_url: Option<String>,
    /// 1-86400; the profile's, else the global default, when absent.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 86400))]
    pub timeout_seconds: Option<i64>,
    /// Container limits, capped by the operator's limits; the profile's when absent.
    #[serde(default)]
    pub resources: Option<ResourcesRequest>,
    /// Free-form labels, echoed back in the record and filterable in `GET /jobs`: at most 32
    /// keys matching `^[A-Za-z0-9_.-]{1,64}$`, values of at most 1024 characters.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(schema_with = schemas::metadata))]
    pub metadata: Option<BTreeMap<String, String>>,
    /// How many times to run the job again when its engine fails (not when it is cancelled,
    /// times out, runs out of memory or budget): 0-5, the profile's, else 0. Every attempt
    /// counts, those lost to infrastructure failures too.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 5))]
    pub retries: Option<i64>,
    /// Files written into the job's `/workspace` before the pre-hook and the engine run: at
    /// most 1,000 files and 2 MiB in all (decoded), each path once. The profile's
    /// agent-instructions file and the MCP configuration are written after them.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_items = 1000))]
    pub files: Option<Vec<FileRequest>>,
    /// Where the workspace comes from: `{"git": {...}}` clones a repository into `/workspace`
    /// before the pre-hook and the engine run. The profile's when absent.
    #[serde(default)]
    pub workspace: Option<WorkspaceRequest>,
    /// Files to keep after the job, as globs relative to `/workspace` (`dist/**`,
    /// `report.md`): at most 100 patterns of at most 256 characters. Collected after the
    /// engine and the post-hook, bounded by the operator's count and byte limits, and served
    /// at `GET /jobs/{id}/artifacts`.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_items = 100))]
    pub outputs: Option<Vec<String>>,
    /// Commit the job's change to a branch of `workspace.git`'s repository, push it with the
    /// node's credential, and optionally open a pull request. Needs `workspace.git`.
    #[serde(default)]
    pub push: Option<PushRequest>,
    /// `high`, `normal` (the default) or `low`: among jobs waiting for the same nodes, high
    /// ones start first most of the time, and low ones still start. The profile's when absent.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(schema_with = schemas::priority))]
    pub priority: Option<String>,
    /// Node labels the job needs (`{"gpu": "a100"}`), all of them: only nodes started with
    /// those labels (`FLOTILLA_NODE_LABELS`) run it. At most 16 keys matching
    /// `^[A-Za-z0-9_.-]{1,64}$`, values matching the same. Merged over the profile's.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(schema_with = schemas::requires))]
    pub requires: Option<BTreeMap<String, String>>,
    /// The image to run in, instead of the nodes' worker image: one the operator allows
    /// (`FLOTILLA_ALLOWED_IMAGES`), at most 256 characters. Only nodes that hold it run the
    /// job. The profile's when absent.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_length = 256))]
    pub image: Option<String>,
    /// A Docker runtime by name (`runsc`), `^[A-Za-z0-9_.-]{1,64}$`: only nodes whose engine
    /// has it run the job. The profile's when absent.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9_.-]{1,64}$"))]
    pub runtime: Option<String>,
}

/// `workspace` as submitted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WorkspaceRequest {
    #[serde(default)]
    pub git: Option<GitRequest>,
}

/// `workspace.git` as submitted: the repository the node fetches (through its mirror cache)
/// and checks out in `/workspace`; the container itself never reaches it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct GitRequest {
    /// An `https://`, `ssh://`, `git://` or `file://` URL without user or password, whose host
    /// is in the operator's `FLOTILLA_GIT_ALLOWED_HOSTS` and resolves to a public address
    /// (an address listed there explicitly, such as `127.0.0.1`, is allowed as listed).
    #[cfg_attr(feature = "openapi", schema(value_type = String, required, max_length = 2048))]
    pub url: Option<String>,
    /// A branch, tag or full commit id; the remote's default branch when absent.
    #[serde(default, rename = "ref")]
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9._/-]{1,255}$"))]
    pub git_ref: Option<String>,
    /// Fetch only this many commits of history: 1-1000000; the whole history when absent.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 1_000_000))]
    pub depth: Option<i64>,
    /// The name of a credential the node holds (`FLOTILLA_GIT_CREDENTIALS_FILE`); the secret
    /// itself never reaches the container, a log or the record.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9_-]{1,64}$"))]
    pub credential: Option<String>,
}

/// `push` as submitted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PushRequest {
    /// The branch to push to; `flotilla/<job_id>` when absent. A valid git branch name of at
    /// most 200 characters.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9._/-]{1,200}$"))]
    pub branch: Option<String>,
    /// At most 65536 characters; `Flotilla job <job_id>` when absent.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_length = 65536))]
    pub commit_message: Option<String>,
    /// Open a pull request from the branch through the forge's REST API.
    #[serde(default)]
    pub pull_request: Option<PullRequestRequest>,
}

/// `push.pull_request` as submitted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PullRequestRequest {
    /// 1-256 characters.
    #[cfg_attr(feature = "openapi", schema(value_type = String, required, min_length = 1, max_length = 256))]
    pub title: Option<String>,
    /// At most 65536 characters.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_length = 65536))]
    pub body: Option<String>,
    /// The branch to merge into; `workspace.git.ref` when absent.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9._/-]{1,200}$"))]
    pub base: Option<String>,
}

/// A validated `workspace.git`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GitSource {
    pub url: String,
    /// `None`: the remote's default branch.
    #[serde(default)]
    pub git_ref: Option<String>,
    #[serde(default)]
    pub depth: Option<u32>,
    #[serde(default)]
    pub credential: Option<String>,
    /// For a follow-up: the commit its change is measured from (the first job's base), which
    /// `git_ref` must still reach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
}

/// A validated `push`, defaults resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Push {
    pub branch: String,
    pub commit_message: String,
    #[serde(default)]
    pub pull_request: Option<PullRequest>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequest {
    pub title: String,
    #[serde(default)]
    pub body: String,
    /// `None`: the checked-out ref, else the remote's default branch.
    #[serde(default)]
    pub base: Option<String>,
}

/// One file of `files`, as submitted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct FileRequest {
    /// Relative to `/workspace`: `/`-separated, no empty, `.` or `..` part, no NUL, at most
    /// 1024 bytes (UTF-8; the schema's `maxLength` counts characters), not `.flotilla` or under
    /// `.flotilla/` (the job's own files).
    #[cfg_attr(
        feature = "openapi",
        schema(
            value_type = String,
            required,
            max_length = 1024,
            pattern = r"^(?:[^/\u0000.][^/\u0000]*|\.[^/\u0000.][^/\u0000]*|\.\.[^/\u0000]+)(?:/(?:[^/\u0000.][^/\u0000]*|\.[^/\u0000.][^/\u0000]*|\.\.[^/\u0000]+))*$"
        )
    )]
    pub path: Option<String>,
    /// The file's content, as `encoding` says: for `base64`, valid standard base64.
    #[cfg_attr(feature = "openapi", schema(value_type = String, required))]
    pub content: Option<String>,
    /// `utf-8` (the default: `content` is the text) or `base64` (standard alphabet, padded):
    /// for binary files.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(schema_with = schemas::encoding))]
    pub encoding: Option<String>,
    /// Make the file executable (by the job's user: the job script runs under `umask 077`).
    #[serde(default)]
    pub executable: Option<bool>,
}

/// A file to write into the job's workspace, validated and decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceFile {
    /// Relative to `/workspace`; checked safe.
    pub path: String,
    #[serde(with = "serde_bytes")]
    pub content: Vec<u8>,
    #[serde(default)]
    pub executable: bool,
}

/// `resources` as submitted: `{"memory": "512m", "cpus": 0.5}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ResourcesRequest {
    /// Memory limit: bytes, or a number with a unit `k`, `m`, `g` or `t` (powers of 1024,
    /// fractions allowed, `b` or `ib` may follow: `512m`, `1.5g`, `2GiB`). At least `6m`, and at
    /// most the operator's limit (`FLOTILLA_MAX_JOB_MEMORY`, `8g` by default).
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^[0-9]+([Bb]|(\\.[0-9]+)?[KkMmGgTt]([Ii]?[Bb])?)?$")
    )]
    pub memory: Option<String>,
    /// CPUs, fractions allowed: at least 0.01, and at most the operator's limit
    /// (`FLOTILLA_MAX_JOB_CPUS`, 4 by default).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 0.01))]
    pub cpus: Option<f64>,
}

/// Resolved container resources.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    pub memory_bytes: i64,
    /// CPU quota in billionths of a CPU (Docker's `NanoCpus`).
    pub nano_cpus: i64,
}

/// A validated job with every default resolved: what an agent-node needs to run it. Travels on
/// [`crate::names::SUBJECT_RUN`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    pub job_id: String,
    pub agent_id: String,
    pub engine: String,
    pub profile: String,
    /// The prompt, or the rendered profile template. For the `shell` engine, the script.
    pub prompt: String,
    #[serde(default)]
    pub system_prompt: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub allowed_tools: Vec<String>,
    #[serde(default)]
    pub max_turns: Option<u32>,
    #[serde(default)]
    pub max_budget_usd: Option<f64>,
    /// The profile's model allow-list (exact names, or prefixes ending in `*`), enforced at
    /// the llm-gateway; empty allows any model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_models: Vec<String>,
    /// The profile's provider-side tools and beta flags (`web_search`, `mcp`, ...), which the
    /// llm-gateway refuses unless named here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_provider_tools: Vec<String>,
    #[serde(default)]
    pub output_format: Option<String>,
    #[serde(default)]
    pub mcp_config: Option<Value>,
    #[serde(default)]
    pub plugins: Vec<String>,
    /// Rendered agent-instructions file (CLAUDE.md or the engine's equivalent), if any.
    #[serde(default)]
    pub instructions: Option<String>,
    /// The profile's pre-hook: a shell script run in the container before the engine; its
    /// failure fails the job.
    #[serde(default)]
    pub pre_hook: Option<String>,
    /// The profile's post-hook, run after the engine whatever the outcome, with `JOB_STATUS`
    /// (`completed`/`failed`) and `JOB_EXIT_CODE` in its environment.
    #[serde(default)]
    pub post_hook: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub webhook_url: Option<String>,
    pub timeout_seconds: u64,
    pub resources: Resources,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    /// Written into `/workspace` before anything runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<WorkspaceFile>,
    /// Attempts after the first that an engine failure may use (see `SubmitRequest::retries`).
    #[serde(default, skip_serializing_if = "no_retries")]
    pub retries: u32,
    /// Checked out in `/workspace` by the node before anything runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<GitSource>,
    /// Globs of the files kept as artifacts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<Push>,
    /// A follow-up starts from this job's saved workspace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continues: Option<Continuation>,
    /// How soon it starts among the jobs waiting for the same nodes.
    #[serde(default, skip_serializing_if = "Priority::is_normal")]
    pub priority: Priority,
    /// Node labels it needs, all of them (`FLOTILLA_NODE_LABELS`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requires: BTreeMap<String, String>,
    /// The image it runs in; the node's worker image when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The Docker runtime it runs under; the node's default when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
}

/// What a follow-up continues: the finished job, the attempt whose workspace was saved, its
/// agent session (resumed by engines that can), and the whole chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Continuation {
    pub job_id: String,
    pub attempt: u32,
    #[serde(default)]
    pub session_id: Option<String>,
    /// Every job continued, the first one first, `job_id` last.
    pub chain: Vec<String>,
}

fn no_retries(n: &u32) -> bool {
    *n == 0
}

#[cfg(any(test, feature = "test-support"))]
impl JobRequest {
    /// A plain request for tests: agent `a`, profile `default`, 60 s, 1 GiB and one CPU,
    /// created now, nothing else set. Tests change what they need with `..`.
    pub fn example(job_id: &str, engine: &str, prompt: &str) -> Self {
        Self {
            job_id: job_id.to_owned(),
            agent_id: "a".to_owned(),
            engine: engine.to_owned(),
            profile: "default".to_owned(),
            prompt: prompt.to_owned(),
            system_prompt: None,
            model: None,
            allowed_tools: Vec::new(),
            max_turns: None,
            max_budget_usd: None,
            allowed_models: Vec::new(),
            allowed_provider_tools: Vec::new(),
            output_format: None,
            mcp_config: None,
            plugins: Vec::new(),
            instructions: None,
            pre_hook: None,
            post_hook: None,
            dry_run: false,
            webhook_url: None,
            timeout_seconds: 60,
            resources: Resources {
                memory_bytes: 1 << 30,
                nano_cpus: 1_000_000_000,
            },
            metadata: BTreeMap::new(),
            created_at: Utc::now(),
            files: Vec::new(),
            retries: 0,
            git: None,
            outputs: Vec::new(),
            push: None,
            continues: None,
            priority: Default::default(),
            requires: Default::default(),
            image: None,
            runtime: None,
        }
    }
}

/// The job record stored in KV under `job.<job_id>`. Its shape is the `GET /jobs/{id}` body.
/// Every change to it is a compare-and-set on the KV revision.
// `schema(required)` marks what every response carries: the `serde(default)`s are there to
// decode older records, and would otherwise make the OpenAPI document call those fields optional.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(
    feature = "openapi",
    derive(utoipa::ToSchema),
    schema(
        description = "A job: the body of `GET /jobs/{job_id}` and `/wait`, and an item of `GET /jobs`."
    )
)]
pub struct JobRecord {
    pub job_id: String,
    pub status: JobStatus,
    pub agent_id: String,
    pub engine: String,
    pub profile: String,
    pub created_at: DateTime<Utc>,
    /// When the current (last) attempt started.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub finished_at: Option<DateTime<Utc>>,
    /// The engine's exit code, once it ran.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub exit_code: Option<i64>,
    /// Why the job failed or was cancelled; always set for a failed job.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub error: Option<String>,
    /// The structured outcome, once the job ended after running.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub result: Option<JobResult>,
    /// 0 while pending; raised each time a node starts the job.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub attempt: u32,
    /// The node running the job, or that ran its last attempt.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub node_id: Option<String>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub usage: Option<Usage>,
    /// As submitted.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub dry_run: bool,
    /// The resolved run-time limit.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub timeout_seconds: u64,
    /// Every attempt so far, oldest first, with why each ended.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub attempts: Vec<Attempt>,
    /// Internal: the JetStream reply subject of the message behind the running attempt, so the
    /// dispatcher can hand the job back at once if its node dies. Not shown over HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(ignore))]
    pub ack_subject: Option<String>,
    /// Where the dispatcher POSTs the record once the job ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// How delivery to `webhook_url` went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookDelivery>,
    /// The repository the job started from (`workspace.git`, without secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<GitSource>,
    /// For a follow-up (`POST /jobs/{id}/continue`): the job it continues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// For a follow-up: every job it continues, the first one first, `parent` last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<String>,
    /// `high`, `normal` or `low`.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub priority: Priority,
    /// The node labels the job needs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requires: BTreeMap<String, String>,
    /// The image it runs in, when not the node's worker image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The Docker runtime it runs under, when not the node's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// While pending: why no live node can take it yet (`no live node offers gpu=a100`).
    /// Cleared once one can.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
}

/// The state of a job's webhook: tried up to [`WebhookDelivery::MAX_ATTEMPTS`] times.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WebhookDelivery {
    pub attempts: u32,
    /// When the receiver answered 2xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<DateTime<Utc>>,
    /// The last answer's HTTP status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the next attempt is due (also a lease: an attempt in flight holds it); absent once
    /// delivered or given up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_at: Option<DateTime<Utc>>,
}

impl WebhookDelivery {
    pub const MAX_ATTEMPTS: u32 = 5;
}

/// One try at running a job on a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Attempt {
    /// 1 for the first attempt.
    pub attempt: u32,
    pub node_id: String,
    pub started_at: DateTime<Utc>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub finished_at: Option<DateTime<Utc>>,
    /// Why the attempt ended: `completed`, `exited with code 3`, `node lost`, ...
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub outcome: Option<String>,
    /// Milliseconds from the node receiving the job to its process running (warm pool hit or
    /// cold start).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub start_ms: Option<f64>,
}

impl JobRecord {
    /// The record a freshly accepted job starts with.
    pub fn pending(request: &JobRequest) -> Self {
        Self {
            job_id: request.job_id.clone(),
            status: JobStatus::Pending,
            agent_id: request.agent_id.clone(),
            engine: request.engine.clone(),
            profile: request.profile.clone(),
            created_at: request.created_at,
            started_at: None,
            finished_at: None,
            exit_code: None,
            error: None,
            result: None,
            attempt: 0,
            node_id: None,
            usage: None,
            metadata: request.metadata.clone(),
            dry_run: request.dry_run,
            timeout_seconds: request.timeout_seconds,
            attempts: Vec::new(),
            ack_subject: None,
            webhook_url: request.webhook_url.clone(),
            webhook: None,
            git: request.git.clone(),
            parent: request.continues.as_ref().map(|c| c.job_id.clone()),
            chain: request
                .continues
                .as_ref()
                .map(|c| c.chain.clone())
                .unwrap_or_default(),
            priority: request.priority,
            requires: request.requires.clone(),
            image: request.image.clone(),
            runtime: request.runtime.clone(),
            waiting_for: None,
        }
    }

    /// The record of a direct submission refused at intake, so that `GET /jobs/{id}` explains
    /// the refusal. It never ran: it is born `failed`.
    pub fn rejected(
        job_id: &str,
        submission: &SubmitRequest,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            job_id: job_id.to_owned(),
            status: JobStatus::Failed,
            agent_id: submission.agent_id.clone().unwrap_or_default(),
            engine: submission.engine.clone().unwrap_or_default(),
            profile: submission.profile.clone().unwrap_or_default(),
            created_at: now,
            started_at: None,
            finished_at: Some(now),
            exit_code: None,
            error: Some(format!("rejected: {reason}")),
            result: None,
            attempt: 0,
            node_id: None,
            usage: None,
            metadata: submission.metadata.clone().unwrap_or_default(),
            dry_run: submission.dry_run.unwrap_or(false),
            timeout_seconds: 0,
            attempts: Vec::new(),
            ack_subject: None,
            // Never called: the URL of a refused submission was not validated.
            webhook_url: None,
            webhook: None,
            git: None,
            parent: None,
            chain: Vec::new(),
            priority: Priority::Normal,
            requires: BTreeMap::new(),
            image: None,
            runtime: None,
            waiting_for: None,
        }
    }

    /// Closes the current attempt (if it is still open) with `outcome`. Only transitions call
    /// it (`crate::transition`).
    pub(crate) fn end_attempt(&mut self, outcome: &str, at: DateTime<Utc>) {
        let current = self.attempt;
        if let Some(attempt) = self
            .attempts
            .iter_mut()
            .rev()
            .find(|a| a.attempt == current)
            && attempt.finished_at.is_none()
        {
            attempt.finished_at = Some(at);
            attempt.outcome = Some(outcome.to_owned());
        }
    }
}

/// Where a job is: `pending` (queued, or back in the queue after its node was lost), `running`,
/// then one of the terminal `completed`, `failed`, `cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Pending,
        JobStatus::Running,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == s)
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The structured outcome of a job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobResult {
    /// The agent's final answer; for the shell engine, its standard output.
    pub text: String,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub exit_code: Option<i64>,
    /// The engine's session id, where it reports one.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub session_id: Option<String>,
    /// Agent turns, where the engine reports them.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub num_turns: Option<u32>,
    /// Cost in USD, where the engine reports it.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub cost_usd: Option<f64>,
    /// The engine's own JSON output, if it produced any. For a dry run:
    /// `{"dry_run": true, "engine", "binary", "args"}`.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub raw: Option<Value>,
    /// The last 4 KiB of combined output.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub logs_tail: String,
    /// True when `text` was cut to the result size cap.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub truncated: bool,
    /// Dry run: the exact argv that would have run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// For a job with `workspace.git`: the commit checked out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_commit: Option<String>,
    /// For a job with `workspace.git`: the change against `base_commit` (whole patch at
    /// `GET /jobs/{id}/diff`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_stat: Option<DiffStat>,
    /// The files collected by `outputs` (download at `GET /jobs/{id}/artifacts/{path}`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<Artifact>,
    /// With `push`: the branch pushed, its commit, and the pull request opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_request_url: Option<String>,
    /// The final workspace was saved: `POST /jobs/{id}/continue` can start from it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub workspace_saved: bool,
}

/// Files changed, lines added and removed (binary files count as files only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DiffStat {
    pub files: u64,
    pub insertions: u64,
    pub deletions: u64,
}

/// One collected output file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Artifact {
    /// Relative to `/workspace`.
    pub path: String,
    pub size: u64,
    /// Hex SHA-256 of the content.
    pub sha256: String,
}

/// Tokens and money a job spent. Counted by the llm-gateway request by request when the job
/// went through it (`metered`), else taken from what the engine reported at the end.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_read_tokens: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_write_tokens: u64,
    /// LLM requests the gateway forwarded for this job.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub requests: u64,
    /// True when the llm-gateway counted these figures (then they are exact and cover every
    /// attempt).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub metered: bool,
    /// Set by the llm-gateway when the job spent its `max_budget_usd`: it refuses further
    /// requests and the job fails with "budget exceeded".
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub budget_exceeded: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Field schemas that the `schema(...)` attributes cannot state: a closed set of strings, and
/// the metadata map, whose keys and values follow different rules. `schema_with` replaces the
/// field's doc comment, so each repeats it as its description.
#[cfg(feature = "openapi")]
mod schemas {
    use utoipa::openapi::{
        Object, ObjectBuilder,
        schema::{SchemaType, Type},
    };

    fn nullable(kind: Type) -> SchemaType {
        SchemaType::from_iter([kind, Type::Null])
    }

    /// A string from `values`, or null (absent).
    fn one_of(values: &[&str], description: &str) -> Object {
        let values = values.iter().map(|v| serde_json::Value::from(*v));
        ObjectBuilder::new()
            .schema_type(nullable(Type::String))
            .enum_values(Some(values.chain([serde_json::Value::Null])))
            .description(Some(description))
            .build()
    }

    pub fn output_format() -> Object {
        one_of(
            &["json", "text", "stream-json"],
            "`json`, `text` or `stream-json`; the profile's, else `json`, when absent.",
        )
    }

    pub fn encoding() -> Object {
        one_of(
            &["utf-8", "base64"],
            "`utf-8` (the default: `content` is the text) or `base64` (standard alphabet, \
             padded): for binary files.",
        )
    }

    pub fn metadata() -> Object {
        let key = ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("^[A-Za-z0-9_.-]{1,64}$"));
        let value = ObjectBuilder::new()
            .schema_type(Type::String)
            .max_length(Some(1024));
        ObjectBuilder::new()
            .schema_type(nullable(Type::Object))
            .description(Some(
                "Free-form labels, echoed back in the record and filterable in `GET /jobs`: at \
                 most 32 keys matching `^[A-Za-z0-9_.-]{1,64}$`, values of at most 1024 \
                 characters.",
            ))
            .max_properties(Some(32))
            .property_names(Some(key))
            .additional_properties(Some(value))
            .build()
    }

    pub fn priority() -> Object {
        one_of(
            &["high", "normal", "low"],
            "`high`, `normal` (the default) or `low`; the profile's when absent.",
        )
    }

    pub fn requires() -> Object {
        let label = || {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^[A-Za-z0-9_.-]{1,64}$"))
        };
        ObjectBuilder::new()
            .schema_type(nullable(Type::Object))
            .description(Some(
                "Node labels the job needs (`{\"gpu\": \"a100\"}`), all of them: at most 16 \
                 keys and values matching `^[A-Za-z0-9_.-]{1,64}$`. Merged over the profile's.",
            ))
            .max_properties(Some(16))
            .property_names(Some(label()))
            .additional_properties(Some(label()))
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip() {
        for status in JobStatus::ALL {
            assert_eq!(JobStatus::parse(status.as_str()), Some(status));
            let json = serde_json::to_string(&status).unwrap();
            assert_eq!(json, format!("\"{status}\""));
        }
        assert_eq!(JobStatus::parse("done"), None);
    }

    #[test]
    fn submit_rejects_unknown_fields() {
        let err = serde_json::from_str::<SubmitRequest>(r#"{"agent_id":"a","colour":"red"}"#)
            .unwrap_err();
        assert!(err.to_string().contains("unknown field `colour`"), "{err}");
    }
}
