//! OpenAI's shapes for an answer: the JSON response, streamed chunks, log-probabilities, and the
//! `x-corral-*` headers with the same facts as the response's `corral` field.

use std::convert::Infallible;

use axum::http::HeaderValue;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use corral_protocol::TokenInfo;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::unix_now;
use crate::answer::{Answer, Endpoint, Request, Source};
use crate::routing::RouteDecision;

pub type SseItem = Result<SseEvent, Infallible>;

/// The response's `corral` field.
pub fn corral_json(a: &Answer, d: &RouteDecision, rid: &str) -> Value {
    json!({
        "request_id": rid,
        "route": a.source.label(),
        "model": a.model,
        "provider": a.provider,
        "profile": a.profile,
        "confidence": a.confidence,
        "confidence_method": a.method.name(),
        "threshold": a.threshold,
        "escalated": a.escalation.is_some(),
        "escalation_reason": a.escalation.as_ref().map(|e| e.reason()),
        "field_confidence": a.field_confidence,
        "policies": d.policies_applied,
        "task": d.task.task,
        "complexity": d.task.complexity,
    })
}

pub fn headers_for(a: &Answer, d: &RouteDecision) -> Vec<(&'static str, String)> {
    let mut h = vec![
        ("x-corral-route", a.source.label().to_string()),
        ("x-corral-model", a.model.clone()),
        ("x-corral-escalated", a.escalation.is_some().to_string()),
        ("x-corral-policies", d.policies_applied.join(",")),
    ];
    if let Some(c) = a.confidence {
        h.push(("x-corral-confidence", format!("{c:.4}")));
    }
    if let Some(e) = &a.escalation {
        h.push(("x-corral-escalation-reason", e.kind().to_string()));
    }
    h
}

