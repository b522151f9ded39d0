//! The answer pipeline: one request from the route decision to a typed [`Outcome`], the same for
//! `corral run` and `corral serve` (which only parse their input, call [`Pipeline::answer`] and
//! shape its outcome as terminal text, JSON or server-sent events).
//!
//! What it owns, in order:
//! 1. the model the caller named: in the catalog ([`Failure::UnknownModel`]) and on the caller's
//!    allow list ([`Failure::NotAllowed`]), checked before routing;
//! 2. the decision, asked once ([`Router::decide`] honours the named model and profile itself);
//! 3. a refusal ([`Failure::Denied`]), the remote chain, or the local model: submitted to a
//!    [`LocalModel`], retried once on a fresh runner when the failure says a fresh one may do
//!    better, scored, and escalated to the chain ([`Escalation`]) when the decision's threshold,
//!    the audit sample or a failure says so;
//! 4. buffering versus streaming: an SLM answer that may still be replaced is held until its
//!    score is known; otherwise, when the caller streams, it goes out token by token through
//!    [`Update`]s as the runner makes them (and then cannot be escalated);
//! 5. the audit record of the request ([`record`]).
//!
//! Metrics and logs are the front ends' (they read the outcome): the pipeline does no I/O of its
//! own beyond the two traits.

pub mod fields;
pub mod record;
pub mod remote;
pub mod testing;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_protocol::{Done, FinishReason, GenerateRequest, Input, Ready, Sampling, TokenInfo};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::audit::{AuditRecord, Caller};
use crate::catalog::Capability;
use crate::confidence::{self, Method};
use crate::pool::{Event, FailKind};
use crate::providers::{ChainError, ChatRequest, ChatResponse, Message};
use crate::routing::{RequestContext, RouteDecision, Router, Selection, Streaming, TaskType};

/// The API shape a request came in: the audit's interaction and the metrics' endpoint label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

impl Endpoint {
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Completion => "completions",
        }
    }
}

/// A generation request, whichever front end it came from.
#[derive(Debug, Clone)]
pub struct Request {
    pub endpoint: Endpoint,
    /// The request id (logs, audit, responses).
    pub id: String,
    /// A catalog id, or `auto` (or empty): routing chooses.
    pub model: String,
    /// A sandbox profile the caller asked for (`corral run --profile`).
    pub profile: Option<String>,
    /// The conversation (with tool calls and tool results); for a completion one user message
    /// holding the prompt (what a provider gets).
    pub messages: Vec<Message>,
    /// What the local runner gets: the messages (through the chat template) or a raw prompt.
    pub input: Input,
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// `Some(n)`: keep each token's log-probability with `n` alternatives.
    pub logprobs: Option<u32>,
    /// The caller reads the answer as it is made (when nothing may replace it).
    pub stream: bool,
    /// An opaque end-user id for the providers.
    pub user: Option<String>,
    /// The task, overriding classification.
    pub task: Option<TaskType>,
    /// Request metadata policies match on.
    pub metadata: BTreeMap<String, String>,
    /// Generate exactly `max_tokens` (benchmarks).
    pub ignore_eos: bool,
    /// Functions the model may call, in OpenAI's shape, and how (`tool_choice`,
    /// `parallel_tool_calls`): routing derives `ToolUse` from them.
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    /// A `response_format` other than text (`json_object`, `json_schema`): routing derives
    /// `StructuredOutput` from it.
    pub response_format: Option<Value>,
}

impl Request {
    /// A chat request with everything else at its default.
    pub fn chat(id: impl Into<String>, messages: Vec<(String, String)>) -> Request {
        Request {
            endpoint: Endpoint::Chat,
            id: id.into(),
            model: "auto".into(),
            profile: None,
            input: Input::Messages(
                messages
                    .iter()
                    .map(|(r, c)| corral_protocol::ChatMessage {
                        role: r.clone(),
                        content: c.clone(),
                    })
                    .collect(),
            ),
            messages: messages
                .into_iter()
                .map(|(r, c)| Message::new(r, c))
                .collect(),
            max_tokens: 256,
            temperature: 0.0,
            top_p: None,
            seed: None,
            stop: vec![],
            logprobs: None,
            stream: false,
            user: None,
            task: None,
            metadata: BTreeMap::new(),
            ignore_eos: false,
            tools: None,
            tool_choice: None,
            parallel_tool_calls: None,
            response_format: None,
        }
    }

