//! Profiles: named defaults for a job (engine, model, tools, limits) plus the templates that turn
//! typed variables into a prompt and an agent-instructions file.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use serde::Deserialize;
use serde_json::{Value, json};

use flotilla_proto::Priority;

use crate::rules;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VarType {
    #[default]
    String,
    Integer,
    /// Accepts integers too.
    Float,
    Boolean,
}

impl VarType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::String => "string",
            Self::Integer => "integer",
            Self::Float => "float",
            Self::Boolean => "boolean",
        }
    }

    fn matches(self, value: &Value) -> bool {
        match self {
            Self::String => value.is_string(),
            Self::Integer => value.is_i64() || value.is_u64(),
            Self::Float => value.is_number(),
            Self::Boolean => value.is_boolean(),
        }
    }
}

/// A typed template variable (`[prompt.variables.<name>]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variable {
    #[serde(rename = "type", default)]
    pub var_type: VarType,
    #[serde(default)]
    pub default: Option<Value>,
    #[serde(default)]
    pub required: bool,
    #[serde(rename = "enum", default)]
    pub enum_values: Option<Vec<Value>>,
    #[serde(default)]
    pub description: String,
}

impl Variable {
    /// Why `value` is not acceptable for this variable, if it is not.
    pub(crate) fn check(&self, value: &Value) -> Result<(), String> {
        if !self.var_type.matches(value) {
            return Err(format!("must be of type {}", self.var_type.as_str()));
        }
        match &self.enum_values {
            Some(allowed) if !allowed.iter().any(|a| same_value(a, value)) => {
                Err(format!("must be one of {}", Value::Array(allowed.clone())))
            }
            _ => Ok(()),
        }
    }
}

/// JSON equality, except that numbers compare by value (an enum of 1.0 accepts 1).
fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// Shell snippets run before and after the engine (run by the agent-node, not here).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hooks {
    #[serde(default)]
    pub pre: Option<String>,
    #[serde(default)]
    pub post: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub name: String,
    pub description: String,
    pub engine: Option<String>,
    pub model: Option<String>,
    pub max_turns: Option<u32>,
    pub max_budget_usd: Option<f64>,
    /// Retries of a job whose engine fails (`[agent].retries`, 0-5).
    pub retries: Option<u32>,
    /// Models the job may ask the llm-gateway for (exact, or a prefix ending in `*`); empty
    /// allows any.
    pub allowed_models: Vec<String>,
    /// Provider-side tools (`web_search`, `web_fetch`, `mcp`, ...) and beta flags the
    /// llm-gateway lets this profile's jobs use; empty allows none.
    pub allowed_provider_tools: Vec<String>,
    pub output_format: Option<String>,
    pub allowed_tools: Vec<String>,
    /// Template source (inline, or read from `template_file` at load).
    pub prompt_template: Option<String>,
    pub prompt_vars: BTreeMap<String, Variable>,
    pub claude_md_template: Option<String>,
    pub claude_md_vars: BTreeMap<String, Variable>,
    pub timeout_seconds: Option<u64>,
    pub memory_bytes: Option<i64>,
    pub cpus: Option<f64>,
    pub plugins: Vec<String>,
    pub hooks: Hooks,
    /// The `workspace` a job gets when it names none.
    pub workspace: Option<flotilla_proto::WorkspaceRequest>,
    /// The priority a job gets when it names none (`[agent].priority`).
    pub priority: Option<Priority>,
    /// Node labels every job of the profile needs; a job's own `requires` wins per key.
    pub requires: BTreeMap<String, String>,
    /// The image a job runs in when it names none. Only its shape is checked at load: the
    /// operator's allow-list is applied when a job uses it.
    pub image: Option<String>,
    /// The Docker runtime a job runs under when it names none.
    pub runtime: Option<String>,
}

