//! Submission validation: an untrusted `SubmitRequest` becomes a `JobRequest` with every default
//! resolved (request, then profile, then operator limits), or one error naming the first field
//! that breaks a rule.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use flotilla_proto::{
    FileRequest, JobRequest, Priority, Resources, ResourcesRequest, SubmitRequest, WorkspaceFile,
    ids,
};
use serde_json::{Map, Value};

use crate::catalog::Catalog;
use crate::engine::{Engine, EngineKind, MappedField};
use crate::images::ImageAllowList;
use crate::profile::{Profile, Variable};
use crate::rules::{self, clip, human_bytes};
use crate::webhook::{SystemResolver, check_webhook_url};
use crate::workspace::{GitAllowList, check_outputs, check_push, check_workspace};

pub const DEFAULT_PROFILE: &str = "default";
pub(crate) const MAX_MCP_CONFIG_BYTES: usize = 256 * 1024;
const MAX_METADATA_KEYS: usize = 32;
pub(crate) const MAX_FILES: usize = 1_000;
/// Decoded; the job message carries them, beside a prompt of up to 4 MB (NATS max_payload 8MB).
pub(crate) const MAX_FILES_BYTES: usize = 2 * 1024 * 1024;
const MAX_METADATA_VALUE_CHARS: usize = 1024;

/// Operator settings that validation applies.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Used when neither the request nor the profile sets a timeout.
    pub default_timeout_seconds: u64,
    pub default_memory_bytes: i64,
    pub default_nano_cpus: i64,
    /// A request or profile above this is refused (422), not clamped.
    pub max_memory_bytes: i64,
    pub max_cpus: f64,
    /// Lets webhooks target private addresses; for tests only.
    pub allow_private_webhooks: bool,
    /// The repositories `workspace.git` may name.
    pub git_allowed: GitAllowList,
    /// The images `image` (or a profile's) may name; empty allows none.
    pub allowed_images: ImageAllowList,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            default_timeout_seconds: 3600,
            default_memory_bytes: 2 << 30,
            default_nano_cpus: 1_000_000_000,
            max_memory_bytes: 8 << 30,
            max_cpus: 4.0,
            allow_private_webhooks: false,
            git_allowed: GitAllowList::default(),
            allowed_images: ImageAllowList::default(),
        }
    }
}

/// Where a submission came from: only direct NATS publishers may choose their job id, and only
/// the dispatcher's scheduler may choose one of a scheduled run's (`sched-...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Http,
    Nats,
    Schedule,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ValidationError {
    /// snake_case, for the error envelope: invalid_field, missing_field, unknown_profile,
    /// unknown_engine, missing_prompt, template_error.
    pub code: &'static str,
    /// JSON path of the offending field, e.g. "prompt_vars.query" or "plugins[1]".
    pub field: Option<String>,
    pub message: String,
}

impl ValidationError {
    fn new(code: &'static str, field: &str, message: String) -> Self {
        Self {
            code,
            field: Some(field.to_owned()),
            message,
        }
    }

    /// `reason` completes the sentence "<field> ...".
    pub(crate) fn invalid(field: &str, reason: impl std::fmt::Display) -> Self {
        Self::new("invalid_field", field, format!("{field} {reason}"))
    }

    /// An invalid field whose whole message is `message`.
    pub(crate) fn at(field: &str, message: String) -> Self {
        Self::new("invalid_field", field, message)
    }

    pub(crate) fn missing(field: &str, message: String) -> Self {
        Self::new("missing_field", field, message)
    }
}

