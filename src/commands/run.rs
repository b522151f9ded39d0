//! `corral run`: answer one prompt through the answer pipeline ([`crate::answer`], the same one
//! `corral serve` uses): a local model in its sandbox (streamed to the terminal), escalated to
//! the remote chain when its confidence is below the threshold, straight to the chain when a
//! policy requires it, or refused. This file only builds the request, gives the pipeline one
//! sandboxed runner per attempt ([`OneRunner`]) and prints the outcome.
//!
//! Streaming and escalation: when an SLM answer may still be escalated (a fallback chain exists
//! and `routing.llm_fallback.on_low_confidence` is on, or an audit rate), the answer is held
//! until its score is known, so the terminal never shows an answer that is then replaced;
//! otherwise it streams.
//!
//! With `audit.enabled`, each run writes one audit entry (answers, escalations, refusals and
//! failures alike); the log is opened before anything else, so a request whose entry could not be
//! written (a missing or loose key file) is not served.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use corral_protocol::GenerateRequest;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::answer::record::slm_json;
use crate::answer::remote::Providers;
use crate::answer::{
    Answer, Failure, LocalModel, Outcome, Pipeline, Request, Source, SubmitError, Update,
};
use crate::audit::{self, AuditLog, Caller};
use crate::commands::route::CallerArgs;
use crate::config::Config;
use crate::pool::Event;
use crate::profile::ProfileRegistry;
use crate::routing::RouteDecision;
use crate::sandbox::{HostSupport, SandboxConfig};
use crate::slm::models;
use crate::slm::runner::Runner;

/// `corral run`'s arguments (also its command-line definition).
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Model id from the catalog, PROVIDER/MODEL of a configured provider, or an alias from
    /// routing.aliases (default: the one routing picks, normally smollm2-135m-instruct); still
    /// subject to the caller's allow list
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
    /// A JSON file with OpenAI `tools` (an array of function tools) the model may call; each
    /// call is printed as one JSON line {"id", "name", "arguments"}. A local model generates
    /// calls under each function's `parameters` schema
    #[arg(long, value_name = "FILE")]
    pub tools: Option<std::path::PathBuf>,
    /// With --tools: none, auto, required, or a function name to force
    #[arg(long, value_name = "CHOICE", requires = "tools")]
    pub tool_choice: Option<String>,
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

/// What the last runner did beyond its answer: its start-up time and what its cgroup saw.
#[derive(Debug, Default)]
pub struct Report {
    startup_ms: f64,
    outcome: Option<crate::sandbox::Outcome>,
}

/// The CLI's local model: one sandboxed runner per attempt, started on its own thread (the
/// runner's parent for its whole life, as `PR_SET_PDEATHSIG` needs) and stopped after its
/// answer.
#[derive(Debug)]
struct OneRunner {
    catalog: crate::catalog::Catalog,
    model_dir: std::path::PathBuf,
    profiles: ProfileRegistry,
    sandbox: SandboxConfig,
    host: HostSupport,
    report: Arc<Mutex<Report>>,
}

impl LocalModel for OneRunner {
    fn submit(
        &self,
        model: &str,
        profile: &str,
        req: GenerateRequest,
    ) -> Result<mpsc::UnboundedReceiver<Event>, SubmitError> {
        let spec = models::runner_spec(&self.catalog, &self.model_dir, model)
            .map_err(|e| SubmitError::Unavailable(e.to_string()))?;
        let profile = self
            .profiles
            .resolve(profile)
            .map_err(|e| SubmitError::Unavailable(e.to_string()))?;
        let (sandbox, host, report) =
            (self.sandbox.clone(), self.host.clone(), self.report.clone());
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("corral-runner".into())
            .spawn(move || {
                let mut runner = match Runner::start(&spec, &profile, &sandbox, &host) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(crate::pool::failed(&e, true));
                        return;
                    }
                };
                let result = runner.generate_until(
                    req,
                    &mut |t| {
                        let _ = tx.send(Event::Token(t.clone()));
                    },
                    &|| tx.is_closed(),
                );
                let ready = runner.ready.clone();
                let startup_ms = runner.startup.as_secs_f64() * 1e3;
                let outcome = runner.shutdown();
                *report
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Report {
                    startup_ms,
                    outcome,
                };
                let _ = tx.send(match result {
                    Ok(done) => Event::Done(Box::new(done), Box::new(ready)),
                    Err(e) => crate::pool::failed(&e, false),
                });
            })
            .map_err(|e| SubmitError::Unavailable(format!("starting the runner thread: {e}")))?;
        Ok(rx)
    }
}

