//! OpenAI Chat Completions: one request with tools, and the assistant's answer read from either
//! a JSON document or a stream of server-sent events whose tool-call deltas are assembled by
//! their `index`.

use std::{
    io::{BufRead, Read},
    time::Duration,
};

use serde_json::{Value, json};

use crate::http::{self, BaseUrl, HttpError};

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(transparent)]
    Http(#[from] HttpError),
    /// 402 from the llm-gateway: the job's budget is spent.
    #[error("{0}")]
    Budget(String),
    #[error("the model API answered {status}: {message}")]
    Status {
        status: u16,
        message: String,
        retry_after: Option<u64>,
    },
    #[error("cannot read the model's answer: {0}")]
    Read(String),
}

impl ChatError {
    /// Worth another try after a pause: rate limits, overload, a dropped connection.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Status { status, .. } => matches!(status, 408 | 429 | 500 | 502 | 503 | 504),
            Self::Http(HttpError::Connect { .. } | HttpError::Io { .. }) => true,
            Self::Http(_) | Self::Budget(_) | Self::Read(_) => false,
        }
    }
}

/// One tool call as the model asked for it; `arguments` is the raw JSON text, unchecked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Answer {
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
    pub finish_reason: Option<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

impl Answer {
    /// The assistant message to append to the conversation.
    pub fn message(&self) -> Value {
        let mut message = json!({"role": "assistant", "content": self.content});
        if !self.tool_calls.is_empty() {
            if self.content.is_empty() {
                message["content"] = Value::Null;
            }
            message["tool_calls"] = self
                .tool_calls
                .iter()
                .map(|c| {
                    json!({"id": c.id, "type": "function",
                           "function": {"name": c.name, "arguments": c.arguments}})
                })
                .collect();
        }
        message
    }
}

pub struct Client {
    pub base: BaseUrl,
    pub key: String,
    pub timeout: Duration,
}

