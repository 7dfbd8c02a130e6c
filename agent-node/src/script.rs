//! The shell script a job container runs, sent over its stdin: it writes the job's files
//! (agent instructions, MCP config, hooks, the shell engine's script) under /workspace, runs
//! the pre-hook, then the engine as a child (so SIGTERM on cancel or timeout reaches it), then
//! the post-hook with the outcome in its environment, and exits with the engine's status.

use bytes::Bytes;
use flotilla_catalog::{Engine, EngineKind, MCP_CONFIG_PATH};
use flotilla_proto::JobRequest;

/// Exit status of a job whose pre-hook failed; the marker line on stderr confirms it.
pub(crate) const PRE_HOOK_FAILED: i64 = 199;
pub(crate) const PRE_HOOK_MARKER: &str = "flotilla: pre-hook failed";

const DIR: &str = "/workspace/.flotilla";

/// `env` is for the engine only (its llm-gateway URL and token, the trace context): exported
/// after the pre-hook.
pub(crate) fn job_script(engine: &Engine, request: &JobRequest, env: &[(String, String)]) -> Bytes {
    let mut script = format!("F={DIR}\nmkdir -p \"$F\"\n");
    if let Some(instructions) = &request.instructions {
        write_file(
            &mut script,
            &format!("/workspace/{}", engine.instructions_file),
            instructions,
        );
    }
    if let Some(mcp) = &request.mcp_config {
        write_file(&mut script, MCP_CONFIG_PATH, &mcp.to_string());
    }
    if let Some(pre) = &request.pre_hook {
        write_file(&mut script, &format!("{DIR}/pre-hook"), pre);
        script.push_str(&format!(
            "/bin/sh \"$F/pre-hook\" </dev/null || {{ code=$?; echo \"{PRE_HOOK_MARKER} with exit code $code\" >&2; exit {PRE_HOOK_FAILED}; }}\n"
        ));
    }
    let command = if request.dry_run {
        // Dry run: the container prints the exact command line instead of running it.
        let plan = dry_run_plan(engine, request);
        format!("printf '%s\\n' {}", quote(&plan.to_string()))
    } else {
        match engine.kind {
            EngineKind::Shell => {
                write_file(&mut script, &format!("{DIR}/job.sh"), &request.prompt);
                "/bin/sh \"$F/job.sh\"".to_owned()
            }
            EngineKind::Cli => engine
                .command_line(request)
                .iter()
                .map(|arg| quote(arg))
                .collect::<Vec<_>>()
                .join(" "),
        }
    };
    for (name, value) in env {
        script.push_str(&format!("export {name}={}\n", quote(value)));
    }
    script.push_str(&format!(
        "{command} </dev/null &\n\
         child=$!\n\
         trap 'kill -TERM \"$child\" 2>/dev/null' TERM INT\n\
         wait \"$child\"; status=$?\n\
         # A trapped signal interrupts wait: wait again for the engine's own status.\n\
         while kill -0 \"$child\" 2>/dev/null; do wait \"$child\"; status=$?; done\n"
    ));
    if let Some(post) = &request.post_hook {
        write_file(&mut script, &format!("{DIR}/post-hook"), post);
        script.push_str(
            "if [ \"$status\" -eq 0 ]; then s=completed; else s=failed; fi\n\
             JOB_STATUS=$s JOB_EXIT_CODE=$status /bin/sh \"$F/post-hook\" </dev/null \
             || echo \"flotilla: post-hook failed with exit code $?\" >&2\n",
        );
    }
    script.push_str("exit $status\n");
    Bytes::from(script)
}

/// `{"dry_run": true, "engine", "binary", "args"}`: what Parpaing records for a dry run.
pub(crate) fn dry_run_plan(engine: &Engine, request: &JobRequest) -> serde_json::Value {
    let argv = engine.command_line(request);
    serde_json::json!({
        "dry_run": true,
        "engine": engine.id,
        "binary": argv.first(),
        "args": argv.get(1..).unwrap_or_default(),
    })
}

/// Appends a command writing `content` to `path` (printf is a shell builtin: no argv limit).
fn write_file(script: &mut String, path: &str, content: &str) {
    script.push_str(&format!(
        "printf '%s' {} > {}\n",
        quote(content),
        quote(path)
    ));
}

/// Single-quotes `arg` for /bin/sh.
pub(crate) fn quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote(""), "''");
    }
}