    /// The runner's constraint for a `response_format` of `json_object` or `json_schema`.
    fn constraint(&self) -> Option<corral_protocol::OutputConstraint> {
        use corral_protocol::OutputConstraint;
        let rf = self.response_format.as_ref()?;
        match rf.get("type").and_then(Value::as_str) {
            Some("json_object") => Some(OutputConstraint::JsonObject),
            Some("json_schema") => Some(OutputConstraint::JsonSchema {
                schema: rf
                    .pointer("/json_schema/schema")
                    .cloned()
                    .unwrap_or(Value::Null),
            }),
            _ => None,
        }
    }

    /// What the request needs of a model beyond text: tools, structured output.
    pub fn capabilities(&self) -> Vec<Capability> {
        let mut c = Vec::new();
        if self
            .tools
            .as_ref()
            .and_then(Value::as_array)
            .is_some_and(|t| !t.is_empty())
            || self
                .messages
                .iter()
                .any(|m| m.tool_calls.is_some() || m.role == "tool")
        {
            c.push(Capability::ToolUse);
        }
        if self.response_format.is_some() {
            c.push(Capability::StructuredOutput);
        }
        c
    }

    /// Whether routing picks the model.
    pub fn auto(&self) -> bool {
        self.model.is_empty() || self.model == "auto"
    }

    /// The text routing classifies: the prompt, or the messages joined.
    pub fn prompt_text(&self) -> String {
        match &self.input {
            Input::Prompt(p) => p.clone(),
            Input::Messages(_) => self
                .messages
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n\n"),
        }
    }

    /// What routing decides on.
    pub fn context(&self, caller: &Caller) -> RequestContext {
        RequestContext {
            prompt: self.prompt_text(),
            task_hint: self.task.clone(),
            agent: caller.agent.clone(),
            team: caller.team.clone(),
            key_alias: caller.key_alias.clone(),
            requested_model: (!self.auto()).then(|| self.model.clone()),
            requested_profile: self.profile.clone(),
            metadata: self.metadata.clone(),
            required_capabilities: self.capabilities(),
            minute_of_day: None,
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
            ignore_eos: self.ignore_eos,
            constraint: self.constraint(),
        }
    }

    /// What the remote chain gets: every message masked on its own when the PII guardrail says
    /// so (`mask`), the system message included.
    fn remote_request(&self, router: &Router, mask: bool) -> ChatRequest {
        ChatRequest {
            messages: self
                .messages
                .iter()
                .map(|m| {
                    let mut m = m.clone();
                    if mask {
                        m.content = router.mask_pii(&m.content);
                    }
                    m
                })
                .collect(),
            max_tokens: Some(self.max_tokens),
            temperature: Some(self.temperature),
            top_p: self.top_p,
            stop: self.stop.clone(),
            logprobs: true,
            user: self.user.clone(),
            tools: self.tools.clone(),
            tool_choice: self.tool_choice.clone(),
            parallel_tool_calls: self.parallel_tool_calls,
            response_format: self.response_format.clone(),
        }
    }
}

/// Why a local model did not take a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// Its queue is full of callers still waiting.
    Full {
        pool: String,
        queue_timeout: Duration,
    },
    /// The model cannot be run here (file missing, profile refused, workers not started).
    Unavailable(String),
    ShuttingDown,
}

/// Where SLM generations run: the server's warm pools, the CLI's one runner, a test's script.
/// A job's events end with one [`Event::Done`] or [`Event::Failed`]; dropping (or closing) the
/// receiver cancels the generation.
pub trait LocalModel: Send + Sync + std::fmt::Debug {
    fn submit(
        &self,
        model: &str,
        profile: &str,
        req: GenerateRequest,
    ) -> Result<mpsc::UnboundedReceiver<Event>, SubmitError>;
}

/// A remote answer on its way.
pub type RemoteFuture = Pin<Box<dyn Future<Output = Result<ChatResponse, ChainError>> + Send>>;

/// The remote providers: `providers` is the chain to try in order (configured names).
pub trait RemoteChain: Send + Sync + std::fmt::Debug {
    fn complete(&self, providers: &[String], req: ChatRequest) -> RemoteFuture;
}

/// What goes out while an SLM answer streams live.
#[derive(Debug)]
pub enum Update {
    /// The answer starts: from here on it is final (no retry, no escalation). `policies`: the
    /// decision's.
    Streaming {
        model: String,
        profile: String,
        policies: Vec<String>,
    },
    Token(TokenInfo),
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Slm,
    Llm,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Slm => "slm",
            Source::Llm => "llm",
        }
    }
}

