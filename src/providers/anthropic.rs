//! The Anthropic Messages wire format (`POST {base_url}/v1/messages`).
//!
//! Differences from OpenAI's that matter here: system messages go in a top-level `system`
//! string, `max_tokens` is required, stop sequences are `stop_sequences`, the answer is a list
//! of content blocks, and there are no log-probabilities.

use serde::{Deserialize, Serialize};

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
    messages: Vec<&'a Message>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<Metadata<'a>>,
}

#[derive(Serialize)]
struct Metadata<'a> {
    user_id: &'a str,
}

/// The request body: system messages, wherever they are, joined by a blank line into `system`;
/// the others in order. `logprobs` is ignored (Anthropic has none).
pub(super) fn body(cfg: &ProviderConfig, req: &ChatRequest) -> serde_json::Result<String> {
    let (system, messages): (Vec<&Message>, Vec<&Message>) =
        req.messages.iter().partition(|m| m.role == "system");
    let system = (!system.is_empty()).then(|| {
        system
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n\n")
    });
    serde_json::to_string(&Body {
        model: &cfg.model,
        max_tokens: req.max_tokens.unwrap_or(cfg.max_tokens),
        system,
        messages,
        temperature: req.temperature,
        top_p: req.top_p,
        stop_sequences: &req.stop,
        metadata: req.user.as_deref().map(|user_id| Metadata { user_id }),
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
}

#[derive(Deserialize)]
struct ResponseUsage {
    #[serde(default)]
    input_tokens: u32,
    #[serde(default)]
    output_tokens: u32,
}

/// The text blocks of a message, concatenated; other blocks (tool use, thinking) are skipped.
pub(super) fn parse(body: &[u8]) -> Result<Completion, String> {
    let r: Response = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let text: String = r
        .content
        .iter()
        .filter(|b| b.kind == "text")
        .filter_map(|b| b.text.as_deref())
        .collect();
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
        finish_reason: stop_reason(r.stop_reason.as_deref()),
        usage,
        token_logprobs: None,
    })
}

fn stop_reason(raw: Option<&str>) -> String {
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
        )?;
        assert_eq!(c.text, "4");
        assert_eq!(c.usage.prompt_tokens, 0);
        assert!(parse(br#"{"type":"message"}"#).is_err());
        Ok(())
    }
}
