//! The loop: ask the model, run the tools it calls, give it their results, until it answers
//! without a tool call, or a limit ends the run. Every step goes to stderr as it happens (the
//! job's log stream); the outcome is one JSON line on stdout for the node's `flotilla` parser.

use std::{
    io::Write as _,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    chat::{self, Answer, ChatError, Client},
    config::Config,
    paths::Workspace,
    tools::{self, Tools},
};

const DEFAULT_SYSTEM_PROMPT: &str = "You are Flotilla's coding agent, running unattended in a \
container. Your working directory is /workspace, which holds the task's files; nobody can \
answer questions, so decide and act. Use the tools to inspect, change and test things: `shell` \
runs /bin/sh commands, `read_file`, `write_file` and `list_dir` work on files inside \
/workspace. Check your work by running it. When the task is done, reply with a short final \
answer and no tool call.";

/// Files the node writes for the engine's `instructions_file`; read into the system prompt.
const INSTRUCTIONS_FILE: &str = "AGENTS.md";
const MAX_INSTRUCTIONS: usize = 32 << 10;
/// The transcript in the result line stays under this, so the node's 1 MiB read keeps it whole.
const MAX_TRANSCRIPT: usize = 512 << 10;
const RETRIES: u32 = 4;

/// How a run ended, and the process exit code for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Answered,
    MaxTurns,
    Deadline,
    Budget,
    ApiError,
}

impl Ending {
    fn subtype(self) -> &'static str {
        match self {
            Self::Answered => "success",
            Self::MaxTurns => "error_max_turns",
            Self::Deadline => "error_deadline",
            Self::Budget => "error_budget",
            Self::ApiError => "error_api",
        }
    }

    pub fn exit_code(self) -> u8 {
        match self {
            Self::Answered => 0,
            Self::ApiError => 1,
            Self::MaxTurns => 3,
            Self::Budget => 4,
            Self::Deadline => 5,
        }
    }
}

/// The outcome printed as the result line.
#[derive(Debug)]
pub struct Outcome {
    pub ending: Ending,
    pub text: String,
    pub num_turns: u32,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub messages: Vec<Value>,
    /// Per turn after the first: the agent's own time between an answer and the next request,
    /// tool runs excluded.
    pub overhead: Vec<Duration>,
}

impl Outcome {
    pub fn result_line(&self) -> Value {
        let overhead_us: Vec<u64> = self
            .overhead
            .iter()
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .collect();
        json!({
            "type": "result",
            "subtype": self.ending.subtype(),
            "is_error": self.ending != Ending::Answered,
            "result": self.text,
            "num_turns": self.num_turns,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens},
            "overhead_us": overhead_us,
            "transcript": fit_transcript(&self.messages, MAX_TRANSCRIPT),
        })
    }
}

