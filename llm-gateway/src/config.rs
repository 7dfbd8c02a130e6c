//! The llm-gateway's configuration: upstream providers with their credentials, and prices.
//! Parsed once from TOML; credentials are read at startup through a lookup the caller passes
//! (environment variables or files), never from the file itself.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use flotilla_nats::TopologyConfig;
use serde::Deserialize;
use url::Url;

use crate::meter::{Price, Prices};

/// The built-in configuration (also the documented example).
pub const DEFAULT_CONFIG: &str = include_str!("../../deploy/llm-gateway.toml");

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub nats_url: String,
    /// Credentials and TLS for NATS.
    pub nats: flotilla_nats::NatsOptions,
    pub topology: TopologyConfig,
    pub providers: BTreeMap<String, Provider>,
    pub prices: Prices,
    /// Cap on a request body from a job (prompts with images can be large).
    pub max_request_bytes: usize,
    /// How long an upstream may take to start answering (and, for an answer the job left
    /// half-read, to send each further chunk).
    pub upstream_timeout: Duration,
    /// Requests of one job in the gateway at once, from reading the body to the answer's
    /// end: beyond it, 429.
    pub max_concurrent_per_job: usize,
    /// Requests in the gateway at once, all jobs together: beyond it, 503.
    pub max_concurrent: usize,
    /// Where `/metrics` is served instead of `listen`, which jobs reach; `None` keeps it on
    /// `listen`. Bound by the caller, as `listen` is (see [`crate::Listeners`]).
    pub metrics_listen: Option<SocketAddr>,
    /// Beta flags (`anthropic-beta`, `openai-beta` values) every job may send, beside the
    /// built-in harmless ones.
    pub allowed_betas: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Anthropic Messages API.
    Anthropic,
    /// OpenAI, or any server speaking its Chat Completions / Responses API.
    Openai,
    /// Google's Gemini API (`generativelanguage.googleapis.com`, `generateContent`). Named for
    /// the API's owner, like the other kinds; the engine and CLI are called gemini.
    Google,
}

#[derive(Debug, Clone)]
pub struct Provider {
    pub kind: ProviderKind,
    pub base_url: Url,
    pub api_key: Option<Secret>,
    /// Anthropic only: an OAuth token from a Claude subscription, used when no API key is set.
    pub oauth_token: Option<Secret>,
    /// Where the credential should have come from (`ANTHROPIC_API_KEY or
    /// CLAUDE_CODE_OAUTH_TOKEN`), when the config names a source; `None` for an upstream that
    /// needs none. A provider with a source but no credential refuses requests rather than
    /// forwarding them unauthenticated.
    pub credential_source: Option<String>,
}

/// A credential: the same never-printed type as NATS passwords.
pub use flotilla_nats::Secret;

#[derive(Debug, thiserror::Error)]
#[error("invalid llm-gateway config: {0}")]
pub struct ConfigError(pub String);

/// Where a credential comes from; the caller decides how to read each (env, file).
pub trait SecretSource {
    fn env(&self, name: &str) -> Option<String>;
    fn file(&self, path: &std::path::Path) -> Result<String, std::io::Error>;
}

/// The process environment and filesystem: what `main` passes.
pub struct ProcessSecrets;

