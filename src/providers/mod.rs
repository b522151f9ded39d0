//! Remote LLM providers: OpenAI-compatible chat completions and Anthropic Messages.
//!
//! corral escalates a request it will not (or cannot) answer with a sandboxed small model to a
//! remote provider. This module is the client side of that: one [`Provider`] per
//! `[providers.NAME]` table of corral.toml, each with its own HTTP agent, retry policy and
//! circuit breaker, and a [`Chain`] that tries several in order. Everything is synchronous and
//! thread-safe; an async caller runs [`Provider::complete`] on a blocking thread.
//!
//! - `config.rs`: [`ProviderConfig`], its defaults and validation with key paths.
//! - `client.rs`: [`Provider`]: the request loop (API key, breaker admission, attempts, retries).
//! - `openai.rs`, `anthropic.rs`: each wire format, request body to parsed completion.
//! - `backoff.rs`: exponential backoff with full jitter and `Retry-After`.
//! - `breaker.rs`: the circuit breaker state machine, with time passed in.
//! - `chain.rs`: [`Chain`], an ordered fallback over providers.
//!
//! `docs/providers.md` documents the configuration keys and the retry and breaker semantics.

mod anthropic;
mod backoff;
mod breaker;
mod chain;
mod client;
mod config;
mod openai;
mod stream;

pub use breaker::BreakerState;
pub use chain::{Chain, ChainError};
pub use client::{Provider, Sink};
pub use config::{ProviderConfig, ProviderKind};
pub use stream::Delta;

use serde::{Deserialize, Serialize};

/// Longest provider error message kept in [`ProviderError::Status`], in characters.
const MAX_ERROR_MESSAGE_CHARS: usize = 500;

/// One chat message. Roles are `system`, `user`, `assistant` and `tool`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// An assistant message's tool calls, in OpenAI's shape (`[{"id", "type": "function",
    /// "function": {"name", "arguments"}}]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A `tool` message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
        }
    }
}

/// What to ask a provider. Unset sampling options are left to the provider's defaults;
/// `max_tokens` falls back to the provider's configured `max_tokens`.
#[derive(Debug, Clone, Default)]
pub struct ChatRequest {
    /// The provider's model to ask, when the caller named one (`provider/model` or an alias);
    /// else the provider's configured `model`.
    pub model: Option<String>,
    pub messages: Vec<Message>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Stop sequences (OpenAI `stop`, Anthropic `stop_sequences`).
    pub stop: Vec<String>,
    /// Ask for per-token log-probabilities (OpenAI-compatible providers only).
    pub logprobs: bool,
    /// An opaque end-user id for the provider's abuse monitoring (OpenAI `user`, Anthropic
    /// `metadata.user_id`).
    pub user: Option<String>,
    /// Functions the model may call, in OpenAI's shape (`[{"type": "function", "function":
    /// {"name", "description", "parameters"}}]`), and how (`tool_choice`: `none`, `auto`,
    /// `required` or `{"type": "function", "function": {"name"}}`; `parallel_tool_calls`).
    pub tools: Option<serde_json::Value>,
    pub tool_choice: Option<serde_json::Value>,
    pub parallel_tool_calls: Option<bool>,
    /// OpenAI's `response_format` (`json_object`, `json_schema`), when not plain text.
    pub response_format: Option<serde_json::Value>,
    /// Set when nobody waits for the answer any more (the client went away): no further
    /// attempt, backoff or provider is started (one already sent runs to its end).
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl ChatRequest {
    /// Whether the caller has given up on this request.
    pub fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::Acquire))
    }
}

/// Token counts as the provider reported them (zeros when it reported none).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// A provider's answer.
#[derive(Debug, Clone, Serialize)]
pub struct ChatResponse {
    /// The configured provider name (the `NAME` of `[providers.NAME]`).
    pub provider: String,
    /// The model the provider says answered, or the configured one when it did not say.
    pub model: String,
    pub text: String,
    /// `stop`, `length`, `content_filter`, `tool_calls`, or the provider's raw value.
    pub finish_reason: String,
    pub usage: Usage,
    /// Log-probability of each generated token, when requested and returned (OpenAI-compatible
    /// providers only; always `None` for Anthropic, which has none).
    pub token_logprobs: Option<Vec<f32>>,
    /// The calls the model made, in OpenAI's shape (`finish_reason` is then `tool_calls`).
    pub tool_calls: Option<serde_json::Value>,
    /// Wall time of the whole call, retries and backoff included.
    pub latency_ms: f64,
    /// HTTP attempts made, the successful one included.
    pub attempts: u32,
}

/// Why a provider gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider answered with an error status; `message` comes from its JSON error body
    /// when there is one, truncated to 500 characters.
    #[error("provider {provider}: http status {status}: {message}")]
    Status {
        provider: String,
        status: u16,
        message: String,
    },
    #[error("provider {provider}: timed out after {ms} ms")]
    Timeout { provider: String, ms: u64 },
    /// Connecting, sending or receiving failed (refused connection, DNS, reset, TLS).
    #[error("provider {provider}: {message}")]
    Transport { provider: String, message: String },
    /// A success status with a body that is not the expected JSON.
    #[error("provider {provider}: unreadable response: {message}")]
    BadResponse { provider: String, message: String },
    #[error("provider {provider}: circuit open after {failures} consecutive failures; next try in {retry_in_ms} ms")]
    CircuitOpen {
        provider: String,
        failures: u32,
        retry_in_ms: u64,
    },
    #[error("provider {provider}: environment variable {env} (providers.{provider}.api_key_env) is not set")]
    MissingKey { provider: String, env: String },
    /// The caller went away; nothing more was sent (a stream being read was closed).
    #[error("provider {provider}: cancelled, the client went away")]
    Cancelled { provider: String },
    /// A streamed answer failed after its first piece went out: never retried or passed to
    /// another provider, since the caller already has part of an answer.
    #[error("provider {provider}: the stream broke after it started: {message}")]
    Interrupted { provider: String, message: String },
}

