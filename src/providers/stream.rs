//! Streamed answers: the server-sent events of OpenAI's chat completions (`data: {chunk}` …
//! `data: [DONE]`) and of Anthropic's Messages (`event: message_start` … `message_stop`), read
//! as they arrive into [`Delta`]s for the caller and assembled into the same [`Completion`] a
//! whole answer gives.

use std::collections::HashMap;

use serde_json::Value;

use super::{anthropic, Completion, Usage};

/// One piece of a streamed answer, in the order the provider sent them.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    /// The answer begins (sent once, before its first piece): who answers it.
    Begin { provider: String, model: String },
    /// Text, with the provider's log-probabilities of its tokens when they were asked for
    /// (OpenAI's `logprobs.content` entries, as sent).
    Text {
        text: String,
        logprobs: Option<Vec<Value>>,
    },
    /// A piece of a tool call, in OpenAI's delta shape: the first piece of call `index` has its
    /// id and function name, the pieces of `arguments` follow (joined, they are its JSON).
    ToolCall {
        index: usize,
        id: Option<String>,
        name: Option<String>,
        arguments: String,
    },
}

/// An error event in the stream: `status` as the provider's equivalent HTTP status.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct StreamError {
    pub status: u16,
    pub message: String,
}

/// Why a stream's event could not be used.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum EventError {
    /// The provider said it failed.
    Provider(StreamError),
    /// Not the JSON the format defines.
    Unreadable(String),
}

/// A call being assembled from its pieces.
#[derive(Debug, Default, Clone, PartialEq)]
struct Call {
    id: Option<String>,
    name: Option<String>,
    arguments: String,
}

/// What an Anthropic content block is, by its index.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Block {
    Text,
    /// A tool call, the `usize`-th of the answer.
    Tool(usize),
    /// The forced JSON tool of a `response_format` request: its input is the answer's text.
    Json,
    /// Anything else (thinking): skipped.
    Other,
}

/// A streamed answer read so far.
#[derive(Debug, Default)]
pub(super) struct Assembly {
    model: Option<String>,
    text: String,
    calls: Vec<Call>,
    finish: Option<String>,
    usage: Option<Usage>,
    logprobs: Vec<f32>,
    any_logprobs: bool,
    /// The end marker (`[DONE]`, `message_stop`) arrived.
    pub done: bool,
    blocks: HashMap<u64, Block>,
}

impl Assembly {
    /// The model the stream named, when it named one.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// Whether the answer said how it finished (a stream cut right after that lost nothing).
    pub fn finished(&self) -> bool {
        self.finish.is_some()
    }

    /// Keeps `d` and hands it on.
    fn keep(&mut self, d: Delta, out: &mut Vec<Delta>) {
        match &d {
            Delta::Text { text, logprobs } => {
                self.text.push_str(text);
                for lp in logprobs.iter().flatten() {
                    if let Some(v) = lp.get("logprob").and_then(Value::as_f64) {
                        self.logprobs.push(v as f32);
                        self.any_logprobs = true;
                    }
                }
            }
            Delta::ToolCall {
                index,
                id,
                name,
                arguments,
            } => {
                if self.calls.len() <= *index {
                    self.calls.resize(*index + 1, Call::default());
                }
                let c = &mut self.calls[*index];
                if id.is_some() {
                    c.id.clone_from(id);
                }
                if name.is_some() {
                    c.name.clone_from(name);
                }
                c.arguments.push_str(arguments);
            }
            Delta::Begin { .. } => {}
        }
        out.push(d);
    }