/// Turns an untrusted submission into a runnable `JobRequest`. Fields are checked in order and
/// the first broken rule is reported.
pub async fn validate(
    catalog: &Catalog,
    limits: &Limits,
    request: SubmitRequest,
    origin: Origin,
    now: DateTime<Utc>,
) -> Result<JobRequest, ValidationError> {
    // Destructured whole so a field added to SubmitRequest cannot be silently ignored here.
    let SubmitRequest {
        job_id,
        agent_id,
        engine,
        prompt,
        profile,
        prompt_vars,
        claude_md_vars,
        model,
        system_prompt,
        allowed_tools,
        max_turns,
        max_budget_usd,
        output_format,
        mcp_config,
        plugins,
        dry_run,
        webhook_url,
        timeout_seconds,
        resources,
        metadata,
        files,
        retries,
        workspace,
        outputs,
        push,
        priority,
        requires,
        image,
        runtime,
    } = request;

    if let Some(id) = &job_id {
        if origin == Origin::Http {
            return Err(ValidationError::invalid(
                "job_id",
                "is assigned by the server",
            ));
        }
        let reserved = format!("{}-", flotilla_proto::schedule::SCHEDULED_JOB_PREFIX);
        if origin == Origin::Nats && id.starts_with(&reserved) {
            return Err(ValidationError::invalid(
                "job_id",
                format!("may not start with {reserved}: those ids are the scheduler's"),
            ));
        }
        if !ids::is_valid_job_id(id) {
            let max = ids::MAX_JOB_ID_LEN;
            return Err(ValidationError::invalid(
                "job_id",
                format!("must match ^[A-Za-z0-9_-]{{1,{max}}}$"),
            ));
        }
    }
    let Some(agent_id) = agent_id else {
        return Err(ValidationError::missing(
            "agent_id",
            "agent_id is required".to_owned(),
        ));
    };
    rules::check_safe_id(&agent_id).map_err(|e| ValidationError::invalid("agent_id", e))?;
    let job_id = job_id.unwrap_or_else(|| ids::new_job_id(&agent_id));

    let profile_name = profile.unwrap_or_else(|| DEFAULT_PROFILE.to_owned());
    rules::check_safe_id(&profile_name).map_err(|e| ValidationError::invalid("profile", e))?;
    let Some(profile) = catalog.profile(&profile_name) else {
        let message = format!("unknown profile {}", clip(&profile_name));
        return Err(ValidationError::new("unknown_profile", "profile", message));
    };

    let Some(engine_id) = engine.or_else(|| profile.engine.clone()) else {
        let message = format!("engine is required: profile {profile_name:?} names none");
        return Err(ValidationError::missing("engine", message));
    };
    let Some(engine) = catalog.engine(&engine_id) else {
        let message = format!("unknown engine {}", clip(&engine_id));
        return Err(ValidationError::new("unknown_engine", "engine", message));
    };

    if let Some(prompt) = &prompt {
        check_text("prompt", prompt, rules::MAX_PROMPT_CHARS)?;
    }
    let prompt_vars = resolve_vars(&profile.prompt_vars, prompt_vars, "prompt_vars")?;
    let claude_md_vars = resolve_vars(&profile.claude_md_vars, claude_md_vars, "claude_md_vars")?;
    // As in Parpaing, an empty prompt means "use the profile's template".
    let prompt = match prompt.filter(|p| !p.trim().is_empty()) {
        Some(prompt) => prompt,
        None => render_prompt(profile, &prompt_vars)?,
    };
    let instructions = match &profile.claude_md_template {
        Some(template) => Some(render(template, &claude_md_vars).map_err(|e| {
            let message = format!("the profile's claude_md template failed to render: {e}");
            ValidationError::new("template_error", "claude_md_vars", message)
        })?),
        None => None,
    };

    let model = model.or_else(|| profile.model.clone());
    if let Some(model) = &model
        && !flotilla_proto::llm::model_allowed(&profile.allowed_models, model)
    {
        let reason = format!(
            "{model:?} is not allowed by profile {}: allowed are {}",
            profile.name,
            profile.allowed_models.join(", ")
        );
        return Err(ValidationError::invalid("model", reason));
    }
    if let Some(model) = &model {
        rules::check_model(model).map_err(|e| ValidationError::invalid("model", e))?;
    }
    if let Some(system_prompt) = &system_prompt {
        check_text(
            "system_prompt",
            system_prompt,
            rules::MAX_SYSTEM_PROMPT_CHARS,
        )?;
    }
    // An empty list means "no preference" (Parpaing: empty = all), so the profile's list applies.
    let allowed_tools = match allowed_tools {
        Some(tools) if !tools.is_empty() => {
            if tools.len() > rules::MAX_TOOLS {
                let reason = format!("must have at most {} items", rules::MAX_TOOLS);
                return Err(ValidationError::invalid("allowed_tools", reason));
            }
            for (i, tool) in tools.iter().enumerate() {
                rules::check_tool(tool)
                    .map_err(|e| ValidationError::invalid(&format!("allowed_tools[{i}]"), e))?;
            }
            tools
        }
        _ => profile.allowed_tools.clone(),
    };
    let max_turns = match max_turns {
        Some(n) => {
            Some(rules::check_max_turns(n).map_err(|e| ValidationError::invalid("max_turns", e))?)
        }
        None => profile.max_turns,
    };
    if let Some(usd) = max_budget_usd {
        rules::check_budget(usd).map_err(|e| ValidationError::invalid("max_budget_usd", e))?;
    }
    let max_budget_usd = max_budget_usd.or(profile.max_budget_usd);
    let retries = match retries {
        Some(n) => rules::check_retries(n).map_err(|e| ValidationError::invalid("retries", e))?,
        None => profile.retries.unwrap_or(0),
    };
    if let Some(format) = &output_format {
        rules::check_output_format(format)
            .map_err(|e| ValidationError::invalid("output_format", e))?;
    }
    let output_format = output_format
        .or_else(|| profile.output_format.clone())
        .unwrap_or_else(|| "json".to_owned());
    let mcp_config = check_mcp_config(mcp_config)?;
    let plugins = match plugins {
        Some(plugins) => {
            for (i, plugin) in plugins.iter().enumerate() {
                rules::check_safe_id(plugin)
                    .map_err(|e| ValidationError::invalid(&format!("plugins[{i}]"), e))?;
            }
            plugins
        }
        None => profile.plugins.clone(),
    };
    if let Some(url) = &webhook_url {
        check_webhook_url(url, limits.allow_private_webhooks)
            .await
            .map_err(|message| ValidationError::new("invalid_field", "webhook_url", message))?;
    }
    let timeout_seconds = match timeout_seconds {
        Some(secs) => rules::check_timeout(secs)
            .map_err(|e| ValidationError::invalid("timeout_seconds", e))?,
        None => profile
            .timeout_seconds
            .unwrap_or(limits.default_timeout_seconds),
    };
    let resources = resolve_resources(resources.unwrap_or_default(), profile, limits)?;
    let metadata = check_metadata(metadata.unwrap_or_default())?;
    let files = check_files(files.unwrap_or_default())?;
    let git = check_workspace(
        workspace.or_else(|| profile.workspace.clone()),
        &limits.git_allowed,
        &SystemResolver,
    )
    .await?;
    let outputs = outputs.unwrap_or_default();
    check_outputs(&outputs)?;
    let push = check_push(push, &job_id, git.as_ref())?;
    let placement = resolve_placement(
        Placement {
            priority,
            requires,
            image,
            runtime,
        },
        profile,
        &limits.allowed_images,
    )?;
    check_fits_argv(engine, "prompt", Some(&prompt))?;
    if engine
        .flags
        .iter()
        .any(|(field, _)| *field == MappedField::SystemPrompt)
    {
        check_fits_argv(engine, "system_prompt", system_prompt.as_deref())?;
    }

    Ok(JobRequest {
        job_id,
        agent_id,
        engine: engine_id,
        profile: profile_name,
        prompt,
        system_prompt,
        model,
        allowed_tools,
        max_turns,
        max_budget_usd,
        allowed_models: profile.allowed_models.clone(),
        allowed_provider_tools: profile.allowed_provider_tools.clone(),
        output_format: Some(output_format),
        mcp_config,
        plugins,
        instructions,
        pre_hook: profile.hooks.pre.clone(),
        post_hook: profile.hooks.post.clone(),
        dry_run: dry_run.unwrap_or(false),
        webhook_url,
        timeout_seconds,
        resources,
        metadata,
        created_at: now,
        files,
        retries,
        git,
        outputs,
        push,
        continues: None,
        priority: placement.priority,
        requires: placement.requires,
        image: placement.image,
        runtime: placement.runtime,
    })
}

