//! What a job may ask a provider for. The gateway forwards with the account's real key, so a
//! job must not reach what the account holds (files, batches, fine-tunes, stored responses)
//! nor anything it could not meter or check: only the APIs that call a model, count tokens or
//! list models pass, with a body the gateway can read and, for a model call, a model it can
//! check. Tools that run at the provider (web search and fetch, MCP connectors, code
//! execution) reach the internet on the job's behalf, and beta flags switch such features
//! on: both pass only when the job's profile names them (`[agent].allowed_provider_tools`,
//! carried on the grant), beside a few built-in harmless flags and the gateway config's
//! `allowed_betas`.

use axum::http::{HeaderMap, Method};
use flotilla_proto::LlmGrant;
use serde_json::Value;
use url::Url;

use crate::config::{Provider, ProviderKind};

/// Beta flags any job may send: the ones coding CLIs send on every call, which change how the
/// model answers and nothing it can reach.
const HARMLESS_BETAS: &[&str] = &[
    "claude-code-20250219",
    "oauth-2025-04-20",
    "interleaved-thinking-2025-05-14",
    "fine-grained-tool-streaming-2025-05-14",
    "token-efficient-tools-2025-02-19",
    "output-128k-2025-02-19",
    "prompt-caching-2024-07-31",
    "extended-cache-ttl-2025-04-11",
    "context-management-2025-06-27",
    // `OpenAI-Beta` of the Codex CLI's Responses calls.
    "responses=experimental",
];

/// Beta flags that turn on a provider-side tool, by flag prefix: a profile naming the tool
/// allows its flag too, so `web_fetch` is enough for `web-fetch-2025-09-10`.
const TOOL_BETAS: &[(&str, &str)] = &[
    ("web-fetch-", "web_fetch"),
    ("web-search-", "web_search"),
    ("mcp-client-", "mcp"),
    ("code-execution-", "code_execution"),
];

/// Tool types of the OpenAI APIs that the client runs (so, inside the job's container).
const OPENAI_CLIENT_TOOLS: &[&str] = &["function", "custom", "local_shell", "shell", "apply_patch"];

/// Anthropic tool types the client runs, named without their date (`bash_20250124`).
const ANTHROPIC_CLIENT_TOOLS: &[&str] = &["bash", "text_editor", "computer", "memory"];

/// Gemini methods of `models/<model>:<method>` that call a model or count its tokens.
const GEMINI_METHODS: &[&str] = &["generateContent", "streamGenerateContent", "countTokens"];

/// An API the gateway forwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `GET` of the model listing, or of one model: no body, no model, no cost.
    Listing,
    /// Anthropic `messages` or `messages/count_tokens`.
    Messages,
    /// OpenAI Chat Completions.
    ChatCompletions,
    /// OpenAI Responses.
    Responses,
    /// Gemini `models/<model>:<method>`: the model is the one in the path.
    Gemini { model: String },
}

/// Why a request does not pass: [`PolicyError::forbidden`] ones are 403, the rest 400.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PolicyError {
    #[error("{method} {path} is not an API the llm-gateway forwards (it forwards only {allowed})")]
    Endpoint {
        method: Method,
        path: String,
        allowed: &'static str,
    },
    #[error("{0:?} is not a model name")]
    ModelName(String),
    #[error("the request body is not a JSON object: {0}")]
    Body(String),
    #[error("a model listing takes no request body")]
    ListingBody,
    #[error("the request names no model: a model call must set \"model\" to a model name")]
    NoModel,
    #[error(
        "provider-side tool {tool:?} is not allowed for profile {profile}: it runs at the \
         provider, which may reach the internet or the account's data; a profile allows it \
         by naming it in [agent].allowed_provider_tools"
    )]
    Tool { tool: String, profile: String },
    #[error(
        "{header} {flag:?} is not allowed for profile {profile}: a profile allows a beta flag \
         by naming it (or the tool it enables) in [agent].allowed_provider_tools, and the \
         llm-gateway's config allows it for every job in allowed_betas"
    )]
    Beta {
        header: &'static str,
        flag: String,
        profile: String,
    },
}