impl Client {
    /// Sends the conversation; with `stream`, `on_text` sees the assistant's text as it comes.
    pub fn complete(
        &self,
        request: &Value,
        stream: bool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Answer, ChatError> {
        let body = request.to_string();
        let mut response = http::post_json(
            &self.base,
            "/chat/completions",
            &self.key,
            body.as_bytes(),
            self.timeout,
        )?;
        if !(200..300).contains(&response.status) {
            return Err(error_of(
                response.status,
                response.retry_after,
                &mut response.body,
            ));
        }
        // Some servers answer a streamed request with a plain document: go by what came.
        if stream && response.content_type.starts_with("text/event-stream") {
            read_stream(&mut response.body, on_text)
        } else {
            let mut text = String::new();
            response
                .body
                .read_to_string(&mut text)
                .map_err(|e| ChatError::Read(e.to_string()))?;
            let value: Value = serde_json::from_str(&text)
                .map_err(|e| ChatError::Read(format!("{e}: {}", head(&text, 200))))?;
            let answer = read_document(&value)?;
            on_text(&answer.content);
            Ok(answer)
        }
    }
}

/// The error a non-2xx answer carries: OpenAI's `{"error": {"message"}}` or the text.
fn error_of(status: u16, retry_after: Option<u64>, body: &mut impl Read) -> ChatError {
    let mut text = String::new();
    let _ = body.take(64 << 10).read_to_string(&mut text);
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("error"))
                .or_else(|| v.get("message"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| head(text.trim(), 500).to_owned());
    if status == 402 {
        return ChatError::Budget(message);
    }
    ChatError::Status {
        status,
        message,
        retry_after,
    }
}

pub fn head(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

fn usage_of(answer: &mut Answer, usage: &Value) {
    if let Some(n) = usage.get("prompt_tokens").and_then(Value::as_u64) {
        answer.input_tokens = n;
    }
    if let Some(n) = usage.get("completion_tokens").and_then(Value::as_u64) {
        answer.output_tokens = n;
    }
}

/// A non-streamed `chat.completion`.
pub fn read_document(value: &Value) -> Result<Answer, ChatError> {
    let choice = value.pointer("/choices/0").ok_or_else(|| {
        ChatError::Read(format!("no choices in {}", head(&value.to_string(), 300)))
    })?;
    let message = &choice["message"];
    let mut answer = Answer {
        content: message["content"].as_str().unwrap_or_default().to_owned(),
        finish_reason: choice["finish_reason"].as_str().map(str::to_owned),
        ..Answer::default()
    };
    for call in message["tool_calls"].as_array().into_iter().flatten() {
        let function = &call["function"];
        // Arguments are a JSON string; a server that sends an object is forgiven.
        let arguments = match &function["arguments"] {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        answer.tool_calls.push(ToolCall {
            id: call["id"].as_str().unwrap_or_default().to_owned(),
            name: function["name"].as_str().unwrap_or_default().to_owned(),
            arguments,
        });
    }
    usage_of(&mut answer, &value["usage"]);
    Ok(answer)
}

/// Assembles streamed `chat.completion.chunk`s into one answer.
#[derive(Debug, Default)]
pub struct Assembler {
    answer: Answer,
    /// Tool calls by their `index`, in the order the indices first appeared.
    calls: Vec<(u64, ToolCall)>,
}

impl Assembler {
    /// Takes one chunk; returns the text it added.
    pub fn push(&mut self, chunk: &Value) -> String {
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            usage_of(&mut self.answer, usage);
        }
        let Some(choice) = chunk.pointer("/choices/0") else {
            return String::new();
        };
        if let Some(reason) = choice["finish_reason"].as_str() {
            self.answer.finish_reason = Some(reason.to_owned());
        }
        let delta = &choice["delta"];
        for (position, call) in delta["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            // Some servers leave out `index` when there is one call a chunk: its position.
            let index = call["index"].as_u64().unwrap_or(position as u64);
            self.call_delta(index, call);
        }
        let text = delta["content"].as_str().unwrap_or_default();
        self.answer.content.push_str(text);
        text.to_owned()
    }

    fn call_delta(&mut self, index: u64, delta: &Value) {
        let slot = match self.calls.iter().position(|(i, _)| *i == index) {
            Some(slot) => slot,
            None => {
                self.calls.push((index, ToolCall::default()));
                self.calls.len() - 1
            }
        };
        let call = &mut self.calls[slot].1;
        if let Some(id) = delta["id"].as_str().filter(|id| !id.is_empty()) {
            id.clone_into(&mut call.id);
        }
        let function = &delta["function"];
        if let Some(name) = function["name"].as_str() {
            // OpenAI sends the name once; some servers repeat it whole in every delta.
            if call.name != name {
                call.name.push_str(name);
            }
        }
        match &function["arguments"] {
            Value::String(part) => call.arguments.push_str(part),
            Value::Null => {}
            whole => call.arguments = whole.to_string(),
        }
    }

    pub fn finish(mut self) -> Answer {
        self.answer.tool_calls = self.calls.into_iter().map(|(_, call)| call).collect();
        self.answer
    }
}

/// Reads `data:` events until `[DONE]` or the end of the body.
fn read_stream(
    body: &mut impl BufRead,
    on_text: &mut dyn FnMut(&str),
) -> Result<Answer, ChatError> {
    let mut assembler = Assembler::default();
    let mut line = String::new();
    loop {
        line.clear();
        let n = body
            .read_line(&mut line)
            .map_err(|e| ChatError::Read(e.to_string()))?;
        if n == 0 {
            break;
        }
        let Some(data) = line.trim_end().strip_prefix("data:") else {
            continue;
        };
        let data = data.trim_start();
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data)
            .map_err(|e| ChatError::Read(format!("{e}: {}", head(data, 200))))?;
        if let Some(message) = chunk.pointer("/error/message").and_then(Value::as_str) {
            return Err(ChatError::Read(format!("the stream failed: {message}")));
        }
        let text = assembler.push(&chunk);
        if !text.is_empty() {
            on_text(&text);
        }
    }
    Ok(assembler.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(delta: Value) -> Value {
        json!({"choices": [{"index": 0, "delta": delta, "finish_reason": null}]})
    }

    #[test]
    fn tool_call_deltas_are_assembled_by_index() {
        let mut a = Assembler::default();
        a.push(&chunk(json!({"role": "assistant", "content": "Let me "})));
        a.push(&chunk(json!({"content": "look."})));
        a.push(&chunk(json!({"tool_calls": [
            {"index": 0, "id": "call_a", "type": "function",
             "function": {"name": "shell", "arguments": ""}}]})));
        a.push(&chunk(json!({"tool_calls": [
            {"index": 1, "id": "call_b", "type": "function",
             "function": {"name": "read_file", "arguments": "{\"pa"}}]})));
        a.push(&chunk(json!({"tool_calls": [
            {"index": 0, "function": {"arguments": "{\"command\":"}}]})));
        a.push(&chunk(json!({"tool_calls": [
            {"index": 1, "function": {"arguments": "th\":\"x\"}"}},
            {"index": 0, "function": {"arguments": "\"ls\"}"}}]})));
        a.push(&json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}));
        a.push(&json!({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}));
        let answer = a.finish();
        assert_eq!(answer.content, "Let me look.");
        assert_eq!(answer.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!((answer.input_tokens, answer.output_tokens), (7, 3));
        assert_eq!(
            answer.tool_calls,
            [
                ToolCall {
                    id: "call_a".to_owned(),
                    name: "shell".to_owned(),
                    arguments: "{\"command\":\"ls\"}".to_owned()
                },
                ToolCall {
                    id: "call_b".to_owned(),
                    name: "read_file".to_owned(),
                    arguments: "{\"path\":\"x\"}".to_owned()
                },
            ]
        );
    }

    #[test]
    fn repeated_names_and_missing_indices_are_forgiven() {
        let mut a = Assembler::default();
        for part in ["{\"path\":", "\".\"}"] {
            a.push(&chunk(json!({"tool_calls": [
                {"function": {"name": "list_dir", "arguments": part}}]})));
        }
        let answer = a.finish();
        assert_eq!(answer.tool_calls.len(), 1);
        assert_eq!(answer.tool_calls[0].name, "list_dir");
        assert_eq!(answer.tool_calls[0].arguments, "{\"path\":\".\"}");
    }

    #[test]
    fn a_stream_is_read_until_done() {
        let events = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n\
                      : a comment\n\
                      data:{\"choices\":[{\"delta\":{\"content\":\" there\"},\"finish_reason\":\"stop\"}]}\n\n\
                      data: [DONE]\n\ndata: not json after done\n";
        let mut seen = String::new();
        let answer = read_stream(&mut events.as_bytes(), &mut |t| seen.push_str(t)).unwrap();
        assert_eq!(answer.content, "hi there");
        assert_eq!(seen, "hi there");
        assert!(answer.tool_calls.is_empty());
    }

    #[test]
    fn documents_and_errors() {
        let doc = json!({"choices": [{"message": {"role": "assistant", "content": null,
            "tool_calls": [{"id": "c1", "type": "function",
                            "function": {"name": "shell", "arguments": "{\"command\":\"ls\"}"}}]},
            "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2}});
        let answer = read_document(&doc).unwrap();
        assert_eq!(answer.tool_calls[0].name, "shell");
        assert_eq!(answer.message()["content"], Value::Null);
        assert_eq!(answer.message()["tool_calls"][0]["id"], "c1");
        let body = br#"{"error":{"message":"budget exceeded: job j has spent $1"}}"#;
        let error = error_of(402, None, &mut &body[..]);
        assert!(matches!(&error, ChatError::Budget(m) if m.starts_with("budget exceeded")));
        assert!(!error.retryable());
        assert!(error_of(503, Some(1), &mut &b"busy"[..]).retryable());
    }
}
