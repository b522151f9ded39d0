//! The frames the corral supervisor and a sandboxed `corral-runner` exchange over the runner's
//! stdin and stdout (stderr carries the runner's logs).
//!
//! A frame is a little-endian `u32` byte length followed by that many bytes of JSON. The runner
//! sends [`Response::Ready`] once its model is loaded, then answers [`Request`]s one after
//! another. Each side caps the frames it accepts; the supervisor treats everything the runner
//! sends as untrusted (sizes, token ids, UTF-8, timing). See `docs/runner-protocol.md`.
#![forbid(unsafe_code)]

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

pub mod digest;

/// Largest request frame a runner accepts.
pub const MAX_REQUEST_FRAME: u32 = 8 * 1024 * 1024;
/// Largest response frame the supervisor accepts.
pub const MAX_RESPONSE_FRAME: u32 = 16 * 1024 * 1024;
/// Most alternatives per token (OpenAI's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    Generate(Box<GenerateRequest>),
    /// Stop request `id` (if it is running) with finish reason `cancelled`.
    Cancel {
        id: u64,
    },
    /// Token ids of `text` (special tokens are parsed when `special`).
    Tokenize {
        id: u64,
        text: String,
        special: bool,
    },
    /// Exit cleanly.
    Shutdown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub id: u64,
    pub input: Input,
    #[serde(default)]
    pub sampling: Sampling,
    pub max_tokens: u32,
    #[serde(default)]
    pub stop: Vec<String>,
    /// Alternatives reported per token (0..=20).
    #[serde(default)]
    pub top_logprobs: u32,
    /// Send a [`Response::Token`] per token; otherwise the tokens come with `Done`.
    #[serde(default = "yes")]
    pub stream: bool,
    /// Keep generating past end-of-sequence tokens (benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Constrain the answer (JSON): each step may only pick tokens that keep it valid. With
    /// `tools`, it constrains the text answer (a call is constrained by its function's schema).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraint: Option<OutputConstraint>,
    /// Functions the model may call: they reach the model through its chat template (or
    /// corral's built-in tool prompt) and a call is generated under a grammar built from its
    /// function's `parameters` schema. Only with [`Input::Messages`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Tools>,
    /// The caller asked for `max_tokens` (not a default): a prompt and `max_tokens` that
    /// together pass the context are the request's error, naming both numbers, rather than a
    /// shorter answer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub max_tokens_explicit: bool,
    /// Whose prompt this is, for reusing the model's state of an earlier prompt's common
    /// prefix: only a request with the same key may reuse what the previous one left (none:
    /// no reuse, and nothing is kept for later requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_key: Option<String>,
}

/// The functions offered to the model, and how it may use them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tools {
    pub functions: Vec<Function>,
    #[serde(default)]
    pub choice: ToolChoice,
    /// More than one call in an answer.
    #[serde(default = "yes")]
    pub parallel: bool,
}

/// A function the model may call (OpenAI's `tools[].function`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Function {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON Schema for the arguments (an object); the subset is the runner's to check, as
    /// for [`OutputConstraint::JsonSchema`].
    pub parameters: serde_json::Value,
}

/// Whether the model must call a function.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum ToolChoice {
    /// Text or calls, as the model chooses.
    #[default]
    Auto,
    /// One or more calls, no text.
    Required,
    /// A call of this function.
    Function { name: String },
    /// Text only: the functions are not offered, and the answer may not start a call (the
    /// conversation may still hold earlier calls and their results).
    None,
}

/// A call the model made (or made earlier in the conversation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The caller's id for an earlier call; empty for a generated one (the supervisor names it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    pub name: String,
    /// The arguments: a JSON object (an earlier call's may be any value the caller sent).
    pub arguments: serde_json::Value,
}

/// What a constrained answer must be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum OutputConstraint {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid against this schema (the supported subset is the runner's to check: a schema
    /// using anything else is refused, never answered unconstrained).
    JsonSchema { schema: serde_json::Value },
}