pub fn run(config: &Config) -> Result<Outcome, String> {
    let started = Instant::now();
    let deadline = started + config.timeout;
    let workspace = Workspace::new(&config.workspace)
        .map_err(|e| format!("the workspace {}: {e}", config.workspace.display()))?;
    let client = Client {
        base: config.base.clone(),
        key: config.key.clone(),
        timeout: Duration::from_secs(600).min(config.timeout),
    };
    let tools = Tools {
        workspace,
        allowed: config.allowed_tools.clone(),
        deadline,
    };
    let mut outcome = Outcome {
        ending: Ending::MaxTurns,
        text: String::new(),
        num_turns: 0,
        input_tokens: 0,
        output_tokens: 0,
        messages: vec![
            json!({"role": "system", "content": system_prompt(config, &tools)}),
            json!({"role": "user", "content": config.prompt}),
        ],
        overhead: Vec::new(),
    };
    let definitions = tools::definitions(&config.allowed_tools);
    // When the last answer was in and how long its tools took: the agent's own time is the rest.
    let mut last_answer: Option<(Instant, Duration)> = None;
    while outcome.num_turns < config.max_turns {
        if Instant::now() >= deadline {
            let text = format!(
                "stopped at the deadline ({}s) after {} turns without a final answer",
                config.timeout.as_secs(),
                outcome.num_turns
            );
            return Ok(stop(outcome, Ending::Deadline, text));
        }
        let turn = outcome.num_turns + 1;
        let request = request_body(config, &outcome.messages, &definitions);
        let answer = match ask(
            &client,
            config,
            &request,
            turn,
            deadline,
            &mut last_answer,
            &mut outcome.overhead,
        ) {
            Ok(answer) => answer,
            Err(ChatError::Budget(message)) => {
                say(
                    turn,
                    &format!("the llm-gateway refused the call (402): {message}"),
                );
                return Ok(stop(
                    outcome,
                    Ending::Budget,
                    format!(
                        "budget exceeded: the llm-gateway refused turn {turn} (402): {message}"
                    ),
                ));
            }
            Err(e) => {
                say(turn, &format!("model call failed: {e}"));
                return Ok(stop(
                    outcome,
                    Ending::ApiError,
                    format!("model call failed on turn {turn}: {e}"),
                ));
            }
        };
        let answered_at = Instant::now();
        outcome.num_turns = turn;
        outcome.input_tokens += answer.input_tokens;
        outcome.output_tokens += answer.output_tokens;
        let answer = with_ids(answer, turn);
        outcome.messages.push(answer.message());
        if answer.tool_calls.is_empty() {
            outcome.ending = Ending::Answered;
            outcome.text = answer.content;
            return Ok(outcome);
        }
        let mut tool_time = Duration::ZERO;
        for call in &answer.tool_calls {
            say(
                turn,
                &format!("-> {} {}", call.name, chat::head(&call.arguments, 2000)),
            );
            let began = Instant::now();
            let result = tools.call(&call.name, &call.arguments);
            tool_time += began.elapsed();
            say(turn, &format!("<- {}", preview(&result.content)));
            outcome.messages.push(json!({
                "role": "tool", "tool_call_id": call.id, "content": result.content,
            }));
        }
        last_answer = Some((answered_at, tool_time));
    }
    let turns = outcome.num_turns;
    Ok(stop(
        outcome,
        Ending::MaxTurns,
        format!("max turns ({turns}) reached without a final answer"),
    ))
}

fn stop(mut outcome: Outcome, ending: Ending, text: String) -> Outcome {
    eprintln!("flotilla-agent: {text}");
    outcome.ending = ending;
    outcome.text = text;
    outcome
}

/// One model call, retried on rate limits and overloads while the deadline allows; records the
/// agent's overhead since the previous answer once the request is on its way.
fn ask(
    client: &Client,
    config: &Config,
    request: &Value,
    turn: u32,
    deadline: Instant,
    last_answer: &mut Option<(Instant, Duration)>,
    overhead: &mut Vec<Duration>,
) -> Result<Answer, ChatError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut printed = false;
        let mut on_text = |text: &str| {
            if text.is_empty() {
                return;
            }
            let mut err = std::io::stderr().lock();
            if !printed {
                let _ = write!(err, "[turn {turn}] ");
                printed = true;
            }
            let _ = err.write_all(text.as_bytes());
        };
        let sent = Instant::now();
        if let Some((answered, tools)) = last_answer.take() {
            overhead.push(
                sent.saturating_duration_since(answered)
                    .saturating_sub(tools),
            );
        }
        let result = client.complete(request, config.stream, &mut on_text);
        if printed {
            eprintln!();
        }
        match result {
            Err(e) if e.retryable() && attempt < RETRIES => {
                let wait = match &e {
                    ChatError::Status {
                        retry_after: Some(s),
                        ..
                    } => Duration::from_secs((*s).min(60)),
                    _ => Duration::from_secs(1 << attempt),
                };
                if Instant::now() + wait >= deadline {
                    return Err(e);
                }
                say(turn, &format!("{e}; retrying in {}s", wait.as_secs()));
                std::thread::sleep(wait);
            }
            other => return other,
        }
    }
}