    /// One `data:` payload of an OpenAI-compatible stream. `want_logprobs`: whether they were
    /// asked for (unasked ones are not passed on).
    pub fn openai(&mut self, data: &str, want_logprobs: bool) -> Result<Vec<Delta>, EventError> {
        let mut out = Vec::new();
        if data.trim() == "[DONE]" {
            self.done = true;
            return Ok(out);
        }
        let v: Value =
            serde_json::from_str(data).map_err(|e| EventError::Unreadable(e.to_string()))?;
        if let Some(e) = v.get("error") {
            return Err(EventError::Provider(openai_error(e)));
        }
        if let Some(m) = v
            .get("model")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
        {
            self.model.get_or_insert_with(|| m.to_string());
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
            self.usage = Some(Usage {
                prompt_tokens: n("prompt_tokens"),
                completion_tokens: n("completion_tokens"),
            });
        }
        let choice = v.get("choices").and_then(Value::as_array).and_then(|c| {
            c.iter()
                .find(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0)
        });
        let Some(choice) = choice else {
            return Ok(out);
        };
        let delta = choice.get("delta");
        let text = delta
            .and_then(|d| d.get("content"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        let logprobs = choice
            .pointer("/logprobs/content")
            .and_then(Value::as_array)
            .filter(|l| want_logprobs && !l.is_empty())
            .cloned();
        if !text.is_empty() || logprobs.is_some() {
            self.keep(
                Delta::Text {
                    text: text.to_string(),
                    logprobs,
                },
                &mut out,
            );
        }
        for c in delta
            .and_then(|d| d.get("tool_calls"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let index = c.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
            // Indices are small and dense; a huge one is a broken stream, not a call.
            if index > 1024 {
                return Err(EventError::Unreadable(format!("tool call index {index}")));
            }
            let s = |p: &str| c.pointer(p).and_then(Value::as_str).map(str::to_string);
            self.keep(
                Delta::ToolCall {
                    index,
                    id: s("/id"),
                    name: s("/function/name"),
                    arguments: s("/function/arguments").unwrap_or_default(),
                },
                &mut out,
            );
        }
        if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish = Some(match f {
                "function_call" => "tool_calls".into(),
                f => f.into(),
            });
        }
        Ok(out)
    }

    /// One event of an Anthropic stream. `json`: the request asked for JSON, answered through
    /// the forced [`anthropic::JSON_TOOL`], whose input pieces are the answer's text.
    pub fn anthropic(
        &mut self,
        event: &str,
        data: &str,
        json: bool,
    ) -> Result<Vec<Delta>, EventError> {
        let mut out = Vec::new();
        if event == "ping" || data.trim().is_empty() {
            return Ok(out);
        }
        let v: Value =
            serde_json::from_str(data).map_err(|e| EventError::Unreadable(e.to_string()))?;
        // The event's name is in its data too (`type`); either will do.
        let kind = match event {
            "" => v.get("type").and_then(Value::as_str).unwrap_or_default(),
            e => e,
        };
        let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).map(|n| n as u32);
        match kind {
            "error" => {
                let e = v.get("error").unwrap_or(&v);
                return Err(EventError::Provider(anthropic_error(e)));
            }
            "message_start" => {
                let m = v.get("message").unwrap_or(&Value::Null);
                if let Some(model) = m.get("model").and_then(Value::as_str) {
                    self.model = Some(model.to_string()).filter(|m| !m.is_empty());
                }
                if let Some(u) = m.get("usage") {
                    self.usage = Some(Usage {
                        prompt_tokens: n(u, "input_tokens").unwrap_or(0),
                        completion_tokens: n(u, "output_tokens").unwrap_or(0),
                    });
                }
            }
            "content_block_start" => {
                let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                let b = v.get("content_block").unwrap_or(&Value::Null);
                let block = match b.get("type").and_then(Value::as_str) {
                    Some("text") => Block::Text,
                    Some("tool_use")
                        if json
                            && b.get("name").and_then(Value::as_str)
                                == Some(anthropic::JSON_TOOL) =>
                    {
                        Block::Json
                    }
                    Some("tool_use") => Block::Tool(self.calls.len()),
                    _ => Block::Other,
                };
                self.blocks.insert(index, block);
                match block {
                    Block::Text => {
                        let text = b.get("text").and_then(Value::as_str).unwrap_or_default();
                        if !text.is_empty() {
                            self.text_piece(text, &mut out);
                        }
                    }
                    Block::Tool(i) => {
                        let s = |k: &str| b.get(k).and_then(Value::as_str).map(str::to_string);
                        self.keep(
                            Delta::ToolCall {
                                index: i,
                                id: s("id"),
                                name: s("name"),
                                arguments: String::new(),
                            },
                            &mut out,
                        );
                    }
                    Block::Json | Block::Other => {}
                }
            }
            "content_block_delta" => {
                let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                let d = v.get("delta").unwrap_or(&Value::Null);
                let piece = d
                    .get("text")
                    .or_else(|| d.get("partial_json"))
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                match self.blocks.get(&index).copied() {
                    Some(Block::Text | Block::Json) if !piece.is_empty() => {
                        self.text_piece(piece, &mut out);
                    }
                    Some(Block::Tool(i)) if !piece.is_empty() => self.keep(
                        Delta::ToolCall {
                            index: i,
                            id: None,
                            name: None,
                            arguments: piece.to_string(),
                        },
                        &mut out,
                    ),
                    _ => {}
                }
            }
            "content_block_stop" => {
                let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                // A call of no arguments sent no pieces: its arguments are still an object.
                if let Some(Block::Tool(i)) = self.blocks.get(&index).copied() {
                    if self.calls.get(i).is_some_and(|c| c.arguments.is_empty()) {
                        self.keep(
                            Delta::ToolCall {
                                index: i,
                                id: None,
                                name: None,
                                arguments: "{}".into(),
                            },
                            &mut out,
                        );
                    }
                }
            }
            "message_delta" => {
                if let Some(r) = v.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    let answered_json = json && self.blocks.values().any(|b| *b == Block::Json);
                    self.finish = Some(if answered_json && r == "tool_use" {
                        "stop".into()
                    } else {
                        anthropic::stop_reason(Some(r))
                    });
                }
                if let Some(u) = v.get("usage") {
                    let usage = self.usage.get_or_insert(Usage {
                        prompt_tokens: 0,
                        completion_tokens: 0,
                    });
                    // Counts here are the totals so far.
                    if let Some(o) = n(u, "output_tokens") {
                        usage.completion_tokens = o;
                    }
                    if let Some(i) = n(u, "input_tokens").filter(|i| *i > 0) {
                        usage.prompt_tokens = i;
                    }
                }
            }
            "message_stop" => self.done = true,
            _ => {}
        }
        Ok(out)
    }

