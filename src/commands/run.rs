//! `corral run`: answer one prompt the way routing decides: a local model in its sandbox
//! (streamed), escalated to the remote chain when its confidence is below the threshold, straight
//! to the chain when a policy requires it, or refused.
//!
//! Streaming and escalation: when an SLM answer may still be escalated (a fallback chain exists
//! and `routing.llm_fallback.on_low_confidence` is on), the answer is held until its score is
//! known, so the terminal never shows an answer that is then replaced; otherwise it streams.
//!
//! With `audit.enabled`, each run writes one audit entry (answers, escalations, refusals and
//! failures alike); the log is opened before anything else, so a request whose entry could not be
//! written (a missing or loose key file) is not served.

use std::io::Write;
use std::time::Instant;

use corral_protocol::{ChatMessage, GenerateRequest, Input, Sampling};
use serde_json::{json, Value};

use crate::audit::{self, AuditLog, AuditRecord, Interaction, Route, TokenUsage};
use crate::commands::route::CallerArgs;
use crate::confidence::{self, TokenStat};
use crate::config::Config;
use crate::providers::{Chain, ChatRequest, ChatResponse, Message, Provider};
use crate::routing::{RouteDecision, Selection};
use crate::sandbox::HostSupport;
use crate::slm::models;
use crate::slm::runner::{runner_binary, Runner, RunnerSpec};

/// `corral run`'s arguments (also its command-line definition).
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Model id from the catalog (default: the one routing picks, normally smollm2-135m-instruct);
    /// still subject to the caller's allow list
    #[arg(long, short = 'm', value_name = "ID")]
    pub model: Option<String>,
    /// Sandbox profile name or path (default: the model's, else slm.default_sandbox_profile)
    #[arg(long, short = 'p', value_name = "NAME|PATH")]
    pub profile: Option<String>,
    /// Sampling temperature; 0 is greedy
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling threshold
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Seed for sampling
    #[arg(long)]
    pub seed: Option<u64>,
    /// Most tokens to generate
    #[arg(long, default_value_t = 256)]
    pub max_tokens: u32,
    /// A system message
    #[arg(long)]
    pub system: Option<String>,
    /// Print one JSON object (text, model, profile or provider, confidence, usage, timings,
    /// finish_reason, route, escalated, escalation_reason)
    #[arg(long)]
    pub json: bool,
    /// Generate exactly --max-tokens, past end-of-sequence (for benchmarks)
    #[arg(long, hide = true)]
    pub ignore_eos: bool,
    #[command(flatten)]
    pub caller: CallerArgs,
    /// The prompt, sent as a user message through the model's chat template
    pub prompt: String,
}

/// Model output is untrusted: escape control characters (ESC sequences could rewrite the
/// terminal, set its title or write the clipboard) except newline and tab.
pub fn terminal_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if (c.is_control() && c != '\n' && c != '\t') || ('\u{80}'..='\u{9f}').contains(&c) {
                '\u{fffd}'
            } else {
                c
            }
        })
        .collect()
}

/// Exit status of `corral run` when a policy or guardrail refuses the request.
pub const EXIT_DENIED: i32 = 3;

/// What the SLM produced.
struct SlmAnswer {
    text: String,
    score: Option<f64>,
    all_scores: serde_json::Map<String, serde_json::Value>,
    done: corral_protocol::Done,
    ready: corral_protocol::Ready,
    startup_ms: f64,
    outcome: Option<crate::sandbox::Outcome>,
}

fn messages(args: &RunArgs, prompt: &str) -> Vec<Message> {
    let mut m = Vec::new();
    if let Some(s) = &args.system {
        m.push(Message::new("system", s.clone()));
    }
    m.push(Message::new("user", prompt));
    m
}