impl SecretSource for ProcessSecrets {
    fn env(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn file(&self, path: &std::path::Path) -> Result<String, std::io::Error> {
        std::fs::read_to_string(path)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    allowed_betas: Vec<String>,
    #[serde(default)]
    providers: BTreeMap<String, ProviderSection>,
    #[serde(default)]
    prices: BTreeMap<String, PriceSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderSection {
    kind: ProviderKind,
    base_url: String,
    api_key_env: Option<String>,
    api_key_file: Option<PathBuf>,
    oauth_token_env: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceSection {
    input: f64,
    output: f64,
    cache_read: Option<f64>,
    cache_write: Option<f64>,
}

/// The parts of the configuration that come from the TOML file.
#[derive(Debug, Clone)]
pub struct Upstreams {
    pub providers: BTreeMap<String, Provider>,
    pub prices: Prices,
    /// Beta flags every job may send beside the built-in ones (top-level `allowed_betas`).
    pub allowed_betas: Vec<String>,
}

impl Upstreams {
    pub fn parse(text: &str, secrets: &dyn SecretSource) -> Result<Self, ConfigError> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        let mut providers = BTreeMap::new();
        for (name, section) in file.providers {
            let valid_name = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !valid_name || name == "health" || name == "metrics" {
                return Err(ConfigError(format!(
                    "provider name {name:?} must be [A-Za-z0-9_-]+ and not health/metrics"
                )));
            }
            providers.insert(name.clone(), section.into_provider(&name, secrets)?);
        }
        let mut prices = BTreeMap::new();
        for (model, p) in file.prices {
            let price = Price {
                input: p.input,
                output: p.output,
                cache_read: p.cache_read.unwrap_or(p.input),
                cache_write: p.cache_write.unwrap_or(p.input),
            };
            let all = [
                price.input,
                price.output,
                price.cache_read,
                price.cache_write,
            ];
            if all.iter().any(|v| !v.is_finite() || *v < 0.0) {
                return Err(ConfigError(format!(
                    "prices.{model:?}: prices must be finite and >= 0"
                )));
            }
            prices.insert(model, price);
        }
        Ok(Self {
            providers,
            prices: Prices::new(prices),
            allowed_betas: file.allowed_betas,
        })
    }
}

impl Upstreams {
    /// Points provider `name` at `url` instead of the file's `base_url`, checked as the file's
    /// would be: `FLOTILLA_LLM_OPENAI_BASE_URL` sends the `openai` provider to any
    /// OpenAI-compatible server (vLLM, Ollama, llama.cpp) without a config file.
    pub fn override_base_url(&mut self, name: &str, url: &str) -> Result<(), ConfigError> {
        let base_url = parse_base_url(name, url)?;
        let provider = self.providers.get_mut(name).ok_or_else(|| {
            ConfigError(format!(
                "no provider {name:?} in the config to point at {base_url}"
            ))
        })?;
        provider.base_url = base_url;
        Ok(())
    }
}

fn parse_base_url(name: &str, url: &str) -> Result<Url, ConfigError> {
    let base_url =
        Url::parse(url).map_err(|e| ConfigError(format!("providers.{name}.base_url: {e}")))?;
    if !matches!(base_url.scheme(), "http" | "https") || base_url.query().is_some() {
        return Err(ConfigError(format!(
            "providers.{name}.base_url must be an http(s) URL without a query"
        )));
    }
    Ok(base_url)
}

impl ProviderSection {
    fn into_provider(
        self,
        name: &str,
        secrets: &dyn SecretSource,
    ) -> Result<Provider, ConfigError> {
        let base_url = parse_base_url(name, &self.base_url)?;
        let from_env = |var: &Option<String>| {
            var.as_deref()
                .and_then(|v| secrets.env(v))
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .map(Secret::new)
        };
        let mut api_key = from_env(&self.api_key_env);
        if api_key.is_none()
            && let Some(path) = &self.api_key_file
        {
            let text = secrets.file(path).map_err(|e| {
                ConfigError(format!(
                    "providers.{name}.api_key_file {}: {e}",
                    path.display()
                ))
            })?;
            api_key = Some(Secret::new(text.trim().to_owned())).filter(|s| !s.expose().is_empty());
        }
        let oauth_token = from_env(&self.oauth_token_env);
        let sources: Vec<String> = [
            self.api_key_env.clone(),
            self.api_key_file.as_ref().map(|p| p.display().to_string()),
            self.oauth_token_env.clone(),
        ]
        .into_iter()
        .flatten()
        .collect();
        let credential_source = (!sources.is_empty()).then(|| sources.join(" or "));
        if oauth_token.is_some() && self.kind != ProviderKind::Anthropic {
            return Err(ConfigError(format!(
                "providers.{name}.oauth_token_env is only for kind = \"anthropic\""
            )));
        }
        Ok(Provider {
            kind: self.kind,
            base_url,
            api_key,
            oauth_token,
            credential_source,
        })
    }
}

impl Provider {
    /// True when the gateway holds a credential for this provider.
    pub fn has_credential(&self) -> bool {
        self.api_key.is_some() || self.oauth_token.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(BTreeMap<&'static str, &'static str>);

    impl SecretSource for Fake {
        fn env(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|s| (*s).to_owned())
        }
        fn file(&self, path: &std::path::Path) -> Result<String, std::io::Error> {
            Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                path.display().to_string(),
            ))
        }
    }

    #[test]
    fn default_config_loads_and_reads_keys_from_the_environment() {
        let secrets = Fake(BTreeMap::from([
            ("ANTHROPIC_API_KEY", "sk-ant-x"),
            ("GEMINI_API_KEY", "AIza-x"),
        ]));
        let upstreams = Upstreams::parse(DEFAULT_CONFIG, &secrets).unwrap();
        let anthropic = &upstreams.providers["anthropic"];
        assert_eq!(anthropic.api_key.as_ref().unwrap().expose(), "sk-ant-x");
        assert!(!upstreams.providers["openai"].has_credential());
        let google = &upstreams.providers["google"];
        assert_eq!(google.kind, ProviderKind::Google);
        assert_eq!(
            google.base_url.as_str(),
            "https://generativelanguage.googleapis.com/"
        );
        assert_eq!(google.api_key.as_ref().unwrap().expose(), "AIza-x");
        // Keys never show in Debug output.
        let debug = format!("{upstreams:?}");
        assert!(!debug.contains("sk-ant-x") && !debug.contains("AIza-x"));
        assert!(upstreams.prices.get("claude-sonnet-4-5-20250929").is_some());
        // Flash-Lite is cheaper than Flash: the longer prefix wins.
        let flash = upstreams.prices.get("gemini-2.5-flash").unwrap().input;
        let lite = upstreams.prices.get("gemini-2.5-flash-lite").unwrap().input;
        assert!(lite < flash, "{lite} {flash}");
    }

    #[test]
    fn the_openai_upstream_can_be_pointed_elsewhere() {
        let secrets = Fake(BTreeMap::from([("OPENAI_API_KEY", "ollama")]));
        let mut upstreams = Upstreams::parse(DEFAULT_CONFIG, &secrets).unwrap();
        upstreams
            .override_base_url("openai", "http://10.0.0.5:11434")
            .unwrap();
        let openai = &upstreams.providers["openai"];
        assert_eq!(openai.base_url.as_str(), "http://10.0.0.5:11434/");
        assert_eq!(openai.kind, ProviderKind::Openai);
        assert_eq!(openai.api_key.as_ref().unwrap().expose(), "ollama");
        for bad in ["ftp://x", "http://x/?a=1", "not a url"] {
            assert!(upstreams.override_base_url("openai", bad).is_err(), "{bad}");
        }
        let e = upstreams.override_base_url("nope", "http://x").unwrap_err();
        assert!(e.0.contains("no provider \"nope\""), "{e}");
    }

    #[test]
    fn beta_flags_for_every_job_come_from_the_top_of_the_file() {
        let none = Fake(BTreeMap::new());
        assert!(
            Upstreams::parse(DEFAULT_CONFIG, &none)
                .unwrap()
                .allowed_betas
                .is_empty()
        );
        let text = "allowed_betas = [\"context-1m-2025-08-07\"]\n[providers.x]\nkind = \"openai\"\nbase_url = \"http://a\"\n";
        let upstreams = Upstreams::parse(text, &none).unwrap();
        assert_eq!(upstreams.allowed_betas, ["context-1m-2025-08-07"]);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let none = Fake(BTreeMap::new());
        for (text, expected) in [
            (
                "[providers.x]\nkind = \"cohere\"\nbase_url = \"http://a\"\n",
                "unknown variant",
            ),
            (
                "[providers.x]\nkind = \"openai\"\nbase_url = \"ftp://a\"\n",
                "http(s)",
            ),
            (
                "[providers.health]\nkind = \"openai\"\nbase_url = \"http://a\"\n",
                "health",
            ),
            ("[prices.m]\ninput = -1.0\noutput = 1.0\n", "finite"),
            (
                "[providers.x]\nkind = \"openai\"\nbase_url = \"http://a\"\napi_key_file = \"/nope\"\n",
                "/nope",
            ),
        ] {
            let err = Upstreams::parse(text, &none).unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }
}
