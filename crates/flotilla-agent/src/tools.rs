//! The tools the model may call: `shell`, `read_file`, `write_file` and `list_dir`. Each
//! answers with text for the model; a failure (bad arguments, a path outside the workspace, a
//! missing file) is an answer too, starting with `error:`, so the loop goes on and the model can
//! correct itself.

use std::{
    fmt::Write as _,
    io::Read,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::{Map, Value, json};

use crate::paths::Workspace;

/// Every tool, in the order they are offered.
pub const ALL: [&str; 4] = ["shell", "read_file", "write_file", "list_dir"];

/// What a tool's answer may hold; the rest is cut with a note saying how much.
pub const MAX_OUTPUT: usize = 16 << 10;
/// `read_file` answers with up to this much of a file.
pub const MAX_READ: usize = 64 << 10;
const MAX_ENTRIES: usize = 500;
const DEFAULT_SHELL_TIMEOUT: u64 = 120;

/// The tools' JSON schemas, as `tools` in the request, for the names in `allowed`.
pub fn definitions(allowed: &[String]) -> Value {
    allowed.iter().filter_map(|name| definition(name)).collect()
}

fn definition(name: &str) -> Option<Value> {
    let path = json!({"type": "string", "description": "A path relative to /workspace (or absolute, inside it)."});
    let (description, properties, required) = match name {
        "shell" => (
            "Run a command with /bin/sh -c in /workspace. Returns the exit code and the combined stdout and stderr (long output is truncated).",
            json!({
                "command": {"type": "string", "description": "The shell command."},
                "timeout_seconds": {"type": "integer", "description": "Stop the command after this many seconds (default 120)."}
            }),
            json!(["command"]),
        ),
        "read_file" => (
            "Read a text file in the workspace.",
            json!({"path": path}),
            json!(["path"]),
        ),
        "write_file" => (
            "Create or overwrite a file in the workspace with the given content; parent directories are created.",
            json!({"path": path, "content": {"type": "string", "description": "The whole new content."}}),
            json!(["path", "content"]),
        ),
        "list_dir" => (
            "List a directory in the workspace: one entry a line, directories end with /.",
            json!({"path": path}),
            json!(["path"]),
        ),
        _ => return None,
    };
    Some(json!({"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required}
    }}))
}

/// What a tool call came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub content: String,
    pub is_error: bool,
}

impl Outcome {
    fn ok(content: String) -> Self {
        Self {
            content,
            is_error: false,
        }
    }

    fn error(message: impl std::fmt::Display) -> Self {
        Self {
            content: format!("error: {message}"),
            is_error: true,
        }
    }
}

pub struct Tools {
    pub workspace: Workspace,
    pub allowed: Vec<String>,
    /// When the whole run must end: no command runs past it.
    pub deadline: Instant,
}

impl Tools {
    /// Runs one call; anything wrong with it is an error answer, never a panic or an exit.
    pub fn call(&self, name: &str, arguments: &str) -> Outcome {
        if !self.allowed.iter().any(|a| a == name) {
            return Outcome::error(format!(
                "unknown tool {name:?}; the tools are: {}",
                self.allowed.join(", ")
            ));
        }
        let args = match parse_arguments(arguments) {
            Ok(args) => args,
            Err(e) => return Outcome::error(format!("the arguments of {name} are {e}")),
        };
        let result = match name {
            "shell" => self.shell(&args),
            "read_file" => self.read_file(&args),
            "write_file" => self.write_file(&args),
            "list_dir" => self.list_dir(&args),
            _ => Err(format!("unknown tool {name:?}")),
        };
        result.map_or_else(Outcome::error, Outcome::ok)
    }