/// Why an SLM answer was replaced by the remote chain's.
#[derive(Debug, Clone, PartialEq)]
pub enum Escalation {
    /// Its confidence was below the decision's threshold (or it had no tokens to score).
    LowConfidence {
        score: Option<f64>,
        threshold: f32,
        method: Method,
    },
    /// The local model failed (after its retry); `error` says how.
    SlmFailed { error: String },
    /// Drawn for an audit sample (`routing.confidence_thresholds.audit_rate`).
    AuditSample,
    /// A field of a JSON answer was below its policy threshold (`field_thresholds`), or
    /// missing (`score` none).
    LowFieldConfidence {
        field: String,
        score: Option<f64>,
        threshold: f32,
    },
}

impl Escalation {
    /// The `reason` label of `corral_escalations_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Escalation::LowConfidence { .. } => "low_confidence",
            Escalation::SlmFailed { .. } => "slm_failure",
            Escalation::AuditSample => "audit",
            Escalation::LowFieldConfidence { .. } => "low_field_confidence",
        }
    }

    /// The reason in words, for the caller.
    pub fn reason(&self) -> String {
        match self {
            Escalation::SlmFailed { error } => format!("the SLM failed: {error}"),
            other => other.summary(),
        }
    }

    /// The reason without a runner's error text (which may quote input): the audit metadata's.
    pub fn summary(&self) -> String {
        match self {
            Escalation::LowConfidence {
                score,
                threshold,
                method,
            } => format!(
                "confidence {} < {threshold} ({})",
                score.map_or("n/a".into(), |s| format!("{s:.3}")),
                method.name()
            ),
            Escalation::SlmFailed { .. } => "the SLM failed".into(),
            Escalation::LowFieldConfidence {
                field,
                score: Some(s),
                threshold,
            } => format!("field '{field}' confidence {s:.3} < {threshold}"),
            Escalation::LowFieldConfidence {
                field, threshold, ..
            } => format!("field '{field}' is missing (needs confidence {threshold})"),
            Escalation::AuditSample => {
                "audit sample (routing.confidence_thresholds.audit_rate)".into()
            }
        }
    }
}

/// What the local model did for a request: the accepted answer's details, or the answer (or
/// failure) an escalation replaced.
#[derive(Debug, Clone)]
pub struct SlmRun {
    pub model: String,
    pub profile: String,
    pub done: Option<Box<Done>>,
    pub ready: Option<Box<Ready>>,
    /// The decision's method's score.
    pub score: Option<f64>,
    /// Every method's score.
    pub scores: Vec<(Method, Option<f64>)>,
    pub error: Option<String>,
    /// Wall time in the local model, retries and queueing included.
    pub time: Duration,
}

/// A remote call's own facts.
#[derive(Debug, Clone)]
pub struct LlmRun {
    pub latency_ms: f64,
    pub attempts: u32,
}

/// An answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub text: String,
    /// OpenAI's words: `stop`, `length`, or the provider's.
    pub finish_reason: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// The SLM's tokens (log-probabilities; empty for a remote answer).
    pub tokens: Vec<TokenInfo>,
    /// The calls the model made, in OpenAI's shape (`finish_reason` is then `tool_calls`).
    pub tool_calls: Option<Value>,
    pub source: Source,
    pub model: String,
    pub provider: Option<String>,
    pub profile: Option<String>,
    pub confidence: Option<f64>,
    pub method: Method,
    /// The threshold an SLM answer was held to.
    pub threshold: Option<f32>,
    /// An SLM answer kept although its score is under the threshold (nothing to escalate to,
    /// escalation off, or it had already streamed).
    pub below_threshold: bool,
    pub escalation: Option<Escalation>,
    /// Time in the model or provider (the rest is corral's).
    pub model_time: Duration,
    /// For a JSON answer of the local model: each top-level field's confidence (tokens the
    /// constraint forced left out).
    pub field_confidence: Option<BTreeMap<String, Option<f64>>>,
    /// What the local model did: the answer's own run, or the one an escalation replaced.
    pub slm: Option<SlmRun>,
    pub llm: Option<LlmRun>,
}

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Failure {
    #[error("model `{0}` is not in the catalog")]
    UnknownModel(String),
    #[error("{0}")]
    NotAllowed(String),
    #[error("refused by policy: {reason}")]
    Denied { reason: String },
    #[error("the local model's queue is full ({pool}); retry later")]
    QueueFull { pool: String, retry_after: u64 },
    #[error("timed out waiting for a local runner")]
    QueueTimeout,
    /// The runner refused the request as given (a prompt longer than the context): the caller's.
    #[error("the local model refused the request: {0}")]
    Refused(String),
    /// The request needs what the local model cannot do (tools, structured output): never
    /// answered with unconstrained text.
    #[error("{0}")]
    Unsupported(String),
    #[error("the local model {model} cannot be started: {error}")]
    Unavailable { model: String, error: String },
    /// The local model failed (after its retry) and nothing escalated it.
    #[error("the local model failed: {error}")]
    Local { error: String, retryable: bool },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the remote providers failed: {0}")]
    Remote(String),
    /// The local model failed after the answer had started streaming.
    #[error("the local model failed after the answer started streaming: {0}")]
    Interrupted(String),
    /// The caller went away while its answer streamed; the generation was cancelled.
    #[error("the client went away mid-stream; the generation was cancelled")]
    ClientGone,
}