    fn text_piece(&mut self, text: &str, out: &mut Vec<Delta>) {
        self.keep(
            Delta::Text {
                text: text.to_string(),
                logprobs: None,
            },
            out,
        );
    }

    /// The whole answer.
    pub fn completion(self) -> Completion {
        let calls: Vec<Value> = self
            .calls
            .into_iter()
            .map(|c| {
                let args = if c.arguments.is_empty() {
                    "{}".to_string()
                } else {
                    c.arguments
                };
                serde_json::json!({
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": args},
                })
            })
            .collect();
        Completion {
            model: self.model,
            text: self.text,
            // A stream that ended properly without saying how: it stopped.
            finish_reason: self
                .finish
                .unwrap_or_else(|| if self.done { "stop" } else { "unknown" }.into()),
            usage: self.usage.unwrap_or(Usage {
                prompt_tokens: 0,
                completion_tokens: 0,
            }),
            token_logprobs: self.any_logprobs.then_some(self.logprobs),
            tool_calls: (!calls.is_empty()).then_some(Value::Array(calls)),
        }
    }

    /// A whole completion (a server that answered a stream request with one JSON body) as the
    /// pieces it would have streamed.
    pub fn pieces_of(c: &Completion) -> Vec<Delta> {
        let mut out = Vec::new();
        if !c.text.is_empty() {
            out.push(Delta::Text {
                text: c.text.clone(),
                logprobs: None,
            });
        }
        for (index, call) in c
            .tool_calls
            .as_ref()
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let s = |p: &str| call.pointer(p).and_then(Value::as_str).map(str::to_string);
            out.push(Delta::ToolCall {
                index,
                id: s("/id"),
                name: s("/function/name"),
                arguments: s("/function/arguments").unwrap_or_default(),
            });
        }
        out
    }
}

