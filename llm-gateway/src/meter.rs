//! Metering: the usage a provider reports in its answer, read as the answer streams by, and
//! what it costs. Anthropic Messages, OpenAI Chat Completions, OpenAI Responses and Gemini
//! `generateContent` / `streamGenerateContent`, streamed (server-sent events) or not.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::config::ProviderKind;

/// Tokens of one answer. `input` excludes cached input (Anthropic reports it that way; for
/// OpenAI and Gemini the cached part is taken out of the prompt count), so the four counts add
/// up. Gemini's thinking tokens count as `output`, as they are billed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write: u64,
}

/// USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    pub cache_read: f64,
    pub cache_write: f64,
}

impl Price {
    pub fn cost(&self, t: &Tokens) -> f64 {
        let per = |n: u64, usd: f64| n as f64 * usd / 1_000_000.0;
        per(t.input, self.input)
            + per(t.output, self.output)
            + per(t.cache_read, self.cache_read)
            + per(t.cache_write, self.cache_write)
    }
}

/// The price table: a model takes the longest entry its name starts with, else `*`.
#[derive(Debug, Clone, Default)]
pub struct Prices(BTreeMap<String, Price>);

impl Prices {
    pub fn new(prices: BTreeMap<String, Price>) -> Self {
        Self(prices)
    }

    pub fn get(&self, model: &str) -> Option<&Price> {
        self.0
            .iter()
            .filter(|(prefix, _)| model.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, price)| price)
            .or_else(|| self.0.get("*"))
    }
}

/// Watches one answer's bytes go by and picks out its usage and model. Holds at most one
/// incomplete line (streams) or the body up to a cap (plain JSON).
pub struct Meter {
    kind: ProviderKind,
    sse: bool,
    buffer: Vec<u8>,
    overflowed: bool,
    tokens: Tokens,
    model: Option<String>,
}

/// A non-streamed body beyond this is not parsed for usage (answers are far smaller).
const MAX_JSON_BODY: usize = 32 << 20;

