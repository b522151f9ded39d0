//! The audit record of one request, and the JSON shapes of what the SLM did that both the
//! record and `corral run --json` use.

use std::time::Duration;

use serde_json::{json, Value};

use super::{Answer, Escalation, Failure, Request, SlmRun};
use crate::audit::{AuditRecord, Caller, Interaction, Route, TokenUsage};
use crate::confidence::Method;
use crate::routing::{RouteDecision, Selection};

/// What the local model did: its text, scores, usage, timings and runner, or its error.
pub fn slm_json(run: &SlmRun, method: Method) -> Value {
    let done = run.done.as_deref();
    let ready = run.ready.as_deref();
    let scores: serde_json::Map<String, Value> = run
        .scores
        .iter()
        .map(|(m, s)| (m.name().to_string(), json!(s)))
        .collect();
    let mut v = json!({
        "text": run.text(),
        "model": run.model,
        "profile": run.profile,
        "confidence": {"score": run.score, "method": run.method.unwrap_or(method).name(), "scores": scores},
        "usage": done.map(|d| json!({"prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens})),
        "timings": {
            "load_ms": ready.map(|r| r.load_ms),
            "prefill_ms": done.map(|d| d.prefill_ms),
            "ttft_ms": done.map(|d| d.ttft_ms),
            "decode_tokens_per_s": done.map(|d| d.decode_tokens_per_s),
            "local_ms": run.time.as_secs_f64() * 1e3,
        },
        "finish_reason": done.map(|d| d.finish_reason),
        "runner": {
            "architecture": ready.map(|r| r.architecture.as_str()),
            "quantization": ready.map(|r| r.quantization.as_str()),
            "threads": ready.map(|r| r.threads),
            "kernels": ready.map(|r| r.kernels.as_str()),
            "device": ready.map(|r| r.device.as_str()),
        },
    });
    if let Some(calls) = done.map(|d| &d.tool_calls).filter(|c| !c.is_empty()) {
        v["tool_calls"] = json!(calls);
    }
    if let Some(e) = &run.error {
        v["error"] = json!(e);
    }
    v
}

/// The request as the model saw it (encrypted in the log).
fn request_json(req: &Request) -> Value {
    json!({
        "endpoint": req.endpoint.label(),
        "model": req.model,
        "profile": req.profile,
        "messages": req.messages,
        "tools": req.tools,
        "tool_choice": req.tool_choice,
        "response_format": req.response_format,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "seed": req.seed,
        "stop": req.stop,
        "task": req.task.as_ref().map(ToString::to_string),
        "metadata": req.metadata,
        "user": req.user,
        "stream": req.stream,
    })
}

fn answer_json(a: &Answer) -> Value {
    let mut v = json!({
        "text": a.text,
        "tool_calls": a.tool_calls,
        "finish_reason": a.finish_reason,
        "model": a.model,
        "provider": a.provider,
        "profile": a.profile,
        "confidence": a.confidence,
        "threshold": a.threshold,
        "below_threshold": a.below_threshold,
        "field_confidence": a.field_confidence,
    });
    if let Some(l) = &a.llm {
        v["latency_ms"] = json!(l.latency_ms);
        v["attempts"] = json!(l.attempts);
    }
    v
}

/// One audit entry for a request: answered, escalated, refused or failed. For an escalation the
/// entry's confidence is the SLM's (it is why the request escalated) and what the SLM said goes
/// in the encrypted response under `slm`; a runner's error text goes only in the encrypted
/// payload, never in the metadata.
pub fn audit_record(
    caller: &Caller,
    req: &Request,
    d: Option<&RouteDecision>,
    result: &Result<Answer, Failure>,
    slm: Option<&SlmRun>,
    method: Method,
    elapsed: Duration,
) -> AuditRecord {
    let answer = result.as_ref().ok();
    // Replaced, or being replaced when the chain failed.
    let escalation = answer
        .and_then(|a| a.escalation.as_ref())
        .or_else(|| slm.and_then(|r| r.escalation.as_ref()));
    let escalated = escalation.is_some();
    // What the SLM did, when it is not the answer itself: replaced, or failed.
    let slm = match answer {
        Some(a) if escalated => a.slm.as_ref(),
        _ => slm,
    };
    let interaction = match (d.map(|d| &d.selection), answer) {
        (Some(Selection::Deny { .. }), _) => Interaction::RouteDenied,
        _ if escalated => Interaction::Escalation,
        _ => match req.endpoint {
            super::Endpoint::Chat => Interaction::Chat,
            super::Endpoint::Completion => Interaction::Completion,
        },
    };
    let route = d.map(|d| match d.selection {
        Selection::Slm { .. } => Route::Slm,
        Selection::Llm { .. } => Route::Llm,
        Selection::Deny { .. } => Route::Deny,
    });
    let mut response = match (answer, d.map(|d| &d.selection)) {
        (Some(a), _) => answer_json(a),
        (None, Some(Selection::Deny { reason })) => {
            json!({"denied": reason, "reasoning": d.map(|d| &d.reasoning)})
        }
        _ => json!({}),
    };
    if let Some(run) = slm {
        response["slm"] = slm_json(run, method);
    }
    if let Err(f) = result {
        response["error"] = json!(f.to_string());
    }
    let model = answer
        .map(|a| a.model.clone())
        .or_else(|| match d.map(|d| &d.selection) {
            Some(Selection::Slm { model, .. }) => Some(model.clone()),
            // A remote model the caller named (the resolved one, not an alias of it).
            Some(Selection::Llm { model: Some(m), .. }) => Some(m.clone()),
            _ => (!req.auto()).then(|| req.model.clone()),
        });
    // Without an answer, the provider a named remote model was sent to.
    let named_provider = match d.map(|d| &d.selection) {
        Some(Selection::Llm {
            providers,
            model: Some(_),
        }) => providers.first().cloned(),
        _ => None,
    };
    AuditRecord {
        request_id: req.id.clone(),
        caller: caller.clone(),
        interaction,
        model,
        provider: answer.and_then(|a| a.provider.clone()).or(named_provider),
        route,
        policies: d.map(|d| d.policies_applied.clone()).unwrap_or_default(),
        confidence: match (answer, slm) {
            (Some(a), Some(run)) if a.escalation.is_some() => run.score,
            (Some(a), _) => a.confidence,
            // An escalation whose chain failed: the SLM's, as for one that succeeded.
            (None, Some(run)) if escalated => run.score,
            _ => None,
        },
        escalation_reason: escalation.map(Escalation::summary),
        latency_ms: elapsed.as_secs_f64() * 1e3,
        usage: answer.map(|a| TokenUsage {
            prompt_tokens: a.prompt_tokens,
            completion_tokens: a.completion_tokens,
        }),
        error: result.as_ref().err().map(ToString::to_string),
        request: request_json(req),
        response,
    }
}