impl PolicyError {
    /// True for what the job may not do (403), false for a request that is malformed (400).
    pub(crate) fn forbidden(&self) -> bool {
        matches!(
            self,
            Self::Endpoint { .. } | Self::Tool { .. } | Self::Beta { .. }
        )
    }
}

/// The API `method` `url` calls, if the gateway forwards it. `url` is the upstream URL, where
/// dot-segments are already resolved (so `messages/../files` is `files`); `path` is what the
/// job asked for, for the error. A segment is compared as it is, escapes and all: `%6Dessages`
/// is not `messages`, and no API has an empty segment.
pub(crate) fn endpoint(
    provider: &Provider,
    method: &Method,
    path: &str,
    url: &Url,
) -> Result<Endpoint, PolicyError> {
    let kind = provider.kind;
    let refused = || PolicyError::Endpoint {
        method: method.clone(),
        path: path.to_owned(),
        allowed: allowed_apis(kind),
    };
    let base: Vec<&str> = provider
        .base_url
        .path_segments()
        .map(|s| s.filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    let full: Vec<&str> = url
        .path_segments()
        .map(Iterator::collect)
        .unwrap_or_default();
    let rest = full.strip_prefix(base.as_slice()).ok_or_else(refused)?;
    // The version is optional: an OpenAI-compatible base URL often ends in it already.
    let versions: &[&str] = match kind {
        ProviderKind::Google => &["v1beta", "v1"],
        _ => &["v1"],
    };
    let rest = match rest {
        [version, rest @ ..] if versions.contains(version) => rest,
        _ => rest,
    };
    let get = *method == Method::GET;
    let post = *method == Method::POST;
    match (kind, rest) {
        (_, ["models"]) if get => Ok(Endpoint::Listing),
        (_, ["models", name]) if get && is_model_name(name) => Ok(Endpoint::Listing),
        (ProviderKind::Anthropic, ["messages"] | ["messages", "count_tokens"]) if post => {
            Ok(Endpoint::Messages)
        }
        (ProviderKind::Openai, ["chat", "completions"]) if post => Ok(Endpoint::ChatCompletions),
        (ProviderKind::Openai, ["responses"]) if post => Ok(Endpoint::Responses),
        (ProviderKind::Google, ["models", call]) if post => match call.split_once(':') {
            Some((model, method)) if GEMINI_METHODS.contains(&method) => {
                if !is_model_name(model) {
                    return Err(PolicyError::ModelName(model.to_owned()));
                }
                Ok(Endpoint::Gemini {
                    model: model.to_owned(),
                })
            }
            _ => Err(refused()),
        },
        _ => Err(refused()),
    }
}

fn allowed_apis(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::Anthropic => {
            "POST v1/messages, POST v1/messages/count_tokens and GET v1/models"
        }
        ProviderKind::Openai => "POST v1/chat/completions, POST v1/responses and GET v1/models",
        ProviderKind::Google => {
            "POST v1beta/models/<model>:generateContent, :streamGenerateContent or \
             :countTokens, and GET v1beta/models"
        }
    }
}

/// A model name as it may stand in a path: `[A-Za-z0-9._-]+`. Anything else (a `%` escape
/// the upstream would decode into another path, say) is refused rather than guessed at.
fn is_model_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The request's body as JSON: an object for a model call, nothing for a listing. A body the
/// gateway cannot read (not JSON, or nested beyond the parser's limit) is refused, since its
/// model and tools could not be checked.
pub(crate) fn parse_body(endpoint: &Endpoint, body: &[u8]) -> Result<Option<Value>, PolicyError> {
    if *endpoint == Endpoint::Listing {
        return match body.is_empty() {
            true => Ok(None),
            false => Err(PolicyError::ListingBody),
        };
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(json @ Value::Object(_)) => Ok(Some(json)),
        Ok(_) => Err(PolicyError::Body("it is not an object".to_owned())),
        Err(e) => Err(PolicyError::Body(e.to_string())),
    }
}