pub type Result<T, E = ProviderError> = std::result::Result<T, E>;

impl ProviderError {
    /// Whether the same request may succeed if sent again: rate limits (429), server errors
    /// (5xx, Anthropic's 529 "overloaded" included), timeouts and transport failures.
    pub fn retryable(&self) -> bool {
        match self {
            ProviderError::Status { status, .. } => *status == 429 || (500..=599).contains(status),
            ProviderError::Timeout { .. } | ProviderError::Transport { .. } => true,
            ProviderError::BadResponse { .. }
            | ProviderError::CircuitOpen { .. }
            | ProviderError::MissingKey { .. }
            | ProviderError::Cancelled { .. }
            | ProviderError::Interrupted { .. } => false,
        }
    }

    /// The configured name of the provider that failed.
    pub fn provider(&self) -> &str {
        match self {
            ProviderError::Status { provider, .. }
            | ProviderError::Timeout { provider, .. }
            | ProviderError::Transport { provider, .. }
            | ProviderError::BadResponse { provider, .. }
            | ProviderError::CircuitOpen { provider, .. }
            | ProviderError::MissingKey { provider, .. }
            | ProviderError::Cancelled { provider }
            | ProviderError::Interrupted { provider, .. } => provider,
        }
    }

    /// The HTTP status the provider answered with, for [`ProviderError::Status`].
    pub fn status(&self) -> Option<u16> {
        match self {
            ProviderError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether this error is the provider's fault and so counts as a circuit-breaker failure.
    /// A 4xx other than 429 is the caller's (bad request, bad key): the provider is up.
    fn counts_against_provider(&self) -> bool {
        self.retryable()
            || matches!(
                self,
                ProviderError::BadResponse { .. } | ProviderError::Interrupted { .. }
            )
    }
}

/// The message of a provider's error body: `error.message` of OpenAI's
/// `{"error": {"message", "type", "code"}}` and Anthropic's
/// `{"type": "error", "error": {"type", "message"}}`, or the body itself when it is not such
/// JSON, or `fallback` (the status text) when it is empty. Truncated to 500 characters.
fn error_message(body: &str, fallback: &str) -> String {
    let from_json = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            let error = v.get("error")?;
            match error {
                serde_json::Value::String(s) => Some(s.clone()),
                _ => error
                    .get("message")
                    .or_else(|| error.get("type"))
                    .and_then(|m| m.as_str())
                    .map(str::to_string),
            }
        });
    let message = match from_json {
        Some(m) if !m.trim().is_empty() => m,
        _ if !body.trim().is_empty() => body.trim().to_string(),
        _ => fallback.to_string(),
    };
    truncate_chars(&message, MAX_ERROR_MESSAGE_CHARS)
}

/// `s` cut to at most `max` characters, the last three `...` when it was cut.
fn truncate_chars(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(3)).collect();
    out.push_str("...");
    out
}

/// What a wire format parsed out of a successful response.
#[derive(Debug, Clone, PartialEq)]
struct Completion {
    model: Option<String>,
    text: String,
    finish_reason: String,
    usage: Usage,
    token_logprobs: Option<Vec<f32>>,
    tool_calls: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_message_comes_from_openai_and_anthropic_bodies() {
        let openai = r#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","code":"invalid_api_key"}}"#;
        assert_eq!(
            error_message(openai, "Unauthorized"),
            "Incorrect API key provided"
        );
        let anthropic =
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        assert_eq!(error_message(anthropic, "x"), "Overloaded");
        let type_only = r#"{"error":{"type":"rate_limit_error"}}"#;
        assert_eq!(error_message(type_only, "x"), "rate_limit_error");
    }

    #[test]
    fn error_message_falls_back_to_body_then_status_text() {
        assert_eq!(
            error_message("  upstream connect error \n", "Bad Gateway"),
            "upstream connect error"
        );
        assert_eq!(error_message("", "Bad Gateway"), "Bad Gateway");
        assert_eq!(
            error_message(r#"{"error":{"message":""}}"#, "Bad Gateway"),
            r#"{"error":{"message":""}}"#
        );
    }

    #[test]
    fn long_error_messages_are_truncated_to_500_chars() {
        let long = "é".repeat(2000);
        let body = format!(r#"{{"error":{{"message":"{long}"}}}}"#);
        let m = error_message(&body, "x");
        assert_eq!(m.chars().count(), 500);
        assert!(m.ends_with("..."));
        assert_eq!(truncate_chars("short", 500), "short");
    }

    #[test]
    fn retryable_follows_status_class() {
        let status = |status| ProviderError::Status {
            provider: "p".into(),
            status,
            message: String::new(),
        };
        for s in [429, 500, 502, 503, 529] {
            assert!(status(s).retryable(), "{s} should be retried");
        }
        for s in [400, 401, 403, 404, 422] {
            assert!(!status(s).retryable(), "{s} should not be retried");
            assert!(!status(s).counts_against_provider());
        }
        let timeout = ProviderError::Timeout {
            provider: "p".into(),
            ms: 5,
        };
        assert!(timeout.retryable());
        let bad = ProviderError::BadResponse {
            provider: "p".into(),
            message: String::new(),
        };
        assert!(!bad.retryable());
        assert!(bad.counts_against_provider());
        assert_eq!(bad.provider(), "p");
        assert_eq!(status(503).status(), Some(503));
    }
}
