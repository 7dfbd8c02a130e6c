//! The agent's settings: flags first, then `FLOTILLA_AGENT_*`, then the OpenAI SDKs' own
//! variable names (`OPENAI_BASE_URL`, `OPENAI_API_KEY`), which is what an engine's `[llm.env]`
//! sets.

use std::{path::PathBuf, time::Duration};

use crate::{http::BaseUrl, tools};

pub const USAGE: &str = "usage: flotilla-agent [--model M] [--max-turns N] [--system-prompt S] \
[--allowed-tools a,b] [--stream | --no-stream] [--timeout-seconds N] [--workspace DIR] \
[--prompt P | [--] PROMPT]\n\
environment: FLOTILLA_AGENT_BASE_URL or OPENAI_BASE_URL (http://host:port/v1), \
FLOTILLA_AGENT_API_KEY or OPENAI_API_KEY, FLOTILLA_AGENT_MODEL, FLOTILLA_AGENT_STREAM=0|1, \
FLOTILLA_AGENT_TIMEOUT_SECONDS, FLOTILLA_AGENT_WORKSPACE";

pub const DEFAULT_MAX_TURNS: u32 = 50;
/// With no `--timeout-seconds`: the node's job timeout stops the container anyway.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}\n{USAGE}")]
pub struct ConfigError(pub String);

#[derive(Debug, Clone)]
pub struct Config {
    pub base: BaseUrl,
    pub key: String,
    pub model: String,
    pub max_turns: u32,
    pub system_prompt: Option<String>,
    pub allowed_tools: Vec<String>,
    pub stream: bool,
    /// The whole run's time limit.
    pub timeout: Duration,
    pub workspace: PathBuf,
    pub prompt: String,
}

impl Config {
    /// From `args` (without the program name) and a lookup of environment variables.
    pub fn from_args(
        args: impl IntoIterator<Item = String>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let env_of = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| env(n).filter(|v| !v.trim().is_empty()))
        };
        let mut model = env_of(&["FLOTILLA_AGENT_MODEL"]);
        let mut max_turns = None;
        let mut system_prompt = None;
        let mut allowed = None;
        let mut stream =
            env_of(&["FLOTILLA_AGENT_STREAM"]).map(|v| !matches!(v.as_str(), "0" | "false" | "no"));
        let mut timeout = env_of(&["FLOTILLA_AGENT_TIMEOUT_SECONDS"]);
        let mut workspace = env_of(&["FLOTILLA_AGENT_WORKSPACE"]);
        let mut prompt = None;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let mut value = |flag: &str| {
                args.next()
                    .ok_or_else(|| ConfigError(format!("{flag} needs a value")))
            };
            match arg.as_str() {
                "--model" => model = Some(value("--model")?),
                "--max-turns" => max_turns = Some(value("--max-turns")?),
                "--system-prompt" => system_prompt = Some(value("--system-prompt")?),
                "--allowed-tools" => allowed = Some(value("--allowed-tools")?),
                "--timeout-seconds" => timeout = Some(value("--timeout-seconds")?),
                "--workspace" => workspace = Some(value("--workspace")?),
                "--prompt" => prompt = Some(value("--prompt")?),
                "--stream" => stream = Some(true),
                "--no-stream" => stream = Some(false),
                "--" => {
                    prompt = Some(
                        args.next()
                            .ok_or_else(|| ConfigError("no prompt after --".to_owned()))?,
                    );
                    if args.next().is_some() {
                        return Err(ConfigError("one prompt only, after --".to_owned()));
                    }
                    break;
                }
                flag if flag.starts_with("--") => {
                    return Err(ConfigError(format!("unknown flag {flag}")));
                }
                _ if prompt.is_none() => prompt = Some(arg),
                _ => return Err(ConfigError(format!("a second prompt: {arg:?}"))),
            }
        }
        let base = env_of(&["FLOTILLA_AGENT_BASE_URL", "OPENAI_BASE_URL"])
            .ok_or_else(|| ConfigError("no model API: set OPENAI_BASE_URL".to_owned()))?;
        let base = BaseUrl::parse(&base).map_err(|e| ConfigError(e.to_string()))?;
        let key = env_of(&["FLOTILLA_AGENT_API_KEY", "OPENAI_API_KEY"]).unwrap_or_default();
        let model = model.ok_or_else(|| ConfigError("no model: give --model".to_owned()))?;
        let max_turns = match max_turns {
            None => DEFAULT_MAX_TURNS,
            Some(n) => n.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| {
                ConfigError(format!("--max-turns {n:?} is not a positive number"))
            })?,
        };
        let timeout = match timeout {
            None => DEFAULT_TIMEOUT,
            Some(s) => {
                Duration::from_secs(s.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                    ConfigError(format!("timeout {s:?} is not a positive number of seconds"))
                })?)
            }
        };
        Ok(Self {
            base,
            key,
            model,
            max_turns,
            system_prompt,
            allowed_tools: allowed_tools(allowed.as_deref(), &mut |w| {
                eprintln!("flotilla-agent: {w}")
            }),
            stream: stream.unwrap_or(true),
            timeout,
            workspace: workspace.unwrap_or_else(|| "/workspace".to_owned()).into(),
            prompt: prompt.ok_or_else(|| ConfigError("no prompt".to_owned()))?,
        })
    }
}

