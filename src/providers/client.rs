//! [`Provider`]: one configured remote provider and its request loop.

use std::io::{BufRead, BufReader, Read};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::backoff::{self, Jitter};
use super::breaker::{Admission, Breaker, BreakerState, Transition};
use super::stream::{Assembly, EventError, Sse};
use super::{
    anthropic, error_message, openai, ChatRequest, ChatResponse, Completion, Delta, ProviderConfig,
    ProviderError, ProviderKind, Result,
};

/// Largest response body read, in bytes.
const MAX_BODY_BYTES: u64 = 10 * 1024 * 1024;
/// Largest streamed answer read, in bytes, and its longest line.
const MAX_STREAM_BYTES: u64 = 64 * 1024 * 1024;
const MAX_LINE_BYTES: u64 = 4 * 1024 * 1024;

/// Where a streamed answer's pieces go; `false` back means nobody wants more (the connection is
/// closed and the answer ends as [`ProviderError::Cancelled`]).
pub type Sink<'a> = &'a mut dyn FnMut(Delta) -> bool;

/// One remote provider: its configuration, an HTTP agent (connections are reused), and its
/// circuit breaker. Shared between threads behind an `Arc`.
#[derive(Debug)]
pub struct Provider {
    name: String,
    config: ProviderConfig,
    agent: ureq::Agent,
    /// For streamed answers: `timeout_ms` bounds each wait for the next bytes, not the whole.
    stream_agent: ureq::Agent,
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
        let wait = Duration::from_millis(cfg.timeout_ms);
        let stream_agent = ureq::AgentBuilder::new()
            .timeout_connect(wait)
            .timeout_read(wait)
            .timeout_write(wait)
            .redirects(0)
            .user_agent(concat!("corral/", env!("CARGO_PKG_VERSION")))
            .build();
        Provider {
            stream_agent,
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
        if self.config.always_stream {
            // Read as a stream whose pieces go nowhere: the cancel flag, checked between
            // them, closes the connection when the caller goes away.
            let mut sink = |_: Delta| !req.cancelled();
            return self.run(req, Some(&mut sink), false);
        }
        self.run(req, None, false)
    }

    /// As [`Provider::complete`], asking for a streamed answer and handing its pieces to `sink`
    /// as they arrive: first [`Delta::Begin`], then text and tool-call pieces. Retries and the
    /// breaker apply until the first piece; a failure after it is
    /// [`ProviderError::Interrupted`] (never retried: the caller has part of an answer). A
    /// provider that answers with one JSON body instead is taken whole, as one piece.
    /// `timeout_ms` bounds each wait for more bytes rather than the whole answer.
    pub fn stream(&self, req: &ChatRequest, sink: Sink<'_>) -> Result<ChatResponse> {
        self.run(req, Some(sink), true)
    }