/// An OpenAI-style `error` object (`{"message", "type", "code"}`) as a status.
fn openai_error(e: &Value) -> StreamError {
    let message = e
        .get("message")
        .and_then(Value::as_str)
        .or_else(|| e.as_str())
        .unwrap_or("error event in the stream")
        .to_string();
    let status = e
        .get("code")
        .and_then(Value::as_u64)
        .filter(|c| (400..600).contains(c))
        .map_or_else(
            || match e.get("type").and_then(Value::as_str) {
                Some("rate_limit_error" | "rate_limit_exceeded") => 429,
                Some("invalid_request_error") => 400,
                _ => 500,
            },
            |c| c as u16,
        );
    StreamError {
        status,
        message: super::truncate_chars(&message, super::MAX_ERROR_MESSAGE_CHARS),
    }
}

/// An Anthropic error event's `{"type", "message"}` as the status its API gives that type.
fn anthropic_error(e: &Value) -> StreamError {
    let status = match e.get("type").and_then(Value::as_str) {
        Some("invalid_request_error") => 400,
        Some("authentication_error") => 401,
        Some("permission_error") => 403,
        Some("not_found_error") => 404,
        Some("request_too_large") => 413,
        Some("rate_limit_error") => 429,
        Some("overloaded_error") => 529,
        _ => 500,
    };
    let message = e
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("error event in the stream");
    StreamError {
        status,
        message: super::truncate_chars(message, super::MAX_ERROR_MESSAGE_CHARS),
    }
}

/// Server-sent events read from lines: `event:` and `data:` fields, dispatched at a blank line.
#[derive(Debug, Default)]
pub(super) struct Sse {
    event: String,
    data: String,
    has_data: bool,
}