fn yes() -> bool {
    true
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    /// Rendered with the model's chat template.
    Messages(Vec<ChatMessage>),
    /// Used as is (with the model's BOS token when it wants one).
    Prompt(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant's calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// A `tool` message: the call it answers, and that call's function.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A message with `role` and `content` only.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            ..ChatMessage::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// 0 = greedy.
    pub temperature: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// 1.0 = none.
    #[serde(default = "one")]
    pub repetition_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    #[serde(default = "last_n")]
    pub repeat_last_n: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

fn one() -> f32 {
    1.0
}
fn last_n() -> u32 {
    64
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            seed: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Ready(Ready),
    Token {
        id: u64,
        token: TokenInfo,
    },
    Done(Done),
    /// A `generate` the runner held back (every slot busy, or no room for its KV state) is
    /// being computed from now on: its time limit starts again here.
    Started {
        id: u64,
    },
    Tokens {
        id: u64,
        ids: Vec<u32>,
    },
    Error {
        id: Option<u64>,
        message: String,
        /// Whose fault: the request's (the default) or the model's.
        #[serde(default)]
        kind: ErrorKind,
    },
}

/// What an error frame is about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request cannot be served as given (a prompt longer than the context, an empty one):
    /// the caller's error; the runner is fine.
    #[default]
    Request,
    /// The model itself produced unusable output (non-finite logits: broken or corrupted
    /// weights). Not the caller's error, and another attempt on this model will not help.
    Model,
    /// The request does not fit this model's context (the prompt, or the prompt and an
    /// explicit `max_tokens`): a model with a larger context may serve it.
    Context,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ready {
    pub architecture: String,
    pub quantization: String,
    pub vocab_size: u32,
    pub context_length: u32,
    pub eos_token_ids: Vec<u32>,
    pub has_chat_template: bool,
    pub threads: u32,
    /// The instruction set of the runner's weight products (`avx512-vnni`, `avx2`, `portable`;
    /// empty from runners before it).
    #[serde(default)]
    pub kernels: String,
    /// Where the forward pass runs: `cpu`, or the GPU and its memory (empty from runners
    /// before it).
    #[serde(default)]
    pub device: String,
    pub load_ms: f64,
    /// Requests the runner decodes together at most (`--slots`; 1 for runners before it).
    #[serde(default = "one_slot")]
    pub slots: u32,
    /// Bytes one position of a sequence takes in the runner's KV cache.
    #[serde(default)]
    pub kv_bytes_per_token: u64,
    /// MiB of KV state (running requests and kept prompt states) the runner holds at most.
    #[serde(default)]
    pub kv_budget_mb: u64,
}

fn one_slot() -> u32 {
    1
}

/// One generated token, with log-probabilities from the raw distribution (log-softmax of the
/// logits at temperature 1, before penalties and truncation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub token_id: u32,
    /// The token's raw bytes (may be part of a UTF-8 character).
    pub bytes: Vec<u8>,
    /// Text this token completes (the concatenation of all `text` is the output).
    pub text: String,
    pub logprob: f32,
    /// Entropy (nats) of the full distribution at this step.
    pub entropy: f32,
    /// The best token's log-probability minus the second best's (nats).
    #[serde(default)]
    pub margin: f32,
    /// Entropy (nats) of the five best tokens' probabilities, renormalised.
    #[serde(default)]
    pub top_entropy: f32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<TopLogprob>,
    /// The constraint allowed only this token: it says nothing of the model's confidence.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forced: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token_id: u32,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-sequence token or a stop sequence.
    Stop,
    /// `max_tokens` or the context window.
    Length,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Done {
    pub id: u64,
    pub finish_reason: FinishReason,
    pub text: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub prefill_ms: f64,
    /// Request received -> first token sampled.
    pub ttft_ms: f64,
    pub decode_tokens_per_s: f64,
    /// Time spent in the constraint (token masks and grammar updates), included in the decode
    /// time; 0 without one.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub constraint_ms: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<TokenInfo>,
    /// The calls the answer makes (`text` is then empty); each generated under its
    /// function's schema.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// Prompt tokens whose state was reused from the previous request of the same
    /// `cache_key` (not computed again); included in `prompt_tokens`.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub cached_tokens: u32,
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {size} bytes exceeds the limit of {limit}")]
    TooLarge { size: u32, limit: u32 },
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("malformed frame: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Writes one frame and flushes.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), FrameError> {
    let body = serde_json::to_vec(msg)?;
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge {
        size: u32::MAX,
        limit: u32::MAX,
    })?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(&body)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
pub fn read_frame<T: for<'de> Deserialize<'de>>(
    r: &mut impl Read,
    limit: u32,
) -> Result<Option<T>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let size = u32::from_le_bytes(len);
    if size > limit {
        return Err(FrameError::TooLarge { size, limit });
    }
    let mut body = vec![0u8; size as usize];
    r.read_exact(&mut body).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            e.into()
        }
    })?;
    Ok(Some(serde_json::from_slice(&body)?))
}