    /// `relay`: the sink passes pieces on to a caller (so none may be sent twice: no retry
    /// once one went out); without it a stream is only a way to read the answer.
    fn run(
        &self,
        req: &ChatRequest,
        mut sink: Option<Sink<'_>>,
        relay: bool,
    ) -> Result<ChatResponse> {
        let key = self.api_key()?;
        let encoded = self.encode(req, key.as_deref(), sink.is_some())?;
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
            let result = match sink.as_mut() {
                None => self.attempt(&encoded, req.logprobs),
                Some(sink) => self.attempt_stream(&encoded, req, &mut **sink, relay),
            };
            match result {
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
    fn encode(&self, req: &ChatRequest, key: Option<&str>, stream: bool) -> Result<Encoded> {
        let (url, body, headers) = match self.config.kind {
            ProviderKind::Openai => (
                openai::endpoint(&self.config.base_url),
                openai::body_for(&self.config, req, stream),
                openai::headers(key),
            ),
            ProviderKind::Anthropic => (
                anthropic::endpoint(&self.config.base_url),
                anthropic::body_for(&self.config, req, stream),
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
        let response = self.send(&self.agent, encoded, "application/json")?;
        let bytes = self.read_body(response).map_err(|error| Failure {
            error,
            retry_after: None,
        })?;
        self.parse_whole(&bytes, encoded, want_logprobs)
    }

    /// Sends the request; a success status's response, its body unread.
    fn send(
        &self,
        agent: &ureq::Agent,
        encoded: &Encoded,
        accept: &str,
    ) -> Result<ureq::Response, Failure> {
        let mut request = agent
            .post(&encoded.url)
            .set("content-type", "application/json")
            .set("accept", accept);
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
        Ok(response)
    }

    /// A whole answer's body, parsed in this provider's format.
    fn parse_whole(
        &self,
        bytes: &[u8],
        encoded: &Encoded,
        want_logprobs: bool,
    ) -> Result<Completion, Failure> {
        let parsed = match self.config.kind {
            ProviderKind::Openai => openai::parse(bytes, want_logprobs),
            ProviderKind::Anthropic => anthropic::parse(bytes, encoded.json),
        };
        parsed.map_err(|message| Failure {
            error: ProviderError::BadResponse {
                provider: self.name.clone(),
                message: format!(
                    "{message}; body starts with: {}",
                    super::truncate_chars(&String::from_utf8_lossy(bytes), 200)
                ),
            },
            retry_after: None,
        })
    }

    /// One HTTP exchange of a streamed answer: its pieces go to `sink` as they are read. A
    /// failure once a piece went out is [`ProviderError::Interrupted`]; `sink` refusing a piece,
    /// or the caller's cancel flag, ends it as [`ProviderError::Cancelled`] and drops the
    /// connection (the provider sees it closed and stops generating).
    fn attempt_stream(
        &self,
        encoded: &Encoded,
        req: &ChatRequest,
        sink: Sink<'_>,
        relay: bool,
    ) -> Result<Completion, Failure> {
        let response = self.send(&self.stream_agent, encoded, "text/event-stream")?;
        let failure = |error| Failure {
            error,
            retry_after: None,
        };
        let mut begun = false;
        if !response
            .content_type()
            .eq_ignore_ascii_case("text/event-stream")
        {
            // A server that does not stream answered whole: passed on as one piece.
            let bytes = self.read_body(response).map_err(failure)?;
            let c = self.parse_whole(&bytes, encoded, req.logprobs)?;
            for p in Assembly::pieces_of(&c) {
                if !self.pass(p, &mut begun, c.model.as_deref(), req, sink) {
                    return Err(failure(self.cancelled()));
                }
            }
            return Ok(c);
        }
        let mut reader = BufReader::new(response.into_reader().take(MAX_STREAM_BYTES));
        let mut asm = Assembly::default();
        let mut sse = Sse::default();
        let mut line = Vec::new();
        let mut eof = false;
        while !asm.done && !eof {
            if req.cancelled() {
                return Err(failure(self.cancelled()));
            }
            line.clear();
            let read = (&mut reader)
                .take(MAX_LINE_BYTES)
                .read_until(b'\n', &mut line);
            let error = match read {
                Ok(0) => {
                    eof = true;
                    None
                }
                Ok(n) if n as u64 >= MAX_LINE_BYTES && !line.ends_with(b"\n") => {
                    Some(ProviderError::BadResponse {
                        provider: self.name.clone(),
                        message: format!("a stream line longer than {MAX_LINE_BYTES} bytes"),
                    })
                }
                Ok(_) => None,
                Err(e) => Some(self.transport_error(&e, format!("reading the stream: {e}"))),
            };
            if let Some(e) = error {
                return Err(failure(self.broken(e, begun && relay)));
            }
            // The last event needs no blank line after it.
            let text = if eof {
                std::borrow::Cow::Borrowed("")
            } else {
                String::from_utf8_lossy(&line)
            };
            let Some((event, data)) = sse.line(&text) else {
                continue;
            };
            let pieces = match self.config.kind {
                ProviderKind::Openai => asm.openai(&data, req.logprobs),
                ProviderKind::Anthropic => asm.anthropic(&event, &data, encoded.json),
            };
            let pieces = pieces.map_err(|e| {
                let error = match e {
                    EventError::Provider(e) => ProviderError::Status {
                        provider: self.name.clone(),
                        status: e.status,
                        message: e.message,
                    },
                    EventError::Unreadable(m) => ProviderError::BadResponse {
                        provider: self.name.clone(),
                        message: format!(
                            "{m}; event data starts with: {}",
                            super::truncate_chars(&data, 200)
                        ),
                    },
                };
                failure(self.broken(error, begun && relay))
            })?;
            for p in pieces {
                if !self.pass(p, &mut begun, asm.model(), req, sink) {
                    return Err(failure(self.cancelled()));
                }
            }
        }
        if !asm.done && !asm.finished() {
            let e = ProviderError::Transport {
                provider: self.name.clone(),
                message: "the stream ended before the answer did".into(),
            };
            return Err(failure(self.broken(e, begun && relay)));
        }
        Ok(asm.completion())
    }

    /// Hands `piece` to `sink`, after [`Delta::Begin`] when it is the first (`model`: the one
    /// the stream named, if it did). `false` when the sink wants no more.
    fn pass(
        &self,
        piece: Delta,
        begun: &mut bool,
        model: Option<&str>,
        req: &ChatRequest,
        sink: Sink<'_>,
    ) -> bool {
        if !*begun {
            *begun = true;
            let model = model
                .or(req.model.as_deref())
                .unwrap_or(&self.config.model)
                .to_string();
            let begin = Delta::Begin {
                provider: self.name.clone(),
                model,
            };
            if !sink(begin) {
                return false;
            }
        }
        sink(piece)
    }

    fn cancelled(&self) -> ProviderError {
        ProviderError::Cancelled {
            provider: self.name.clone(),
        }
    }

    /// `e` as it ends a stream: as is before anything went out (retried when it may be),
    /// else [`ProviderError::Interrupted`].
    fn broken(&self, e: ProviderError, begun: bool) -> ProviderError {
        if !begun {
            return e;
        }
        ProviderError::Interrupted {
            provider: self.name.clone(),
            message: e.to_string(),
        }
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