/// The pipeline's request for `args`.
fn request(args: &RunArgs) -> crate::Result<Request> {
    let mut messages = Vec::new();
    if let Some(s) = &args.system {
        messages.push(("system".to_string(), s.clone()));
    }
    messages.push(("user".to_string(), args.prompt.clone()));
    let mut req = Request::chat(audit::new_id(), messages);
    if let Some(m) = &args.model {
        req.model = m.clone();
    }
    req.profile = args.profile.clone();
    req.max_tokens = args.max_tokens;
    req.temperature = args.temperature;
    req.top_p = args.top_p;
    req.seed = args.seed;
    req.stream = !args.json;
    req.user = args.caller.agent.clone();
    req.task = args.caller.task.clone();
    req.metadata = args.caller.context("", None)?.metadata;
    req.ignore_eos = args.ignore_eos;
    if let Some(path) = &args.tools {
        let text = crate::files::read_text(path, crate::files::MAX_CONFIG_BYTES)
            .map_err(|e| crate::Error::Usage(format!("--tools {}: {e}", path.display())))?;
        let tools: Value = serde_json::from_str(&text)
            .map_err(|e| crate::Error::Usage(format!("--tools {}: {e}", path.display())))?;
        let names: Vec<&str> = tools
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str))
            .collect();
        if names.is_empty() || tools.as_array().is_some_and(|a| a.len() != names.len()) {
            return Err(crate::Error::Usage(format!(
                "--tools {}: expected an array of {{\"type\": \"function\", \"function\": {{\"name\", \"parameters\"}}}}",
                path.display()
            )));
        }
        req.tool_choice = match args.tool_choice.as_deref() {
            None => None,
            Some(c @ ("none" | "auto" | "required")) => Some(json!(c)),
            Some(name) if names.contains(&name) => {
                Some(json!({"type": "function", "function": {"name": name}}))
            }
            Some(other) => {
                return Err(crate::Error::Usage(format!(
                    "--tool-choice {other}: not none, auto, required or a tool's name ({})",
                    names.join(", ")
                )))
            }
        };
        req.tools = Some(tools);
    }
    Ok(req)
}

fn route_json(d: &RouteDecision) -> Value {
    json!({
        "selection": d.selection,
        "task": d.task.task,
        "complexity": d.task.complexity,
        "policies_applied": d.policies_applied,
        "confidence_required": d.confidence_required,
        "fallback_available": d.fallback_available,
    })
}

pub fn run(config: &Config, args: &RunArgs) -> crate::Result<i32> {
    let report = Arc::new(Mutex::new(Report::default()));
    let local = Arc::new(OneRunner {
        catalog: config.slm.models.clone(),
        model_dir: config.slm.model_dir.clone(),
        profiles: config.profiles.clone(),
        sandbox: config.sandbox.clone(),
        host: HostSupport::probe_for(&config.sandbox),
        report: report.clone(),
    });
    run_with(config, args, local, &report, &mut std::io::stdout())
}