fn call_chain(
    config: &Config,
    providers: &[String],
    args: &RunArgs,
    d: &RouteDecision,
) -> crate::Result<ChatResponse> {
    let chain = Chain::new(
        providers
            .iter()
            .filter_map(|n| {
                config
                    .providers
                    .get(n)
                    .map(|c| std::sync::Arc::new(Provider::new(n, c.clone())))
            })
            .collect(),
    );
    let prompt = d.remote_prompt.as_deref().unwrap_or(&args.prompt);
    let req = ChatRequest {
        messages: messages(args, prompt),
        max_tokens: Some(args.max_tokens),
        temperature: Some(args.temperature),
        top_p: args.top_p,
        stop: vec![],
        logprobs: true,
        user: args.caller.agent.clone(),
    };
    chain.complete(&req).map_err(crate::Error::from)
}

fn run_slm(
    config: &Config,
    args: &RunArgs,
    model_id: &str,
    profile_name: &str,
    stream: bool,
) -> crate::Result<SlmAnswer> {
    let model = models::lookup(config, model_id).map_err(|e| crate::Error::Usage(e.to_string()))?;
    let path = models::require(config, model).map_err(|e| crate::Error::Usage(e.to_string()))?;
    let profile = config.profiles.resolve(profile_name)?;
    let host = HostSupport::probe_for(&config.sandbox);
    let spec = RunnerSpec {
        model_path: path,
        sha256: model.sha256.clone(),
        binary: runner_binary(),
        requantize: true,
    };
    let mut runner = Runner::start(&spec, &profile, &config.sandbox, &host)?;
    // the same messages the remote chain would get, in the runner's protocol type
    let msgs = messages(args, &args.prompt)
        .into_iter()
        .map(|m| ChatMessage {
            role: m.role,
            content: m.content,
        })
        .collect();
    let req = GenerateRequest {
        id: 0,
        input: Input::Messages(msgs),
        sampling: Sampling {
            temperature: args.temperature,
            top_p: args.top_p,
            seed: args.seed,
            ..Sampling::default()
        },
        max_tokens: args.max_tokens,
        stop: vec![],
        top_logprobs: 0,
        stream: true,
        ignore_eos: args.ignore_eos,
    };
    let mut stats = Vec::new();
    let mut stdout = std::io::stdout();
    let mut streamed = String::new();
    let result = runner.generate(req, &mut |t| {
        stats.push(TokenStat::from(t));
        if stream {
            streamed.push_str(&t.text);
            let _ = stdout.write_all(terminal_safe(&t.text).as_bytes());
            let _ = stdout.flush();
        }
    });
    let done = match result {
        Ok(d) => d,
        Err(e) => {
            let _ = runner.shutdown();
            return Err(crate::Error::Runner(e));
        }
    };
    if stream {
        // Text held back for stop sequences arrives with the final frame.
        let rest = done.text.get(streamed.len()..).unwrap_or_default();
        let _ = stdout.write_all(terminal_safe(rest).as_bytes());
        let _ = writeln!(stdout);
    }
    let ready = runner.ready.clone();
    let startup_ms = runner.startup.as_secs_f64() * 1e3;
    let outcome = runner.shutdown();
    if let Some(o) = &outcome {
        for l in &o.limits {
            eprintln!("corral: {}", l.message());
        }
    }
    Ok(SlmAnswer {
        text: done.text.clone(),
        score: confidence::score(&stats, config.routing.method),
        all_scores: confidence::all_scores(&stats)
            .into_iter()
            .map(|(m, s)| (m.name().to_string(), json!(s)))
            .collect(),
        done,
        ready,
        startup_ms,
        outcome,
    })
}

fn slm_json(a: &SlmAnswer, model: &str, profile: &str, method: &str) -> serde_json::Value {
    let o = a.outcome.as_ref();
    json!({
        "text": a.done.text,
        "model": model,
        "profile": profile,
        "confidence": {"score": a.score, "method": method, "scores": a.all_scores},
        "usage": {"prompt_tokens": a.done.prompt_tokens, "completion_tokens": a.done.completion_tokens},
        "timings": {
            "load_ms": a.ready.load_ms,
            "startup_ms": a.startup_ms,
            "prefill_ms": a.done.prefill_ms,
            "ttft_ms": a.done.ttft_ms,
            "decode_tokens_per_s": a.done.decode_tokens_per_s,
        },
        "finish_reason": a.done.finish_reason,
        "runner": {
            "architecture": a.ready.architecture,
            "quantization": a.ready.quantization,
            "threads": a.ready.threads,
            "memory_peak_mb": o.and_then(|o| o.stats.memory_peak_bytes).map(|b| b / (1024 * 1024)),
            "cpu_ms": o.and_then(|o| o.stats.cpu_usage_ns).map(|n| n / 1_000_000),
        },
    })
}