impl Failure {
    /// A stable label (audit metadata, logs, metrics).
    pub fn code(&self) -> &'static str {
        match self {
            Failure::UnknownModel(_) => "model_not_found",
            Failure::NotAllowed(_) => "model_not_allowed",
            Failure::Denied { .. } => "policy_denied",
            Failure::QueueFull { .. } => "queue_full",
            Failure::QueueTimeout => "queue_timeout",
            Failure::Refused(_) => "request_refused",
            Failure::Unsupported(_) => "unsupported_parameter",
            Failure::Unavailable { .. } => "model_unavailable",
            Failure::Local { .. } => "slm_failed",
            Failure::ShuttingDown => "shutting_down",
            Failure::Remote(_) => "providers_failed",
            Failure::Interrupted(_) => "stream_error",
            Failure::ClientGone => "client_gone",
        }
    }
}

/// How a request ended.
#[derive(Debug)]
pub struct Outcome {
    /// `None`: refused before routing (unknown or disallowed model).
    pub decision: Option<RouteDecision>,
    pub result: Result<Answer, Failure>,
    /// The answer (or its failure) went out through [`Update`]s.
    pub streamed: bool,
    /// The request's audit entry, when the pipeline was asked for one ([`Pipeline::audit`]).
    pub audit: Option<AuditRecord>,
    /// What the SLM did when the request failed after it ran (its own failure, or the chain's
    /// after an escalation); an answer carries its own in [`Answer::slm`].
    pub slm: Option<SlmRun>,
}

impl Outcome {
    /// The `route` label of metrics: `slm`, `llm`, or `none` (refused or failed before an
    /// answer).
    pub fn route_label(&self) -> &'static str {
        match (&self.result, self.decision.as_ref().map(|d| &d.selection)) {
            (Ok(a), _) => a.source.label(),
            (Err(Failure::Interrupted(_) | Failure::ClientGone), _) => "slm",
            _ => "none",
        }
    }
}

/// The pipeline's parts: the routing policy and where models run.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub router: Arc<Router>,
    pub local: Arc<dyn LocalModel>,
    pub remote: Arc<dyn RemoteChain>,
    /// Build each outcome's audit record (only when an audit log will take it: the record
    /// copies the request and the answer).
    pub audit: bool,
}

/// How one local attempt ended.
enum Attempt {
    Done {
        tokens: Vec<TokenInfo>,
        done: Box<Done>,
        ready: Box<Ready>,
        streamed: bool,
    },
    Failed {
        kind: FailKind,
        error: String,
        retryable: bool,
    },
    /// Failed or abandoned after tokens went out.
    Broken(Failure),
}

impl Pipeline {
    /// Answers `req` for `caller`. With `updates` and a streaming request an SLM answer that
    /// nothing may replace goes out token by token; a closed `updates` receiver cancels it.
    pub async fn answer(
        &self,
        caller: &Caller,
        req: &Request,
        updates: Option<&mpsc::Sender<Update>>,
    ) -> Outcome {
        let t0 = Instant::now();
        let mut streamed = false;
        let (decision, result, slm) = match check_model(&self.router, caller, req) {
            Err(f) => (None, Err(f), None),
            Ok(()) => {
                let d = self.router.decide(&req.context(caller));
                let (result, slm) = self.follow(&d, req, updates, &mut streamed).await;
                (Some(d), result, slm)
            }
        };
        let audit = self.audit.then(|| {
            record::audit_record(
                caller,
                req,
                decision.as_ref(),
                &result,
                slm.as_ref(),
                self.router.method,
                t0.elapsed(),
            )
        });
        Outcome {
            decision,
            result,
            streamed,
            audit,
            slm,
        }
    }

