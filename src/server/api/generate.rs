//! `/v1/chat/completions` and `/v1/completions`: parse the body into an answer
//! [`Request`](crate::answer::Request), run the pipeline on its own task, and frame the outcome:
//! a JSON response, a finished answer as server-sent events, or a live stream that started with
//! the answer's first token.
//!
//! `server.request_timeout_seconds` bounds a request until its response starts (a stream, once
//! started, is bounded by the runner's own time limit). A caller that goes away before that
//! aborts the pipeline's task, which drops its job and so cancels the generation; a stream
//! whose client goes away cancels it the same way, and the outcome is still recorded.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State as AxState;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::shape::{self, Chunks};
use super::{anthropic, body_of, count, refused_as, request_id, with_id, Counted, St};
use crate::answer::{Answer, Endpoint, Failure, Outcome, Request, Update};
use crate::audit::Caller;
use crate::providers::Delta;
use crate::routing::{RouteDecision, TaskType};
use crate::server::auth::{Identity, Slot};
use crate::server::error::ApiError;
use crate::server::openai::{self, ChatRequest, CompletionRequest};
use crate::server::{Live, State};

/// Whose API a request came through: how its answer and errors are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    OpenAi,
    /// `/v1/messages`.
    Anthropic,
}

impl Dialect {
    fn error(self, e: ApiError) -> Response {
        match self {
            Dialect::OpenAi => e.into_response(),
            Dialect::Anthropic => anthropic::error_response(e),
        }
    }

    fn render(self) -> fn(ApiError) -> Response {
        match self {
            Dialect::OpenAi => IntoResponse::into_response,
            Dialect::Anthropic => anthropic::error_response,
        }
    }
}

/// A parsed generation request: what the pipeline answers, and how to frame it.
struct Gen {
    req: Request,
    include_usage: bool,
    /// Who asked (whose token budget the answer is charged to).
    caller: Identity,
    dialect: Dialect,
}

impl Gen {
    /// The `endpoint` label of metrics.
    fn label(&self) -> &'static str {
        match self.dialect {
            Dialect::Anthropic => "messages",
            Dialect::OpenAi => self.req.endpoint.label(),
        }
    }
}

pub async fn chat(
    AxState(state): St,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve_generation(
        state,
        headers,
        body,
        Endpoint::Chat,
        Dialect::OpenAi,
        parse_chat,
    )
    .await
}

pub async fn completions(
    AxState(state): St,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve_generation(
        state,
        headers,
        body,
        Endpoint::Completion,
        Dialect::OpenAi,
        parse_completion,
    )
    .await
}

/// Anthropic's Messages API, answered by the same pipeline as chat completions.
pub async fn messages(
    AxState(state): St,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve_generation(
        state,
        headers,
        body,
        Endpoint::Chat,
        Dialect::Anthropic,
        parse_messages,
    )
    .await
}

fn parse_messages(body: &[u8], rid: String) -> Result<Gen, ApiError> {
    let (chat, _) = anthropic::to_chat(body)?;
    let mut gen = parse_chat(chat.to_string().as_bytes(), rid)?;
    gen.dialect = Dialect::Anthropic;
    Ok(gen)
}

fn task_of(
    metadata: &std::collections::BTreeMap<String, String>,
) -> Result<Option<TaskType>, ApiError> {
    match metadata.get("task") {
        None => Ok(None),
        Some(t) => t
            .parse::<TaskType>()
            .map(Some)
            .map_err(|e| ApiError::invalid(format!("metadata.task: {e}"), Some("metadata.task"))),
    }
}

