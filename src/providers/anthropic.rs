//! The Anthropic Messages wire format (`POST {base_url}/v1/messages`).
//!
//! Differences from OpenAI's that matter here: system messages go in a top-level `system`
//! string, `max_tokens` is required, stop sequences are `stop_sequences`, the answer is a list
//! of content blocks, and there are no log-probabilities.
//!
//! Tools are translated both ways: OpenAI `tools` become Anthropic tools (`parameters` →
//! `input_schema`), `tool_choice` its `auto`/`any`/`tool`/`none` (with
//! `disable_parallel_tool_use` for `parallel_tool_calls: false`), an assistant's `tool_calls`
//! `tool_use` blocks and `tool` messages `tool_result` blocks of a user turn; `tool_use` blocks
//! of the answer come back as OpenAI `tool_calls`. A `response_format` (`json_object`,
//! `json_schema`) becomes one forced tool, [`JSON_TOOL`], whose input is the answer's text.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{ChatRequest, Completion, Message, ProviderConfig, Usage};

/// The API version corral speaks.
pub(super) const API_VERSION: &str = "2023-06-01";

pub(super) fn endpoint(base_url: &str) -> String {
    format!("{}/v1/messages", base_url.trim_end_matches('/'))
}

/// Request headers besides `content-type`: `anthropic-version`, and `x-api-key` when there is a
/// key.
pub(super) fn headers(key: Option<&str>) -> Vec<(&'static str, String)> {
    let mut h = vec![("anthropic-version", API_VERSION.to_string())];
    if let Some(k) = key {
        h.push(("x-api-key", k.to_string()));
    }
    h
}

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<String>,
    messages: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<Metadata<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<Vec<Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

/// The tool a `response_format` is answered through: its input is the JSON answer.
pub(super) const JSON_TOOL: &str = "json_output";

/// OpenAI tools as Anthropic tools.
fn tools(openai: &Value) -> Result<Vec<Value>, String> {
    let Some(list) = openai.as_array() else {
        return Err("tools must be an array".into());
    };
    list.iter()
        .map(|t| {
            let f = t.get("function").ok_or("a tool without a function")?;
            let name = f
                .get("name")
                .and_then(Value::as_str)
                .ok_or("a function without a name")?;
            let mut out = json!({
                "name": name,
                "input_schema": f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"})),
            });
            if let Some(d) = f.get("description") {
                out["description"] = d.clone();
            }
            Ok(out)
        })
        .collect()
}

/// OpenAI `tool_choice` (and `parallel_tool_calls`) as Anthropic's.
fn tool_choice(choice: Option<&Value>, parallel: Option<bool>) -> Option<Value> {
    let mut c = match choice {
        None => json!({"type": "auto"}),
        Some(Value::String(s)) if s == "none" => return Some(json!({"type": "none"})),
        Some(Value::String(s)) if s == "required" => json!({"type": "any"}),
        Some(Value::String(_)) => json!({"type": "auto"}),
        Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
            Some(name) => json!({"type": "tool", "name": name}),
            None => json!({"type": "auto"}),
        },
    };
    if parallel == Some(false) {
        c["disable_parallel_tool_use"] = json!(true);
    }
    (choice.is_some() || parallel.is_some()).then_some(c)
}

/// A message in Anthropic's shape: an assistant's tool calls as `tool_use` blocks, a `tool`
/// message as a user turn's `tool_result` block.
fn message(m: &Message) -> Result<Value, String> {
    if m.role == "tool" {
        return Ok(json!({"role": "user", "content": [{
            "type": "tool_result",
            "tool_use_id": m.tool_call_id.as_deref().unwrap_or_default(),
            "content": m.content,
        }]}));
    }
    let Some(calls) = m.tool_calls.as_ref().and_then(Value::as_array) else {
        return Ok(json!({"role": m.role, "content": m.content}));
    };
    let mut blocks = Vec::new();
    if !m.content.is_empty() {
        blocks.push(json!({"type": "text", "text": m.content}));
    }
    for c in calls {
        let args = c
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or("{}");
        let input: Value = serde_json::from_str(args)
            .map_err(|e| format!("tool call arguments are not JSON: {e}"))?;
        blocks.push(json!({
            "type": "tool_use",
            "id": c.get("id").cloned().unwrap_or(Value::Null),
            "name": c.pointer("/function/name").cloned().unwrap_or(Value::Null),
            "input": input,
        }));
    }
    Ok(json!({"role": m.role, "content": blocks}))
}

/// The messages, with consecutive `tool_result` turns joined (Anthropic wants one user turn
/// holding every result of the calls before it).
fn messages(list: &[&Message]) -> Result<Vec<Value>, String> {
    let mut out: Vec<Value> = Vec::new();
    for m in list {
        let v = message(m)?;
        let joins = m.role == "tool"
            && out.last().is_some_and(|l| {
                l["role"] == "user"
                    && l["content"]
                        .as_array()
                        .is_some_and(|b| b.iter().all(|b| b["type"] == "tool_result"))
            });
        match (joins, out.last_mut()) {
            (true, Some(last)) => {
                if let (Some(b), Some(new)) = (
                    last["content"].as_array_mut(),
                    v["content"].as_array().cloned(),
                ) {
                    b.extend(new);
                }
            }
            _ => out.push(v),
        }
    }
    Ok(out)
}

