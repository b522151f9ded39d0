//! `POST /v1/messages`: Anthropic's Messages API on the same answer pipeline. The request is
//! checked in Anthropic's terms (roles, content blocks, `max_tokens`, tools), translated into
//! the chat request the pipeline answers (tool calls and results in OpenAI's shape, as
//! `/v1/chat/completions` would have them), and the outcome framed in Anthropic's shapes: a
//! `message` object, or the event stream (`message_start`, content blocks, `message_delta`,
//! `message_stop`); errors as `{"type": "error", "error": {"type", "message"}}`.

use std::collections::BTreeMap;

use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::shape::{self, SseItem};
use crate::answer::{Answer, Request};
use crate::routing::RouteDecision;
use crate::server::error::ApiError;

/// The request as Anthropic defines it (unknown fields refused by name).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MessagesRequest {
    model: String,
    max_tokens: Option<u64>,
    messages: Vec<InMessage>,
    #[serde(default)]
    system: Option<Value>,
    #[serde(default)]
    stop_sequences: Option<Vec<String>>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    thinking: Option<Value>,
    /// `format`: a JSON schema the answer must follow (structured output); `effort`: a
    /// reasoning hint, taken and ignored.
    output_config: Option<Value>,
    /// Operational hints with no bearing on the answer: taken and ignored.
    service_tier: Option<Value>,
    cache_control: Option<Value>,
    inference_geo: Option<Value>,
    speed: Option<Value>,
    user_profile_id: Option<Value>,
    workspace_id: Option<Value>,
    diagnostics: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InMessage {
    role: String,
    content: Value,
}

fn invalid(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::invalid(message, Some(param))
}

/// The text of a `system` value (a string, or text blocks) or of a tool result's content.
fn text_of(v: &Value, at: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut s = String::new();
            for (j, b) in blocks.iter().enumerate() {
                match (
                    b.get("type").and_then(Value::as_str),
                    b.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => s.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::unsupported(
                            &format!("{at}[{j}]"),
                            format!(
                                "{at}[{j}]: only text blocks are supported here, not {}",
                                kind.unwrap_or("an untyped block")
                            ),
                        ))
                    }
                }
            }
            Ok(s)
        }
        Value::Null => Ok(String::new()),
        _ => Err(invalid(
            format!("{at} must be a string or an array of text blocks"),
            at,
        )),
    }
}

/// Anthropic messages as OpenAI chat messages: text blocks joined, an assistant's `tool_use`
/// blocks as its `tool_calls`, a user's `tool_result` blocks as `tool` messages (before the
/// user's own text), thinking blocks of earlier turns dropped.
fn messages(list: &[InMessage]) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let at = format!("messages.{i}");
        if !matches!(m.role.as_str(), "user" | "assistant") {
            return Err(invalid(
                format!("{at}.role: '{}' is not one of user, assistant (put system text in the top-level `system`)", m.role),
                &format!("{at}.role"),
            ));
        }
        let blocks = match &m.content {
            Value::String(s) => {
                out.push(json!({"role": m.role, "content": s}));
                continue;
            }
            Value::Array(b) => b,
            _ => {
                return Err(invalid(
                    format!("{at}.content must be a string or an array of content blocks"),
                    &format!("{at}.content"),
                ))
            }
        };
        let mut text = String::new();
        let mut calls = Vec::new();
        let mut results = Vec::new();
        for (j, b) in blocks.iter().enumerate() {
            let bat = format!("{at}.content.{j}");
            match b.get("type").and_then(Value::as_str) {
                Some("text") => text.push_str(
                    b.get("text")
                        .and_then(Value::as_str)
                        .ok_or_else(|| invalid(format!("{bat}.text must be a string"), &bat))?,
                ),
                Some("tool_use") if m.role == "assistant" => {
                    let id = b.get("id").and_then(Value::as_str);
                    let name = b.get("name").and_then(Value::as_str);
                    let (Some(id), Some(name)) = (id, name) else {
                        return Err(invalid(
                            format!("{bat}: a tool_use block needs an id and a name"),
                            &bat,
                        ));
                    };
                    let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                    if !input.is_object() {
                        return Err(invalid(format!("{bat}.input must be an object"), &bat));
                    }
                    calls.push(json!({"id": id, "type": "function",
                        "function": {"name": name, "arguments": input.to_string()}}));
                }
                Some("tool_result") if m.role == "user" => {
                    let id = b
                        .get("tool_use_id")
                        .and_then(Value::as_str)
                        .ok_or_else(|| invalid(format!("{bat}.tool_use_id is required"), &bat))?;
                    let mut content =
                        text_of(b.get("content").unwrap_or(&Value::Null), &format!("{bat}.content"))?;
                    if b.get("is_error").and_then(Value::as_bool) == Some(true) {
                        content = format!("Error: {content}");
                    }
                    results.push(json!({"role": "tool", "tool_call_id": id, "content": content}));
                }
                // Earlier turns' reasoning: not part of what the model is asked.
                Some("thinking" | "redacted_thinking") if m.role == "assistant" => {}
                Some(kind @ ("tool_use" | "tool_result")) => {
                    return Err(invalid(
                        format!("{bat}: a {kind} block belongs in {} turn", if kind == "tool_use" { "an assistant" } else { "a user" }),
                        &bat,
                    ))
                }
                kind => {
                    return Err(ApiError::unsupported(
                        &bat,
                        format!(
                            "{bat}: {} content is not supported by corral (text, tool_use and tool_result are)",
                            kind.unwrap_or("untyped")
                        ),
                    ))
                }
            }
        }
        out.extend(results);
        if !calls.is_empty() {
            out.push(json!({"role": "assistant", "content": text, "tool_calls": calls}));
        } else if !text.is_empty() || out.last().is_none_or(|l| l["role"] != "tool") {
            out.push(json!({"role": m.role, "content": text}));
        }
    }
    Ok(out)
}