fn parse_chat(body: &[u8], rid: String) -> Result<Gen, ApiError> {
    let c: ChatRequest = openai::parse(body)?;
    c.check()?;
    let mut req = Request::chat(rid, c.texts()?);
    req.messages = c.messages()?;
    req.tools = c.tools.filter(|t| !t.is_null());
    req.tool_choice = c.tool_choice.filter(|t| !t.is_null());
    req.parallel_tool_calls = c
        .parallel_tool_calls
        .as_ref()
        .and_then(serde_json::Value::as_bool);
    req.response_format = c
        .response_format
        .filter(|r| r.get("type").and_then(serde_json::Value::as_str) != Some("text"));
    req.model = c.model;
    req.max_tokens = c.max_completion_tokens.or(c.max_tokens).unwrap_or(512);
    req.max_tokens_explicit = c.max_completion_tokens.or(c.max_tokens).is_some();
    req.temperature = c.temperature.unwrap_or(1.0);
    req.top_p = c.top_p;
    req.seed = c.seed.map(|s| s as u64);
    req.stop = c.stop.map(openai::Stop::into_vec).unwrap_or_default();
    req.logprobs = c.logprobs.then(|| c.top_logprobs.unwrap_or(0));
    req.stream = c.stream;
    req.user = c.user;
    req.task = task_of(&c.metadata)?;
    req.metadata = c.metadata;
    Ok(Gen {
        req,
        include_usage: c.stream_options.is_some_and(|o| o.include_usage),
        caller: Identity::default(),
        dialect: Dialect::OpenAi,
    })
}

fn parse_completion(body: &[u8], rid: String) -> Result<Gen, ApiError> {
    let c: CompletionRequest = openai::parse(body)?;
    c.check()?;
    let prompt = c.prompt()?;
    let mut req = Request::chat(rid, vec![("user".into(), prompt.clone())]);
    req.endpoint = Endpoint::Completion;
    req.input = corral_protocol::Input::Prompt(prompt);
    req.model = c.model;
    req.max_tokens = c.max_tokens.unwrap_or(16);
    req.max_tokens_explicit = c.max_tokens.is_some();
    req.temperature = c.temperature.unwrap_or(1.0);
    req.top_p = c.top_p;
    req.seed = c.seed.map(|s| s as u64);
    req.stop = c.stop.map(openai::Stop::into_vec).unwrap_or_default();
    req.logprobs = c.logprobs;
    req.stream = c.stream;
    req.user = c.user;
    req.task = task_of(&c.metadata)?;
    req.metadata = c.metadata;
    Ok(Gen {
        req,
        include_usage: c.stream_options.is_some_and(|o| o.include_usage),
        caller: Identity::default(),
        dialect: Dialect::OpenAi,
    })
}

/// What both endpoints do around their own parsing: authenticate, bound the body, answer within
/// the request timeout, answer errors in OpenAI's format.
async fn serve_generation(
    state: Arc<State>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
    dialect: Dialect,
    parse: fn(&[u8], String) -> Result<Gen, ApiError>,
) -> Response {
    let rid = request_id();
    let t0 = Instant::now();
    // Which API this endpoint speaks, for errors before the body is parsed.
    let label = match dialect {
        Dialect::Anthropic => "messages",
        Dialect::OpenAi => endpoint.label(),
    };
    let live = state.live();
    let parsed = live.keys.authenticate(&headers).and_then(|(ident, slot)| {
        state.budgets.check(&ident)?;
        let body = body_of(body, live.config.server.max_request_body_bytes)?;
        let mut gen = parse(&body, rid.clone())?;
        gen.caller = ident.clone();
        Ok((ident, slot, gen))
    });
    let (ident, slot, gen) = match parsed {
        Ok(x) => x,
        Err(e) => return refused_as(&state, e, &rid, label, t0, dialect.render()),
    };
    let span = tracing::info_span!(
        "request",
        request_id = %rid,
        caller = ident.agent.as_deref().unwrap_or("-"),
        model = %gen.req.model,
        route = tracing::field::Empty,
    );
    let r = generate(state.clone(), live, ident, slot, gen, t0)
        .instrument(span)
        .await;
    match r {
        Ok(resp) => with_id(resp, &rid),
        Err(e) => refused_as(&state, e, &rid, label, t0, dialect.render()),
    }
}

