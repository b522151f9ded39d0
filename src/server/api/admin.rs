//! The admin endpoints (the admin key): reload, feedback, the confidence monitor, runtime
//! allow lists.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State as AxState};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{body_of, St};
use crate::confidence::calibrator;
use crate::server::error::ApiError;
use crate::server::openai;

pub async fn reload(AxState(state): St, headers: HeaderMap) -> Response {
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
pub async fn feedback(
    AxState(state): St,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let live = state.live();
    let r = (|| {
        live.keys.admin(&headers)?;
        let body = body_of(body, live.config.server.max_request_body_bytes)?;
        let f: Feedback = openai::parse(&body)?;
        crate::server::lock(&state.monitor)
            .feedback(&f.request_id, f.actual_quality, 0.5)
            .map_err(|e| ApiError::invalid(e.to_string(), Some("request_id")))?;
        Ok::<_, ApiError>(Json(json!({"recorded": true})).into_response())
    })();
    r.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Debug, Deserialize)]
pub struct MonitorQuery {
    target: Option<f64>,
    min_accepted: Option<usize>,
}

/// `GET /admin/monitor[?target=0.9&min_accepted=30]`: per (model, task) counts, confidence
/// histogram and escalation rate, and the thresholds calibration would pick from the feedback.
pub async fn monitor(
    AxState(state): St,
    headers: HeaderMap,
    Query(q): Query<MonitorQuery>,
) -> Response {
    if let Err(e) = state.live().keys.admin(&headers) {
        return e.into_response();
    }
    let m = crate::server::lock(&state.monitor);
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
    // The labelled answers, copied out: measuring them does not hold the monitor.
    let labelled: Vec<(String, Vec<calibrator::Labelled>)> = m
        .labelled_models()
        .map(|model| (model.to_string(), m.labelled(model).to_vec()))
        .collect();
    drop(m);
    // The calibrator in force, measured on the answers feedback labelled.
    let calibrators = state.live().config.slm.calibrators.clone();
    let quality: Vec<Value> = labelled
        .iter()
        .map(|(model, data)| {
            let current = calibrators.get(model);
            let q = current.as_ref().map(|c| {
                let p: Vec<f64> = data
                    .iter()
                    .map(|s| c.predict_values(&s.features, &s.task))
                    .collect();
                let labels: Vec<bool> = data.iter().map(|s| s.correct).collect();
                calibrator::quality(&p, &labels)
            });
            json!({
                "model": model, "labelled": data.len(),
                "in_force": current.as_ref().map(|c| json!({"fitted_on": c.fitted_on, "items": c.items})),
                "quality": q,
                "refit_possible": data.len() >= MIN_REFIT,
            })
        })
        .collect();
    let spend = *crate::server::lock(&state.spend);
    Json(json!({
        "stats": stats,
        "calibration": {"target_accuracy": target, "by_task": cal},
        "calibrators": quality,
        "spend": {"remote_usd": spend.remote_usd, "avoided_usd": spend.avoided_usd},
    }))
    .into_response()
}

/// Labelled answers a refit needs at least.
const MIN_REFIT: usize = 30;
/// A refit is fitted on the most recent this many labelled answers (a bounded cost: each
/// refit fits a few hundred times for its penalty and its cross-validation).
const MAX_REFIT: usize = 5_000;
/// One refit at a time.
static REFITTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Refit {
    model: String,
    /// Put the refit in force (until the next reload or restart).
    #[serde(default)]
    apply: bool,
}

/// `POST /admin/calibrator {"model", "apply"}`: refits `model`'s confidence calibrator on the
/// answers `/admin/feedback` labelled, with the evaluation's fitting code; returns it (to store
/// beside the model's catalog entry), its cross-validated quality on that feedback and the
/// quality of the calibrator in force on the same answers. `apply: true` puts it in force.
pub async fn refit(
    AxState(state): St,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let live = state.live();
    let parsed = (|| {
        live.keys.admin(&headers)?;
        let body = body_of(body, live.config.server.max_request_body_bytes)?;
        let r: Refit = openai::parse(&body)?;
        let data = {
            let m = crate::server::lock(&state.monitor);
            let all = m.labelled(&r.model);
            all[all.len().saturating_sub(MAX_REFIT)..].to_vec()
        };
        let correct = data.iter().filter(|s| s.correct).count();
        if data.len() < MIN_REFIT || correct == 0 || correct == data.len() {
            return Err(ApiError::invalid(
                format!(
                    "refitting '{}' needs at least {MIN_REFIT} labelled answers, correct and wrong ones both; feedback has labelled {} ({correct} correct)",
                    r.model,
                    data.len()
                ),
                Some("model"),
            ));
        }
        Ok::<_, ApiError>((r, data))
    })();
    let (r, data) = match parsed {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    if REFITTING.swap(true, std::sync::atomic::Ordering::AcqRel) {
        return ApiError::rate_limited("a calibrator refit is already running", 5).into_response();
    }
    let current = live.config.slm.calibrators.get(&r.model);
    let model = r.model.clone();
    let fitted = tokio::task::spawn_blocking(move || {
        /// Lets the next refit start however this one ends.
        struct Done;
        impl Drop for Done {
            fn drop(&mut self) {
                REFITTING.store(false, std::sync::atomic::Ordering::Release);
            }
        }
        let _done = Done;
        let labels: Vec<bool> = data.iter().map(|s| s.correct).collect();
        let in_force = current.map(|c| {
            let p: Vec<f64> = data
                .iter()
                .map(|s| c.predict_values(&s.features, &s.task))
                .collect();
            calibrator::quality(&p, &labels)
        });
        let fitted_on = format!("feedback: {} labelled answers", data.len());
        let c = calibrator::Calibrator::fit(&model, &data, &fitted_on);
        let cv = calibrator::cross_validated(&model, &data);
        (c, cv, in_force)
    })
    .await;
    let (Some(c), cv, in_force) = (match fitted {
        Ok(x) => x,
        Err(e) => return ApiError::internal(format!("refit task: {e}")).into_response(),
    }) else {
        return ApiError::invalid("the feedback could not be fitted", Some("model"))
            .into_response();
    };
    if r.apply {
        // The configuration in force now (a reload during the fit replaced `live`).
        state.live().config.slm.calibrators.set(&r.model, c.clone());
        tracing::info!(model = %r.model, items = c.items, "calibrator refitted from feedback is in force");
    }
    Json(json!({
        "model": r.model,
        "labelled": c.items,
        "calibrator": c,
        "cross_validated": cv,
        "in_force": in_force,
        "applied": r.apply,
    }))
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
pub async fn allow_list(
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
