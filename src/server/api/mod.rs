//! The HTTP front end. Handlers authenticate, parse, call the answer pipeline
//! ([`crate::answer`]) or a small local function, and frame the result in OpenAI's format:
//! - `generate.rs`: `/v1/chat/completions` and `/v1/completions` (JSON or server-sent events);
//! - `shape.rs`: the OpenAI response, chunk and log-probability shapes, `x-corral-*` headers;
//! - `info.rs`: `/v1/models`, `/v1/route`, `/healthz`, `/readyz`, `/metrics`;
//! - `admin.rs`: `/admin/reload`, `/admin/feedback`, `/admin/monitor`, `/admin/calibrator`,
//!   `/admin/allow_lists`.
//!
//! Every request gets an id (`x-request-id`) and one `tracing` span carrying it, the caller,
//! the model asked for and the route taken.

mod admin;
mod anthropic;
mod generate;
mod info;
mod shape;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State as AxState};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use super::error::ApiError;
use super::State;

type St = AxState<Arc<State>>;

/// The router; `serve` binds it, tests call it directly.
pub fn app(state: Arc<State>) -> Router {
    let limit = state.live().config.server.max_request_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(generate::chat))
        .route("/v1/completions", post(generate::completions))
        .route("/v1/messages", post(generate::messages))
        .route("/v1/models", get(info::list_models))
        .route("/v1/route", post(info::route))
        .route("/healthz", get(info::healthz))
        .route("/readyz", get(info::readyz))
        .route("/metrics", get(info::metrics))
        .route("/admin/reload", post(admin::reload))
        .route("/admin/feedback", post(admin::feedback))
        .route("/admin/monitor", get(admin::monitor))
        .route("/admin/calibrator", post(admin::refit))
        .route("/admin/allow_lists", post(admin::allow_list))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(
            usize::try_from(limit).unwrap_or(usize::MAX),
        ))
        .with_state(state)
}

fn request_id() -> String {
    crate::answer::random_id()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn with_id(mut r: Response, rid: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(rid) {
        r.headers_mut().insert("x-request-id", v);
    }
    r
}

fn body_of(body: Result<Bytes, BytesRejection>, limit: u64) -> Result<Bytes, ApiError> {
    match body {
        Ok(b) if b.len() as u64 > limit => Err(ApiError::too_large(limit)),
        Ok(b) => Ok(b),
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::too_large(limit)),
        Err(e) => Err(ApiError::invalid(e.body_text(), None)),
    }
}

/// What one generation request counted as, for `/metrics`.
struct Counted<'a> {
    endpoint: &'static str,
    route: &'static str,
    model: &'a str,
    /// `ok`, an HTTP status, `stream_error` or `client_gone`.
    outcome: &'a str,
    /// Time in the model or provider, when one ran.
    model_time: Option<Duration>,
}

/// The one place generation requests are counted (`corral_requests_total`, durations, the
/// gateway's own overhead, 429s by cause).
fn count(state: &State, c: &Counted<'_>, rate_limit_cause: Option<&str>, t0: Instant) {
    if let Some(cause) = rate_limit_cause {
        state
            .metrics
            .inc("corral_rate_limited_total", &[("cause", cause)]);
    }
    state.metrics.inc(
        "corral_requests_total",
        &[
            ("endpoint", c.endpoint),
            ("route", c.route),
            ("model", c.model),
            ("outcome", c.outcome),
        ],
    );
    let total = t0.elapsed();
    state.metrics.observe(
        "corral_request_duration_seconds",
        &[("endpoint", c.endpoint), ("route", c.route)],
        total.as_secs_f64(),
    );
    if let Some(m) = c.model_time {
        state.metrics.observe(
            "corral_gateway_overhead_seconds",
            &[("route", c.route)],
            total.saturating_sub(m).as_secs_f64(),
        );
    }
}

/// A request refused before it reached the pipeline, counted; the error written by `render`
/// (the caller's API's format).
fn refused_as(
    state: &State,
    e: ApiError,
    rid: &str,
    endpoint: &'static str,
    t0: Instant,
    render: fn(ApiError) -> Response,
) -> Response {
    let code = e.status.as_u16().to_string();
    let cause = (e.status == StatusCode::TOO_MANY_REQUESTS).then(|| e.code.unwrap_or("queue"));
    count(
        state,
        &Counted {
            endpoint,
            route: "none",
            model: "",
            outcome: &code,
            model_time: None,
        },
        cause,
        t0,
    );
    tracing::info!(request_id = rid, status = %e.status, error = %e.message, "request refused");
    with_id(render(e), rid)
}

async fn not_found() -> Response {
    let mut e = ApiError::invalid("Unknown endpoint", None);
    e.status = StatusCode::NOT_FOUND;
    e.into_response()
}