/// Aborts the pipeline's task when dropped (a caller gone or out of time before the response
/// started): its job is dropped with it, which cancels the generation.
struct Running(JoinHandle<Outcome>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Running {
    async fn outcome(&mut self) -> Option<Outcome> {
        (&mut self.0).await.ok()
    }
}

/// Audits a request whose caller went away before its response started, when dropped still
/// holding the request (`req`: set only with the audit log on, taken once the outcome is known).
struct Abandoned {
    state: Arc<State>,
    caller: Caller,
    req: Option<Request>,
    method: crate::confidence::Method,
    t0: Instant,
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        let (Some(req), Some(log)) = (self.req.take(), self.state.audit.as_ref()) else {
            return;
        };
        tracing::info!("client went away before the response started: generation cancelled");
        let record = crate::answer::record::audit_record(
            &self.caller,
            &req,
            None,
            &Err(Failure::ClientGone),
            None,
            self.method,
            self.t0.elapsed(),
        );
        if !log.record(record) {
            tracing::warn!("audit queue full: entry dropped (audit.on_queue_full = drop)");
        }
    }
}

enum Started {
    /// A live stream began: the model streaming, and the response's `x-corral-*` headers.
    Stream {
        model: String,
        headers: Vec<(&'static str, String)>,
    },
    Finished(Option<Box<Outcome>>),
}

/// The `x-corral-*` headers of a stream that starts before its outcome is known.
fn stream_headers(
    route: &str,
    model: &str,
    escalation: Option<&crate::answer::Escalation>,
    policies: &[String],
) -> Vec<(&'static str, String)> {
    let mut h = vec![
        ("x-corral-route", route.to_string()),
        ("x-corral-model", model.to_string()),
        ("x-corral-escalated", escalation.is_some().to_string()),
        ("x-corral-policies", policies.join(",")),
    ];
    if let Some(e) = escalation {
        h.push(("x-corral-escalation-reason", e.kind().to_string()));
    }
    h
}

/// Runs the pipeline; `Err` only for the request timeout (504) before the response started.
async fn generate(
    state: Arc<State>,
    live: Arc<Live>,
    ident: Identity,
    slot: Slot,
    gen: Gen,
    t0: Instant,
) -> Result<Response, ApiError> {
    let pipeline = state.pipeline(&live);
    let caller = Caller {
        agent: ident.agent.clone(),
        team: ident.team.clone(),
        key_alias: ident.key_alias.clone(),
    };
    let audit_caller = caller.clone();
    let (tx, mut updates) = mpsc::channel(64);
    let req = gen.req.clone();
    let mut running = Running(tokio::spawn(
        async move { pipeline.answer(&caller, &req, Some(&tx)).await }
            .instrument(tracing::Span::current()),
    ));
    let limit = live.config.server.request_timeout;
    // A caller that goes away before the response starts drops this future (and with
    // `running`, the pipeline's task, which so writes no audit entry): the guard writes it.
    let mut abandoned = Abandoned {
        state: state.clone(),
        caller: audit_caller.clone(),
        req: state.audit.is_some().then(|| gen.req.clone()),
        method: live.config.routing.method,
        t0,
    };
    let started = tokio::time::timeout(limit, async {
        tokio::select! {
            // A stream that started is a stream, even when its outcome is ready too.
            biased;
            u = updates.recv() => match u {
                Some(Update::Streaming { model, policies, .. }) => Started::Stream {
                    headers: stream_headers("slm", &model, None, &policies),
                    model,
                },
                Some(Update::RemoteStreaming { model, policies, escalation, .. }) => Started::Stream {
                    headers: stream_headers("llm", &model, escalation.as_ref(), &policies),
                    model,
                },
                // Tokens come only after `Streaming`; a closed channel means the pipeline ended.
                _ => Started::Finished(running.outcome().await.map(Box::new)),
            },
            o = running.outcome() => Started::Finished(o.map(Box::new)),
        }
    })
    .await;
    // Whatever happened next, the request is no longer abandoned before its response started.
    abandoned.req = None;
    let started = started.map_err(|_| {
        // The pipeline's task is aborted (with `running`), so it writes no audit entry: the
        // request is audited here, as timed out, so none goes unrecorded.
        let f = Failure::TimedOut(limit.as_secs());
        if let Some(log) = state.audit.as_ref() {
            let record = crate::answer::record::audit_record(
                &audit_caller,
                &gen.req,
                None,
                &Err(f.clone()),
                None,
                live.config.routing.method,
                t0.elapsed(),
            );
            if !log.record(record) {
                tracing::warn!("audit queue full: entry dropped (audit.on_queue_full = drop)");
            }
        }
        api_error(&f)
    })?;
    match started {
        Started::Finished(Some(o)) => {
            drop(slot);
            Ok(respond(&state, &gen, *o, t0))
        }
        Started::Finished(None) => Err(ApiError::internal("the answer task failed")),
        Started::Stream { model, headers } => Ok(stream_live(
            state, gen, model, headers, updates, running, slot, t0,
        )),
    }
}

/// Writes the audit entry and the metrics of an outcome, and logs it.
fn record(
    state: &State,
    gen: &Gen,
    o: Outcome,
    t0: Instant,
) -> (Option<RouteDecision>, Result<Answer, Failure>) {
    let (req, caller) = (&gen.req, &gen.caller);
    let Outcome {
        decision,
        result,
        streamed,
        audit,
        slm,
    } = o;
    // The local model's confidence, whether its answer was kept, replaced, or replaced by a
    // chain that then failed.
    let scored = match &result {
        Ok(a) => a.slm.as_ref().map(|run| (run, a.escalation.is_some())),
        // A chain that failed (before or during its stream) after an escalation: still one.
        Err(f) => slm.as_ref().map(|run| {
            let escalated = matches!(
                f,
                Failure::Remote(_) | Failure::RemoteInterrupted(_) | Failure::ClientGone
            );
            (run, escalated)
        }),
    };
    let task = decision.as_ref().map(|d| &d.task.task);
    if let Some(((run, escalated), task)) = scored.zip(task) {
        if let Some(s) = run.score {
            state.metrics.observe(
                "corral_confidence",
                &[("model", &run.model), ("task", task.as_str())],
                s,
            );
            crate::server::lock(&state.monitor).record(
                &req.id,
                &run.model,
                task,
                s,
                run.features.clone(),
                escalated,
            );
        }
    }
    if let Some((log, audit)) = state.audit.as_ref().zip(audit) {
        if !log.record(audit) {
            tracing::warn!("audit queue full: entry dropped (audit.on_queue_full = drop)");
        }
    }
    let route = match (&result, streamed) {
        (Ok(a), _) => a.source.label(),
        (Err(Failure::RemoteInterrupted(_)), _) => "llm",
        (Err(Failure::ClientGone), true) if slm.is_some() => "llm",
        (Err(_), true) => match decision.as_ref().map(|d| &d.selection) {
            Some(crate::routing::Selection::Llm { .. }) => "llm",
            _ => "slm",
        },
        (Err(_), false) => "none",
    };
    tracing::Span::current().record("route", route);
    let endpoint = gen.label();
    match &result {
        Ok(a) => {
            let sent = match decision.as_ref().map(|d| &d.selection) {
                Some(crate::routing::Selection::Llm { model: Some(m), .. }) => Some(m.as_str()),
                _ => None,
            };
            tokens(state, caller, a, route, sent);
            count(
                state,
                &Counted {
                    endpoint,
                    route,
                    model: &a.model,
                    outcome: "ok",
                    model_time: Some(a.model_time),
                },
                None,
                t0,
            );
            if let Some(e) = &a.escalation {
                state
                    .metrics
                    .inc("corral_escalations_total", &[("reason", e.kind())]);
            }
            tracing::info!(
                model = %a.model, confidence = ?a.confidence,
                escalated = a.escalation.is_some(),
                ms = t0.elapsed().as_millis() as u64, "answered"
            );
        }
        Err(f) => {
            let e = api_error(f);
            let outcome = match f {
                Failure::Interrupted(_) | Failure::RemoteInterrupted(_) => {
                    "stream_error".to_string()
                }
                Failure::ClientGone => "client_gone".to_string(),
                _ => e.status.as_u16().to_string(),
            };
            let model = match decision.as_ref().map(|d| &d.selection) {
                Some(crate::routing::Selection::Slm { model, .. })
                    if streamed && route == "slm" =>
                {
                    model.as_str()
                }
                _ => "",
            };
            let cause = (e.status == StatusCode::TOO_MANY_REQUESTS).then_some("queue");
            count(
                state,
                &Counted {
                    endpoint,
                    route,
                    model,
                    outcome: &outcome,
                    model_time: None,
                },
                cause,
                t0,
            );
            tracing::info!(status = %e.status, code = f.code(), error = %f, "request failed");
        }
    }
    (decision, result)
}

/// An answer's tokens: charged to the caller's budgets, counted by model, route and kind, and
/// priced (`[providers.NAME.prices]`): what a remote answer cost, and what a local one saved
/// against the fallback chain's first provider.
fn tokens(state: &State, caller: &Identity, a: &Answer, route: &str, sent: Option<&str>) {
    let (p, c) = (u64::from(a.prompt_tokens), u64::from(a.completion_tokens));
    state.budgets.charge(caller, p + c);
    // The local answer an escalation replaced was computed too: charged and counted as local
    // (not for an audit sample: that comparison is the operator's, not the caller's).
    let replaced = a.slm.as_ref().filter(|_| {
        a.source == crate::answer::Source::Llm
            && a.escalation != Some(crate::answer::Escalation::AuditSample)
    });
    if let Some((run, d)) = replaced.and_then(|r| r.done.as_deref().map(|d| (r, d))) {
        let (lp, lc) = (u64::from(d.prompt_tokens), u64::from(d.completion_tokens));
        state.budgets.charge(caller, lp + lc);
        for (kind, n) in [("prompt", lp), ("completion", lc)] {
            state.metrics.add(
                "corral_tokens_total",
                &[("model", &run.model), ("route", "slm"), ("kind", kind)],
                n as f64,
            );
        }
    }
    for (kind, n) in [("prompt", p), ("completion", c)] {
        state.metrics.add(
            "corral_tokens_total",
            &[("model", &a.model), ("route", route), ("kind", kind)],
            n as f64,
        );
    }
    let live = state.live();
    let providers = &live.config.providers;
    match &a.provider {
        Some(name) => {
            // Priced by the model asked for (a named one, else the provider's configured one),
            // else by the one the provider reports (often a dated name).
            let cost = providers.get(name).and_then(|cfg| {
                cfg.cost(sent.unwrap_or(&cfg.model), p, c)
                    .or_else(|| cfg.cost(&a.model, p, c))
            });
            if let Some(usd) = cost {
                state.metrics.add(
                    "corral_spend_usd_total",
                    &[("provider", name), ("model", &a.model)],
                    usd,
                );
                crate::server::lock(&state.spend).remote_usd += usd;
            }
        }
        None => {
            let first = live.config.routing.fallback.first();
            let priced = first.and_then(|n| providers.get(n).map(|c| (n, c)));
            if let Some((name, cfg)) = priced {
                if let Some(usd) = cfg.cost(&cfg.model, p, c) {
                    state.metrics.add(
                        "corral_spend_avoided_usd_total",
                        &[("provider", name), ("model", &a.model)],
                        usd,
                    );
                    crate::server::lock(&state.spend).avoided_usd += usd;
                }
            }
        }
    }
}

/// The answer to a failure, in OpenAI's format.
pub(super) fn api_error(f: &Failure) -> ApiError {
    match f {
        Failure::UnknownModel(m) => ApiError::not_found(format!(
            "The model `{m}` does not exist or you do not have access to it. Use a model from GET /v1/models, or `auto` to let routing choose."
        )),
        Failure::NotAllowed(why) => ApiError::forbidden(why.clone(), "model_not_allowed"),
        Failure::Denied { .. } => ApiError::forbidden(f.to_string(), "policy_denied"),
        Failure::QueueFull { retry_after, .. } => ApiError::rate_limited(f.to_string(), *retry_after),
        Failure::QueueTimeout => ApiError::rate_limited(f.to_string(), 2),
        Failure::Refused(_) => ApiError::invalid(f.to_string(), None),
        Failure::Unsupported(_) => {
            let mut e = ApiError::invalid(f.to_string(), None);
            e.code = Some("unsupported_parameter");
            e
        }
        Failure::Local { .. } | Failure::ShuttingDown => ApiError::unavailable(f.to_string(), 1),
        Failure::Remote(_) | Failure::RemoteInterrupted(_) => ApiError::upstream(f.to_string()),
        Failure::Unavailable { .. } | Failure::Interrupted(_) | Failure::ClientGone => {
            ApiError::internal(f.to_string())
        }
        Failure::TimedOut(_) => {
            let mut e = ApiError::unavailable(f.to_string(), 1);
            e.status = StatusCode::GATEWAY_TIMEOUT;
            e
        }
    }
}

/// A finished outcome as JSON, a finished stream, or an error.
fn respond(state: &State, gen: &Gen, o: Outcome, t0: Instant) -> Response {
    let (decision, result) = record(state, gen, o, t0);
    let anthropic = gen.dialect == Dialect::Anthropic;
    match (result, decision) {
        (Ok(a), Some(d)) if gen.req.stream && anthropic => {
            anthropic::stream_finished(&gen.req, &a, &d)
        }
        (Ok(a), Some(d)) if gen.req.stream => {
            shape::stream_finished(&gen.req, gen.include_usage, &a, &d)
        }
        (Ok(a), Some(d)) if anthropic => anthropic::json_response(&gen.req, &a, &d),
        (Ok(a), Some(d)) => shape::json_response(&gen.req, &a, &d),
        (Ok(_), None) => gen
            .dialect
            .error(ApiError::internal("an answer without a decision")),
        (Err(f), _) => {
            let mut resp = gen.dialect.error(api_error(&f));
            if matches!(f, Failure::Denied { .. }) {
                resp.headers_mut()
                    .insert("x-corral-route", HeaderValue::from_static("deny"));
            }
            resp
        }
    }
}

/// The events of a live stream in the caller's API.
enum Framer<'a> {
    OpenAi(Chunks<'a>),
    Anthropic(anthropic::Events),
}

impl Framer<'_> {
    fn start(&mut self, model: &str) -> Vec<shape::SseItem> {
        match self {
            Framer::OpenAi(c) => vec![c.start()],
            Framer::Anthropic(e) => e.start(model),
        }
    }