impl Meter {
    pub fn new(kind: ProviderKind, sse: bool) -> Self {
        Self {
            kind,
            sse,
            buffer: Vec::new(),
            overflowed: false,
            tokens: Tokens::default(),
            model: None,
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        if !self.sse {
            if self.buffer.len() + bytes.len() > MAX_JSON_BODY {
                self.overflowed = true;
                self.buffer = Vec::new();
            } else if !self.overflowed {
                self.buffer.extend_from_slice(bytes);
            }
            return;
        }
        self.buffer.extend_from_slice(bytes);
        while let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=end).collect();
            self.sse_line(&line);
        }
    }

    /// The usage seen, and the model the provider said answered.
    pub fn finish(mut self) -> (Tokens, Option<String>) {
        if self.sse {
            let rest = std::mem::take(&mut self.buffer);
            self.sse_line(&rest);
        } else if let Ok(body) = serde_json::from_slice::<Value>(&self.buffer) {
            self.event(&body);
        }
        (self.tokens, self.model)
    }

    fn sse_line(&mut self, line: &[u8]) {
        let Ok(line) = std::str::from_utf8(line) else {
            return;
        };
        let Some(data) = line.trim_end().strip_prefix("data:") else {
            return;
        };
        if let Ok(event) = serde_json::from_str::<Value>(data.trim_start()) {
            self.event(&event);
        }
    }

    /// One JSON object: a whole answer, or one streamed event.
    fn event(&mut self, v: &Value) {
        match self.kind {
            ProviderKind::Anthropic => self.anthropic(v),
            ProviderKind::Openai => self.openai(v),
            ProviderKind::Google => self.google(v),
        }
    }

    fn anthropic(&mut self, v: &Value) {
        // Stream: message_start carries the input side (and a first output count);
        // message_delta carries the cumulative output count. Plain: the message itself.
        let (message, usage) = match v["type"].as_str() {
            Some("message_start") => (&v["message"], &v["message"]["usage"]),
            Some("message_delta") => (&Value::Null, &v["usage"]),
            _ => (v, &v["usage"]),
        };
        if let Some(model) = message["model"].as_str() {
            self.model = Some(model.to_owned());
        }
        let t = &mut self.tokens;
        if let Some(n) = usage["input_tokens"].as_u64() {
            t.input = n;
        }
        if let Some(n) = usage["cache_read_input_tokens"].as_u64() {
            t.cache_read = n;
        }
        if let Some(n) = usage["cache_creation_input_tokens"].as_u64() {
            t.cache_write = n;
        }
        if let Some(n) = usage["output_tokens"].as_u64() {
            t.output = n;
        }
    }

    fn openai(&mut self, v: &Value) {
        // Responses API streams end with `response.completed` holding the whole response.
        let v = match v["type"].as_str() {
            Some("response.completed" | "response.incomplete" | "response.failed") => {
                &v["response"]
            }
            _ => v,
        };
        if let Some(model) = v["model"].as_str() {
            self.model = Some(model.to_owned());
        }
        let usage = &v["usage"];
        if !usage.is_object() {
            return;
        }
        // Chat Completions: prompt/completion tokens; Responses: input/output tokens.
        let input = usage["prompt_tokens"]
            .as_u64()
            .or_else(|| usage["input_tokens"].as_u64())
            .unwrap_or(0);
        let cached = usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .or_else(|| usage["input_tokens_details"]["cached_tokens"].as_u64())
            .unwrap_or(0);
        let output = usage["completion_tokens"]
            .as_u64()
            .or_else(|| usage["output_tokens"].as_u64())
            .unwrap_or(0);
        self.tokens = Tokens {
            input: input.saturating_sub(cached),
            output,
            cache_read: cached,
            cache_write: 0,
        };
    }

    fn google(&mut self, v: &Value) {
        // `streamGenerateContent` without `alt=sse` answers one JSON array of the chunks.
        if let Some(chunks) = v.as_array() {
            for chunk in chunks {
                self.google(chunk);
            }
            return;
        }
        if let Some(model) = v["modelVersion"].as_str() {
            let model = model.strip_prefix("models/").unwrap_or(model);
            self.model = Some(model.to_owned());
        }
        let usage = &v["usageMetadata"];
        if !usage.is_object() {
            return;
        }
        // Each streamed chunk carries the usage so far: the last one replaces the others.
        // `promptTokenCount` includes the cached tokens; tool-use prompts are billed as input,
        // thinking as output. `totalTokenCount` is the sum of prompt, tool-use prompt,
        // candidates and thoughts; where it equals the first three alone, the candidates
        // already hold the thoughts (seen from some backends), so they are not added twice.
        let count = |field: &str| usage[field].as_u64().unwrap_or(0);
        let cached = count("cachedContentTokenCount");
        let prompt = count("promptTokenCount") + count("toolUsePromptTokenCount");
        let candidates = count("candidatesTokenCount");
        let thoughts = count("thoughtsTokenCount");
        let thoughts_inside =
            thoughts > 0 && usage["totalTokenCount"].as_u64() == Some(prompt + candidates);
        self.tokens = Tokens {
            input: prompt.saturating_sub(cached),
            output: candidates + if thoughts_inside { 0 } else { thoughts },
            cache_read: cached,
            cache_write: 0,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(kind: ProviderKind, sse: bool, body: &str, split: usize) -> (Tokens, Option<String>) {
        let mut meter = Meter::new(kind, sse);
        // Feed in small pieces, so events straddle chunk boundaries.
        for piece in body.as_bytes().chunks(split) {
            meter.feed(piece);
        }
        meter.finish()
    }

    const ANTHROPIC_STREAM: &str = "event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5-20250929\",\"content\":[],\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":100,\"cache_read_input_tokens\":2000,\"output_tokens\":1}}}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n\
event: message_stop\n\
data: {\"type\":\"message_stop\"}\n\n";

    #[test]
    fn anthropic_streamed_and_plain() {
        let expected = Tokens {
            input: 25,
            output: 15,
            cache_read: 2000,
            cache_write: 100,
        };
        for split in [1, 7, 4096] {
            let (tokens, model) = run(ProviderKind::Anthropic, true, ANTHROPIC_STREAM, split);
            assert_eq!(tokens, expected, "split {split}");
            assert_eq!(model.as_deref(), Some("claude-sonnet-4-5-20250929"));
        }
        let plain = r#"{"id":"msg_1","type":"message","model":"claude-haiku-4-5","content":[],"usage":{"input_tokens":10,"output_tokens":3}}"#;
        let (tokens, model) = run(ProviderKind::Anthropic, false, plain, 5);
        assert_eq!((tokens.input, tokens.output), (10, 3));
        assert_eq!(model.as_deref(), Some("claude-haiku-4-5"));
    }

    #[test]
    fn openai_chat_and_responses() {
        let stream = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-5\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-5\",\"choices\":[],\"usage\":{\"prompt_tokens\":120,\"completion_tokens\":30,\"prompt_tokens_details\":{\"cached_tokens\":100}}}\n\n\
data: [DONE]\n\n";
        let (tokens, model) = run(ProviderKind::Openai, true, stream, 3);
        assert_eq!(
            tokens,
            Tokens {
                input: 20,
                output: 30,
                cache_read: 100,
                cache_write: 0
            }
        );
        assert_eq!(model.as_deref(), Some("gpt-5"));

        let responses = "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"model\":\"gpt-5-mini\",\"usage\":{\"input_tokens\":50,\"input_tokens_details\":{\"cached_tokens\":0},\"output_tokens\":8}}}\n\n";
        let (tokens, model) = run(ProviderKind::Openai, true, responses, 9);
        assert_eq!((tokens.input, tokens.output), (50, 8));
        assert_eq!(model.as_deref(), Some("gpt-5-mini"));
    }

    /// Three SSE chunks as the Gemini API sends them (`\r\n` line ends), each with the usage
    /// so far: summing them would give 60 output tokens instead of 40 + 12.
    const GOOGLE_STREAM: &str = "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"Hel\"}],\"role\": \"model\"},\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": 1500,\"candidatesTokenCount\": 2,\"totalTokenCount\": 1514,\"cachedContentTokenCount\": 1024,\"thoughtsTokenCount\": 12},\"modelVersion\": \"gemini-2.5-flash\",\"responseId\": \"r1\"}\r\n\r\n\
data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"lo\"}],\"role\": \"model\"},\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": 1500,\"candidatesTokenCount\": 18,\"totalTokenCount\": 1530,\"cachedContentTokenCount\": 1024,\"thoughtsTokenCount\": 12},\"modelVersion\": \"gemini-2.5-flash\",\"responseId\": \"r1\"}\r\n\r\n\
data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"!\"}],\"role\": \"model\"},\"finishReason\": \"STOP\",\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": 1500,\"candidatesTokenCount\": 40,\"totalTokenCount\": 1552,\"cachedContentTokenCount\": 1024,\"thoughtsTokenCount\": 12},\"modelVersion\": \"gemini-2.5-flash\",\"responseId\": \"r1\"}\r\n\r\n";

    #[test]
    fn google_streamed_takes_the_last_usage_and_counts_thoughts_as_output() {
        let expected = Tokens {
            input: 476,
            output: 52,
            cache_read: 1024,
            cache_write: 0,
        };
        for split in [1, 2, 13, 4096] {
            let (tokens, model) = run(ProviderKind::Google, true, GOOGLE_STREAM, split);
            assert_eq!(tokens, expected, "split {split}");
            assert_eq!(model.as_deref(), Some("gemini-2.5-flash"));
        }
        // A stream cut before its last chunk is charged what was reported so far.
        let cut = &GOOGLE_STREAM[..GOOGLE_STREAM.rfind("data:").unwrap()];
        let (tokens, _) = run(ProviderKind::Google, true, cut, 7);
        assert_eq!(tokens.output, 18 + 12);
    }

    #[test]
    fn google_plain_and_json_array_streams() {
        let plain = r#"{"candidates":[{"content":{"parts":[{"text":"Hi"}],"role":"model"},"finishReason":"STOP"}],
            "usageMetadata":{"promptTokenCount":10,"candidatesTokenCount":3,"toolUsePromptTokenCount":5,"totalTokenCount":18},
            "modelVersion":"models/gemini-2.5-pro"}"#;
        let (tokens, model) = run(ProviderKind::Google, false, plain, 4);
        assert_eq!(
            tokens,
            Tokens {
                input: 15,
                output: 3,
                cache_read: 0,
                cache_write: 0
            }
        );
        assert_eq!(model.as_deref(), Some("gemini-2.5-pro"));
        // `streamGenerateContent` without `alt=sse`: one JSON array of cumulative chunks.
        let array = r#"[{"usageMetadata":{"promptTokenCount":10,"candidatesTokenCount":1,"totalTokenCount":11}},
            {"usageMetadata":{"promptTokenCount":10,"candidatesTokenCount":7,"thoughtsTokenCount":4,"totalTokenCount":21},"modelVersion":"gemini-2.5-pro"}]"#;
        let (tokens, _) = run(ProviderKind::Google, false, array, 3);
        assert_eq!((tokens.input, tokens.output), (10, 11));
        // A backend whose candidates already include the thoughts (the total says so).
        let inclusive = r#"{"usageMetadata":{"promptTokenCount":10,"candidatesTokenCount":30,"thoughtsTokenCount":20,"totalTokenCount":40}}"#;
        let (tokens, _) = run(ProviderKind::Google, false, inclusive, 64);
        assert_eq!(tokens.output, 30);
        // countTokens and model listings report no usage: nothing is charged.
        let (tokens, model) = run(ProviderKind::Google, false, r#"{"totalTokens": 31}"#, 64);
        assert_eq!((tokens, model), (Tokens::default(), None));
    }

    #[test]
    fn prices_take_the_longest_prefix() {
        let price = |input: f64| Price {
            input,
            output: 2.0 * input,
            cache_read: input / 10.0,
            cache_write: input,
        };
        let prices = Prices::new(BTreeMap::from([
            ("claude-opus-4".to_owned(), price(15.0)),
            ("claude-opus-4-5".to_owned(), price(5.0)),
        ]));
        assert_eq!(prices.get("claude-opus-4-5-20251101").unwrap().input, 5.0);
        assert_eq!(prices.get("claude-opus-4-1").unwrap().input, 15.0);
        assert!(prices.get("gpt-5").is_none());
        let tokens = Tokens {
            input: 1_000_000,
            output: 500_000,
            cache_read: 1_000_000,
            cache_write: 0,
        };
        assert!((price(5.0).cost(&tokens) - (5.0 + 5.0 + 0.5)).abs() < 1e-9);
    }
}