fn route_json(d: &RouteDecision) -> serde_json::Value {
    json!({
        "selection": d.selection,
        "task": d.task.task,
        "complexity": d.task.complexity,
        "policies_applied": d.policies_applied,
        "confidence_required": d.confidence_required,
        "fallback_available": d.fallback_available,
    })
}

/// The confidence of a remote answer, from its token log-probabilities when it has them.
fn llm_score(config: &Config, r: &ChatResponse) -> Option<f64> {
    r.token_logprobs
        .as_deref()
        .and_then(|lps| confidence::score_logprobs(lps, config.routing.method))
}

/// Prints a remote answer; `escalation` says why it replaced the SLM's, `slm` what that was.
fn print_llm(
    config: &Config,
    args: &RunArgs,
    d: &RouteDecision,
    r: &ChatResponse,
    escalation: Option<&str>,
    slm: Option<serde_json::Value>,
    t0: Instant,
) {
    let method = config.routing.method;
    let score = llm_score(config, r);
    if args.json {
        println!(
            "{}",
            json!({
                "text": r.text,
                "model": r.model,
                "provider": r.provider,
                "route": route_json(d),
                "escalated": escalation.is_some(),
                "escalation_reason": escalation,
                "confidence": {"score": score, "method": method.name()},
                "usage": r.usage,
                "timings": {"latency_ms": r.latency_ms, "total_ms": t0.elapsed().as_secs_f64() * 1e3},
                "attempts": r.attempts,
                "finish_reason": r.finish_reason,
                "slm": slm,
            })
        );
    } else {
        println!("{}", terminal_safe(&r.text));
        eprintln!(
            "corral: llm {} ({}){} · {} prompt + {} tokens · {:.0} ms · {} attempt(s) · confidence {}",
            r.provider,
            r.model,
            escalation.map_or(String::new(), |e| format!(" · escalated: {e}")),
            r.usage.prompt_tokens,
            r.usage.completion_tokens,
            r.latency_ms,
            r.attempts,
            score.map_or("n/a".to_string(), |s| format!("{s:.3}")),
        );
    }
}

/// What one run did, for its audit entry.
#[derive(Debug, Default)]
struct Trail {
    interaction: Interaction,
    route: Option<Route>,
    policies: Vec<String>,
    model: Option<String>,
    provider: Option<String>,
    confidence: Option<f64>,
    escalation_reason: Option<String>,
    usage: Option<TokenUsage>,
    response: Value,
}

impl Trail {
    fn decided(&mut self, d: &RouteDecision) {
        self.route = Some(match d.selection {
            Selection::Slm { .. } => Route::Slm,
            Selection::Llm { .. } => Route::Llm,
            Selection::Deny { .. } => Route::Deny,
        });
        self.policies = d.policies_applied.clone();
    }

    fn escalating(&mut self, why: &str, slm: Value, score: Option<f64>) {
        self.interaction = Interaction::Escalation;
        self.escalation_reason = Some(why.to_string());
        self.confidence = score;
        self.response = json!({ "slm": slm });
    }

