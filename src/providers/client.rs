//! [`Provider`]: one configured remote provider and its request loop.

use std::io::Read;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::backoff::{self, Jitter};
use super::breaker::{Admission, Breaker, BreakerState, Transition};
use super::{
    anthropic, error_message, openai, ChatRequest, ChatResponse, Completion, ProviderConfig,
    ProviderError, ProviderKind, Result,
};

/// Largest response body read, in bytes.
const MAX_BODY_BYTES: u64 = 10 * 1024 * 1024;

/// One remote provider: its configuration, an HTTP agent (connections are reused), and its
/// circuit breaker. Shared between threads behind an `Arc`.
#[derive(Debug)]
pub struct Provider {
    name: String,
    config: ProviderConfig,
    agent: ureq::Agent,
    breaker: Mutex<Breaker>,
    /// One breaker per other model callers name (`PROVIDER/MODEL`): a caller asking for a
    /// failing model opens its circuit, not the one the fallback chain relies on.
    named: Mutex<std::collections::HashMap<String, Breaker>>,
    jitter: Jitter,
}

// Callers share one provider between threads.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Provider>();
};

/// A request in its wire format, ready to send (and re-send).
struct Encoded {
    url: String,
    body: String,
    headers: Vec<(&'static str, String)>,
    /// JSON output was asked for (Anthropic answers it through a forced tool).
    json: bool,
}

/// One failed attempt and the wait the provider asked for.
struct Failure {
    error: ProviderError,
    retry_after: Option<Duration>,
}

impl Provider {
    /// A provider named `name` (the `NAME` of `[providers.NAME]`). `cfg` should have passed
    /// [`ProviderConfig::validate`]; nothing is checked or contacted here.
    pub fn new(name: &str, cfg: ProviderConfig) -> Provider {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            // A redirected POST would lose its body; a redirect means a wrong base_url.
            .redirects(0)
            .user_agent(concat!("corral/", env!("CARGO_PKG_VERSION")))
            .build();
        Provider {
            name: name.to_string(),
            breaker: Mutex::new(Breaker::new(
                cfg.breaker_failures,
                Duration::from_millis(cfg.breaker_cooldown_ms),
            )),
            named: Mutex::new(std::collections::HashMap::new()),
            config: cfg,
            agent,
            jitter: Jitter::from_clock(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &ProviderConfig {
        &self.config
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.lock_breaker().state(Instant::now())
    }

    /// Sends `req`, retrying what may succeed on a second try (see [`ProviderError::retryable`])
    /// up to `max_retries` times with backoff. Refused without a request while the circuit is
    /// open; a half-open circuit's trial is a single attempt. The API key is read from the
    /// environment on every call, so a rotated key is picked up.
    pub fn complete(&self, req: &ChatRequest) -> Result<ChatResponse> {
        let key = self.api_key()?;
        let encoded = self.encode(req, key.as_deref())?;
        // The configured model's breaker, or the named model's own.
        let named = req.model.as_deref().filter(|m| *m != self.config.model);
        let admission = self.admit(named)?;
        let started = Instant::now();
        let max_attempts = match admission {
            Admission::Trial => 1,
            Admission::Normal => self.config.max_retries.saturating_add(1),
        };
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self.attempt(&encoded, req.logprobs) {
                Ok(c) => {
                    self.settle(named, admission, true);
                    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
                    tracing::debug!(provider = %self.name, attempt, latency_ms, "provider answered");
                    return Ok(ChatResponse {
                        provider: self.name.clone(),
                        model: c
                            .model
                            .or_else(|| req.model.clone())
                            .unwrap_or_else(|| self.config.model.clone()),
                        text: c.text,
                        finish_reason: c.finish_reason,
                        usage: c.usage,
                        token_logprobs: c.token_logprobs,
                        tool_calls: c.tool_calls,
                        latency_ms,
                        attempts: attempt,
                    });
                }
                Err(f) if f.error.retryable() && attempt < max_attempts => {
                    let wait = backoff::delay(
                        self.config.backoff_ms,
                        attempt - 1,
                        f.retry_after,
                        self.jitter.next(),
                    );
                    tracing::warn!(
                        provider = %self.name,
                        status = f.error.status(),
                        attempt,
                        wait_ms = wait.as_millis() as u64,
                        error = %f.error,
                        "provider request failed; retrying"
                    );
                    // Slept in slices, so a caller that goes away stops the retries at once.
                    let until = Instant::now() + wait;
                    while !req.cancelled() {
                        let left = until.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        std::thread::sleep(left.min(Duration::from_millis(20)));
                    }
                    if req.cancelled() {
                        // The attempt that failed is what the breaker learns; no retry is sent.
                        self.settle(named, admission, !f.error.counts_against_provider());
                        return Err(ProviderError::Cancelled {
                            provider: self.name.clone(),
                        });
                    }
                }
                Err(f) => {
                    tracing::warn!(
                        provider = %self.name,
                        status = f.error.status(),
                        attempt,
                        error = %f.error,
                        "provider request failed"
                    );
                    self.settle(named, admission, !f.error.counts_against_provider());
                    return Err(f.error);
                }
            }
        }
    }

    /// The API key from `api_key_env`, or `None` when no variable is configured.
    fn api_key(&self) -> Result<Option<String>> {
        let Some(env) = &self.config.api_key_env else {
            return Ok(None);
        };
        match std::env::var(env) {
            Ok(k) if !k.trim().is_empty() => Ok(Some(k.trim().to_string())),
            _ => Err(ProviderError::MissingKey {
                provider: self.name.clone(),
                env: env.clone(),
            }),
        }
    }

    /// URL, JSON body and headers of `req` in this provider's wire format.
    fn encode(&self, req: &ChatRequest, key: Option<&str>) -> Result<Encoded> {
        let (url, body, headers) = match self.config.kind {
            ProviderKind::Openai => (
                openai::endpoint(&self.config.base_url),
                openai::body(&self.config, req),
                openai::headers(key),
            ),
            ProviderKind::Anthropic => (
                anthropic::endpoint(&self.config.base_url),
                anthropic::body(&self.config, req),
                anthropic::headers(key),
            ),
        };
        let body = body.map_err(|e| ProviderError::Transport {
            provider: self.name.clone(),
            message: format!("cannot encode the request: {e}"),
        })?;
        Ok(Encoded {
            url,
            body,
            headers,
            json: req.response_format.is_some(),
        })
    }

    fn lock_breaker(&self) -> MutexGuard<'_, Breaker> {
        // The breaker's state is a few integers, consistent after any panic.
        self.breaker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `f` on the breaker of `named` (a model callers named), or on the provider's own.
    fn with_breaker<T>(&self, named: Option<&str>, f: impl FnOnce(&mut Breaker) -> T) -> T {
        let Some(model) = named else {
            return f(&mut self.lock_breaker());
        };
        let mut map = self
            .named
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Names come from callers (a `PROVIDER/*` alias forwards any): forget healthy breakers
        // before the map grows large.
        if map.len() >= 256 && !map.contains_key(model) {
            let now = Instant::now();
            map.retain(|_, b| b.failures() > 0 || b.state(now) != BreakerState::Closed);
        }
        let b = map.entry(model.to_string()).or_insert_with(|| {
            Breaker::new(
                self.config.breaker_failures,
                Duration::from_millis(self.config.breaker_cooldown_ms),
            )
        });
        f(b)
    }

    fn admit(&self, named: Option<&str>) -> Result<Admission> {
        // A provider whose own circuit is open (it is down for its configured model) takes no
        // request for a named model either.
        if named.is_some() {
            let main = self.lock_breaker();
            if let BreakerState::Open { retry_in_ms } = main.state(Instant::now()) {
                return Err(ProviderError::CircuitOpen {
                    provider: self.name.clone(),
                    failures: main.failures(),
                    retry_in_ms,
                });
            }
        }
        let admitted = self.with_breaker(named, |b| {
            b.admit(Instant::now()).map(|(a, t)| (a, t, b.failures()))
        });
        match admitted {
            Ok((admission, transition, failures)) => {
                self.log_transition(transition, failures);
                Ok(admission)
            }
            Err(refused) => Err(ProviderError::CircuitOpen {
                provider: self.name.clone(),
                failures: refused.failures,
                retry_in_ms: refused.retry_in_ms,
            }),
        }
    }

    /// Tells the breaker how the request ended: `healthy` when the provider answered, even with
    /// an error that is the caller's fault.
    fn settle(&self, named: Option<&str>, admission: Admission, healthy: bool) {
        let (transition, failures) = self.with_breaker(named, |breaker| {
            let failures = breaker.failures();
            let transition = if healthy {
                breaker.on_healthy(admission)
            } else {
                breaker.on_failure(admission, Instant::now())
            };
            (transition, breaker.failures().max(failures))
        });
        self.log_transition(transition, failures);
    }

    fn log_transition(&self, transition: Option<Transition>, failures: u32) {
        let cooldown_ms = self.config.breaker_cooldown_ms;
        match transition {
            None => {}
            Some(Transition::Opened) => tracing::warn!(
                provider = %self.name, failures, cooldown_ms,
                "circuit opened: refusing requests until the cooldown ends"
            ),
            Some(Transition::Reopened) => tracing::warn!(
                provider = %self.name, failures, cooldown_ms,
                "circuit re-opened: the trial request failed"
            ),
            Some(Transition::HalfOpened) => tracing::info!(
                provider = %self.name, failures,
                "circuit half-open: letting one trial request through"
            ),
            Some(Transition::Closed) => tracing::info!(
                provider = %self.name, failures,
                "circuit closed: the provider answered"
            ),
        }
    }

    /// One HTTP exchange.
    fn attempt(&self, encoded: &Encoded, want_logprobs: bool) -> Result<Completion, Failure> {
        let mut request = self
            .agent
            .post(&encoded.url)
            .set("content-type", "application/json")
            .set("accept", "application/json");
        for (name, value) in &encoded.headers {
            request = request.set(name, value);
        }
        let response = match request.send_string(&encoded.body) {
            Ok(r) => r,
            Err(ureq::Error::Status(status, r)) => return Err(self.status_failure(status, r)),
            Err(ureq::Error::Transport(t)) => {
                return Err(Failure {
                    error: self.transport_error(&t, t.to_string()),
                    retry_after: None,
                })
            }
        };
        let status = response.status();
        if !(200..300).contains(&status) {
            // Redirects are not followed (ureq returns them as responses).
            let location = response.header("location").unwrap_or("nowhere").to_string();
            return Err(Failure {
                error: ProviderError::Status {
                    provider: self.name.clone(),
                    status,
                    message: format!("redirected to {location}; check base_url"),
                },
                retry_after: None,
            });
        }
        let bytes = self.read_body(response).map_err(|error| Failure {
            error,
            retry_after: None,
        })?;
        let parsed = match self.config.kind {
            ProviderKind::Openai => openai::parse(&bytes, want_logprobs),
            ProviderKind::Anthropic => anthropic::parse(&bytes, encoded.json),
        };
        parsed.map_err(|message| Failure {
            error: ProviderError::BadResponse {
                provider: self.name.clone(),
                message: format!(
                    "{message}; body starts with: {}",
                    super::truncate_chars(&String::from_utf8_lossy(&bytes), 200)
                ),
            },
            retry_after: None,
        })
    }

    fn status_failure(&self, status: u16, response: ureq::Response) -> Failure {
        let retry_after = backoff::retry_after(
            response.header("retry-after-ms"),
            response.header("retry-after"),
        );
        let status_text = response.status_text().to_string();
        // The error body is best effort: a status is an error whether or not it can be read.
        let body = self
            .read_body(response)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        Failure {
            error: ProviderError::Status {
                provider: self.name.clone(),
                status,
                message: error_message(&body, &status_text),
            },
            retry_after,
        }
    }

    fn read_body(&self, response: ureq::Response) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        response
            .into_reader()
            .take(MAX_BODY_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| self.transport_error(&e, format!("reading the response: {e}")))?;
        if bytes.len() as u64 > MAX_BODY_BYTES {
            return Err(ProviderError::BadResponse {
                provider: self.name.clone(),
                message: format!("body larger than {MAX_BODY_BYTES} bytes"),
            });
        }
        Ok(bytes)
    }

    /// [`ProviderError::Timeout`] when `e` was caused by the time limit, else `Transport` with
    /// `message`.
    fn transport_error(
        &self,
        e: &(dyn std::error::Error + 'static),
        message: String,
    ) -> ProviderError {
        let mut cause = Some(e);
        while let Some(c) = cause {
            if let Some(io) = c.downcast_ref::<std::io::Error>() {
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                ) {
                    return ProviderError::Timeout {
                        provider: self.name.clone(),
                        ms: self.config.timeout_ms,
                    };
                }
            }
            cause = c.source();
        }
        ProviderError::Transport {
            provider: self.name.clone(),
            message,
        }
    }
}