    /// Carries out the decision. The second value is what the SLM did when its failure (or the
    /// chain's, after an escalation) ended the request.
    async fn follow(
        &self,
        d: &RouteDecision,
        req: &Request,
        updates: Option<&mpsc::Sender<Update>>,
        streamed: &mut bool,
    ) -> (Result<Answer, Failure>, Option<SlmRun>) {
        match &d.selection {
            Selection::Deny { reason } => (
                Err(Failure::Denied {
                    reason: reason.clone(),
                }),
                None,
            ),
            Selection::Llm { providers } => (self.remote(providers, req, d, None).await, None),
            Selection::Slm { model, profile } => {
                self.local(d, req, model, profile, updates, streamed).await
            }
        }
    }

    async fn remote(
        &self,
        providers: &[String],
        req: &Request,
        d: &RouteDecision,
        escalation: Option<Escalation>,
    ) -> Result<Answer, Failure> {
        let r = self
            .remote
            .complete(
                providers,
                req.remote_request(&self.router, d.remote_prompt.is_some()),
            )
            .await
            .map_err(|e| Failure::Remote(e.to_string()))?;
        let method = self.router.method;
        Ok(Answer {
            confidence: r
                .token_logprobs
                .as_deref()
                .and_then(|lps| confidence::score_logprobs(lps, method)),
            text: r.text,
            finish_reason: r.finish_reason,
            prompt_tokens: r.usage.prompt_tokens,
            completion_tokens: r.usage.completion_tokens,
            tokens: vec![],
            tool_calls: r.tool_calls,
            field_confidence: None,
            source: Source::Llm,
            model: r.model,
            provider: Some(r.provider),
            profile: None,
            method,
            threshold: None,
            below_threshold: false,
            escalation,
            model_time: Duration::from_secs_f64(r.latency_ms / 1e3),
            slm: None,
            llm: Some(LlmRun {
                latency_ms: r.latency_ms,
                attempts: r.attempts,
            }),
        })
    }