/// Claude Code's tool names, as profiles list them (the shipped default profile does), and the
/// tool of ours that does that job. A rule with a pattern (`Bash(git:*)`) has no equivalent:
/// granting the whole shell for it would widen it.
const ALIASES: [(&str, &str); 6] = [
    ("Bash", "shell"),
    ("Read", "read_file"),
    ("Write", "write_file"),
    ("Edit", "write_file"),
    ("LS", "list_dir"),
    ("Glob", "list_dir"),
];

/// `a,b` (commas or spaces): our tool names or Claude Code's equivalents. None given is all of
/// them. Other names are left out with a warning, not refused: the same profile may serve
/// several engines.
fn allowed_tools(list: Option<&str>, warn: &mut dyn FnMut(String)) -> Vec<String> {
    let names: Vec<&str> = list
        .unwrap_or_default()
        .split([',', ' '])
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    if names.is_empty() {
        return tools::ALL.iter().map(|t| (*t).to_owned()).collect();
    }
    let mut ours = Vec::new();
    for name in names {
        let tool = tools::ALL
            .iter()
            .find(|t| **t == name)
            .copied()
            .or_else(|| ALIASES.iter().find(|(a, _)| *a == name).map(|(_, t)| *t));
        match tool {
            Some(tool) => ours.push(tool),
            None => warn(format!(
                "--allowed-tools: {name:?} is not a tool of this agent (the tools are {}); left out",
                tools::ALL.join(", ")
            )),
        }
    }
    // In the order of ALL, each once.
    tools::ALL
        .iter()
        .filter(|t| ours.contains(t))
        .map(|t| (*t).to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str], vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let env = move |name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        Config::from_args(args.iter().map(|a| (*a).to_owned()), &env)
    }

    const GATEWAY: [(&str, &str); 2] = [
        ("OPENAI_BASE_URL", "http://10.0.0.1:8421/openai/v1"),
        ("OPENAI_API_KEY", "flj_token"),
    ];

    #[test]
    fn flags_and_environment() {
        let c = parse(
            &[
                "--model",
                "qwen",
                "--max-turns",
                "7",
                "--allowed-tools",
                "read_file,shell",
                "--no-stream",
                "--",
                "--do it",
            ],
            &GATEWAY,
        )
        .unwrap();
        assert_eq!(c.base.path, "/openai/v1");
        assert_eq!(c.key, "flj_token");
        assert_eq!(
            (c.model.as_str(), c.max_turns, c.stream),
            ("qwen", 7, false)
        );
        assert_eq!(c.allowed_tools, ["shell", "read_file"]);
        assert_eq!(c.prompt, "--do it");
        let c = parse(&["hello"], &[GATEWAY[0], ("FLOTILLA_AGENT_MODEL", "m")]).unwrap();
        assert!(c.stream && c.key.is_empty());
        assert_eq!(c.allowed_tools.len(), 4);
        assert_eq!(c.max_turns, DEFAULT_MAX_TURNS);
    }

    #[test]
    fn claude_code_tool_names_are_understood_and_others_left_out() {
        let mut warnings = Vec::new();
        let tools = allowed_tools(Some("Read,Grep,Glob,Bash(git:*),Write,Edit,rm"), &mut |w| {
            warnings.push(w)
        });
        assert_eq!(tools, ["read_file", "write_file", "list_dir"]);
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(
            warnings[1].contains("\"Bash(git:*)\" is not a tool"),
            "{warnings:?}"
        );
        assert_eq!(allowed_tools(Some("Bash"), &mut |_| {}), ["shell"]);
        assert!(allowed_tools(Some("Grep"), &mut |_| {}).is_empty());
    }

    #[test]
    fn mistakes_are_named() {
        let e = |args: &[&str]| parse(args, &GATEWAY).unwrap_err().0;
        assert_eq!(e(&["--model", "m"]), "no prompt");
        assert_eq!(e(&["p"]), "no model: give --model");
        assert!(e(&["--model", "m", "--max-turns", "0", "p"]).contains("not a positive"));
        assert_eq!(e(&["--model", "m", "--bogus", "p"]), "unknown flag --bogus");
        assert!(
            parse(&["--model", "m", "p"], &[])
                .unwrap_err()
                .0
                .contains("OPENAI_BASE_URL")
        );
    }
}