/// Anthropic tools as OpenAI function tools (server tools are refused).
fn tools(list: &[Value]) -> Result<Value, ApiError> {
    let mut out = Vec::new();
    for (i, t) in list.iter().enumerate() {
        let at = format!("tools.{i}");
        if let Some(kind) = t
            .get("type")
            .and_then(Value::as_str)
            .filter(|k| *k != "custom")
        {
            return Err(ApiError::unsupported(
                &at,
                format!("{at}: the server tool '{kind}' is not supported by corral; define the tool yourself"),
            ));
        }
        let name = t
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(format!("{at}.name is required"), &at))?;
        let schema = t
            .get("input_schema")
            .cloned()
            .ok_or_else(|| invalid(format!("{at}.input_schema is required"), &at))?;
        let mut f = json!({"name": name, "parameters": schema});
        if let Some(d) = t.get("description") {
            f["description"] = d.clone();
        }
        out.push(json!({"type": "function", "function": f}));
    }
    Ok(Value::Array(out))
}

/// `tool_choice` as OpenAI's, and whether parallel calls are allowed.
fn tool_choice(c: &Value) -> Result<(Value, Option<bool>), ApiError> {
    let parallel = c
        .get("disable_parallel_tool_use")
        .and_then(Value::as_bool)
        .map(|d| !d);
    let choice = match c.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => {
            let name = c.get("name").and_then(Value::as_str).ok_or_else(|| {
                invalid(
                    "tool_choice.name is required with type 'tool'",
                    "tool_choice",
                )
            })?;
            json!({"type": "function", "function": {"name": name}})
        }
        _ => {
            return Err(invalid(
                "tool_choice.type must be one of auto, any, tool, none",
                "tool_choice",
            ))
        }
    };
    Ok((choice, parallel))
}

