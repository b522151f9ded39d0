//! The OpenAI chat completions wire format (`POST {base_url}/chat/completions`), also spoken by
//! llama.cpp's server, vLLM and Ollama.

use serde::{Deserialize, Serialize};

use super::{ChatRequest, Completion, Message, ProviderConfig, Usage};

pub(super) fn endpoint(base_url: &str) -> String {
    format!("{}/chat/completions", base_url.trim_end_matches('/'))
}

/// Request headers besides `content-type`: `Authorization: Bearer KEY` when there is a key.
pub(super) fn headers(key: Option<&str>) -> Vec<(&'static str, String)> {
    key.map(|k| vec![("authorization", format!("Bearer {k}"))])
        .unwrap_or_default()
}

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    messages: &'a [Message],
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_logprobs: Option<u32>,
    // Tools and structured output go as the caller sent them.
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<&'a serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<&'a serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<&'a serde_json::Value>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    /// A streamed answer's last chunk carries the usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<serde_json::Value>,
}

#[cfg(test)]
pub(super) fn body(cfg: &ProviderConfig, req: &ChatRequest) -> serde_json::Result<String> {
    body_for(cfg, req, false)
}

/// The request body; `stream`: ask for server-sent events (with the usage at the end).
pub(super) fn body_for(
    cfg: &ProviderConfig,
    req: &ChatRequest,
    stream: bool,
) -> serde_json::Result<String> {
    serde_json::to_string(&Body {
        model: req.model.as_deref().unwrap_or(&cfg.model),
        messages: &req.messages,
        max_tokens: req.max_tokens.unwrap_or(cfg.max_tokens),
        temperature: req.temperature,
        top_p: req.top_p,
        stop: &req.stop,
        user: req.user.as_deref(),
        logprobs: req.logprobs.then_some(true),
        top_logprobs: req.logprobs.then_some(0),
        tools: req.tools.as_ref(),
        tool_choice: req.tool_choice.as_ref(),
        parallel_tool_calls: req.parallel_tool_calls,
        response_format: req.response_format.as_ref(),
        stream,
        stream_options: (stream && cfg.stream_usage)
            .then(|| serde_json::json!({"include_usage": true})),
    })
}

#[derive(Deserialize)]
struct Response {
    #[serde(default)]
    model: Option<String>,
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<ResponseUsage>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    message: Option<ResponseMessage>,
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    logprobs: Option<Logprobs>,
}

#[derive(Deserialize)]
struct ResponseMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Logprobs {
    #[serde(default)]
    content: Option<Vec<TokenLogprob>>,
}

#[derive(Deserialize)]
struct TokenLogprob {
    logprob: f32,
}

#[derive(Deserialize)]
struct ResponseUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
}

/// The first choice of a chat completion. `want_logprobs`: whether they were asked for (a
/// server that sends them unasked is not believed to have meant it).
pub(super) fn parse(body: &[u8], want_logprobs: bool) -> Result<Completion, String> {
    let r: Response = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let Some(choice) = r.choices.into_iter().next() else {
        return Err("no choices in the completion".into());
    };
    let usage = r.usage.map_or(
        Usage {
            prompt_tokens: 0,
            completion_tokens: 0,
        },
        |u| Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
        },
    );
    let token_logprobs = if want_logprobs {
        choice
            .logprobs
            .and_then(|l| l.content)
            .map(|c| c.into_iter().map(|t| t.logprob).collect())
    } else {
        None
    };
    let (text, tool_calls) = match choice.message {
        Some(m) => (
            m.content.unwrap_or_default(),
            m.tool_calls
                .filter(|c| c.as_array().is_some_and(|a| !a.is_empty())),
        ),
        None => (String::new(), None),
    };
    Ok(Completion {
        model: r.model.filter(|m| !m.is_empty()),
        text,
        finish_reason: finish_reason(choice.finish_reason.as_deref()),
        usage,
        token_logprobs,
        tool_calls,
    })
}

fn finish_reason(raw: Option<&str>) -> String {
    match raw {
        Some("function_call") => "tool_calls".into(),
        Some(other) => other.into(),
        None => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::ProviderKind;

    #[test]
    fn body_has_the_configured_model_and_only_the_options_set() -> serde_json::Result<()> {
        let cfg = ProviderConfig::new(ProviderKind::Openai, "http://h/v1", "gpt-x");
        let req = ChatRequest {
            messages: vec![Message::new("user", "hi")],
            ..ChatRequest::default()
        };
        let v: serde_json::Value = serde_json::from_str(&body(&cfg, &req)?)?;
        assert_eq!(
            v,
            serde_json::json!({
                "model": "gpt-x",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 1024
            })
        );
        Ok(())
    }

    #[test]
    fn a_stream_asks_for_its_usage_unless_the_provider_refuses_the_field() -> serde_json::Result<()>
    {
        let mut cfg = ProviderConfig::new(ProviderKind::Openai, "http://h/v1", "gpt-x");
        let req = ChatRequest::default();
        let v: serde_json::Value = serde_json::from_str(&body_for(&cfg, &req, true)?)?;
        assert_eq!(v["stream"], true);
        assert_eq!(v["stream_options"]["include_usage"], true);
        cfg.stream_usage = false;
        let v: serde_json::Value = serde_json::from_str(&body_for(&cfg, &req, true)?)?;
        assert_eq!(v["stream"], true);
        assert!(v.get("stream_options").is_none());
        Ok(())
    }

    #[test]
    fn endpoint_tolerates_a_trailing_slash() {
        assert_eq!(
            endpoint("http://127.0.0.1:8080/v1/"),
            "http://127.0.0.1:8080/v1/chat/completions"
        );
    }

    #[test]
    fn missing_usage_and_null_content_are_zeros_and_empty() -> Result<(), String> {
        let c = parse(
            br#"{"choices":[{"message":{"role":"assistant","content":null},"finish_reason":"function_call"}]}"#,
            true,
        )?;
        assert_eq!(c.text, "");
        assert_eq!(c.finish_reason, "tool_calls");
        assert_eq!(
            c.usage,
            Usage {
                prompt_tokens: 0,
                completion_tokens: 0
            }
        );
        assert_eq!(c.token_logprobs, None);
        assert_eq!(c.model, None);
        Ok(())
    }

    #[test]
    fn logprobs_are_kept_only_when_asked_for() -> Result<(), String> {
        let body = br#"{"model":"m","choices":[{"message":{"content":"ok"},"finish_reason":"stop",
            "logprobs":{"content":[{"token":"ok","logprob":-0.25,"top_logprobs":[]}]}}]}"#;
        assert_eq!(parse(body, true)?.token_logprobs, Some(vec![-0.25]));
        assert_eq!(parse(body, false)?.token_logprobs, None);
        Ok(())
    }

    #[test]
    fn an_empty_choice_list_is_an_error() {
        assert_eq!(
            parse(br#"{"choices":[]}"#, false),
            Err("no choices in the completion".to_string())
        );
        assert!(parse(b"<html>", false).is_err());
    }
}