impl Profile {
    /// The `GET /profiles` entry for this profile.
    pub fn summary(&self) -> Value {
        let vars: serde_json::Map<String, Value> = self
            .prompt_vars
            .iter()
            .map(|(name, var)| {
                let entry = json!({
                    "type": var.var_type.as_str(),
                    "default": var.default,
                    "required": var.required,
                    "enum": var.enum_values,
                    "description": var.description,
                });
                (name.clone(), entry)
            })
            .collect();
        json!({
            "name": self.name,
            "description": self.description,
            "model": self.model,
            "engine": self.engine,
            "prompt_vars": vars,
        })
    }

    /// Builds a profile from the text of `<name>.toml`; templates named by `template_file` are
    /// read relative to `dir`. Errors say what is wrong, without the file name.
    pub(crate) fn parse(name: &str, text: &str, dir: &Path) -> Result<Profile, String> {
        rules::check_safe_id(name).map_err(|e| format!("profile name (the file stem) {e}"))?;
        let file: ProfileFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let ProfileFile {
            agent,
            tools,
            prompt,
            claude_md,
            resources,
            plugins,
            hooks,
            workspace,
        } = file;

        if let Some(model) = &agent.model {
            rules::check_model(model).map_err(|e| format!("[agent].model {e}"))?;
        }
        let max_turns = agent
            .max_turns
            .map(|n| rules::check_max_turns(n).map_err(|e| format!("[agent].max_turns {e}")))
            .transpose()?;
        if let Some(usd) = agent.max_budget_usd {
            rules::check_budget(usd).map_err(|e| format!("[agent].max_budget_usd {e}"))?;
        }
        let retries = agent
            .retries
            .map(|n| rules::check_retries(n).map_err(|e| format!("[agent].retries {e}")))
            .transpose()?;
        if let Some(format) = &agent.output_format {
            rules::check_output_format(format).map_err(|e| format!("[agent].output_format {e}"))?;
        }
        for (i, pattern) in agent.allowed_models.iter().enumerate() {
            rules::check_model(pattern.trim_end_matches('*'))
                .map_err(|e| format!("[agent].allowed_models[{i}] {e}"))?;
        }
        if let Some(model) = &agent.model
            && !flotilla_proto::llm::model_allowed(&agent.allowed_models, model)
        {
            return Err(format!(
                "[agent].model {model:?} is not in [agent].allowed_models"
            ));
        }
        check_provider_tools(&agent.allowed_provider_tools)?;
        let priority = agent
            .priority
            .as_deref()
            .map(|p| rules::check_priority(p).map_err(|e| format!("[agent].priority {e}")))
            .transpose()?;
        check_placement(&agent)?;
        if tools.allowed.len() > rules::MAX_TOOLS {
            return Err(format!(
                "[tools].allowed has more than {} items",
                rules::MAX_TOOLS
            ));
        }
        for (i, tool) in tools.allowed.iter().enumerate() {
            rules::check_tool(tool).map_err(|e| format!("[tools].allowed[{i}] {e}"))?;
        }
        for (i, plugin) in plugins.enabled.iter().enumerate() {
            rules::check_safe_id(plugin).map_err(|e| format!("[plugins].enabled[{i}] {e}"))?;
        }
        let timeout_seconds = resources
            .timeout
            .map(|s| rules::check_timeout(s).map_err(|e| format!("[resources].timeout {e}")))
            .transpose()?;
        let memory_bytes = match &resources.memory {
            Some(text) => {
                let bytes =
                    rules::parse_memory(text).map_err(|e| format!("[resources].memory: {e}"))?;
                if bytes < rules::MIN_MEMORY_BYTES {
                    return Err("[resources].memory must be at least 6m".to_owned());
                }
                Some(bytes)
            }
            None => None,
        };
        if let Some(cpus) = resources.cpus {
            rules::check_cpus(cpus).map_err(|e| format!("[resources].cpus {e}"))?;
        }

        let (prompt_template, prompt_vars) = prompt.load("prompt", dir)?;
        let (claude_md_template, claude_md_vars) = claude_md.load("claude_md", dir)?;

        Ok(Profile {
            name: name.to_owned(),
            description: agent.description,
            engine: agent.engine,
            model: agent.model,
            max_turns,
            max_budget_usd: agent.max_budget_usd,
            retries,
            allowed_models: agent.allowed_models,
            allowed_provider_tools: agent.allowed_provider_tools,
            output_format: agent.output_format,
            allowed_tools: tools.allowed,
            prompt_template,
            prompt_vars,
            claude_md_template,
            claude_md_vars,
            timeout_seconds,
            memory_bytes,
            cpus: resources.cpus,
            plugins: plugins.enabled,
            hooks,
            workspace,
            priority,
            requires: agent.requires,
            image: agent.image,
            runtime: agent.runtime,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    #[serde(default)]
    agent: AgentSection,
    #[serde(default)]
    tools: ToolsSection,
    #[serde(default)]
    prompt: TemplateSection,
    #[serde(default)]
    claude_md: TemplateSection,
    #[serde(default)]
    resources: ResourcesSection,
    #[serde(default)]
    plugins: PluginsSection,
    #[serde(default)]
    hooks: Hooks,
    /// `[workspace.git]`: the repository every job of the profile starts from, unless the
    /// job names its own (checked against the allow-list when a job uses it).
    #[serde(default)]
    workspace: Option<flotilla_proto::WorkspaceRequest>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct AgentSection {
    /// Informational in Parpaing (the file stem is the name); accepted so its files load.
    #[serde(rename = "id")]
    _id: Option<String>,
    description: String,
    engine: Option<String>,
    model: Option<String>,
    max_turns: Option<i64>,
    max_budget_usd: Option<f64>,
    retries: Option<i64>,
    allowed_models: Vec<String>,
    allowed_provider_tools: Vec<String>,
    output_format: Option<String>,
    priority: Option<String>,
    requires: BTreeMap<String, String>,
    image: Option<String>,
    runtime: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ToolsSection {
    allowed: Vec<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct PluginsSection {
    enabled: Vec<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ResourcesSection {
    timeout: Option<i64>,
    memory: Option<String>,
    cpus: Option<f64>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct TemplateSection {
    template: Option<String>,
    template_file: Option<String>,
    variables: BTreeMap<String, Variable>,
}

type Loaded = (Option<String>, BTreeMap<String, Variable>);

impl TemplateSection {
    /// Resolves the template source, checks its syntax and the variables' defaults.
    fn load(self, section: &str, dir: &Path) -> Result<Loaded, String> {
        let source = match (self.template, self.template_file) {
            (Some(_), Some(_)) => {
                return Err(format!(
                    "[{section}]: set template or template_file, not both"
                ));
            }
            (Some(inline), None) => Some(inline),
            (None, Some(rel)) => Some(read_template_file(&rel, dir, section)?),
            (None, None) => None,
        };
        if let Some(source) = &source {
            minijinja::Environment::new()
                .template_from_str(source)
                .map_err(|e| format!("[{section}] template: {e}"))?;
        }
        for (name, var) in &self.variables {
            let at = format!("[{section}.variables.{name}]");
            rules::check_safe_id(name).map_err(|e| format!("{at}: the name {e}"))?;
            for allowed in var.enum_values.iter().flatten() {
                if !var.var_type.matches(allowed) {
                    return Err(format!(
                        "{at}: enum value {allowed} is not a {}",
                        var.var_type.as_str()
                    ));
                }
            }
            if let Some(default) = &var.default {
                var.check(default)
                    .map_err(|e| format!("{at}: the default {e}"))?;
            }
        }
        Ok((source, self.variables))
    }
}

/// Where the profile's jobs may run: `[agent].requires`, `image` and `runtime`.
fn check_placement(agent: &AgentSection) -> Result<(), String> {
    rules::check_requires(&agent.requires)
        .map_err(|(key, e)| format!("{} {e}", rules::requires_field("[agent].requires", key)))?;
    if let Some(image) = &agent.image {
        rules::check_image(image).map_err(|e| format!("[agent].image {e}"))?;
    }
    if let Some(runtime) = &agent.runtime {
        rules::check_label(runtime).map_err(|e| format!("[agent].runtime {e}"))?;
    }
    Ok(())
}

/// `[agent].allowed_provider_tools`: names, as the llm-gateway compares them.
fn check_provider_tools(names: &[String]) -> Result<(), String> {
    if names.len() > rules::MAX_TOOLS {
        return Err(format!(
            "[agent].allowed_provider_tools has more than {} items",
            rules::MAX_TOOLS
        ));
    }
    for (i, name) in names.iter().enumerate() {
        rules::check_safe_id(name)
            .map_err(|e| format!("[agent].allowed_provider_tools[{i}] {e}"))?;
    }
    Ok(())
}

fn read_template_file(rel: &str, dir: &Path, section: &str) -> Result<String, String> {
    let path = Path::new(rel);
    // Profiles may only read templates from inside their own directory.
    let inside = !rel.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)));
    if !inside {
        return Err(format!(
            "[{section}].template_file {rel:?} must be a relative path without \"..\""
        ));
    }
    std::fs::read_to_string(dir.join(path))
        .map_err(|e| format!("[{section}].template_file {rel:?} cannot be read: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Profile, String> {
        Profile::parse("p", text, Path::new("/nonexistent"))
    }

    #[test]
    fn variable_types() {
        let var = |t| Variable {
            var_type: t,
            default: None,
            required: false,
            enum_values: None,
            description: String::new(),
        };
        assert!(var(VarType::Integer).check(&json!(3)).is_ok());
        assert!(var(VarType::Integer).check(&json!(3.5)).is_err());
        assert!(
            var(VarType::Integer).check(&json!(true)).is_err(),
            "bools are not integers"
        );
        assert!(
            var(VarType::Float).check(&json!(3)).is_ok(),
            "floats accept integers"
        );
        assert!(var(VarType::Float).check(&json!("3")).is_err());
        assert!(var(VarType::Boolean).check(&json!(false)).is_ok());
        assert!(var(VarType::String).check(&json!(1)).is_err());
    }

    #[test]
    fn hooks_are_kept() {
        let profile = parse("[hooks]\npre = \"echo pre\"\npost = \"echo post\"\n").unwrap();
        assert_eq!(profile.hooks.pre.as_deref(), Some("echo pre"));
        assert_eq!(profile.hooks.post.as_deref(), Some("echo post"));
    }

    #[test]
    fn bad_profiles() {
        let cases = [
            ("[agent]\ncolour = 1\n", "unknown field `colour`"),
            (
                "[tools]\nallowed = [\"\"]\n",
                "[tools].allowed[0] must not be empty",
            ),
            (
                "[agent]\nmax_turns = 0\n",
                "[agent].max_turns must be between 1 and 100",
            ),
            ("[agent]\nmax_budget_usd = 60.0\n", "[agent].max_budget_usd"),
            ("[agent]\nmodel = \"a b\"\n", "[agent].model must match"),
            (
                "[agent]\noutput_format = \"xml\"\n",
                "[agent].output_format",
            ),
            ("[resources]\nmemory = \"lots\"\n", "[resources].memory"),
            ("[resources]\nmemory = \"1m\"\n", "at least 6m"),
            ("[resources]\ntimeout = 100000\n", "[resources].timeout"),
            ("[resources]\ncpus = 0\n", "[resources].cpus"),
            ("[plugins]\nenabled = [\"a/b\"]\n", "[plugins].enabled[0]"),
            (
                "[prompt]\ntemplate = \"{{ oops\"\n",
                "[prompt] template: syntax error",
            ),
            (
                "[prompt]\ntemplate = \"a\"\ntemplate_file = \"b\"\n",
                "not both",
            ),
            (
                "[prompt]\ntemplate_file = \"../secret\"\n",
                "without \"..\"",
            ),
            (
                "[prompt]\ntemplate_file = \"/etc/passwd\"\n",
                "without \"..\"",
            ),
            (
                "[prompt]\ntemplate_file = \"missing.j2\"\n",
                "cannot be read",
            ),
            (
                "[prompt.variables.n]\ntype = \"integer\"\ndefault = \"x\"\n",
                "default must be of type integer",
            ),
            (
                "[prompt.variables.f]\nenum = [\"a\", \"b\"]\ndefault = \"c\"\n",
                "default must be one of [\"a\",\"b\"]",
            ),
            (
                "[prompt.variables.f]\ntype = \"boolean\"\nenum = [1]\n",
                "enum value 1 is not a boolean",
            ),
            (
                "[prompt.variables.f]\ntype = \"date\"\n",
                "unknown variant `date`",
            ),
            ("[prompt.variables.\"a b\"]\n", "the name must match"),
            (
                "[claude_md]\ntemplate = \"{% if %}\"\n",
                "[claude_md] template",
            ),
            ("[hooks]\nduring = \"x\"\n", "unknown field `during`"),
            (
                "[agent]\nallowed_provider_tools = [\"web search\"]\n",
                "[agent].allowed_provider_tools[0] must match",
            ),
            (
                "[agent]\npriority = \"urgent\"\n",
                "[agent].priority must be high, normal or low",
            ),
            (
                "[agent.requires]\n\"a b\" = \"x\"\n",
                "[agent].requires keys must match",
            ),
            (
                "[agent.requires]\ngpu = \"a100 x\"\n",
                "[agent].requires.gpu must match",
            ),
            ("[agent.requires]\ngpu = 1\n", "invalid type"),
            (
                "[agent]\nimage = \"--privileged\"\n",
                "[agent].image must be a Docker image reference",
            ),
            (
                "[agent]\nimage = \"a b\"\n",
                "[agent].image must not contain whitespace",
            ),
            (
                "[agent]\nruntime = \"run/sc\"\n",
                "[agent].runtime must match",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn placement_is_read_from_the_agent_table() {
        let profile = parse(
            "[agent]\npriority = \"low\"\nimage = \"ghcr.io/acme/x:1\"\nruntime = \"runsc\"\n\
             [agent.requires]\ngpu = \"a100\"\n",
        )
        .unwrap();
        assert_eq!(profile.priority, Some(Priority::Low));
        assert_eq!(profile.image.as_deref(), Some("ghcr.io/acme/x:1"));
        assert_eq!(profile.runtime.as_deref(), Some("runsc"));
        assert_eq!(profile.requires["gpu"], "a100");
        let plain = parse("").unwrap();
        assert_eq!(
            (plain.priority, plain.image, plain.runtime),
            (None, None, None)
        );
        assert!(plain.requires.is_empty());
    }

    #[test]
    fn a_profile_may_not_require_too_many_labels() {
        let labels: String = (0..17).map(|i| format!("k{i} = \"v\"\n")).collect();
        let err = parse(&format!("[agent.requires]\n{labels}")).unwrap_err();
        assert!(
            err.contains("[agent].requires must have at most 16 keys"),
            "{err}"
        );
    }

    #[test]
    fn summary_shape() {
        let profile = parse(
            "[agent]\ndescription = \"d\"\nmodel = \"m\"\n\
             [prompt.variables.focus]\nenum = [\"all\", \"style\"]\ndefault = \"all\"\ndescription = \"f\"\n",
        )
        .unwrap();
        assert_eq!(
            profile.summary(),
            json!({
                "name": "p", "description": "d", "model": "m", "engine": null,
                "prompt_vars": {"focus": {
                    "type": "string", "default": "all", "required": false,
                    "enum": ["all", "style"], "description": "f"
                }}
            })
        );
    }
}