    /// The remote answer; for an escalation it joins what the SLM did, whose confidence stays
    /// the entry's (it is why the request escalated).
    fn llm(&mut self, config: &Config, r: &ChatResponse) {
        let score = llm_score(config, r);
        if self.interaction != Interaction::Escalation {
            self.confidence = score;
        }
        self.model = Some(r.model.clone());
        self.provider = Some(r.provider.clone());
        self.usage = Some(TokenUsage {
            prompt_tokens: r.usage.prompt_tokens,
            completion_tokens: r.usage.completion_tokens,
        });
        let answer = json!({
            "text": r.text,
            "model": r.model,
            "provider": r.provider,
            "finish_reason": r.finish_reason,
            "confidence": score,
            "latency_ms": r.latency_ms,
            "attempts": r.attempts,
        });
        match &mut self.response {
            Value::Object(m) => {
                if let Value::Object(a) = answer {
                    m.extend(a);
                }
            }
            other => *other = answer,
        }
    }

    fn record(self, args: &RunArgs, result: &crate::Result<i32>, t0: Instant) -> AuditRecord {
        AuditRecord {
            request_id: audit::new_id(),
            caller: audit::Caller {
                agent: args.caller.agent.clone(),
                team: args.caller.team.clone(),
                key_alias: args.caller.key_alias.clone(),
            },
            interaction: self.interaction,
            model: self.model,
            provider: self.provider,
            route: self.route,
            policies: self.policies,
            confidence: self.confidence,
            escalation_reason: self.escalation_reason,
            latency_ms: t0.elapsed().as_secs_f64() * 1e3,
            usage: self.usage,
            error: result.as_ref().err().map(ToString::to_string),
            request: json!({
                "messages": messages(args, &args.prompt),
                "model": args.model,
                "profile": args.profile,
                "max_tokens": args.max_tokens,
                "temperature": args.temperature,
                "top_p": args.top_p,
                "seed": args.seed,
                "task": args.caller.task.as_ref().map(ToString::to_string),
                "metadata": args.caller.metadata,
            }),
            response: self.response,
        }
    }
}

pub fn run(config: &Config, args: &RunArgs) -> crate::Result<i32> {
    let t0 = Instant::now();
    let audit_log = if config.audit.enabled {
        Some(AuditLog::open(&config.audit)?)
    } else {
        None
    };
    let mut trail = Trail::default();
    let result = route_and_answer(config, args, t0, &mut trail);
    if let Some(log) = audit_log {
        let rec = trail.record(args, &result, t0);
        tracing::debug!(request_id = %rec.request_id, "audit entry");
        log.record(rec);
        match log.shutdown() {
            Ok(s) if s.written == 1 => {}
            Ok(_) => eprintln!(
                "corral: audit log: this request's entry was not written (see the error above)"
            ),
            Err(e) => eprintln!("corral: audit log: {e}"),
        }
    }
    result
}