    async fn local(
        &self,
        d: &RouteDecision,
        req: &Request,
        model: &str,
        profile: &str,
        updates: Option<&mpsc::Sender<Update>>,
        streamed: &mut bool,
    ) -> (Result<Answer, Failure>, Option<SlmRun>) {
        // The local runner has no tool calling yet: a model whose catalog entry claims it
        // still does not get such a request (it would answer free text where the caller needs
        // a call). JSON output is constrained in the runner (`response_format`).
        if req.capabilities().contains(&Capability::ToolUse) {
            return (
                Err(Failure::Unsupported(format!(
                    "the local model {model} cannot answer requests with tools yet; route them to a remote provider"
                ))),
                None,
            );
        }
        let rt = &self.router;
        let method = rt.method;
        let need = d.confidence_required.unwrap_or(0.0);
        let escalate_low = d.fallback_available && rt.on_low_confidence && need > 0.0;
        // Held back while it may still be replaced, unless the deciding policy says otherwise.
        let buffer = match d.streaming {
            Some(Streaming::Buffer) => true,
            Some(Streaming::Stream) => false,
            None => escalate_low || (d.fallback_available && rt.audit_rate > 0.0),
        };
        let live = updates.filter(|_| req.stream && !buffer);
        let start = Instant::now();
        let mut failure: Option<(String, bool)> = None;
        let mut unavailable = false;
        let mut got = None;
        for attempt in 0..2 {
            let mut rx = match self.submit(model, profile, req, attempt > 0).await {
                Ok(rx) => rx,
                // A model that cannot be run here fails like a runner that could not start
                // (escalated when the decision allows), not retried.
                Err(Failure::Unavailable { error, .. }) => {
                    unavailable = true;
                    failure = Some((error, false));
                    break;
                }
                Err(f) => return (Err(f), None),
            };
            match collect(&mut rx, live, model, profile, &d.policies_applied).await {
                Attempt::Done {
                    tokens,
                    done,
                    ready,
                    streamed: s,
                } => {
                    *streamed = s;
                    got = Some((tokens, done, ready));
                    break;
                }
                Attempt::Broken(f) => {
                    *streamed = true;
                    return (Err(f), None);
                }
                Attempt::Failed {
                    kind,
                    error,
                    retryable,
                } => {
                    match kind {
                        FailKind::QueueTimeout => return (Err(Failure::QueueTimeout), None),
                        FailKind::Refused => return (Err(Failure::Refused(error)), None),
                        FailKind::Runner | FailKind::ShuttingDown => {}
                    }
                    tracing::warn!(attempt, error = %error, "local model failed");
                    failure = Some((error, retryable));
                    if !retryable {
                        break;
                    }
                }
            }
        }
        let time = start.elapsed();
        let Some((tokens, done, ready)) = got else {
            let (error, retryable) = failure.unwrap_or_default();
            let run = SlmRun {
                model: model.to_string(),
                profile: profile.to_string(),
                done: None,
                ready: None,
                score: None,
                scores: vec![],
                error: Some(error.clone()),
                time,
            };
            if d.fallback_available && rt.on_slm_failure {
                let why = Escalation::SlmFailed { error };
                return self.escalate(req, d, why, run).await;
            }
            let f = if unavailable {
                Failure::Unavailable {
                    model: model.to_string(),
                    error,
                }
            } else {
                Failure::Local { error, retryable }
            };
            return (Err(f), Some(run));
        };
        // Tokens a constraint forced (one allowed choice) say nothing of the model's confidence.
        let stats: Vec<confidence::TokenStat> = tokens
            .iter()
            .filter(|t| !t.forced)
            .map(confidence::TokenStat::from)
            .collect();
        let score = confidence::score(&stats, method);
        let low = score.is_none_or(|s| s < f64::from(need));
        // A JSON answer's fields, and the first one the decision's field thresholds find wanting
        // (a field that is missing has no confidence at all).
        let field_confidence = self
            .constraint_active(req)
            .then(|| fields::field_confidence(&tokens, method))
            .flatten();
        let low_field = d.field_thresholds.iter().find_map(|(k, t)| {
            match field_confidence.as_ref().and_then(|f| f.get(k)) {
                None => Some((k.clone(), None, *t)),
                Some(Some(v)) if *v < f64::from(*t) => Some((k.clone(), Some(*v), *t)),
                Some(_) => None,
            }
        });
        let run = SlmRun {
            model: model.to_string(),
            profile: profile.to_string(),
            done: Some(done),
            ready: Some(ready),
            score,
            scores: confidence::all_scores(&stats),
            error: None,
            time,
        };
        if !*streamed {
            let audit = !low && d.fallback_available && rt.audit_draw();
            let why = if audit {
                Some(Escalation::AuditSample)
            } else if escalate_low && low {
                Some(Escalation::LowConfidence {
                    score,
                    threshold: need,
                    method,
                })
            } else if let Some((field, score, threshold)) = low_field
                .clone()
                .filter(|_| d.fallback_available && rt.on_low_confidence)
            {
                Some(Escalation::LowFieldConfidence {
                    field,
                    score,
                    threshold,
                })
            } else {
                None
            };
            if let Some(why) = why {
                return self.escalate(req, d, why, run).await;
            }
        }
        let (text, finish, prompt_tokens, completion_tokens) = match run.done.as_deref() {
            Some(d) => (
                d.text.clone(),
                finish_reason(d.finish_reason),
                d.prompt_tokens,
                d.completion_tokens,
            ),
            None => (String::new(), "stop", 0, 0),
        };
        let answer = Answer {
            text,
            finish_reason: finish.into(),
            prompt_tokens,
            completion_tokens,
            field_confidence,
            tokens,
            tool_calls: None,
            source: Source::Slm,
            model: model.to_string(),
            provider: None,
            profile: Some(profile.to_string()),
            confidence: score,
            method,
            threshold: Some(need),
            below_threshold: (low && need > 0.0) || low_field.is_some(),
            escalation: None,
            model_time: time,
            slm: Some(run),
            llm: None,
        };
        (Ok(answer), None)
    }