/// Keys a schema object may have (docs/serving.md lists them).
pub const KEYWORDS: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "enum",
    "const",
    "items",
    "prefixItems",
    "minItems",
    "maxItems",
    "anyOf",
    "oneOf",
    "allOf",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "$ref",
    "$defs",
    "definitions",
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
];

/// Checks every schema object in `schema` against the JSON Schema subset the runner enforces
/// by constrained decoding ([`KEYWORDS`]); the error names the first other key and where it is
/// (a JSON pointer). The supervisor checks before it sends (a schema the local model cannot
/// enforce goes remote or is refused), the runner again before it compiles.
pub fn check_schema(schema: &serde_json::Value) -> Result<(), String> {
    fn walk(v: &serde_json::Value, at: &str) -> Result<(), String> {
        let Some(obj) = v.as_object() else {
            return match v {
                serde_json::Value::Bool(_) => Ok(()),
                _ => Err(format!("{}: a schema must be an object", pointer(at))),
            };
        };
        for (k, sub) in obj {
            if !KEYWORDS.contains(&k.as_str()) {
                return Err(format!(
                    "JSON Schema keyword '{k}' at {} is not supported for local constrained decoding (see docs/serving.md for the subset)",
                    pointer(at)
                ));
            }
            let here = format!("{at}/{k}");
            match k.as_str() {
                "properties" | "$defs" | "definitions" => {
                    for (name, s) in sub.as_object().into_iter().flatten() {
                        walk(s, &format!("{here}/{name}"))?;
                    }
                }
                "items" | "additionalProperties" => walk(sub, &here)?,
                "anyOf" | "oneOf" | "allOf" | "prefixItems" => {
                    for (i, s) in sub.as_array().into_iter().flatten().enumerate() {
                        walk(s, &format!("{here}/{i}"))?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
    fn pointer(at: &str) -> String {
        if at.is_empty() {
            "the schema's root".into()
        } else {
            format!("'{at}'")
        }
    }
    walk(schema, "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_limits_hold() {
        let req = Request::Generate(Box::new(GenerateRequest {
            id: 7,
            input: Input::Messages(vec![ChatMessage::new("user", "hi")]),
            sampling: Sampling::default(),
            max_tokens: 16,
            stop: vec!["\n".into()],
            top_logprobs: 2,
            stream: true,
            ignore_eos: false,
            constraint: None,
            tools: None,
            max_tokens_explicit: false,
            cache_key: None,
        }));
        let mut buf = Vec::new();
        write_frame(&mut buf, &req).unwrap();
        write_frame(&mut buf, &Request::Shutdown).unwrap();
        let mut r = &buf[..];
        assert_eq!(
            read_frame::<Request>(&mut r, MAX_REQUEST_FRAME).unwrap(),
            Some(req)
        );
        assert_eq!(
            read_frame::<Request>(&mut r, MAX_REQUEST_FRAME).unwrap(),
            Some(Request::Shutdown)
        );
        assert!(read_frame::<Request>(&mut r, MAX_REQUEST_FRAME)
            .unwrap()
            .is_none());

        let mut big = Vec::new();
        big.extend_from_slice(&(MAX_RESPONSE_FRAME + 1).to_le_bytes());
        assert!(matches!(
            read_frame::<Response>(&mut &big[..], MAX_RESPONSE_FRAME),
            Err(FrameError::TooLarge { .. })
        ));
        let cut = &buf[..6];
        assert!(matches!(
            read_frame::<Request>(&mut &cut[..], MAX_REQUEST_FRAME),
            Err(FrameError::Truncated)
        ));
    }
}
