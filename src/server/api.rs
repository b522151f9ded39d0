//! The handlers. A generation request goes: authenticate -> parse and check every field ->
//! route -> (SLM on a warm pool | provider chain | refusal) -> score -> escalate when the
//! decision says so -> answer, as JSON or server-sent events, with `x-corral-*` headers and the
//! same facts under the response's `corral` field.
//!
//! Streaming and escalation: when an SLM answer may still be escalated (a fallback chain exists
//! and `on_low_confidence` with a threshold, or an audit rate), it is buffered until its score is
//! known and then sent (as chunks when `stream` is set), so a client never receives an answer
//! that is then replaced. Otherwise tokens stream as the runner produces them; the response
//! starts only once the first token exists, so a runner that fails before that is retried (or
//! the request escalated) invisibly. A failure after bytes reached the client ends the stream
//! with an error event (never a silent truncation) and is counted as `stream_error`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Query, State as AxState};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use corral_protocol::{ChatMessage, FinishReason, GenerateRequest, Input, Sampling, TokenInfo};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::auth::Identity;
use super::error::ApiError;
use super::openai::{self, ChatRequest, CompletionRequest};
use super::pool::{Event, FailKind, Job, Pool};
use super::{Live, State};
use crate::confidence;
use crate::providers::{Chain, ChatResponse, Message};
use crate::routing::{RequestContext, RouteDecision, Selection, TaskType};

type St = AxState<Arc<State>>;

/// The router; `serve` binds it, tests call it directly.
pub fn app(state: Arc<State>) -> Router {
    let limit = state.live().config.server.max_request_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/v1/route", post(route))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/admin/reload", post(admin_reload))
        .route("/admin/feedback", post(admin_feedback))
        .route("/admin/monitor", get(admin_monitor))
        .route("/admin/allow_lists", post(admin_allow_list))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(
            usize::try_from(limit).unwrap_or(usize::MAX),
        ))
        .with_state(state)
}