    /// The remote chain's answer in place of the SLM's (`run`: what the SLM did, kept in the
    /// answer, or returned beside the failure when the chain failed too).
    async fn escalate(
        &self,
        req: &Request,
        d: &RouteDecision,
        why: Escalation,
        run: SlmRun,
    ) -> (Result<Answer, Failure>, Option<SlmRun>) {
        match self.remote(&self.router.fallback, req, d, Some(why)).await {
            Ok(mut a) => {
                a.model_time += run.time;
                a.slm = Some(run);
                (Ok(a), None)
            }
            Err(f) => (Err(f), Some(run)),
        }
    }

    /// Whether the runner decoded this request under a JSON constraint.
    fn constraint_active(&self, req: &Request) -> bool {
        req.constraint().is_some()
    }

    /// Queues the request. A first attempt finding the queue full is the caller's 429; a retry
    /// (the request already held a place) waits for room up to the queue timeout, since the
    /// worker that failed it is only just coming back for work.
    async fn submit(
        &self,
        model: &str,
        profile: &str,
        req: &Request,
        retry: bool,
    ) -> Result<mpsc::UnboundedReceiver<Event>, Failure> {
        let since = Instant::now();
        loop {
            match self.local.submit(model, profile, req.runner_request()) {
                Ok(rx) => return Ok(rx),
                Err(SubmitError::Full {
                    queue_timeout,
                    pool,
                }) => {
                    if !retry || since.elapsed() >= queue_timeout {
                        return Err(Failure::QueueFull {
                            pool,
                            retry_after: queue_timeout.as_secs().clamp(1, 5),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(SubmitError::Unavailable(error)) => {
                    return Err(Failure::Unavailable {
                        model: model.to_string(),
                        error,
                    })
                }
                Err(SubmitError::ShuttingDown) => return Err(Failure::ShuttingDown),
            }
        }
    }
}

/// A model the caller named must exist and be on its allow list (refused outright, not quietly
/// replaced by another).
pub fn check_model(router: &Router, caller: &Caller, req: &Request) -> Result<(), Failure> {
    if req.auto() {
        return Ok(());
    }
    if !router.knows_model(&req.model) {
        return Err(Failure::UnknownModel(req.model.clone()));
    }
    router
        .allowed(caller.agent.as_deref(), &req.model)
        .map_err(Failure::NotAllowed)
}

/// OpenAI's `finish_reason` for a runner's.
pub fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

/// Reads a job's events to the end. With `live`, the first token starts the stream and every
/// token goes out as it comes; a closed `live` receiver cancels the job (closing its channel,
/// which the pool worker sees) and waits for the worker to let go.
async fn collect(
    rx: &mut mpsc::UnboundedReceiver<Event>,
    live: Option<&mpsc::Sender<Update>>,
    model: &str,
    profile: &str,
    policies: &[String],
) -> Attempt {
    let mut tokens = Vec::new();
    let mut started = false;
    let mut gone = false;
    loop {
        match rx.recv().await {
            Some(Event::Token(t)) => {
                if let (Some(tx), false) = (live, gone) {
                    let mut ok = true;
                    if !started {
                        started = true;
                        ok = tx
                            .send(Update::Streaming {
                                model: model.to_string(),
                                profile: profile.to_string(),
                                policies: policies.to_vec(),
                            })
                            .await
                            .is_ok();
                    }
                    if !ok || tx.send(Update::Token(t.clone())).await.is_err() {
                        tracing::info!("client went away mid-stream");
                        gone = true;
                        rx.close();
                    }
                }
                tokens.push(t);
            }
            Some(Event::Done(done, ready)) if !gone => {
                return Attempt::Done {
                    tokens,
                    done,
                    ready,
                    streamed: started,
                }
            }
            Some(Event::Done(..)) => return Attempt::Broken(Failure::ClientGone),
            Some(Event::Failed { .. }) | None if gone => {
                return Attempt::Broken(Failure::ClientGone)
            }
            Some(Event::Failed { error, .. }) if started => {
                tracing::warn!(error = %error, "local model failed mid-stream");
                return Attempt::Broken(Failure::Interrupted(error));
            }
            Some(Event::Failed {
                kind,
                error,
                retryable,
            }) => {
                return Attempt::Failed {
                    kind,
                    error,
                    retryable,
                }
            }
            None if started => {
                return Attempt::Broken(Failure::Interrupted("the pool worker went away".into()))
            }
            None => {
                return Attempt::Failed {
                    kind: FailKind::Runner,
                    error: "the pool worker went away".into(),
                    retryable: true,
                }
            }
        }
    }
}
