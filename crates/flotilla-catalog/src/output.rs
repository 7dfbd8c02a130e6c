//! Engine output: what an agent CLI printed, read into its answer, session and usage.
//!
//! Each parser follows the format its CLI really prints (see the fixtures under
//! `tests/fixtures/<engine>/`). Parsing never fails: output a parser does not recognise comes back
//! as plain text with `parsed: false`, so a job always has a result to show.

use serde::Deserialize;
use serde_json::Value;

/// How to read an engine's standard output: `[output] parser` in the engine file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Parser {
    /// Claude Code `-p --output-format json | stream-json | text`.
    Claude,
    /// OpenCode `run --format json` (JSON lines).
    Opencode,
    /// Codex `exec --json` (JSON lines).
    Codex,
    /// Gemini CLI `-p --output-format json | stream-json | text`.
    Gemini,
    /// Aider `--message`: plain text with "Tokens: ... Cost: ..." report lines.
    Aider,
    /// Flotilla's own agent (`flotilla-agent`): its steps on stderr, one `result` JSON line on
    /// stdout.
    Flotilla,
    /// Standard output is the answer.
    #[default]
    Text,
}

impl Parser {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Claude => "claude",
            Self::Opencode => "opencode",
            Self::Codex => "codex",
            Self::Gemini => "gemini",
            Self::Aider => "aider",
            Self::Flotilla => "flotilla",
            Self::Text => "text",
        }
    }
}

/// What a parser read from an engine's standard output.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParsedOutput {
    /// The agent's final answer.
    pub text: String,
    pub session_id: Option<String>,
    pub cost_usd: Option<f64>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub num_turns: Option<u32>,
    /// The CLI itself reported an error result.
    pub is_error: bool,
    /// The engine's own JSON; for JSON lines, an array of the events.
    pub raw: Option<Value>,
    /// False when the output could not be parsed: `text` is then the raw output.
    pub parsed: bool,
}

/// Reads `stdout` as `parser` prints it. `output_format` is the job's resolved format
/// ("json", "stream-json" or "text"); engines that ignore it (Codex, Aider) are read the same
/// whatever it says.
pub fn parse(parser: Parser, output_format: &str, stdout: &str) -> ParsedOutput {
    let text_format = output_format == "text";
    let parsed = match parser {
        Parser::Text => Some(plain(stdout)),
        Parser::Aider => Some(aider(stdout)),
        Parser::Claude | Parser::Gemini | Parser::Opencode if text_format => Some(plain(stdout)),
        // Claude's and Gemini's json is one document; their stream-json is JSON lines.
        Parser::Claude => read_json(output_format, stdout).and_then(|json| json.with(claude)),
        Parser::Gemini => read_json(output_format, stdout).and_then(|json| json.with(gemini)),
        // OpenCode's `--format json` and Codex's `--json` both print JSON lines.
        Parser::Opencode => json_lines(stdout).and_then(|json| json.with(opencode)),
        Parser::Codex => json_lines(stdout).and_then(|json| json.with(codex)),
        // Whatever the job's output_format: the agent always prints its result line.
        Parser::Flotilla => json_lines(stdout).and_then(|json| flotilla(&json.events)),
    };
    parsed.unwrap_or_else(|| ParsedOutput {
        text: trim_newline(stdout),
        ..ParsedOutput::default()
    })
}

fn trim_newline(s: &str) -> String {
    s.trim_end_matches(['\n', '\r']).to_owned()
}

fn plain(stdout: &str) -> ParsedOutput {
    ParsedOutput {
        text: trim_newline(stdout),
        parsed: true,
        ..ParsedOutput::default()
    }
}

/// JSON an engine printed: its events (one for a single document) and the value kept as `raw`.
struct Json {
    events: Vec<Value>,
    raw: Value,
}

impl Json {
    /// Runs an engine's reader over the events; `None` when it recognised nothing.
    fn with(self, read: fn(&[Value]) -> Option<ParsedOutput>) -> Option<ParsedOutput> {
        let out = read(&self.events)?;
        Some(ParsedOutput {
            raw: Some(self.raw),
            parsed: true,
            ..out
        })
    }
}

/// Tries the shape `output_format` promises first, then the other: a CLI version that prints
/// something else, or a stray line before the JSON, should not lose the result.
fn read_json(output_format: &str, stdout: &str) -> Option<Json> {
    if output_format == "stream-json" {
        json_lines(stdout).or_else(|| document(stdout))
    } else {
        document(stdout).or_else(|| json_lines(stdout))
    }
}

/// The whole output as one JSON object (Gemini pretty-prints it over many lines). Lines before
/// the first one starting with `{` are skipped: CLIs print the odd notice to stdout.
fn document(stdout: &str) -> Option<Json> {
    let start = if stdout.trim_start().starts_with('{') {
        0
    } else {
        stdout.find("\n{")? + 1
    };
    match serde_json::from_str::<Value>(&stdout[start..]) {
        Ok(value @ Value::Object(_)) => Some(Json {
            events: vec![value.clone()],
            raw: value,
        }),
        _ => None,
    }
}

