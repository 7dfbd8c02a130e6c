//! flotilla-agent: Flotilla's own coding agent. It drives any OpenAI-compatible chat-completions
//! endpoint (in a job: the llm-gateway, with the job's token) through a loop of tool calls —
//! `shell`, `read_file`, `write_file`, `list_dir` inside /workspace — and prints each step on
//! stderr and the outcome as one JSON line on stdout (`[output] parser = "flotilla"`).
//!
//! Exit codes: 0 answered, 1 the model API failed, 2 bad arguments, 3 max turns reached,
//! 4 budget spent (the gateway answered 402), 5 deadline reached.

mod agent;
mod chat;
mod config;
mod http;
mod paths;
mod tools;

use std::{io::Write as _, process::ExitCode};

fn main() -> ExitCode {
    let env = |name: &str| std::env::var(name).ok();
    let config = match config::Config::from_args(std::env::args().skip(1), &env) {
        Ok(config) => config,
        Err(e) => return usage_error(&e.to_string()),
    };
    match agent::run(&config) {
        Ok(outcome) => {
            let line = outcome.result_line();
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
            if !outcome.overhead.is_empty() {
                let total: std::time::Duration = outcome.overhead.iter().sum();
                eprintln!(
                    "flotilla-agent: {} turns, own overhead {:.3} ms a turn on average",
                    outcome.num_turns,
                    total.as_secs_f64() * 1000.0 / outcome.overhead.len() as f64
                );
            }
            ExitCode::from(outcome.ending.exit_code())
        }
        Err(e) => usage_error(&e),
    }
}

/// Says what is wrong on stderr, and as a result line, so the job's result says it too.
fn usage_error(message: &str) -> ExitCode {
    eprintln!("flotilla-agent: {message}");
    let first = message.lines().next().unwrap_or_default();
    let line = serde_json::json!({"type": "result", "subtype": "error_usage", "is_error": true,
                                  "result": format!("flotilla-agent: {first}"), "num_turns": 0});
    println!("{line}");
    ExitCode::from(2)
}
