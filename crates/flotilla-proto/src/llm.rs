//! Per-job LLM credentials: what an agent-node grants a job and the llm-gateway checks.
//!
//! A job never sees a provider key. When it starts, its node mints a random token, stores a
//! [`LlmGrant`] under the token's hash in [`crate::names::BUCKET_LLM_GRANTS`], and hands the
//! token to the container. The llm-gateway looks the grant up by the hash of the token it is
//! shown; the token itself is stored nowhere.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Prefix of every job token, so a leaked one is recognisable (and greppable in audits).
pub const TOKEN_PREFIX: &str = "flj_";

/// What one job attempt may do at the llm-gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlmGrant {
    pub job_id: String,
    /// The attempt the token belongs to: once the job moves on, the token is dead.
    pub attempt: u32,
    pub node_id: String,
    pub engine: String,
    pub profile: String,
    pub agent_id: String,
    /// Provider names (as configured in the llm-gateway) the job may call.
    pub providers: Vec<String>,
    /// Model patterns the job may ask for (`*` at the end matches a prefix); empty = any.
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub max_budget_usd: Option<f64>,
    /// Provider-side tools (`web_search`, `web_fetch`, `mcp`, ...) and beta flags the job's
    /// profile allows by name; the gateway refuses any other (see the llm-gateway's `policy`).
    /// Absent in grants from nodes that predate it: then none are allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_provider_tools: Vec<String>,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// Set when the attempt ended; the grant is kept a while so the gateway can say why it
    /// refuses the token.
    #[serde(default)]
    pub revoked_at: Option<DateTime<Utc>>,
    /// The W3C `traceparent` of the job's span, so the gateway's spans for its LLM calls join
    /// the job's trace. Absent when the node exports no traces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl LlmGrant {
    /// True when `model` matches the allow-list (an empty list allows every model).
    pub fn allows_model(&self, model: &str) -> bool {
        model_allowed(&self.models, model)
    }
}

/// `patterns` is an allow-list of exact names or prefixes ending in `*`; empty allows all.
pub fn model_allowed(patterns: &[String], model: &str) -> bool {
    patterns.is_empty()
        || patterns.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => model.starts_with(prefix),
            None => p == model,
        })
}

/// A fresh job token: the prefix and 244 random bits (two v4 UUIDs, from the OS's CSPRNG).
pub fn new_token() -> String {
    format!(
        "{TOKEN_PREFIX}{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// The KV key a token's grant is stored under: only the SHA-256 of the token.
pub fn grant_key(token: &str) -> String {
    use sha2::Digest as _;
    format!(
        "grant.{}",
        hex::encode(sha2::Sha256::digest(token.as_bytes()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_and_keys_hide_them() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 64);
        let key = grant_key(&a);
        assert!(!key.contains(&a[TOKEN_PREFIX.len()..]));
        assert_eq!(key, grant_key(&a));
    }

    fn grant(allowed_provider_tools: Vec<String>) -> LlmGrant {
        let now = Utc::now();
        LlmGrant {
            job_id: "j".to_owned(),
            attempt: 1,
            node_id: "n".to_owned(),
            engine: "claude-code".to_owned(),
            profile: "default".to_owned(),
            agent_id: "a".to_owned(),
            providers: vec!["anthropic".to_owned()],
            models: Vec::new(),
            max_budget_usd: None,
            allowed_provider_tools,
            issued_at: now,
            expires_at: now,
            revoked_at: None,
            traceparent: None,
        }
    }

    #[test]
    fn provider_tools_travel_and_grants_without_them_still_decode() {
        use crate::{Encoding, decode, encode};
        let with = grant(vec!["web_search".to_owned()]);
        let bytes = encode(&with).unwrap();
        assert_eq!(
            decode::<LlmGrant>(&bytes, Encoding::MessagePack).unwrap(),
            with
        );
        // An empty list is left out, so a grant from an older node reads the same.
        let without = grant(Vec::new());
        let bytes = encode(&without).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains("allowed_provider_tools"), "{text}");
        assert_eq!(
            decode::<LlmGrant>(&bytes, Encoding::MessagePack).unwrap(),
            without
        );
    }

    #[test]
    fn model_patterns() {
        let list = vec!["claude-sonnet-4-5*".to_owned(), "gpt-5".to_owned()];
        assert!(model_allowed(&list, "claude-sonnet-4-5-20250929"));
        assert!(model_allowed(&list, "gpt-5"));
        assert!(!model_allowed(&list, "gpt-5-mini"));
        assert!(!model_allowed(&list, "claude-opus-4-1"));
        assert!(model_allowed(&[], "anything"));
    }
}
