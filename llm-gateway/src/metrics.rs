//! `GET /metrics` of the llm-gateway (Prometheus text format 0.0.4): requests by outcome,
//! tokens and cost per provider, engine, profile and agent. Agent ids come from clients, so
//! only the first few hundred get their own series.

use std::{
    collections::BTreeSet,
    sync::{Mutex, atomic::AtomicU64},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::meter::Tokens;

const MAX_AGENTS: usize = 200;
const OTHER_AGENTS: &str = "_other";

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    provider: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SpendLabels {
    provider: String,
    engine: String,
    profile: String,
    agent_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TokenLabels {
    #[prometheus(flatten)]
    spender: SpendLabels,
    kind: &'static str,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<SpendLabels, Counter<f64, AtomicU64>>,
    /// Requests held back until their job's requests in flight settle (budgets).
    waiting: Gauge,
    /// Agent ids that have their own series.
    agents: Mutex<BTreeSet<String>>,
}

/// Who spent: the labels of a usage series.
pub struct Spender<'a> {
    pub provider: &'a str,
    pub engine: &'a str,
    pub profile: &'a str,
    pub agent_id: &'a str,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let tokens = Family::<TokenLabels, Counter>::default();
        let cost = Family::<SpendLabels, Counter<f64, AtomicU64>>::default();
        registry.register(
            "flotilla_llm_requests",
            "LLM requests by provider and outcome",
            requests.clone(),
        );
        registry.register(
            "flotilla_llm_tokens",
            "Tokens metered, by kind, provider, engine, profile and agent",
            tokens.clone(),
        );
        registry.register(
            "flotilla_llm_cost_usd",
            "Cost in USD from the price table, by provider, engine, profile and agent",
            cost.clone(),
        );
        let waiting = Gauge::default();
        registry.register(
            "flotilla_llm_requests_waiting",
            "Requests waiting for their job's requests in flight to settle, so that together they stay within its budget",
            waiting.clone(),
        );
        Self {
            registry,
            requests,
            tokens,
            cost,
            waiting,
            agents: Mutex::default(),
        }
    }
}

/// One request counted as waiting until dropped, however the wait ends (the client hanging
/// up included).
pub struct Waiting<'a>(&'a Gauge);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    pub fn start_waiting(&self) -> Waiting<'_> {
        self.waiting.inc();
        Waiting(&self.waiting)
    }

    /// One request that ended with `outcome` (forwarded, unauthorized, forbidden, ...).
    pub fn request(&self, provider: &str, outcome: &'static str) {
        self.requests
            .get_or_create(&RequestLabels {
                provider: provider.to_owned(),
                outcome,
            })
            .inc();
    }

    pub fn usage(&self, who: &Spender<'_>, tokens: &Tokens, cost_usd: f64) {
        let agent_id = {
            let mut agents = self.agents.lock().expect("metrics");
            if agents.contains(who.agent_id) || agents.len() < MAX_AGENTS {
                agents.insert(who.agent_id.to_owned());
                who.agent_id.to_owned()
            } else {
                OTHER_AGENTS.to_owned()
            }
        };
        let spender = SpendLabels {
            provider: who.provider.to_owned(),
            engine: who.engine.to_owned(),
            profile: who.profile.to_owned(),
            agent_id,
        };
        for (kind, n) in [
            ("input", tokens.input),
            ("output", tokens.output),
            ("cache_read", tokens.cache_read),
            ("cache_write", tokens.cache_write),
        ] {
            let labels = TokenLabels {
                spender: spender.clone(),
                kind,
            };
            self.tokens.get_or_create(&labels).inc_by(n);
        }
        self.cost.get_or_create(&spender).inc_by(cost_usd);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_beyond_the_cap_share_one_series() {
        let metrics = Metrics::default();
        let tokens = Tokens {
            input: 1,
            ..Tokens::default()
        };
        for i in 0..MAX_AGENTS + 5 {
            let agent = format!("agent-{i}");
            let who = Spender {
                provider: "anthropic",
                engine: "claude-code",
                profile: "default",
                agent_id: &agent,
            };
            metrics.usage(&who, &tokens, 0.5);
        }
        let text = metrics.render();
        let series = text
            .lines()
            .filter(|l| l.starts_with("flotilla_llm_cost_usd_total{"))
            .count();
        assert_eq!(series, MAX_AGENTS + 1);
        assert!(text.contains("agent_id=\"_other\"} 2.5"), "{text}");
    }
}