/// The submitted fields that choose which nodes run a job, and how soon.
struct Placement {
    priority: Option<String>,
    requires: Option<BTreeMap<String, String>>,
    image: Option<String>,
    runtime: Option<String>,
}

/// [`Placement`] resolved: request, then profile, then the defaults.
struct Resolved {
    priority: Priority,
    requires: BTreeMap<String, String>,
    image: Option<String>,
    runtime: Option<String>,
}

fn resolve_placement(
    submitted: Placement,
    profile: &Profile,
    allowed_images: &ImageAllowList,
) -> Result<Resolved, ValidationError> {
    let priority = match &submitted.priority {
        Some(p) => rules::check_priority(p).map_err(|e| ValidationError::invalid("priority", e))?,
        None => profile.priority.unwrap_or_default(),
    };
    let requires = resolve_requires(submitted.requires.unwrap_or_default(), profile)?;
    let image = resolve_image(submitted.image, profile, allowed_images)?;
    if let Some(runtime) = &submitted.runtime {
        rules::check_label(runtime).map_err(|e| ValidationError::invalid("runtime", e))?;
    }
    Ok(Resolved {
        priority,
        requires,
        image,
        runtime: submitted.runtime.or_else(|| profile.runtime.clone()),
    })
}

/// The request's labels over the profile's, per key. Checked before the merge so an error
/// names the request's own keys, and after it so the whole set stays within the cap.
fn resolve_requires(
    requested: BTreeMap<String, String>,
    profile: &Profile,
) -> Result<BTreeMap<String, String>, ValidationError> {
    rules::check_requires(&requested)
        .map_err(|(key, e)| ValidationError::invalid(&rules::requires_field("requires", key), e))?;
    let mut merged = profile.requires.clone();
    merged.extend(requested);
    if merged.len() > rules::MAX_REQUIRES {
        let reason = format!(
            "must have at most {} keys with profile {}'s, got {}",
            rules::MAX_REQUIRES,
            profile.name,
            merged.len()
        );
        return Err(ValidationError::invalid("requires", reason));
    }
    Ok(merged)
}