#[derive(Serialize)]
struct Metadata<'a> {
    user_id: &'a str,
}

/// The request body: system messages, wherever they are, joined by a blank line into `system`;
/// the others in order. `logprobs` is ignored (Anthropic has none).
#[cfg(test)]
pub(super) fn body(cfg: &ProviderConfig, req: &ChatRequest) -> serde_json::Result<String> {
    body_for(cfg, req, false)
}

/// The request body; `stream`: ask for the event stream.
pub(super) fn body_for(
    cfg: &ProviderConfig,
    req: &ChatRequest,
    stream: bool,
) -> serde_json::Result<String> {
    use serde::ser::Error;
    let (system, rest): (Vec<&Message>, Vec<&Message>) =
        req.messages.iter().partition(|m| m.role == "system");
    let messages = messages(&rest).map_err(serde_json::Error::custom)?;
    let mut tool_list = match &req.tools {
        Some(t) => Some(tools(t).map_err(serde_json::Error::custom)?),
        None => None,
    };
    let mut choice = tool_list
        .as_ref()
        .and_then(|_| tool_choice(req.tool_choice.as_ref(), req.parallel_tool_calls));
    if let Some(rf) = &req.response_format {
        if tool_list.is_some() {
            return Err(serde_json::Error::custom(
                "tools and response_format together cannot be translated for Anthropic",
            ));
        }
        let schema = rf
            .pointer("/json_schema/schema")
            .cloned()
            .unwrap_or_else(|| json!({"type": "object"}));
        tool_list = Some(vec![json!({
            "name": JSON_TOOL,
            "description": "Give the answer as this tool's input.",
            "input_schema": schema,
        })]);
        choice = Some(json!({"type": "tool", "name": JSON_TOOL}));
    }
    let system = (!system.is_empty()).then(|| {
        system
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n\n")
    });
    serde_json::to_string(&Body {
        model: req.model.as_deref().unwrap_or(&cfg.model),
        max_tokens: req.max_tokens.unwrap_or(cfg.max_tokens),
        system,
        messages,
        temperature: req.temperature,
        top_p: req.top_p,
        stop_sequences: &req.stop,
        metadata: req.user.as_deref().map(|user_id| Metadata { user_id }),
        tools: tool_list,
        tool_choice: choice,
        stream,
    })
}

#[derive(Deserialize)]
struct Response {
    #[serde(default)]
    model: Option<String>,
    content: Vec<Block>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<ResponseUsage>,
}

#[derive(Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    input: Option<Value>,
}

#[derive(Deserialize)]
struct ResponseUsage {
    #[serde(default)]
    input_tokens: u32,
    #[serde(default)]
    output_tokens: u32,
}

/// The text blocks of a message, concatenated, and its `tool_use` blocks as OpenAI tool calls;
/// other blocks (thinking) are skipped. `json`: the request asked for JSON, answered through
/// [`JSON_TOOL`], whose input is the text.
pub(super) fn parse(body: &[u8], json: bool) -> Result<Completion, String> {
    let r: Response = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let mut text: String = r
        .content
        .iter()
        .filter(|b| b.kind == "text")
        .filter_map(|b| b.text.as_deref())
        .collect();
    let mut calls = Vec::new();
    let mut stop = r.stop_reason.as_deref();
    for b in r.content.iter().filter(|b| b.kind == "tool_use") {
        let input = b.input.clone().unwrap_or_else(|| json!({}));
        if json && b.name.as_deref() == Some(JSON_TOOL) {
            text = input.to_string();
            stop = Some("end_turn");
            continue;
        }
        calls.push(json!({
            "id": b.id,
            "type": "function",
            "function": {"name": b.name, "arguments": input.to_string()},
        }));
    }
    let usage = r.usage.map_or(
        Usage {
            prompt_tokens: 0,
            completion_tokens: 0,
        },
        |u| Usage {
            prompt_tokens: u.input_tokens,
            completion_tokens: u.output_tokens,
        },
    );
    Ok(Completion {
        model: r.model.filter(|m| !m.is_empty()),
        text,
        finish_reason: stop_reason(stop),
        usage,
        token_logprobs: None,
        tool_calls: (!calls.is_empty()).then_some(Value::Array(calls)),
    })
}

