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
mod types;

pub use types::*;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_protocol::{Done, FinishReason, Ready, TokenInfo};
use tokio::sync::mpsc;

use crate::audit::Caller;
use crate::confidence;
use crate::pool::{Event, FailKind};
use crate::routing::{RouteDecision, Router, Selection, Streaming};

/// The pipeline's parts: the routing policy and where models run.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub router: Arc<Router>,
    pub local: Arc<dyn LocalModel>,
    pub remote: Arc<dyn RemoteChain>,
    /// Build each outcome's audit record (only when an audit log will take it: the record
    /// copies the request and the answer).
    pub audit: bool,
    /// Whose prompt state runners reuse for whom (`server.pool.prefix_cache`,
    /// `prefix_cache_shared`).
    pub prefix_cache: PrefixCache,
    /// Each model's confidence calibrator (`slm.calibrators`).
    pub calibrators: confidence::calibrator::Calibrators,
}

/// Which requests may reuse the prompt state a runner kept from the one before.
#[derive(Debug, Clone, Default)]
pub struct PrefixCache {
    pub scope: crate::pool::PrefixScope,
    /// Models whose runners share it across callers.
    pub shared: Vec<String>,
}

impl PrefixCache {
    /// The key a runner compares (`None`: no reuse): the caller's API key alias (else its
    /// agent, else the one anonymous caller of a server without keys), its team, or one key
    /// for every caller of a shared model.
    pub fn key(&self, caller: &Caller, model: &str) -> Option<String> {
        if self.scope == crate::pool::PrefixScope::Off {
            return None;
        }
        if self.shared.iter().any(|m| m == model) {
            return Some("shared".into());
        }
        let who = || match (&caller.key_alias, &caller.agent) {
            (Some(k), _) => format!("key:{k}"),
            (None, Some(a)) => format!("agent:{a}"),
            (None, None) => "anonymous".into(),
        };
        match self.scope {
            crate::pool::PrefixScope::Off => None,
            crate::pool::PrefixScope::Key => Some(who()),
            crate::pool::PrefixScope::Team => Some(
                caller
                    .team
                    .as_ref()
                    .map_or_else(who, |t| format!("team:{t}")),
            ),
        }
    }
}

/// The calls of a local answer in OpenAI's shape (`call_` ids, arguments as a JSON string),
/// after checking what the runner sent: each call must name an offered function (the named
/// one, under a named `tool_choice`) and carry an arguments object; none where the request
/// forced a call is an answer that did not finish.
fn openai_calls(req: &Request, done: &Done) -> Result<Option<serde_json::Value>, String> {
    let Some(tools) = req.runner_tools() else {
        return if done.tool_calls.is_empty() {
            Ok(None)
        } else {
            Err("the runner returned tool calls that were not asked for".into())
        };
    };
    if done.tool_calls.is_empty() {
        // `required` or a named function admits no text: a runner that finished with some
        // broke the grammar (one cut by `max_tokens` made no complete call).
        let forced = matches!(
            tools.choice,
            corral_protocol::ToolChoice::Required | corral_protocol::ToolChoice::Function { .. }
        );
        if forced && done.finish_reason == corral_protocol::FinishReason::Stop {
            return Err("the runner answered without the call the request requires".into());
        }
        return Ok(None);
    }
    if tools.choice == corral_protocol::ToolChoice::None {
        return Err("the runner returned tool calls where none were allowed".into());
    }
    if !tools.parallel && done.tool_calls.len() > 1 {
        return Err("the runner returned parallel tool calls where they were refused".into());
    }
    let mut out = Vec::with_capacity(done.tool_calls.len());
    for c in &done.tool_calls {
        let offered = match &tools.choice {
            corral_protocol::ToolChoice::Function { name } => &c.name == name,
            _ => tools.functions.iter().any(|f| f.name == c.name),
        };
        if !offered || !c.arguments.is_object() {
            return Err(format!(
                "the runner returned a call of '{}' that was not offered, or without an arguments object",
                c.name
            ));
        }
        out.push(serde_json::json!({
            "id": format!("call_{}", random_id()),
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments.to_string()},
        }));
    }
    Ok(Some(serde_json::Value::Array(out)))
}

