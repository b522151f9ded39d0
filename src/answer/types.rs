//! The pipeline's vocabulary: the request, the two sides it calls (a local model, a remote
//! chain), and what comes out (the answer, the escalation, the failure, the outcome).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use corral_protocol::{
    ChatMessage, Done, Function, GenerateRequest, Input, Ready, Sampling, TokenInfo, ToolCall,
    ToolChoice, Tools,
};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::audit::{AuditRecord, Caller};
use crate::catalog::Capability;
use crate::confidence::Method;
use crate::pool::Event;
use crate::providers::{ChainError, ChatRequest, ChatResponse, Message};
use crate::routing::{RequestContext, RouteDecision, Router, TaskType};

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
    /// The caller set `max_tokens` (an OpenAI request past the context is then a 400).
    pub max_tokens_explicit: bool,
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
                    .map(|(r, c)| corral_protocol::ChatMessage::new(r.clone(), c.clone()))
                    .collect(),
            ),
            messages: messages
                .into_iter()
                .map(|(r, c)| Message::new(r, c))
                .collect(),
            max_tokens: 256,
            max_tokens_explicit: false,
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
    pub(super) fn constraint(&self) -> Option<corral_protocol::OutputConstraint> {
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

    /// What the answer answers, for its confidence features: the last user message (the
    /// question, without a system prompt or earlier turns), or a completion's prompt.
    pub fn question_text(&self) -> String {
        match &self.input {
            Input::Prompt(p) => p.clone(),
            Input::Messages(_) => self
                .messages
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .map(|m| m.content.clone())
                .unwrap_or_default(),
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

    /// The functions the local model is offered, and how it may use them. `tool_choice: none`
    /// offers nothing; with calls or results in the conversation it still goes as `None`, so
    /// the runner keeps the answer from copying their syntax into its text.
    pub(super) fn runner_tools(&self) -> Option<Tools> {
        let choice = match &self.tool_choice {
            None => ToolChoice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" if self.has_tool_history() => ToolChoice::None,
                "none" => return None,
                "required" => ToolChoice::Required,
                _ => ToolChoice::Auto,
            },
            Some(v) => ToolChoice::Function {
                name: v
                    .pointer("/function/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            },
        };
        let functions: Vec<Function> = self
            .functions()
            .map(|(name, f)| Function {
                name: name.to_string(),
                description: f
                    .get("description")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                parameters: f.get("parameters").cloned().unwrap_or(Value::Null),
            })
            .collect();
        (!functions.is_empty()).then(|| Tools {
            functions,
            choice,
            parallel: self.parallel_tool_calls.unwrap_or(true),
        })
    }

    /// Whether the conversation holds calls or tool results.
    fn has_tool_history(&self) -> bool {
        self.messages
            .iter()
            .any(|m| m.tool_calls.is_some() || m.role == "tool")
    }

    /// Whether the local model may answer with a call (tools offered, not `none`): such an
    /// answer is read whole before it goes out.
    pub(super) fn may_call(&self) -> bool {
        !self.choice_is_none() && self.functions().next().is_some()
    }

    /// The offered functions as sent: (name, the `function` object).
    fn functions(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.tools
            .as_ref()
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|t| {
                let f = t.get("function")?;
                Some((f.get("name")?.as_str()?, f))
            })
    }

    /// `tool_choice: none`: nothing is offered to be called.
    fn choice_is_none(&self) -> bool {
        matches!(&self.tool_choice, Some(Value::String(s)) if s == "none")
    }

    /// Whether the local runner can enforce every schema of the request (the `json_schema`
    /// response format, the offered functions' parameters); the error names the keyword, where
    /// it is and, for a function, which.
    pub(super) fn local_schemas(&self) -> Result<(), String> {
        let rf = self.response_format.as_ref();
        if rf.and_then(|r| r.get("type")).and_then(Value::as_str) == Some("json_schema") {
            let schema = rf
                .and_then(|r| r.pointer("/json_schema/schema"))
                .unwrap_or(&Value::Null);
            corral_protocol::check_schema(schema).map_err(|e| format!("response_format: {e}"))?;
        }
        if self.choice_is_none() {
            return Ok(());
        }
        for (name, f) in self.functions() {
            match f.get("parameters") {
                None | Some(Value::Null) => {}
                Some(p) if !p.is_object() => {
                    return Err(format!("function '{name}': parameters must be an object"));
                }
                Some(p) => corral_protocol::check_schema(p)
                    .map_err(|e| format!("function '{name}': {e}"))?,
            }
        }
        Ok(())
    }

    /// The runner's messages: the conversation with its earlier calls (arguments as JSON when
    /// they parse) and tool results (named after the call they answer).
    fn runner_input(&self) -> Input {
        if !matches!(self.input, Input::Messages(_)) {
            return self.input.clone();
        }
        let mut names = BTreeMap::new();
        let messages = self
            .messages
            .iter()
            .map(|m| {
                let mut out = ChatMessage::new(m.role.clone(), m.content.clone());
                for c in m
                    .tool_calls
                    .iter()
                    .flat_map(|c| c.as_array().into_iter().flatten())
                {
                    let id = c.get("id").and_then(Value::as_str).unwrap_or_default();
                    let name = c
                        .pointer("/function/name")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    let args = c
                        .pointer("/function/arguments")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    names.insert(id.to_string(), name.to_string());
                    out.tool_calls.push(ToolCall {
                        id: id.to_string(),
                        name: name.to_string(),
                        arguments: serde_json::from_str(args)
                            .unwrap_or_else(|_| Value::String(args.to_string())),
                    });
                }
                if let Some(id) = &m.tool_call_id {
                    out.name = names.get(id).cloned();
                    out.tool_call_id = Some(id.clone());
                }
                out
            })
            .collect();
        Input::Messages(messages)
    }

    pub(super) fn runner_request(&self) -> GenerateRequest {
        GenerateRequest {
            id: 0,
            input: self.runner_input(),
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
            tools: self.runner_tools(),
            max_tokens_explicit: self.max_tokens_explicit,
            cache_key: None,
        }
    }

    /// What the remote chain gets: every message masked on its own when the PII guardrail says
    /// so (`mask`), the system message included.
    pub(super) fn remote_request(&self, router: &Router, mask: bool) -> ChatRequest {
        ChatRequest {
            model: None,
            cancel: None,
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
    /// As `complete`, sending the answer's pieces to `pieces` as they arrive (first a
    /// [`Delta::Begin`](crate::providers::Delta::Begin)). A closed `pieces` receiver, or the
    /// future dropped, ends the provider's answer and closes its connection.
    fn stream(
        &self,
        providers: &[String],
        req: ChatRequest,
        pieces: tokio::sync::mpsc::Sender<crate::providers::Delta>,
    ) -> RemoteFuture;
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
    /// A remote answer starts streaming: from here on it is final. `escalation`: why it
    /// replaced the local model's, when it did.
    RemoteStreaming {
        provider: String,
        model: String,
        policies: Vec<String>,
        escalation: Option<Escalation>,
    },
    /// A piece of the remote answer, as the provider sent it.
    Piece(crate::providers::Delta),
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
    /// Decided before the SLM finished (`routing.llm_fallback.decide_early`, `early_floor`):
    /// after `tokens` tokens the best score the answer could still reach (`best`) was below the
    /// threshold, or its running `score` below the floor (`floor` set). The runner was
    /// cancelled.
    EarlyLowConfidence {
        score: Option<f64>,
        best: f64,
        threshold: f32,
        floor: Option<f32>,
        method: Method,
        tokens: usize,
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
    /// A schema of the request (response format, a function's parameters) uses what the local
    /// model cannot enforce; the SLM was not run.
    Unenforceable { error: String },
    /// The request does not fit the local model's context (`error` gives the numbers).
    ContextLength { error: String },
}

impl Escalation {
    /// The `reason` label of `corral_escalations_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Escalation::LowConfidence { .. } => "low_confidence",
            Escalation::EarlyLowConfidence { .. } => "low_confidence_early",
            Escalation::SlmFailed { .. } => "slm_failure",
            Escalation::AuditSample => "audit",
            Escalation::LowFieldConfidence { .. } => "low_field_confidence",
            Escalation::Unenforceable { .. } => "unenforceable_schema",
            Escalation::ContextLength { .. } => "context_length",
        }
    }

    /// The reason in words, for the caller.
    pub fn reason(&self) -> String {
        match self {
            Escalation::SlmFailed { error } => format!("the SLM failed: {error}"),
            Escalation::Unenforceable { error } => {
                format!("the local model cannot enforce the schema: {error}")
            }
            Escalation::ContextLength { error } => {
                format!("the request does not fit the local model's context: {error}")
            }
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
            Escalation::EarlyLowConfidence {
                score,
                best,
                threshold,
                floor,
                method,
                tokens,
            } => {
                let now = score.map_or("n/a".into(), |s| format!("{s:.3}"));
                match floor {
                    Some(f) => format!(
                        "confidence {now} < floor {f} after {tokens} tokens ({}; threshold {threshold})",
                        method.name()
                    ),
                    None => format!(
                        "confidence cannot reach {threshold}: at most {best:.3} after {tokens} tokens ({})",
                        method.name()
                    ),
                }
            }
            Escalation::SlmFailed { .. } => "the SLM failed".into(),
            Escalation::Unenforceable { .. } => "a schema the local model cannot enforce".into(),
            Escalation::ContextLength { .. } => {
                "the request does not fit the local model's context".into()
            }
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
    /// The method it was computed with (`calibrated` needs the model's calibrator; without
    /// one the score is `geometric_mean`'s). `None`: no score was computed.
    pub method: Option<Method>,
    /// The answer's features ([`crate::confidence::features::NAMES`]), what a calibrator is fitted
    /// on when feedback labels the answer.
    pub features: Option<Vec<f64>>,
    /// Every plain method's score.
    pub scores: Vec<(Method, Option<f64>)>,
    pub error: Option<String>,
    /// Wall time in the local model, retries and queueing included.
    pub time: Duration,
    /// What the model had written when it was stopped before its end (an escalation decided
    /// early); `done` is then none.
    pub partial: Option<String>,
    /// Why it was being replaced, when the escalation's chain then failed (an answer that was
    /// replaced carries the reason itself, in [`Answer::escalation`]).
    pub escalation: Option<Escalation>,
}

impl SlmRun {
    /// A run that produced no answer (`error` says why), after `time`.
    pub fn failed(model: &str, profile: &str, error: &str, time: Duration) -> SlmRun {
        SlmRun {
            model: model.to_string(),
            profile: profile.to_string(),
            done: None,
            ready: None,
            score: None,
            method: None,
            features: None,
            scores: vec![],
            error: Some(error.to_string()),
            time,
            partial: None,
            escalation: None,
        }
    }

    /// The answer's text: the finished one, or what was written before it was stopped.
    pub fn text(&self) -> Option<&str> {
        self.done
            .as_deref()
            .map(|d| d.text.as_str())
            .or(self.partial.as_deref())
    }
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
    /// Prompt tokens whose state the runner reused from the caller's previous request
    /// (`server.pool.prefix_cache`), included in `prompt_tokens`.
    pub cached_tokens: u32,
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
    /// The remote provider failed after its answer had started streaming.
    #[error("the remote provider failed after the answer started streaming: {0}")]
    RemoteInterrupted(String),
    /// The caller went away while its answer streamed; the generation was cancelled.
    #[error("the client went away mid-stream; the generation was cancelled")]
    ClientGone,
    /// No response had started within `server.request_timeout_seconds` (504); the work was
    /// cancelled.
    #[error("the request took longer than {0}s (server.request_timeout_seconds)")]
    TimedOut(u64),
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
            Failure::Interrupted(_) | Failure::RemoteInterrupted(_) => "stream_error",
            Failure::ClientGone => "client_gone",
            Failure::TimedOut(_) => "request_timeout",
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