/// One JSON object a line; blank and other lines are skipped. `None` when no line is one.
fn json_lines(stdout: &str) -> Option<Json> {
    let events: Vec<Value> = stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line.trim()).ok())
        .filter(Value::is_object)
        .collect();
    if events.is_empty() {
        return None;
    }
    Some(Json {
        raw: Value::Array(events.clone()),
        events,
    })
}

fn kind(event: &Value) -> Option<&str> {
    event.get("type").and_then(Value::as_str)
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    value.pointer(pointer).and_then(Value::as_str)
}

fn u64_at(value: &Value, pointer: &str) -> Option<u64> {
    value.pointer(pointer).and_then(Value::as_u64)
}

fn f64_at(value: &Value, pointer: &str) -> Option<f64> {
    value.pointer(pointer).and_then(Value::as_f64)
}

/// Adds `n` to a running total that stays `None` until some figure is reported.
fn add(total: &mut Option<u64>, n: Option<u64>) {
    if let Some(n) = n {
        *total = Some(total.unwrap_or(0).saturating_add(n));
    }
}

fn add_f64(total: &mut Option<f64>, x: Option<f64>) {
    if let Some(x) = x {
        *total = Some(total.unwrap_or(0.0) + x);
    }
}

/// Claude Code: `--output-format json` prints the `result` event alone; `stream-json` prints
/// `system`, `assistant`, `user` events and that same `result` event last.
fn claude(events: &[Value]) -> Option<ParsedOutput> {
    if !events.iter().any(|e| kind(e).is_some()) {
        return None;
    }
    let session_id = events
        .iter()
        .rev()
        .find_map(|e| str_at(e, "/session_id"))
        .map(str::to_owned);
    let Some(result) = events.iter().rev().find(|e| kind(e) == Some("result")) else {
        // No result event (the CLI was killed mid-stream): the last thing the assistant said.
        let text = events
            .iter()
            .rev()
            .find(|e| kind(e) == Some("assistant"))
            .map(claude_text)
            .unwrap_or_default();
        return Some(ParsedOutput {
            text,
            session_id,
            ..ParsedOutput::default()
        });
    };

    let subtype = str_at(result, "/subtype").unwrap_or_default();
    // A failed API call comes as subtype "success" with is_error; limits as "error_max_turns"...
    let is_error = result.get("is_error").and_then(Value::as_bool) == Some(true)
        || subtype.starts_with("error");
    let errors: Vec<&str> = result
        .get("errors")
        .and_then(Value::as_array)
        .map(|errors| errors.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let text = match str_at(result, "/result") {
        Some(text) if !text.is_empty() => text.to_owned(),
        // Error subtypes carry no `result`: say what ended the run.
        _ if !errors.is_empty() => errors.join("\n"),
        _ if is_error => subtype.to_owned(),
        _ => String::new(),
    };
    // Cache writes and reads are counted apart from `input_tokens`, but they are input the
    // model read too: the total is what the job consumed.
    let mut input_tokens = None;
    for field in [
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ] {
        add(
            &mut input_tokens,
            u64_at(result, &format!("/usage/{field}")),
        );
    }
    Some(ParsedOutput {
        text,
        session_id,
        // Versions before the Agent SDK rename printed `cost_usd`.
        cost_usd: f64_at(result, "/total_cost_usd").or_else(|| f64_at(result, "/cost_usd")),
        input_tokens,
        output_tokens: u64_at(result, "/usage/output_tokens"),
        num_turns: u64_at(result, "/num_turns").and_then(|n| u32::try_from(n).ok()),
        is_error,
        ..ParsedOutput::default()
    })
}

/// The text blocks of a Claude `assistant` event.
fn claude_text(event: &Value) -> String {
    let Some(blocks) = event.pointer("/message/content").and_then(Value::as_array) else {
        return String::new();
    };
    let texts: Vec<&str> = blocks
        .iter()
        .filter(|block| kind(block) == Some("text"))
        .filter_map(|block| str_at(block, "/text"))
        .collect();
    texts.join("\n")
}

/// Gemini CLI: `--output-format json` prints one document `{session_id, response, stats,
/// error}`; `stream-json` prints `init`, `message`, `tool_use`, `tool_result`, `error` and a
/// final `result` event.
fn gemini(events: &[Value]) -> Option<ParsedOutput> {
    match events {
        [document] if kind(document).is_none() => gemini_document(document),
        _ if events.iter().any(|e| kind(e).is_some()) => Some(gemini_stream(events)),
        _ => None,
    }
}

fn gemini_document(doc: &Value) -> Option<ParsedOutput> {
    if ["response", "error", "stats", "session_id"]
        .iter()
        .all(|key| doc.get(key).is_none())
    {
        return None;
    }
    let error = doc.get("error").filter(|e| !e.is_null());
    let text = str_at(doc, "/response")
        .or_else(|| error.and_then(|e| str_at(e, "/message")))
        .unwrap_or_default()
        .to_owned();
    // Per model: `prompt` is all input (cached included), `candidates` the answer; the same
    // sums Gemini's own stream-json `result` reports as input_tokens and output_tokens.
    let (mut input_tokens, mut output_tokens) = (None, None);
    if let Some(models) = doc.pointer("/stats/models").and_then(Value::as_object) {
        for model in models.values() {
            add(&mut input_tokens, u64_at(model, "/tokens/prompt"));
            add(&mut output_tokens, u64_at(model, "/tokens/candidates"));
        }
    }
    Some(ParsedOutput {
        text,
        session_id: str_at(doc, "/session_id").map(str::to_owned),
        input_tokens,
        output_tokens,
        is_error: error.is_some(),
        ..ParsedOutput::default()
    })
}

fn gemini_stream(events: &[Value]) -> ParsedOutput {
    let mut out = ParsedOutput::default();
    let mut error = None;
    for event in events {
        match kind(event) {
            Some("init") => out.session_id = str_at(event, "/session_id").map(str::to_owned),
            // The answer streams as assistant chunks (`delta: true`): joined, they are the
            // `response` the json format would print.
            Some("message") if str_at(event, "/role") == Some("assistant") => {
                out.text
                    .push_str(str_at(event, "/content").unwrap_or_default());
            }
            Some("result") => {
                out.input_tokens = u64_at(event, "/stats/input_tokens");
                out.output_tokens = u64_at(event, "/stats/output_tokens");
                if str_at(event, "/status") == Some("error") {
                    out.is_error = true;
                    error = str_at(event, "/error/message");
                }
            }
            _ => {}
        }
    }
    if out.text.is_empty()
        && let Some(message) = error
    {
        out.text = message.to_owned();
    }
    out
}

/// Codex `exec --json`: `thread.started`, then per turn `turn.started`, `item.*` events and
/// `turn.completed` (with usage) or `turn.failed`; `error` for stream errors.
fn codex(events: &[Value]) -> Option<ParsedOutput> {
    if !events.iter().any(|e| kind(e).is_some()) {
        return None;
    }
    let mut out = ParsedOutput::default();
    let mut answer = None;
    let mut error = None;
    for event in events {
        match kind(event) {
            Some("thread.started") => {
                out.session_id = str_at(event, "/thread_id").map(str::to_owned);
            }
            // The agent speaks in several messages over a run; the last one is its answer.
            Some("item.completed") if str_at(event, "/item/type") == Some("agent_message") => {
                answer = str_at(event, "/item/text");
            }
            // `input_tokens` already includes `cached_input_tokens` (OpenAI's usage convention).
            Some("turn.completed") => {
                add(&mut out.input_tokens, u64_at(event, "/usage/input_tokens"));
                add(
                    &mut out.output_tokens,
                    u64_at(event, "/usage/output_tokens"),
                );
            }
            Some("turn.failed") => {
                out.is_error = true;
                error = str_at(event, "/error/message").or(error);
            }
            Some("error") => {
                out.is_error = true;
                error = str_at(event, "/message").or(error);
            }
            _ => {}
        }
    }
    out.text = answer.or(error).unwrap_or_default().to_owned();
    Some(out)
}

/// flotilla-agent: the last `{"type":"result", "result", "is_error", "num_turns", "usage",
/// "transcript"}` line. `raw` is the transcript (the conversation with the model), or the
/// result line itself when it has none.
fn flotilla(events: &[Value]) -> Option<ParsedOutput> {
    let result = events.iter().rev().find(|e| kind(e) == Some("result"))?;
    let raw = result
        .get("transcript")
        .filter(|t| t.is_array())
        .unwrap_or(result)
        .clone();
    Some(ParsedOutput {
        text: str_at(result, "/result").unwrap_or_default().to_owned(),
        num_turns: u64_at(result, "/num_turns").and_then(|n| u32::try_from(n).ok()),
        input_tokens: u64_at(result, "/usage/input_tokens"),
        output_tokens: u64_at(result, "/usage/output_tokens"),
        is_error: result.get("is_error").and_then(Value::as_bool) == Some(true),
        raw: Some(raw),
        parsed: true,
        ..ParsedOutput::default()
    })
}

/// OpenCode `run --format json`: `{type, timestamp, sessionID, part}` lines: `step_start`,
/// `text`, `tool_use`, `reasoning`, `step_finish` (cost and tokens of the step) and `error`.
fn opencode(events: &[Value]) -> Option<ParsedOutput> {
    if !events.iter().any(|e| kind(e).is_some()) {
        return None;
    }
    let mut out = ParsedOutput::default();
    // Text of the current step; a step that calls tools is followed by another, and the answer
    // is the text of the last step that said anything.
    let mut step = Vec::new();
    let mut answer = Vec::new();
    let mut error = None;
    for event in events {
        if out.session_id.is_none() {
            out.session_id = str_at(event, "/sessionID").map(str::to_owned);
        }
        match kind(event) {
            Some("step_start") => step.clear(),
            Some("text") => {
                if let Some(text) = str_at(event, "/part/text") {
                    step.push(text);
                    answer.clone_from(&step);
                }
            }
            Some("step_finish") => {
                add_f64(&mut out.cost_usd, f64_at(event, "/part/cost"));
                // Cache reads and writes are input too, and reasoning is billed as output:
                // the same totals as the other engines report.
                for field in ["input", "cache/read", "cache/write"] {
                    add(
                        &mut out.input_tokens,
                        u64_at(event, &format!("/part/tokens/{field}")),
                    );
                }
                for field in ["output", "reasoning"] {
                    add(
                        &mut out.output_tokens,
                        u64_at(event, &format!("/part/tokens/{field}")),
                    );
                }
            }
            Some("error") => {
                out.is_error = true;
                error = str_at(event, "/error/data/message")
                    .or_else(|| str_at(event, "/error/message"))
                    .or_else(|| str_at(event, "/error/name"))
                    .or(error);
            }
            _ => {}
        }
    }
    out.text = if answer.is_empty() {
        error.unwrap_or_default().to_owned()
    } else {
        answer.join("\n")
    };
    Some(out)
}

/// Aider prints plain text: the answer is all of it. After each request to the model it prints
/// `Tokens: 2.4k sent, 1.9k cache write, 5.0k cache hit, 56 received.` and, when it knows the
/// price, `Cost: $0.0081 message, $0.01 session.` on the same line or the next.
fn aider(stdout: &str) -> ParsedOutput {
    let mut out = plain(stdout);
    for line in stdout.lines().map(str::trim) {
        if let Some(report) = line.strip_prefix("Tokens:") {
            for item in report.split(',') {
                let Some((count, label)) = item.trim().split_once(' ') else {
                    continue;
                };
                // "sent" is what aider counts as input (cache writes included, as the price
                // does); cache hits are listed apart and left out.
                if label == "sent" {
                    add(&mut out.input_tokens, aider_count(count));
                } else if label.starts_with("received") {
                    add(&mut out.output_tokens, aider_count(count));
                }
            }
        }
        if (line.starts_with("Tokens:") || line.starts_with("Cost:"))
            && let Some((_, cost)) = line.split_once(" message, $")
            && let Some((session, _)) = cost.split_once(" session")
            && let Ok(usd) = session.parse::<f64>()
        {
            // The session figure is cumulative: the last one is the job's cost.
            out.cost_usd = Some(usd);
        }
    }
    out
}

/// Aider's rounded counts: `56`, `2.4k`, `12k` (and `M`, to be safe).
fn aider_count(count: &str) -> Option<u64> {
    let (number, scale) = match count.chars().last()? {
        'k' | 'K' => (&count[..count.len() - 1], 1e3),
        'M' => (&count[..count.len() - 1], 1e6),
        _ => (count, 1.0),
    };
    let value = number.parse::<f64>().ok()? * scale;
    (value.is_finite() && value >= 0.0).then(|| value.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Engine;

    macro_rules! fixture {
        ($path:literal) => {
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../tests/fixtures/",
                $path
            ))
        };
    }

    macro_rules! fixture_engine {
        ($stem:literal) => {
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../engines/",
                $stem,
                ".toml"
            ))
        };
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    /// The event types of a JSON-lines `raw`, in order.
    fn raw_kinds(out: &ParsedOutput) -> Vec<&str> {
        out.raw
            .as_ref()
            .and_then(Value::as_array)
            .unwrap()
            .iter()
            .map(|e| kind(e).unwrap())
            .collect()
    }

    #[test]
    fn claude_json_result() {
        let out = parse(Parser::Claude, "json", fixture!("claude/result.json"));
        assert!(out.parsed);
        assert!(!out.is_error);
        assert_eq!(
            out.text,
            "I added a `--verbose` flag to the CLI and a test for it.\n\nAll 42 tests pass."
        );
        assert_eq!(
            out.session_id.as_deref(),
            Some("3f2a9c1e-6b7d-4e8f-a1b2-c3d4e5f60718")
        );
        assert!(close(out.cost_usd, 0.0821745));
        assert_eq!(out.input_tokens, Some(18 + 5067 + 17254));
        assert_eq!(out.output_tokens, Some(424));
        assert_eq!(out.num_turns, Some(3));
        let raw = out.raw.unwrap();
        assert_eq!(raw["type"], "result");
        assert_eq!(raw["usage"]["cache_read_input_tokens"], 17254);
    }

    #[test]
    fn claude_api_error_is_an_error_result() {
        let out = parse(Parser::Claude, "json", fixture!("claude/api_error.json"));
        assert!(out.parsed);
        assert!(out.is_error);
        assert_eq!(out.text, "Invalid API key · Please run /login");
        assert_eq!(
            out.session_id.as_deref(),
            Some("7d0e5b2a-9c41-4f3e-8a6d-2b1c0e9f8a7d")
        );
        assert!(close(out.cost_usd, 0.0));
        assert_eq!(out.input_tokens, Some(0));
        assert_eq!(out.output_tokens, Some(0));
        assert_eq!(out.num_turns, Some(1));
        assert!(out.raw.is_some());
    }

    #[test]
    fn claude_max_turns_names_the_limit() {
        let out = parse(Parser::Claude, "json", fixture!("claude/max_turns.json"));
        assert!(out.parsed);
        assert!(out.is_error);
        assert_eq!(out.text, "error_max_turns");
        assert_eq!(
            out.session_id.as_deref(),
            Some("a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d")
        );
        assert!(close(out.cost_usd, 0.1432));
        assert_eq!(out.input_tokens, Some(42 + 8120 + 40310));
        assert_eq!(out.output_tokens, Some(1933));
        assert_eq!(out.num_turns, Some(5));
    }

    #[test]
    fn claude_errors_array_is_the_text() {
        let out = parse(
            Parser::Claude,
            "json",
            r#"{"type":"result","subtype":"error_during_execution","is_error":true,"errors":["No conversation found","bye"]}"#,
        );
        assert!(out.is_error);
        assert_eq!(out.text, "No conversation found\nbye");
    }

    #[test]
    fn claude_legacy_cost_usd() {
        let out = parse(Parser::Claude, "json", fixture!("claude/legacy.json"));
        assert!(out.parsed);
        assert!(!out.is_error);
        assert_eq!(out.text, "The response text here...");
        assert_eq!(out.session_id.as_deref(), Some("abc123"));
        assert!(close(out.cost_usd, 0.003));
        assert_eq!(out.input_tokens, None);
        assert_eq!(out.output_tokens, None);
        assert_eq!(out.num_turns, Some(6));
    }

    #[test]
    fn claude_stream_json() {
        let out = parse(
            Parser::Claude,
            "stream-json",
            fixture!("claude/stream.jsonl"),
        );
        assert!(out.parsed);
        assert!(!out.is_error);
        assert_eq!(out.text, r#"The file has two lines: "hello" and "world"."#);
        assert_eq!(
            out.session_id.as_deref(),
            Some("e8889acf-5473-49e2-bd81-4896717df7c7")
        );
        assert!(close(out.cost_usd, 0.19243785000000002));
        assert_eq!(out.input_tokens, Some(10 + 5567 + 27939));
        assert_eq!(out.output_tokens, Some(19));
        assert_eq!(out.num_turns, Some(2));
        assert_eq!(
            raw_kinds(&out),
            ["system", "assistant", "user", "assistant", "result"]
        );
    }

    #[test]
    fn claude_stream_without_result_keeps_the_last_assistant_text() {
        let stream = fixture!("claude/stream.jsonl");
        let cut: Vec<&str> = stream.lines().take(4).collect();
        let cut = format!("\n{}\nnot json\n{{\"type\":\"assis", cut.join("\n\n"));
        let out = parse(Parser::Claude, "stream-json", &cut);
        assert!(out.parsed);
        assert!(!out.is_error);
        assert_eq!(out.text, r#"The file has two lines: "hello" and "world"."#);
        assert_eq!(
            out.session_id.as_deref(),
            Some("e8889acf-5473-49e2-bd81-4896717df7c7")
        );
        assert_eq!(out.cost_usd, None);
        assert_eq!(out.num_turns, None);
        assert_eq!(
            raw_kinds(&out),
            ["system", "assistant", "user", "assistant"]
        );
    }

    #[test]
    fn claude_format_mismatch_and_stray_lines_still_parse() {
        // json format, but the CLI printed events; and a notice before a json document.
        let out = parse(Parser::Claude, "json", fixture!("claude/stream.jsonl"));
        assert!(out.parsed);
        assert_eq!(out.num_turns, Some(2));
        let noisy = format!("warning: something\n{}", fixture!("claude/result.json"));
        let out = parse(Parser::Claude, "json", &noisy);
        assert!(out.parsed);
        assert_eq!(out.num_turns, Some(3));
        assert_eq!(out.raw.unwrap()["type"], "result");
    }

    #[test]
    fn claude_text_format_is_plain() {
        let out = parse(Parser::Claude, "text", "Done.\n");
        assert_eq!(
            out,
            ParsedOutput {
                text: "Done.".to_owned(),
                parsed: true,
                ..ParsedOutput::default()
            }
        );
    }

    #[test]
    fn gemini_json_response() {
        let out = parse(Parser::Gemini, "json", fixture!("gemini/response.json"));
        assert!(out.parsed);
        assert!(!out.is_error);
        assert_eq!(
            out.text,
            "The project has 3 Rust crates: `flotilla-proto`, `flotilla-catalog` and `agent-node`."
        );
        assert_eq!(
            out.session_id.as_deref(),
            Some("6b5e9a0c-1f2d-4c3b-8a7e-9d0c1b2a3f4e")
        );
        assert_eq!(out.cost_usd, None);
        assert_eq!(out.input_tokens, Some(24401 + 1203));
        assert_eq!(out.output_tokens, Some(215 + 12));
        assert_eq!(out.num_turns, None);
        assert!(out.raw.unwrap()["stats"]["models"]["gemini-2.5-pro"].is_object());
    }

    #[test]
    fn gemini_json_error() {
        let out = parse(Parser::Gemini, "json", fixture!("gemini/error.json"));
        assert!(out.parsed);
        assert!(out.is_error);
        assert!(
            out.text.starts_with("Please set an Auth method"),
            "{}",
            out.text
        );
        assert_eq!(
            out.session_id.as_deref(),
            Some("0f9e8d7c-6b5a-4938-a271-6c5b4a392817")
        );
        assert_eq!(out.input_tokens, None);
        assert_eq!(out.output_tokens, None);
        assert_eq!(out.raw.unwrap()["error"]["code"], 41);
    }

    #[test]
    fn gemini_stream_json() {
        let out = parse(
            Parser::Gemini,
            "stream-json",
            fixture!("gemini/stream.jsonl"),
        );
        assert!(out.parsed);
        assert!(!out.is_error);
        assert_eq!(out.text, "There are 2 crates.");
        assert_eq!(
            out.session_id.as_deref(),
            Some("2c7d1e9a-4b3f-4e8d-9a6c-1f0e2d3c4b5a")
        );
        assert_eq!(out.input_tokens, Some(25604));
        assert_eq!(out.output_tokens, Some(227));
        assert_eq!(out.cost_usd, None);
        assert_eq!(out.num_turns, None);
        assert_eq!(
            raw_kinds(&out),
            [
                "init",
                "message",
                "tool_use",
                "tool_result",
                "message",
                "message",
                "result"
            ]
        );
    }

    #[test]
    fn gemini_stream_error_result() {
        let stream = concat!(
            r#"{"type":"init","timestamp":"t","session_id":"s1","model":"m"}"#,
            "\n",
            r#"{"type":"result","timestamp":"t","status":"error","error":{"type":"MaxSessionTurnsError","message":"Maximum session turns exceeded"},"stats":{"input_tokens":50,"output_tokens":7}}"#,
        );
        let out = parse(Parser::Gemini, "stream-json", stream);
        assert!(out.parsed);
        assert!(out.is_error);
        assert_eq!(out.text, "Maximum session turns exceeded");
        assert_eq!(out.session_id.as_deref(), Some("s1"));
        assert_eq!(out.input_tokens, Some(50));
        assert_eq!(out.output_tokens, Some(7));
    }

    #[test]
    fn codex_exec_json() {
        // Codex prints JSON lines whatever the job's output_format says.
        for format in ["json", "stream-json", "text"] {
            let out = parse(Parser::Codex, format, fixture!("codex/exec.jsonl"));
            assert!(out.parsed);
            assert!(!out.is_error);
            assert_eq!(
                out.text,
                "Fixed the off-by-one in `lib.rs`; all 12 tests pass."
            );
            assert_eq!(
                out.session_id.as_deref(),
                Some("0199a213-81c0-7800-8aa1-bbab2a035a53")
            );
            assert_eq!(out.input_tokens, Some(24763));
            assert_eq!(out.output_tokens, Some(122));
            assert_eq!(out.cost_usd, None);
            assert_eq!(out.num_turns, None);
            assert_eq!(raw_kinds(&out).len(), 9);
        }
    }

    #[test]
    fn codex_failed_turn() {
        let out = parse(Parser::Codex, "json", fixture!("codex/failed.jsonl"));
        assert!(out.parsed);
        assert!(out.is_error);
        assert_eq!(
            out.text,
            "stream error: unexpected status 401 Unauthorized: Incorrect API key provided"
        );
        assert_eq!(
            out.session_id.as_deref(),
            Some("0199a214-02d7-7c11-9d2e-5f4e3d2c1b0a")
        );
        assert_eq!(out.input_tokens, None);
        assert_eq!(out.output_tokens, None);
        assert_eq!(
            raw_kinds(&out),
            ["thread.started", "turn.started", "error", "turn.failed"]
        );
    }

    #[test]
    fn opencode_run_json() {
        let out = parse(Parser::Opencode, "json", fixture!("opencode/run.jsonl"));
        assert!(out.parsed);
        assert!(!out.is_error);
        assert_eq!(out.text, "The directory holds `Cargo.toml` and `src/`.");
        assert_eq!(
            out.session_id.as_deref(),
            Some("ses_44f9562d4ffeAbCdEf0123456789")
        );
        assert!(close(out.cost_usd, 0.0123 + 0.0045));
        assert_eq!(out.input_tokens, Some(237 + 7936 + 1200 + 609 + 9136));
        assert_eq!(out.output_tokens, Some(39 + 67 + 12 + 9));
        assert_eq!(out.num_turns, None);
        assert_eq!(
            raw_kinds(&out),
            [
                "step_start",
                "tool_use",
                "step_finish",
                "step_start",
                "text",
                "step_finish"
            ]
        );
    }

    #[test]
    fn opencode_error() {
        let out = parse(Parser::Opencode, "json", fixture!("opencode/error.jsonl"));
        assert!(out.parsed);
        assert!(out.is_error);
        assert_eq!(out.text, "invalid x-api-key");
        assert_eq!(
            out.session_id.as_deref(),
            Some("ses_44f8f1a23ffeQwErTy987654321")
        );
        assert_eq!(out.cost_usd, None);
        assert_eq!(out.input_tokens, None);
        assert_eq!(out.output_tokens, None);
    }

    #[test]
    fn aider_text_and_usage() {
        let stdout = fixture!("aider/message.txt");
        let out = parse(Parser::Aider, "json", stdout);
        assert!(out.parsed);
        assert!(!out.is_error);
        assert_eq!(out.text, stdout.trim_end());
        assert_eq!(out.input_tokens, Some(2400 + 3100));
        assert_eq!(out.output_tokens, Some(56 + 88));
        assert!(close(out.cost_usd, 0.01));
        assert_eq!(out.session_id, None);
        assert_eq!(out.num_turns, None);
        assert_eq!(out.raw, None);
    }

    #[test]
    fn aider_without_a_price_reports_tokens_only() {
        let out = parse(
            Parser::Aider,
            "text",
            "Hi.\n\nTokens: 12k sent, 999 received.\n",
        );
        assert_eq!(out.input_tokens, Some(12_000));
        assert_eq!(out.output_tokens, Some(999));
        assert_eq!(out.cost_usd, None);
        assert_eq!(aider_count("1.2M"), Some(1_200_000));
        assert_eq!(aider_count("k"), None);
        assert_eq!(aider_count(""), None);
    }

    #[test]
    fn text_parser_is_the_output() {
        for format in ["json", "text", "stream-json"] {
            let out = parse(Parser::Text, format, "line 1\nline 2\n\n");
            assert_eq!(out.text, "line 1\nline 2");
            assert!(out.parsed);
            assert_eq!(out.raw, None);
        }
    }

    #[test]
    fn garbage_is_unparsed_text() {
        let garbage = [
            "",
            "\n",
            "Segmentation fault\n",
            "{\"type\":\"res",
            "[1, 2, 3]\n",
            "42",
            "{\"foo\": 1}\n",
            "\u{0}\u{1}binary\r\n",
        ];
        let parsers = [
            Parser::Claude,
            Parser::Opencode,
            Parser::Codex,
            Parser::Gemini,
        ];
        for parser in parsers {
            for format in ["json", "stream-json"] {
                for input in garbage {
                    let out = parse(parser, format, input);
                    let want = ParsedOutput {
                        text: input.trim_end_matches(['\n', '\r']).to_owned(),
                        ..ParsedOutput::default()
                    };
                    assert_eq!(out, want, "{parser:?} {format} {input:?}");
                }
            }
        }
    }

    #[test]
    fn flotilla_agent_result_line() {
        let stdout = concat!(
            "{\"type\":\"result\",\"subtype\":\"success\",\"is_error\":false,",
            "\"result\":\"The answer is 42\",\"num_turns\":4,",
            "\"usage\":{\"input_tokens\":800,\"output_tokens\":160},",
            "\"transcript\":[{\"role\":\"user\",\"content\":\"go\"},",
            "{\"role\":\"assistant\",\"content\":\"The answer is 42\"}]}\n"
        );
        let out = parse(Parser::Flotilla, "json", stdout);
        assert!(out.parsed && !out.is_error);
        assert_eq!(out.text, "The answer is 42");
        assert_eq!(out.num_turns, Some(4));
        assert_eq!(
            (out.input_tokens, out.output_tokens),
            (Some(800), Some(160))
        );
        assert_eq!(out.raw.as_ref().unwrap().as_array().unwrap().len(), 2);

        let error = "{\"type\":\"result\",\"is_error\":true,\"result\":\"max turns (2) reached\",\"num_turns\":2}\n";
        let out = parse(Parser::Flotilla, "text", error);
        assert!(out.is_error);
        assert_eq!(out.text, "max turns (2) reached");
        assert_eq!(out.raw.as_ref().unwrap()["type"], "result");
        // Killed before its result line: the output as text, unparsed.
        let out = parse(Parser::Flotilla, "json", "half a line");
        assert!(!out.parsed);
    }

    #[test]
    fn parser_names() {
        #[derive(Deserialize)]
        struct Holder {
            parser: Parser,
        }
        for parser in [
            Parser::Claude,
            Parser::Opencode,
            Parser::Codex,
            Parser::Gemini,
            Parser::Aider,
            Parser::Flotilla,
            Parser::Text,
        ] {
            let holder: Holder =
                toml::from_str(&format!("parser = \"{}\"", parser.as_str())).unwrap();
            assert_eq!(holder.parser, parser);
        }
        assert_eq!(Parser::default(), Parser::Text);
    }

    /// Runs the fake CLI of `deploy/images/test-worker/fake-bin/` with the argv the shipped engine file
    /// builds, and parses what it prints with the engine's parser.
    fn run_fake(stem: &str, engine_text: &str, format: &str, prompt: &str) -> (i32, ParsedOutput) {
        let engine = Engine::parse(stem, engine_text).unwrap();
        let request: flotilla_proto::JobRequest = serde_json::from_value(serde_json::json!({
            "job_id": "a-1", "agent_id": "a", "engine": stem, "profile": "default",
            "prompt": prompt, "model": "some-model", "system_prompt": "be brief",
            "allowed_tools": ["Read", "Bash(git:*)"], "max_turns": 3, "max_budget_usd": 1.5,
            "output_format": format, "mcp_config": {"mcpServers": {}},
            "timeout_seconds": 60, "resources": {"memory_bytes": 1 << 30, "nano_cpus": 1},
            "created_at": "2026-01-02T03:04:05Z",
        }))
        .unwrap();
        let argv = engine.command_line(&request);
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/images/test-worker/fake-bin/"
        );
        let output = std::process::Command::new("sh")
            .arg(format!("{script}{}", engine.binary))
            .args(&argv[1..])
            .output()
            .unwrap();
        let stdout = String::from_utf8(output.stdout).unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let code = output.status.code().unwrap();
        assert!(code < 2, "{stem} {argv:?}: exit {code}: {stderr}");
        (code, parse(engine.output.parser, format, &stdout))
    }

    #[test]
    fn fake_clis_accept_the_engine_argv_and_print_what_the_parsers_read() {
        let prompt = "say \"hi\" \\ now\tplease\nline 2: 100% of $HOME `x`";
        let engines = [
            (
                "claude-code",
                fixture_engine!("claude-code"),
                "claude",
                &["json", "stream-json", "text"][..],
            ),
            (
                "gemini",
                fixture_engine!("gemini"),
                "gemini",
                &["json", "stream-json", "text"],
            ),
            (
                "codex",
                fixture_engine!("codex"),
                "codex",
                &["json", "stream-json"],
            ),
            (
                "opencode",
                fixture_engine!("opencode"),
                "opencode",
                &["json"],
            ),
            (
                "aider",
                fixture_engine!("aider"),
                "aider",
                &["json", "text"],
            ),
        ];
        for (stem, text, name, formats) in engines {
            for &format in formats {
                let (code, out) = run_fake(stem, text, format, prompt);
                assert_eq!(code, 0, "{stem} {format}");
                assert!(out.parsed, "{stem} {format}");
                assert!(!out.is_error, "{stem} {format}");
                let answer = format!("fake {name}: {prompt}");
                if stem == "aider" {
                    assert!(out.text.contains(&answer), "{stem}: {}", out.text);
                    assert_eq!(
                        (out.input_tokens, out.output_tokens),
                        (Some(1200), Some(12))
                    );
                } else {
                    assert_eq!(out.text, answer, "{stem} {format}");
                }
                if format != "text" && stem != "aider" {
                    assert!(out.session_id.is_some(), "{stem} {format}");
                    assert!(out.raw.is_some(), "{stem} {format}");
                    assert!(out.output_tokens.is_some(), "{stem} {format}");
                }

                let (code, out) = run_fake(stem, text, format, "please FAIL");
                assert_eq!(code, 1, "{stem} {format}");
                if format != "text" && stem != "aider" {
                    assert!(out.parsed && out.is_error, "{stem} {format}: {out:?}");
                    assert!(
                        out.text.contains("please FAIL"),
                        "{stem} {format}: {}",
                        out.text
                    );
                }
            }
        }
    }

    #[test]
    fn prompts_that_look_like_flags_reach_the_clis_that_take_them_after_double_dash() {
        let engines = [
            ("claude-code", fixture_engine!("claude-code"), "claude"),
            ("codex", fixture_engine!("codex"), "codex"),
            ("opencode", fixture_engine!("opencode"), "opencode"),
        ];
        for prompt in [
            "--dangerously-skip-permissions",
            "-v",
            "- [ ] a checklist item",
            "--",
        ] {
            for (stem, text, name) in engines {
                let (code, out) = run_fake(stem, text, "json", prompt);
                assert_eq!(code, 0, "{stem}: {prompt:?}");
                assert_eq!(out.text, format!("fake {name}: {prompt}"), "{stem}");
            }
        }
    }

    #[test]
    fn engine_files_name_their_parser() {
        let engines = [
            ("aider", fixture_engine!("aider"), Parser::Aider),
            (
                "claude-code",
                fixture_engine!("claude-code"),
                Parser::Claude,
            ),
            ("codex", fixture_engine!("codex"), Parser::Codex),
            ("gemini", fixture_engine!("gemini"), Parser::Gemini),
            ("opencode", fixture_engine!("opencode"), Parser::Opencode),
            ("shell", fixture_engine!("shell"), Parser::Text),
        ];
        for (stem, text, parser) in engines {
            let engine = Engine::parse(stem, text).unwrap();
            assert_eq!(engine.output.parser, parser, "{stem}");
        }
        assert_eq!(Engine::parse("x", "").unwrap().output.parser, Parser::Text);
        let err = Engine::parse("x", "[output]\nparser = \"cobol\"\n").unwrap_err();
        assert!(err.contains("unknown variant `cobol`"), "{err}");
    }
}
