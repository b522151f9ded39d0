//! `/v1/models`, `/v1/route`, `/healthz`, `/readyz`, `/metrics`.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State as AxState;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{body_of, request_id, with_id, St};
use crate::answer::{self, Request};
use crate::audit::Caller;
use crate::server::error::ApiError;
use crate::server::openai::{self, ChatRequest};

pub async fn list_models(AxState(state): St, headers: HeaderMap) -> Response {
    let live = state.live();
    let rid = request_id();
    let (ident, _slot) = match live.keys.authenticate(&headers) {
        Ok(x) => x,
        Err(e) => return with_id(e.into_response(), &rid),
    };
    let mut data =
        vec![json!({"id": "auto", "object": "model", "created": 0, "owned_by": "corral"})];
    // Catalog models, each provider's named models (`PROVIDER/MODEL`) and aliases: what this
    // caller's allow list permits. Patterns (`models = ["gpt-4o*"]`, alias `gpt-*`) cannot be
    // listed; they answer all the same.
    let routing = &live.config.routing;
    for id in routing.model_names() {
        let named = routing.resolve(&id);
        // An alias of `auto` is as open as `auto` (the allow list applies to what routing picks).
        let auto = named == crate::routing::Named::Auto;
        if auto || routing.allowed(ident.agent.as_deref(), &id).is_ok() {
            let owner = match named {
                crate::routing::Named::Remote { provider, .. } => provider,
                _ => "corral".to_string(),
            };
            data.push(json!({"id": id, "object": "model", "created": 0, "owned_by": owner}));
        }
    }
    with_id(
        Json(json!({"object": "list", "data": data})).into_response(),
        &rid,
    )
}

/// `POST /v1/route`: the decision for a chat or completion body, with the full trace, without
/// running anything.
pub async fn route(
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
        let mut req = Request::chat(rid.clone(), messages);
        req.model = model;
        if let Some(t) = metadata.get("task") {
            req.task = Some(t.parse().map_err(|e| {
                ApiError::invalid(format!("metadata.task: {e}"), Some("metadata.task"))
            })?);
        }
        req.metadata = metadata;
        // What the request needs of a model (tools, structured output) routes it too.
        req.tools = v.get("tools").filter(|t| !t.is_null()).cloned();
        req.response_format = v
            .get("response_format")
            .filter(|r| {
                r.get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| t != "text")
            })
            .cloned();
        let caller = Caller {
            agent: ident.agent.clone(),
            team: ident.team.clone(),
            key_alias: ident.key_alias.clone(),
        };
        let router = &live.config.routing;
        answer::check_model(router, &caller, &req).map_err(|f| super::generate::api_error(&f))?;
        let d = router.explain(&req.context(&caller));
        Ok(Json(json!({"request_id": rid, "decision": d})).into_response())
    })();
    with_id(r.unwrap_or_else(IntoResponse::into_response), &rid)
}

pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready when every warm pool has all its runners loaded, and not draining.
pub async fn readyz(AxState(state): St) -> Response {
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

pub async fn metrics(AxState(state): St) -> Response {
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
