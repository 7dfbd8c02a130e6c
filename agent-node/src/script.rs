//! The shell script a job container runs, sent over its stdin: it writes the job's files
//! (agent instructions, MCP config, hooks, the shell engine's script) under /workspace, runs
//! the pre-hook, then the engine as a child (so SIGTERM on cancel or timeout reaches it), then
//! the post-hook with the outcome in its environment, and exits with the engine's status.

use std::fmt::Write as _;

use bytes::Bytes;
use flotilla_catalog::{Engine, EngineKind, MCP_CONFIG_PATH};
use flotilla_proto::{JobRequest, WorkspaceFile};

/// Exit status of a job whose pre-hook failed; the marker line on stderr confirms it.
pub(crate) const PRE_HOOK_FAILED: i64 = 199;
pub(crate) const PRE_HOOK_MARKER: &str = "flotilla: pre-hook failed";
/// Said on stderr when the checkout cannot be unpacked in `/workspace` (the job fails as a
/// failed pre-hook does).
pub(crate) const UNPACK_MARKER: &str =
    "flotilla: pre-hook failed: cannot unpack the repository in /workspace (too large for it?)";
/// Said on stderr when the engine died of SIGKILL and the memory cgroup counts an OOM kill.
pub(crate) const OOM_MARKER: &str = "flotilla: the memory limit killed the engine";

const DIR: &str = "/workspace/.flotilla";

/// `env` is for the engine only (its llm-gateway URL and token, the trace context): exported
/// after the pre-hook.
/// The lines the node reads out of the job's output.
pub(crate) struct Markers<'a> {
    /// Printed on stdout before a tar of `/workspace` (see `workspace::WorkspaceIo`), when the
    /// node wants the workspace back.
    pub(crate) workspace: Option<&'a str>,
    /// Printed with the exit status, last: on stderr, and first on stdout too when asked (see
    /// `exit_report`).
    pub(crate) exit: &'a str,
    pub(crate) exit_on_stdout: bool,
}

pub(crate) fn job_script(
    engine: &Engine,
    request: &JobRequest,
    env: &[(String, String)],
    markers: &Markers<'_>,
) -> Bytes {
    let mut script = String::new();
    if request.git.is_some() || request.continues.is_some() {
        // The checkout (or a follow-up's saved workspace) follows the script on stdin.
        script.push_str(&format!(
            "tar -x -f - -C /workspace || {{ echo '{UNPACK_MARKER}' >&2; exit {PRE_HOOK_FAILED}; }}\n"
        ));
    }
    script.push_str(&format!("F={DIR}\nmkdir -p \"$F\"\n"));
    for file in &request.files {
        write_workspace_file(&mut script, file);
    }
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
                // Sourced in a subshell: a fork, not a second shell's exec (about 1 ms here).
                "( . \"$F/job.sh\" )".to_owned()
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
         while kill -0 \"$child\" 2>/dev/null; do wait \"$child\"; status=$?; done\n\
         if [ \"$status\" -eq 137 ]; then for f in /sys/fs/cgroup/memory/memory.oom_control /sys/fs/cgroup/memory.events; do \
         grep -qs '^oom_kill [1-9]' \"$f\" && {{ echo '{OOM_MARKER}' >&2; break; }}; done; fi\n"
    ));
    if let Some(post) = &request.post_hook {
        write_file(&mut script, &format!("{DIR}/post-hook"), post);
        script.push_str(
            "if [ \"$status\" -eq 0 ]; then s=completed; else s=failed; fi\n\
             JOB_STATUS=$s JOB_EXIT_CODE=$status /bin/sh \"$F/post-hook\" </dev/null \
             || echo \"flotilla: post-hook failed with exit code $?\" >&2\n",
        );
    }
    if let Some(marker) = markers.workspace {
        script.push_str(&format!(
            "printf '\\n%s\\n' '{marker}'; tar -c -f - -C /workspace . 2>/dev/null\n"
        ));
    }
    let report = format!("printf '\\n%s %s\\n' '{}' \"$status\"", markers.exit);
    if markers.exit_on_stdout {
        script.push_str(&format!("{report}\n"));
    }
    script.push_str(&format!("{report} >&2\nexit $status\n"));
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

/// Appends commands writing a submitted file under /workspace (its parent directories too).
/// The content goes through printf's format, with `%` and `\` escaped and the bytes a shell
/// string cannot carry (NUL, controls, non-UTF-8) as octal escapes: binary files need nothing
/// in the image but the shell.
fn write_workspace_file(script: &mut String, file: &WorkspaceFile) {
    let path = format!("/workspace/{}", file.path);
    if let Some((dir, _)) = file.path.rsplit_once('/') {
        script.push_str(&format!(
            "mkdir -p {}\n",
            quote(&format!("/workspace/{dir}"))
        ));
    }
    // Written in place: a binary file may need millions of these.
    let octal = |format: &mut String, byte: u8| {
        let _ = write!(format, "\\{byte:03o}");
    };
    let mut format = String::with_capacity(file.content.len() + 16);
    match std::str::from_utf8(&file.content) {
        Ok(text) => {
            for c in text.chars() {
                match c {
                    '%' => format.push_str("%%"),
                    '\\' => format.push_str("\\\\"),
                    '\n' | '\t' => format.push(c),
                    c if c.is_ascii_control() => octal(&mut format, c as u8),
                    c => format.push(c),
                }
            }
        }
        Err(_) => {
            for &byte in &file.content {
                match byte {
                    b'%' => format.push_str("%%"),
                    b'\\' => format.push_str("\\\\"),
                    b'\n' | b'\t' | 0x20..=0x7e => format.push(char::from(byte)),
                    _ => octal(&mut format, byte),
                }
            }
        }
    }
    // A format starting with `-` would read as an option.
    if format.starts_with('-') {
        format.replace_range(..1, "\\055");
    }
    script.push_str(&format!("printf {} > {}\n", quote(&format), quote(&path)));
    if file.executable {
        script.push_str(&format!("chmod +x {}\n", quote(&path)));
    }
}

/// Single-quotes `arg` for /bin/sh.
pub(crate) fn quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs what the script writes for `file` through the host's /bin/sh and reads it back.
    fn written(file: &WorkspaceFile) -> Vec<u8> {
        let mut script = String::new();
        write_workspace_file(&mut script, file);
        let dir = tempfile::tempdir().unwrap();
        let script = script.replace("/workspace", &dir.path().display().to_string());
        let status = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(&script)
            .status()
            .unwrap();
        assert!(status.success(), "{script}");
        std::fs::read(dir.path().join(&file.path)).unwrap()
    }

    #[test]
    fn workspace_files_arrive_byte_for_byte() {
        let all_bytes: Vec<u8> = (0..=255).collect();
        for content in [
            b"plain text\nwith 100% and a \\ backslash and 'quotes'\n".to_vec(),
            "unicode: héllo ✓\ttab\u{1b}[0m".as_bytes().to_vec(),
            b"-n looks like an option".to_vec(),
            b"%s %d \\n \\000".to_vec(),
            Vec::new(),
            all_bytes,
        ] {
            let file = WorkspaceFile {
                path: "deep/er/file.bin".to_owned(),
                content: content.clone(),
                executable: false,
            };
            assert_eq!(
                written(&file),
                content,
                "{:?}",
                String::from_utf8_lossy(&content)
            );
        }
    }

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote(""), "''");
    }
}
