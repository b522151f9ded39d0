//! Test doubles for the pipeline's two sides, used by its unit tests and by the tests of both
//! front ends (tests/answer.rs), which need neither root nor model weights: a local model that
//! plays a script (tokens with log-probabilities, crashes, refusals, a full queue) and a remote
//! chain that answers or fails on cue. Nothing in corral's binaries uses them.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use corral_protocol::{Done, FinishReason, GenerateRequest, Ready, TokenInfo};
use tokio::sync::mpsc;

use super::{LocalModel, RemoteChain, RemoteFuture, SubmitError};
use crate::pool::{Event, FailKind};
use crate::providers::{ChainError, ChatRequest, ChatResponse, Delta, ProviderError, Usage};

/// What the scripted local model does with one job.
#[derive(Debug, Clone)]
pub enum Script {
    /// Answers these tokens (text, log-probability), then ends.
    Answer(Vec<(&'static str, f32)>),
    /// Answers with these calls (function name, arguments): one token each, of this
    /// log-probability, and no text.
    Calls(Vec<(&'static str, serde_json::Value)>, f32),
    /// Fails before any token, as a crashed runner (`retryable`) or one whose model cannot load.
    Crash { retryable: bool },
    /// Sends these tokens, then crashes.
    CrashAfter(Vec<(&'static str, f32)>),
    /// Refuses the request (as given: the caller's error).
    Refuse,
    /// Refuses the request as longer than the model's context.
    TooLong,
    /// The job waited past the queue timeout.
    QueueTimeout,
    /// The queue is full.
    Full,
    /// Takes the job and never answers (a stuck runner: the request timeout must end it).
    Hang,
}

/// A local model that plays one [`Script`] per submitted job, in order.
#[derive(Debug, Default)]
pub struct ScriptedModel {
    scripts: Mutex<VecDeque<Script>>,
    /// Every job submitted: (model, profile, request).
    pub jobs: Mutex<Vec<(String, String, GenerateRequest)>>,
    /// The event senders of hung jobs, held so their receivers stay open.
    hung: Mutex<Vec<mpsc::UnboundedSender<Event>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A runner's token for `text`.
pub fn token(text: &str, logprob: f32) -> TokenInfo {
    TokenInfo {
        token_id: 1,
        bytes: text.as_bytes().to_vec(),
        text: text.to_string(),
        logprob,
        entropy: -logprob,
        // As if the runner-up held the rest of the mass.
        margin: (logprob - (1.0 - logprob.exp()).max(1e-9).ln()).max(0.0),
        top_entropy: {
            let p = logprob.exp().clamp(1e-9, 1.0);
            let q = (1.0 - p).max(1e-9);
            -(p * p.ln() + q * q.ln())
        },
        top: vec![],
        forced: false,
    }
}

impl ScriptedModel {
    pub fn new(scripts: Vec<Script>) -> ScriptedModel {
        ScriptedModel {
            scripts: Mutex::new(scripts.into()),
            jobs: Mutex::new(vec![]),
            hung: Mutex::new(vec![]),
        }
    }

    /// Jobs submitted so far.
    pub fn submitted(&self) -> usize {
        lock(&self.jobs).len()
    }
}

impl LocalModel for ScriptedModel {
    fn submit(
        &self,
        model: &str,
        profile: &str,
        req: GenerateRequest,
    ) -> Result<mpsc::UnboundedReceiver<Event>, SubmitError> {
        let script = lock(&self.scripts)
            .pop_front()
            .ok_or_else(|| SubmitError::Unavailable("the script has no more jobs".into()))?;
        if matches!(script, Script::Full) {
            return Err(SubmitError::Full {
                pool: format!("{model}/{profile}"),
                queue_timeout: Duration::from_millis(50),
            });
        }
        let max = req.max_tokens as usize;
        lock(&self.jobs).push((model.to_string(), profile.to_string(), req));
        let (tx, rx) = mpsc::unbounded_channel();
        let tokens = |ts: &[(&str, f32)]| {
            ts.iter()
                .take(max)
                .map(|(t, l)| token(t, *l))
                .collect::<Vec<_>>()
        };
        let failed = |kind, error: &str, retryable| Event::Failed {
            kind,
            error: error.to_string(),
            retryable,
        };
        let (script, calls) = match script {
            Script::Calls(calls, lp) => (
                Script::Answer(calls.iter().map(|_| ("", lp)).collect()),
                calls
                    .into_iter()
                    .map(|(name, arguments)| corral_protocol::ToolCall {
                        id: String::new(),
                        name: name.to_string(),
                        arguments,
                    })
                    .collect(),
            ),
            s => (s, vec![]),
        };
        match script {
            Script::Calls(..) => unreachable!("mapped to an answer above"),
            Script::Answer(ts) => {
                let ts = tokens(&ts);
                let text: String = ts.iter().map(|t| t.text.as_str()).collect();
                let n = ts.len() as u32;
                for t in ts {
                    let _ = tx.send(Event::Token(t));
                }
                let done = Done {
                    id: 0,
                    finish_reason: if n as usize == max {
                        FinishReason::Length
                    } else {
                        FinishReason::Stop
                    },
                    text,
                    prompt_tokens: 7,
                    completion_tokens: n,
                    prefill_ms: 1.0,
                    ttft_ms: 2.0,
                    decode_tokens_per_s: 100.0,
                    constraint_ms: 0.0,
                    tokens: vec![],
                    tool_calls: calls,
                    cached_tokens: 0,
                };
                let ready = Ready {
                    architecture: "scripted".into(),
                    quantization: "none".into(),
                    vocab_size: 2,
                    context_length: 64,
                    eos_token_ids: vec![0],
                    has_chat_template: true,
                    threads: 1,
                    kernels: String::new(),
                    device: String::new(),
                    load_ms: 0.0,
                    slots: 1,
                    kv_bytes_per_token: 0,
                    kv_budget_mb: 0,
                };
                let _ = tx.send(Event::Done(Box::new(done), Box::new(ready)));
            }
            Script::Crash { retryable } => {
                let _ = tx.send(failed(
                    FailKind::Runner,
                    "runner died: killed by signal 9",
                    retryable,
                ));
            }
            Script::CrashAfter(ts) => {
                for t in tokens(&ts) {
                    let _ = tx.send(Event::Token(t));
                }
                let _ = tx.send(failed(
                    FailKind::Runner,
                    "runner died: killed by signal 9",
                    true,
                ));
            }
            Script::Refuse => {
                let _ = tx.send(failed(
                    FailKind::Refused,
                    "prompt has 5000 tokens; context holds 64",
                    false,
                ));
            }
            Script::TooLong => {
                let _ = tx.send(failed(
                    FailKind::TooLong,
                    "the prompt has 5000 tokens; the model's context holds 4096",
                    false,
                ));
            }
            Script::QueueTimeout => {
                let _ = tx.send(failed(FailKind::QueueTimeout, "queue timeout", false));
            }
            Script::Full => {}
            Script::Hang => lock(&self.hung).push(tx),
        }
        Ok(rx)
    }
}

/// A remote chain that answers `Ok(text)` or fails with `Err(message)`, in order (the last
/// entry repeats), and records what it was asked.
#[derive(Debug, Default)]
pub struct ScriptedChain {
    answers: Mutex<VecDeque<Result<&'static str, &'static str>>>,
    /// Every call: (providers, request).
    pub calls: Mutex<Vec<(Vec<String>, ChatRequest)>>,
}

impl ScriptedChain {
    pub fn new(answers: Vec<Result<&'static str, &'static str>>) -> ScriptedChain {
        ScriptedChain {
            answers: Mutex::new(answers.into()),
            calls: Mutex::new(vec![]),
        }
    }

    pub fn called(&self) -> usize {
        lock(&self.calls).len()
    }
}

impl RemoteChain for ScriptedChain {
    /// The scripted answer, its words sent as pieces first.
    fn stream(
        &self,
        providers: &[String],
        req: ChatRequest,
        pieces: mpsc::Sender<Delta>,
    ) -> RemoteFuture {
        let answer = self.complete(providers, req);
        Box::pin(async move {
            let r = answer.await?;
            let begin = Delta::Begin {
                provider: r.provider.clone(),
                model: r.model.clone(),
            };
            let words = r.text.split_inclusive(' ').map(|w| Delta::Text {
                text: w.to_string(),
                logprobs: None,
            });
            for p in std::iter::once(begin).chain(words) {
                if pieces.send(p).await.is_err() {
                    return Err(ChainError {
                        errors: vec![ProviderError::Cancelled {
                            provider: r.provider,
                        }],
                    });
                }
            }
            Ok(r)
        })
    }

    fn complete(&self, providers: &[String], req: ChatRequest) -> RemoteFuture {
        lock(&self.calls).push((providers.to_vec(), req));
        let next = {
            let mut a = lock(&self.answers);
            if a.len() > 1 {
                a.pop_front()
            } else {
                a.front().copied()
            }
        };
        let provider = providers.first().cloned().unwrap_or_default();
        let r = match next.unwrap_or(Err("no answer scripted")) {
            Ok(text) => Ok(ChatResponse {
                provider,
                model: "remote-large".into(),
                text: text.into(),
                finish_reason: "stop".into(),
                usage: Usage {
                    prompt_tokens: 20,
                    completion_tokens: 2,
                },
                token_logprobs: Some(vec![-0.01, -0.02]),
                tool_calls: None,
                latency_ms: 3.0,
                attempts: 1,
            }),
            Err(message) => Err(ChainError {
                errors: vec![ProviderError::Status {
                    provider,
                    status: 500,
                    message: message.into(),
                }],
            }),
        };
        Box::pin(async move { r })
    }
}