/// The request as the chat request the pipeline answers (OpenAI's shape, checked again there).
pub fn to_chat(body: &[u8]) -> Result<(Value, bool), ApiError> {
    let r: MessagesRequest = crate::server::openai::parse(body)?;
    let Some(max_tokens) = r.max_tokens else {
        return Err(invalid("max_tokens: Field required", "max_tokens"));
    };
    if max_tokens == 0 || max_tokens > u64::from(u32::MAX) {
        return Err(invalid(
            format!("max_tokens: {max_tokens} is not within 1..={}", u32::MAX),
            "max_tokens",
        ));
    }
    if r.messages.is_empty() {
        return Err(invalid(
            "messages: at least one message is required",
            "messages",
        ));
    }
    // A last assistant turn asks Anthropic's models to continue its text ("prefill"), which
    // corral cannot do: refused rather than answered as a new turn.
    if r.messages.last().is_some_and(|m| m.role == "assistant") {
        return Err(ApiError::unsupported(
            &format!("messages.{}", r.messages.len() - 1),
            "a final assistant message (prefilling the answer) is not supported by corral; end with a user turn",
        ));
    }
    if r.stop_sequences.as_ref().is_some_and(|s| s.len() > 4) {
        return Err(ApiError::unsupported(
            "stop_sequences",
            "stop_sequences: corral supports at most 4",
        ));
    }
    if r.temperature.is_some_and(|t| !(0.0..=1.0).contains(&t)) {
        return Err(invalid("temperature: must be within [0, 1]", "temperature"));
    }
    if r.top_k.is_some() {
        return Err(ApiError::unsupported(
            "top_k",
            "top_k is not supported by corral; leave it out",
        ));
    }
    if r.thinking
        .as_ref()
        .is_some_and(|t| t.get("type").and_then(Value::as_str) != Some("disabled"))
    {
        return Err(ApiError::unsupported(
            "thinking",
            "extended thinking is not supported by corral; leave it out",
        ));
    }
    let _ = (
        &r.service_tier,
        &r.cache_control,
        &r.inference_geo,
        &r.speed,
        &r.user_profile_id,
        &r.workspace_id,
        &r.diagnostics,
    );
    let mut msgs = Vec::new();
    if let Some(system) = &r.system {
        let text = text_of(system, "system")?;
        if !text.is_empty() {
            msgs.push(json!({"role": "system", "content": text}));
        }
    }
    msgs.extend(messages(&r.messages)?);
    let mut chat = json!({
        "model": r.model,
        "messages": msgs,
        "max_tokens": max_tokens,
        "stream": r.stream,
    });
    if r.stream {
        chat["stream_options"] = json!({"include_usage": true});
    }
    if let Some(t) = r.temperature {
        chat["temperature"] = json!(t);
    }
    if let Some(p) = r.top_p {
        chat["top_p"] = json!(p);
    }
    if let Some(stop) = r.stop_sequences.filter(|s| !s.is_empty()) {
        chat["stop"] = json!(stop);
    }
    if let Some(meta) = r.metadata {
        let mut rest = BTreeMap::new();
        for (k, v) in meta {
            match (k.as_str(), v) {
                ("user_id", Value::String(u)) => chat["user"] = json!(u),
                (_, Value::Null) => {}
                (_, Value::String(s)) => {
                    rest.insert(k, s);
                }
                (k, _) => {
                    return Err(invalid(
                        format!("metadata.{k} must be a string"),
                        &format!("metadata.{k}"),
                    ))
                }
            }
        }
        if !rest.is_empty() {
            chat["metadata"] = json!(rest);
        }
    }
    if let Some(format) = r
        .output_config
        .as_ref()
        .and_then(|o| o.get("format"))
        .filter(|f| !f.is_null())
    {
        if format.get("type").and_then(Value::as_str) != Some("json_schema") {
            return Err(invalid(
                "output_config.format.type must be json_schema",
                "output_config.format",
            ));
        }
        let schema = format.get("schema").cloned().ok_or_else(|| {
            invalid(
                "output_config.format.schema is required",
                "output_config.format",
            )
        })?;
        chat["response_format"] =
            json!({"type": "json_schema", "json_schema": {"name": "output", "schema": schema}});
    }
    if let Some(t) = r.tools.filter(|t| !t.is_empty()) {
        chat["tools"] = tools(&t)?;
        if let Some(c) = &r.tool_choice {
            let (choice, parallel) = tool_choice(c)?;
            chat["tool_choice"] = choice;
            if let Some(p) = parallel {
                chat["parallel_tool_calls"] = json!(p);
            }
        }
    } else if r.tool_choice.as_ref().is_some_and(|c| {
        c.get("type").and_then(Value::as_str) != Some("none")
            && c.get("type").and_then(Value::as_str) != Some("auto")
    }) {
        return Err(invalid("tool_choice needs tools", "tool_choice"));
    }
    Ok((chat, r.stream))
}

/// Anthropic's `stop_reason` for an answer's OpenAI `finish_reason`.
fn stop_reason(finish: &str) -> &'static str {
    match finish {
        "length" => "max_tokens",
        "tool_calls" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

/// An answer's tool calls as `tool_use` blocks (arguments parsed back into the input object).
fn tool_uses(a: &Answer) -> Vec<Value> {
    a.tool_calls
        .as_ref()
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|c| {
            let args = c
                .pointer("/function/arguments")
                .and_then(Value::as_str)
                .unwrap_or("{}");
            let input = serde_json::from_str::<Value>(args)
                .ok()
                .filter(Value::is_object)
                .unwrap_or_else(|| json!({}));
            json!({"type": "tool_use", "id": c.get("id"), "name": c.pointer("/function/name"), "input": input})
        })
        .collect()
}

