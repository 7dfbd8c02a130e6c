//! Engines: how to invoke one agent CLI (or the shell) inside a job container.

use std::collections::BTreeMap;
use std::fmt;

use flotilla_proto::JobRequest;
use serde::Deserialize;
use serde::de::{MapAccess, Visitor};

use crate::output::Parser;
use crate::rules;

/// Where the job's MCP configuration is written inside the container.
pub const MCP_CONFIG_PATH: &str = "/workspace/.flotilla/mcp.json";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// The prompt is a `/bin/sh` script.
    Shell,
    /// An agent CLI invoked with argv.
    #[default]
    Cli,
}

/// A `JobRequest` field an engine can map to a CLI flag (`[command.map]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MappedField {
    Model,
    OutputFormat,
    MaxTurns,
    MaxBudgetUsd,
    SystemPrompt,
    AllowedTools,
    DryRun,
    /// The agent session a follow-up continues (`POST /jobs/{id}/continue`), where the
    /// finished job reported one.
    Resume,
}

impl MappedField {
    const ALL: [MappedField; 8] = [
        Self::Model,
        Self::OutputFormat,
        Self::MaxTurns,
        Self::MaxBudgetUsd,
        Self::SystemPrompt,
        Self::AllowedTools,
        Self::DryRun,
        Self::Resume,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Model => "model",
            Self::OutputFormat => "output_format",
            Self::MaxTurns => "max_turns",
            Self::MaxBudgetUsd => "max_budget_usd",
            Self::SystemPrompt => "system_prompt",
            Self::AllowedTools => "allowed_tools",
            Self::DryRun => "dry_run",
            Self::Resume => "resume",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|field| field.as_str() == s)
    }

    /// List fields are joined into one argument (`[command.list_join]`).
    pub fn is_list(self) -> bool {
        self == Self::AllowedTools
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputMode {
    /// The engine's standard output is the result.
    #[default]
    Stdout,
    /// The engine writes its result to `Output::path`.
    File,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub mode: OutputMode,
    /// json | text | stream-json: what the engine prints.
    pub format: String,
    /// The result file, for `OutputMode::File`.
    pub path: Option<String>,
    /// How to read what the engine prints (`crate::parse`).
    pub parser: Parser,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Engine {
    pub id: String,
    pub name: String,
    pub description: String,
    pub kind: EngineKind,
    pub binary: String,
    /// Flag before the prompt; empty means the prompt is positional.
    pub prompt_flag: String,
    /// The prompt goes last, after `--` (the end of options), so that a prompt starting with
    /// `-` is never read as a flag. Only for CLIs whose prompt is an operand and that honour
    /// `--`; `prompt_flag` then stays where it was (Claude Code's `-p` is a mode, not the
    /// prompt's flag).
    pub end_of_options: bool,
    pub static_args: Vec<String>,
    pub trailing_args: Vec<String>,
    /// Flags in the order the engine file lists them.
    pub flags: Vec<(MappedField, String)>,
    /// Separator for list fields; "," when absent.
    pub list_join: BTreeMap<MappedField, String>,
    /// Per field, job values the CLI spells differently (`[command.values]`); others pass as is.
    pub values: BTreeMap<MappedField, BTreeMap<String, String>>,
    pub mcp_config_flag: Option<String>,
    pub output: Output,
    /// Names of the credentials the engine needs (informational).
    pub auth_env: Vec<String>,
    /// File name, in /workspace, where the engine reads its agent instructions (CLAUDE.md,
    /// AGENTS.md, GEMINI.md, ...).
    pub instructions_file: String,
    /// Files the engine keeps in /workspace for itself (its history, caches), as gitignore
    /// patterns: kept out of a job's change and its pushed commit.
    pub workspace_ignore: Vec<String>,
    /// How the engine reaches LLMs through the llm-gateway; `None` for engines that call none.
    pub llm: Option<LlmAccess>,
}

/// An engine file's `[llm]` section: which llm-gateway providers the job's token may use, and
/// the environment the CLI reads them from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlmAccess {
    pub providers: Vec<String>,
    /// Variable name to value, where `{gateway}` becomes the gateway's base URL and `{token}`
    /// the job's token (e.g. `ANTHROPIC_BASE_URL = "{gateway}/anthropic"`).
    pub env: BTreeMap<String, String>,
}

impl LlmAccess {
    /// The variables for one job: placeholders filled in.
    pub fn render_env(&self, gateway_url: &str, token: &str) -> Vec<(String, String)> {
        self.env
            .iter()
            .map(|(name, value)| {
                let value = value
                    .replace("{gateway}", gateway_url.trim_end_matches('/'))
                    .replace("{token}", token);
                (name.clone(), value)
            })
            .collect()
    }
}

impl Engine {
    /// The exact argv, binary first, that runs `request` with this engine.
    pub fn command_line(&self, request: &JobRequest) -> Vec<String> {
        if self.kind == EngineKind::Shell {
            return vec![self.binary.clone(), "-c".to_owned(), request.prompt.clone()];
        }
        let mut argv = vec![self.binary.clone()];
        argv.extend(self.static_args.iter().cloned());
        if !self.prompt_flag.is_empty() {
            argv.push(self.prompt_flag.clone());
        }
        if !self.end_of_options {
            argv.push(request.prompt.clone());
        }
        for (field, flag) in &self.flags {
            let value = match field {
                MappedField::Model => request.model.clone(),
                MappedField::OutputFormat => request.output_format.clone(),
                MappedField::MaxTurns => request.max_turns.map(|n| n.to_string()),
                MappedField::MaxBudgetUsd => request.max_budget_usd.map(|usd| format!("{usd:.2}")),
                MappedField::SystemPrompt => request.system_prompt.clone(),
                // An empty list means "all tools": pass nothing rather than an empty allow-list.
                MappedField::AllowedTools => (!request.allowed_tools.is_empty()).then(|| {
                    let sep = self.list_join.get(field).map_or(",", String::as_str);
                    request.allowed_tools.join(sep)
                }),
                MappedField::Resume => request
                    .continues
                    .as_ref()
                    .and_then(|c| c.session_id.clone()),
                MappedField::DryRun => {
                    if request.dry_run {
                        argv.push(flag.clone());
                    }
                    continue;
                }
            };
            if let Some(value) = value {
                let value = match self
                    .values
                    .get(field)
                    .and_then(|spellings| spellings.get(&value))
                {
                    Some(spelled) => spelled.clone(),
                    None => value,
                };
                argv.push(flag.clone());
                argv.push(value);
            }
        }
        argv.extend(self.trailing_args.iter().cloned());
        if let (Some(flag), Some(_)) = (&self.mcp_config_flag, &request.mcp_config) {
            argv.push(flag.clone());
            argv.push(MCP_CONFIG_PATH.to_owned());
        }
        if self.end_of_options {
            argv.push("--".to_owned());
            argv.push(request.prompt.clone());
        }
        argv
    }

    /// Builds an engine from the text of `<stem>.toml`. Errors say what is wrong, without the
    /// file name (the caller adds it).
    pub(crate) fn parse(stem: &str, text: &str) -> Result<Engine, String> {
        let file: EngineFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let EngineFile {
            engine,
            command,
            output,
            env,
            llm,
        } = file;
        let id = engine.id.unwrap_or_else(|| stem.to_owned());
        rules::check_safe_id(&id).map_err(|e| format!("engine id {e}"))?;

        let mut flags = Vec::with_capacity(command.map.0.len());
        for (key, flag) in command.map.0 {
            let field = MappedField::parse(&key).ok_or_else(|| {
                format!("[command.map]: unknown field {key:?}; {}", known_fields())
            })?;
            if flag.is_empty() {
                return Err(format!("[command.map].{key} must not be empty"));
            }
            flags.push((field, flag));
        }
        let mut list_join = BTreeMap::new();
        for (key, sep) in command.list_join {
            match MappedField::parse(&key) {
                Some(field) if field.is_list() => list_join.insert(field, sep),
                _ => return Err(format!("[command.list_join]: {key:?} is not a list field")),
            };
        }

        let mut values = BTreeMap::new();
        for (key, spellings) in command.values {
            let field = MappedField::parse(&key).ok_or_else(|| {
                format!(
                    "[command.values]: unknown field {key:?}; {}",
                    known_fields()
                )
            })?;
            if !flags.iter().any(|(mapped, _)| *mapped == field) {
                return Err(format!(
                    "[command.values].{key}: {key} has no flag in [command.map]"
                ));
            }
            if let Some((from, _)) = spellings.iter().find(|(_, to)| to.is_empty()) {
                return Err(format!("[command.values].{key}.{from} must not be empty"));
            }
            values.insert(field, spellings);
        }

        let default_binary = match engine.kind {
            EngineKind::Shell => "/bin/sh",
            EngineKind::Cli => id.as_str(),
        };
        let binary = command.binary.unwrap_or_else(|| default_binary.to_owned());
        if binary.is_empty() {
            return Err("[command].binary must not be empty".to_owned());
        }
        if command.mcp_config_flag.as_deref() == Some("") {
            return Err("[command].mcp_config_flag must not be empty when set".to_owned());
        }
        rules::check_output_format(&output.format).map_err(|e| format!("[output].format {e}"))?;
        let path = output.path.filter(|p| !p.is_empty());
        if output.mode == OutputMode::File && path.is_none() {
            return Err("[output].path is required when [output].mode = \"file\"".to_owned());
        }

        for (i, pattern) in engine.workspace_ignore.iter().enumerate() {
            if pattern.trim().is_empty() || pattern.len() > 256 || pattern.contains(['\n', '\r']) {
                return Err(format!(
                    "[engine].workspace_ignore[{i}] must be one gitignore pattern of 1-256 characters"
                ));
            }
        }
        Ok(Engine {
            name: engine.name.unwrap_or_else(|| id.clone()),
            id,
            description: engine.description,
            kind: engine.kind,
            instructions_file: engine
                .instructions_file
                .unwrap_or_else(|| "AGENTS.md".to_owned()),
            workspace_ignore: engine.workspace_ignore,
            binary,
            prompt_flag: command.prompt_flag.unwrap_or_else(|| "-p".to_owned()),
            end_of_options: command.end_of_options,
            static_args: command.static_args,
            trailing_args: command.trailing_args,
            flags,
            list_join,
            values,
            mcp_config_flag: command.mcp_config_flag,
            output: Output {
                mode: output.mode,
                format: output.format,
                path,
                parser: output.parser,
            },
            auth_env: env.auth,
            llm: llm.map(LlmSection::into_access).transpose()?,
        })
    }
}

fn known_fields() -> String {
    let names: Vec<&str> = MappedField::ALL.iter().map(|f| f.as_str()).collect();
    format!("expected one of {}", names.join(", "))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EngineFile {
    #[serde(default)]
    engine: EngineSection,
    #[serde(default)]
    command: CommandSection,
    #[serde(default)]
    output: OutputSection,
    #[serde(default)]
    env: EnvSection,
    #[serde(default)]
    llm: Option<LlmSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LlmSection {
    providers: Vec<String>,
    env: BTreeMap<String, String>,
}

impl LlmSection {
    fn into_access(self) -> Result<LlmAccess, String> {
        if self.providers.is_empty() {
            return Err("[llm].providers must name at least one provider".to_owned());
        }
        for provider in &self.providers {
            rules::check_safe_id(provider).map_err(|e| format!("[llm].providers: {e}"))?;
        }
        for name in self.env.keys() {
            let valid = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!("[llm.env]: {name:?} is not a variable name"));
            }
        }
        if !self.env.values().any(|v| v.contains("{token}")) {
            return Err("[llm.env] must pass {token} in some variable".to_owned());
        }
        Ok(LlmAccess {
            providers: self.providers,
            env: self.env,
        })
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct EngineSection {
    id: Option<String>,
    name: Option<String>,
    description: String,
    kind: EngineKind,
    instructions_file: Option<String>,
    workspace_ignore: Vec<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct CommandSection {
    binary: Option<String>,
    prompt_flag: Option<String>,
    end_of_options: bool,
    static_args: Vec<String>,
    trailing_args: Vec<String>,
    mcp_config_flag: Option<String>,
    map: OrderedStrings,
    list_join: BTreeMap<String, String>,
    values: BTreeMap<String, BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct OutputSection {
    mode: OutputMode,
    format: String,
    path: Option<String>,
    parser: Parser,
}

impl Default for OutputSection {
    fn default() -> Self {
        Self {
            mode: OutputMode::Stdout,
            format: "json".to_owned(),
            path: None,
            parser: Parser::Text,
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct EnvSection {
    #[serde(alias = "required")]
    auth: Vec<String>,
}

/// A string table kept in file order (a map type would sort or hash the keys).
#[derive(Default)]
struct OrderedStrings(Vec<(String, String)>);

impl<'de> Deserialize<'de> for OrderedStrings {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OrderedVisitor;
        impl<'de> Visitor<'de> for OrderedVisitor {
            type Value = OrderedStrings;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, String>()? {
                    entries.push(entry);
                }
                Ok(OrderedStrings(entries))
            }
        }
        deserializer.deserialize_map(OrderedVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(prompt: &str) -> JobRequest {
        JobRequest::example("a-1", "e", prompt)
    }

    #[test]
    fn flags_follow_file_order_not_alphabetical() {
        let engine = Engine::parse(
            "x",
            r#"
            [command]
            prompt_flag = ""
            [command.map]
            system_prompt = "--sys"
            model = "--model"
            max_turns = "--turns"
            dry_run = "--dry"
            "#,
        )
        .unwrap();
        let mut req = request("hi");
        req.model = Some("m".to_owned());
        req.system_prompt = Some("s".to_owned());
        req.max_turns = Some(3);
        assert_eq!(
            engine.command_line(&req),
            ["x", "hi", "--sys", "s", "--model", "m", "--turns", "3"]
        );
        req.dry_run = true;
        assert_eq!(
            engine.command_line(&req).last().map(String::as_str),
            Some("--dry")
        );
    }

    #[test]
    fn end_of_options_puts_the_prompt_last_after_a_double_dash() {
        let engine = Engine::parse(
            "x",
            "[command]\nprompt_flag = \"-p\"\nend_of_options = true\n\
             trailing_args = [\"--safe\"]\n[command.map]\nmodel = \"--model\"\n",
        )
        .unwrap();
        // A prompt that looks like flags stays one operand: nothing after `--` is an option.
        let mut req = request("--model evil --unsafe");
        req.model = Some("m".to_owned());
        assert_eq!(
            engine.command_line(&req),
            [
                "x",
                "-p",
                "--model",
                "m",
                "--safe",
                "--",
                "--model evil --unsafe"
            ]
        );
        // Without it, the prompt stays where the flag puts it (for CLIs without `--`).
        let plain = Engine::parse("x", "").unwrap();
        assert!(!plain.end_of_options);
        assert_eq!(plain.command_line(&request("-v")), ["x", "-p", "-v"]);
    }

    #[test]
    fn defaults_follow_parpaing() {
        let engine = Engine::parse("tool", "").unwrap();
        assert_eq!(engine.id, "tool");
        assert_eq!(engine.name, "tool");
        assert_eq!(engine.binary, "tool");
        assert_eq!(engine.prompt_flag, "-p");
        assert_eq!(engine.kind, EngineKind::Cli);
        assert_eq!(engine.output.format, "json");
        assert_eq!(engine.command_line(&request("go")), ["tool", "-p", "go"]);
    }

    #[test]
    fn custom_list_separator() {
        let engine = Engine::parse(
            "x",
            "[command.map]\nallowed_tools = \"--tools\"\n[command.list_join]\nallowed_tools = \" \"\n",
        )
        .unwrap();
        let mut req = request("p");
        assert_eq!(
            engine.command_line(&req),
            ["x", "-p", "p"],
            "empty list adds nothing"
        );
        req.allowed_tools = vec!["Read".to_owned(), "Bash(git:*)".to_owned()];
        assert_eq!(
            engine.command_line(&req),
            ["x", "-p", "p", "--tools", "Read Bash(git:*)"]
        );
    }

    #[test]
    fn values_are_respelled_for_the_cli() {
        let engine = Engine::parse(
            "x",
            "[command.map]\noutput_format = \"--format\"\n\
             [command.values.output_format]\ntext = \"default\"\n",
        )
        .unwrap();
        let mut req = request("p");
        req.output_format = Some("text".to_owned());
        assert_eq!(
            engine.command_line(&req),
            ["x", "-p", "p", "--format", "default"]
        );
        req.output_format = Some("json".to_owned());
        assert_eq!(
            engine.command_line(&req),
            ["x", "-p", "p", "--format", "json"],
            "values without a spelling pass as they are"
        );
    }

    #[test]
    fn llm_access_fills_in_the_gateway_and_token() {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../engines/claude-code.toml"),
        )
        .unwrap();
        let engine = Engine::parse("claude-code", &text).unwrap();
        let llm = engine.llm.expect("claude-code calls the llm-gateway");
        assert_eq!(llm.providers, vec!["anthropic".to_owned()]);
        let env = llm.render_env("http://10.0.0.1:8421/", "flj_abc");
        assert!(env.contains(&(
            "ANTHROPIC_BASE_URL".to_owned(),
            "http://10.0.0.1:8421/anthropic".to_owned()
        )));
        assert!(env.contains(&("ANTHROPIC_API_KEY".to_owned(), "flj_abc".to_owned())));
        assert!(Engine::parse("tool", "").unwrap().llm.is_none());

        // Gemini: the SDK appends /v1beta/... to the base URL, which names the google provider.
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../engines/gemini.toml"),
        )
        .unwrap();
        let llm = Engine::parse("gemini", &text).unwrap().llm.unwrap();
        assert_eq!(llm.providers, vec!["google".to_owned()]);
        assert_eq!(
            llm.render_env("http://10.0.0.1:8421", "flj_abc"),
            vec![
                ("GEMINI_API_KEY".to_owned(), "flj_abc".to_owned()),
                (
                    "GOOGLE_GEMINI_BASE_URL".to_owned(),
                    "http://10.0.0.1:8421/google".to_owned()
                ),
            ]
        );
    }

    #[test]
    fn bad_engine_files() {
        let cases = [
            ("[engine]\ncolour = \"red\"\n", "unknown field `colour`"),
            (
                "[command.map]\nprompt_text = \"-x\"\n",
                "unknown field \"prompt_text\"",
            ),
            ("[command.list_join]\nmodel = \",\"\n", "not a list field"),
            (
                "[command.values.model]\na = \"b\"\n",
                "model has no flag in [command.map]",
            ),
            (
                "[command.values.colour]\na = \"b\"\n",
                "[command.values]: unknown field \"colour\"",
            ),
            (
                "[command.map]\nmodel = \"-m\"\n[command.values.model]\na = \"\"\n",
                "[command.values].model.a must not be empty",
            ),
            ("[engine]\nkind = \"python\"\n", "unknown variant `python`"),
            ("[engine]\nid = \"a b\"\n", "engine id must match"),
            ("[output]\nmode = \"file\"\n", "[output].path is required"),
            (
                "[output]\nformat = \"xml\"\n",
                "[output].format must be one of",
            ),
            ("[command]\nbinary = \"\"\n", "binary must not be empty"),
            (
                "[llm]\nproviders = []\n[llm.env]\nK = \"{token}\"\n",
                "at least one provider",
            ),
            (
                "[llm]\nproviders = [\"a\"]\n[llm.env]\n\"X;rm\" = \"{token}\"\n",
                "is not a variable name",
            ),
            (
                "[llm]\nproviders = [\"a\"]\n[llm.env]\nURL = \"{gateway}\"\n",
                "must pass {token}",
            ),
        ];
        for (text, want) in cases {
            let err = Engine::parse("x", text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