impl Sse {
    /// Takes one line (its end of line included or not); a complete event as (name, data).
    pub fn line(&mut self, line: &str) -> Option<(String, String)> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            // An event without data is not dispatched (as the SSE standard has it).
            if !self.has_data {
                self.event.clear();
                return None;
            }
            self.has_data = false;
            return Some((
                std::mem::take(&mut self.event),
                std::mem::take(&mut self.data),
            ));
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.event = value.to_string(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(text: &str) -> Vec<(String, String)> {
        let mut sse = Sse::default();
        text.split_inclusive('\n')
            .filter_map(|l| sse.line(l))
            .collect()
    }

    #[test]
    fn sse_fields_dispatch_at_blank_lines_and_comments_are_skipped() {
        let e = events(
            ": keepalive\r\n\r\nevent: nothing\n\nevent: a\r\ndata: {\"x\":1}\r\n\r\ndata:b\ndata: c\n\n",
        );
        assert_eq!(
            e,
            vec![
                ("a".to_string(), "{\"x\":1}".to_string()),
                (String::new(), "b\nc".to_string())
            ]
        );
    }

    #[test]
    fn openai_chunks_assemble_text_calls_usage_and_logprobs() {
        let mut a = Assembly::default();
        let chunks = [
            r#"{"model":"gpt-x","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"Hel"},"logprobs":{"content":[{"token":"Hel","logprob":-0.5}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"f","arguments":""}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"a\":"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"1}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}"#,
            "[DONE]",
        ];
        let mut pieces = Vec::new();
        for c in chunks {
            pieces.extend(a.openai(c, true).unwrap());
        }
        assert!(a.done);
        assert_eq!(pieces.len(), 4, "{pieces:?}");
        let c = a.completion();
        assert_eq!(c.model.as_deref(), Some("gpt-x"));
        assert_eq!(c.text, "Hel");
        assert_eq!(c.finish_reason, "tool_calls");
        assert_eq!(c.usage.prompt_tokens, 7);
        assert_eq!(c.token_logprobs, Some(vec![-0.5]));
        assert_eq!(
            c.tool_calls.unwrap()[0]["function"],
            serde_json::json!({"name": "f", "arguments": "{\"a\":1}"})
        );
    }

    #[test]
    fn an_error_event_carries_its_status() {
        let mut a = Assembly::default();
        let e = a
            .openai(
                r#"{"error":{"message":"slow down","type":"rate_limit_error"}}"#,
                false,
            )
            .unwrap_err();
        assert_eq!(
            e,
            EventError::Provider(StreamError {
                status: 429,
                message: "slow down".into()
            })
        );
        let e = a
            .anthropic(
                "error",
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
                false,
            )
            .unwrap_err();
        assert!(matches!(
            e,
            EventError::Provider(StreamError { status: 529, .. })
        ));
        assert!(matches!(
            a.openai("{not json", false),
            Err(EventError::Unreadable(_))
        ));
    }

    #[test]
    fn anthropic_events_assemble_text_tool_calls_and_usage() {
        let mut a = Assembly::default();
        let evs = [
            (
                "message_start",
                r#"{"type":"message_start","message":{"model":"claude-x","usage":{"input_tokens":12,"output_tokens":1}}}"#,
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            ),
            ("ping", r#"{"type":"ping"}"#),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
            ),
            (
                "content_block_stop",
                r#"{"type":"content_block_stop","index":0}"#,
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":"get","input":{}}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"q\":"}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"2}"}}"#,
            ),
            (
                "content_block_stop",
                r#"{"type":"content_block_stop","index":1}"#,
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_2","name":"now","input":{}}}"#,
            ),
            (
                "content_block_stop",
                r#"{"type":"content_block_stop","index":2}"#,
            ),
            (
                "message_delta",
                r#"{"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":9}}"#,
            ),
            ("message_stop", r#"{"type":"message_stop"}"#),
        ];
        let mut pieces = Vec::new();
        for (e, d) in evs {
            pieces.extend(a.anthropic(e, d, false).unwrap());
        }
        assert!(a.done);
        assert_eq!(
            pieces[0],
            Delta::Text {
                text: "Hi".into(),
                logprobs: None
            }
        );
        let c = a.completion();
        assert_eq!(c.model.as_deref(), Some("claude-x"));
        assert_eq!((c.usage.prompt_tokens, c.usage.completion_tokens), (12, 9));
        assert_eq!(c.finish_reason, "tool_calls");
        let calls = c.tool_calls.unwrap();
        assert_eq!(calls[0]["id"], "toolu_1");
        assert_eq!(calls[0]["function"]["arguments"], "{\"q\":2}");
        assert_eq!(calls[1]["function"]["arguments"], "{}");
    }

    #[test]
    fn anthropic_json_output_streams_as_text() {
        let mut a = Assembly::default();
        let evs = [
            (
                "content_block_start",
                r#"{"index":0,"content_block":{"type":"tool_use","id":"t","name":"json_output","input":{}}}"#,
            ),
            (
                "content_block_delta",
                r#"{"index":0,"delta":{"type":"input_json_delta","partial_json":"{\"ok\": true}"}}"#,
            ),
            (
                "message_delta",
                r#"{"delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":4}}"#,
            ),
        ];
        for (e, d) in evs {
            a.anthropic(e, d, true).unwrap();
        }
        let c = a.completion();
        assert_eq!(c.text, "{\"ok\": true}");
        assert_eq!(c.finish_reason, "stop");
        assert!(c.tool_calls.is_none());
    }
}