/// [`run`] with its local model given (tests: a scripted one) and its answer written to `out`.
pub fn run_with(
    config: &Config,
    args: &RunArgs,
    local: Arc<dyn LocalModel>,
    report: &Mutex<Report>,
    out: &mut dyn Write,
) -> crate::Result<i32> {
    let t0 = Instant::now();
    let audit_log = if config.audit.enabled {
        Some(AuditLog::open(&config.audit)?)
    } else {
        None
    };
    let req = request(args)?;
    let caller = Caller {
        agent: args.caller.agent.clone(),
        team: args.caller.team.clone(),
        key_alias: args.caller.key_alias.clone(),
    };
    let pipeline = Pipeline {
        router: config.routing.clone(),
        local,
        remote: Arc::new(Providers::from_config(&config.providers)),
        audit: audit_log.is_some(),
        prefix_cache: Default::default(),
        calibrators: config.slm.calibrators.clone(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let span = tracing::info_span!(
        "request",
        request_id = %req.id,
        caller = args.caller.agent.as_deref().unwrap_or("-"),
        model = %req.model,
    );
    let (outcome, streamed) = rt.block_on(tracing::Instrument::instrument(
        async {
            let (tx, mut updates) = mpsc::channel(64);
            let answering = async move { pipeline.answer(&caller, &req, Some(&tx)).await };
            let printing = async {
                // Tokens of an answer nothing can replace any more, as they come.
                let mut streamed = String::new();
                while let Some(u) = updates.recv().await {
                    let text = match &u {
                        Update::Token(t) => &t.text,
                        Update::Piece(crate::providers::Delta::Text { text, .. }) => text,
                        _ => continue,
                    };
                    streamed.push_str(text);
                    let _ = out.write_all(terminal_safe(text).as_bytes());
                    let _ = out.flush();
                }
                streamed
            };
            tokio::join!(answering, printing)
        },
        span,
    ));
    let Outcome {
        decision,
        result,
        streamed: live,
        audit: record,
        ..
    } = outcome;
    if let Some((log, record)) = audit_log.zip(record) {
        tracing::debug!(request_id = %record.request_id, "audit entry");
        log.record(record);
        match log.shutdown() {
            Ok(s) if s.written == 1 => {}
            Ok(_) => eprintln!(
                "corral: audit log: this request's entry was not written (see the error above)"
            ),
            Err(e) => eprintln!("corral: audit log: {e}"),
        }
    }
    let report = std::mem::take(
        &mut *report
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    if let Some(o) = &report.outcome {
        for l in &o.limits {
            eprintln!("corral: {}", l.message());
        }
    }
    match (result, decision) {
        (Ok(a), Some(d)) if a.source == Source::Slm => {
            let streamed = live.then_some(streamed.as_str());
            print_slm(out, args, &a, &d, streamed, &report, t0);
            Ok(0)
        }
        (Ok(a), Some(d)) => {
            print_llm(out, args, &a, &d, live.then_some(streamed.as_str()), t0);
            Ok(0)
        }
        (Err(Failure::Denied { reason }), Some(d)) => {
            if args.json {
                let _ = writeln!(
                    out,
                    "{}",
                    json!({"route": route_json(&d), "denied": reason, "reasoning": d.reasoning})
                );
            }
            eprintln!("corral: refused by policy: {reason}");
            Ok(EXIT_DENIED)
        }
        (Err(f), _) => Err(crate::Error::Answer(f)),
        (Ok(_), None) => Err(crate::Error::Usage("an answer without a decision".into())),
    }
}

/// Prints a local answer: the rest of a streamed one (text held back for stop sequences
/// arrives with the final frame), or all of a held one, and a summary line; or `--json`.
fn print_slm(
    out: &mut dyn Write,
    args: &RunArgs,
    a: &Answer,
    d: &RouteDecision,
    streamed: Option<&str>,
    report: &Report,
    t0: Instant,
) {
    let Some(run) = &a.slm else { return };
    let need = a.threshold.unwrap_or(0.0);
    if args.json {
        let mut v = slm_json(run, a.method);
        v["below_threshold"] = json!(a.below_threshold);
        v["finish_reason"] = json!(a.finish_reason);
        v["tool_calls"] = json!(a.tool_calls);
        v["route"] = route_json(d);
        v["escalated"] = json!(false);
        v["timings"]["startup_ms"] = json!(report.startup_ms);
        v["timings"]["total_ms"] = json!(t0.elapsed().as_secs_f64() * 1e3);
        let o = report.outcome.as_ref();
        v["runner"]["memory_peak_mb"] = json!(o
            .and_then(|o| o.stats.memory_peak_bytes)
            .map(|b| b / (1024 * 1024)));
        v["runner"]["cpu_ms"] = json!(o.and_then(|o| o.stats.cpu_usage_ns).map(|n| n / 1_000_000));
        let _ = writeln!(out, "{v}");
        return;
    }
    let shown = match streamed {
        Some(s) => a.text.get(s.len()..).unwrap_or_default(),
        None => &a.text,
    };
    if !shown.is_empty() || a.tool_calls.is_none() {
        let _ = writeln!(out, "{}", terminal_safe(shown));
    }
    print_calls(out, a);
    // How the answer stands against its threshold (with no chain to escalate to, a low score
    // is reported, not hidden).
    let verdict = if !a.below_threshold {
        format!("accepted (threshold {need})")
    } else if !d.fallback_available {
        format!("below the threshold {need}; no fallback providers to escalate to")
    } else if streamed.is_some() {
        format!("below the threshold {need}; the answer had already streamed (the policy's streaming = \"stream\")")
    } else {
        format!("below the threshold {need}; escalation is off (routing.llm_fallback.on_low_confidence)")
    };
    let (load_ms, ttft_ms, tps) = (
        run.ready.as_ref().map_or(0.0, |r| r.load_ms),
        run.done.as_ref().map_or(0.0, |d| d.ttft_ms),
        run.done.as_ref().map_or(0.0, |d| d.decode_tokens_per_s),
    );
    eprintln!(
        "corral: {} · profile {} · {} prompt + {} tokens · load {load_ms:.0} ms · ttft {ttft_ms:.0} ms · {tps:.1} tok/s · confidence {} ({}) · {}",
        a.model,
        run.profile,
        a.prompt_tokens,
        a.completion_tokens,
        a.confidence.map_or("n/a".to_string(), |s| format!("{s:.3}")),
        a.method.name(),
        verdict,
    );
}

/// The answer's calls, one per line, as JSON: {"id", "name", "arguments"} (arguments parsed
/// when they are JSON).
fn print_calls(out: &mut dyn Write, a: &Answer) {
    for c in a
        .tool_calls
        .as_ref()
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let args = c
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or("");
        let parsed: Value = serde_json::from_str(args).unwrap_or_else(|_| json!(args));
        let line =
            json!({"id": c.get("id"), "name": c.pointer("/function/name"), "arguments": parsed});
        let _ = writeln!(out, "{}", terminal_safe(&line.to_string()));
    }
}

/// Prints a remote answer: the rest of a streamed one (`streamed`: what went out as it
/// arrived), or all of it, and a summary line; or `--json`.
fn print_llm(
    out: &mut dyn Write,
    args: &RunArgs,
    a: &Answer,
    d: &RouteDecision,
    streamed: Option<&str>,
    t0: Instant,
) {
    let reason = a.escalation.as_ref().map(|e| e.reason());
    let (latency_ms, attempts) = a
        .llm
        .as_ref()
        .map_or((0.0, 0), |l| (l.latency_ms, l.attempts));
    if args.json {
        let _ = writeln!(
            out,
            "{}",
            json!({
                "text": a.text,
                "model": a.model,
                "provider": a.provider,
                "route": route_json(d),
                "escalated": a.escalation.is_some(),
                "escalation_reason": reason,
                "confidence": {"score": a.confidence, "method": a.method.name()},
                "usage": {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens},
                "timings": {"latency_ms": latency_ms, "total_ms": t0.elapsed().as_secs_f64() * 1e3},
                "attempts": attempts,
                "finish_reason": a.finish_reason,
                "tool_calls": a.tool_calls,
                "slm": a.slm.as_ref().map(|run| slm_json(run, a.method)),
            })
        );
    } else {
        let shown = match streamed {
            Some(s) => a.text.get(s.len()..).unwrap_or_default(),
            None => &a.text,
        };
        if !shown.is_empty() || a.tool_calls.is_none() {
            let _ = writeln!(out, "{}", terminal_safe(shown));
        }
        print_calls(out, a);
        eprintln!(
            "corral: llm {} ({}){} · {} prompt + {} tokens · {latency_ms:.0} ms · {attempts} attempt(s) · confidence {}",
            a.provider.as_deref().unwrap_or("?"),
            a.model,
            reason.map_or(String::new(), |e| format!(" · escalated: {e}")),
            a.prompt_tokens,
            a.completion_tokens,
            a.confidence.map_or("n/a".to_string(), |s| format!("{s:.3}")),
        );
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