pub fn set_headers(r: &mut Response, h: &[(&'static str, String)]) {
    for (k, v) in h {
        if let Ok(v) = HeaderValue::from_str(v) {
            r.headers_mut().insert(*k, v);
        }
    }
}

fn token_str(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// OpenAI chat `logprobs` for the answer's tokens.
fn chat_logprobs(tokens: &[TokenInfo]) -> Value {
    let content: Vec<Value> = tokens.iter().map(chat_logprob_entry).collect();
    json!({"content": content, "refusal": null})
}

fn chat_logprob_entry(t: &TokenInfo) -> Value {
    json!({
        "token": token_str(&t.bytes),
        "logprob": t.logprob,
        "bytes": t.bytes,
        "top_logprobs": t.top.iter().map(|a| json!({
            "token": token_str(&a.bytes), "logprob": a.logprob, "bytes": a.bytes,
        })).collect::<Vec<_>>(),
    })
}

/// Legacy completions `logprobs`.
fn completion_logprobs(tokens: &[TokenInfo]) -> Value {
    let mut offset = 0;
    let mut offsets = Vec::new();
    for t in tokens {
        offsets.push(offset);
        offset += t.text.len();
    }
    json!({
        "tokens": tokens.iter().map(|t| token_str(&t.bytes)).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens.iter().map(|t| {
            t.top.iter().map(|a| (token_str(&a.bytes), json!(a.logprob))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

/// The assistant message: its text, or its tool calls (content `null` when there is no text,
/// as OpenAI sends it).
fn message_json(a: &Answer) -> Value {
    let mut m = json!({"role": "assistant", "content": a.text, "refusal": null});
    if let Some(calls) = &a.tool_calls {
        m["tool_calls"] = calls.clone();
        if a.text.is_empty() {
            m["content"] = Value::Null;
        }
    }
    m
}

pub fn usage_json(a: &Answer) -> Value {
    json!({
        "prompt_tokens": a.prompt_tokens,
        "completion_tokens": a.completion_tokens,
        "total_tokens": a.prompt_tokens + a.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": a.cached_tokens},
    })
}

/// The whole answer as one JSON response.
pub fn json_response(req: &Request, a: &Answer, d: &RouteDecision) -> Response {
    let created = unix_now();
    let lp = |v: Value| {
        if req.logprobs.is_some() && a.source == Source::Slm {
            v
        } else {
            Value::Null
        }
    };
    let body = match req.endpoint {
        Endpoint::Chat => json!({
            "id": format!("chatcmpl-{}", req.id),
            "object": "chat.completion",
            "created": created,
            "model": a.model,
            "choices": [{
                "index": 0,
                "message": message_json(a),
                "logprobs": lp(chat_logprobs(&a.tokens)),
                "finish_reason": a.finish_reason,
            }],
            "usage": usage_json(a),
            "system_fingerprint": null,
            "corral": corral_json(a, d, &req.id),
        }),
        Endpoint::Completion => json!({
            "id": format!("cmpl-{}", req.id),
            "object": "text_completion",
            "created": created,
            "model": a.model,
            "choices": [{
                "index": 0,
                "text": a.text,
                "logprobs": lp(completion_logprobs(&a.tokens)),
                "finish_reason": a.finish_reason,
            }],
            "usage": usage_json(a),
            "corral": corral_json(a, d, &req.id),
        }),
    };
    let mut r = Json(body).into_response();
    set_headers(&mut r, &headers_for(a, d));
    r
}

/// Streamed chunks of one answer.
pub struct Chunks<'a> {
    req: &'a Request,
    /// `stream_options.include_usage`: a last chunk with the usage.
    include_usage: bool,
    model: &'a str,
    created: u64,
}

impl Chunks<'_> {
    pub fn new<'a>(req: &'a Request, include_usage: bool, model: &'a str) -> Chunks<'a> {
        Chunks {
            req,
            include_usage,
            model,
            created: unix_now(),
        }
    }

    /// One chunk: `text` (and the token, for logprobs), or the end (`finish`).
    fn chunk(
        &self,
        text: Option<&str>,
        token: Option<&TokenInfo>,
        finish: Option<&str>,
        first: bool,
    ) -> Value {
        let req = self.req;
        let lp = |t: Option<&TokenInfo>| match (req.logprobs, t) {
            (Some(_), Some(t)) => match req.endpoint {
                Endpoint::Chat => json!({"content": [chat_logprob_entry(t)], "refusal": null}),
                Endpoint::Completion => completion_logprobs(std::slice::from_ref(t)),
            },
            _ => Value::Null,
        };
        let mut v = match req.endpoint {
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({
                    "id": format!("chatcmpl-{}", req.id),
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "system_fingerprint": null,
                    "choices": [{"index": 0, "delta": delta, "logprobs": lp(token), "finish_reason": finish}],
                })
            }
            Endpoint::Completion => json!({
                "id": format!("cmpl-{}", req.id),
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": lp(token), "finish_reason": finish}],
            }),
        };
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// The opening chunk (chat: the assistant role).
    pub fn start(&self) -> SseItem {
        sse_data(&self.chunk(
            (self.req.endpoint == Endpoint::Chat).then_some(""),
            None,
            None,
            true,
        ))
    }

    /// A piece of text, with its token when it is one (for logprobs).
    pub fn text(&self, text: &str, token: Option<&TokenInfo>) -> SseItem {
        sse_data(&self.chunk(Some(text), token, None, false))
    }

    /// A piece of a remote answer's text, with the provider's log-probabilities of its tokens
    /// (OpenAI's `logprobs.content` entries) when the request asked for them.
    pub fn remote_text(&self, text: &str, logprobs: Option<&[Value]>) -> SseItem {
        let mut c = self.chunk(Some(text), None, None, false);
        if let (Some(lp), Some(_), Endpoint::Chat) =
            (logprobs, self.req.logprobs, self.req.endpoint)
        {
            c["choices"][0]["logprobs"] = json!({"content": lp, "refusal": null});
        }
        sse_data(&c)
    }

    /// A piece of a remote answer's tool call, as the provider streamed it.
    pub fn call_piece(
        &self,
        index: usize,
        id: Option<String>,
        name: Option<String>,
        arguments: &str,
    ) -> SseItem {
        let mut d = json!({"index": index, "function": {"arguments": arguments}});
        if let Some(id) = id {
            d["id"] = json!(id);
            d["type"] = json!("function");
        }
        if let Some(name) = name {
            d["function"]["name"] = json!(name);
        }
        let mut c = self.chunk(None, None, None, false);
        c["choices"][0]["delta"] = json!({"tool_calls": [d]});
        sse_data(&c)
    }

    /// A tool call streamed as OpenAI does: the id, type and name with empty arguments first,
    /// then the arguments.
    pub fn tool_call(&self, index: usize, call: &Value) -> Vec<SseItem> {
        let delta = |d: Value| {
            let mut c = self.chunk(None, None, None, false);
            c["choices"][0]["delta"] = json!({"tool_calls": [d]});
            sse_data(&c)
        };
        let args = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or_default();
        vec![
            delta(json!({
                "index": index,
                "id": call.get("id"),
                "type": "function",
                "function": {"name": call.pointer("/function/name"), "arguments": ""},
            })),
            delta(json!({"index": index, "function": {"arguments": args}})),
        ]
    }

    /// The closing chunk(s): finish reason and the `corral` facts, the usage chunk when asked
    /// for, `[DONE]`.
    pub fn end(&self, a: &Answer, corral: Value) -> Vec<SseItem> {
        let mut last = self.chunk(None, None, Some(&a.finish_reason), false);
        last["corral"] = corral;
        let mut out = vec![sse_data(&last)];
        if self.include_usage {
            let mut u = self.chunk(None, None, None, false);
            u["choices"] = json!([]);
            u["usage"] = usage_json(a);
            out.push(sse_data(&u));
        }
        out.push(Ok(SseEvent::default().data("[DONE]")));
        out
    }
}

pub fn sse_data(v: &Value) -> SseItem {
    Ok(SseEvent::default().data(v.to_string()))
}

pub fn sse_response(rx: mpsc::Receiver<SseItem>, h: &[(&'static str, String)]) -> Response {
    let mut r = Sse::new(ReceiverStream::new(rx)).into_response();
    set_headers(&mut r, h);
    r
}

/// A finished answer sent as a stream (buffered SLM answers and remote answers).
pub fn stream_finished(
    req: &Request,
    include_usage: bool,
    a: &Answer,
    d: &RouteDecision,
) -> Response {
    let c = Chunks::new(req, include_usage, &a.model);
    let mut items = vec![c.start()];
    if a.source == Source::Slm && !a.tokens.is_empty() {
        let mut sent = 0;
        for t in &a.tokens {
            if t.text.is_empty() && req.logprobs.is_none() {
                continue;
            }
            sent += t.text.len();
            items.push(c.text(&t.text, Some(t)));
        }
        if let Some(rest) = a.text.get(sent..).filter(|r| !r.is_empty()) {
            items.push(c.text(rest, None));
        }
    } else if !a.text.is_empty() {
        items.push(c.text(&a.text, None));
    }
    for (i, call) in a
        .tool_calls
        .as_ref()
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        items.extend(c.tool_call(i, call));
    }
    items.extend(c.end(a, corral_json(a, d, &req.id)));
    sse_items(items, &headers_for(a, d))
}

/// A stream of items all known already: the channel holds every one, so nothing here waits
/// for the client.
pub fn sse_items(items: Vec<SseItem>, h: &[(&'static str, String)]) -> Response {
    let (tx, rx) = mpsc::channel(items.len().max(1));
    for i in items {
        let _ = tx.try_send(i);
    }
    drop(tx);
    sse_response(rx, h)
}