fn request_id() -> String {
    let mut b = [0u8; 12];
    if getrandom::getrandom(&mut b).is_err() {
        let n = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b.copy_from_slice(&n.to_le_bytes()[..12]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn with_id(mut r: Response, rid: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(rid) {
        r.headers_mut().insert("x-request-id", v);
    }
    r
}

fn body_of(body: Result<Bytes, BytesRejection>, limit: u64) -> Result<Bytes, ApiError> {
    match body {
        Ok(b) if b.len() as u64 > limit => Err(ApiError::too_large(limit)),
        Ok(b) => Ok(b),
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::too_large(limit)),
        Err(e) => Err(ApiError::invalid(e.body_text(), None)),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

impl Kind {
    /// The `endpoint` label of metrics and audit entries.
    fn endpoint(self) -> &'static str {
        match self {
            Kind::Chat => "chat",
            Kind::Completion => "completions",
        }
    }
}

/// A generation request, whichever endpoint it came from.
#[derive(Debug, Clone)]
struct Gen {
    kind: Kind,
    rid: String,
    model: String,
    /// (role, text); for completions one user message holding the prompt (what a provider gets).
    messages: Vec<(String, String)>,
    input: Input,
    max_tokens: u32,
    temperature: f32,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Vec<String>,
    /// `Some(n)`: return log-probabilities with `n` alternatives per position.
    logprobs: Option<u32>,
    stream: bool,
    include_usage: bool,
    user: Option<String>,
    metadata: BTreeMap<String, String>,
}

impl Gen {
    fn prompt_text(&self) -> String {
        match &self.input {
            Input::Prompt(p) => p.clone(),
            Input::Messages(_) => self
                .messages
                .iter()
                .map(|(_, t)| t.as_str())
                .collect::<Vec<_>>()
                .join("\n\n"),
        }
    }

    fn runner_request(&self) -> GenerateRequest {
        GenerateRequest {
            id: 0,
            input: self.input.clone(),
            sampling: Sampling {
                temperature: self.temperature,
                top_p: self.top_p,
                seed: self.seed,
                ..Sampling::default()
            },
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            top_logprobs: self.logprobs.unwrap_or(0),
            stream: true,
            ignore_eos: false,
        }
    }
}

async fn chat(
    AxState(state): St,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve_generation(state, headers, body, Kind::Chat, |body, rid| {
        let req: ChatRequest = openai::parse(body)?;
        req.check()?;
        let messages = req.texts()?;
        Ok(Gen {
            kind: Kind::Chat,
            rid,
            model: req.model,
            input: Input::Messages(
                messages
                    .iter()
                    .map(|(r, c)| ChatMessage {
                        role: r.clone(),
                        content: c.clone(),
                    })
                    .collect(),
            ),
            messages,
            max_tokens: req.max_completion_tokens.or(req.max_tokens).unwrap_or(512),
            temperature: req.temperature.unwrap_or(1.0),
            top_p: req.top_p,
            seed: req.seed.map(|s| s as u64),
            stop: req.stop.map(openai::Stop::into_vec).unwrap_or_default(),
            logprobs: req.logprobs.then(|| req.top_logprobs.unwrap_or(0)),
            stream: req.stream,
            include_usage: req.stream_options.is_some_and(|o| o.include_usage),
            user: req.user,
            metadata: req.metadata,
        })
    })
    .await
}

async fn completions(
    AxState(state): St,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve_generation(state, headers, body, Kind::Completion, |body, rid| {
        let req: CompletionRequest = openai::parse(body)?;
        req.check()?;
        let prompt = req.prompt()?;
        Ok(Gen {
            kind: Kind::Completion,
            rid,
            model: req.model,
            messages: vec![("user".into(), prompt.clone())],
            input: Input::Prompt(prompt),
            max_tokens: req.max_tokens.unwrap_or(16),
            temperature: req.temperature.unwrap_or(1.0),
            top_p: req.top_p,
            seed: req.seed.map(|s| s as u64),
            stop: req.stop.map(openai::Stop::into_vec).unwrap_or_default(),
            logprobs: req.logprobs,
            stream: req.stream,
            include_usage: req.stream_options.is_some_and(|o| o.include_usage),
            user: req.user,
            metadata: req.metadata,
        })
    })
    .await
}

/// What both generation endpoints do around their own parsing (`parse`: the body and the
/// request id into a [`Gen`]): authenticate, bound the body, generate within the request
/// timeout, answer errors in OpenAI's format.
async fn serve_generation(
    state: Arc<State>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
    parse: impl FnOnce(&[u8], String) -> Result<Gen, ApiError>,
) -> Response {
    let rid = request_id();
    let t0 = Instant::now();
    let live = state.live();
    let r = async {
        let (ident, slot) = live.keys.authenticate(&headers)?;
        let body = body_of(body, live.config.server.max_request_body_bytes)?;
        let gen = parse(&body, rid.clone())?;
        timed(
            &live,
            generate(state.clone(), live.clone(), ident, gen, t0, slot),
        )
        .await
    }
    .await;
    finish(&state, r, &rid, kind.endpoint(), t0)
}

/// `server.request_timeout_seconds` bounds a request until its response starts (a stream, once
/// started, is bounded by the runner's own time limit).
async fn timed(
    live: &Live,
    f: impl std::future::Future<Output = Response>,
) -> Result<Response, ApiError> {
    let limit = live.config.server.request_timeout;
    tokio::time::timeout(limit, f).await.map_err(|_| {
        let mut e = ApiError::unavailable(
            format!(
                "the request took longer than {}s (server.request_timeout_seconds)",
                limit.as_secs()
            ),
            1,
        );
        e.status = StatusCode::GATEWAY_TIMEOUT;
        e
    })
}

/// Turns a handler's result into the response, counting errors.
fn finish(
    state: &State,
    r: Result<Response, ApiError>,
    rid: &str,
    endpoint: &str,
    t0: Instant,
) -> Response {
    match r {
        Ok(resp) => with_id(resp, rid),
        Err(e) => {
            let code = e.status.as_u16().to_string();
            if e.status == StatusCode::TOO_MANY_REQUESTS {
                state.metrics.inc(
                    "corral_rate_limited_total",
                    &[("cause", e.code.unwrap_or("queue"))],
                );
            }
            state.metrics.inc(
                "corral_requests_total",
                &[
                    ("endpoint", endpoint),
                    ("route", "none"),
                    ("model", ""),
                    ("outcome", &code),
                ],
            );
            state.metrics.observe(
                "corral_request_duration_seconds",
                &[("endpoint", endpoint), ("route", "none")],
                t0.elapsed().as_secs_f64(),
            );
            tracing::info!(request_id = rid, status = %e.status, error = %e.message, "request refused");
            with_id(e.into_response(), rid)
        }
    }
}

/// The route decision for a request, with the requested catalog model applied.
fn decide(
    live: &Live,
    ident: &Identity,
    gen: &Gen,
) -> Result<(RouteDecision, RequestContext), ApiError> {
    let cfg = &live.config;
    let auto = gen.model == "auto" || gen.model.is_empty();
    if !auto && cfg.slm.models.get(&gen.model).is_none() {
        return Err(ApiError::not_found(format!(
            "The model `{}` does not exist or you do not have access to it. Use a model from GET /v1/models, or `auto` to let routing choose.",
            gen.model
        )));
    }
    if !auto {
        // A model the caller named but may not use is refused outright (not quietly replaced).
        cfg.routing
            .allowed(ident.agent.as_deref(), &gen.model)
            .map_err(|why| ApiError::forbidden(why, "model_not_allowed"))?;
    }
    let ctx = RequestContext {
        prompt: gen.prompt_text(),
        task_hint: match gen.metadata.get("task") {
            None => None,
            Some(t) => Some(t.parse::<TaskType>().map_err(|e| {
                ApiError::invalid(format!("metadata.task: {e}"), Some("metadata.task"))
            })?),
        },
        agent: ident.agent.clone(),
        team: ident.team.clone(),
        key_alias: ident.key_alias.clone(),
        requested_model: (!auto).then(|| gen.model.clone()),
        metadata: gen.metadata.clone(),
        required_capabilities: vec![],
        minute_of_day: None,
    };
    let mut d = cfg.routing.decide(&ctx);
    if let Selection::Slm { model, profile } = &mut d.selection {
        if !auto && *model != gen.model {
            *model = gen.model.clone();
            *profile = cfg.routing.profile_for(model);
        }
    }
    Ok((d, ctx))
}

/// What was answered, for the response and its headers.
#[derive(Debug, Default)]
struct Answer {
    text: String,
    finish_reason: String,
    prompt_tokens: u32,
    completion_tokens: u32,
    tokens: Vec<TokenInfo>,
    route: &'static str,
    model: String,
    provider: Option<String>,
    profile: Option<String>,
    confidence: Option<f64>,
    threshold: Option<f32>,
    escalated: bool,
    escalation_reason: Option<String>,
    /// Time spent in the model or provider (the rest is corral's overhead).
    model_time: Duration,
}

fn corral_json(a: &Answer, d: &RouteDecision, method: &str, rid: &str) -> Value {
    json!({
        "request_id": rid,
        "route": a.route,
        "model": a.model,
        "provider": a.provider,
        "profile": a.profile,
        "confidence": a.confidence,
        "confidence_method": method,
        "threshold": a.threshold,
        "escalated": a.escalated,
        "escalation_reason": a.escalation_reason,
        "policies": d.policies_applied,
        "task": d.task.task,
        "complexity": d.task.complexity,
    })
}

fn headers_for(a: &Answer, d: &RouteDecision) -> Vec<(&'static str, String)> {
    let mut h = vec![
        ("x-corral-route", a.route.to_string()),
        ("x-corral-model", a.model.clone()),
        ("x-corral-escalated", a.escalated.to_string()),
        ("x-corral-policies", d.policies_applied.join(",")),
    ];
    if let Some(c) = a.confidence {
        h.push(("x-corral-confidence", format!("{c:.4}")));
    }
    h
}

fn set_headers(r: &mut Response, h: &[(&'static str, String)]) {
    for (k, v) in h {
        if let Ok(v) = HeaderValue::from_str(v) {
            r.headers_mut().insert(*k, v);
        }
    }
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
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

fn usage_json(a: &Answer) -> Value {
    json!({
        "prompt_tokens": a.prompt_tokens,
        "completion_tokens": a.completion_tokens,
        "total_tokens": a.prompt_tokens + a.completion_tokens,
    })
}

/// The whole answer as one JSON response.
fn json_response(gen: &Gen, a: &Answer, d: &RouteDecision, method: &str) -> Response {
    let created = unix_now();
    let lp = |v: Value| {
        if gen.logprobs.is_some() && a.route == "slm" {
            v
        } else {
            Value::Null
        }
    };
    let body = match gen.kind {
        Kind::Chat => json!({
            "id": format!("chatcmpl-{}", gen.rid),
            "object": "chat.completion",
            "created": created,
            "model": a.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": a.text, "refusal": null},
                "logprobs": lp(chat_logprobs(&a.tokens)),
                "finish_reason": a.finish_reason,
            }],
            "usage": usage_json(a),
            "system_fingerprint": null,
            "corral": corral_json(a, d, method, &gen.rid),
        }),
        Kind::Completion => json!({
            "id": format!("cmpl-{}", gen.rid),
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
            "corral": corral_json(a, d, method, &gen.rid),
        }),
    };
    let mut r = Json(body).into_response();
    set_headers(&mut r, &headers_for(a, d));
    r
}

/// One streamed chunk: `text` (and the token, for logprobs), or the end (`finish`).
fn chunk(
    gen: &Gen,
    model: &str,
    created: u64,
    text: Option<&str>,
    token: Option<&TokenInfo>,
    finish: Option<&str>,
    first: bool,
) -> Value {
    let lp = |t: Option<&TokenInfo>| match (gen.logprobs, t) {
        (Some(_), Some(t)) => match gen.kind {
            Kind::Chat => json!({"content": [chat_logprob_entry(t)], "refusal": null}),
            Kind::Completion => completion_logprobs(std::slice::from_ref(t)),
        },
        _ => Value::Null,
    };
    let mut v = match gen.kind {
        Kind::Chat => {
            let mut delta = serde_json::Map::new();
            if first {
                delta.insert("role".into(), json!("assistant"));
            }
            if let Some(t) = text {
                delta.insert("content".into(), json!(t));
            }
            json!({
                "id": format!("chatcmpl-{}", gen.rid),
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": null,
                "choices": [{"index": 0, "delta": delta, "logprobs": lp(token), "finish_reason": finish}],
            })
        }
        Kind::Completion => json!({
            "id": format!("cmpl-{}", gen.rid),
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": lp(token), "finish_reason": finish}],
        }),
    };
    if gen.include_usage {
        v["usage"] = Value::Null;
    }
    v
}

fn sse_data(v: &Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(v.to_string()))
}

type Tx = mpsc::Sender<Result<SseEvent, Infallible>>;

fn sse_response(
    rx: mpsc::Receiver<Result<SseEvent, Infallible>>,
    h: &[(&'static str, String)],
) -> Response {
    let mut r = Sse::new(ReceiverStream::new(rx)).into_response();
    set_headers(&mut r, h);
    r
}

/// A finished answer sent as a stream (buffered SLM answers and LLM answers).
async fn stream_finished(gen: &Gen, a: &Answer, d: &RouteDecision, method: &str) -> Response {
    let (tx, rx) = mpsc::channel(a.tokens.len() + 8);
    let created = unix_now();
    let _ = tx
        .send(sse_data(&chunk(
            gen,
            &a.model,
            created,
            (gen.kind == Kind::Chat).then_some(""),
            None,
            None,
            true,
        )))
        .await;
    if a.route == "slm" && !a.tokens.is_empty() {
        let mut sent = 0;
        for t in &a.tokens {
            if t.text.is_empty() && gen.logprobs.is_none() {
                continue;
            }
            sent += t.text.len();
            let _ = tx
                .send(sse_data(&chunk(
                    gen,
                    &a.model,
                    created,
                    Some(&t.text),
                    Some(t),
                    None,
                    false,
                )))
                .await;
        }
        if let Some(rest) = a.text.get(sent..).filter(|r| !r.is_empty()) {
            let _ = tx
                .send(sse_data(&chunk(
                    gen,
                    &a.model,
                    created,
                    Some(rest),
                    None,
                    None,
                    false,
                )))
                .await;
        }
    } else if !a.text.is_empty() {
        let _ = tx
            .send(sse_data(&chunk(
                gen,
                &a.model,
                created,
                Some(&a.text),
                None,
                None,
                false,
            )))
            .await;
    }
    let mut last = chunk(
        gen,
        &a.model,
        created,
        None,
        None,
        Some(&a.finish_reason),
        false,
    );
    last["corral"] = corral_json(a, d, method, &gen.rid);
    let _ = tx.send(sse_data(&last)).await;
    if gen.include_usage {
        let mut u = chunk(gen, &a.model, created, None, None, None, false);
        u["choices"] = json!([]);
        u["usage"] = usage_json(a);
        let _ = tx.send(sse_data(&u)).await;
    }
    let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    drop(tx);
    sse_response(rx, &headers_for(a, d))
}

/// The remote chain, off the async threads (providers are blocking HTTP clients).
async fn call_llm(
    live: &Arc<Live>,
    providers: &[String],
    gen: &Gen,
    d: &RouteDecision,
) -> Result<ChatResponse, ApiError> {
    let chain = Chain::new(
        providers
            .iter()
            .filter_map(|n| live.providers.get(n).cloned())
            .collect(),
    );
    let mask = d.remote_prompt.is_some();
    let routing = live.clone();
    let req = crate::providers::ChatRequest {
        messages: gen
            .messages
            .iter()
            .map(|(r, c)| {
                let c = if mask {
                    routing.config.routing.mask_pii(c)
                } else {
                    c.clone()
                };
                Message::new(r.clone(), c)
            })
            .collect(),
        max_tokens: Some(gen.max_tokens),
        temperature: Some(gen.temperature),
        top_p: gen.top_p,
        stop: gen.stop.clone(),
        logprobs: true,
        user: gen.user.clone(),
    };
    let rid = gen.rid.clone();
    tokio::task::spawn_blocking(move || chain.complete(&req))
        .await
        .map_err(|e| ApiError::internal(format!("provider task failed: {e}")))?
        .map_err(|e| {
            tracing::warn!(request_id = %rid, error = %e, "every provider failed");
            ApiError::upstream(format!("the remote providers failed: {e}"))
        })
}

fn llm_answer(
    r: ChatResponse,
    method: crate::confidence::Method,
    escalation: Option<String>,
) -> Answer {
    let score = r
        .token_logprobs
        .as_deref()
        .and_then(|lps| confidence::score_logprobs(lps, method));
    Answer {
        text: r.text,
        finish_reason: r.finish_reason,
        prompt_tokens: r.usage.prompt_tokens,
        completion_tokens: r.usage.completion_tokens,
        tokens: vec![],
        route: "llm",
        model: r.model,
        provider: Some(r.provider),
        profile: None,
        confidence: score,
        threshold: None,
        escalated: escalation.is_some(),
        escalation_reason: escalation,
        model_time: Duration::from_secs_f64(r.latency_ms / 1e3),
    }
}

/// One audit entry for a request that reached routing: answered, escalated, refused or failed.
#[allow(clippy::too_many_arguments)]
fn audit(
    state: &State,
    gen: &Gen,
    ident: &Identity,
    d: &RouteDecision,
    a: Option<&Answer>,
    error: Option<&ApiError>,
    slm: Option<Value>,
    t0: Instant,
) {
    use crate::audit::{AuditRecord, Caller, Interaction, Route, TokenUsage};
    let Some(log) = &state.audit else { return };
    let interaction = match (a, &d.selection) {
        (_, Selection::Deny { .. }) => Interaction::RouteDenied,
        (Some(a), _) if a.escalated => Interaction::Escalation,
        _ if gen.kind == Kind::Completion => Interaction::Completion,
        _ => Interaction::Chat,
    };
    let route = match (a, &d.selection) {
        (Some(a), _) if a.route == "llm" => Route::Llm,
        (Some(_), _) => Route::Slm,
        (None, Selection::Slm { .. }) => Route::Slm,
        (None, Selection::Llm { .. }) => Route::Llm,
        (None, Selection::Deny { .. }) => Route::Deny,
    };
    let mut response = match a {
        Some(a) => json!({
            "text": a.text, "finish_reason": a.finish_reason, "model": a.model,
            "provider": a.provider, "profile": a.profile, "confidence": a.confidence,
            "threshold": a.threshold,
        }),
        None => json!({}),
    };
    if let Some(s) = slm {
        response["slm"] = s;
    }
    if let Some(e) = error {
        response["error"] = json!(e.message);
    }
    let rec = AuditRecord {
        request_id: gen.rid.clone(),
        caller: Caller {
            agent: ident.agent.clone(),
            team: ident.team.clone(),
            key_alias: ident.key_alias.clone(),
        },
        interaction,
        model: a.map(|a| a.model.clone()).or_else(|| match &d.selection {
            Selection::Slm { model, .. } => Some(model.clone()),
            _ => None,
        }),
        provider: a.and_then(|a| a.provider.clone()),
        route: Some(route),
        policies: d.policies_applied.clone(),
        confidence: a.and_then(|a| a.confidence),
        escalation_reason: a.and_then(|a| a.escalation_reason.clone()),
        latency_ms: t0.elapsed().as_secs_f64() * 1e3,
        usage: a.map(|a| TokenUsage {
            prompt_tokens: a.prompt_tokens,
            completion_tokens: a.completion_tokens,
        }),
        error: error.map(|e| format!("{} {}", e.status.as_u16(), e.code.unwrap_or(e.kind))),
        request: json!({
            "endpoint": gen.kind.endpoint(),
            "model": gen.model, "messages": gen.messages, "max_tokens": gen.max_tokens,
            "temperature": gen.temperature, "top_p": gen.top_p, "seed": gen.seed,
            "stop": gen.stop, "metadata": gen.metadata, "user": gen.user, "stream": gen.stream,
        }),
        response,
    };
    if !log.record(rec) {
        tracing::warn!(request_id = %gen.rid, "audit queue full: entry dropped (audit.on_queue_full = drop)");
    }
}

/// How an SLM attempt ended.
enum Slm {
    Done {
        tokens: Vec<TokenInfo>,
        done: corral_protocol::Done,
    },
    Failed {
        kind: FailKind,
        error: String,
        retryable: bool,
    },
}

/// Queues the request on `pool`. A first attempt finding the queue full is the caller's 429; a
/// retry (the request already held a place) waits for room up to the queue timeout, since the
/// worker that failed it is only just coming back for work.
async fn submit(
    pool: &Pool,
    gen: &Gen,
    retry: bool,
) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut job = Job {
        req: gen.runner_request(),
        events: tx,
        enqueued: Instant::now(),
    };
    loop {
        match pool.submit(job) {
            Ok(()) => return Ok(rx),
            Err(j) if retry && j.enqueued.elapsed() < pool.queue_timeout() => {
                job = *j;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(_) => {
                return Err(ApiError::rate_limited(
                    format!(
                        "the local model's queue is full ({}); retry later",
                        pool.name
                    ),
                    pool.queue_timeout().as_secs().clamp(1, 5),
                ))
            }
        }
    }
}

/// The answer to a job that failed for a reason the caller should hear as such (429 for a
/// queue wait that ran out, 400 for a request the model refused) rather than escalate.
fn pool_refusal(kind: FailKind, error: &str) -> Option<ApiError> {
    match kind {
        FailKind::QueueTimeout => Some(ApiError::rate_limited(
            "timed out waiting for a local runner",
            2,
        )),
        FailKind::Refused => Some(ApiError::invalid(
            format!("the local model refused the request: {error}"),
            None,
        )),
        FailKind::Runner | FailKind::ShuttingDown => None,
    }
}

/// Reads a job's events to the end.
async fn collect(rx: &mut mpsc::UnboundedReceiver<Event>, mut tokens: Vec<TokenInfo>) -> Slm {
    loop {
        match rx.recv().await {
            Some(Event::Token(t)) => tokens.push(t),
            Some(Event::Done(done, _)) => {
                return Slm::Done {
                    tokens,
                    done: *done,
                }
            }
            Some(Event::Failed {
                kind,
                error,
                retryable,
            }) => {
                return Slm::Failed {
                    kind,
                    error,
                    retryable,
                }
            }
            None => {
                return Slm::Failed {
                    kind: FailKind::Runner,
                    error: "the pool worker went away".into(),
                    retryable: true,
                }
            }
        }
    }
}

async fn generate(
    state: Arc<State>,
    live: Arc<Live>,
    ident: Identity,
    gen: Gen,
    t0: Instant,
    slot: super::auth::Slot,
) -> Response {
    let endpoint = gen.kind.endpoint();
    let r = match decide(&live, &ident, &gen) {
        Err(e) => Err(e),
        Ok((d, _)) => {
            let r = generate_inner(&state, &live, &ident, &gen, t0, slot, &d).await;
            if let Err(e) = &r {
                // It reached routing: refusals and failures are audited like answers.
                audit(&state, &gen, &ident, &d, None, Some(e), None, t0);
            }
            r
        }
    };
    match r {
        Ok(resp) => resp,
        Err(e) => {
            let mut resp = e.clone().into_response();
            if e.status == StatusCode::TOO_MANY_REQUESTS {
                state
                    .metrics
                    .inc("corral_rate_limited_total", &[("cause", "queue")]);
            }
            state.metrics.inc(
                "corral_requests_total",
                &[
                    ("endpoint", endpoint),
                    ("route", "none"),
                    ("model", ""),
                    ("outcome", &e.status.as_u16().to_string()),
                ],
            );
            if e.code == Some("policy_denied") {
                if let Ok(v) = HeaderValue::from_str("deny") {
                    resp.headers_mut().insert("x-corral-route", v);
                }
            }
            tracing::info!(request_id = %gen.rid, status = %e.status, error = %e.message, "request failed");
            resp
        }
    }
}

async fn generate_inner(
    state: &Arc<State>,
    live: &Arc<Live>,
    ident: &Identity,
    gen: &Gen,
    t0: Instant,
    slot: super::auth::Slot,
    d: &RouteDecision,
) -> Result<Response, ApiError> {
    let cfg = &live.config;
    let method = cfg.routing.method;
    let d = d.clone();
    let endpoint = gen.kind.endpoint();
    let record = |a: &Answer, outcome: &str, slm: Option<Value>| {
        audit(state, gen, ident, &d, Some(a), None, slm, t0);
        let route = a.route;
        state.metrics.inc(
            "corral_requests_total",
            &[
                ("endpoint", endpoint),
                ("route", route),
                ("model", &a.model),
                ("outcome", outcome),
            ],
        );
        let total = t0.elapsed();
        state.metrics.observe(
            "corral_request_duration_seconds",
            &[("endpoint", endpoint), ("route", route)],
            total.as_secs_f64(),
        );
        state.metrics.observe(
            "corral_gateway_overhead_seconds",
            &[("route", route)],
            total.saturating_sub(a.model_time).as_secs_f64(),
        );
        if let Some(reason) = &a.escalation_reason {
            let kind = if reason.starts_with("audit") {
                "audit"
            } else if reason.starts_with("confidence") {
                "low_confidence"
            } else {
                "slm_failure"
            };
            state
                .metrics
                .inc("corral_escalations_total", &[("reason", kind)]);
        }
        tracing::info!(
            request_id = %gen.rid, route, model = %a.model, confidence = ?a.confidence,
            escalated = a.escalated, ms = total.as_millis() as u64, "answered"
        );
    };
    match d.selection.clone() {
        Selection::Deny { reason } => {
            let mut e =
                ApiError::forbidden(format!("refused by policy: {reason}"), "policy_denied");
            e.param = None;
            Err(e)
        }
        Selection::Llm { providers } => {
            let r = call_llm(live, &providers, gen, &d).await?;
            let a = llm_answer(r, method, None);
            record(&a, "ok", None);
            drop(slot);
            Ok(if gen.stream {
                stream_finished(gen, &a, &d, method.name()).await
            } else {
                json_response(gen, &a, &d, method.name())
            })
        }
        Selection::Slm { model, profile } => {
            if state.draining() {
                return Err(ApiError::unavailable("the server is shutting down", 1));
            }
            let pool = state.pool(live, &model, &profile, false).map_err(|e| {
                tracing::error!(request_id = %gen.rid, error = %e, "cannot start a pool");
                ApiError::internal(format!("the local model {model} cannot be started: {e}"))
            })?;
            let need = d.confidence_required.unwrap_or(0.0);
            let rt = &cfg.routing;
            let escalate_low = d.fallback_available && rt.on_low_confidence && need > 0.0;
            let buffer = match d.streaming {
                Some(crate::routing::Streaming::Buffer) => true,
                Some(crate::routing::Streaming::Stream) => false,
                None => escalate_low || (d.fallback_available && rt.audit_rate > 0.0),
            };
            let model_start = Instant::now();
            let mut failure: Option<String> = None;
            let mut result = None;
            for attempt in 0..2 {
                let mut rx = submit(&pool, gen, attempt > 0).await?;
                if gen.stream && !buffer {
                    // Wait for the first event before committing to a 200 stream.
                    match rx.recv().await {
                        Some(Event::Token(first)) => {
                            return Ok(stream_live(
                                state.clone(),
                                ident.clone(),
                                gen.clone(),
                                d.clone(),
                                model.clone(),
                                profile.clone(),
                                first,
                                rx,
                                t0,
                                method,
                                need,
                                slot,
                            ));
                        }
                        Some(Event::Done(done, _)) => {
                            result = Some((vec![], *done));
                            break;
                        }
                        Some(Event::Failed {
                            kind,
                            error,
                            retryable,
                        }) => {
                            if let Some(e) = pool_refusal(kind, &error) {
                                return Err(e);
                            }
                            failure = Some(error);
                            if !retryable || attempt == 1 {
                                break;
                            }
                            continue;
                        }
                        None => {
                            failure = Some("the pool worker went away".into());
                            continue;
                        }
                    }
                }
                match collect(&mut rx, vec![]).await {
                    Slm::Done { tokens, done } => {
                        result = Some((tokens, done));
                        break;
                    }
                    Slm::Failed {
                        kind,
                        error,
                        retryable,
                    } => {
                        if let Some(e) = pool_refusal(kind, &error) {
                            return Err(e);
                        }
                        tracing::warn!(request_id = %gen.rid, attempt, error = %error, "local model failed");
                        failure = Some(error);
                        if !retryable {
                            break;
                        }
                    }
                }
            }
            let model_time = model_start.elapsed();
            let Some((tokens, done)) = result else {
                let error = failure.unwrap_or_default();
                if d.fallback_available && rt.on_slm_failure {
                    let why = format!("the SLM failed: {error}");
                    let r = call_llm(live, &rt.fallback, gen, &d).await?;
                    let a = llm_answer(r, method, Some(why));
                    record(&a, "ok", Some(json!({"error": error})));
                    return Ok(if gen.stream {
                        stream_finished(gen, &a, &d, method.name()).await
                    } else {
                        json_response(gen, &a, &d, method.name())
                    });
                }
                return Err(ApiError::unavailable(
                    format!("the local model failed: {error}"),
                    1,
                ));
            };
            let score = confidence::score_tokens(&tokens, method);
            let low = score.is_none_or(|s| s < f64::from(need));
            let audit = !low && d.fallback_available && rt.audit_draw();
            let escalate = (escalate_low && low) || audit;
            if let Some(s) = score {
                state.metrics.observe(
                    "corral_confidence",
                    &[("model", &model), ("task", d.task.task.as_str())],
                    s,
                );
                super::lock(&state.monitor).record(&gen.rid, &model, &d.task.task, s, escalate);
            }
            if escalate {
                let why = if audit {
                    "audit sample (routing.confidence_thresholds.audit_rate)".to_string()
                } else {
                    format!(
                        "confidence {} < {need} ({})",
                        score.map_or("n/a".into(), |s| format!("{s:.3}")),
                        method.name()
                    )
                };
                let r = call_llm(live, &rt.fallback, gen, &d).await?;
                let mut a = llm_answer(r, method, Some(why));
                a.model_time += model_time;
                let slm = json!({"text": done.text, "confidence": score, "model": model,
                                 "profile": profile, "completion_tokens": done.completion_tokens});
                record(&a, "ok", Some(slm));
                return Ok(if gen.stream {
                    stream_finished(gen, &a, &d, method.name()).await
                } else {
                    json_response(gen, &a, &d, method.name())
                });
            }
            let a = Answer {
                text: done.text.clone(),
                finish_reason: finish_reason(done.finish_reason).into(),
                prompt_tokens: done.prompt_tokens,
                completion_tokens: done.completion_tokens,
                tokens,
                route: "slm",
                model: model.clone(),
                provider: None,
                profile: Some(profile.clone()),
                confidence: score,
                threshold: Some(need),
                escalated: false,
                escalation_reason: None,
                model_time,
            };
            record(&a, "ok", None);
            drop(slot);
            Ok(if gen.stream {
                stream_finished(gen, &a, &d, method.name()).await
            } else {
                json_response(gen, &a, &d, method.name())
            })
        }
    }
}

/// Streams an SLM answer as its tokens arrive (no escalation possible for it).
#[allow(clippy::too_many_arguments)]
fn stream_live(
    state: Arc<State>,
    ident: Identity,
    gen: Gen,
    d: RouteDecision,
    model: String,
    profile: String,
    first: TokenInfo,
    mut rx: mpsc::UnboundedReceiver<Event>,
    t0: Instant,
    method: crate::confidence::Method,
    need: f32,
    slot: super::auth::Slot,
) -> Response {
    let (tx, out) = mpsc::channel(64);
    let headers = vec![
        ("x-corral-route", "slm".to_string()),
        ("x-corral-model", model.clone()),
        ("x-corral-escalated", "false".to_string()),
        ("x-corral-policies", d.policies_applied.join(",")),
    ];
    let endpoint = gen.kind.endpoint();
    tokio::spawn(async move {
        let _slot = slot;
        let created = unix_now();
        let tx: Tx = tx;
        let started = Instant::now();
        let _ = tx
            .send(sse_data(&chunk(
                &gen,
                &model,
                created,
                (gen.kind == Kind::Chat).then_some(""),
                None,
                None,
                true,
            )))
            .await;
        let mut tokens = vec![];
        let mut streamed = 0usize;
        let mut gone = false;
        let mut next = Some(Event::Token(first));
        loop {
            let ev = match next.take() {
                Some(e) => Some(e),
                None => rx.recv().await,
            };
            match ev {
                Some(Event::Token(t)) => {
                    if !gone && (!t.text.is_empty() || gen.logprobs.is_some()) {
                        streamed += t.text.len();
                        if tx
                            .send(sse_data(&chunk(
                                &gen,
                                &model,
                                created,
                                Some(&t.text),
                                Some(&t),
                                None,
                                false,
                            )))
                            .await
                            .is_err()
                        {
                            // Closing the job's channel cancels the generation (the pool
                            // worker sees it and sends the runner `cancel`).
                            tracing::info!(request_id = %gen.rid, "client went away mid-stream");
                            gone = true;
                            rx.close();
                        }
                    }
                    tokens.push(t);
                }
                Some(Event::Done(done, _)) => {
                    if let Some(rest) = done.text.get(streamed..).filter(|r| !r.is_empty()) {
                        let _ = tx
                            .send(sse_data(&chunk(
                                &gen,
                                &model,
                                created,
                                Some(rest),
                                None,
                                None,
                                false,
                            )))
                            .await;
                    }
                    let score = confidence::score_tokens(&tokens, method);
                    let a = Answer {
                        text: done.text.clone(),
                        finish_reason: finish_reason(done.finish_reason).into(),
                        prompt_tokens: done.prompt_tokens,
                        completion_tokens: done.completion_tokens,
                        tokens: vec![],
                        route: "slm",
                        model: model.clone(),
                        provider: None,
                        profile: Some(profile.clone()),
                        confidence: score,
                        threshold: Some(need),
                        escalated: false,
                        escalation_reason: None,
                        model_time: started.elapsed(),
                    };
                    if let Some(s) = score {
                        state.metrics.observe(
                            "corral_confidence",
                            &[("model", &model), ("task", d.task.task.as_str())],
                            s,
                        );
                        super::lock(&state.monitor).record(
                            &gen.rid,
                            &model,
                            &d.task.task,
                            s,
                            false,
                        );
                    }
                    let mut last = chunk(
                        &gen,
                        &model,
                        created,
                        None,
                        None,
                        Some(&a.finish_reason),
                        false,
                    );
                    let mut meta = corral_json(&a, &d, method.name(), &gen.rid);
                    meta["below_threshold"] =
                        json!(score.is_none_or(|s| s < f64::from(need)) && need > 0.0);
                    last["corral"] = meta;
                    let _ = tx.send(sse_data(&last)).await;
                    audit(&state, &gen, &ident, &d, Some(&a), None, None, t0);
                    if gen.include_usage {
                        let mut u = chunk(&gen, &model, created, None, None, None, false);
                        u["choices"] = json!([]);
                        u["usage"] = usage_json(&a);
                        let _ = tx.send(sse_data(&u)).await;
                    }
                    let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
                    state.metrics.inc(
                        "corral_requests_total",
                        &[
                            ("endpoint", endpoint),
                            ("route", "slm"),
                            ("model", &model),
                            ("outcome", "ok"),
                        ],
                    );
                    let total = t0.elapsed();
                    state.metrics.observe(
                        "corral_request_duration_seconds",
                        &[("endpoint", endpoint), ("route", "slm")],
                        total.as_secs_f64(),
                    );
                    state.metrics.observe(
                        "corral_gateway_overhead_seconds",
                        &[("route", "slm")],
                        total.saturating_sub(started.elapsed()).as_secs_f64(),
                    );
                    return;
                }
                failed => {
                    let (e, outcome) = if gone && failed.is_none() {
                        // Closing the channel cancelled the generation: nobody to tell.
                        let e = ApiError::internal(
                            "the client went away mid-stream; the generation was cancelled",
                        );
                        (e, "client_gone")
                    } else {
                        let error = match failed {
                            Some(Event::Failed { error, .. }) => error,
                            _ => "the pool worker went away".to_string(),
                        };
                        // Bytes already reached the client: nothing can be retried. End the
                        // stream with an error event rather than a silent truncation.
                        tracing::warn!(request_id = %gen.rid, error = %error, "local model failed mid-stream");
                        let e = ApiError::internal(format!(
                            "the local model failed after the answer started streaming: {error}"
                        ));
                        let _ = tx.send(sse_data(&e.body())).await;
                        (e, "stream_error")
                    };
                    audit(&state, &gen, &ident, &d, None, Some(&e), None, t0);
                    state.metrics.inc(
                        "corral_requests_total",
                        &[
                            ("endpoint", endpoint),
                            ("route", "slm"),
                            ("model", &model),
                            ("outcome", outcome),
                        ],
                    );
                    return;
                }
            }
        }
    });
    sse_response(out, &headers)
}

async fn list_models(AxState(state): St, headers: HeaderMap) -> Response {
    let live = state.live();
    let rid = request_id();
    let (ident, _slot) = match live.keys.authenticate(&headers) {
        Ok(x) => x,
        Err(e) => return with_id(e.into_response(), &rid),
    };
    let mut data =
        vec![json!({"id": "auto", "object": "model", "created": 0, "owned_by": "corral"})];
    for m in live.config.slm.models.iter() {
        if live
            .config
            .routing
            .allowed(ident.agent.as_deref(), &m.id)
            .is_ok()
        {
            data.push(json!({"id": m.id, "object": "model", "created": 0, "owned_by": "corral"}));
        }
    }
    with_id(
        Json(json!({"object": "list", "data": data})).into_response(),
        &rid,
    )
}

/// `POST /v1/route`: the decision for a chat or completion body, with the full trace, without
/// running anything.
async fn route(
    AxState(state): St,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let live = state.live();
    let rid = request_id();
    let r = (|| {
        let (ident, _slot) = live.keys.authenticate(&headers)?;
        let body = body_of(body, live.config.server.max_request_body_bytes)?;
        let v: Value = openai::parse(&body)?;
        let model = v
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("auto")
            .to_string();
        let metadata: BTreeMap<String, String> = match v.get("metadata") {
            Some(m) => serde_json::from_value(m.clone())
                .map_err(|e| ApiError::invalid(format!("metadata: {e}"), Some("metadata")))?,
            None => BTreeMap::new(),
        };
        let messages = if v.get("messages").is_some() {
            let req: ChatRequest =
                serde_json::from_value(json!({"model": model, "messages": v["messages"]}))
                    .map_err(|e| ApiError::invalid(format!("messages: {e}"), Some("messages")))?;
            req.texts()?
        } else if let Some(p) = v.get("prompt").and_then(Value::as_str) {
            vec![("user".to_string(), p.to_string())]
        } else {
            return Err(ApiError::invalid("give messages or prompt", None));
        };
        let gen = Gen {
            kind: Kind::Chat,
            rid: rid.clone(),
            model,
            input: Input::Messages(vec![]),
            messages,
            max_tokens: 0,
            temperature: 0.0,
            top_p: None,
            seed: None,
            stop: vec![],
            logprobs: None,
            stream: false,
            include_usage: false,
            user: None,
            metadata,
        };
        let (_, ctx) = decide(&live, &ident, &gen)?;
        let d = live.config.routing.explain(&ctx);
        Ok(Json(json!({"request_id": rid, "decision": d})).into_response())
    })();
    with_id(r.unwrap_or_else(IntoResponse::into_response), &rid)
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready when every warm pool has all its runners loaded, and not draining.
async fn readyz(AxState(state): St) -> Response {
    if state.draining() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": "shutting down"})),
        )
            .into_response();
    }
    let live = state.live();
    let pools = state.current_pools();
    let mut waiting = vec![];
    for m in &live.config.server.pool.warm {
        let name = format!("{m}/{}", live.config.routing.profile_for(m));
        match pools.iter().find(|p| p.name == name) {
            Some(p) if p.loaded() >= p.runners() => {}
            Some(p) => {
                waiting.push(json!({"pool": name, "loaded": p.loaded(), "runners": p.runners()}))
            }
            None => waiting.push(json!({"pool": name, "loaded": 0})),
        }
    }
    if waiting.is_empty() {
        Json(json!({"ready": true})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "waiting": waiting})),
        )
            .into_response()
    }
}

async fn metrics(AxState(state): St) -> Response {
    for p in state.current_pools() {
        state.metrics.set(
            "corral_queue_depth",
            &[("pool", &p.name)],
            p.queue_depth() as f64,
        );
    }
    let mut r = state.metrics.render().into_response();
    r.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

async fn admin_reload(AxState(state): St, headers: HeaderMap) -> Response {
    if let Err(e) = state.live().keys.admin(&headers) {
        return e.into_response();
    }
    let st = state.clone();
    match tokio::task::spawn_blocking(move || st.reload()).await {
        Ok(Ok(r)) => Json(json!({
            "reloaded": true,
            "generation": r.generation,
            "restart_needed": r.restart_needed,
        }))
        .into_response(),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "reload failed: keeping the old configuration");
            ApiError::invalid(
                format!("reload failed, the old configuration keeps serving: {e}"),
                None,
            )
            .into_response()
        }
        Err(e) => ApiError::internal(format!("reload task: {e}")).into_response(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Feedback {
    request_id: String,
    actual_quality: f64,
}

/// `POST /admin/feedback {"request_id", "actual_quality"}`: the quality (0..=1; >= 0.5 counts as
/// correct) of a past SLM answer, recorded against its decision for calibration.
async fn admin_feedback(
    AxState(state): St,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let live = state.live();
    let r = (|| {
        live.keys.admin(&headers)?;
        let body = body_of(body, live.config.server.max_request_body_bytes)?;
        let f: Feedback = openai::parse(&body)?;
        super::lock(&state.monitor)
            .feedback(&f.request_id, f.actual_quality, 0.5)
            .map_err(|e| ApiError::invalid(e.to_string(), Some("request_id")))?;
        Ok::<_, ApiError>(Json(json!({"recorded": true})).into_response())
    })();
    r.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Debug, Deserialize)]
struct MonitorQuery {
    target: Option<f64>,
    min_accepted: Option<usize>,
}

/// `GET /admin/monitor[?target=0.9&min_accepted=30]`: per (model, task) counts, confidence
/// histogram and escalation rate, and the thresholds calibration would pick from the feedback.
async fn admin_monitor(
    AxState(state): St,
    headers: HeaderMap,
    Query(q): Query<MonitorQuery>,
) -> Response {
    if let Err(e) = state.live().keys.admin(&headers) {
        return e.into_response();
    }
    let m = super::lock(&state.monitor);
    let stats: Vec<Value> = m
        .stats()
        .map(|((model, task), s)| {
            json!({
                "model": model, "task": task, "answers": s.answers, "escalated": s.escalated,
                "escalation_rate": s.escalation_rate(), "confidence_histogram": s.histogram,
                "feedback": s.samples.len(),
            })
        })
        .collect();
    let target = q.target.unwrap_or(0.9);
    let cal = m.calibrate(target, q.min_accepted.unwrap_or(30));
    Json(json!({"stats": stats, "calibration": {"target_accuracy": target, "by_task": cal}}))
        .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowList {
    agent: String,
    /// The only models the agent may use; `null` removes the agent's entry.
    models: Option<Vec<String>>,
}

/// `POST /admin/allow_lists {"agent", "models"}`: replaces one agent's allow list at run time,
/// only when `slm.model_allow_lists.allow_runtime_overrides` is true (403 otherwise).
async fn admin_allow_list(
    AxState(state): St,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let live = state.live();
    let r = (|| {
        live.keys.admin(&headers)?;
        let body = body_of(body, live.config.server.max_request_body_bytes)?;
        let a: AllowList = openai::parse(&body)?;
        if !live.config.slm.allow_runtime_overrides {
            return Err(ApiError::forbidden(
                "runtime allow-list overrides are off (slm.model_allow_lists.allow_runtime_overrides = false)",
                "overrides_disabled",
            ));
        }
        state
            .override_allow_list(&a.agent, a.models)
            .map_err(|e| ApiError::invalid(e, Some("models")))?;
        Ok::<_, ApiError>(Json(json!({"updated": true})).into_response())
    })();
    r.unwrap_or_else(IntoResponse::into_response)
}

async fn not_found() -> Response {
    let mut e = ApiError::invalid("Unknown endpoint", None);
    e.status = StatusCode::NOT_FOUND;
    e.into_response()
}