    /// A runner's token (with its log-probabilities, for OpenAI's `logprobs`).
    fn token(&mut self, t: &corral_protocol::TokenInfo) -> Vec<shape::SseItem> {
        match self {
            Framer::OpenAi(c) => vec![c.text(&t.text, Some(t))],
            Framer::Anthropic(e) => e.text(&t.text),
        }
    }

    /// Text without a runner's token (a provider's piece, or text held back to the end).
    fn text(&mut self, text: &str, logprobs: Option<&[serde_json::Value]>) -> Vec<shape::SseItem> {
        match self {
            Framer::OpenAi(c) => vec![c.remote_text(text, logprobs)],
            Framer::Anthropic(e) => e.text(text),
        }
    }

    fn call_piece(
        &mut self,
        index: usize,
        id: Option<String>,
        name: Option<String>,
        arguments: &str,
    ) -> Vec<shape::SseItem> {
        match self {
            Framer::OpenAi(c) => vec![c.call_piece(index, id, name, arguments)],
            Framer::Anthropic(e) => e.call_piece(index, id.as_deref(), name.as_deref(), arguments),
        }
    }

    fn end(&mut self, a: &Answer, corral: serde_json::Value) -> Vec<shape::SseItem> {
        match self {
            Framer::OpenAi(c) => c.end(a, corral),
            Framer::Anthropic(e) => e.end(a, corral),
        }
    }