pub(super) fn stop_reason(raw: Option<&str>) -> String {
    match raw {
        Some("end_turn" | "stop_sequence") => "stop".into(),
        Some("max_tokens") => "length".into(),
        Some("tool_use") => "tool_calls".into(),
        Some("refusal") => "content_filter".into(),
        Some(other) => other.into(),
        None => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::ProviderKind;

    #[test]
    fn stop_reasons_are_normalized() {
        let cases = [
            (Some("end_turn"), "stop"),
            (Some("stop_sequence"), "stop"),
            (Some("max_tokens"), "length"),
            (Some("tool_use"), "tool_calls"),
            (Some("refusal"), "content_filter"),
            (Some("pause_turn"), "pause_turn"),
            (None, "unknown"),
        ];
        for (raw, want) in cases {
            assert_eq!(stop_reason(raw), want, "{raw:?}");
        }
    }

    #[test]
    fn body_without_system_messages_has_no_system_field() -> serde_json::Result<()> {
        let cfg = ProviderConfig::new(ProviderKind::Anthropic, "https://a", "claude");
        let req = ChatRequest {
            messages: vec![Message::new("user", "hi")],
            max_tokens: Some(7),
            user: Some("u-1".into()),
            ..ChatRequest::default()
        };
        let v: serde_json::Value = serde_json::from_str(&body(&cfg, &req)?)?;
        assert_eq!(
            v,
            serde_json::json!({
                "model": "claude",
                "max_tokens": 7,
                "messages": [{"role": "user", "content": "hi"}],
                "metadata": {"user_id": "u-1"}
            })
        );
        Ok(())
    }

    #[test]
    fn non_text_blocks_are_skipped() -> Result<(), String> {
        let c = parse(
            br#"{"content":[{"type":"thinking","thinking":"hmm"},{"type":"text","text":"4"}],
                "stop_reason":"end_turn"}"#,
            false,
        )?;
        assert_eq!(c.text, "4");
        assert_eq!(c.usage.prompt_tokens, 0);
        assert!(parse(br#"{"type":"message"}"#, false).is_err());
        Ok(())
    }

    #[test]
    fn tools_calls_and_results_are_translated_both_ways() -> Result<(), String> {
        let cfg = ProviderConfig::new(ProviderKind::Anthropic, "https://a", "claude");
        let mut call = Message::new("assistant", "");
        call.tool_calls = Some(json!([{"id": "toolu_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]));
        let mut result = Message::new("tool", "{\"temp_c\": 21}");
        result.tool_call_id = Some("toolu_1".into());
        let req = ChatRequest {
            messages: vec![Message::new("user", "Weather?"), call, result],
            tools: Some(
                json!([{"type": "function", "function": {"name": "get_weather",
                "description": "Weather now", "parameters": {"type": "object"}}}]),
            ),
            tool_choice: Some(json!({"type": "function", "function": {"name": "get_weather"}})),
            parallel_tool_calls: Some(false),
            ..ChatRequest::default()
        };
        let v: Value = serde_json::from_str(&body(&cfg, &req).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        assert_eq!(
            v["tools"],
            json!([{"name": "get_weather", "description": "Weather now", "input_schema": {"type": "object"}}])
        );
        assert_eq!(
            v["tool_choice"],
            json!({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true})
        );
        assert_eq!(
            v["messages"][1]["content"],
            json!([{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}])
        );
        assert_eq!(
            v["messages"][2],
            json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "{\"temp_c\": 21}"}]})
        );
        // The answer's tool_use blocks come back as OpenAI tool calls.
        let c = parse(
            br#"{"content":[{"type":"text","text":"Checking."},
                {"type":"tool_use","id":"toolu_2","name":"get_weather","input":{"city":"Lyon"}}],
                "stop_reason":"tool_use"}"#,
            false,
        )?;
        assert_eq!(c.finish_reason, "tool_calls");
        assert_eq!(c.text, "Checking.");
        assert_eq!(
            c.tool_calls,
            Some(json!([{"id": "toolu_2", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Lyon\"}"}}]))
        );
        Ok(())
    }

    #[test]
    fn json_output_goes_through_one_forced_tool() -> Result<(), String> {
        let cfg = ProviderConfig::new(ProviderKind::Anthropic, "https://a", "claude");
        let schema = json!({"type": "object", "properties": {"colour": {"type": "string"}}});
        let req = ChatRequest {
            messages: vec![Message::new("user", "A colour as JSON")],
            response_format: Some(
                json!({"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}),
            ),
            ..ChatRequest::default()
        };
        let v: Value = serde_json::from_str(&body(&cfg, &req).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        assert_eq!(v["tools"][0]["name"], JSON_TOOL);
        assert_eq!(v["tools"][0]["input_schema"], schema);
        assert_eq!(v["tool_choice"], json!({"type": "tool", "name": JSON_TOOL}));
        let c = parse(
            br#"{"content":[{"type":"tool_use","id":"t","name":"json_output","input":{"colour":"teal"}}],
                "stop_reason":"tool_use"}"#,
            true,
        )?;
        assert_eq!(
            (c.text.as_str(), c.finish_reason.as_str()),
            ("{\"colour\":\"teal\"}", "stop")
        );
        assert!(c.tool_calls.is_none());
        // Both at once cannot be expressed: refused, never half-translated.
        let both = ChatRequest {
            tools: Some(json!([{"type": "function", "function": {"name": "f"}}])),
            ..req
        };
        assert!(body(&cfg, &both).is_err());
        Ok(())
    }
}