/// The request's image, else the profile's; either must be allowed by the operator, who may
/// have narrowed the list since the profile was written.
fn resolve_image(
    requested: Option<String>,
    profile: &Profile,
    allowed: &ImageAllowList,
) -> Result<Option<String>, ValidationError> {
    let (image, source) = match requested {
        Some(image) => {
            rules::check_image(&image).map_err(|e| ValidationError::invalid("image", e))?;
            (image, String::new())
        }
        None => match &profile.image {
            Some(image) => (image.clone(), format!(" (from profile {})", profile.name)),
            None => return Ok(None),
        },
    };
    if !allowed.allows(&image) {
        let reason = format!("{image}{source} is not allowed: {}", allowed.refusal());
        return Err(ValidationError::invalid("image", reason));
    }
    Ok(Some(image))
}

/// An agent CLI gets the prompt (and system prompt) as one argument, which the kernel caps;
/// better a clear 422 now than a container that cannot start. Shell scripts travel as a file.
fn check_fits_argv(
    engine: &Engine,
    field: &str,
    text: Option<&str>,
) -> Result<(), ValidationError> {
    match text {
        Some(text) if engine.kind == EngineKind::Cli && text.len() > rules::MAX_ARG_BYTES => {
            Err(ValidationError::invalid(
                field,
                format!(
                    "is {} bytes, but engine {} passes it to its CLI as one command-line \
                     argument, which Linux limits to {} bytes",
                    text.len(),
                    engine.id,
                    rules::MAX_ARG_BYTES
                ),
            ))
        }
        _ => Ok(()),
    }
}

pub(crate) fn check_text(field: &str, text: &str, max_chars: usize) -> Result<(), ValidationError> {
    if rules::too_long(text, max_chars) {
        Err(ValidationError::invalid(
            field,
            format!("must be at most {max_chars} characters"),
        ))
    } else if text.contains('\0') {
        Err(ValidationError::invalid(
            field,
            "must not contain NUL characters",
        ))
    } else {
        Ok(())
    }
}

/// Checks provided values against the declared variables and fills in defaults. Undeclared
/// keys pass through untouched: templates may use them.
fn resolve_vars(
    declared: &BTreeMap<String, Variable>,
    provided: Option<Map<String, Value>>,
    prefix: &str,
) -> Result<Map<String, Value>, ValidationError> {
    let mut vars = provided.unwrap_or_default();
    for (name, var) in declared {
        let field = format!("{prefix}.{name}");
        match vars.get(name) {
            // An explicit null counts as "not given", so the default applies.
            Some(value) if !value.is_null() => {
                var.check(value)
                    .map_err(|e| ValidationError::invalid(&field, e))?;
            }
            _ => match &var.default {
                Some(default) => {
                    vars.insert(name.clone(), default.clone());
                }
                None if var.required => {
                    return Err(ValidationError::missing(
                        &field,
                        format!("{field} is required"),
                    ));
                }
                // Left undefined rather than null, so a template renders it as empty.
                None => {
                    vars.remove(name);
                }
            },
        }
    }
    Ok(vars)
}