    fn shell(&self, args: &Map<String, Value>) -> Result<String, String> {
        let command = string_arg(args, "command")?;
        let asked = match args.get("timeout_seconds") {
            None | Some(Value::Null) => DEFAULT_SHELL_TIMEOUT,
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_f64().map(|f| f.max(1.0) as u64))
                .ok_or("timeout_seconds must be a number of seconds")?,
        };
        let left = self.deadline.saturating_duration_since(Instant::now());
        let timeout = Duration::from_secs(asked.max(1)).min(left);
        let run = run_shell(command, self.workspace.root(), timeout)?;
        let mut out = match run.timed_out {
            true => format!(
                "exit code: {} (stopped after {}s)\n",
                run.code,
                timeout.as_secs()
            ),
            false => format!("exit code: {}\n", run.code),
        };
        out.push_str(&run.output);
        Ok(out)
    }

    fn read_file(&self, args: &Map<String, Value>) -> Result<String, String> {
        let path = string_arg(args, "path")?;
        let real = self.workspace.resolve(path).map_err(|e| e.to_string())?;
        let file = std::fs::File::open(&real).map_err(|e| format!("cannot read {path}: {e}"))?;
        let mut bytes = Vec::new();
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        file.take(MAX_READ as u64)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read {path}: {e}"))?;
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if size > bytes.len() as u64 {
            let _ = write!(
                text,
                "\n[truncated: showed the first {} of {size} bytes; use shell (sed -n, head, tail) for the rest]",
                bytes.len()
            );
        }
        Ok(text)
    }

    fn write_file(&self, args: &Map<String, Value>) -> Result<String, String> {
        let path = string_arg(args, "path")?;
        let content = string_arg(args, "content")?;
        let real = self.workspace.resolve(path).map_err(|e| e.to_string())?;
        if let Some(parent) = real.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {path}: {e}"))?;
        }
        std::fs::write(&real, content).map_err(|e| format!("cannot write {path}: {e}"))?;
        Ok(format!("wrote {} bytes to {path}", content.len()))
    }

    fn list_dir(&self, args: &Map<String, Value>) -> Result<String, String> {
        let path = args.get("path").and_then(Value::as_str).unwrap_or(".");
        let real = self.workspace.resolve(path).map_err(|e| e.to_string())?;
        let entries = std::fs::read_dir(&real).map_err(|e| format!("cannot list {path}: {e}"))?;
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                match entry.file_type() {
                    Ok(t) if t.is_dir() => format!("{name}/"),
                    Ok(t) if t.is_symlink() => format!("{name}@"),
                    _ => name,
                }
            })
            .collect();
        names.sort();
        let total = names.len();
        names.truncate(MAX_ENTRIES);
        let mut out = names.join("\n");
        if total > MAX_ENTRIES {
            let _ = write!(out, "\n[truncated: {MAX_ENTRIES} of {total} entries]");
        }
        if total == 0 {
            out.push_str("(empty)");
        }
        Ok(out)
    }
}

/// The arguments as a JSON object; an empty string counts as `{}` (a call without any).
fn parse_arguments(arguments: &str) -> Result<Map<String, Value>, String> {
    if arguments.trim().is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_str::<Value>(arguments) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(format!(
            "not a JSON object: {}",
            crate::chat::head(&other.to_string(), 200)
        )),
        Err(e) => Err(format!(
            "not valid JSON ({e}): {}",
            crate::chat::head(arguments, 200)
        )),
    }
}

fn string_arg<'a>(args: &'a Map<String, Value>, name: &str) -> Result<&'a str, String> {
    match args.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("{name} must be a string")),
        None => Err(format!("missing the required argument {name}")),
    }
}

struct ShellRun {
    code: i32,
    output: String,
    timed_out: bool,
}

/// Runs `/bin/sh -c command` in `dir` in its own process group, stdout and stderr into one
/// pipe (interleaved as a terminal shows them), stopping the whole group at `timeout`.
fn run_shell(command: &str, dir: &std::path::Path, timeout: Duration) -> Result<ShellRun, String> {
    use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};

    let (reader, writer) = std::io::pipe().map_err(|e| format!("cannot make a pipe: {e}"))?;
    let writer2 = writer
        .try_clone()
        .map_err(|e| format!("cannot make a pipe: {e}"))?;
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer2)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run /bin/sh: {e}"))?;
    let pid = child.id();
    let (output_tx, output_rx) = mpsc::channel();
    // The reader ends when every holder of the pipe has exited, background jobs included.
    std::thread::spawn(move || {
        let _ = output_tx.send(Capped::read(reader));
    });
    let (exit_tx, exit_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = exit_tx.send(child.wait());
    });
    let (status, timed_out) = match exit_rx.recv_timeout(timeout) {
        Ok(status) => (status, false),
        Err(_) => {
            kill_group(pid);
            (
                exit_rx
                    .recv()
                    .unwrap_or_else(|e| Err(std::io::Error::other(e))),
                true,
            )
        }
    };
    let status = status.map_err(|e| format!("cannot wait for /bin/sh: {e}"))?;
    // A background process may keep the pipe open: give it a moment, then answer without it.
    let output = match output_rx.recv_timeout(Duration::from_millis(500)) {
        Ok(output) => output,
        Err(_) => {
            kill_group(pid);
            output_rx
                .recv_timeout(Duration::from_secs(2))
                .unwrap_or_else(|_| {
                    "[output not collected: a background process kept it open]".to_owned()
                })
        }
    };
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Ok(ShellRun {
        code,
        output,
        timed_out,
    })
}