    fn error(&self, e: &ApiError) -> shape::SseItem {
        match self {
            Framer::OpenAi(_) => shape::sse_data(&e.body()),
            Framer::Anthropic(ev) => ev.error(e),
        }
    }
}

/// Streams an answer as it is made (an SLM's tokens, a remote provider's pieces: nothing can
/// replace it any more); the outcome closes the stream: its final chunk carries the `corral`
/// facts, a failure an error event.
#[allow(clippy::too_many_arguments)]
fn stream_live(
    state: Arc<State>,
    gen: Gen,
    model: String,
    headers: Vec<(&'static str, String)>,
    mut updates: mpsc::Receiver<Update>,
    mut running: Running,
    slot: Slot,
    t0: Instant,
) -> Response {
    let (tx, out) = mpsc::channel(64);
    let route = headers
        .first()
        .map_or("slm", |(_, r)| if r == "llm" { "llm" } else { "slm" });
    tokio::spawn(
        async move {
            let _slot = slot;
            let mut c = match gen.dialect {
                Dialect::OpenAi => Framer::OpenAi(Chunks::new(&gen.req, gen.include_usage, &model)),
                Dialect::Anthropic => Framer::Anthropic(anthropic::Events::new(&gen.req)),
            };
            let mut open = true;
            for item in c.start(&model) {
                open = open && tx.send(item).await.is_ok();
            }
            let mut streamed = 0usize;
            // Tokens (a runner's) or pieces (a provider's, about a token each) sent.
            let mut sent = 0u64;
            while open {
                // A client that leaves is noticed at once, not at the next piece (a provider
                // may send none for a long while): dropping the updates tells the pipeline.
                let update = tokio::select! {
                    u = updates.recv() => u,
                    () = tx.closed() => break,
                };
                let items = match update {
                    Some(Update::Token(t)) => {
                        sent += 1;
                        if t.text.is_empty() && gen.req.logprobs.is_none() {
                            continue;
                        }
                        streamed += t.text.len();
                        c.token(&t)
                    }
                    Some(Update::Piece(Delta::Text { text, logprobs })) => {
                        sent += 1;
                        streamed += text.len();
                        c.text(&text, logprobs.as_deref())
                    }
                    Some(Update::Piece(Delta::ToolCall {
                        index,
                        id,
                        name,
                        arguments,
                    })) => c.call_piece(index, id, name, &arguments),
                    Some(_) => continue,
                    None => break,
                };
                for item in items {
                    open = open && tx.send(item).await.is_ok();
                }
            }
            // A client gone: closing the updates cancels the generation (the pipeline's next
            // send fails and it drops its job); its outcome is still recorded.
            drop(updates);
            let Some(o) = running.outcome().await else {
                // The pipeline's task panicked: say so rather than end the stream silently.
                let e = ApiError::internal("the answer task failed mid-stream");
                let _ = tx.send(c.error(&e)).await;
                count(
                    &state,
                    &Counted {
                        endpoint: gen.label(),
                        route,
                        model: &model,
                        outcome: "stream_error",
                        model_time: None,
                    },
                    None,
                    t0,
                );
                return;
            };
            let (decision, result) = record(&state, &gen, o, t0);
            match (result, decision) {
                (Ok(a), Some(d)) => {
                    let mut items = Vec::new();
                    if let Some(rest) = a.text.get(streamed..).filter(|r| !r.is_empty()) {
                        items.extend(c.text(rest, None));
                    }
                    let mut meta = shape::corral_json(&a, &d, &gen.req.id);
                    meta["below_threshold"] = json!(a.below_threshold);
                    items.extend(c.end(&a, meta));
                    for item in items {
                        let _ = tx.send(item).await;
                    }
                }
                (Err(f), _) => {
                    // A stream that ended badly used tokens all the same: the caller's budget
                    // is charged what went out and the prompt, estimated (no usage came), so
                    // leaving just before the end is no way around a budget.
                    let prompt: usize = gen.req.messages.iter().map(|m| m.content.len()).sum();
                    state
                        .budgets
                        .charge(&gen.caller, sent + (prompt / 4) as u64);
                    if f != Failure::ClientGone {
                        // Bytes already reached the client: nothing can be retried. End the
                        // stream with an error event rather than a silent truncation.
                        let _ = tx.send(c.error(&api_error(&f))).await;
                    }
                }
                (Ok(_), None) => {}
            }
        }
        .instrument(tracing::Span::current()),
    );
    shape::sse_response(out, &headers)
}
