//! The bounds of a runnable job, checked again where it runs. Validation (`validate`) makes every
//! job it queues fit them, but a node reads its jobs off the run queue, where anyone allowed to
//! publish can put any `JobRequest`: a node that trusted the message could be made to overflow a
//! timeout, lift the CPU limit (`NanoCpus` 0) or write outside `/workspace`. The rules are the
//! ones validation applies, and each refusal names the field, as a 422 would.

use flotilla_proto::{JobRequest, Resources, WorkspaceFile, ids};
use serde_json::Value;

use crate::rules::{self, human_bytes};
use crate::validate::{
    MAX_FILES, MAX_FILES_BYTES, MAX_MCP_CONFIG_BYTES, MAX_RENDERED_BYTES, check_text,
};
use crate::{Limits, ValidationError};

/// Checks that `request` is within what validation could have produced under `limits` (the
/// checking service's own maximums). The first broken bound is reported.
pub fn check_job_request(request: &JobRequest, limits: &Limits) -> Result<(), ValidationError> {
    check_names(request)?;
    check_texts(request)?;
    check_agent_options(request)?;
    let timeout = i64::try_from(request.timeout_seconds).unwrap_or(i64::MAX);
    rules::check_timeout(timeout).map_err(|_| {
        let reason = format!(
            "must be between 1 and {}, got {}",
            rules::MAX_TIMEOUT_SECONDS,
            request.timeout_seconds
        );
        ValidationError::invalid("timeout_seconds", reason)
    })?;
    check_resources(&request.resources, limits)?;
    check_files(&request.files)?;
    if let Some(git) = &request.git {
        crate::workspace::check_git_source(git)?;
    }
    crate::workspace::check_outputs(&request.outputs)?;
    if let Some(push) = &request.push {
        crate::workspace::check_push_bounds(push)?;
    }
    check_placement(request)
}

/// What the node matches against itself and hands to Docker. The image is only shaped here:
/// the allow-list is the submitting service's, and a node runs only the images it holds.
fn check_placement(request: &JobRequest) -> Result<(), ValidationError> {
    rules::check_requires(&request.requires)
        .map_err(|(key, e)| ValidationError::invalid(&rules::requires_field("requires", key), e))?;
    if let Some(image) = &request.image {
        rules::check_image(image).map_err(|e| ValidationError::invalid("image", e))?;
    }
    if let Some(runtime) = &request.runtime {
        rules::check_label(runtime).map_err(|e| ValidationError::invalid("runtime", e))?;
    }
    Ok(())
}

fn check_names(request: &JobRequest) -> Result<(), ValidationError> {
    if !ids::is_valid_job_id(&request.job_id) {
        let reason = format!("must match ^[A-Za-z0-9_-]{{1,{}}}$", ids::MAX_JOB_ID_LEN);
        return Err(ValidationError::invalid("job_id", reason));
    }
    for (field, value) in [
        ("agent_id", &request.agent_id),
        ("engine", &request.engine),
        ("profile", &request.profile),
    ] {
        rules::check_safe_id(value).map_err(|e| ValidationError::invalid(field, e))?;
    }
    for (i, plugin) in request.plugins.iter().enumerate() {
        rules::check_safe_id(plugin)
            .map_err(|e| ValidationError::invalid(&format!("plugins[{i}]"), e))?;
    }
    Ok(())
}

fn check_texts(request: &JobRequest) -> Result<(), ValidationError> {
    check_text("prompt", &request.prompt, rules::MAX_PROMPT_CHARS)?;
    if let Some(system_prompt) = &request.system_prompt {
        check_text(
            "system_prompt",
            system_prompt,
            rules::MAX_SYSTEM_PROMPT_CHARS,
        )?;
    }
    // The rendered instructions template: at most what one render may write.
    if let Some(instructions) = &request.instructions
        && instructions.len() > MAX_RENDERED_BYTES
    {
        let reason = format!("must be at most {} MiB", MAX_RENDERED_BYTES >> 20);
        return Err(ValidationError::invalid("instructions", reason));
    }
    Ok(())
}