/// Instructions one template render may run: far beyond any real template, but a bound on one
/// that loops over a user's variables (nested loops, say) in the submit path.
const TEMPLATE_FUEL: u64 = 1_000_000;
/// What one render may write. A prompt may be 1,000,000 characters, up to 4 bytes each in UTF-8,
/// so no prompt that fits its own cap is refused here; the agent-instructions file has no other.
pub(crate) const MAX_RENDERED_BYTES: usize = 4 << 20;

/// Why a profile's template did not render.
#[derive(Debug, thiserror::Error)]
enum RenderError {
    #[error(transparent)]
    Template(#[from] minijinja::Error),
    #[error("it renders more than {} MiB", MAX_RENDERED_BYTES >> 20)]
    TooLarge,
    #[error("it renders invalid UTF-8")]
    NotUtf8,
}

/// Lenient undefined (minijinja's default): a missing variable renders as empty, as in Parpaing.
/// Bounded by [`TEMPLATE_FUEL`] and, as it is written, by [`MAX_RENDERED_BYTES`].
fn render(template: &str, vars: &Map<String, Value>) -> Result<String, RenderError> {
    let mut env = minijinja::Environment::new();
    env.set_fuel(Some(TEMPLATE_FUEL));
    let template = env.template_from_str(template)?;
    let mut out = CappedBuffer::default();
    if let Err(e) = template.render_captured_to(vars, &mut out) {
        return Err(if out.overflowed {
            RenderError::TooLarge
        } else {
            e.into()
        });
    }
    String::from_utf8(out.bytes).map_err(|_| RenderError::NotUtf8)
}

/// Collects a render, failing the write that would take it past [`MAX_RENDERED_BYTES`], so a
/// template stops as soon as it is too large instead of filling memory first.
#[derive(Default)]
struct CappedBuffer {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for CappedBuffer {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + data.len() > MAX_RENDERED_BYTES {
            self.overflowed = true;
            return Err(std::io::Error::other("template output too large"));
        }
        self.bytes.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn render_prompt(profile: &Profile, vars: &Map<String, Value>) -> Result<String, ValidationError> {
    let missing = |why: &str| {
        let message = format!("prompt is required: {why}");
        ValidationError::new("missing_prompt", "prompt", message)
    };
    let Some(template) = &profile.prompt_template else {
        return Err(missing(&format!(
            "profile {:?} has no prompt template",
            profile.name
        )));
    };
    let rendered = render(template, vars).map_err(|e| {
        let message = format!("the profile's prompt template failed to render: {e}");
        ValidationError::new("template_error", "prompt_vars", message)
    })?;
    if rendered.trim().is_empty() {
        let why = format!(
            "profile {:?}'s template rendered an empty prompt",
            profile.name
        );
        return Err(missing(&why));
    }
    check_text("prompt", &rendered, rules::MAX_PROMPT_CHARS)?;
    Ok(rendered)
}

fn check_mcp_config(config: Option<Value>) -> Result<Option<Value>, ValidationError> {
    match config {
        None | Some(Value::Null) => Ok(None),
        Some(config @ Value::Object(_)) => {
            let size = serde_json::to_vec(&config).map_or(usize::MAX, |bytes| bytes.len());
            if size > MAX_MCP_CONFIG_BYTES {
                return Err(ValidationError::invalid(
                    "mcp_config",
                    "must be at most 256 KiB as JSON",
                ));
            }
            Ok(Some(config))
        }
        Some(_) => Err(ValidationError::invalid(
            "mcp_config",
            "must be a JSON object or null",
        )),
    }
}

fn resolve_resources(
    requested: ResourcesRequest,
    profile: &Profile,
    limits: &Limits,
) -> Result<Resources, ValidationError> {
    const MEMORY: &str = "resources.memory";
    const CPUS: &str = "resources.cpus";
    let requested_memory = match &requested.memory {
        Some(text) => {
            Some(rules::parse_memory(text).map_err(|e| ValidationError::invalid(MEMORY, e))?)
        }
        None => None,
    };
    let memory_bytes = match requested_memory.or(profile.memory_bytes) {
        Some(bytes) if bytes < rules::MIN_MEMORY_BYTES => {
            return Err(ValidationError::invalid(MEMORY, "must be at least 6m"));
        }
        Some(bytes) if bytes > limits.max_memory_bytes => {
            let reason = format!(
                "{} is above the operator limit of {}",
                human_bytes(bytes),
                human_bytes(limits.max_memory_bytes)
            );
            return Err(ValidationError::invalid(MEMORY, reason));
        }
        Some(bytes) => bytes,
        None => limits.default_memory_bytes,
    };
    let nano_cpus = match requested.cpus.or(profile.cpus) {
        Some(cpus) => {
            let nano = rules::nano_cpus(cpus).map_err(|e| ValidationError::invalid(CPUS, e))?;
            if cpus > limits.max_cpus {
                let reason = format!("{cpus} is above the operator limit of {}", limits.max_cpus);
                return Err(ValidationError::invalid(CPUS, reason));
            }
            nano
        }
        None => limits.default_nano_cpus,
    };
    Ok(Resources {
        memory_bytes,
        nano_cpus,
    })
}

/// Decodes and checks `files`: safe relative paths, each once, within the count and size caps.
fn check_files(files: Vec<FileRequest>) -> Result<Vec<WorkspaceFile>, ValidationError> {
    use base64::Engine as _;
    if files.len() > MAX_FILES {
        let reason = format!("must have at most {MAX_FILES} files");
        return Err(ValidationError::invalid("files", reason));
    }
    let mut total = 0usize;
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(files.len());
    for (i, file) in files.into_iter().enumerate() {
        let field = |name: &str| format!("files[{i}].{name}");
        let path = file.path.ok_or_else(|| {
            ValidationError::missing(&field("path"), "path is required".to_owned())
        })?;
        rules::check_workspace_path(&path)
            .map_err(|e| ValidationError::invalid(&field("path"), e))?;
        if !seen.insert(path.clone()) {
            let reason = format!("{} is given twice", clip(&path));
            return Err(ValidationError::invalid(&field("path"), reason));
        }
        let content = file.content.ok_or_else(|| {
            ValidationError::missing(&field("content"), "content is required".to_owned())
        })?;
        let content = match file.encoding.as_deref().unwrap_or("utf-8") {
            "utf-8" => content.into_bytes(),
            "base64" => base64::engine::general_purpose::STANDARD
                .decode(content.as_bytes())
                .map_err(|e| {
                    ValidationError::invalid(&field("content"), format!("is not base64: {e}"))
                })?,
            other => {
                let reason = format!("must be utf-8 or base64, got {}", clip(other));
                return Err(ValidationError::invalid(&field("encoding"), reason));
            }
        };
        total += content.len();
        if total > MAX_FILES_BYTES {
            let reason = format!(
                "hold more than {} in all (decoded)",
                human_bytes(MAX_FILES_BYTES as i64)
            );
            return Err(ValidationError::invalid("files", reason));
        }
        out.push(WorkspaceFile {
            path,
            content,
            executable: file.executable.unwrap_or(false),
        });
    }
    Ok(out)
}

/// Whether `metadata` passes the rules of `SubmitRequest::metadata`.
pub fn metadata_is_valid(metadata: &BTreeMap<String, String>) -> bool {
    check_metadata(metadata.clone()).is_ok()
}

fn check_metadata(
    metadata: BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, ValidationError> {
    if metadata.len() > MAX_METADATA_KEYS {
        let reason = format!("must have at most {MAX_METADATA_KEYS} keys");
        return Err(ValidationError::invalid("metadata", reason));
    }
    for (key, value) in &metadata {
        let key_ok = !key.is_empty()
            && key.len() <= 64
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !key_ok {
            let reason = format!(
                "keys must match ^[A-Za-z0-9_.-]{{1,64}}$, got {}",
                clip(key)
            );
            return Err(ValidationError::invalid("metadata", reason));
        }
        if rules::too_long(value, MAX_METADATA_VALUE_CHARS) {
            let reason = format!("must be at most {MAX_METADATA_VALUE_CHARS} characters");
            return Err(ValidationError::invalid(&format!("metadata.{key}"), reason));
        }
    }
    Ok(metadata)
}

/// An image to prefetch (`POST /images/prefetch`): shaped like an image reference and allowed
/// by `FLOTILLA_ALLOWED_IMAGES`, as a job's `image` must be.
pub fn check_prefetch_image(image: &str, limits: &Limits) -> Result<(), ValidationError> {
    rules::check_image(image).map_err(|e| ValidationError::invalid("image", e))?;
    if !limits.allowed_images.allows(image) {
        let reason = format!(
            "{image} is not allowed: {}",
            limits.allowed_images.refusal()
        );
        return Err(ValidationError::new("invalid_field", "image", reason));
    }
    Ok(())
}