/// Routes and answers the prompt, noting in `trail` what happened.
fn route_and_answer(
    config: &Config,
    args: &RunArgs,
    t0: Instant,
    trail: &mut Trail,
) -> crate::Result<i32> {
    let ctx = args.caller.context(&args.prompt, args.model.as_deref())?;
    let d = config.routing.decide(&ctx);
    trail.decided(&d);
    let method = config.routing.method;
    match &d.selection {
        Selection::Deny { reason } => {
            trail.interaction = Interaction::RouteDenied;
            trail.response = json!({"denied": reason, "reasoning": d.reasoning});
            if args.json {
                println!(
                    "{}",
                    json!({"route": route_json(&d), "denied": reason, "reasoning": d.reasoning})
                );
            }
            eprintln!("corral: refused by policy: {reason}");
            Ok(EXIT_DENIED)
        }
        Selection::Llm { providers } => {
            let r = call_chain(config, providers, args, &d)?;
            trail.llm(config, &r);
            print_llm(config, args, &d, &r, None, None, t0);
            Ok(0)
        }
        Selection::Slm {
            model: decided,
            profile,
        } => {
            let model = args.model.clone().unwrap_or_else(|| decided.clone());
            trail.model = Some(model.clone());
            config
                .routing
                .allowed(args.caller.agent.as_deref(), &model)
                .map_err(crate::Error::Usage)?;
            // --model may name another model than routing chose: then its own profile applies.
            let profile = match &args.profile {
                Some(p) => p.clone(),
                None if model != *decided => config.routing.profile_for(&model),
                None => profile.clone(),
            };
            let need = d.confidence_required.unwrap_or(0.0);
            let escalate_low =
                d.fallback_available && config.routing.on_low_confidence && need > 0.0;
            // Held back (not streamed) while it may still be replaced.
            let may_escalate =
                escalate_low || (d.fallback_available && config.routing.audit_rate > 0.0);
            let answer = match run_slm(config, args, &model, &profile, !args.json && !may_escalate)
            {
                Ok(a) => a,
                Err(e) if d.fallback_available && config.routing.on_slm_failure => {
                    let why = format!("the SLM failed: {e}");
                    eprintln!("corral: {why}; escalating");
                    // The runner's error text goes in the encrypted payload, not the metadata.
                    trail.escalating(
                        "the SLM failed",
                        json!({"model": model, "profile": profile, "error": e.to_string()}),
                        None,
                    );
                    let r = call_chain(config, &config.routing.fallback, args, &d)?;
                    trail.llm(config, &r);
                    print_llm(config, args, &d, &r, Some(&why), None, t0);
                    return Ok(0);
                }
                Err(e) => return Err(e),
            };
            let low = answer.score.is_none_or(|s| s < f64::from(need));
            let audit = !low && d.fallback_available && config.routing.audit_draw();
            if (escalate_low && low) || audit {
                let why = if audit {
                    "audit sample (routing.confidence_thresholds.audit_rate)".to_string()
                } else {
                    format!(
                        "confidence {} < {need} ({})",
                        answer.score.map_or("n/a".into(), |s| format!("{s:.3}")),
                        method.name()
                    )
                };
                let slm = slm_json(&answer, &model, &profile, method.name());
                trail.escalating(&why, slm.clone(), answer.score);
                let r = call_chain(config, &config.routing.fallback, args, &d)?;
                trail.llm(config, &r);
                print_llm(config, args, &d, &r, Some(&why), Some(slm), t0);
                return Ok(0);
            }
            // Say how the answer stands against its threshold (with no chain to escalate to, a low
            // score is reported, not hidden).
            let verdict = if !low || need <= 0.0 {
                format!("accepted (threshold {need})")
            } else if !d.fallback_available {
                format!("below the threshold {need}; no fallback providers to escalate to")
            } else {
                format!("below the threshold {need}; escalation is off (routing.llm_fallback.on_low_confidence)")
            };
            trail.confidence = answer.score;
            trail.usage = Some(TokenUsage {
                prompt_tokens: answer.done.prompt_tokens,
                completion_tokens: answer.done.completion_tokens,
            });
            trail.response = slm_json(&answer, &model, &profile, method.name());
            trail.response["below_threshold"] = json!(low && need > 0.0);
            if args.json {
                let mut v = slm_json(&answer, &model, &profile, method.name());
                v["below_threshold"] = json!(low && need > 0.0);
                v["route"] = route_json(&d);
                v["escalated"] = json!(false);
                v["timings"]["total_ms"] = json!(t0.elapsed().as_secs_f64() * 1e3);
                println!("{v}");
            } else {
                if may_escalate {
                    println!("{}", terminal_safe(&answer.text));
                }
                eprintln!(
                    "corral: {model} · profile {profile} · {} prompt + {} tokens · load {:.0} ms · ttft {:.0} ms · {:.1} tok/s · confidence {} ({}) · {}",
                    answer.done.prompt_tokens,
                    answer.done.completion_tokens,
                    answer.ready.load_ms,
                    answer.done.ttft_ms,
                    answer.done.decode_tokens_per_s,
                    answer.score.map_or("n/a".to_string(), |s| format!("{s:.3}")),
                    method.name(),
                    verdict,
                );
            }
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_characters_do_not_reach_the_terminal() {
        assert_eq!(
            super::terminal_safe("a\x1b]52;c;aGk=\x07b\n\tc\u{9b}"),
            "a\u{fffd}]52;c;aGk=\u{fffd}b\n\tc\u{fffd}"
        );
    }
}