/// What the engine's command line is built from.
fn check_agent_options(request: &JobRequest) -> Result<(), ValidationError> {
    if let Some(model) = &request.model {
        rules::check_model(model).map_err(|e| ValidationError::invalid("model", e))?;
    }
    if let Some(format) = &request.output_format {
        rules::check_output_format(format)
            .map_err(|e| ValidationError::invalid("output_format", e))?;
    }
    if let Some(turns) = request.max_turns {
        rules::check_max_turns(i64::from(turns))
            .map_err(|e| ValidationError::invalid("max_turns", e))?;
    }
    if let Some(usd) = request.max_budget_usd {
        rules::check_budget(usd).map_err(|e| ValidationError::invalid("max_budget_usd", e))?;
    }
    rules::check_retries(i64::from(request.retries))
        .map_err(|e| ValidationError::invalid("retries", e))?;
    if request.allowed_tools.len() > rules::MAX_TOOLS {
        let reason = format!("must have at most {} items", rules::MAX_TOOLS);
        return Err(ValidationError::invalid("allowed_tools", reason));
    }
    for (i, tool) in request.allowed_tools.iter().enumerate() {
        rules::check_tool(tool)
            .map_err(|e| ValidationError::invalid(&format!("allowed_tools[{i}]"), e))?;
    }
    check_mcp_config(request.mcp_config.as_ref())
}

fn check_mcp_config(config: Option<&Value>) -> Result<(), ValidationError> {
    match config {
        None | Some(Value::Null) => Ok(()),
        Some(config @ Value::Object(_)) => {
            let size = serde_json::to_vec(config).map_or(usize::MAX, |bytes| bytes.len());
            if size > MAX_MCP_CONFIG_BYTES {
                return Err(ValidationError::invalid(
                    "mcp_config",
                    "must be at most 256 KiB as JSON",
                ));
            }
            Ok(())
        }
        Some(_) => Err(ValidationError::invalid(
            "mcp_config",
            "must be a JSON object or null",
        )),
    }
}

/// Memory and CPUs between the floors Docker can enforce and this service's maximums.
fn check_resources(resources: &Resources, limits: &Limits) -> Result<(), ValidationError> {
    let memory = resources.memory_bytes;
    if !(rules::MIN_MEMORY_BYTES..=limits.max_memory_bytes).contains(&memory) {
        let reason = format!(
            "must be between 6m and {}, got {memory} bytes",
            human_bytes(limits.max_memory_bytes)
        );
        return Err(ValidationError::invalid("resources.memory", reason));
    }
    // The maximum as validation rounds it; an unusable maximum admits nothing.
    let max_nano = rules::nano_cpus(limits.max_cpus).unwrap_or(0);
    let nano = resources.nano_cpus;
    if !(rules::MIN_NANO_CPUS..=max_nano).contains(&nano) {
        let reason = format!(
            "must be between 0.01 and {} CPUs, got {nano} billionths of a CPU",
            limits.max_cpus
        );
        return Err(ValidationError::invalid("resources.cpus", reason));
    }
    Ok(())
}

/// The files' count, total size and paths, as validation leaves them.
fn check_files(files: &[WorkspaceFile]) -> Result<(), ValidationError> {
    if files.len() > MAX_FILES {
        let reason = format!("must have at most {MAX_FILES} files");
        return Err(ValidationError::invalid("files", reason));
    }
    let total = files.iter().map(|f| f.content.len()).sum::<usize>();
    if total > MAX_FILES_BYTES {
        let reason = format!(
            "hold more than {} in all",
            human_bytes(MAX_FILES_BYTES as i64)
        );
        return Err(ValidationError::invalid("files", reason));
    }
    for (i, file) in files.iter().enumerate() {
        rules::check_workspace_path(&file.path)
            .map_err(|e| ValidationError::invalid(&format!("files[{i}].path"), e))?;
    }
    Ok(())
}