/// Anthropic counts tokens read from a cache apart from `input_tokens`.
fn usage(a: &Answer) -> Value {
    json!({
        "input_tokens": a.prompt_tokens.saturating_sub(a.cached_tokens),
        "cache_read_input_tokens": a.cached_tokens,
        "output_tokens": a.completion_tokens,
    })
}

/// The whole answer as a `message` object.
pub fn json_response(req: &Request, a: &Answer, d: &RouteDecision) -> Response {
    let mut content = Vec::new();
    let calls = tool_uses(a);
    if !a.text.is_empty() || calls.is_empty() {
        content.push(json!({"type": "text", "text": a.text}));
    }
    content.extend(calls);
    let body = json!({
        "id": format!("msg_{}", req.id),
        "type": "message",
        "role": "assistant",
        "model": a.model,
        "content": content,
        "stop_reason": stop_reason(&a.finish_reason),
        "stop_sequence": null,
        "usage": usage(a),
        "corral": shape::corral_json(a, d, &req.id),
    });
    let mut r = Json(body).into_response();
    shape::set_headers(&mut r, &shape::headers_for(a, d));
    r
}

/// An error as Anthropic sends it: `{"type": "error", "error": {"type", "message"}}`.
pub fn error_body(e: &ApiError) -> Value {
    let kind = match e.status.as_u16() {
        400 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        _ => "api_error",
    };
    json!({"type": "error", "error": {"type": kind, "message": e.message}})
}

pub fn error_response(e: ApiError) -> Response {
    let body = error_body(&e);
    let mut r = e.into_response();
    // The status and `retry-after` stay; the body is Anthropic's.
    let (parts, _) = r.into_parts();
    r = Response::from_parts(parts, axum::body::Body::from(body.to_string()));
    r
}

fn event(name: &str, data: &Value) -> SseItem {
    Ok(SseEvent::default().event(name).data(data.to_string()))
}

/// The event stream of one answer: content blocks opened and closed as text and tool calls
/// arrive, in order.
pub struct Events {
    id: String,
    /// The open block: its index, and the OpenAI call index when it is a tool call.
    open: Option<(usize, Option<usize>)>,
    next: usize,
}

impl Events {
    pub fn new(req: &Request) -> Events {
        Events {
            id: format!("msg_{}", req.id),
            open: None,
            next: 0,
        }
    }

    /// `message_start` (usage not known yet: counted at the end) and a `ping`.
    pub fn start(&self, model: &str) -> Vec<SseItem> {
        vec![
            event(
                "message_start",
                &json!({"type": "message_start", "message": {
                    "id": self.id, "type": "message", "role": "assistant", "model": model,
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": 0, "output_tokens": 0},
                }}),
            ),
            event("ping", &json!({"type": "ping"})),
        ]
    }

    fn close(&mut self, out: &mut Vec<SseItem>) {
        if let Some((index, _)) = self.open.take() {
            out.push(event(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    fn open(&mut self, block: Value, call: Option<usize>, out: &mut Vec<SseItem>) -> usize {
        self.close(out);
        let index = self.next;
        self.next += 1;
        self.open = Some((index, call));
        out.push(event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": block}),
        ));
        index
    }

    pub fn text(&mut self, text: &str) -> Vec<SseItem> {
        let mut out = Vec::new();
        if text.is_empty() {
            return out;
        }
        let index = match self.open {
            Some((i, None)) => i,
            _ => self.open(json!({"type": "text", "text": ""}), None, &mut out),
        };
        out.push(event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "text_delta", "text": text}}),
        ));
        out
    }

    /// A piece of tool call `call` (OpenAI's index): its first piece opens a `tool_use` block.
    pub fn call_piece(
        &mut self,
        call: usize,
        id: Option<&str>,
        name: Option<&str>,
        arguments: &str,
    ) -> Vec<SseItem> {
        let mut out = Vec::new();
        let index = match self.open {
            Some((i, Some(c))) if c == call => i,
            _ => self.open(
                json!({"type": "tool_use", "id": id.unwrap_or_default(), "name": name.unwrap_or_default(), "input": {}}),
                Some(call),
                &mut out,
            ),
        };
        if !arguments.is_empty() {
            out.push(event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": arguments}}),
            ));
        }
        out
    }

    /// The closing events: the open block's stop, `message_delta` with the stop reason, the
    /// usage and corral's facts, and `message_stop`.
    pub fn end(&mut self, a: &Answer, corral: Value) -> Vec<SseItem> {
        let mut out = Vec::new();
        self.close(&mut out);
        out.push(event(
            "message_delta",
            &json!({"type": "message_delta",
                    "delta": {"stop_reason": stop_reason(&a.finish_reason), "stop_sequence": null},
                    "usage": usage(a), "corral": corral}),
        ));
        out.push(event("message_stop", &json!({"type": "message_stop"})));
        out
    }

    /// A failure after the stream started.
    pub fn error(&self, e: &ApiError) -> SseItem {
        event("error", &error_body(e))
    }
}