/// SIGKILL to the command's process group, through kill(1): no `unsafe` for kill(2).
fn kill_group(pid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Keeps the head and the tail of a long output, and counts what it dropped.
struct Capped;

impl Capped {
    fn read(mut reader: impl Read) -> String {
        let half = MAX_OUTPUT / 2;
        let mut head = Vec::new();
        let mut tail: Vec<u8> = Vec::new();
        let mut dropped = 0usize;
        let mut buf = [0u8; 8192];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut data = &buf[..n];
            if head.len() < half {
                let take = data.len().min(half - head.len());
                head.extend_from_slice(&data[..take]);
                data = &data[take..];
            }
            tail.extend_from_slice(data);
            if tail.len() > 2 * half {
                let excess = tail.len() - half;
                tail.drain(..excess);
                dropped += excess;
            }
        }
        if tail.len() > half {
            let excess = tail.len() - half;
            tail.drain(..excess);
            dropped += excess;
        }
        let mut out = String::from_utf8_lossy(&head).into_owned();
        if dropped > 0 {
            let _ = write!(out, "\n[... {dropped} bytes of output truncated ...]\n");
        }
        out.push_str(&String::from_utf8_lossy(&tail));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> (tempfile::TempDir, Tools) {
        let dir = tempfile::tempdir().unwrap();
        let tools = Tools {
            workspace: Workspace::new(dir.path()).unwrap(),
            allowed: ALL.iter().map(|s| (*s).to_owned()).collect(),
            deadline: Instant::now() + Duration::from_secs(60),
        };
        (dir, tools)
    }

    #[test]
    fn write_run_read() {
        let (_dir, tools) = tools();
        let wrote = tools.call(
            "write_file",
            r#"{"path": "bin/s.sh", "content": "echo $((6 * 7)) > out.txt; echo done; echo oops >&2; exit 3"}"#,
        );
        assert_eq!(wrote.content, "wrote 59 bytes to bin/s.sh", "{wrote:?}");
        let ran = tools.call("shell", r#"{"command": "sh bin/s.sh"}"#);
        assert!(!ran.is_error);
        assert_eq!(ran.content, "exit code: 3\ndone\noops\n");
        assert_eq!(
            tools.call("read_file", r#"{"path": "out.txt"}"#).content,
            "42\n"
        );
        let listed = tools.call("list_dir", r#"{"path": "."}"#).content;
        assert_eq!(listed, "bin/\nout.txt");
    }

    #[test]
    fn bad_calls_are_error_answers() {
        let (_dir, tools) = tools();
        let e = tools.call("shell", "{\"command\": ");
        assert!(e.is_error && e.content.contains("not valid JSON"), "{e:?}");
        let e = tools.call("frobnicate", "{}");
        assert!(
            e.is_error && e.content.contains("unknown tool \"frobnicate\""),
            "{e:?}"
        );
        let e = tools.call("read_file", "{}");
        assert!(
            e.content.contains("missing the required argument path"),
            "{e:?}"
        );
        let e = tools.call("read_file", r#"{"path": "../../etc/passwd"}"#);
        assert!(
            e.is_error && e.content.contains("outside the workspace"),
            "{e:?}"
        );
        let e = tools.call("write_file", r#"{"path": "/etc/x", "content": ""}"#);
        assert!(
            e.is_error && e.content.contains("outside the workspace"),
            "{e:?}"
        );
        let e = tools.call("shell", r#"{"command": "no-such-binary-here"}"#);
        assert!(
            !e.is_error && e.content.starts_with("exit code: 127"),
            "{e:?}"
        );
    }

    #[test]
    fn allowed_tools_restrict_the_set() {
        let (_dir, mut tools) = tools();
        tools.allowed = vec!["read_file".to_owned()];
        let e = tools.call("shell", r#"{"command": "true"}"#);
        assert!(
            e.is_error && e.content.contains("the tools are: read_file"),
            "{e:?}"
        );
        let defs = definitions(&tools.allowed);
        assert_eq!(defs.as_array().unwrap().len(), 1);
        assert_eq!(defs[0]["function"]["name"], "read_file");
    }

    #[test]
    fn long_output_is_capped_and_slow_commands_stopped() {
        let (_dir, tools) = tools();
        let out = tools
            .call("shell", r#"{"command": "seq 1 100000"}"#)
            .content;
        assert!(out.len() < MAX_OUTPUT + 200, "{}", out.len());
        assert!(out.contains("bytes of output truncated"), "{out}");
        assert!(out.starts_with("exit code: 0\n1\n2\n") && out.ends_with("100000\n"));
        let started = Instant::now();
        let out = tools
            .call(
                "shell",
                r#"{"command": "sleep 30 & sleep 30", "timeout_seconds": 1}"#,
            )
            .content;
        assert!(out.contains("stopped after 1s"), "{out}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