fn request_body(config: &Config, messages: &[Value], tools: &Value) -> Value {
    let mut body = json!({"model": config.model, "messages": messages});
    if tools.as_array().is_some_and(|t| !t.is_empty()) {
        body["tools"] = tools.clone();
    }
    if config.stream {
        body["stream"] = json!(true);
        // Usage arrives in a last chunk only when asked for (the gateway meters it either way).
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

/// Calls without an id (some servers leave it out) get one, so their results can name them.
fn with_ids(mut answer: Answer, turn: u32) -> Answer {
    for (i, call) in answer.tool_calls.iter_mut().enumerate() {
        if call.id.is_empty() {
            call.id = format!("call_{turn}_{i}");
        }
    }
    answer
}

/// The given system prompt (or the default), with the job's instructions file when there is one.
fn system_prompt(config: &Config, tools: &Tools) -> String {
    let mut prompt = config
        .system_prompt
        .clone()
        .unwrap_or_else(|| DEFAULT_SYSTEM_PROMPT.to_owned());
    if !config.allowed_tools.iter().any(|t| t == "shell") {
        prompt.push_str(" The shell tool is not available in this run.");
    }
    let path = tools.workspace.root().join(INSTRUCTIONS_FILE);
    if let Ok(text) = std::fs::read_to_string(&path) {
        prompt.push_str(&format!(
            "\n\n# Instructions ({INSTRUCTIONS_FILE})\n\n{}",
            chat::head(&text, MAX_INSTRUCTIONS)
        ));
    }
    prompt
}

fn say(turn: u32, line: &str) {
    eprintln!("[turn {turn}] {line}");
}

/// The head of a tool result for the log: a few lines, a few hundred characters.
fn preview(content: &str) -> String {
    let lines: Vec<&str> = content.lines().take(6).collect();
    let mut text = chat::head(&lines.join("\n    "), 400).to_owned();
    if text.len() < content.len() {
        text.push_str(" …");
    }
    text
}

/// The conversation as it fits in `max` bytes of JSON: long contents are cut first, then the
/// oldest turns after the prompt are left out, with a note saying so.
fn fit_transcript(messages: &[Value], max: usize) -> Value {
    let size = |m: &[Value]| serde_json::to_string(m).map_or(usize::MAX, |s| s.len());
    if size(messages) <= max {
        return Value::Array(messages.to_vec());
    }
    let mut cut: Vec<Value> = messages
        .iter()
        .map(|m| {
            let mut m = m.clone();
            if let Some(text) = m["content"].as_str().filter(|t| t.len() > 2000) {
                m["content"] = json!(format!(
                    "{} [cut in the transcript]",
                    chat::head(text, 2000)
                ));
            }
            m
        })
        .collect();
    // Sizes a message at a time: re-serializing the whole list per removal would be quadratic.
    let sizes: Vec<usize> = cut.iter().map(|m| m.to_string().len() + 1).collect();
    let mut total: usize = sizes.iter().sum::<usize>() + 1;
    let keep_head = 2.min(cut.len());
    let mut dropped = 0;
    while total > max && keep_head + dropped + 1 < cut.len() {
        total -= sizes[keep_head + dropped];
        dropped += 1;
    }
    cut.drain(keep_head..keep_head + dropped);
    if dropped > 0 {
        cut.insert(
            keep_head,
            json!({"role": "flotilla", "content": format!("{dropped} messages left out of the transcript")}),
        );
    }
    Value::Array(cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_transcript_is_cut_to_fit() {
        let mut messages = vec![
            json!({"role": "system", "content": "s"}),
            json!({"role": "user", "content": "u"}),
        ];
        for i in 0..200 {
            messages.push(
                json!({"role": "tool", "tool_call_id": i.to_string(), "content": "x".repeat(5000)}),
            );
        }
        let fitted = fit_transcript(&messages, 100_000);
        let list = fitted.as_array().unwrap();
        assert!(fitted.to_string().len() <= 100_000);
        assert_eq!(list[0]["role"], "system");
        assert_eq!(list[1]["role"], "user");
        assert!(
            list[2]["content"]
                .as_str()
                .unwrap()
                .ends_with("left out of the transcript")
        );
        assert_eq!(list.last().unwrap()["tool_call_id"], "199");
        let small = fit_transcript(&messages[..3], 100_000);
        assert_eq!(small.as_array().unwrap().len(), 3);
    }

    #[test]
    fn result_lines_say_how_the_run_ended() {
        let outcome = Outcome {
            ending: Ending::Budget,
            text: "budget exceeded".to_owned(),
            num_turns: 2,
            input_tokens: 5,
            output_tokens: 1,
            messages: vec![],
            overhead: vec![Duration::from_micros(250)],
        };
        let line = outcome.result_line();
        assert_eq!(line["type"], "result");
        assert_eq!(line["is_error"], true);
        assert_eq!(line["subtype"], "error_budget");
        assert_eq!(line["overhead_us"], json!([250]));
        assert_eq!(Ending::Budget.exit_code(), 4);
    }
}