/// The model a model call asks for: Gemini's from the path, else the body's `model`, which a
/// model call must name. A listing names none.
pub(crate) fn requested_model(
    endpoint: &Endpoint,
    json: Option<&Value>,
) -> Result<Option<String>, PolicyError> {
    match endpoint {
        Endpoint::Listing => Ok(None),
        Endpoint::Gemini { model } => Ok(Some(model.clone())),
        _ => json
            .and_then(|v| v["model"].as_str())
            .filter(|m| !m.is_empty())
            .map(|m| Some(m.to_owned()))
            .ok_or(PolicyError::NoModel),
    }
}

/// Refuses a provider-side tool the job's profile does not name.
pub(crate) fn check_tools(
    endpoint: &Endpoint,
    json: Option<&Value>,
    grant: &LlmGrant,
) -> Result<(), PolicyError> {
    let Some(body) = json else {
        return Ok(());
    };
    match provider_tools(endpoint, body)
        .into_iter()
        .find(|tool| !grant.allowed_provider_tools.contains(tool))
    {
        Some(tool) => Err(PolicyError::Tool {
            tool,
            profile: grant.profile.clone(),
        }),
        None => Ok(()),
    }
}

/// The tools a model call asks the provider to run, by the names profiles use.
fn provider_tools(endpoint: &Endpoint, body: &Value) -> Vec<String> {
    let tools = body["tools"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut names: Vec<String> = match endpoint {
        Endpoint::Listing => Vec::new(),
        Endpoint::Messages => tools.iter().filter_map(anthropic_tool).collect(),
        Endpoint::ChatCompletions | Endpoint::Responses => {
            tools.iter().filter_map(openai_tool).collect()
        }
        Endpoint::Gemini { .. } => tools.iter().flat_map(gemini_tools).collect(),
    };
    let present = |field: &str| {
        !matches!(&body[field], Value::Null) && body[field].as_array().is_none_or(|a| !a.is_empty())
    };
    // Anthropic's MCP connector: servers the provider calls.
    if *endpoint == Endpoint::Messages && present("mcp_servers") {
        names.push("mcp".to_owned());
    }
    // Chat Completions' search models search the web when given these options.
    if *endpoint == Endpoint::ChatCompletions && present("web_search_options") {
        names.push("web_search".to_owned());
    }
    names
}

/// An Anthropic tool the provider runs: a typed tool that is not one of the client's
/// (`bash_20250124`, ...). Custom tools have no type, or `custom`.
fn anthropic_tool(tool: &Value) -> Option<String> {
    let kind = match &tool["type"] {
        Value::Null => return None,
        Value::String(kind) => kind.as_str(),
        other => return Some(other.to_string()),
    };
    let name = without_date(kind);
    let client = kind == "custom" || (name != kind && ANTHROPIC_CLIENT_TOOLS.contains(&name));
    (!client).then(|| canonical(name))
}

/// An OpenAI tool the provider runs (`web_search_preview`, `mcp`, `file_search`, ...).
fn openai_tool(tool: &Value) -> Option<String> {
    match &tool["type"] {
        Value::String(kind) if OPENAI_CLIENT_TOOLS.contains(&kind.as_str()) => None,
        Value::String(kind) => Some(canonical(without_date(kind))),
        other => Some(other.to_string()),
    }
}

/// The Gemini tools of one `tools[]` entry: every field but `functionDeclarations` is one the
/// provider runs (`googleSearch`, `urlContext`, `codeExecution`, ...). Proto JSON accepts
/// both spellings of a field, so names are compared in snake case (`google_search`).
fn gemini_tools(tool: &Value) -> Vec<String> {
    let Some(fields) = tool.as_object() else {
        return vec![tool.to_string()];
    };
    fields
        .keys()
        .map(|key| snake_case(key))
        .filter(|name| name != "function_declarations")
        .collect()
}

/// One name per tool family: all of web search's versions and previews are `web_search`,
/// and Anthropic's MCP toolset is `mcp`, like OpenAI's.
fn canonical(name: &str) -> String {
    if name.starts_with("web_search") {
        "web_search".to_owned()
    } else if name == "mcp_toolset" {
        "mcp".to_owned()
    } else {
        name.to_owned()
    }
}

/// `web_search_20250305` → `web_search`, `web_search_preview_2025_03_11` → `web_search_preview`.
fn without_date(name: &str) -> &str {
    let mut name = name;
    while let Some((head, tail)) = name.rsplit_once('_')
        && !tail.is_empty()
        && tail.bytes().all(|b| b.is_ascii_digit())
    {
        name = head;
    }
    name
}

fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Refuses a beta flag (`anthropic-beta`, `openai-beta`, comma-separated) that is neither
/// harmless, nor in the gateway config's `allowed_betas`, nor named by the job's profile
/// (itself or through the tool it turns on).
pub(crate) fn check_betas(
    headers: &HeaderMap,
    config_allowed: &[String],
    grant: &LlmGrant,
) -> Result<(), PolicyError> {
    for header in ["anthropic-beta", "openai-beta"] {
        for value in headers.get_all(header) {
            let refused = |flag: &str| PolicyError::Beta {
                header,
                flag: flag.to_owned(),
                profile: grant.profile.clone(),
            };
            let text = value
                .to_str()
                .map_err(|_| refused(&String::from_utf8_lossy(value.as_bytes())))?;
            for flag in text.split(',').map(str::trim).filter(|f| !f.is_empty()) {
                if !beta_allowed(flag, config_allowed, &grant.allowed_provider_tools) {
                    return Err(refused(flag));
                }
            }
        }
    }
    Ok(())
}

fn beta_allowed(flag: &str, config_allowed: &[String], named: &[String]) -> bool {
    let tool = TOOL_BETAS
        .iter()
        .find(|(prefix, _)| flag.starts_with(prefix))
        .map(|(_, tool)| *tool);
    HARMLESS_BETAS.contains(&flag)
        || config_allowed.iter().any(|b| b == flag)
        || named.iter().any(|n| n == flag || Some(n.as_str()) == tool)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn provider(kind: ProviderKind, base: &str) -> Provider {
        Provider {
            kind,
            base_url: Url::parse(base).unwrap(),
            api_key: None,
            oauth_token: None,
            credential_source: None,
        }
    }

    /// The endpoint of `method` `path` as the proxy builds its upstream URL.
    fn classify(
        kind: ProviderKind,
        base: &str,
        method: Method,
        path: &str,
    ) -> Result<Endpoint, String> {
        let provider = provider(kind, base);
        let mut url = provider.base_url.clone();
        let base_path = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{base_path}/{path}"));
        endpoint(&provider, &method, path, &url).map_err(|e| match e.forbidden() {
            true => "403".to_owned(),
            false => e.to_string(),
        })
    }

    #[test]
    fn only_model_calls_and_listings_pass() {
        use ProviderKind::*;
        let anthropic = "https://api.anthropic.com";
        let ok = |kind, base, method, path| classify(kind, base, method, path);
        assert_eq!(
            ok(Anthropic, anthropic, Method::POST, "v1/messages"),
            Ok(Endpoint::Messages)
        );
        assert_eq!(
            ok(
                Anthropic,
                anthropic,
                Method::POST,
                "v1/messages/count_tokens"
            ),
            Ok(Endpoint::Messages)
        );
        assert_eq!(
            ok(Anthropic, anthropic, Method::GET, "v1/models"),
            Ok(Endpoint::Listing)
        );
        assert_eq!(
            ok(
                Anthropic,
                anthropic,
                Method::GET,
                "v1/models/claude-sonnet-4-5"
            ),
            Ok(Endpoint::Listing)
        );
        // Dot-segments are resolved first: this is a call to the files API.
        assert_eq!(
            ok(Anthropic, anthropic, Method::POST, "v1/messages/../files"),
            Err("403".to_owned())
        );
        for path in [
            "v1//messages",
            "v1/%6Dessages",
            "v1/messages/",
            "v1/messages/batches",
        ] {
            assert_eq!(
                ok(Anthropic, anthropic, Method::POST, path),
                Err("403".to_owned()),
                "{path}"
            );
        }
        // An OpenAI-compatible server whose base URL holds the version, and one whose does not.
        let vllm = "http://10.0.0.5:8000/v1/";
        assert_eq!(
            ok(Openai, vllm, Method::POST, "chat/completions"),
            Ok(Endpoint::ChatCompletions)
        );
        assert_eq!(
            ok(Openai, vllm, Method::GET, "models"),
            Ok(Endpoint::Listing)
        );
        // `..` cannot climb out of the base path.
        assert_eq!(
            ok(Openai, vllm, Method::POST, "../admin/chat/completions"),
            Err("403".to_owned())
        );
        let openai = "https://api.openai.com";
        assert_eq!(
            ok(Openai, openai, Method::POST, "v1/responses"),
            Ok(Endpoint::Responses)
        );
        assert_eq!(
            ok(Openai, openai, Method::GET, "v1/responses/resp_1"),
            Err("403".to_owned())
        );
        assert_eq!(
            ok(Openai, openai, Method::GET, "v1/models/ft:gpt-4o:org::x"),
            Err("403".to_owned())
        );
    }

    #[test]
    fn gemini_models_are_read_from_the_upstream_path() {
        let google = "https://generativelanguage.googleapis.com";
        let call = |path: &str| classify(ProviderKind::Google, google, Method::POST, path);
        let model = |m: &str| {
            Ok(Endpoint::Gemini {
                model: m.to_owned(),
            })
        };
        assert_eq!(
            call("v1beta/models/gemini-2.5-pro:generateContent"),
            model("gemini-2.5-pro")
        );
        assert_eq!(
            call("v1beta/models/gemini-2.5-flash:streamGenerateContent"),
            model("gemini-2.5-flash")
        );
        assert_eq!(
            call("v1/models/gemini-2.5-pro:countTokens"),
            model("gemini-2.5-pro")
        );
        // Dot-segments are resolved before the model is read: this calls pro, not flash.
        assert_eq!(
            call("v1beta/models/gemini-2.5-flash/../gemini-2.5-pro:generateContent"),
            model("gemini-2.5-pro")
        );
        // An escape the upstream would decode is not guessed at.
        assert_eq!(
            call("v1beta/models/gemini-2.5-flash%2Fx:generateContent"),
            Err(r#""gemini-2.5-flash%2Fx" is not a model name"#.to_owned())
        );
        assert_eq!(
            call("v1beta/models/:generateContent"),
            Err(r#""" is not a model name"#.to_owned())
        );
        for refused in [
            "v1beta/models/gemini-2.5-pro:batchGenerateContent",
            "v1beta/models/gemini-2.5-pro",
            "v1beta/tunedModels/mine:generateContent",
            "v1beta/cachedContents",
            "v1beta/files",
        ] {
            assert_eq!(call(refused), Err("403".to_owned()), "{refused}");
        }
        let get = |path: &str| classify(ProviderKind::Google, google, Method::GET, path);
        assert_eq!(get("v1beta/models"), Ok(Endpoint::Listing));
        assert_eq!(get("v1beta/models/gemini-2.5-pro"), Ok(Endpoint::Listing));
        assert_eq!(
            get("v1beta/models/gemini-2.5-pro:generateContent"),
            Err("403".to_owned())
        );
    }

    #[test]
    fn tools_are_named_as_profiles_name_them() {
        let tools = |endpoint: Endpoint, body: Value| provider_tools(&endpoint, &body);
        let anthropic = json!({"tools": [
            {"name": "Read", "input_schema": {}},
            {"type": "custom", "name": "f"},
            {"type": "bash_20250124"}, {"type": "text_editor_20250728"},
            {"type": "computer_20250124"}, {"type": "memory_20250818"},
            {"type": "web_search_20250305"}, {"type": "web_fetch_20250910"},
            {"type": "code_execution_20250825"}, {"type": "mcp_toolset"}, {"type": "bash"}
        ], "mcp_servers": [{"url": "https://x"}]});
        assert_eq!(
            tools(Endpoint::Messages, anthropic),
            [
                "web_search",
                "web_fetch",
                "code_execution",
                "mcp",
                "bash",
                "mcp"
            ]
        );
        assert!(tools(Endpoint::Messages, json!({"mcp_servers": []})).is_empty());
        let openai = json!({"tools": [
            {"type": "function"}, {"type": "custom"}, {"type": "local_shell"},
            {"type": "web_search_preview_2025_03_11"}, {"type": "web_search"}, {"type": "mcp"},
            {"type": "file_search"}, {"type": "code_interpreter"}
        ]});
        assert_eq!(
            tools(Endpoint::Responses, openai),
            [
                "web_search",
                "web_search",
                "mcp",
                "file_search",
                "code_interpreter"
            ]
        );
        assert_eq!(
            tools(Endpoint::ChatCompletions, json!({"web_search_options": {}})),
            ["web_search"]
        );
        let gemini = json!({"tools": [
            {"functionDeclarations": []}, {"function_declarations": []},
            {"googleSearch": {}}, {"url_context": {}}, {"codeExecution": {}}
        ]});
        let model = "gemini-2.5-pro".to_owned();
        assert_eq!(
            tools(Endpoint::Gemini { model }, gemini),
            ["google_search", "url_context", "code_execution"]
        );
    }

    #[test]
    fn betas_pass_when_harmless_configured_or_named() {
        let config = vec!["my-beta-1".to_owned()];
        let named = vec!["web_fetch".to_owned(), "files-api-2025-04-14".to_owned()];
        let allowed = |flag| beta_allowed(flag, &config, &named);
        assert!(allowed("claude-code-20250219"));
        assert!(allowed("my-beta-1"));
        assert!(
            allowed("web-fetch-2025-09-10"),
            "through the tool it enables"
        );
        assert!(allowed("files-api-2025-04-14"), "by its own name");
        assert!(!allowed("mcp-client-2025-04-04"));
        assert!(!allowed("code-execution-2025-08-25"));
        assert!(!allowed("claude-code"));
    }

    #[test]
    fn bodies_must_be_json_objects_and_calls_name_a_model() {
        let deep = format!(
            "{{\"model\":\"m\",\"x\":{}{}}}",
            "[".repeat(200),
            "]".repeat(200)
        );
        for body in ["", "nope", "[]", "\"m\"", deep.as_str()] {
            assert!(
                matches!(
                    parse_body(&Endpoint::Messages, body.as_bytes()),
                    Err(PolicyError::Body(_))
                ),
                "{body}"
            );
        }
        assert!(parse_body(&Endpoint::Listing, b"").unwrap().is_none());
        assert!(parse_body(&Endpoint::Listing, b"{}").is_err());
        let json = json!({"model": "m"});
        assert_eq!(
            requested_model(&Endpoint::Responses, Some(&json))
                .unwrap()
                .as_deref(),
            Some("m")
        );
        for body in [json!({}), json!({"model": ""}), json!({"model": ["m"]})] {
            assert!(matches!(
                requested_model(&Endpoint::ChatCompletions, Some(&body)),
                Err(PolicyError::NoModel)
            ));
        }
        assert_eq!(requested_model(&Endpoint::Listing, None).unwrap(), None);
    }
}