/// 24 random hex digits (request and call ids).
pub fn random_id() -> String {
    let mut b = [0u8; 12];
    if getrandom::getrandom(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b.copy_from_slice(&t.to_le_bytes()[..12]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
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
    /// Decided low before the end ([`Early`]): the job was cancelled.
    Early {
        tokens: Vec<TokenInfo>,
        best: f64,
        floor: Option<f32>,
    },
}

/// The early decision on a held answer (`routing.llm_fallback.decide_early`, `early_floor`):
/// its tokens scored as they arrive.
struct Early {
    running: confidence::Running,
    threshold: f64,
    /// The request's `max_tokens`: what the answer may still grow to.
    max_tokens: usize,
    decide: bool,
    floor: f32,
    floor_after: usize,
}

impl Early {
    /// After `generated` tokens: the best reachable score, and the floor when it was the floor
    /// that decided; `None` while the answer may still pass.
    fn check(&self, generated: usize) -> Option<(f64, Option<f32>)> {
        if self.running.is_empty() {
            return None;
        }
        let best = self
            .running
            .best_reachable(self.max_tokens.saturating_sub(generated));
        if self.decide && best < self.threshold {
            return Some((best, None));
        }
        // The running score only when the floor applies (a calibrated one is recomputed from
        // every token so far).
        let below_floor = self.floor > 0.0
            && self.running.len() >= self.floor_after
            && self
                .running
                .score()
                .is_some_and(|s| s < f64::from(self.floor));
        below_floor.then_some((best, Some(self.floor)))
    }
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
                let (result, slm) = self.follow(&d, caller, req, updates, &mut streamed).await;
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
        caller: &Caller,
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
            Selection::Llm { providers, model } => (
                self.remote(providers, model.as_deref(), req, d, None, updates, streamed)
                    .await,
                None,
            ),
            Selection::Slm { model, profile } => {
                let key = self.prefix_cache.key(caller, model);
                self.local(d, req, key, model, profile, updates, streamed)
                    .await
            }
        }
    }

    /// Asks the chain `providers` (for `model`, when the caller named a remote one). With
    /// `updates` and a streaming request the answer goes out piece by piece as the provider
    /// sends it (`streamed` is set once it starts).
    #[allow(clippy::too_many_arguments)]
    async fn remote(
        &self,
        providers: &[String],
        model: Option<&str>,
        req: &Request,
        d: &RouteDecision,
        escalation: Option<Escalation>,
        updates: Option<&mpsc::Sender<Update>>,
        streamed: &mut bool,
    ) -> Result<Answer, Failure> {
        let mut ask = req.remote_request(&self.router, d.remote_prompt.is_some());
        ask.model = model.map(str::to_string);
        let r = match updates.filter(|_| req.stream) {
            Some(live) => {
                self.remote_live(providers, ask, live, d, escalation.as_ref(), streamed)
                    .await?
            }
            None => self
                .remote
                .complete(providers, ask)
                .await
                .map_err(|e| Failure::Remote(e.to_string()))?,
        };
        // A remote answer has only its log-probabilities: a plain method scores it.
        let method = self.router.method.plain();
        Ok(Answer {
            confidence: r
                .token_logprobs
                .as_deref()
                .and_then(|lps| confidence::score_logprobs(lps, method)),
            text: r.text,
            finish_reason: r.finish_reason,
            prompt_tokens: r.usage.prompt_tokens,
            completion_tokens: r.usage.completion_tokens,
            cached_tokens: 0,
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

    /// The chain's answer streamed to `live` as it arrives: the first piece starts the
    /// stream; a closed `live` receiver closes the provider's connection. A failure once the
    /// stream started is [`Failure::RemoteInterrupted`] (or [`Failure::ClientGone`]).
    async fn remote_live(
        &self,
        providers: &[String],
        ask: crate::providers::ChatRequest,
        live: &mpsc::Sender<Update>,
        d: &RouteDecision,
        escalation: Option<&Escalation>,
        streamed: &mut bool,
    ) -> Result<crate::providers::ChatResponse, Failure> {
        let (tx, mut pieces) = mpsc::channel(64);
        let answer = self.remote.stream(providers, ask, tx);
        tokio::pin!(answer);
        // `gone`: the client went away; `open`: the chain may still send pieces.
        let (mut gone, mut open) = (false, true);
        let forward = |piece: crate::providers::Delta, started: &mut bool| {
            let update = match piece {
                crate::providers::Delta::Begin { provider, model } => {
                    *started = true;
                    Update::RemoteStreaming {
                        provider,
                        model,
                        policies: d.policies_applied.clone(),
                        escalation: escalation.cloned(),
                    }
                }
                p => Update::Piece(p),
            };
            live.send(update)
        };
        let result = loop {
            tokio::select! {
                biased;
                // The client left: the answer is dropped at once (its cancel flag stops the
                // provider's reader at the next line it gets, pings and keep-alives
                // included), not at the next piece.
                () = live.closed() => {
                    gone = true;
                    break None;
                }
                p = pieces.recv(), if open => match p {
                    Some(p) => {
                        if forward(p, streamed).await.is_err() {
                            gone = true;
                            break None;
                        }
                    }
                    None => open = false,
                },
                r = &mut answer => break Some(r),
            }
        };
        // Pieces sent before the answer ended.
        while let (false, Ok(p)) = (gone, pieces.try_recv()) {
            gone = forward(p, streamed).await.is_err();
        }
        if gone {
            tracing::info!("client went away mid-stream");
        }
        match result {
            // Ended or not, an answer whose client left mid-stream reached nobody.
            _ if gone => Err(Failure::ClientGone),
            None => Err(Failure::ClientGone),
            Some(Ok(r)) => Ok(r),
            Some(Err(e)) if !*streamed => Err(Failure::Remote(e.to_string())),
            Some(Err(_)) if live.is_closed() => Err(Failure::ClientGone),
            Some(Err(e)) => Err(Failure::RemoteInterrupted(e.to_string())),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn local(
        &self,
        d: &RouteDecision,
        req: &Request,
        cache_key: Option<String>,
        model: &str,
        profile: &str,
        updates: Option<&mpsc::Sender<Update>>,
        streamed: &mut bool,
    ) -> (Result<Answer, Failure>, Option<SlmRun>) {
        let rt = &self.router;
        // A schema the runner cannot enforce is never answered unconstrained: the chain gets
        // it when there is one, else the caller is told which keyword.
        if let Err(error) = req.local_schemas() {
            if d.fallback_available {
                let run = SlmRun::failed(model, profile, &error, Duration::ZERO);
                return self
                    .escalate(
                        req,
                        d,
                        Escalation::Unenforceable { error },
                        run,
                        updates,
                        streamed,
                    )
                    .await;
            }
            return (Err(Failure::Unsupported(error)), None);
        }
        let scorer = confidence::Scorer::new(
            rt.method,
            self.calibrators.get(model),
            &req.question_text(),
            d.task.task.as_str(),
        );
        let method = scorer.method();
        let need = d.confidence_required.unwrap_or(0.0);
        let escalate_low = d.fallback_available && rt.on_low_confidence && need > 0.0;
        // Held back while it may still be replaced, unless the deciding policy says otherwise;
        // `window`: tokens held before a live stream starts.
        let (buffer, window) = match d.streaming {
            Some(Streaming::Buffer) => (true, 0),
            Some(Streaming::Stream) => (false, 0),
            Some(Streaming::Window) => (false, rt.stream_window_tokens.max(1) as usize),
            None => (
                escalate_low || (d.fallback_available && rt.audit_rate > 0.0),
                0,
            ),
        };
        // An answer that may be a call is read whole: a call goes out only complete and checked.
        let live = updates.filter(|_| req.stream && !buffer && !req.may_call());
        let start = Instant::now();
        let mut failure: Option<(String, bool)> = None;
        let mut unavailable = false;
        let mut got = None;
        // A held answer that may be escalated for its score is scored as it comes.
        let early = || {
            ((buffer || window > 0) && escalate_low && (rt.decide_early || rt.early_floor > 0.0))
                .then(|| Early {
                    running: scorer.running(),
                    threshold: f64::from(need),
                    max_tokens: req.max_tokens as usize,
                    decide: rt.decide_early,
                    floor: rt.early_floor,
                    floor_after: rt.early_floor_min_tokens as usize,
                })
        };
        for attempt in 0..2 {
            let mut rx = match self
                .submit(model, profile, req, cache_key.clone(), attempt > 0)
                .await
            {
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
            let mut early = early();
            match collect(
                &mut rx,
                live,
                window,
                early.as_mut(),
                model,
                profile,
                &d.policies_applied,
            )
            .await
            {
                Attempt::Early {
                    tokens,
                    best,
                    floor,
                } => {
                    let stats = scored(&tokens);
                    let score = scorer.score(&tokens, false);
                    let run = SlmRun {
                        model: model.to_string(),
                        profile: profile.to_string(),
                        done: None,
                        ready: None,
                        score,
                        method: Some(method),
                        // Cut short by the decision: it never reached its limit.
                        features: scorer.features(&tokens, false).map(|f| f.values),
                        scores: confidence::all_scores(&stats),
                        error: None,
                        time: start.elapsed(),
                        partial: Some(tokens.iter().map(|t| t.text.as_str()).collect()),
                        escalation: None,
                    };
                    let why = Escalation::EarlyLowConfidence {
                        score,
                        best,
                        threshold: need,
                        floor,
                        method,
                        tokens: tokens.len(),
                    };
                    tracing::info!(
                        tokens = tokens.len(),
                        best,
                        "decided low before the end: escalating"
                    );
                    return self.escalate(req, d, why, run, updates, streamed).await;
                }
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
                        // Too long for this model: the chain (when it may take over) gets it,
                        // else it is the caller's 400 as before.
                        FailKind::TooLong if d.fallback_available && rt.on_slm_failure => {
                            let run = SlmRun::failed(model, profile, &error, start.elapsed());
                            let why = Escalation::ContextLength { error };
                            return self.escalate(req, d, why, run, updates, streamed).await;
                        }
                        FailKind::TooLong => return (Err(Failure::Refused(error)), None),
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
        // The runner's calls, checked (it is not trusted) and in OpenAI's shape.
        let mut tool_calls = None;
        if let Some((_, done, _)) = &got {
            match openai_calls(req, done) {
                Ok(c) => tool_calls = c,
                Err(error) => {
                    failure = Some((error, false));
                    got = None;
                }
            }
        }
        let Some((tokens, done, ready)) = got else {
            let (error, retryable) = failure.unwrap_or_default();
            let run = SlmRun::failed(model, profile, &error, time);
            if d.fallback_available && rt.on_slm_failure {
                let why = Escalation::SlmFailed { error };
                return self.escalate(req, d, why, run, updates, streamed).await;
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
        let stats = scored(&tokens);
        let truncated = done.finish_reason == FinishReason::Length;
        let score = scorer.score(&tokens, truncated);
        let features = scorer.features(&tokens, truncated).map(|f| f.values);
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
            method: Some(method),
            features,
            scores: confidence::all_scores(&stats),
            error: None,
            time,
            partial: None,
            escalation: None,
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
                return self.escalate(req, d, why, run, updates, streamed).await;
            }
        }
        let (text, mut finish, prompt_tokens, completion_tokens) = match run.done.as_deref() {
            Some(d) => (
                d.text.clone(),
                finish_reason(d.finish_reason),
                d.prompt_tokens,
                d.completion_tokens,
            ),
            None => (String::new(), "stop", 0, 0),
        };
        // Calls cut short by `max_tokens` keep `length` (the complete ones are kept).
        if tool_calls.is_some() && finish == "stop" {
            finish = "tool_calls";
        }
        let answer = Answer {
            text,
            finish_reason: finish.into(),
            prompt_tokens,
            completion_tokens,
            cached_tokens: run.done.as_deref().map_or(0, |d| d.cached_tokens),
            field_confidence,
            tokens,
            tool_calls,
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
        updates: Option<&mpsc::Sender<Update>>,
        streamed: &mut bool,
    ) -> (Result<Answer, Failure>, Option<SlmRun>) {
        match self
            .remote(
                &self.router.fallback,
                None,
                req,
                d,
                Some(why.clone()),
                updates,
                streamed,
            )
            .await
        {
            Ok(mut a) => {
                a.model_time += run.time;
                a.slm = Some(run);
                (Ok(a), None)
            }
            // The record still says the SLM's answer was being replaced, and why.
            Err(f) => (
                Err(f),
                Some(SlmRun {
                    escalation: Some(why),
                    ..run
                }),
            ),
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
        cache_key: Option<String>,
        retry: bool,
    ) -> Result<mpsc::UnboundedReceiver<Event>, Failure> {
        let since = Instant::now();
        loop {
            let mut g = req.runner_request();
            g.cache_key.clone_from(&cache_key);
            match self.local.submit(model, profile, g) {
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
/// The name may be a catalog model, `PROVIDER/MODEL` of a model a provider offers, or an alias
/// of either (`routing.aliases`); anything else is unknown.
pub fn check_model(router: &Router, caller: &Caller, req: &Request) -> Result<(), Failure> {
    if req.auto() {
        return Ok(());
    }
    match router.resolve(&req.model) {
        crate::routing::Named::Auto => Ok(()),
        crate::routing::Named::Unknown => Err(Failure::UnknownModel(req.model.clone())),
        crate::routing::Named::Local(_) | crate::routing::Named::Remote { .. } => router
            .allowed(caller.agent.as_deref(), &req.model)
            .map_err(Failure::NotAllowed),
    }
}

/// The numbers of the tokens an answer's confidence is scored on: tokens a constraint forced
/// (one allowed choice) say nothing of the model's confidence.
fn scored(tokens: &[TokenInfo]) -> Vec<confidence::TokenStat> {
    tokens
        .iter()
        .filter(|t| !t.forced)
        .map(confidence::TokenStat::from)
        .collect()
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
/// which the pool worker sees) and waits for the worker to let go. With `early`, each token is
/// scored as it comes and the job is cancelled as soon as the answer is decided low.
#[allow(clippy::too_many_arguments)]
async fn collect(
    rx: &mut mpsc::UnboundedReceiver<Event>,
    live: Option<&mpsc::Sender<Update>>,
    hold: usize,
    mut early: Option<&mut Early>,
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
                // Until the answer goes out, it is scored as it comes.
                if let Some(e) = early.as_deref_mut().filter(|_| !started) {
                    if !t.forced {
                        e.running
                            .push_text(confidence::TokenStat::from(&t), &t.text);
                    }
                    if let Some((best, floor)) = e.check(tokens.len() + 1) {
                        // Closing the channel cancels the job: the runner stops at its next
                        // token while the remote call starts.
                        rx.close();
                        tokens.push(t);
                        return Attempt::Early {
                            tokens,
                            best,
                            floor,
                        };
                    }
                }
                tokens.push(t);
                if let (Some(tx), false) = (live, gone) {
                    // The stream starts once `hold` tokens passed, with every token so far.
                    let from = if started {
                        tokens.len() - 1
                    } else if tokens.len() >= hold.max(1) {
                        started = true;
                        let begin = Update::Streaming {
                            model: model.to_string(),
                            profile: profile.to_string(),
                            policies: policies.to_vec(),
                        };
                        gone = tx.send(begin).await.is_err();
                        0
                    } else {
                        tokens.len()
                    };
                    for t in tokens[from..].iter().filter(|_| started) {
                        if gone || tx.send(Update::Token(t.clone())).await.is_err() {
                            gone = true;
                            break;
                        }
                    }
                    if gone {
                        tracing::info!("client went away mid-stream");
                        rx.close();
                    }
                }
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