/// A finished answer sent as an event stream (held SLM answers, remote answers read whole).
pub fn stream_finished(req: &Request, a: &Answer, d: &RouteDecision) -> Response {
    let mut ev = Events::new(req);
    let mut items = ev.start(&a.model);
    items.extend(ev.text(&a.text));
    for (i, c) in tool_uses(a).iter().enumerate() {
        let args = c["input"].to_string();
        items.extend(ev.call_piece(i, c["id"].as_str(), c["name"].as_str(), &args));
    }
    items.extend(ev.end(a, shape::corral_json(a, d, &req.id)));
    shape::sse_items(items, &shape::headers_for(a, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(v: Value) -> Result<Value, ApiError> {
        to_chat(v.to_string().as_bytes()).map(|(c, _)| c)
    }

    #[test]
    fn blocks_tools_and_results_become_the_chat_request() {
        let c = chat(json!({
            "model": "auto", "max_tokens": 64,
            "system": [{"type": "text", "text": "Be brief."}],
            "stop_sequences": ["\n\n"],
            "metadata": {"user_id": "u-1", "task": "qa"},
            "tools": [{"name": "weather", "description": "d", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "messages": [
                {"role": "user", "content": "Oslo?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hm", "signature": "s"},
                    {"type": "text", "text": "Looking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "4 C"}]},
                    {"type": "text", "text": "And tomorrow?"}]},
            ],
        }))
        .unwrap();
        assert_eq!(
            c["messages"][0],
            json!({"role": "system", "content": "Be brief."})
        );
        assert_eq!(
            c["messages"][2]["tool_calls"][0]["function"]["arguments"],
            "{\"city\":\"Oslo\"}"
        );
        assert_eq!(c["messages"][2]["content"], "Looking.");
        assert_eq!(
            c["messages"][3],
            json!({"role": "tool", "tool_call_id": "toolu_1", "content": "4 C"})
        );
        assert_eq!(
            c["messages"][4],
            json!({"role": "user", "content": "And tomorrow?"})
        );
        assert_eq!(
            c["tools"][0]["function"]["parameters"],
            json!({"type": "object"})
        );
        assert_eq!(c["tool_choice"], "required");
        assert_eq!(c["parallel_tool_calls"], false);
        assert_eq!(
            (c["user"].as_str(), c["metadata"]["task"].as_str()),
            (Some("u-1"), Some("qa"))
        );
        assert_eq!(c["stop"], json!(["\n\n"]));
    }

    #[test]
    fn what_corral_cannot_do_is_refused_by_name() {
        let base = |extra: Value| {
            let mut v = json!({"model": "auto", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            chat(v).unwrap_err()
        };
        let e = base(json!({"top_k": 5}));
        assert_eq!(e.param.as_deref(), Some("top_k"));
        let e = base(json!({"thinking": {"type": "enabled", "budget_tokens": 1024}}));
        assert_eq!(e.param.as_deref(), Some("thinking"));
        let e = base(
            json!({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}),
        );
        assert!(
            e.message.contains("image content is not supported"),
            "{}",
            e.message
        );
        let e = base(json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}));
        assert!(e.message.contains("server tool"), "{}", e.message);
        let e = base(json!({"messages": [{"role": "system", "content": "x"}]}));
        assert!(e.message.contains("top-level `system`"), "{}", e.message);
        let e = base(json!({"messages": [{"role": "user", "content": "hi"},
                                         {"role": "assistant", "content": "The answer is"}]}));
        assert!(e.message.contains("prefilling"), "{}", e.message);
        let e = base(json!({"frequency": 1}));
        assert!(e
            .message
            .contains("Unrecognized request argument supplied: frequency"));
        let e = chat(json!({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}))
            .unwrap_err();
        assert_eq!(e.message, "max_tokens: Field required");
        assert_eq!(error_body(&e)["error"]["type"], "invalid_request_error");
    }
}
